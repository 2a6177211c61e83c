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

Each checkpoint writes the log to disk first, then the state, then the model, each file
whole (temporary file and rename), so a kill at any moment leaves a log that holds every
step of the state; ``resume`` drops the log's rows after the state's step. A fresh run over
an existing one moves the old files aside and removes them only after its first checkpoint
(:class:`~napari_berdiff.training.loop.RunFiles`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data.dataset import SegDataset
from ..diffusion import BernoulliKernel, GaussianKernel, make_kernel, timestep_subsequence
from ..diffusion.device import select_device
from .config import TrainConfig
from .ema import EMA
from ..outfolder import replace_from_temporary, temporary_path
from .loop import (RunFiles, RunLog, begin_run, clip_gradients, draw_batch, load_state,
                   log_path_for, restore_state, save_state, set_lr, state_path_for,
                   training_arrays)

__all__ = ["train", "TrainResult", "state_path_for", "log_path_for", "export_model",
           "segmentor_predict", "soft_dice_loss", "segmentor_loss_parts", "load_state"]

LOG_FIELDS = ("step", "loss", "part1", "part2", "lr", "grad_norm", "elapsed_s")


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

    @classmethod
    def finished(cls, log: Any, step: int, start_step: int, out: Path, state: Path,
                 log_file: Path, stopped_by_time: bool, **extra: Any) -> "TrainResult":
        """Close the run's log and say what the run did (``extra``: rank, world, …)."""
        elapsed = log.elapsed
        log.close()
        return cls(step=step, elapsed_s=elapsed, losses=log.losses, out=out, state=state,
                   log=log_file, stopped_by_time=stopped_by_time,
                   extra={"steps_this_session": step - start_step, **extra})

    @property
    def steps_per_s(self) -> float:
        return self.extra.get("steps_this_session", self.step) / max(self.elapsed_s, 1e-9)



# ---------------------------------------------------------------------------- helpers
def soft_dice_loss(prob: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Per-sample ``1 − soft Dice`` (smoothed so that empty masks score 0 loss)."""
    p, y = prob.flatten(1), target.flatten(1)
    inter = (p * y).sum(1)
    return 1.0 - (2 * inter + eps) / (p.sum(1) + y.sum(1) + eps)


def segmentor_loss_parts(prob: torch.Tensor, target: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """The segmentor's loss parts on a batch: (mean BCE, mean ``1 − soft Dice``)."""
    prob = prob.clamp(1e-7, 1 - 1e-7)
    bce = F.binary_cross_entropy(prob, target, reduction="none").flatten(1).mean(1).mean()
    return bce, soft_dice_loss(prob, target).mean()


def _stored_kind(out: str | Path) -> str | None:
    """The recipe kind of the training state saved next to ``out``, if any."""
    state = state_path_for(out)
    if not state.exists():
        return None
    return json.loads(load_state(state)["config"]).get("kind")


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
    data_desc = dict(data_desc)
    data: dict[str, Any] = {
        "image_size": int(net.image_size),
        "image_channels": int(net.image_channels),
        "normalisation": {"mode": cfg.normalisation},
        "description": data_desc.get("description", ""),
    }
    if data_desc.get("spacing"):
        data["spacing"] = [float(v) for v in data_desc["spacing"]]
    if data_desc.get("intensity_stats"):
        data["intensity_stats"] = data_desc.pop("intensity_stats")
    data["dataset"] = data_desc
    meta: dict[str, Any] = {
        "kind": kind,
        "data": data,
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
    tmp = temporary_path(out)
    try:
        save_model(net, tmp, diffusion=cfg.diffusion_config(),
                   metadata=_metadata(cfg, data_desc, step, elapsed, name, extra_meta))
        replace_from_temporary(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def _reader_kw(reader: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The ``reader`` keyword of a reader-conditioned network's call (none for others)."""
    return {} if reader is None else {"reader": reader}


def _self_condition(net: torch.nn.Module, kernel: BernoulliKernel, gen: torch.Generator,
                    x_in: torch.Tensor, t: torch.Tensor, img: torch.Tensor, gap: int = 0,
                    reader: torch.Tensor | None = None) -> torch.Tensor:
    """The ``x̂0`` input of a self-conditioned step (Analog Bits' recipe).

    On half the steps (one coin from ``gen``, drawn every step so that resume stays exact)
    it is the network's own prediction without gradient, from ``x_t`` itself (``gap = 0``)
    or from a noisier ``x_{t'} ~ q(x_{t'} | x_t)``, ``t' = min(t + gap, T − 1)``; otherwise
    zeros, as at the first sampling step. Under DDP the coin is shared by every rank, but
    the ``x_{t'}`` noise is drawn for this rank's slice only. ``reader``: each item's
    reader, for a reader-conditioned network.
    """
    coin = bool(torch.rand((), generator=gen) < 0.5)
    if not coin:
        return torch.zeros_like(x_in)
    x_prev, t_prev = x_in, t
    if gap > 0:
        t_prev = (t + gap).clamp(max=kernel.config.timesteps - 1)
        x_prev = kernel.q_sample_later(x_in.cpu(), t.cpu(), t_prev.cpu(),
                                       generator=gen).to(x_in.device)
    with torch.no_grad():
        return kernel.predict_x0(net(x_prev, t_prev, img, **_reader_kw(reader)),
                                 x_prev).detach()


@dataclass
class _Unroll:
    """The draws of a step-unrolled batch (global batch, CPU): which items are unrolled, the
    noisier state each one starts from, its timestep and the step's uniforms."""

    chosen: torch.Tensor
    x_prev: torch.Tensor
    t_prev: torch.Tensor
    uniforms: torch.Tensor

    @classmethod
    def draw(cls, kernel: BernoulliKernel, gen: torch.Generator, x_t: torch.Tensor,
             t: torch.Tensor, prob: float, gap: int) -> "_Unroll":
        """Draw everything for the whole batch, chosen or not, so that the generator's use
        does not depend on the coins (resume stays exact, DDP ranks stay in step)."""
        t_prev = (t + gap).clamp(max=kernel.config.timesteps - 1)
        chosen = (torch.rand(t.shape, generator=gen) < prob) & (t_prev > t)
        x_prev = kernel.q_sample_later(x_t, t, t_prev, generator=gen)
        uniforms = torch.rand(x_t.shape, generator=gen, dtype=x_t.dtype)
        return cls(chosen, x_prev, t_prev, uniforms)

    def slice(self, lo: int, hi: int, dev: torch.device) -> "_Unroll":
        return _Unroll(*(v[lo:hi].to(dev) for v in (self.chosen, self.x_prev, self.t_prev,
                                                   self.uniforms)))

    def apply(self, net: torch.nn.Module, kernel: BernoulliKernel, x_t: torch.Tensor,
              t: torch.Tensor, img: torch.Tensor, reader: torch.Tensor | None = None
              ) -> torch.Tensor:
        """``x_t`` with the chosen items replaced by one sampler step of ``net`` (no
        gradient) from their noisier state ``x_{t'}`` to ``t`` (each item as its own
        ``reader``, for a reader-conditioned network)."""
        idx = self.chosen.nonzero().flatten()
        if idx.numel() == 0:
            return x_t
        x_prev, t_prev = self.x_prev[idx], self.t_prev[idx]
        kw = _reader_kw(None if reader is None else reader[idx])
        with torch.no_grad():
            x0_hat = kernel.predict_x0(net(x_prev, t_prev, img[idx], **kw), x_prev)
        mean = kernel.step_probs_batch(x_prev, x0_hat, t_prev, t[idx])
        out = x_t.clone()
        out[idx] = (self.uniforms[idx] < mean).to(x_t.dtype)
        return out


def unroll_gap_for(cfg: TrainConfig) -> int:
    """The unrolled step's gap: ``cfg.unroll_gap``, or the mean spacing of the timesteps the
    sampler visits by default (111 for 10 steps of T = 1000)."""
    if cfg.unroll_gap > 0:
        return int(cfg.unroll_gap)
    diff = cfg.diffusion_config()
    visited = timestep_subsequence(diff.default_steps, diff.timesteps)
    return max(1, round((visited[-1] - visited[0]) / max(len(visited) - 1, 1)))


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

    A recipe of kind ``refiner`` is trained by
    :func:`napari_berdiff.training.refiner.train_refiner` (two files), one of kind ``cdal``
    by :func:`napari_berdiff.training.cdal.train_cdal` (generator and discriminator).
    """
    stored = _stored_kind(out) if resume else None
    if config.kind == "cdal" or stored == "cdal":
        from .cdal import train_cdal

        return train_cdal(config, dataset, out, resume=resume, progress=progress, name=name,
                          extra_meta=extra_meta, stop_after=stop_after)
    if config.kind == "refiner" or stored == "refiner":
        from .refiner import train_refiner

        return train_refiner(config, dataset, out, resume=resume, progress=progress, name=name,
                             extra_meta=extra_meta, stop_after=stop_after)
    out = Path(out)
    name = name or out.stem
    state_file, log_file = state_path_for(out), log_path_for(out)
    if not out.parent.exists():
        raise ValueError(f"the output folder {out.parent} does not exist")
    if len(dataset) == 0:
        raise ValueError("the training data set is empty")
    files = RunFiles([out, state_file, log_file], enabled=int(os.environ.get("RANK", "0")) == 0)

    cfg, saved = begin_run(config, state_file, resume)
    rank, world, created_pg = _dist_info()
    dev = select_device(cfg.device)
    if world > 1 and dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))

    net_cfg = cfg.network_config()
    data = training_arrays(cfg, dataset, net_cfg.image_channels, net_cfg.size_multiple)
    data_desc = data.description

    torch.manual_seed(cfg.seed)
    net = cfg.build_network().to(dev)
    ema = EMA(net, cfg.ema_decay)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                            betas=tuple(cfg.betas))
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    step = 0
    elapsed_before = 0.0
    if saved is not None:
        step, elapsed_before = restore_state(saved, gen, net=net, ema=ema, opt=opt)

    model: torch.nn.Module = net
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(net, device_ids=[dev.index] if dev.type == "cuda" else None)

    kernel = make_kernel(cfg.diffusion_config()) if cfg.kind != "deterministic" else None
    self_cond = bool(getattr(net, "self_conditioned", False))  # Bernoulli only (TrainConfig)
    prior_head = bool(getattr(net, "has_prior_head", False))
    presence_head = bool(getattr(net, "has_presence_head", False))
    n_readers = int(getattr(net, "n_readers", 0))
    if n_readers and int(data.counts.max()) > n_readers:
        raise ValueError(f"the network is conditioned on {n_readers} readers, but some items "
                         f"have {int(data.counts.max())} annotations; set readers to at least "
                         "the largest number of annotations per item")
    T = cfg.diffusion_config().timesteps
    visited = torch.tensor(timestep_subsequence(cfg.diffusion_config().default_steps, T))
    unroll_gap = unroll_gap_for(cfg) if cfg.unroll_prob > 0 else 0

    if saved is None:
        files.set_aside_previous_run()
    log = RunLog(log_file, LOG_FIELDS, total=cfg.steps, step=step, resumed=saved is not None,
                 desc=f"train {cfg.kind}", progress=progress, enabled=rank == 0,
                 elapsed_before=elapsed_before)

    def checkpoint(cur_step: int, elapsed: float) -> None:
        if rank != 0:
            return
        log.flush()  # the log first: it must hold every step the state has
        save_state(state_file, {
            "net": net.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(),
            "gen": gen.get_state(), "torch_rng": torch.get_rng_state(),
            "step": cur_step, "elapsed_s": elapsed, "config": cfg.to_json(),
            "data": json.dumps(data_desc),
        })
        export_model(ema.module, cfg, out, data_desc, cur_step, elapsed, name, extra_meta)
        files.checkpointed()

    gb = cfg.batch_size * world
    lo, hi = rank * cfg.batch_size, (rank + 1) * cfg.batch_size
    stopped_by_time = False
    start_step = step
    net.train()
    while step < cfg.steps:
        # ---- draw the global batch (identical on every rank), keep this rank's slice
        idx, img, x0, _, annotator = draw_batch(gen, data, gb, cfg.augment,
                                                nonempty_only=presence_head)
        present = data.presence_fraction(idx)[lo:hi].to(dev) if presence_head else None
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
                if unroll_gap:
                    unroll = _Unroll.draw(kernel, gen, x_in, t, cfg.unroll_prob, unroll_gap)
            else:
                noise = torch.randn(x0.shape, generator=gen)
                x_in = kernel.q_sample(x0, t, noise)
        img, x0, x_in, t = (v[lo:hi].to(dev) for v in (img, x0, x_in, t))
        if noise is not None:
            noise = noise[lo:hi].to(dev)
        # a reader-conditioned network learns annotation k as reader k's
        reader = annotator[lo:hi].to(dev) if n_readers else None
        rkw = _reader_kw(reader)
        if unroll_gap:
            x_in = unroll.slice(lo, hi, dev).apply(net, kernel, x_in, t, img, reader)

        lr = set_lr([opt], cfg, step)
        inputs = (x_in, t, img) + ((_self_condition(net, kernel, gen, x_in, t, img,
                                                     cfg.self_condition_gap, reader),)
                                   if self_cond else ())
        prior = presence = None
        if prior_head or presence_head:
            out_t, *extras = model(*inputs, return_prior=prior_head,
                                   return_presence=presence_head, **rkw)
            prior = extras[0] if prior_head else None
            presence = extras[-1] if presence_head else None
        else:
            out_t = model(*inputs, **rkw)
        if cfg.kind == "deterministic":
            p1, p2 = segmentor_loss_parts(out_t, x0)
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
        if prior is not None:
            bce, dice = segmentor_loss_parts(prior, x0)
            loss = loss + cfg.prior_weight * (bce + cfg.dice_weight * dice)
        if presence is not None:
            loss = loss + cfg.presence_weight * F.binary_cross_entropy_with_logits(
                presence.float(), present)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = clip_gradients(net, cfg.grad_clip)
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
        elapsed = log.elapsed
        log.row(step, lv, [f"{lv:.6g}", f"{v1:.6g}", f"{v2:.6g}", f"{lr:.6g}", f"{gnorm:.4g}",
                           f"{elapsed:.2f}"], cfg.steps)

        over_time = log.over_budget(cfg.max_minutes)
        if world > 1 and cfg.max_minutes > 0:
            import torch.distributed as dist

            flag = torch.tensor([1.0 if over_time else 0.0], device=dev)
            dist.all_reduce(flag)
            over_time = bool(flag.item() > 0)
        stop = log.after_step(step, elapsed, cfg, checkpoint, stop_after, over_time)
        if stop:
            stopped_by_time = stop == "time"
            break

    result = TrainResult.finished(log, step, start_step, out, state_file, log_file,
                                  stopped_by_time, rank=rank, world=world)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        if created_pg:
            dist.destroy_process_group()
    return result
