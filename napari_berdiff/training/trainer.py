"""One trainer for the Bernoulli model, the Gaussian model and the deterministic baseline.

Every step draws, from one seeded ``torch.Generator``: the items of the batch, one annotator
per item (uniformly among that item's masks, as BerDiff and Wolleb et al. do), a symmetry of
the square for augmentation, the timesteps and the forward-process noise. The generator's
state is saved in the checkpoint, so ``resume`` continues a run exactly: the losses after a
resume are those an uninterrupted run would have logged.

Under ``torchrun`` (``WORLD_SIZE > 1``) the same code runs with PyTorch DDP: every process
draws the *global* batch from the same generator and trains on its own slice of it, so the
run is also independent of how it is split into processes (up to float summation order),
and rank 0 writes the checkpoints, the exported model and the CSV log.

Files written for ``out = model.safetensors``:

* ``model.safetensors``: the EMA weights in our format (DESIGN §5), rewritten at every
  checkpoint so that a partial run is usable;
* ``model.state.pt``: the full training state (weights, EMA, optimiser, step, RNG states,
  recipe) for ``resume``; plain tensors and lists, loadable with ``weights_only=True``;
* ``model.log.csv``: one row per step (step, loss and its parts, lr, gradient norm, time).
"""

from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..data.dataset import SegDataset
from ..diffusion import BernoulliKernel, GaussianKernel, make_kernel, timestep_subsequence
from ..diffusion.device import select_device
from ..model import normalise_image
from .config import TrainConfig
from .ema import EMA

__all__ = ["train", "TrainResult", "state_path_for", "log_path_for", "export_model",
           "segmentor_predict", "soft_dice_loss"]

LOG_FIELDS = ("step", "loss", "part1", "part2", "lr", "grad_norm", "elapsed_s")


def state_path_for(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".state.pt")


def log_path_for(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.stem + ".log.csv")


@dataclass
class TrainResult:
    """What a run did."""

    step: int
    elapsed_s: float
    losses: list[float]
    out: Path
    state: Path
    log: Path
    stopped_by_time: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def steps_per_s(self) -> float:
        return self.extra.get("steps_this_session", self.step) / max(self.elapsed_s, 1e-9)


# ---------------------------------------------------------------------------- helpers
def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Per-sample ``1 − soft Dice`` (smoothed so that empty masks score 0 loss)."""
    p, y = prob.flatten(1), target.flatten(1)
    inter = (p * y).sum(1)
    return 1.0 - (2 * inter + eps) / (p.sum(1) + y.sum(1) + eps)


def _augment(x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Apply one of the 8 symmetries of the square per item (code 0..7)."""
    out = torch.empty_like(x)
    for i, c in enumerate(codes.tolist()):
        xi = x[i]
        if c >= 4:
            xi = xi.flip(-1)
        out[i] = torch.rot90(xi, c % 4, dims=(-2, -1))
    return out


def _lr_at(cfg: TrainConfig, step: int) -> float:
    if cfg.warmup > 0 and step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    span = max(cfg.steps - cfg.warmup, 1)
    prog = min(max(step - cfg.warmup, 0) / span, 1.0)
    lo = cfg.lr * cfg.min_lr_ratio
    return lo + 0.5 * (cfg.lr - lo) * (1 + math.cos(math.pi * prog))


