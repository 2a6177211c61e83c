"""The pieces every training loop shares: resume, the data arrays, the batch draw, the
learning-rate schedule, gradient clipping, the CSV log with its progress bar, atomic
state files, the run's files kept whole across kills and the stopping rules.

:func:`napari_berdiff.training.train` (Bernoulli, Gaussian, deterministic) and
:func:`napari_berdiff.training.refiner.train_refiner` (the alternate segmentor + refiner
loop) are built from them, so both resume exactly, log the same way and honour the same
``checkpoint_every`` / ``max_minutes`` settings.
"""

from __future__ import annotations

import csv
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import numpy as np
import torch

from ..data.dataset import SegDataset
from ..distribution import intensity_stats
from ..model import normalise_image
from ..outfolder import (atomic_write_text, pid_alive, remove_stale_temporaries,
                         replace_from_temporary, temporary_path)
from .config import TrainConfig

__all__ = ["state_path_for", "log_path_for", "load_state", "resume_config", "TrainingArrays",
           "training_arrays", "augment_batch", "Batch", "draw_batch", "lr_at", "set_lr",
           "clip_gradients", "save_state", "RunLog", "RunFiles"]


def state_path_for(out: str | Path) -> Path:
    """``model.safetensors`` → ``model.state.pt`` (the training state for ``resume``)."""
    out = Path(out)
    return out.with_name(out.stem + ".state.pt")


def log_path_for(out: str | Path) -> Path:
    """``model.safetensors`` → ``model.log.csv``."""
    out = Path(out)
    return out.with_name(out.stem + ".log.csv")


def load_state(path: str | Path) -> dict[str, Any]:
    """Read a ``*.state.pt`` training state (tensors and plain data only)."""
    return torch.load(str(path), map_location="cpu", weights_only=True)


def resume_config(config: TrainConfig, state_file: Path) -> tuple[TrainConfig, dict[str, Any]]:
    """The stored recipe (with ``config``'s run settings) and the saved state.

    Only ``steps``, ``max_minutes``, ``checkpoint_every``, ``threads`` and ``device`` may
    change on resume.
    """
    if not state_file.exists():
        raise ValueError(f"cannot resume: no training state at {state_file}")
    saved = load_state(state_file)
    stored = TrainConfig.from_dict(json.loads(saved["config"]))
    cfg = stored.replace(steps=config.steps, max_minutes=config.max_minutes,
                         checkpoint_every=config.checkpoint_every,
                         threads=config.threads, device=config.device)
    return cfg, saved


class TrainingArrays:
    """The normalised images, the masks and each item's annotator count, as tensors."""

    def __init__(self, images: torch.Tensor, masks: torch.Tensor, counts: torch.Tensor,
                 description: dict[str, Any]):
        self.images, self.masks, self.counts = images, masks, counts
        self.description = description
        #: (n, K_max) bool: whether each of an item's annotations marks anything.
        marked = masks.reshape(*masks.shape[:2], -1).any(2)
        self.nonempty = marked & (torch.arange(masks.shape[1]) < counts[:, None])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def presence_fraction(self, idx: torch.Tensor) -> torch.Tensor:
        """The fraction of each item's annotations that are not empty, float (len(idx),)."""
        return self.nonempty[idx].sum(1).float() / self.counts[idx].float()


def training_arrays(cfg: TrainConfig, dataset: SegDataset, image_channels: int,
                    size_multiple: int) -> TrainingArrays:
    """Check ``dataset`` against the network and normalise its images as ``cfg`` says."""
    if len(dataset) == 0:
        raise ValueError("the training data set is empty")
    images, masks, counts = dataset.arrays()
    _, c_img, h, w = images.shape
    if c_img != image_channels:
        raise ValueError(f"the network takes {image_channels} image channel(s) but the "
                         f"data has {c_img}")
    m = int(size_multiple)
    if h % m or w % m:
        raise ValueError(f"the images are {h}x{w}; this network needs sizes divisible by {m}")
    images = np.stack([normalise_image(im, {"mode": cfg.normalisation}) for im in images])
    desc = dataset.describe()
    # what the inputs look like, for the out-of-distribution notice (napari_berdiff.distribution)
    pick = np.unique(np.linspace(0, len(images) - 1, min(len(images), 256)).astype(int))
    desc["intensity_stats"] = intensity_stats(images[pick])
    return TrainingArrays(torch.from_numpy(images), torch.from_numpy(masks),
                          torch.from_numpy(counts), desc)


