"""The cDAL trainer: the NCSN++ generator with a time-conditioned discriminator (DESIGN §3.5).

Each step, as the released ``train_cDal_monu_and_lung.py`` does:

1. **Discriminator.** Draw t ∈ {0..T−1} and a pair ``(x_t, x_{t+1})`` from the forward
   process. Real: ``softplus(−D(x_t, t, x_{t+1}))`` plus the R1 penalty
   ``γ/2·‖∇_{x_t} D‖²``. Fake: ``x_t' ~ q(x_t | x_{t+1}, x̂0)`` with ``x̂0 = G(x_{t+1}, t,
   image, z)``, scored ``softplus(D(x_t', t, x_{t+1}))``.
2. **Generator.** Draw a fresh t, pair and z. The discriminator's spatial attention (the
   channel mean of its feature map ``attn_scale``, upsampled bilinearly) multiplies ``x0``,
   and ``x_{t+1}`` is drawn from that: ``G`` learns ``x̂0`` from ``(x_{t+1}^{attn}, t, image,
   z)`` under ``MSE(x0, x̂0)``, plus ``adv_weight · softplus(−D(x_t', t, x_{t+1}))`` when
   ``adv_weight > 0`` (the released loss has none). With ``gen_loss = "energy"`` (this
   project's departure, :mod:`.energy`) the generator instead draws ``gen_samples`` x̂0
   per input with different z and minimises their energy score against the annotator's
   mask, so that z comes to carry the readers' disagreement; the adversarial term then
   scores the first of them.

``init_from`` starts the generator from a cDAL model file (a fresh run: new discriminator,
optimisers and step count).

Every draw (items, annotators, augmentation, t, noise, z) comes from one seeded
``torch.Generator`` whose state the training state keeps, so ``resume`` continues exactly.
Masks {0, 1} become ``2m − 1``. The files written are those of
:func:`napari_berdiff.training.train`: the EMA generator as ``out``, ``*.state.pt`` and
``*.log.csv``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data.dataset import SegDataset
from ..diffusion import CDALKernel
from ..diffusion.device import select_device
from ..networks.cdal_discriminator import CDALDiscriminator
from .config import TrainConfig
from .ema import EMA
from .energy import energy_score
from .loop import (RunLog, begin_run, clip_gradients, draw_batch, log_path_for, lr_at,
                   restore_state, save_state, state_path_for, training_arrays)

__all__ = ["train_cdal", "build_discriminator", "init_generator_from"]

LOG_FIELDS = ("step", "loss", "mse", "energy", "loss_d", "lr", "grad_norm", "elapsed_s")


def build_discriminator(cfg: TrainConfig) -> CDALDiscriminator:
    """The discriminator of a cDAL recipe (downsampling to about 8x8)."""
    net = cfg.network_config()
    levels = max(1, min(4, (net.image_size // 8).bit_length() - 1))
    return CDALDiscriminator(net.mask_channels, cfg.disc_channels, t_dim=64, levels=levels)


def init_generator_from(path: str | Path, net: torch.nn.Module) -> None:
    """Start ``net`` from the generator of a saved cDAL model file (same layout).

    Raises
    ------
    ValueError
        When the file is not a cDAL model or its tensors do not fit ``net``.
    """
    from ..checkpoints import load_model

    model = load_model(path, device="cpu")
    if model.diffusion.kind != "cdal":
        raise ValueError(f"{path} is a {model.diffusion.kind!r} model, not a cDAL generator")
    own, theirs = net.state_dict(), model.net.state_dict()
    if set(own) != set(theirs) or any(own[k].shape != v.shape for k, v in theirs.items()):
        raise ValueError(f"{path}: its generator has another layout than this recipe's "
                         "network; give the same network options as the run that wrote it")
    net.load_state_dict(theirs)


def _set_lrs(cfg: TrainConfig, step: int, opt_g: torch.optim.Optimizer,
             opt_d: torch.optim.Optimizer) -> float:
    """The generator's lr (warm-up then cosine, as every recipe); D follows the same curve."""
    lr = lr_at(cfg, step)
    for g in opt_g.param_groups:
        g["lr"] = lr
    for g in opt_d.param_groups:
        g["lr"] = cfg.lr_d * lr / cfg.lr
    return lr


