"""cDAL's generator: NCSN++ with adaptive group norm, a latent z and an image encoder.

The state-dict layout is the official one (``score_sde/models/ncsnpp_generator_adagn.py`` of
github.com/Hejrati/cDAL, a Denoising-Diffusion-GAN fork): every layer sits in one
``all_modules`` list, in the order the official constructor appends them, and the latent's
mapping network is ``z_transform``. Only the configuration cDAL releases is supported: BigGAN
residual blocks with FIR resampling, sinusoidal time embedding, no output pyramid and a
residual input pyramid.

The network predicts ``x̂0`` in [-1, 1] (tanh) from ``(x_{t+1}, t, image, z)``. The image goes
through its own encoder, whose output is added to the first feature map at full resolution;
``z ~ N(0, I_nz)`` is mapped to a style vector that scales and shifts every group norm.

Attention is placed by feature-map size, as the official forward pass does, so a network
accepts exactly its configured ``image_size`` (see :meth:`NCSNppConfig.check_size`).

``NCSNppConfig.unshuffle > 1`` is this project's CPU variant, not an official option: the
mask state and the image are pixel-unshuffled, the whole network runs at
``image_size / unshuffle`` and its output is pixel-shuffled back before tanh.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._config import ConfigMixin

__all__ = ["NCSNppConfig", "NCSNppGenerator", "cdal_timestep_embedding", "fir_downsample",
           "fir_upsample"]

_SQRT2 = math.sqrt(2.0)


@dataclass(frozen=True)
class NCSNppConfig(ConfigMixin):
    """The generator's configuration, named after the official ``parameters_*.json`` keys.

    Parameters
    ----------
    image_size
        The one spatial size the network takes (attention placement depends on it).
    image_channels
        Channels of the condition image (3 for MoNuSeg's RGB, else 1).
    mask_channels
        Channels of the diffused mask (``num_channels``: 1, or 3 one-hot classes for the
        hippocampus).
    nf
        Base width (``num_channels_dae``).
    ch_mult, num_res_blocks, attn_resolutions
        Width multiplier per level, residual blocks per level, and the feature-map sizes
        that get self-attention.
    nz, z_emb_dim, n_mlp
        Latent size, style width and the mapping network's hidden layers.
    cond_enc_layers, cond_enc_num_res_blocks
        The image encoder: ``cond_enc_layers × cond_enc_num_res_blocks`` residual blocks at
        full resolution, all ``nf`` wide.
    fir_kernel
        The FIR resampling filter.
    skip_rescale
        Divide residual sums by √2.
    centered
        Masks are already in [-1, 1] (when False the input is mapped from [0, 1]).
    use_tanh
        Squash the output with tanh (official ``not_use_tanh=False``).
    dropout
        Dropout in the residual blocks.
    unshuffle
        This project's CPU variant, **not an official cDAL option** (1, the default, is the
        official layout). With ``u > 1`` the mask state and the image are pixel-unshuffled
        into ``u²`` times their channels, the whole NCSN++ (encoder included) runs at
        ``image_size / u`` (``attn_resolutions`` refer to that inner size), and the
        ``mask_channels·u²`` output channels are pixel-shuffled back before tanh. The network
        still takes ``image_size`` inputs.
    """

    _what = "NCSN++ generator"
    image_size: int = 256
    image_channels: int = 1
    mask_channels: int = 1
    nf: int = 32
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4, 4)
    num_res_blocks: int = 1
    attn_resolutions: tuple[int, ...] = (16,)
    nz: int = 100
    z_emb_dim: int = 256
    n_mlp: int = 3
    cond_enc_layers: int = 3
    cond_enc_num_res_blocks: int = 2
    fir_kernel: tuple[int, ...] = (1, 3, 3, 1)
    skip_rescale: bool = True
    centered: bool = True
    use_tanh: bool = True
    dropout: float = 0.0
    unshuffle: int = 1

    def __post_init__(self) -> None:
        for name in ("ch_mult", "attn_resolutions", "fir_kernel"):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        levels = len(self.ch_mult)
        if levels < 1 or self.num_res_blocks < 1 or self.nf < 4 or self.nz < 1:
            raise ValueError("an NCSN++ generator needs at least one level, one residual block "
                             "per level, nf >= 4 and nz >= 1")
        if self.unshuffle < 1 or self.image_size % self.unshuffle:
            raise ValueError(f"unshuffle must be >= 1 and divide image_size "
                             f"{self.image_size}, got {self.unshuffle}")
        if self.inner_size % 2 ** (levels - 1):
            raise ValueError(f"image_size {self.image_size} / unshuffle {self.unshuffle} must "
                             f"be divisible by 2**{levels - 1} for {levels} levels")
        if self.nf % 32:
            raise ValueError(f"nf must be a multiple of 32 (the encoder's group norm has 32 "
                             f"groups), got {self.nf}")

    @property
    def inner_size(self) -> int:
        """The size the network runs at: ``image_size / unshuffle``."""
        return self.image_size // self.unshuffle

    @property
    def resolutions(self) -> list[int]:
        """The feature-map size at each level (of the inner, unshuffled maps)."""
        return [self.inner_size // 2**i for i in range(len(self.ch_mult))]

    def check_size(self, h: int, w: int) -> None:
        """Raise a ValueError unless ``(h, w)`` is the configured square size."""
        if (h, w) != (self.image_size, self.image_size):
            raise ValueError(
                f"this cDAL network takes {self.image_size}x{self.image_size} images only (its "
                f"attention layers sit at feature maps of {self.attn_resolutions} pixels, placed "
                f"by size); got {h}x{w}. Resize the image or choose a region of interest of "
                f"{self.image_size}x{self.image_size}."
            )


# ---------------------------------------------------------------------------- functions
def cdal_timestep_embedding(t: torch.Tensor, dim: int, max_positions: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding ``[sin, cos]`` with frequencies ``exp(-k·log(max)/(half − 1))``."""
    half = dim // 2
    step = math.log(max_positions) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=t.device) * -step)
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def _fir_2d(kernel: tuple[int, ...], gain: float, like: torch.Tensor) -> torch.Tensor:
    k = np.asarray(kernel, dtype=np.float32)
    k2 = np.outer(k, k)
    k2 = k2 / k2.sum() * gain
    return torch.from_numpy(k2[::-1, ::-1].copy()).to(like.device, like.dtype)


