"""The training recipe: every setting a run depends on, stored in the checkpoint metadata."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..diffusion import DiffusionConfig
import torch

from ..networks import CondOnceConfig, NCSNppConfig, UNetConfig
from ..networks.registry import (
    network_config_from_metadata,
    network_description,
    network_from_metadata,
)

TRAIN_KINDS = ("bernoulli", "gaussian", "deterministic", "refiner", "cdal")
#: The cDAL generator's main losses: the released MSE on x̂0, or the energy score.
GEN_LOSSES = ("mse", "energy")
T_SAMPLINGS = ("uniform", "visited")


def cdal_network(image_size: int = 64, image_channels: int = 1) -> NCSNppConfig:
    """A small cDAL generator for CPU training: nf 32, channel_mult (1, 2, 2), one residual
    block per level, attention at a quarter of the image size, an encoder of 2 blocks, nz 50,
    a 128-wide style with 2 hidden layers."""
    return NCSNppConfig(
        image_size=image_size, image_channels=image_channels, mask_channels=1, nf=32,
        ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(image_size // 4,), nz=50,
        z_emb_dim=128, n_mlp=2, cond_enc_layers=1, cond_enc_num_res_blocks=2,
    )


def default_network(kind: str = "bernoulli", image_size: int = 64,
                    image_channels: int = 1) -> UNetConfig | NCSNppConfig:
    """The small UNet of the bundled models (base 16, channel_mult (1,2,2,4), 2 res blocks,
    attention at downsample 4 and in the middle, GroupNorm with 8 groups); for ``cdal``,
    :func:`cdal_network`.

    ``image_channels`` counts the image's channels; a refiner's network takes one more, the
    prior map p.
    """
    if kind == "cdal":
        return cdal_network(image_size, image_channels)
    if kind == "refiner":
        image_channels += 1
    return UNetConfig(
        image_size=image_size, image_channels=image_channels, mask_channels=1,
        out_channels=1, model_channels=16, num_res_blocks=2, attention_resolutions=(4,),
        channel_mult=(1, 2, 2, 4), num_heads=1, norm_groups=8, concat_order="mask_first",
        output_activation="none" if kind == "gaussian" else "sigmoid",
    )


def condition_once_network(kind: str = "bernoulli", image_size: int = 64,
                           image_channels: int = 1, self_condition: bool = False
                           ) -> CondOnceConfig:
    """The condition-once network of the bundled diffusion models: an image encoder (base
    32, 2 residual blocks per level) run once, and a base-24 denoiser with channel_mult
    (1, 2, 2) and 2 res blocks per level at half resolution; optionally self-conditioned."""
    return CondOnceConfig(
        image_size=image_size, image_channels=image_channels, model_channels=24,
        channel_mult=(1, 2, 2), num_res_blocks=2, encoder_channels=32, encoder_blocks=2,
        unshuffle=2, self_condition=self_condition,
        output_activation="none" if kind == "gaussian" else "sigmoid",
    )


def default_diffusion(kind: str = "bernoulli") -> DiffusionConfig:
    """The diffusion settings of a recipe of ``kind`` (a refiner: T = 10, ᾱ linear, x0).

    The Gaussian kernel uses Wolleb et al.'s linear β schedule: with the cosine one ᾱ_999 is
    2.4e-9, so the ε-prediction's x̂0 at the first sampling step is amplified 20 000× and
    the chain starts from garbage (BENCHMARKS.md, "Issue 4, session 3"). Its default sampler
    is DDPM, which scored far above DDIM at 10 steps on validation phantoms."""
    if kind == "refiner":
        return DiffusionConfig(kind="bernoulli", timesteps=10, schedule="alpha_bar_linear",
                               prediction="x0", default_steps=10)
    if kind == "cdal":
        return DiffusionConfig(kind="cdal", timesteps=2, schedule="vp", prediction="x0",
                               default_steps=2)
    if kind == "gaussian":
        return DiffusionConfig(kind="gaussian", timesteps=1000, schedule="linear",
                               prediction="eps", default_steps=10, sampler="ddpm")
    # The deterministic baseline carries a placeholder (it is never sampled).
    return DiffusionConfig(kind="bernoulli", timesteps=1000, schedule="cosine",
                           prediction="x0", default_steps=10)


@dataclass
class TrainConfig:
    """How to train one model.

    Parameters
    ----------
    kind
        ``bernoulli``, ``gaussian``, ``deterministic`` (the U-Net baseline, BCE + Dice) or
        ``refiner`` (a HiDiff-style segmentor + prior-conditioned Bernoulli refiner pair,
        trained alternately: :mod:`napari_berdiff.training.refiner`).
    network, diffusion
        The network and the diffusion settings (defaults: :func:`default_network`,
        :func:`default_diffusion`).
    steps
        Optimiser steps (the run also stops at ``max_minutes``).
    batch_size
        Samples per step *per process* (under DDP the global batch is this × world size).
    lr, weight_decay, betas, warmup, min_lr_ratio
        AdamW with a linear warm-up and a cosine decay to ``lr * min_lr_ratio``.
    ema_decay
        EMA of the weights (with the usual ``(1+s)/(10+s)`` warm-up); the EMA weights are
        what gets exported.
    grad_clip
        Clip the global gradient norm (0 disables).
    augment
        Random flips and 90° rotations (the 8 symmetries of the square).
    bce_weight, focal
        Bernoulli loss: ``vb + bce_weight · BCE`` (focal loss with γ = 2 if ``focal``).
    vb_weight
        Weight of the variational (KL) term of the Bernoulli loss.
    t_sampling
        ``uniform`` over 0..T-1, or ``visited``: only the timesteps the sampler visits with
        the model's default step count.
    self_condition_gap
        Self-conditioned networks: on the self-conditioned steps the x̂0 input is predicted
        from ``x_{t'}`` drawn from ``q(x_{t'} | x_t)``, ``t' = min(t + gap, T − 1)``, as the
        sampler's previous step is noisier than the current one. 0: from ``x_t`` itself.
    unroll_prob, unroll_gap
        Bernoulli only: the fraction of training items whose ``x_t`` is not drawn from
        ``q(x_t | x_0)`` but made by one sampler step of the network itself (no gradient),
        from ``x_{t'} ~ q(x_{t'} | x_0)``, ``t' = min(t + gap, T − 1)`` (step-unrolled
        denoising, as SUNDAE): the network then learns to recover ``x_0`` from the states its
        own sampler visits. ``unroll_gap`` 0 means the mean spacing of the timesteps the
        sampler visits by default (111 for 10 steps of T = 1000).
    dice_weight
        Deterministic baseline: ``BCE + dice_weight · (1 − soft Dice)``.
    prior_weight
        Networks with a prior head (``prior_head``): the weight of the head's loss, ``BCE +
        dice_weight · (1 − soft Dice)`` against the same annotation, added to the diffusion
        loss.
    presence_weight
        Networks with a presence head (``presence_head``): the weight of its loss, the BCE
        of the presence logit against the fraction of the item's annotations that are not
        empty. The diffusion loss of such networks uses non-empty annotations only.
    normalisation
        Intensity normalisation applied to every training image and recorded in the model's
        metadata, so that sampling applies the same (``minmax``: each image to [0, 1];
        ``none``; ``zscore``).
    checkpoint_every
        Save the training state (and export the EMA model) every N steps.
    max_minutes
        Wall-clock budget; 0 means none.
    seed
        Seeds the weights, the data order, annotators, augmentation, timesteps and noise.
    threads
        ``torch.set_num_threads`` (0 leaves torch's default).
    device
        ``cpu``, ``cuda``, ``mps`` or ``auto``.
    segmentor_network
        Refiner only: the segmentor's network description (default: the small UNet with
        the image's channels).
    prior_mix
        Refiner only: the fraction of training items whose prior is the segmentor's
        (detached) output; the others get a degraded annotator mask softened with
        :func:`~napari_berdiff.priors.mask_to_prior`.
    trust_range
        Refiner only: the trust of those softened masks is drawn uniformly in this range.
    degrade_strength
        Refiner only: ``strength`` of :func:`~napari_berdiff.priors.degrade_mask`.
    segmentor_feature_grad
        Refiner only, for a refiner network with a ``segmentor`` (conditioned on its
        features): the weight with which the refiner's loss also trains the segmentor
        through those features (HiDiff's collaborative training; 0: features detached).
    refiner_dice_weight
        Refiner only: weight of a soft-Dice term ``1 − Dice(x̂0, x0)`` added to the
        refiner's loss (as the segmentor's ``dice_weight``; 0: none).
    init_from
        Refiner: a refiner file (with its segmentor next to it) whose weights start a
        fresh run; a feature-conditioned network takes the old refiner's weights where the
        names match, its segmentor the segmentor's (its feature projections start at zero,
        so it starts as the old pair). cDAL: a cDAL model file of the same layout whose
        generator starts the run (the discriminator starts afresh). Empty: random
        initialisation.
    lr_d, r1_gamma, disc_channels, attn_scale, adv_weight
        cDAL only: the discriminator's learning rate (Adam with ``betas``; the generator
        uses ``lr``), the R1 penalty weight γ (``γ/2·‖∇_{x_t} D‖²`` on real pairs), the
        discriminator's base width, which of its feature maps gives the spatial attention,
        and the weight of the generator's non-saturating adversarial term (0: the released
        loss, MSE on x̂0 alone).
    gen_loss, gen_samples
        cDAL only: the generator's main loss, ``"mse"`` (the released loss, MSE on x̂0) or
        ``"energy"`` (this project's departure: the energy score of ``gen_samples`` x̂0
        drawn with different z for the same input, against the annotator's mask, with GED's
        soft 1 − IoU distance; :mod:`napari_berdiff.training.energy`), which rewards
        samples that differ as the readers do where MSE trains their mean.
    """

    kind: str = "bernoulli"
    network: dict[str, Any] = field(default_factory=dict)
    diffusion: dict[str, Any] = field(default_factory=dict)
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    warmup: int = 100
    min_lr_ratio: float = 0.05
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    augment: bool = True
    bce_weight: float = 1.0
    vb_weight: float = 1.0
    focal: bool = False
    t_sampling: str = "uniform"
    self_condition_gap: int = 0
    unroll_prob: float = 0.0
    unroll_gap: int = 0
    dice_weight: float = 1.0
    prior_weight: float = 1.0
    presence_weight: float = 1.0
    normalisation: str = "minmax"
    checkpoint_every: int = 500
    max_minutes: float = 0.0
    seed: int = 0
    threads: int = 1
    device: str = "cpu"
    segmentor_network: dict[str, Any] = field(default_factory=dict)
    prior_mix: float = 0.5
    trust_range: tuple[float, float] = (0.3, 0.95)
    degrade_strength: float = 1.0
    segmentor_feature_grad: float = 0.0
    refiner_dice_weight: float = 0.0
    init_from: str = ""
    lr_d: float = 1e-4
    r1_gamma: float = 1.0
    disc_channels: int = 16
    attn_scale: int = 2
    adv_weight: float = 0.0
    gen_loss: str = "mse"
    gen_samples: int = 4

    def __post_init__(self) -> None:
        if self.kind not in TRAIN_KINDS:
            raise ValueError(f"unknown kind {self.kind!r}; expected one of {TRAIN_KINDS}")
        if not self.network:
            self.network = default_network(self.kind).to_dict()
        if not isinstance(self.network, dict):
            self.network = network_description(self.network)
        if not self.diffusion:
            self.diffusion = default_diffusion(self.kind).to_dict()
        if isinstance(self.diffusion, DiffusionConfig):
            self.diffusion = self.diffusion.to_dict()
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        for name in ("steps", "batch_size", "checkpoint_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must lie in [0, 1), got {self.ema_decay}")
        if self.normalisation not in ("minmax", "none", "zscore"):
            raise ValueError(f"normalisation must be minmax, none or zscore, got "
                             f"{self.normalisation!r}")
        if self.t_sampling not in T_SAMPLINGS:
            raise ValueError(f"t_sampling must be one of {T_SAMPLINGS}, got {self.t_sampling!r}")
        net = self.network_config()
        diff = self.diffusion_config()
        if self.kind == "refiner":
            self._check_refiner(net, diff)
        if self.kind in ("bernoulli", "gaussian", "cdal") and diff.kind != self.kind:
            raise ValueError(f"kind {self.kind!r} needs a {self.kind} diffusion config, "
                             f"got {diff.kind!r}")
        if self.kind == "cdal" or isinstance(net, NCSNppConfig):
            self._check_cdal(net)
            return
        want_act = "none" if self.kind == "gaussian" else "sigmoid"
        if net.output_activation != want_act:
            raise ValueError(f"a {self.kind} model needs output_activation={want_act!r}")
        if net.mask_channels != 1:
            raise ValueError("the trainers handle single-channel binary masks (mask_channels=1)")
        if self.self_condition_gap < 0:
            raise ValueError(f"self_condition_gap must be >= 0, got {self.self_condition_gap}")
        if not 0.0 <= self.unroll_prob <= 1.0:
            raise ValueError(f"unroll_prob must lie in [0, 1], got {self.unroll_prob}")
        if self.unroll_gap < 0:
            raise ValueError(f"unroll_gap must be >= 0, got {self.unroll_gap}")
        if self.unroll_prob > 0 and (self.kind != "bernoulli"
                                     or getattr(net, "self_condition", False)):
            raise ValueError("step-unrolled training (unroll_prob > 0) is implemented for kind "
                             "'bernoulli' without self-conditioning only")
        if self.prior_weight < 0:
            raise ValueError(f"prior_weight must be >= 0, got {self.prior_weight}")
        if getattr(net, "prior_head", False) and self.kind not in ("bernoulli", "gaussian"):
            raise ValueError("a network with a prior head (prior_head=True) is trained with "
                             f"kind 'bernoulli' or 'gaussian', not {self.kind!r}")
        if self.presence_weight < 0:
            raise ValueError(f"presence_weight must be >= 0, got {self.presence_weight}")
        if getattr(net, "presence_head", False) and self.kind != "bernoulli":
            raise ValueError("a network with a presence head (presence_head=True) is trained "
                             f"with kind 'bernoulli' only, not {self.kind!r}")
        if getattr(net, "self_condition", False) and self.kind != "bernoulli":
            raise ValueError("self-conditioning (network self_condition=True) is implemented "
                             f"for kind 'bernoulli' only, not {self.kind!r}")

    def _check_cdal(self, net: Any) -> None:
        if self.kind != "cdal" or not isinstance(net, NCSNppConfig):
            raise ValueError("kind 'cdal' and the NCSN++ generator (network type "
                             "'ncsnpp_adagn') go together")
        if net.mask_channels != 1:
            raise ValueError("the cDAL trainer handles single-channel binary masks")
        if self.lr_d <= 0 or self.r1_gamma < 0 or self.adv_weight < 0:
            raise ValueError("lr_d must be > 0, r1_gamma and adv_weight >= 0")
        if self.disc_channels < 1 or self.attn_scale < 0:
            raise ValueError("disc_channels must be >= 1 and attn_scale >= 0")
        if self.gen_loss not in GEN_LOSSES:
            raise ValueError(f"gen_loss must be one of {GEN_LOSSES}, got {self.gen_loss!r}")
        if self.gen_loss == "energy" and self.gen_samples < 2:
            raise ValueError("the energy loss compares samples: gen_samples must be >= 2, got "
                             f"{self.gen_samples}")

    def _check_refiner(self, net: Any, diff: DiffusionConfig) -> None:
        if diff.kind != "bernoulli":
            raise ValueError(f"a refiner needs a bernoulli diffusion config, got {diff.kind!r}")
        if net.image_channels < 2:
            raise ValueError("a refiner's network takes the image channels plus the prior map; "
                             f"image_channels must be >= 2, got {net.image_channels}")
        if getattr(net, "segmentor", None):
            if self.segmentor_network and self.segmentor_network != net.segmentor:
                raise ValueError("segmentor_network must be the refiner network's own "
                                 "segmentor (network['segmentor']) when it has one")
            self.segmentor_network = dict(net.segmentor)
        elif self.segmentor_feature_grad:
            raise ValueError("segmentor_feature_grad needs a refiner network conditioned on "
                             "its segmentor's features (network['segmentor'])")
        if self.refiner_dice_weight < 0:
            raise ValueError(f"refiner_dice_weight must be >= 0, got {self.refiner_dice_weight}")
        if self.segmentor_feature_grad < 0:
            raise ValueError("segmentor_feature_grad must be >= 0, got "
                             f"{self.segmentor_feature_grad}")
        if not self.segmentor_network:
            self.segmentor_network = default_network(
                "deterministic", net.image_size, net.image_channels - 1).to_dict()
        if not isinstance(self.segmentor_network, dict):
            self.segmentor_network = network_description(self.segmentor_network)
        seg = self.segmentor_config()
        if seg.image_channels != net.image_channels - 1:
            raise ValueError(f"the segmentor takes {seg.image_channels} image channel(s) but the "
                             f"refiner's network {net.image_channels} (image + prior); they must "
                             "differ by one")
        if seg.output_activation != "sigmoid" or seg.mask_channels != 1:
            raise ValueError("the segmentor needs one mask channel and a sigmoid output")
        self.trust_range = tuple(float(v) for v in self.trust_range)  # type: ignore[assignment]
        lo, hi = self.trust_range
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError("trust_range must satisfy 0 <= low <= high <= 1, got "
                             f"{self.trust_range}")
        if not 0.0 <= self.prior_mix <= 1.0:
            raise ValueError(f"prior_mix must lie in [0, 1], got {self.prior_mix}")
        if self.degrade_strength < 0:
            raise ValueError(f"degrade_strength must be >= 0, got {self.degrade_strength}")

    def segmentor_config(self) -> Any:
        """A refiner recipe's segmentor network config."""
        return network_config_from_metadata(self.segmentor_network)

    def build_segmentor(self) -> torch.nn.Module:
        """A freshly initialised segmentor network of a refiner recipe."""
        return network_from_metadata(self.segmentor_network)

    def network_config(self) -> Any:
        """The network's config object (its class is chosen by the ``type`` key)."""
        return network_config_from_metadata(self.network)

    def build_network(self) -> torch.nn.Module:
        """A freshly initialised network of this recipe."""
        return network_from_metadata(self.network)

    def diffusion_config(self) -> DiffusionConfig:
        return DiffusionConfig.from_dict(self.diffusion)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["betas"] = list(self.betas)
        d["trust_range"] = list(self.trust_range)
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training settings: {', '.join(unknown)}")
        return cls(**d)

    def replace(self, **changes: Any) -> "TrainConfig":
        return self.from_dict({**self.to_dict(), **changes})
