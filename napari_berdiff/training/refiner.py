"""Alternate-collaborative training of a segmentor and a HiDiff-style Bernoulli refiner.

Every step, as in HiDiff:

1. **the segmentor** (a small network with a sigmoid output, fed an all-zero mask at
   t = 0 like the deterministic baseline) is updated with ``BCE + dice_weight · (1 − soft
   Dice)`` against one annotator drawn at random per item;
2. **the refiner** (the Bernoulli kernel with a per-pixel prior p, DESIGN §3.2: forward
   ``B(ᾱ_t y_0 + (1 − ᾱ_t) p)``, start ``B(p)``; network input ``[y_t, image, p]``) is
   updated with the Bernoulli loss. Its prior is, per item, either the segmentor's output
   of this step, **detached** (with probability ``prior_mix``), or the mask of another
   annotator drawn at random, degraded (:func:`~napari_berdiff.priors.degrade_mask`) and
   softened with a trust drawn in ``trust_range``
   (:func:`~napari_berdiff.priors.mask_to_prior`), so that both segmentor priors and
   priors drawn by people are in distribution.

A refiner network with a ``segmentor`` (:class:`~napari_berdiff.networks.CondOnceConfig`)
is also conditioned on the segmentor's multi-scale decoder features, as HiDiff's is; the
segmentor is then the refiner network's own ``segmentor`` module (one set of weights, its
own optimiser and loss), and ``segmentor_feature_grad`` > 0 lets the refiner's loss train
it too through those features. Without one, the refiner sees ``(image, p)`` only. Either
way it can refine any mask: the features depend on the image alone.

Everything random (items, annotators, symmetries, prior kind, degradation seeds, trusts,
timesteps, forward noise) comes from one seeded ``torch.Generator`` saved in the training
state, so ``resume`` continues a run exactly. Single process only (no DDP).

Files written for ``out = refiner.safetensors``:

* ``refiner.safetensors``: the refiner's EMA weights (kind ``refiner``);
* ``refiner-segmentor.safetensors``: the segmentor's EMA weights (kind ``segmentor``),
  named in the refiner's ``metadata["refiner"]["segmentor"]``;
* ``refiner.state.pt`` (both networks, EMAs and optimisers, for ``resume``) and
  ``refiner.log.csv``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.dataset import SegDataset
from ..diffusion import BernoulliKernel, make_kernel, timestep_subsequence
from ..diffusion.device import select_device
from ..priors import degrade_mask, mask_to_prior
from .config import TrainConfig
from .ema import EMA
from .loop import (RunFiles, RunLog, augment_batch, begin_run, clip_gradients, draw_batch,
                   log_path_for, restore_state, save_state, set_lr, state_path_for,
                   training_arrays)
from .trainer import (TrainResult, export_model, segmentor_loss_parts, segmentor_predict,
                      soft_dice_loss)

__all__ = ["train_refiner", "segmentor_file_for", "draw_priors", "REFINER_LOG_FIELDS",
           "CONDITIONING_NOTE"]

REFINER_LOG_FIELDS = ("step", "loss", "refiner_vb", "refiner_bce", "segmentor_bce",
                      "segmentor_dice_loss", "lr", "grad_norm", "segmentor_grad_norm",
                      "elapsed_s")

CONDITIONING_NOTE = ("(image, prior p) only — a deliberate departure from the official "
                     "HiDiff refiner, which also consumes the segmentor's features")
FEATURE_NOTE = ("(image, prior p) and the segmentor's multi-scale decoder features, as "
                "HiDiff's refiner; the features depend on the image alone, so any prior p "
                "(a person's mask too) can be refined")


def _refiner_parameters(net: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The refiner's own parameters (not those of a segmentor it holds)."""
    return [p for n, p in net.named_parameters() if not n.startswith("segmentor.")]