def augment_batch(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Apply one of the 8 symmetries of the square per item (code 0..7)."""
    out = torch.empty_like(x)
    for i, c in enumerate(codes.tolist()):
        xi = x[i]
        if c >= 4:
            xi = xi.flip(-1)
        out[i] = torch.rot90(xi, c % 4, dims=(-2, -1))
    return out


class Batch(NamedTuple):
    """A drawn training batch (see :func:`draw_batch`)."""

    idx: torch.Tensor
    image: torch.Tensor
    mask: torch.Tensor
    codes: torch.Tensor | None
    annotator: torch.Tensor


def draw_batch(gen: torch.Generator, data: TrainingArrays, n: int, augment: bool,
               nonempty_only: bool = False) -> Batch:
    """Draw ``n`` items and one annotator per item (uniformly among its masks, or with
    ``nonempty_only`` among its non-empty masks, when it has any).

    Returns a :class:`Batch`: ``idx``, ``image`` (n, C, H, W), ``mask`` (n, 1, H, W), the
    symmetry ``codes`` (drawn after the annotators) that augmented image and mask alike when
    ``augment`` (None otherwise), and the index of each item's drawn ``annotator``.
    """
    idx = torch.randint(len(data), (n,), generator=gen)
    u = torch.rand(n, generator=gen)
    if nonempty_only:
        ne = data.nonempty[idx]
        n_ne = ne.sum(1)
        choices = torch.where(n_ne > 0, n_ne, data.counts[idx])
        # The item's non-empty annotators first (all of them, in order, when none is).
        order = torch.argsort((~ne).to(torch.uint8), dim=1, stable=True)
        ann = order[torch.arange(n), (u * choices).long()]
    else:
        ann = (u * data.counts[idx]).long()
    img = data.images[idx].float()
    x0 = data.masks[idx, ann].unsqueeze(1).float()
    codes = None
    if augment:
        codes = torch.randint(8, (n,), generator=gen)
        img, x0 = augment_batch(img, codes), augment_batch(x0, codes)
    return Batch(idx, img, x0, codes, ann)


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then a cosine decay to ``lr · min_lr_ratio``."""
    if cfg.warmup > 0 and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(cfg.steps - cfg.warmup, 1)
    prog = min(max(step - cfg.warmup, 0) / span, 1.0)
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * prog))


def set_lr(optimisers: Sequence[torch.optim.Optimizer], cfg: TrainConfig, step: int) -> float:
    """Set the learning rate of ``step`` on every optimiser; returns it."""
    lr = lr_at(cfg, step)
    for opt in optimisers:
        for g in opt.param_groups:
            g["lr"] = lr
    return lr


def clip_gradients(net: torch.nn.Module | list[torch.nn.Parameter], max_norm: float
                   ) -> float:
    """Clip the global gradient norm of a network (or a list of its parameters;
    ``max_norm <= 0``: only measure it); returns it."""
    params = list(net.parameters()) if isinstance(net, torch.nn.Module) else list(net)
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.sqrt(sum((p.grad.detach() ** 2).sum() for p in params
                                if p.grad is not None)))


def begin_run(config: TrainConfig, state_file: Path, resume: bool
              ) -> tuple[TrainConfig, dict[str, Any] | None]:
    """The run's config (the stored recipe when resuming) and its saved state (None for a
    new run); sets torch's threads when the config names a count."""
    saved = None
    if resume:
        config, saved = resume_config(config, state_file)
    if config.threads > 0:
        torch.set_num_threads(int(config.threads))
    return config, saved


def restore_state(saved: dict[str, Any], gen: torch.Generator, **parts: Any
                  ) -> tuple[int, float]:
    """Load a saved training state into ``parts`` (each a module or optimiser, keyed by its
    entry in ``saved``), the batch generator and torch's RNG; returns ``(step, elapsed_s)``."""
    for key, part in parts.items():
        part.load_state_dict(saved[key])
    gen.set_state(saved["gen"])
    torch.set_rng_state(saved["torch_rng"])
    return int(saved["step"]), float(saved["elapsed_s"])


def save_state(state_file: Path, state: dict[str, Any]) -> None:
    """Write a training state atomically (temporary file, fsync, then rename)."""
    tmp = temporary_path(state_file)
    try:
        torch.save(state, str(tmp))
        replace_from_temporary(tmp, state_file)
    finally:
        tmp.unlink(missing_ok=True)


