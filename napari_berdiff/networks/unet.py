"""The conditional UNet: configuration and module.

:class:`ConditionalUNet` reproduces the improved-/guided-diffusion UNet used by BerDiff and by
Wolleb et al. — same ``state_dict`` keys, same shapes, same registration order, and the same
function — with the image condition entering by channel concatenation.

Conventions (checked against the official code, see ``tests/engine/test_network.py``):

* ``attention_resolutions`` holds *downsample factors* ``ds``.  The official command-line
  flag lists feature-map resolutions instead and is converted with ``ds = image_size // res``
  (use :func:`napari_berdiff.networks.presets.official_attention_ds`); e.g. BerDiff's
  ``"16"`` at 128 px is ``ds = 8``.
* the network receives the raw timestep index (no rescaling).
* ``concat_order="mask_first"`` feeds ``[x_t, image]`` (BerDiff's ``SegmentationModel``),
  ``"image_first"`` feeds ``[image, x_t]`` (Wolleb et al.).
* ``output_activation="sigmoid"`` (BerDiff) returns probabilities; ``"none"`` returns the raw
  output (Wolleb: channel 0 is ε, channel 1 the learned-variance interpolation value).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

import torch
from torch import nn

from .._config import ConfigMixin
from .blocks import (
    AttentionBlock,
    Downsample,
    ResBlock,
    TimestepEmbedSequential,
    Upsample,
    attention_heads,
    normalization,
    timestep_embedding,
    zero_init,
)

__all__ = ["UNetConfig", "ConditionalUNet", "CONCAT_ORDERS", "OUTPUT_ACTIVATIONS"]

CONCAT_ORDERS = ("mask_first", "image_first")
OUTPUT_ACTIVATIONS = ("sigmoid", "none")

TimestepLike = Union[int, float, torch.Tensor]


@dataclass(frozen=True)
class UNetConfig(ConfigMixin):
    """Hyper-parameters of a :class:`ConditionalUNet`.

    Parameters
    ----------
    image_size
        Training image size in pixels (informational; any size divisible by
        ``2**(len(channel_mult)-1)`` runs).
    image_channels
        Channels of the condition image.
    mask_channels
        Channels of the diffused mask ``x_t`` (1 for binary masks).
    out_channels
        Output channels (1 for BerDiff; 2 for Wolleb's ε + learned σ).
    model_channels
        Base width; the timestep embedding has ``4·model_channels`` features.
    num_res_blocks
        Residual blocks per resolution level on the way down (one more on the way up).
    attention_resolutions
        Downsample factors at which self-attention follows each residual block.
    dropout
        Dropout rate inside the residual blocks.
    channel_mult
        Width multiplier per level; ``len(channel_mult) − 1`` downsamplings.
    num_heads, num_head_channels, num_heads_upsample
        Attention heads (``num_head_channels != −1`` fixes the per-head width instead;
        ``num_heads_upsample == −1`` means "same as ``num_heads``" on the decoder side).
    use_scale_shift_norm
        FiLM-style timestep conditioning in the residual blocks.
    resblock_updown
        Resample with residual blocks instead of ``Downsample``/``Upsample`` convolutions.
    use_new_attention_order
        Split ``qkv`` into q, k, v before heads (the released models use the legacy order).
    concat_order
        ``"mask_first"`` → ``[x_t, image]``; ``"image_first"`` → ``[image, x_t]``.
    output_activation
        ``"sigmoid"`` or ``"none"``.
    norm_groups
        GroupNorm groups (32 in the official layout).
    """

    _what = "network"
    image_size: int = 128
    image_channels: int = 1
    mask_channels: int = 1
    out_channels: int = 1
    model_channels: int = 128
    num_res_blocks: int = 2
    attention_resolutions: tuple[int, ...] = (8,)
    dropout: float = 0.0
    channel_mult: tuple[int, ...] = (1, 1, 2, 3, 4)
    num_heads: int = 1
    num_head_channels: int = -1
    num_heads_upsample: int = -1
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    use_new_attention_order: bool = False
    concat_order: str = "mask_first"
    output_activation: str = "sigmoid"
    norm_groups: int = 32

    def __post_init__(self) -> None:
        # Accept lists (e.g. from JSON) but store tuples so the config stays hashable.
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(
            self, "attention_resolutions", tuple(int(r) for r in self.attention_resolutions)
        )
        for name in ("image_size", "mask_channels", "out_channels", "model_channels",
                     "num_res_blocks", "norm_groups"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.image_channels < 0:
            raise ValueError(f"image_channels must be >= 0, got {self.image_channels}")
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ValueError(
                f"channel_mult must be a non-empty tuple of positive ints, got {self.channel_mult}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.concat_order not in CONCAT_ORDERS:
            raise ValueError(
                f"concat_order must be one of {CONCAT_ORDERS}, got {self.concat_order!r}"
            )
        if self.output_activation not in OUTPUT_ACTIVATIONS:
            raise ValueError(
                f"output_activation must be one of {OUTPUT_ACTIVATIONS}, "
                f"got {self.output_activation!r}"
            )
        reachable = {2**level for level in range(len(self.channel_mult))}
        bad = [r for r in self.attention_resolutions if r not in reachable]
        if bad:
            raise ValueError(
                "attention_resolutions are downsample factors and must be among "
                f"{sorted(reachable)} for {len(self.channel_mult)} levels; got {bad}. (An "
                "official flag such as '16' is a feature-map resolution: convert it with "
                "ds = image_size // res.)"
            )
        widths = {self.model_channels * m for m in self.channel_mult}
        for w in sorted(widths):
            if w % self.norm_groups:
                raise ValueError(f"width {w} is not divisible by norm_groups={self.norm_groups}")
        if self.num_heads_upsample == 0 or self.num_heads_upsample < -1:
            raise ValueError(
                f"num_heads_upsample must be -1 or >= 1, got {self.num_heads_upsample}"
            )
        # Every width that gets attention must split into heads.
        attn_widths = {self.model_channels * self.channel_mult[-1]}
        for level, m in enumerate(self.channel_mult):
            if 2**level in self.attention_resolutions:
                attn_widths.add(self.model_channels * m)
        for w in sorted(attn_widths):
            attention_heads(w, self.num_heads, self.num_head_channels)
            attention_heads(w, self.heads_upsample, self.num_head_channels)

    # ---------------------------------------------------------------- derived values
    @property
    def in_channels(self) -> int:
        """Channels entering the first convolution: mask plus image."""
        return self.mask_channels + self.image_channels

    @property
    def heads_upsample(self) -> int:
        return self.num_heads if self.num_heads_upsample == -1 else self.num_heads_upsample

    @property
    def size_multiple(self) -> int:
        """Spatial sizes must be divisible by this."""
        return 2 ** (len(self.channel_mult) - 1)


class ConditionalUNet(nn.Module):
    """Image-conditioned diffusion UNet in the official BerDiff / Wolleb ``state_dict`` layout.

    ``forward(x_t, t, image)`` equals ``predict(x_t, t, encode(image))``.  For this
    concatenation network :meth:`encode` is the identity; the split lets a sampler encode the
    condition once per call and reuse it at every step.
    """

    def __init__(self, config: UNetConfig):
        super().__init__()
        if not isinstance(config, UNetConfig):
            raise TypeError(f"expected a UNetConfig, got {type(config).__name__}")
        self.config = config
        c = config
        mc = c.model_channels
        emb_dim = 4 * mc
        groups = c.norm_groups

        def res(cin: int, cout: int, **kw: Any) -> ResBlock:
            return ResBlock(
                cin, emb_dim, c.dropout, cout,
                use_scale_shift_norm=c.use_scale_shift_norm, norm_groups=groups, **kw,
            )

        def attn(ch: int, heads: int) -> AttentionBlock:
            return AttentionBlock(
                ch, heads, c.num_head_channels, c.use_new_attention_order, norm_groups=groups
            )

        # Registration order == state_dict order: time_embed, input_blocks, middle_block,
        # output_blocks, out.
        self.time_embed = nn.Sequential(
            nn.Linear(mc, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(nn.Conv2d(c.in_channels, mc, 3, padding=1))]
        )
        skip_widths = [mc]
        ch = mc
        ds = 1
        last_level = len(c.channel_mult) - 1
        for level, mult in enumerate(c.channel_mult):
            width = mult * mc
            for _ in range(c.num_res_blocks):
                layers: list[nn.Module] = [res(ch, width)]
                ch = width
                if ds in c.attention_resolutions:
                    layers.append(attn(ch, c.num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                skip_widths.append(ch)
            if level != last_level:
                down = res(ch, ch, down=True) if c.resblock_updown else Downsample(ch)
                self.input_blocks.append(TimestepEmbedSequential(down))
                skip_widths.append(ch)
                ds *= 2

        self.middle_block = TimestepEmbedSequential(
            res(ch, ch), attn(ch, c.num_heads), res(ch, ch)
        )

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            width = mult * mc
            for i in range(c.num_res_blocks + 1):
                layers = [res(ch + skip_widths.pop(), width)]
                ch = width
                if ds in c.attention_resolutions:
                    layers.append(attn(ch, c.heads_upsample))
                if level > 0 and i == c.num_res_blocks:
                    layers.append(res(ch, ch, up=True) if c.resblock_updown else Upsample(ch))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch, groups),
            nn.SiLU(),
            zero_init(nn.Conv2d(ch, c.out_channels, 3, padding=1)),
        )

    # ------------------------------------------------------------------ public API
    def num_parameters(self, trainable_only: bool = False) -> int:
        """Total number of parameter elements."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """The condition computed once per image: for concatenation, the image itself."""
        return image

    def forward(self, x_t: torch.Tensor, t: TimestepLike, image: torch.Tensor) -> torch.Tensor:
        """Network output for mask state ``x_t`` (N, mask_channels, H, W) at timestep ``t``.

        ``image`` is (N or 1, image_channels, H, W) — a batch of 1 is broadcast — and ``t`` an
        integer timestep index, as a scalar or an (N,) tensor (passed unscaled).
        """
        return self.predict(x_t, t, self.encode(image))

    def predict(self, x_t: torch.Tensor, t: TimestepLike, cond: torch.Tensor) -> torch.Tensor:
        """Like :meth:`forward`, with the condition from :meth:`encode`."""
        c = self.config
        if x_t.ndim != 4:
            raise ValueError(f"x_t must be (N, C, H, W), got shape {tuple(x_t.shape)}")
        n, cm, hgt, wid = x_t.shape
        if cm != c.mask_channels:
            raise ValueError(f"x_t has {cm} channels, the network expects {c.mask_channels}")
        m = c.size_multiple
        if hgt % m or wid % m:
            raise ValueError(f"spatial size {hgt}×{wid} must be divisible by {m} for this network")

        if cond.ndim == 3:
            cond = cond.unsqueeze(0)
        if cond.ndim != 4 or cond.shape[1] != c.image_channels or cond.shape[2:] != x_t.shape[2:]:
            raise ValueError(
                f"image must be (N or 1, {c.image_channels}, {hgt}, {wid}); got {tuple(cond.shape)}"
            )
        if cond.shape[0] != n:
            if cond.shape[0] != 1:
                raise ValueError(f"image batch {cond.shape[0]} does not match x_t batch {n}")
            cond = cond.expand(n, -1, -1, -1)

        timesteps = self._timesteps(t, n, x_t.device)

        dtype = self.input_blocks[0][0].weight.dtype
        x_t = x_t.to(dtype)
        cond = cond.to(device=x_t.device, dtype=dtype)
        parts = (x_t, cond) if c.concat_order == "mask_first" else (cond, x_t)
        h = torch.cat(parts, dim=1)

        emb = timestep_embedding(timesteps, c.model_channels)
        emb = self.time_embed(emb.to(self.time_embed[0].weight.dtype))

        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        out = self.out(h)
        if c.output_activation == "sigmoid":
            out = torch.sigmoid(out)
        return out

    @staticmethod
    def _timesteps(t: TimestepLike, n: int, device: torch.device) -> torch.Tensor:
        ts = torch.as_tensor(t, device=device)
        if ts.ndim == 0 or ts.shape == (1,):
            return ts.reshape(1).expand(n)
        if ts.shape != (n,):
            raise ValueError(f"t must be a scalar or have shape ({n},), got {tuple(ts.shape)}")
        return ts