def init_pair_from(path: str | Path, net: torch.nn.Module, seg: torch.nn.Module) -> None:
    """Start ``net`` and ``seg`` from a saved refiner file and the segmentor next to it.

    The refiner's tensors go where ``net`` has the same names and shapes (a feature-
    conditioned network keeps its zero-initialised projections and takes the segmentor's
    weights through ``seg``, which is then its own ``segmentor``).

    Raises
    ------
    ValueError
        When the file names no segmentor next to it, or a matching tensor has another shape.
    """
    from ..refine import load_refiner

    refiner, segmentor = load_refiner(path, device="cpu")
    if segmentor is None:
        raise ValueError(f"{path} names no segmentor file next to it")
    own = net.state_dict()
    taken = {k: v for k, v in refiner.net.state_dict().items() if k in own}
    bad = [k for k, v in taken.items() if v.shape != own[k].shape]
    if bad:
        raise ValueError(f"{path}: tensors of other shapes than this network's: {bad[:3]}")
    net.load_state_dict(taken, strict=False)
    seg.load_state_dict(segmentor.net.state_dict())


def segmentor_file_for(out: str | Path) -> Path:
    """``refiner.safetensors`` → ``refiner-segmentor.safetensors`` (written next to it)."""
    out = Path(out)
    return out.with_name(out.stem + "-segmentor" + (out.suffix or ".safetensors"))