def _dist_info() -> tuple[int, int, bool]:
    """(rank, world size, whether this call initialised the process group)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    import torch.distributed as dist

    created = False
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get(
            "BERDIFF_DDP_BACKEND", "") != "gloo" else "gloo"
        dist.init_process_group(backend=backend)
        created = True
    return dist.get_rank(), dist.get_world_size(), created


def segmentor_predict(net: torch.nn.Module, image: torch.Tensor) -> torch.Tensor:
    """The deterministic baseline's probability map: the UNet fed an all-zero mask at t = 0.

    ``image`` is (N, C, H, W); returns (N, 1, H, W) probabilities.
    """
    zeros = torch.zeros(image.shape[0], 1, *image.shape[2:], dtype=image.dtype,
                        device=image.device)
    t = torch.zeros(image.shape[0], dtype=torch.long, device=image.device)
    return net(zeros, t, image)


def _metadata(cfg: TrainConfig, data_desc: dict[str, Any], step: int, elapsed: float,
              name: str | None, extra_meta: dict[str, Any] | None) -> dict[str, Any]:
    kind = "segmentor" if cfg.kind == "deterministic" else cfg.kind
    net = cfg.network_config()
    training = {
        "recipe": cfg.to_dict(),
        "steps_done": int(step),
        "train_time_s": round(float(elapsed), 1),
        "torch": torch.__version__,
    }
    meta: dict[str, Any] = {
        "kind": kind,
        "data": {
            "image_size": int(net.image_size),
            "image_channels": int(net.image_channels),
            "normalisation": {"mode": cfg.normalisation},
            "description": data_desc.get("description", ""),
            "dataset": data_desc,
        },
        "training": training,
        "metrics": {},
    }
    if name:
        meta["name"] = name
    if cfg.kind == "deterministic":
        meta["segmentor"] = {"input": "x_t = zeros, t = 0", "threshold": 0.5,
                             "loss": f"BCE + {cfg.dice_weight} * (1 - soft Dice)"}
    for k, v in (extra_meta or {}).items():
        if isinstance(v, dict) and isinstance(meta.get(k), dict):
            meta[k] = {**meta[k], **v}
        else:
            meta[k] = v
    return meta


def export_model(net: torch.nn.Module, cfg: TrainConfig, out: str | Path,
                 data_desc: dict[str, Any], step: int, elapsed: float,
                 name: str | None = None, extra_meta: dict[str, Any] | None = None) -> Path:
    """Write ``net`` (normally the EMA weights) to ``out`` in our safetensors format."""
    from ..checkpoints.ours import save_model

    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    save_model(net, tmp, diffusion=cfg.diffusion_config(),
               metadata=_metadata(cfg, data_desc, step, elapsed, name, extra_meta))
    os.replace(tmp, out)
    return out


def load_state(path: str | Path) -> dict[str, Any]:
    """Read a ``*.state.pt`` training state (tensors and plain data only)."""
    return torch.load(str(path), map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------------- the trainer
def train(
    config: TrainConfig,
    dataset: SegDataset,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    name: str | None = None,
    extra_meta: dict[str, Any] | None = None,
    stop_after: int | None = None,
) -> TrainResult:
    """Train (or continue training) a model and write it to ``out``.

    Parameters
    ----------
    config
        The recipe.
    dataset
        Training items (all images the same size, divisible by the network's size multiple).
    out
        The exported ``.safetensors`` file; the state and the CSV log go next to it.
    resume
        Continue from ``<out>.state.pt`` exactly where it stopped. The recipe stored there
        is used; ``config`` may only change ``steps``, ``max_minutes``, ``checkpoint_every``,
        ``threads`` and ``device``.
    progress
        Show a tqdm bar (loss, steps/s) on rank 0.
    name, extra_meta
        The model's name and extra metadata for the exported file.
    stop_after
        Stop (with a checkpoint) after this step, as if interrupted (tests, budgets).
    """
    out = Path(out)
    name = name or out.stem
    state_file, log_file = state_path_for(out), log_path_for(out)
    if not out.parent.exists():
        raise ValueError(f"the output folder {out.parent} does not exist")
    if len(dataset) == 0:
        raise ValueError("the training data set is empty")

    saved = None
    if resume:
        if not state_file.exists():
            raise ValueError(f"cannot resume: no training state at {state_file}")
        saved = load_state(state_file)
        stored = TrainConfig.from_dict(json.loads(saved["config"]))
        config = stored.replace(steps=config.steps, max_minutes=config.max_minutes,
                                checkpoint_every=config.checkpoint_every,
                                threads=config.threads, device=config.device)
    cfg = config
    if cfg.threads > 0:
        torch.set_num_threads(int(cfg.threads))
    rank, world, created_pg = _dist_info()
    dev = select_device(cfg.device)
    if world > 1 and dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))

    net_cfg = cfg.network_config()
    images, masks, counts = dataset.arrays()
    n_items, c_img, h, w = images.shape
    if c_img != net_cfg.image_channels:
        raise ValueError(f"the network takes {net_cfg.image_channels} image channel(s) but the "
                         f"data has {c_img}")
    m = net_cfg.size_multiple
    if h % m or w % m:
        raise ValueError(f"the images are {h}x{w}; this network needs sizes divisible by {m}")
    images = np.stack([normalise_image(im, {"mode": cfg.normalisation}) for im in images])
    images_t = torch.from_numpy(images)
    masks_t = torch.from_numpy(masks)
    counts_t = torch.from_numpy(counts)
    data_desc = dataset.describe()

    torch.manual_seed(cfg.seed)
    net = cfg.build_network().to(dev)
    ema = EMA(net, cfg.ema_decay)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=tuple(cfg.betas))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    step = 0
    elapsed_before = 0.0
    if saved is not None:
        net.load_state_dict(saved["net"])
        ema.load_state_dict(saved["ema"])
        opt.load_state_dict(saved["opt"])
        gen.set_state(saved["gen"])
        torch.set_rng_state(saved["torch_rng"])
        step = int(saved["step"])
        elapsed_before = float(saved["elapsed_s"])

    model: torch.nn.Module = net
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(net, device_ids=[dev.index] if dev.type == "cuda" else None)

    kernel = make_kernel(cfg.diffusion_config()) if cfg.kind != "deterministic" else None
    T = cfg.diffusion_config().timesteps
    visited = torch.tensor(timestep_subsequence(cfg.diffusion_config().default_steps, T))

    # CSV log: on resume keep the rows up to the saved step.
    if rank == 0:
        rows: list[list[str]] = []
        if saved is not None and log_file.exists():
            with open(log_file, newline="") as f:
                rows = [r for r in csv.reader(f)][1:]
            rows = [r for r in rows if r and int(r[0]) <= step]
        logf = open(log_file, "w", newline="")
        writer = csv.writer(logf)
        writer.writerow(LOG_FIELDS)
        writer.writerows(rows)
        logf.flush()

    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc=f"train {cfg.kind}", unit="step",
                   dynamic_ncols=True)

    def checkpoint(cur_step: int, elapsed: float) -> None:
        if rank != 0:
            return
        state = {
            "net": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
            "gen": gen.get_state(), "torch_rng": torch.get_rng_state(),
            "step": cur_step, "elapsed_s": elapsed, "config": cfg.to_json(),
            "data": json.dumps(data_desc),
        }
        tmp = state_file.with_name(state_file.name + ".tmp")
        torch.save(state, str(tmp))
        os.replace(tmp, state_file)
        export_model(ema.module, cfg, out, data_desc, cur_step, elapsed, name, extra_meta)
        logf.flush()

    gb = cfg.batch_size * world
    lo, hi = rank * cfg.batch_size, (rank + 1) * cfg.batch_size
    losses: list[float] = []
    t0 = time.perf_counter()
    stopped_by_time = False
    start_step = step
    net.train()
    while step < cfg.steps:
        # ---- draw the global batch (identical on every rank), keep this rank's slice
        idx = torch.randint(n_items, (gb,), generator=gen)
        ann = (torch.rand(gb, generator=gen) * counts_t[idx]).long()
        img = images_t[idx].float()
        x0 = masks_t[idx, ann].unsqueeze(1).float()
        if cfg.augment:
            codes = torch.randint(8, (gb,), generator=gen)
            img, x0 = _augment(img, codes), _augment(x0, codes)
        if cfg.kind == "deterministic":
            t = torch.zeros(gb, dtype=torch.long)
            x_in = torch.zeros_like(x0)
            noise = None
        else:
            if cfg.t_sampling == "visited":
                t = visited[torch.randint(len(visited), (gb,), generator=gen)]
            else:
                t = torch.randint(T, (gb,), generator=gen)
            if isinstance(kernel, BernoulliKernel):
                x_in = kernel.q_sample(x0, t, generator=gen)
                noise = None
            else:
                noise = torch.randn(x0.shape, generator=gen)
                x_in = kernel.q_sample(x0, t, noise)
        img, x0, x_in, t = (v[lo:hi].to(dev) for v in (img, x0, x_in, t))
        if noise is not None:
            noise = noise[lo:hi].to(dev)

        lr = _lr_at(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr
        out_t = model(x_in, t, img)
        if cfg.kind == "deterministic":
            prob = out_t.clamp(1e-7, 1 - 1e-7)
            p1 = F.binary_cross_entropy(prob, x0, reduction="none").flatten(1).mean(1).mean()
            p2 = soft_dice_loss(prob, x0).mean()
            loss = p1 + cfg.dice_weight * p2
        elif isinstance(kernel, BernoulliKernel):
            parts = kernel.loss(out_t, x0, x_in, t, focal=cfg.focal, bce_weight=cfg.bce_weight)
            p1, p2 = parts["vb"].mean(), parts["bce"].mean()
            loss = cfg.vb_weight * p1 + cfg.bce_weight * p2
        else:
            assert isinstance(kernel, GaussianKernel)
            p1 = kernel.loss(out_t, x0, x_in, t, noise)["mse"].mean()
            p2 = torch.zeros(())
            loss = p1
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            gnorm = float(torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip))
        else:
            gnorm = float(torch.sqrt(sum((p.grad.detach() ** 2).sum() for p in net.parameters()
                                         if p.grad is not None)))
        opt.step()
        ema.update(net, step)
        step += 1

        lv = float(loss.detach())
        if world > 1:
            import torch.distributed as dist

            buf = torch.tensor([lv, float(p1.detach()), float(p2.detach())], device=dev)
            dist.all_reduce(buf)
            lv, v1, v2 = (float(v) / world for v in buf.cpu())
        else:
            v1, v2 = float(p1.detach()), float(p2.detach())
        losses.append(lv)
        elapsed = elapsed_before + time.perf_counter() - t0
        if rank == 0:
            writer.writerow([step, f"{lv:.6g}", f"{v1:.6g}", f"{v2:.6g}", f"{lr:.6g}",
                             f"{gnorm:.4g}", f"{elapsed:.2f}"])
            if bar is not None:
                bar.update(1)
                if step % 10 == 0 or step == cfg.steps:
                    recent = losses[-50:]
                    bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}",
                                    sps=f"{(step - start_step) / (time.perf_counter() - t0):.2f}")

        over_time = cfg.max_minutes > 0 and (time.perf_counter() - t0) > cfg.max_minutes * 60
        if world > 1 and cfg.max_minutes > 0:
            import torch.distributed as dist

            flag = torch.tensor([1.0 if over_time else 0.0], device=dev)
            dist.all_reduce(flag)
            over_time = bool(flag.item() > 0)
        interrupted = stop_after is not None and step >= stop_after
        if step % cfg.checkpoint_every == 0 or step == cfg.steps or over_time or interrupted:
            checkpoint(step, elapsed)
        if over_time:
            stopped_by_time = True
            break
        if interrupted:
            break

    elapsed = elapsed_before + time.perf_counter() - t0
    if bar is not None:
        bar.close()
    if rank == 0:
        logf.close()
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        if created_pg:
            dist.destroy_process_group()
    return TrainResult(step=step, elapsed_s=elapsed, losses=losses, out=out, state=state_file,
                       log=log_file, stopped_by_time=stopped_by_time,
                       extra={"steps_this_session": step - start_step, "rank": rank,
                              "world": world})