class RunFiles:
    """The files of a training run (model, state, log …), kept whole across kills.

    A fresh run over an existing one (``--force``) moves the old files aside, into
    ``.<model>.old-<pid>-…/``, and removes them only once its own first checkpoint is
    written: the old run is never truncated. On start, a run tidies what a killed run left:
    the temporary files of its atomic writes, and a previous run that a fresh run had moved
    aside (put back when the fresh run died before all the files of its first checkpoint
    were written; removed otherwise).
    """

    _LIST = "moved-aside.txt"

    def __init__(self, files: Sequence[Path], *, enabled: bool = True):
        self.files = [Path(f) for f in files]
        self.enabled = enabled
        self.aside: Path | None = None
        self._prefix = f".{self.files[0].name}.old-"
        if enabled:
            self._recover()
            for f in self.files:
                remove_stale_temporaries(f)

    def set_aside_previous_run(self) -> None:
        """A fresh run is about to start: move an existing run's files aside."""
        if not self.enabled or not any(f.exists() for f in self.files):
            return
        self.aside = Path(tempfile.mkdtemp(prefix=f"{self._prefix}{os.getpid()}-",
                                           dir=self.files[0].parent))
        moving = [f for f in self.files if f.exists()]
        atomic_write_text(self.aside / self._LIST, "".join(f"{f.name}\n" for f in moving))
        for f in moving:
            os.rename(f, self.aside / f.name)

    def _recover(self) -> None:
        out = self.files[0]
        for aside in sorted(out.parent.glob(self._prefix + "*")):
            pid = aside.name[len(self._prefix):].split("-", 1)[0]
            if not pid.isdigit() or pid_alive(int(pid)):
                continue
            listed = aside / self._LIST
            if listed.exists() and not all(f.exists() for f in self.files):
                # the fresh run died before its first checkpoint was complete: the old run
                # comes back, and what the dead run wrote (its log …) goes
                old = set(listed.read_text().split())
                for f in self.files:
                    if (aside / f.name).exists():
                        os.replace(aside / f.name, f)
                    elif f.exists() and f.name not in old:
                        f.unlink()
            shutil.rmtree(aside, ignore_errors=True)

    def checkpointed(self) -> None:
        """The run's first checkpoint is on disk: the run it replaced can go."""
        if self.aside is not None:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.aside = None


class RunLog:
    """The CSV log (one row per step) and the tqdm bar of a run, and its clock.

    On resume the rows up to the saved step are kept and the later ones dropped, so the
    log reads as one uninterrupted run. With ``enabled=False`` (DDP ranks > 0) it writes
    nothing but still keeps time.
    """

    def __init__(self, path: Path, fields: Sequence[str], *, total: int, step: int,
                 resumed: bool, desc: str, progress: bool, enabled: bool = True,
                 elapsed_before: float = 0.0):
        self.enabled = enabled
        self.start_step = step
        self.elapsed_before = float(elapsed_before)
        self.t0 = time.perf_counter()
        self.losses: list[float] = []
        self._file = None
        self.bar = None
        if enabled:
            if resumed and path.exists():
                self._keep_rows_up_to(path, fields, step)
                self._file = open(path, "a", newline="")
            else:
                self._file = open(path, "w", newline="")
                csv.writer(self._file).writerow(list(fields))
            self._writer = csv.writer(self._file)
            self.flush()
            if progress:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total, initial=step, desc=desc, unit="step",
                                dynamic_ncols=True)

    @staticmethod
    def _keep_rows_up_to(path: Path, fields: Sequence[str], step: int) -> None:
        """Rewrite the log (atomically) with its rows of steps 1..``step`` only: a killed
        run may have logged steps after its last checkpoint, or half a row."""
        with open(path, newline="") as f:
            rows = list(csv.reader(f))[1:]
        kept: dict[int, list[str]] = {}
        for r in rows:
            if len(r) == len(fields) and r[0].isdigit() and 0 < int(r[0]) <= step:
                kept[int(r[0])] = r
        tmp = temporary_path(path)
        try:
            with open(tmp, "w", newline="") as f:
                w = csv.writer(f)
                w.writerow(list(fields))
                w.writerows(kept[k] for k in sorted(kept))
            replace_from_temporary(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @property
    def session_s(self) -> float:
        """Seconds since this session started."""
        return time.perf_counter() - self.t0

    @property
    def elapsed(self) -> float:
        """Training seconds over all sessions of the run."""
        return self.elapsed_before + self.session_s

    def over_budget(self, max_minutes: float) -> bool:
        """Whether this session has used its wall-clock budget (0: no budget)."""
        return max_minutes > 0 and self.session_s > max_minutes * 60

    def after_step(self, step: int, elapsed: float, cfg: TrainConfig,
                   checkpoint: Callable[[int, float], None], stop_after: int | None = None,
                   over_time: bool | None = None) -> str | None:
        """Checkpoint when due (every ``checkpoint_every``, at the last step, when stopping).

        Returns why the run stops (``"time"``: the budget is used; ``"interrupted"``:
        ``stop_after`` reached) or None. ``over_time`` overrides the budget test (DDP
        agrees on it across ranks).
        """
        if over_time is None:
            over_time = self.over_budget(cfg.max_minutes)
        interrupted = stop_after is not None and step >= stop_after
        if step % cfg.checkpoint_every == 0 or step == cfg.steps or over_time or interrupted:
            checkpoint(step, elapsed)
        return "time" if over_time else ("interrupted" if interrupted else None)

    def row(self, step: int, loss: float, values: Sequence[str], total: int) -> None:
        """Record one step: ``values`` are the CSV cells after the step number."""
        self.losses.append(loss)
        if not self.enabled:
            return
        self._writer.writerow([step, *values])
        if self.bar is not None:
            self.bar.update(1)
            if step % 10 == 0 or step == total:
                recent = self.losses[-50:]
                self.bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}",
                                     sps=f"{(step - self.start_step) / self.session_s:.2f}")

    def flush(self) -> None:
        """Write the rows so far to disk (before every checkpoint, so that the log always
        holds every step of the saved state)."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self._file is not None:
            self._file.close()