def draw_priors(gen: torch.Generator, source: torch.Tensor, segmentor_prob: torch.Tensor,
                cfg: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The refiner's prior maps for one batch.

    Parameters
    ----------
    gen
        The run's generator: the prior kind, a degradation seed and a trust are drawn per
        item, whichever kind is chosen.
    source
        (N, 1, H, W) binary masks to degrade (an annotator's, augmented like the image).
    segmentor_prob
        (N, 1, H, W) the segmentor's probabilities (detached).
    cfg
        ``prior_mix``, ``trust_range`` and ``degrade_strength``.

    Returns
    -------
    (N, 1, H, W) prior maps and the (N,) boolean mask of items given the segmentor's prior.
    """
    n = source.shape[0]
    use_seg = torch.rand(n, generator=gen) < cfg.prior_mix
    lo, hi = cfg.trust_range
    trusts = lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)
    seeds = torch.randint(2**31 - 1, (n,), generator=gen)
    out = segmentor_prob.detach().clone().float().cpu()
    src = source.detach().cpu().numpy()
    for i in range(n):
        if bool(use_seg[i]):
            continue
        rng = np.random.default_rng(int(seeds[i]))
        rough = degrade_mask(src[i, 0] > 0.5, rng, cfg.degrade_strength)
        out[i, 0] = torch.from_numpy(mask_to_prior(rough, float(trusts[i])))
    return out.to(segmentor_prob.device), use_seg


def _refiner_meta(cfg: TrainConfig, image_channels: int, seg_file: Path,
                  extra_meta: dict[str, Any] | None) -> dict[str, Any]:
    lo, hi = cfg.trust_range
    featured = bool(cfg.network.get("segmentor"))
    meta: dict[str, Any] = {
        "data": {"image_channels": int(image_channels)},
        "refiner": {
            "segmentor": seg_file.name,
            "trust_range": [lo, hi],
            "prior_mix": cfg.prior_mix,
            "degrade_strength": cfg.degrade_strength,
            "conditioning": FEATURE_NOTE if featured else CONDITIONING_NOTE,
            "training": "alternate-collaborative (HiDiff): segmentor step, then refiner step "
                        "on the segmentor's detached output or a degraded annotator mask",
            "input": "[y_t, image, p]" + (" + the segmentor's decoder features"
                                              if featured else ""),
            "segmentor_feature_grad": cfg.segmentor_feature_grad,
        },
    }
    for k, v in (extra_meta or {}).items():
        meta[k] = {**meta[k], **v} if isinstance(v, dict) and isinstance(meta.get(k), dict) \
            else v
    return meta


def train_refiner(
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
    """Train (or continue) a segmentor + refiner pair; write both models next to ``out``.

    Parameters are those of :func:`napari_berdiff.training.train`; ``config.kind`` must be
    ``"refiner"``. ``extra_meta`` goes into the refiner's metadata. The result's
    ``extra["segmentor"]`` is the segmentor file's path.
    """
    out = Path(out)
    name = name or out.stem
    state_file, log_file = state_path_for(out), log_path_for(out)
    seg_file = segmentor_file_for(out)
    if not out.parent.exists():
        raise ValueError(f"the output folder {out.parent} does not exist")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError("refiner training runs in one process; DDP is not supported for it")
    files = RunFiles([out, state_file, log_file, seg_file])
    cfg, saved = begin_run(config, state_file, resume)
    if cfg.kind != "refiner":
        raise ValueError(f"train_refiner needs kind='refiner', got {cfg.kind!r}")
    dev = select_device(cfg.device)

    seg_cfg = cfg.segmentor_config()
    net_cfg = cfg.network_config()
    multiple = max(int(net_cfg.size_multiple), int(seg_cfg.size_multiple))
    data = training_arrays(cfg, dataset, seg_cfg.image_channels, multiple)
    data_desc = data.description
    # The segmentor's own recipe view: a deterministic model with the segmentor's network.
    seg_recipe = cfg.replace(kind="deterministic", network=cfg.segmentor_network,
                             diffusion={}, segmentor_network={}, segmentor_feature_grad=0.0,
                             refiner_dice_weight=0.0, init_from="")

    torch.manual_seed(cfg.seed)
    net = cfg.build_network().to(dev)
    featured = bool(getattr(net, "has_segmentor", False))
    seg = net.segmentor if featured else cfg.build_segmentor().to(dev)
    if cfg.init_from and saved is None:
        init_pair_from(cfg.init_from, net, seg)
    ema, seg_ema = EMA(net, cfg.ema_decay), EMA(seg, cfg.ema_decay)
    opts = [torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                              betas=tuple(cfg.betas))
            for params in (_refiner_parameters(net), list(seg.parameters()))]
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    step, elapsed_before = 0, 0.0
    if saved is not None:
        step, elapsed_before = restore_state(saved, gen, net=net, ema=ema, opt=opts[0],
                                             seg=seg, seg_ema=seg_ema, seg_opt=opts[1])

    kernel = make_kernel(cfg.diffusion_config())
    assert isinstance(kernel, BernoulliKernel)
    T = cfg.diffusion_config().timesteps
    visited = torch.tensor(timestep_subsequence(cfg.diffusion_config().default_steps, T))
    if saved is None:
        files.set_aside_previous_run()
    log = RunLog(log_file, REFINER_LOG_FIELDS, total=cfg.steps, step=step,
                 resumed=saved is not None, desc="train refiner", progress=progress,
                 elapsed_before=elapsed_before)
    meta = _refiner_meta(cfg, seg_cfg.image_channels, seg_file, extra_meta)
    seg_meta = {"training": {"recipe": cfg.to_dict(), "trained_with_refiner": out.name}}

    def checkpoint(cur_step: int, elapsed: float) -> None:
        log.flush()  # the log first: it must hold every step the state has
        save_state(state_file, {
            "net": net.state_dict(), "ema": ema.state_dict(), "opt": opts[0].state_dict(),
            "seg": seg.state_dict(), "seg_ema": seg_ema.state_dict(),
            "seg_opt": opts[1].state_dict(), "gen": gen.get_state(),
            "torch_rng": torch.get_rng_state(), "step": cur_step, "elapsed_s": elapsed,
            "config": cfg.to_json(), "data": json.dumps(data_desc),
        })
        export_model(seg_ema.module, seg_recipe, seg_file, data_desc, cur_step, elapsed,
                     f"{name}-segmentor", seg_meta)
        export_model(ema.module, cfg, out, data_desc, cur_step, elapsed, name, meta)
        files.checkpointed()

    stopped_by_time = False
    start_step = step
    net.train()
    seg.train()
    n = cfg.batch_size
    while step < cfg.steps:
        idx, img, x0, codes, _ = draw_batch(gen, data, n, cfg.augment)
        # the prior's source: another annotator of the same items, same symmetry
        ann2 = (torch.rand(n, generator=gen) * data.counts[idx]).long()
        source = data.masks[idx, ann2].unsqueeze(1).float()
        if codes is not None:
            source = augment_batch(source, codes)
        if cfg.t_sampling == "visited":
            t = visited[torch.randint(len(visited), (n,), generator=gen)]
        else:
            t = torch.randint(T, (n,), generator=gen)
        img, x0 = img.to(dev), x0.to(dev)
        lr = set_lr(opts, cfg, step)

        # ---- 1. the segmentor (and, for a feature-conditioned refiner, its features)
        if featured:
            prob, feats = seg.segment_with_features(img)
            w = cfg.segmentor_feature_grad
            feats = [w * f + (1 - w) * f.detach() if w else f.detach() for f in feats]
        else:
            prob, feats = segmentor_predict(seg, img), None
        s_bce, s_dice = segmentor_loss_parts(prob, x0)
        s_loss = s_bce + cfg.dice_weight * s_dice

        # ---- 2. the refiner, on the segmentor's detached output or a degraded mask
        prior, _ = draw_priors(gen, source, prob.detach(), cfg)
        x_t = kernel.q_sample(x0.cpu(), t, prior.cpu(), generator=gen).to(dev)
        t_d = t.to(dev)
        cond_img = torch.cat([img, prior], 1)
        out_t = (net.predict(x_t, t_d, net.encode(cond_img, feats)) if featured
                 else net(x_t, t_d, cond_img))
        parts = kernel.loss(out_t, x0, x_t, t_d, prior, focal=cfg.focal,
                            bce_weight=cfg.bce_weight)
        r_vb, r_bce = parts["vb"].mean(), parts["bce"].mean()
        r_loss = cfg.vb_weight * r_vb + cfg.bce_weight * r_bce
        if cfg.refiner_dice_weight:
            x0_hat = kernel.predict_x0(out_t, x_t)
            r_loss = r_loss + cfg.refiner_dice_weight * soft_dice_loss(x0_hat, x0).mean()

        # one backward pass: the refiner's loss reaches the segmentor only through features
        # weighted by segmentor_feature_grad (none when 0, as two separate updates)
        for opt in opts:
            opt.zero_grad(set_to_none=True)
        (s_loss + r_loss).backward()
        s_gnorm = clip_gradients(seg, cfg.grad_clip)
        gnorm = clip_gradients(_refiner_parameters(net), cfg.grad_clip)
        opts[1].step()
        opts[0].step()
        seg_ema.update(seg, step)
        ema.update(net, step)
        step += 1

        lv = float(r_loss.detach()) + float(s_loss.detach())
        r_vb, r_bce, s_bce, s_dice = (v.detach() for v in (r_vb, r_bce, s_bce, s_dice))
        elapsed = log.elapsed
        log.row(step, lv, [f"{lv:.6g}", f"{float(r_vb):.6g}", f"{float(r_bce):.6g}",
                           f"{float(s_bce):.6g}", f"{float(s_dice):.6g}", f"{lr:.6g}",
                           f"{gnorm:.4g}", f"{s_gnorm:.4g}", f"{elapsed:.2f}"], cfg.steps)
        stop = log.after_step(step, elapsed, cfg, checkpoint, stop_after)
        if stop:
            stopped_by_time = stop == "time"
            break

    return TrainResult.finished(log, step, start_step, out, state_file, log_file,
                                stopped_by_time, rank=0, world=1, segmentor=seg_file)
