"""cDAL's time-conditioned discriminator ``D(x_t, x_{t+1}, t)`` (Denoising-Diffusion-GAN style).

It scores whether ``x_t`` is a plausible denoising of ``x_{t+1}`` at step t. Its feature
maps also give cDAL's "spatial attention": the channel mean of one of them, upsampled to the
mask size, with which the generator's training input is noised. Only training uses it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .ncsnpp import cdal_timestep_embedding, fir_downsample

__all__ = ["CDALDiscriminator"]


class _DownBlock(nn.Module):
    """LeakyReLU → conv (+ time bias) → LeakyReLU → (FIR down) → conv, plus a 1x1 skip; /√2."""

    def __init__(self, in_ch: int, out_ch: int, t_dim: int, down: bool):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.dense_t1 = nn.Linear(t_dim, out_ch)
        self.skip = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.down = down
        nn.init.zeros_(self.conv2.weight)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.leaky_relu(x, 0.2)) + self.dense_t1(temb)[:, :, None, None]
        h = F.leaky_relu(h, 0.2)
        if self.down:
            h, x = fir_downsample(h, (1, 3, 3, 1)), fir_downsample(x, (1, 3, 3, 1))
        return (self.conv2(h) + self.skip(x)) / math.sqrt(2.0)


class CDALDiscriminator(nn.Module):
    """A small discriminator: a 1x1 stem, one block at full resolution, then ``levels``
    downsampling blocks, a minibatch-stddev channel, a 3x3 conv, a sum-pool and a linear head.

    Parameters
    ----------
    mask_channels
        Channels of one state (the input is ``[x_t, x_{t+1}]``, twice that).
    ngf
        Base width (the stem has 2·ngf channels, the deeper blocks 4·ngf and 8·ngf).
    t_dim
        Width of the time embedding.
    levels
        Downsampling blocks.
    """

    def __init__(self, mask_channels: int = 1, ngf: int = 16, t_dim: int = 64, levels: int = 3):
        super().__init__()
        self.t_dim = t_dim
        self.t_embed = nn.Sequential(nn.Linear(t_dim, t_dim), nn.LeakyReLU(0.2),
                                     nn.Linear(t_dim, t_dim))
        widths = [2 * ngf, 2 * ngf] + [min(8, 2 ** (i + 2)) * ngf for i in range(levels)]
        self.start_conv = nn.Conv2d(2 * mask_channels, widths[0], 1)
        self.blocks = nn.ModuleList(
            _DownBlock(widths[i], widths[i + 1], t_dim, down=i > 0)
            for i in range(len(widths) - 1))
        self.final_conv = nn.Conv2d(widths[-1] + 1, widths[-1], 3, padding=1)
        self.end_linear = nn.Linear(widths[-1], 1)

    def features(self, x_t: torch.Tensor, t: torch.Tensor, x_next: torch.Tensor
                 ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The feature maps (stem, then every block) and the activated time embedding."""
        temb = F.leaky_relu(self.t_embed(cdal_timestep_embedding(t, self.t_dim)), 0.2)
        h = self.start_conv(torch.cat([x_t, x_next], dim=1))
        hs = [h]
        for block in self.blocks:
            h = block(h, temb)
            hs.append(h)
        return hs, temb

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, x_next: torch.Tensor) -> torch.Tensor:
        """One logit per item, (B,)."""
        hs, _ = self.features(x_t, t, x_next)
        h = hs[-1]
        b = h.shape[0]
        group = min(b, 4)
        while b % group:
            group -= 1
        std = h.reshape(group, -1, *h.shape[1:]).var(0, unbiased=False).add(1e-8).sqrt()
        std = std.mean(dim=(1, 2, 3)).reshape(-1, 1, 1, 1).repeat(group, 1, *h.shape[2:])
        h = F.leaky_relu(self.final_conv(torch.cat([h, std], dim=1)), 0.2)
        return self.end_linear(h.sum(dim=(2, 3))).reshape(-1)

    def attention(self, x_t: torch.Tensor, t: torch.Tensor, x_next: torch.Tensor, scale: int
                  ) -> torch.Tensor:
        """cDAL's spatial attention: the channel mean of feature map ``scale``, upsampled
        bilinearly to the mask size, (B, 1, H, W); computed without gradient."""
        with torch.no_grad():
            hs, _ = self.features(x_t, t, x_next)
            feat = hs[min(scale, len(hs) - 1)].mean(dim=1, keepdim=True)
            return F.interpolate(feat, size=x_t.shape[-2:], mode="bilinear",
                                 align_corners=False)
