"""A condition-once network: encode the image once, run a light denoiser per step.

``encode(image)`` runs an image encoder once per call and returns, for every level of the
denoiser, the image features already projected to that level's width. ``predict(x_t, t,
cond)`` then runs a small timestep-conditioned UNet on the pixel-unshuffled mask state (at
``1/unshuffle`` resolution) and adds the cached features at each level. The expensive part of
the concatenation UNet (seeing the image at full width, every step) is paid once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .._config import ConfigMixin
from .blocks import ResBlock, normalization, timestep_embedding, zero_init


@dataclass(frozen=True)
class CondOnceConfig(ConfigMixin):
    """Hyper-parameters of :class:`ConditionOnceNet`.

    Parameters
    ----------
    image_size, image_channels, mask_channels, out_channels
        As for the UNet; ``image_size`` is informational.
    model_channels, channel_mult, num_res_blocks
        The per-step denoiser: base width, width multiplier per level, blocks per level.
    encoder_channels, encoder_blocks
        The image encoder: base width (doubled per level, capped at 4×) and residual
        blocks per level.
    unshuffle
        The denoiser runs at ``H/unshuffle``: the mask is pixel-unshuffled into
        ``unshuffle²`` channels and the output pixel-shuffled back.
    full_res_head
        Width of an optional full-resolution output head (0: none). The denoiser's last
        features are pixel-shuffled to full resolution, joined with the encoder's
        full-resolution features and ``x_t`` (and ``x̂0`` when self-conditioned), and
        refined by one residual block, so that boundaries are placed at full resolution
        (only with ``unshuffle > 1``).
    prior_head
        A deterministic segmentation head on the image encoder (HiDiff's prior, inside one
        network). Its probability map is computed once per image with the rest of the
        encoding, trained with BCE + Dice against the annotation, and given to the denoiser
        as one extra input channel, without gradient through that input.
    presence_head
        An image-level head giving the probability that an annotator marks anything at all
        (:meth:`ConditionOnceNet.presence`), from the deepest image features. Readers who
        miss a faint lesion draw an empty mask: a global event that per-pixel Bernoulli noise
        represents poorly. With this head the mask distribution is modelled as a mixture:
        empty with probability ``1 − presence``, else a sample of the denoiser, which is
        trained on non-empty annotations only.
    readers
        Reader conditioning: the number of annotators whose own styles the network learns
        (0: none). Annotation k of an item is taken as drawn by reader k; an embedding of k
        is added to the timestep embedding, and :meth:`predict` then takes ``reader``
        indices. The sampler spreads its samples evenly over the readers (sample i as reader
        ``i mod readers``), so that N samples hold every reader's style about N/readers
        times, as the N-fold repeated references of GED² and HM-IoU do. It fits data whose
        annotation k is by the same reader in every case (the phantoms, a fixed panel of
        readers); otherwise each index learns a mixture of readers.
    self_condition
        Self-conditioning (Chen et al., "Analog Bits"): the denoiser also takes the previous
        step's ``x̂0`` as ``mask_channels`` extra input channels (zeros at the first step and,
        in training, on half the batches).
    norm_groups
        GroupNorm groups (widths must divide by it).
    output_activation
        ``"sigmoid"`` (Bernoulli) or ``"none"`` (Gaussian ε).
    segmentor
        A refiner conditioned on its segmentor's features (HiDiff): the description of a
        condition-once segmentor (``{"type": "condition_once", ...}``, the same levels and
        ``unshuffle``, ``image_channels − 1`` image channels) held as ``self.segmentor``.
        Its decoder features at every level (fed the image channels only, an all-zero mask,
        t = 0) are projected (1×1, zero-initialised) and added to the image features of that
        level. They depend on the image alone, so any prior p can be refined. Empty: none.
    """

    _what = "network"
    image_size: int = 128
    image_channels: int = 1
    mask_channels: int = 1
    out_channels: int = 1
    model_channels: int = 16
    channel_mult: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    encoder_channels: int = 32
    encoder_blocks: int = 1
    unshuffle: int = 2
    full_res_head: int = 0
    prior_head: bool = False
    presence_head: bool = False
    readers: int = 0
    self_condition: bool = False
    norm_groups: int = 8
    dropout: float = 0.0
    output_activation: str = "sigmoid"
    segmentor: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_mult", tuple(int(m) for m in self.channel_mult))
        object.__setattr__(self, "self_condition", bool(self.self_condition))
        object.__setattr__(self, "prior_head", bool(self.prior_head))
        object.__setattr__(self, "presence_head", bool(self.presence_head))
        if self.output_activation not in ("sigmoid", "none"):
            raise ValueError(f"output_activation must be 'sigmoid' or 'none', "
                             f"got {self.output_activation!r}")
        for w in [self.model_channels * m for m in self.channel_mult] + self.encoder_widths:
            if w % self.norm_groups:
                raise ValueError(f"width {w} is not divisible by norm_groups={self.norm_groups}")
        if int(self.readers) != self.readers or self.readers < 0:
            raise ValueError(f"readers must be a whole number >= 0, got {self.readers!r}")
        object.__setattr__(self, "readers", int(self.readers))
        if self.unshuffle < 1:
            raise ValueError(f"unshuffle must be >= 1, got {self.unshuffle}")
        if self.full_res_head < 0 or (self.full_res_head and self.unshuffle == 1):
            raise ValueError("full_res_head must be 0, or > 0 with unshuffle > 1; "
                             f"got {self.full_res_head} with unshuffle={self.unshuffle}")
        if self.segmentor:
            seg = self.segmentor_config()
            if (len(seg.channel_mult) != len(self.channel_mult) or seg.unshuffle != self.unshuffle
                    or seg.image_channels != self.image_channels - 1 or seg.segmentor):
                raise ValueError("the segmentor must have the refiner's levels and unshuffle, "
                                 "image_channels − 1 image channels and no segmentor itself")
        if self.full_res_head % self.norm_groups:
            raise ValueError(f"full_res_head={self.full_res_head} is not divisible by "
                             f"norm_groups={self.norm_groups}")

    def to_dict(self) -> dict:
        """As :meth:`ConfigMixin.to_dict`, without ``segmentor`` when there is none (so the
        description of a network without one is unchanged)."""
        d = super().to_dict()
        if not d["segmentor"]:
            del d["segmentor"]
        return d

    def segmentor_config(self) -> CondOnceConfig:
        """The config of the segmentor whose features condition this network."""
        d = {k: v for k, v in self.segmentor.items() if k != "type"}
        if self.segmentor.get("type", "condition_once") != "condition_once":
            raise ValueError("the segmentor of a feature-conditioned refiner must be a "
                             "condition_once network")
        return CondOnceConfig.from_dict(d)

    @property
    def encoder_widths(self) -> list[int]:
        return [self.encoder_channels * min(2**i, 4) for i in range(len(self.channel_mult))]

    @property
    def size_multiple(self) -> int:
        """Spatial sizes must be divisible by this."""
        return self.unshuffle * 2 ** (len(self.channel_mult) - 1)


class _ConvBlock(nn.Module):
    """A residual GN-SiLU-conv block without timestep input (for the image encoder)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.body = nn.Sequential(
            normalization(channels, groups), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            normalization(channels, groups), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ConditionOnceNet(nn.Module):
    """Image encoder run once + light per-step denoiser (see the module docstring)."""

    def __init__(self, config: CondOnceConfig):
        super().__init__()
        c = self.config = config
        g, u = c.norm_groups, c.unshuffle
        widths = [c.model_channels * m for m in c.channel_mult]
        enc = c.encoder_widths
        emb_dim = 4 * c.model_channels

        # Image encoder: full-resolution stem, then one stage per denoiser level.
        self.enc_stem = nn.Conv2d(c.image_channels, enc[0], 3, padding=1)
        self.enc_down = nn.ModuleList()
        self.enc_blocks = nn.ModuleList()
        self.cond_proj = nn.ModuleList()
        prev = enc[0]
        for level, w in enumerate(enc):
            stride = u if level == 0 else 2
            self.enc_down.append(
                nn.Conv2d(prev, w, stride + 1 if stride > 1 else 3, stride=stride, padding=1)
                if stride > 1 else nn.Conv2d(prev, w, 3, padding=1)
            )
            self.enc_blocks.append(nn.Sequential(*[_ConvBlock(w, g) for _ in range(c.encoder_blocks)]))
            self.cond_proj.append(nn.Conv2d(w, widths[level], 1))
            prev = w

        # Per-step denoiser.
        self.time_embed = nn.Sequential(
            nn.Linear(c.model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)
        )
        if c.readers:
            self.reader_embed = nn.Embedding(c.readers, emb_dim)
            nn.init.zeros_(self.reader_embed.weight)  # starts as the reader-blind network
        in_masks = c.mask_channels * (2 if c.self_condition else 1) + int(c.prior_head)
        if c.prior_head:
            self.prior_out = nn.Sequential(normalization(enc[0], g), nn.SiLU(),
                                           nn.Conv2d(enc[0], u * u, 3, padding=1))
        self.x_in = nn.Conv2d(in_masks * u * u, widths[0], 3, padding=1)
        if c.presence_head:
            deep = widths[-1]
            self.presence_norm = nn.Sequential(normalization(deep, g), nn.SiLU())
            self.presence_out = nn.Linear(2 * deep, 1)  # mean- and max-pooled features

        def res(cin: int, cout: int) -> ResBlock:
            return ResBlock(cin, emb_dim, c.dropout, cout, use_scale_shift_norm=True,
                            norm_groups=g)

        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for level, w in enumerate(widths):
            self.down.append(nn.ModuleList([res(w, w) for _ in range(c.num_res_blocks)]))
            if level < len(widths) - 1:
                self.downsample.append(nn.Conv2d(w, widths[level + 1], 3, stride=2, padding=1))
        prev = widths[-1]
        self.middle = res(prev, prev)
        self.up = nn.ModuleList()
        for level in reversed(range(len(widths))):
            w = widths[level]
            self.up.append(res(prev + w, w))
            prev = w
        if c.segmentor:
            seg_cfg = c.segmentor_config()
            self.segmentor = ConditionOnceNet(seg_cfg)
            self.seg_proj = nn.ModuleList(
                zero_init(nn.Conv2d(seg_cfg.model_channels * m, w, 1))
                for m, w in zip(seg_cfg.channel_mult, widths))
        hc = c.full_res_head
        if hc:
            self.head_cond = nn.Conv2d(enc[0], hc, 1)
            self.head_up = nn.Sequential(normalization(prev, g), nn.SiLU(),
                                         nn.Conv2d(prev, hc * u * u, 1))
            self.head_in = nn.Conv2d(hc + in_masks, hc, 3, padding=1)
            self.head_block = _ConvBlock(hc, g)
            self.out = nn.Sequential(normalization(hc, g), nn.SiLU(),
                                     zero_init(nn.Conv2d(hc, c.out_channels, 3, padding=1)))
        else:
            self.out = nn.Sequential(
                normalization(prev, g), nn.SiLU(),
                zero_init(nn.Conv2d(prev, c.out_channels * u * u, 3, padding=1)),
            )

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check(self, x: torch.Tensor, what: str, channels: int) -> None:
        m = self.config.size_multiple
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"{what} must be (N, {channels}, H, W); got {tuple(x.shape)}")
        if x.shape[2] % m or x.shape[3] % m:
            raise ValueError(
                f"spatial size {x.shape[2]}×{x.shape[3]} must be divisible by {m} for this network"
            )

    def encode(self, image: torch.Tensor,
               segmentor_features: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Image features for every denoiser level, already projected to its width; then,
        with a full-resolution head, the head's full-resolution features, and with a prior
        head, the prior probability map (N, 1, H, W) last.

        A network with a ``segmentor`` adds the segmentor's projected decoder features to
        every level: ``segmentor_features`` (finest first, from :meth:`segment_with_features`)
        or, when None, the segmentor run here on the image channels (all but the last)."""
        if image.ndim == 3:
            image = image.unsqueeze(0)
        self._check(image, "image", self.config.image_channels)
        h = stem = self.enc_stem(image.to(self.enc_stem.weight.dtype))
        feats = []
        for down, blocks in zip(self.enc_down, self.enc_blocks):
            h = blocks(down(h))
            feats.append(h)
        out = [proj(f) for proj, f in zip(self.cond_proj, feats)]
        if self.config.segmentor:
            if segmentor_features is None:
                _, segmentor_features = self.segmentor.segment_with_features(image[:, :-1])
            out = [o + proj(f.to(o.dtype))
                   for o, proj, f in zip(out, self.seg_proj, segmentor_features)]
        elif segmentor_features is not None:
            raise ValueError("this network has no segmentor; it takes no segmentor_features")
        if self.config.full_res_head:
            out.append(self.head_cond(stem))
        if self.config.prior_head:
            logits = self.prior_out(feats[0])
            u = self.config.unshuffle
            out.append(torch.sigmoid(F.pixel_shuffle(logits, u) if u > 1 else logits))
        return out

    def predict(self, x_t: torch.Tensor, t: torch.Tensor | int, cond: list[torch.Tensor],
                x0_prev: torch.Tensor | None = None, *,
                reader: torch.Tensor | int | None = None,
                features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """One denoiser pass with the cached condition (a batch of 1 is broadcast).

        ``features``, when a list is given, receives the decoder's output at every level,
        finest first.

        ``x0_prev`` is the previous ``x̂0`` for a self-conditioned network (zeros when None);
        other networks take none. ``reader`` is the reader index of each sample (N,), or
        one for all, for a reader-conditioned network (see ``readers``); others take none.
        """
        c = self.config
        self._check(x_t, "x_t", c.mask_channels)
        n = x_t.shape[0]
        ts = torch.as_tensor(t, device=x_t.device).reshape(-1)
        ts = ts.expand(n) if ts.numel() == 1 else ts
        emb = self.time_embed(timestep_embedding(ts, c.model_channels).to(x_t.dtype))
        if c.readers:
            r = self._reader_indices(reader, n, x_t.device)
            emb = emb + self.reader_embed(r).to(emb.dtype)
        elif reader is not None:
            raise ValueError("this network is not reader-conditioned (readers=0); "
                             "it takes no reader")
        x_in = x_t
        if c.self_condition:
            if x0_prev is None:
                x0_prev = torch.zeros_like(x_t)
            elif x0_prev.shape != x_t.shape:
                raise ValueError(f"x0_prev must have x_t's shape {tuple(x_t.shape)}; "
                                 f"got {tuple(x0_prev.shape)}")
            x_in = torch.cat([x_t, x0_prev.to(x_t.dtype)], 1)
        elif x0_prev is not None:
            raise ValueError("this network is not self-conditioned (self_condition=False); "
                             "it takes no x0_prev")
        if c.prior_head:
            prior = cond[-1].detach().expand(n, -1, -1, -1).to(x_t.dtype)
            x_in = torch.cat([x_in, prior], 1)
        h = self.x_in(F.pixel_unshuffle(x_in, c.unshuffle) if c.unshuffle > 1 else x_in)
        skips = []
        for level, blocks in enumerate(self.down):
            if level > 0:
                h = self.downsample[level - 1](h)
            h = h + cond[level]  # broadcasts a batch-1 condition over the N samples
            for block in blocks:
                h = block(h, emb)
            skips.append(h)
        h = self.middle(h, emb)
        for i, block in enumerate(self.up):
            if i > 0:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
            h = block(torch.cat([h, skips.pop()], 1), emb)
            if features is not None:
                features.insert(0, h)
        if c.full_res_head:
            h = F.pixel_shuffle(self.head_up(h), c.unshuffle) + cond[len(self.down)]
            out = self.out(self.head_block(self.head_in(torch.cat([h, x_in], 1))))
        else:
            out = self.out(h)
            if c.unshuffle > 1:
                out = F.pixel_shuffle(out, c.unshuffle)
        return torch.sigmoid(out) if c.output_activation == "sigmoid" else out

    def _reader_indices(self, reader: torch.Tensor | int | None, n: int,
                        device: torch.device) -> torch.Tensor:
        """``reader`` as (n,) long indices, checked against the network's reader count."""
        r_count = self.config.readers
        if reader is None:
            raise ValueError(f"this network is reader-conditioned (readers={r_count}); give "
                             f"the reader index of each sample, 0..{r_count - 1}")
        r = torch.as_tensor(reader, device=device).reshape(-1).long()
        r = r.expand(n) if r.numel() == 1 else r
        if r.numel() != n:
            raise ValueError(f"reader must hold one index or one per sample ({n}); "
                             f"got {r.numel()}")
        if bool(((r < 0) | (r >= r_count)).any()):
            raise ValueError(f"reader indices must lie in 0..{r_count - 1}; "
                             f"got {sorted(set(r.tolist()))}")
        return r

    def segment_with_features(self, image: torch.Tensor
                              ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """This network used as a segmentor (an all-zero mask, t = 0): its output (N, 1, H, W)
        and its decoder features at every level, finest first."""
        if image.ndim == 3:
            image = image.unsqueeze(0)
        zeros = torch.zeros(image.shape[0], self.config.mask_channels, *image.shape[2:],
                            dtype=image.dtype, device=image.device)
        feats: list[torch.Tensor] = []
        t = torch.zeros(image.shape[0], dtype=torch.long, device=image.device)
        out = self.predict(zeros, t, self.encode(image), features=feats)
        return out, feats

    @property
    def has_segmentor(self) -> bool:
        """Whether the network is conditioned on a segmentor's features (``segmentor``)."""
        return bool(self.config.segmentor)

    @property
    def n_readers(self) -> int:
        """The number of readers the network is conditioned on (0: none; see ``readers``)."""
        return self.config.readers

    @property
    def self_conditioned(self) -> bool:
        """Whether :meth:`predict` takes the previous ``x̂0`` (see ``self_condition``)."""
        return self.config.self_condition

    @property
    def has_prior_head(self) -> bool:
        """Whether :meth:`encode` also gives a prior probability map (see ``prior_head``)."""
        return self.config.prior_head

    @property
    def has_presence_head(self) -> bool:
        """Whether :meth:`presence` is available (see ``presence_head``)."""
        return self.config.presence_head

    def presence(self, cond: list[torch.Tensor]) -> torch.Tensor:
        """Logit (N,) of the probability that an annotation of the image is not empty, from
        :meth:`encode`'s deepest features (a network with a presence head only)."""
        if not self.config.presence_head:
            raise ValueError("this network has no presence head (presence_head=False)")
        h = self.presence_norm(cond[len(self.down) - 1])
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], 1)
        return self.presence_out(pooled).squeeze(1)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor | int, image: torch.Tensor,
                x0_prev: torch.Tensor | None = None, return_prior: bool = False,
                return_presence: bool = False, reader: torch.Tensor | int | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """``predict(x_t, t, encode(image), x0_prev, reader=reader)``. With ``return_prior``
        also the prior probability map, with ``return_presence`` also the presence logit
        (N,), in that order, for their training losses (networks with those heads only)."""
        cond = self.encode(image)
        out = self.predict(x_t, t, cond, x0_prev, reader=reader)
        if not (return_prior or return_presence):
            return out
        extras = []
        if return_prior:
            if not self.config.prior_head:
                raise ValueError("this network has no prior head (prior_head=False)")
            extras.append(cond[-1])
        if return_presence:
            extras.append(self.presence(cond))
        return (out, *extras)

    def encode_bytes(self, h: int, w: int) -> int:
        """Rough float32 peak memory of :meth:`encode` on one (h, w) image: the stem's
        full-resolution features (kept to the end), the first level's working set (about
        three maps), the kept projections of every level and the heads' full-resolution
        maps. Checked against the resident-memory growth of real runs (BENCHMARKS)."""
        c = self.config
        enc0, u2 = c.encoder_widths[0], c.unshuffle**2
        total = enc0 * h * w + 3 * enc0 * h * w / u2
        for level, m in enumerate(c.channel_mult):
            total += c.model_channels * m * h * w / u2 / 4**level
        total += (c.full_res_head + 2 * int(c.prior_head)) * h * w
        extra = 0
        if c.segmentor:  # the segmentor's encoding and its one decoder pass
            seg = self.segmentor
            extra = seg.encode_bytes(h, w) + seg.activation_bytes(h, w)
        return int(4 * total) + extra

    def activation_bytes(self, h: int, w: int) -> int:
        """Rough float32 activation memory of one sample's denoiser pass (for chunking)."""
        c = self.config
        total = 0.0
        for level, m in enumerate(c.channel_mult):
            pix = (h / c.unshuffle / 2**level) * (w / c.unshuffle / 2**level)
            total += 6 * c.model_channels * m * pix
        total += 5 * c.full_res_head * h * w
        return int(4 * total)