def train_cdal(config: TrainConfig, dataset: SegDataset, out: str | Path, *,
               resume: bool = False, progress: bool = True, name: str | None = None,
               extra_meta: dict[str, Any] | None = None,
               stop_after: int | None = None) -> Any:
    """Train (or continue) a cDAL generator; see :func:`napari_berdiff.training.train`."""
    from .trainer import TrainResult, export_model

    out = Path(out)
    name = name or out.stem
    state_file, log_file = state_path_for(out), log_path_for(out)
    if not out.parent.exists():
        raise ValueError(f"the output folder {out.parent} does not exist")
    cfg, saved = begin_run(config, state_file, resume)
    dev = select_device(cfg.device)
    net_cfg = cfg.network_config()
    data = training_arrays(cfg, dataset, net_cfg.image_channels,
                           net_cfg.unshuffle * 2 ** (len(net_cfg.ch_mult) - 1))
    net_cfg.check_size(*data.images.shape[-2:])
    data_desc = data.description
    kernel = CDALKernel(cfg.diffusion_config())
    T = kernel.config.timesteps

    torch.manual_seed(cfg.seed)
    net_g = cfg.build_network().to(dev)
    net_d = build_discriminator(cfg).to(dev)
    if saved is None and cfg.init_from:
        init_generator_from(cfg.init_from, net_g)
    ema = EMA(net_g, cfg.ema_decay)
    betas = tuple(cfg.betas)
    opt_g = torch.optim.Adam(net_g.parameters(), lr=cfg.lr, betas=betas)
    opt_d = torch.optim.Adam(net_d.parameters(), lr=cfg.lr_d, betas=betas)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    step, elapsed_before = 0, 0.0
    if saved is not None:
        step, elapsed_before = restore_state(saved, gen, net=net_g, disc=net_d, ema=ema,
                                             opt=opt_g, opt_d=opt_d)

    log = RunLog(log_file, LOG_FIELDS, total=cfg.steps, step=step, resumed=saved is not None,
                 desc="train cdal", progress=progress, elapsed_before=elapsed_before)

    def checkpoint(cur_step: int, elapsed: float) -> None:
        save_state(state_file, {
            "net": net_g.state_dict(), "disc": net_d.state_dict(), "ema": ema.state_dict(),
            "opt": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "gen": gen.get_state(),
            "torch_rng": torch.get_rng_state(), "step": cur_step, "elapsed_s": elapsed,
            "config": cfg.to_json(), "data": json.dumps(data_desc),
        })
        export_model(ema.module, cfg, out, data_desc, cur_step, elapsed, name, extra_meta)
        log.flush()

    def pair(x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n1 = torch.randn(x0.shape, generator=gen)
        n2 = torch.randn(x0.shape, generator=gen)
        return kernel.q_sample_pair(x0, t, n1.to(dev), n2.to(dev))

    b, nz = cfg.batch_size, net_cfg.nz
    energy = cfg.gen_loss == "energy"
    stopped_by_time, start_step = False, step
    net_g.train()
    net_d.train()
    while step < cfg.steps:
        _, img, mask, _, _ = draw_batch(gen, data, b, cfg.augment)
        img = img.to(dev)
        x0 = kernel.to_chain(mask).to(dev)
        lr = _set_lrs(cfg, step, opt_g, opt_d)

        # ---- 1. discriminator: real pairs (+ R1), fake pairs from the generator
        t = torch.randint(T, (b,), generator=gen).to(dev)
        x_t, x_next = pair(x0, t)
        x_t = x_t.detach().requires_grad_(True)
        d_real = net_d(x_t, t, x_next)
        loss_real = F.softplus(-d_real).mean()
        r1 = torch.zeros((), device=dev)
        if cfg.r1_gamma > 0:
            (grad,) = torch.autograd.grad(d_real.sum(), x_t, create_graph=True)
            r1 = cfg.r1_gamma / 2 * grad.flatten(1).pow(2).sum(1).mean()
        z = torch.randn((b, nz), generator=gen).to(dev)
        post_noise = torch.randn(x0.shape, generator=gen).to(dev)
        with torch.no_grad():
            x0_fake = net_g(x_next, t, img, z)
            x_fake = kernel.posterior(x0_fake, x_next, t, post_noise)
        loss_fake = F.softplus(net_d(x_fake, t, x_next)).mean()
        loss_d = loss_real + r1 + loss_fake
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()

        # ---- 2. generator: attention-noised input, MSE on x̂0 (+ optional adversarial term)
        t = torch.randint(T, (b,), generator=gen).to(dev)
        x_t, x_next = pair(x0, t)
        z = torch.randn((b, nz), generator=gen).to(dev)
        attn = net_d.attention(x_t, t, x_next, cfg.attn_scale)
        _, x_next_attn = pair(attn * x0, t)
        post_noise = torch.randn(x0.shape, generator=gen).to(dev)
        for p in net_d.parameters():
            p.requires_grad_(False)
        if energy:
            # K latents for each input: the samples' spread is part of the loss.
            k = cfg.gen_samples
            z = torch.randn((b * k, nz), generator=gen).to(dev)
            x0_all = net_g(x_next_attn.repeat_interleave(k, 0), t.repeat_interleave(k, 0),
                           img.repeat_interleave(k, 0), z)
            fg = ((kernel.sign * x0_all + 1) / 2).reshape(b, k, -1)
            score = energy_score(fg, mask.to(dev).flatten(1)).mean()
            x0_pred = x0_all[::k]
        else:
            x0_pred = net_g(x_next_attn, t, img, z)
            score = torch.zeros(())
        mse = (x0 - x0_pred).pow(2).flatten(1).mean(1).mean()
        loss_g = score if energy else mse
        if cfg.adv_weight > 0:
            x_fake = kernel.posterior(x0_pred, x_next_attn, t, post_noise)
            loss_g = loss_g + cfg.adv_weight * F.softplus(-net_d(x_fake, t, x_next_attn)).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        gnorm = clip_gradients(net_g, cfg.grad_clip)
        opt_g.step()
        for p in net_d.parameters():
            p.requires_grad_(True)
        ema.update(net_g, step)
        step += 1

        lv, mv, dv = float(loss_g.detach()), float(mse.detach()), float(loss_d.detach())
        elapsed = log.elapsed
        log.row(step, lv, [f"{lv:.6g}", f"{mv:.6g}", f"{float(score.detach()):.6g}",
                           f"{dv:.6g}", f"{lr:.6g}", f"{gnorm:.4g}", f"{elapsed:.2f}"],
                cfg.steps)
        stop = log.after_step(step, elapsed, cfg, checkpoint, stop_after)
        if stop:
            stopped_by_time = stop == "time"
            break

    return TrainResult.finished(log, step, start_step, out, state_file, log_file,
                                stopped_by_time, rank=0, world=1)
