"""Building blocks of the conditional UNet.

The module names and the order in which sub-modules are registered are chosen so that the
``state_dict`` of a network built from these blocks has exactly the keys of the networks in
the official BerDiff and Wolleb et al. code (both descend from OpenAI's improved-diffusion /
guided-diffusion UNet).  Index positions inside the ``nn.Sequential`` containers therefore
matter: ``in_layers = [norm, SiLU, conv]`` gives ``in_layers.0`` / ``in_layers.2``,
``out_layers = [norm, SiLU, Dropout, conv]`` gives ``out_layers.0`` / ``out_layers.3`` and so
on.  Change them and official checkpoints stop loading.

Numerical conventions that must match the official code for its weights to compute the
same function:

* group normalisation (32 groups) is evaluated in float32 whatever the input dtype, and the
  result is cast back to the input dtype;
* the sinusoidal timestep embedding is ``[cos(t·f_k), sin(t·f_k)]`` (cosines first) with
  ``f_k = exp(−ln(max_period)·k/half)``, ``k = 0..half−1``, computed in float32 from the raw
  timestep value;
* attention splits the ``qkv`` projection *per head first* ("legacy" order) unless the new
  order is asked for, and scales logits by ``1/√d`` with ``d`` the per-head width;
* the last convolution of every residual branch, the attention output projection and the
  network's output convolution start at zero.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "timestep_embedding",
    "GroupNorm32",
    "normalization",
    "zero_init",
    "TimestepBlock",
    "TimestepEmbedSequential",
    "ResBlock",
    "AttentionBlock",
    "attention_heads",
    "qkv_attention",
    "Upsample",
    "Downsample",
]


# --------------------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------------------
def timestep_embedding(
    timesteps: torch.Tensor, dim: int, max_period: float = 10000.0
) -> torch.Tensor:
    """Sinusoidal embedding of a 1-D batch of (raw, unscaled) timesteps.

    Returns an ``(N, dim)`` float32 tensor laid out as ``[cos(t·f), sin(t·f)]`` where the
    frequencies ``f_k = exp(−ln(max_period)·k / (dim//2))`` decrease from 1 to
    ``≈1/max_period``.  For odd ``dim`` a zero column is appended.
    """
    if timesteps.ndim != 1:
        raise ValueError(f"timesteps must be 1-D, got shape {tuple(timesteps.shape)}")
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    # Same float32 operation order as the reference implementation: (−ln P · k) / half.
    freqs = torch.exp((-math.log(max_period)) * k / half)
    phase = timesteps.to(torch.float32)[:, None] * freqs[None, :]
    emb = torch.cat([torch.cos(phase), torch.sin(phase)], dim=1)
    if dim % 2 == 1:
        emb = F.pad(emb, (0, 1))
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm that always normalises in float32 and returns the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if x.dtype == torch.float32:
            return super().forward(x)
        out = F.group_norm(
            x.float(),
            self.num_groups,
            None if self.weight is None else self.weight.float(),
            None if self.bias is None else self.bias.float(),
            self.eps,
        )
        return out.to(x.dtype)


def normalization(channels: int, groups: int = 32) -> GroupNorm32:
    """The UNet's normalisation layer: float32 GroupNorm with ``groups`` groups."""
    if channels % groups:
        raise ValueError(f"{channels} channels cannot be split into {groups} normalisation groups")
    return GroupNorm32(groups, channels)


def zero_init(module: nn.Module) -> nn.Module:
    """Set every parameter of ``module`` to zero (in place) and return it."""
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    return module


# --------------------------------------------------------------------------------------
# containers
# --------------------------------------------------------------------------------------
class TimestepBlock(nn.Module):
    """Marker base class: ``forward(x, emb)`` takes the timestep embedding as well."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """A sequence of layers; those that are :class:`TimestepBlock` also receive ``emb``."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        for layer in self:
            x = layer(x, emb) if isinstance(layer, TimestepBlock) else layer(x)
        return x


# --------------------------------------------------------------------------------------
# resampling
# --------------------------------------------------------------------------------------
class Upsample(nn.Module):
    """Nearest-neighbour ×2 upsampling, optionally followed by a 3×3 convolution (``conv``)."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: Optional[int] = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.conv = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        elif self.out_channels != channels:
            raise ValueError("Upsample without a convolution cannot change the channel count")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        conv = getattr(self, "conv", None)
        return x if conv is None else conv(x)


class Downsample(nn.Module):
    """×2 downsampling: a stride-2 3×3 convolution (``op``), or 2×2 average pooling."""

    def __init__(self, channels: int, use_conv: bool = True, out_channels: Optional[int] = None):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        if use_conv:
            self.op: nn.Module = nn.Conv2d(channels, self.out_channels, 3, stride=2, padding=1)
        else:
            if self.out_channels != channels:
                raise ValueError("Downsample without a convolution cannot change the channel count")
            self.op = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return self.op(x)


# --------------------------------------------------------------------------------------
# residual block
# --------------------------------------------------------------------------------------
class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding.

    Branch: ``GN → SiLU → conv3×3`` (``in_layers``), add the projected embedding
    (``emb_layers = [SiLU, Linear]``) — or, with ``use_scale_shift_norm``, apply it FiLM-style
    as ``GN(h)·(1+scale)+shift`` — then ``GN → SiLU → Dropout → conv3×3`` (``out_layers``,
    last conv zero-initialised).  The shortcut (``skip_connection``) is the identity when the
    channel count is unchanged, otherwise a 1×1 convolution (3×3 with ``use_conv``).
    ``up`` / ``down`` resample both paths without parameters (``resblock_updown``).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float = 0.0,
        out_channels: Optional[int] = None,
        *,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        up: bool = False,
        down: bool = False,
        norm_groups: int = 32,
    ):
        super().__init__()
        if up and down:
            raise ValueError("a ResBlock cannot both upsample and downsample")
        self.channels = channels
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm

        self.in_layers = nn.Sequential(
            normalization(channels, norm_groups),
            nn.SiLU(),
            nn.Conv2d(channels, self.out_channels, 3, padding=1),
        )

        self.updown = up or down
        if up:
            self.h_upd: nn.Module = Upsample(channels, use_conv=False)
            self.x_upd: nn.Module = Upsample(channels, use_conv=False)
        elif down:
            self.h_upd = Downsample(channels, use_conv=False)
            self.x_upd = Downsample(channels, use_conv=False)
        else:
            self.h_upd = self.x_upd = nn.Identity()

        emb_out = 2 * self.out_channels if use_scale_shift_norm else self.out_channels
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, emb_out))
        self.out_layers = nn.Sequential(
            normalization(self.out_channels, norm_groups),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_init(nn.Conv2d(self.out_channels, self.out_channels, 3, padding=1)),
        )

        if self.out_channels == channels:
            self.skip_connection: nn.Module = nn.Identity()
        elif use_conv:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = nn.Conv2d(channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:  # noqa: D102
        norm_in, act_in, conv_in = self.in_layers
        if self.updown:
            h = self.h_upd(act_in(norm_in(x)))
            x = self.x_upd(x)
            h = conv_in(h)
        else:
            h = conv_in(act_in(norm_in(x)))

        e = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        norm_out, act_out, drop, conv_out = self.out_layers
        if self.use_scale_shift_norm:
            scale, shift = torch.chunk(e, 2, dim=1)
            h = norm_out(h) * (1 + scale) + shift
        else:
            h = norm_out(h + e)
        h = conv_out(drop(act_out(h)))
        return self.skip_connection(x) + h


# --------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------
def attention_heads(channels: int, num_heads: int = 1, num_head_channels: int = -1) -> int:
    """Number of heads for an attention layer of width ``channels``.

    ``num_head_channels`` (when not −1) fixes the per-head width and overrides ``num_heads``.
    """
    if num_head_channels != -1:
        if num_head_channels <= 0 or channels % num_head_channels:
            raise ValueError(
                f"attention width {channels} is not divisible by "
                f"num_head_channels={num_head_channels}"
            )
        return channels // num_head_channels
    if num_heads <= 0 or channels % num_heads:
        raise ValueError(f"attention width {channels} is not divisible by num_heads={num_heads}")
    return num_heads


def qkv_attention(qkv: torch.Tensor, num_heads: int, new_order: bool = False) -> torch.Tensor:
    """Multi-head self-attention from a packed ``(B, 3·C, T)`` projection; returns ``(B, C, T)``.

    Channel layout of ``qkv``:

    * legacy order (``new_order=False``, used by the released BerDiff and Wolleb models):
      heads outermost — head ``h`` owns channels ``[3·d·h, 3·d·(h+1))`` laid out as
      ``[q_h | k_h | v_h]``;
    * new order: ``[q | k | v]`` outermost, each split into heads of ``d`` channels.

    Each head computes ``softmax(q_hᵀ k_h / √d) v_h`` over the ``T`` positions.
    """
    b, width, length = qkv.shape
    if width % (3 * num_heads):
        raise ValueError(f"qkv width {width} is not divisible by 3·num_heads={3 * num_heads}")
    d = width // (3 * num_heads)
    if new_order:
        q, k, v = (part.reshape(b * num_heads, d, length) for part in qkv.chunk(3, dim=1))
    else:
        q, k, v = qkv.reshape(b * num_heads, 3 * d, length).split(d, dim=1)

    dtype = qkv.dtype
    if dtype not in (torch.float32, torch.float64):
        # The reference takes the softmax in float32 for reduced-precision inputs.
        q, k, v = q.float(), k.float(), v.float()
    # (B·H, T, d) layout for scaled_dot_product_attention; scale defaults to 1/√d.
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).reshape(b, num_heads * d, length).to(dtype)


class AttentionBlock(nn.Module):
    """Spatial self-attention with a residual connection.

    ``x + proj_out(attn(qkv(norm(x))))`` over the flattened spatial positions; ``qkv`` and
    ``proj_out`` are 1×1 ``Conv1d`` layers (weights of shape ``(3C, C, 1)`` and ``(C, C, 1)``),
    ``proj_out`` starts at zero.
    """

    def __init__(
        self,
        channels: int,
        num_heads: int = 1,
        num_head_channels: int = -1,
        use_new_attention_order: bool = False,
        norm_groups: int = 32,
    ):
        super().__init__()
        self.channels = channels
        self.num_heads = attention_heads(channels, num_heads, num_head_channels)
        self.use_new_attention_order = use_new_attention_order
        self.norm = normalization(channels, norm_groups)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_init(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        b, c, *spatial = x.shape
        flat = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(flat))
        h = qkv_attention(qkv, self.num_heads, self.use_new_attention_order)
        h = self.proj_out(h)
        return (flat + h).reshape(b, c, *spatial)