def _depthwise(x: torch.Tensor, k2: torch.Tensor, stride: int = 1) -> torch.Tensor:
    c = x.shape[1]
    weight = k2[None, None].expand(c, 1, *k2.shape)
    return F.conv2d(x, weight, stride=stride, groups=c)


def fir_downsample(x: torch.Tensor, kernel: tuple[int, ...], factor: int = 2) -> torch.Tensor:
    """Filter with the FIR kernel, then keep every ``factor``-th pixel (StyleGAN2 style)."""
    p = len(kernel) - factor
    x = F.pad(x, ((p + 1) // 2, p // 2, (p + 1) // 2, p // 2))
    return _depthwise(x, _fir_2d(kernel, 1.0, x), stride=factor)


def fir_upsample(x: torch.Tensor, kernel: tuple[int, ...], factor: int = 2) -> torch.Tensor:
    """Insert zeros between pixels, then filter with the FIR kernel scaled by ``factor²``."""
    n, c, h, w = x.shape
    up = x.new_zeros(n, c, h * factor, w * factor)
    up[:, :, ::factor, ::factor] = x
    p = len(kernel) - factor
    lo, hi = (p + 1) // 2 + factor - 1, p // 2
    up = F.pad(up, (lo, hi, lo, hi))
    return _depthwise(up, _fir_2d(kernel, float(factor**2), x))


# ---------------------------------------------------------------------------- layers
class AdaGroupNorm(nn.Module):
    """Group norm without affine parameters, then ``γ(z)·h + β(z)`` from the style vector."""

    def __init__(self, groups: int, channels: int, style_dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, affine=False, eps=1e-6)
        self.style = nn.Linear(style_dim, 2 * channels)
        with torch.no_grad():
            self.style.bias[:channels] = 1.0
            self.style.bias[channels:] = 0.0

    def forward(self, x: torch.Tensor, style: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.style(style)[:, :, None, None].chunk(2, dim=1)
        return gamma * self.norm(x) + beta


class NIN(nn.Module):
    """A 1x1 projection stored as ``W`` (in, out) and ``b``, as the official layer is."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.W = nn.Parameter(torch.empty(in_dim, out_dim))
        self.b = nn.Parameter(torch.zeros(out_dim))
        nn.init.xavier_uniform_(self.W, gain=0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bchw,cd->bdhw", x, self.W) + self.b[None, :, None, None]


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels; the residual sum is divided by √2."""

    def __init__(self, channels: int, skip_rescale: bool = True):
        super().__init__()
        self.GroupNorm_0 = nn.GroupNorm(min(channels // 4, 32), channels, eps=1e-6)
        self.NIN_0 = NIN(channels, channels)
        self.NIN_1 = NIN(channels, channels)
        self.NIN_2 = NIN(channels, channels)
        self.NIN_3 = NIN(channels, channels)
        self.skip_rescale = skip_rescale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        hn = self.GroupNorm_0(x)
        q = self.NIN_0(hn).reshape(b, c, h * w)
        k = self.NIN_1(hn).reshape(b, c, h * w)
        v = self.NIN_2(hn).reshape(b, c, h * w)
        weights = torch.softmax(torch.bmm(q.transpose(1, 2), k) * c**-0.5, dim=-1)
        out = torch.bmm(v, weights.transpose(1, 2)).reshape(b, c, h, w)
        out = x + self.NIN_3(out)
        return out / _SQRT2 if self.skip_rescale else out


class ResBlockAdaGN(nn.Module):
    """BigGAN-style residual block with adaptive group norms and FIR up/down-sampling."""

    def __init__(self, in_ch: int, out_ch: int | None, temb_dim: int, zemb_dim: int,
                 fir_kernel: tuple[int, ...], up: bool = False, down: bool = False,
                 dropout: float = 0.0, skip_rescale: bool = True):
        super().__init__()
        out_ch = out_ch or in_ch
        self.GroupNorm_0 = AdaGroupNorm(min(in_ch // 4, 32), in_ch, zemb_dim)
        self.Conv_0 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.Dense_0 = nn.Linear(temb_dim, out_ch)
        self.GroupNorm_1 = AdaGroupNorm(min(out_ch // 4, 32), out_ch, zemb_dim)
        self.Dropout_0 = nn.Dropout(dropout)
        self.Conv_1 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.Conv_2 = nn.Conv2d(in_ch, out_ch, 1) if (in_ch != out_ch or up or down) else None
        self.up, self.down, self.fir_kernel = up, down, fir_kernel
        self.skip_rescale = skip_rescale

    def _resample(self, x: torch.Tensor) -> torch.Tensor:
        if self.up:
            return fir_upsample(x, self.fir_kernel)
        if self.down:
            return fir_downsample(x, self.fir_kernel)
        return x

    def forward(self, x: torch.Tensor, temb: torch.Tensor, zemb: torch.Tensor) -> torch.Tensor:
        h = self._resample(F.silu(self.GroupNorm_0(x, zemb)))
        x = self._resample(x)
        h = self.Conv_0(h) + self.Dense_0(F.silu(temb))[:, :, None, None]
        h = self.Conv_1(self.Dropout_0(F.silu(self.GroupNorm_1(h, zemb))))
        if self.Conv_2 is not None:
            x = self.Conv_2(x)
        return (x + h) / _SQRT2 if self.skip_rescale else x + h


class FirConvDown(nn.Module):
    """3x3 convolution with stride 2 after FIR filtering (the input pyramid's downsampler)."""

    def __init__(self, in_ch: int, out_ch: int, fir_kernel: tuple[int, ...]):
        super().__init__()
        self.Conv2d_0 = _FirConv(in_ch, out_ch, fir_kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.Conv2d_0(x)


class _FirConv(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, fir_kernel: tuple[int, ...]):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_ch, in_ch, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_ch))
        nn.init.xavier_uniform_(self.weight)
        self.fir_kernel = fir_kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = (len(self.fir_kernel) - 2) + (self.weight.shape[-1] - 1)
        x = F.pad(x, ((p + 1) // 2, p // 2, (p + 1) // 2, p // 2))
        x = _depthwise(x, _fir_2d(self.fir_kernel, 1.0, x))
        return F.conv2d(x, self.weight, stride=2) + self.bias[None, :, None, None]


class EncoderBlock(nn.Module):
    """The image encoder's residual block: no time or latent input, group norm in float32."""

    def __init__(self, channels: int, dropout: float = 0.0):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(32, channels), nn.SiLU(),
                                       nn.Conv2d(channels, channels, 3, padding=1))
        self.out_layers = nn.Sequential(nn.GroupNorm(32, channels), nn.SiLU(),
                                        nn.Dropout(dropout),
                                        nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.out_layers(self.in_layers(x))


class PixelNorm(nn.Module):
    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z / torch.sqrt(torch.mean(z**2, dim=1, keepdim=True) + 1e-8)


# ---------------------------------------------------------------------------- the network
class NCSNppGenerator(nn.Module):
    """cDAL's generator ``x̂0 = G(x_{t+1}, t, image, z)`` in the official key layout.

    For the streaming sampler it also offers ``encode(image)`` (the image encoder, run once
    per image) and ``predict(x_t, t, cond, z=...)`` (everything else, once per step).
    """

    def __init__(self, config: NCSNppConfig):
        super().__init__()
        self.config = cfg = config
        nf, temb_dim = cfg.nf, 4 * cfg.nf
        u2 = cfg.unshuffle**2
        mods: list[nn.Module] = [nn.Linear(nf, temb_dim), nn.Linear(temb_dim, temb_dim)]

        def res(in_ch: int, out_ch: int | None = None, **kw: Any) -> ResBlockAdaGN:
            return ResBlockAdaGN(in_ch, out_ch, temb_dim, cfg.z_emb_dim, cfg.fir_kernel,
                                 dropout=cfg.dropout, skip_rescale=cfg.skip_rescale, **kw)

        def attn(ch: int) -> AttnBlock:
            return AttnBlock(ch, cfg.skip_rescale)

        # image encoder
        self.encoder: list[nn.Module] = [nn.Conv2d(cfg.image_channels * u2, nf, 3,
                                                    padding=1)]
        for _ in range(cfg.cond_enc_layers * cfg.cond_enc_num_res_blocks):
            self.encoder.append(nn.Sequential(EncoderBlock(nf, cfg.dropout)))
        mods += self.encoder
        # down path: per level, (res block, optional attention) pairs; then downsampling
        self.conv_in = nn.Conv2d(cfg.mask_channels * u2, nf, 3, padding=1)
        mods.append(self.conv_in)
        self.down: list[tuple[list[tuple[nn.Module, nn.Module | None]], Any]] = []
        skips = [nf]
        in_ch, pyramid_ch = nf, cfg.mask_channels * u2
        levels = len(cfg.ch_mult)
        for level, mult in enumerate(cfg.ch_mult):
            blocks = []
            for _ in range(cfg.num_res_blocks):
                block = res(in_ch, nf * mult)
                in_ch = nf * mult
                mods.append(block)
                a = attn(in_ch) if cfg.resolutions[level] in cfg.attn_resolutions else None
                if a is not None:
                    mods.append(a)
                blocks.append((block, a))
                skips.append(in_ch)
            sampler = None
            if level != levels - 1:
                down = res(in_ch, down=True)
                pyr = FirConvDown(pyramid_ch, in_ch, cfg.fir_kernel)
                pyramid_ch = in_ch
                mods += [down, pyr]
                sampler = (down, pyr)
                skips.append(in_ch)
            self.down.append((blocks, sampler))
        self.middle = [res(in_ch), attn(in_ch), res(in_ch)]
        mods += self.middle
        # up path
        self.up: list[tuple[list[nn.Module], nn.Module | None, nn.Module | None]] = []
        for level in reversed(range(levels)):
            blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                block = res(in_ch + skips.pop(), nf * cfg.ch_mult[level])
                in_ch = nf * cfg.ch_mult[level]
                blocks.append(block)
            mods += blocks
            a = attn(in_ch) if cfg.resolutions[level] in cfg.attn_resolutions else None
            if a is not None:
                mods.append(a)
            upsampler = res(in_ch, up=True) if level != 0 else None
            if upsampler is not None:
                mods.append(upsampler)
            self.up.append((blocks, a, upsampler))
        self.norm_out = nn.GroupNorm(min(in_ch // 4, 32), in_ch, eps=1e-6)
        self.conv_out = nn.Conv2d(in_ch, cfg.mask_channels * u2, 3, padding=1)
        mods += [self.norm_out, self.conv_out]
        self.all_modules = nn.ModuleList(mods)
        # the latent's mapping network: PixelNorm, then (Linear, SiLU) × (1 + n_mlp)
        mapping: list[nn.Module] = [PixelNorm(), nn.Linear(cfg.nz, cfg.z_emb_dim), nn.SiLU()]
        for _ in range(cfg.n_mlp):
            mapping += [nn.Linear(cfg.z_emb_dim, cfg.z_emb_dim), nn.SiLU()]
        self.z_transform = nn.Sequential(*mapping)

    # The lists above hold references to modules registered in ``all_modules``; keep them
    # out of ``named_modules`` by not registering them twice.
    def __setattr__(self, name: str, value: Any) -> None:
        if name in ("conv_in", "norm_out", "conv_out"):
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    # ------------------------------------------------------------------ interface
    @property
    def mask_channels(self) -> int:
        """Channels of the chain's state (the sampler draws this many per sample)."""
        return self.config.mask_channels

    @property
    def latent_dim(self) -> int:
        """Size of z, drawn fresh for every sample and step by the sampler."""
        return self.config.nz

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        """The image encoder's feature map (B, nf, H/u, W/u), added to the first feature
        map (``u`` = ``config.unshuffle``)."""
        self.config.check_size(*image.shape[-2:])
        h = image.to(self.conv_in.weight.dtype)
        if self.config.unshuffle > 1:
            h = F.pixel_unshuffle(h, self.config.unshuffle)
        for layer in self.encoder:
            h = layer(h)
        return h

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                z: torch.Tensor | None = None) -> torch.Tensor:
        """``x̂0`` (B, mask_channels, H, W) in [-1, 1]. Without ``z`` a standard-normal z is
        drawn from torch's global generator; pass it to be reproducible."""
        cfg = self.config
        cfg.check_size(*x_t.shape[-2:])
        if z is None:
            z = torch.randn(x_t.shape[0], cfg.nz, device=x_t.device, dtype=x_t.dtype)
        zemb = self.z_transform(z.to(x_t.dtype))
        temb = cdal_timestep_embedding(t, cfg.nf)
        temb = self.all_modules[1](F.silu(self.all_modules[0](temb)))
        if not cfg.centered:
            x_t = 2 * x_t - 1
        if cond.shape[0] != x_t.shape[0]:
            cond = cond.expand(x_t.shape[0], *cond.shape[1:])
        if cfg.unshuffle > 1:
            x_t = F.pixel_unshuffle(x_t, cfg.unshuffle)
        pyramid = x_t
        hs = [self.conv_in(x_t) + cond]
        for blocks, sampler in self.down:
            for block, a in blocks:
                h = block(hs[-1], temb, zemb)
                if a is not None:
                    h = a(h)
                hs.append(h)
            if sampler is not None:
                down, pyr = sampler
                h = down(hs[-1], temb, zemb)
                pyramid = pyr(pyramid) + h
                pyramid = pyramid / _SQRT2 if cfg.skip_rescale else pyramid
                h = pyramid
                hs.append(h)
        h = hs[-1]
        h = self.middle[0](h, temb, zemb)
        h = self.middle[1](h)
        h = self.middle[2](h, temb, zemb)
        for blocks, a, upsampler in self.up:
            for block in blocks:
                h = block(torch.cat([h, hs.pop()], dim=1), temb, zemb)
            if a is not None:
                h = a(h)
            if upsampler is not None:
                h = upsampler(h, temb, zemb)
        h = self.conv_out(F.silu(self.norm_out(h)))
        if cfg.unshuffle > 1:
            h = F.pixel_shuffle(h, cfg.unshuffle)
        return torch.tanh(h) if cfg.use_tanh else h

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, image: torch.Tensor,
                z: torch.Tensor | None = None) -> torch.Tensor:
        """The official call ``G(x_{t+1}, t, image, z)``."""
        return self.predict(x_t, t, self.encode(image), z)

    def activation_bytes(self, h: int, w: int) -> int:
        """Rough float32 activation memory of one sample's forward pass (for chunking); with
        ``unshuffle`` u the features are those of an (h/u, w/u) map."""
        cfg = self.config
        h, w = h / cfg.unshuffle, w / cfg.unshuffle
        floats = 6.0 * cfg.nf * h * w
        attn = 0.0
        for level, mult in enumerate(cfg.ch_mult):
            pix = (h / 2**level) * (w / 2**level)
            floats += (cfg.num_res_blocks + 2) * cfg.nf * mult * pix
            if cfg.resolutions[level] in cfg.attn_resolutions:
                attn += pix * pix
        return int(4 * (floats + 2 * attn))
