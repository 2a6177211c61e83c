"""The model object: a network, its diffusion kernel and its metadata, ready to sample.

``napari_berdiff.load_model`` returns a :class:`DiffusionModel`; so do the presets.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .diffusion import DiffusionConfig, SampleResult, SampleStream, make_kernel, run_to_end
from .diffusion.device import select_device
from .diffusion.sampler import (
    DEFAULT_MEMORY_BUDGET_MB,
    CancelLike,
    Roi,
    check_roi,
    sample_stream,
)
from .diffusion.volume import DEFAULT_MAX_SLICES, SliceStream
from .lazy import LazySequence

FORMAT = "napari-berdiff/1"
KINDS = ("bernoulli", "gaussian", "refiner", "segmentor", "cdal")


def normalise_image(image: np.ndarray, spec: dict[str, Any] | None) -> np.ndarray:
    """Apply a model's intensity normalisation to a (C, H, W) float image, per channel.

    ``spec["mode"]`` is ``"minmax"`` (to [0, 1]; the default), ``"unit"`` (integer images
    divided by their type's maximum, as the official code reads 8-bit PNGs; float images
    already in [0, 1] kept; others min-max scaled), ``"fixed"`` (clip to ``[min, max]`` then
    scale to [0, 1]), ``"zscore"``, ``"standardise"`` (``(x − mean)/std`` with fixed
    per-channel ``mean`` and ``std`` lists, as cDAL's MoNuSeg model) or ``"none"``. An optional
    ``spec["range"] = [lo, hi]`` maps the [0, 1] result of the first four modes onto
    ``[lo, hi]`` (cDAL's images are in [-1, 1]).
    """
    spec = spec or {"mode": "minmax"}
    lo_hi = spec.get("range")
    if lo_hi is not None:
        lo, hi = (float(v) for v in lo_hi)
        inner = normalise_image(image, {k: v for k, v in spec.items() if k != "range"})
        return (lo + (hi - lo) * inner).astype(np.float32)
    mode = spec.get("mode", "minmax")
    raw = np.asarray(image)
    img = raw.astype(np.float32)
    if mode == "none":
        return img
    if mode == "unit":
        if np.issubdtype(raw.dtype, np.integer) and raw.dtype != np.int64:
            return img / np.float32(np.iinfo(raw.dtype).max)
        if img.size and img.min() >= 0 and img.max() <= 1:
            return img
        mode = "minmax"
    axes = tuple(range(1, img.ndim))
    if mode == "minmax":
        lo = img.min(axis=axes, keepdims=True)
        hi = img.max(axis=axes, keepdims=True)
        return ((img - lo) / np.where(hi > lo, hi - lo, 1.0)).astype(np.float32)
    if mode == "fixed":
        lo, hi = float(spec["min"]), float(spec["max"])
        if not (np.isfinite(hi - lo) and hi > lo):
            raise ValueError(
                f"the model's fixed intensity normalisation is broken: min={lo}, max={hi} "
                "(it needs finite min < max). The checkpoint's data.normalisation is at "
                "fault, not the image; use an unmodified checkpoint"
            )
        return ((np.clip(img, lo, hi) - lo) / (hi - lo)).astype(np.float32)
    if mode == "standardise":
        shape = (-1,) + (1,) * (img.ndim - 1)
        mean = np.asarray(spec["mean"], np.float32).reshape(shape)
        std = np.asarray(spec["std"], np.float32).reshape(shape)
        return ((img - mean) / std).astype(np.float32)
    if mode == "zscore":
        mu = img.mean(axis=axes, keepdims=True)
        sd = img.std(axis=axes, keepdims=True)
        return ((img - mu) / np.where(sd > 0, sd, 1.0)).astype(np.float32)
    raise ValueError(f"unknown intensity normalisation {mode!r}")


#: The largest magnitude float32 holds; the network computes in float32.
FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_real_image(image: np.ndarray) -> np.ndarray:
    """``image`` as an array of real numbers that float32 can hold, else a ``ValueError``
    that says what is wrong with it (its type, its size or its range), before any conversion
    could drop an imaginary part or turn large values into infinities."""
    arr = np.asarray(image)
    if np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"the image holds complex numbers (dtype {arr.dtype}); give its "
                         "magnitude or real part explicitly (e.g. np.abs(image))")
    if arr.dtype != bool and not np.issubdtype(arr.dtype, np.number):
        raise ValueError(f"the image must hold real numbers, got dtype {arr.dtype}")
    if arr.size == 0:
        raise ValueError(f"the image is empty: shape {tuple(arr.shape)}")
    if np.issubdtype(arr.dtype, np.floating) and arr.dtype.itemsize > 4:
        finite = arr[np.isfinite(arr)]
        peak = float(np.abs(finite).max()) if finite.size else 0.0
        if peak > FLOAT32_MAX:
            raise ValueError(
                f"the image's values reach {peak:.3g} in magnitude, beyond the float32 range "
                f"the network computes in (about {FLOAT32_MAX:.3g}); rescale the image "
                "(e.g. to its physical units) before sampling"
            )
    return arr


def _valid_box(roi: Roi | None, shape: tuple[int, ...]) -> Roi | None:
    """``roi`` when it is a valid box of ``shape`` (else None: the sampler reports it)."""
    if roi is None:
        return None
    try:
        return check_roi(roi, tuple(shape))
    except (TypeError, ValueError):
        return None


class DiffusionModel:
    """A diffusion segmentation model.

    Parameters
    ----------
    net
        The torch module (``encode``/``predict``/``forward``).
    diffusion
        Its :class:`DiffusionConfig`.
    metadata
        The checkpoint metadata (DESIGN §5): ``kind``, ``network``, ``data``,
        ``training``, ``metrics`` …
    """

    #: the checkpoint file the model was loaded from ("" when built in memory)
    source_path: str = ""
    #: the inference backend sampling runs on (see :meth:`use_backend`)
    backend: str = "eager"
    _inference: Any = None

    def __init__(self, net: torch.nn.Module, diffusion: DiffusionConfig,
                 metadata: dict[str, Any] | None = None):
        self.net = net.eval()
        self.diffusion = diffusion
        self.kernel = make_kernel(diffusion)
        self.metadata = copy.deepcopy(metadata or {})
        self.metadata.setdefault("format", FORMAT)
        self.metadata.setdefault("kind", diffusion.kind)
        self.metadata["diffusion"] = diffusion.to_dict()
        if "network" not in self.metadata:
            from .networks import network_to_metadata

            self.metadata["network"] = network_to_metadata(net)
        self.device = next(net.parameters()).device

    # ------------------------------------------------------------------ properties
    @property
    def kind(self) -> str:
        return self.metadata["kind"]

    @property
    def name(self) -> str:
        return self.metadata.get("name", "")

    @property
    def data(self) -> dict[str, Any]:
        return self.metadata.get("data", {})

    @property
    def network_channels(self) -> int:
        """Condition channels the network takes (image channels, plus the prior for a refiner)."""
        return int(self.net.config.image_channels)

    @property
    def image_channels(self) -> int:
        """Channels of the image a user supplies."""
        return self.network_channels - (1 if self.kind == "refiner" else 0)

    @property
    def n_readers(self) -> int:
        """Readers a reader-conditioned network draws its samples as, in turn (0: none)."""
        return int(getattr(self.net, "n_readers", 0))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.net.parameters())

    # ------------------------------------------------------------------ device
    def to(self, device: str | torch.device | None = "auto",
           channels_last: bool | None = None) -> "DiffusionModel":
        """Move to a device (``"auto"`` picks cuda, then mps, then cpu).

        ``channels_last`` defaults to True on the CPU, where it is measured to be faster.
        """
        dev = select_device(device)
        if channels_last is None:
            channels_last = dev.type == "cpu"
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.net.to(device=dev, memory_format=fmt)
        self.device = dev
        if self.backend != "eager":  # graphs are built for a device: build them anew
            self.use_backend(self.backend)
        return self

    def use_backend(self, backend: str = "eager") -> "DiffusionModel":
        """Sample with an inference backend (any of ``backends.BACKENDS``;
        see :mod:`napari_berdiff.backends`). ``.net`` stays the torch module.

        Raises
        ------
        ValueError, napari_berdiff.backends.BackendUnavailable
            For an unknown backend, one the device cannot run, or one whose packages are
            missing (with what to install).
        """
        from .backends import wrap_network

        self._inference = wrap_network(self.net, backend)
        self.backend = backend
        return self

    @property
    def inference_net(self) -> Any:
        """What the sampler calls: the network on the chosen backend."""
        return self.net if self._inference is None else self._inference

    # ------------------------------------------------------------------ sampling
    @property
    def window(self) -> dict[str, Any] | None:
        """The intensity window the model was trained in (see :mod:`..windowing`), or None."""
        from .windowing import model_window

        return model_window(self.metadata)

    def prepare(self, image: np.ndarray, prior: np.ndarray | None = None,
                normalise: bool = True, roi: Roi | None = None,
                units: str | None = None) -> np.ndarray:
        """Normalise an image to what the network takes, as float32 (C, H, W).

        An image in the units of the model's window (``units="HU"`` for CT in Hounsfield
        units) is windowed to [0, 1] instead of normalised (:attr:`window`).

        With a region of interest, the normalisation's statistics (min-max, z-score) come
        from the region alone, the way the model saw its training crops and the way the
        plugin's widgets crop before normalising; pixels outside the region are not used.
        For a refiner the prior map is appended as the last condition channel.
        """
        img = check_real_image(image)
        if img.ndim == 2:
            img = img[None]
        finite = not np.issubdtype(img.dtype, np.floating) or np.isfinite(img).all()
        window = self.window if (normalise and units) else None
        if window is not None and window["units"] == units and finite:
            from .windowing import apply_window

            img = apply_window(img, window)
        elif normalise and img.ndim == 3 and finite:
            spec = self.data.get("normalisation")
            box = _valid_box(roi, img.shape[1:])
            if box is None:
                img = normalise_image(img, spec)
            else:
                y0, x0, y1, x1 = box
                out = np.zeros(img.shape, np.float32)
                out[:, y0:y1, x0:x1] = normalise_image(img[:, y0:y1, x0:x1], spec)
                img = out
        img = img.astype(np.float32, copy=False)
        if self.kind == "refiner":
            if prior is None:
                raise ValueError("a refiner needs a prior mask or probability map to refine")
            pr = np.asarray(prior, dtype=np.float32)
            if pr.shape != img.shape[1:]:
                raise ValueError(
                    f"the prior's shape {pr.shape} does not match the image's {img.shape[1:]}"
                )
            img = np.concatenate([img, pr[None]], 0)
        return img

    def sample(
        self,
        image: np.ndarray,
        n: int = 16,
        steps: int | str | None = None,
        seed: int = 0,
        *,
        prior: np.ndarray | None = None,
        roi: Roi | None = None,
        cancel: CancelLike = None,
        max_batch: int | None = None,
        memory_budget_mb: float | None = DEFAULT_MEMORY_BUDGET_MB,
        normalise: bool = True,
        draw_correlation: float | None = None,
        temperature: float | None = None,
        units: str | None = None,
        constraints: np.ndarray | None = None,
    ) -> SampleStream:
        """Stream ``n`` samples for ``image``: an iterator of :class:`Frame`, one per step,
        whose ``.result`` is the :class:`SampleResult` once it is exhausted.

        See :func:`napari_berdiff.diffusion.sample_stream` for the arguments. The image
        is normalised the way the model's metadata says unless ``normalise=False``.
        ``draw_correlation`` and ``temperature`` override the model's (Bernoulli only; see
        :class:`~napari_berdiff.diffusion.DiffusionConfig`); None keeps them. ``units``:
        the image's intensity units ("HU"), which select the model's window when it has one.
        ``constraints`` (−1 free, 0 never, 1 keep) clamps pixels in every sample.
        """
        kernel = self._sampling_kernel(draw_correlation, temperature)
        cond = self.prepare(image, prior, normalise, roi, units)
        start_prior = prior if self.kind == "refiner" else None
        return sample_stream(
            self.inference_net, kernel, cond, n=n, steps=steps, seed=seed, prior=start_prior,
            roi=roi, constraints=constraints, device=self.device, max_batch=max_batch,
            memory_budget_mb=memory_budget_mb, cancel=cancel,
            image_channels=self.network_channels,
        )

    def _sampling_kernel(self, draw_correlation: float | None, temperature: float | None
                         ) -> Any:
        """The model's kernel, or one with the given Bernoulli overrides."""
        if self.kind == "segmentor":
            raise ValueError("a segmentor is not a diffusion model and cannot be sampled")
        changes = {k: float(v) for k, v in (("draw_correlation", draw_correlation),
                                            ("temperature", temperature))
                   if v is not None and v != getattr(self.diffusion, k)}
        return make_kernel(self.diffusion.replace(**changes)) if changes else self.kernel

    def sample_slices(
        self,
        images: Sequence[np.ndarray],
        n: int = 16,
        steps: int | str | None = None,
        seeds: Sequence[int] = (),
        *,
        priors: Sequence[np.ndarray | None] | None = None,
        roi: Roi | None = None,
        cancel: CancelLike = None,
        max_batch: int | None = None,
        memory_budget_mb: float | None = DEFAULT_MEMORY_BUDGET_MB,
        max_slices: int = DEFAULT_MAX_SLICES,
        max_rows: int | str | None = "auto",
        first_alone: bool = True,
        normalise: bool = True,
        draw_correlation: float | None = None,
        temperature: float | None = None,
        units: str | None = None,
        constraints: Sequence[np.ndarray | None] | None = None,
    ) -> SliceStream:
        """Stream ``n`` samples of each of a volume's slices, several slices per network
        call (:func:`napari_berdiff.diffusion.volume.sample_slices`): slice ``i`` gets the
        samples ``sample(images[i], n, steps, seeds[i], ...)`` gives. Each slice is
        normalised by itself, as :meth:`sample` does; ``priors`` and ``constraints`` hold
        one entry per slice (or are None). ``images`` and ``priors`` may be lazy sequences:
        a slice is read and prepared only when its batch starts.
        """
        from .diffusion.volume import sample_slices

        kernel = self._sampling_kernel(draw_correlation, temperature)
        count = len(images)
        prior_of = [None] * count if priors is None else priors
        if len(prior_of) != count:
            raise ValueError(f"priors must hold one entry per slice ({count}); "
                             f"got {len(prior_of)}")
        # each slice is prepared when its batch starts, so the first frame does not wait
        # for the whole volume (DESIGN §8)
        conds = LazySequence(lambda i: self.prepare(images[i], prior_of[i], normalise, roi,
                                                    units), count)
        starts = prior_of if self.kind == "refiner" else None
        return sample_slices(
            self.net, kernel, conds, seeds=list(seeds), n=n, steps=steps, priors=starts,
            roi=roi, constraints=constraints, device=self.device, max_batch=max_batch,
            memory_budget_mb=memory_budget_mb, max_slices=max_slices, max_rows=max_rows,
            first_alone=first_alone, cancel=cancel, image_channels=self.network_channels,
        )

    def input_notice(self, image: np.ndarray, roi: Roi | None = None,
                     spacing: float | tuple[float, ...] | None = None) -> str | None:
        """A sentence saying why results on ``image`` are unlikely to be meaningful (another
        modality, window or scale than the training data), or None.

        ``image`` is what :meth:`sample` takes (the region ``roi`` of it is what is
        compared); ``spacing`` is its pixel spacing in mm when known. Sampling is never
        refused: this is a notice (see :mod:`napari_berdiff.distribution`).
        """
        from .distribution import check_input

        img = np.asarray(image)
        if img.ndim == 2:
            img = img[None]
        if img.ndim != 3 or img.shape[0] != self.image_channels or not img.size:
            return None
        box = _valid_box(roi, img.shape[1:])
        if box is not None:
            y0, x0, y1, x1 = box
            img = img[:, y0:y1, x0:x1]
        if np.issubdtype(img.dtype, np.floating) and not np.isfinite(img).all():
            return None
        norm = normalise_image(img, self.data.get("normalisation"))
        return check_input(self.data, norm, spacing)

    def segment(self, image: np.ndarray, normalise: bool = True) -> np.ndarray:
        """A segmentor's probability map, (H, W) float32, for a (C,) H, W image.

        The network is fed an all-zero mask at t = 0 (how our segmentors are trained); any
        size works (padded to the network's size multiple, cropped back).
        """
        if self.kind != "segmentor":
            raise ValueError(f"segment() needs a segmentor; this model is a {self.kind} model "
                             "(use sample() instead)")
        x = self.prepare(image, normalise=normalise)
        h, w = x.shape[1:]
        m = int(getattr(self.net.config, "size_multiple", 1) or 1)
        x = np.pad(x, ((0, 0), (0, (-h) % m), (0, (-w) % m)), mode="edge")
        with torch.inference_mode():
            xt = torch.from_numpy(np.ascontiguousarray(x))[None].to(self.device)
            zeros = torch.zeros(1, 1, *xt.shape[2:], dtype=xt.dtype, device=self.device)
            t = torch.zeros(1, dtype=torch.long, device=self.device)
            prob = self.net(zeros, t, xt)[0, 0, :h, :w]
        return prob.float().cpu().numpy()

    def sample_all(self, image: np.ndarray, n: int = 16, steps: int | str | None = None,
                   seed: int = 0, **kwargs: Any) -> SampleResult:
        """Run :meth:`sample` to the end and return its :class:`SampleResult`."""
        return run_to_end(self.sample(image, n, steps, seed, **kwargs))

    # ------------------------------------------------------------------ description
    def summary(self) -> dict[str, Any]:
        """A short description for people: kind, size, data, metrics."""
        net = self.metadata.get("network", {})
        return {
            "name": self.name,
            "kind": self.kind,
            "parameters": self.num_parameters(),
            "network": net.get("type", type(self.net).__name__),
            "diffusion": self.diffusion.to_dict(),
            "data": self.data.get("description", ""),
            "metrics": self.metadata.get("metrics", {}),
            "device": str(self.device),
        }

    def __repr__(self) -> str:
        return (f"DiffusionModel(kind={self.kind!r}, name={self.name!r}, "
                f"parameters={self.num_parameters():,}, device={self.device})")


def model_from_preset(preset: str, device: str | torch.device = "cpu",
                      seed: int | None = 0) -> DiffusionModel:
    """A freshly initialised model with a preset's architecture and settings."""
    from .model_presets import get_model_preset
    from .networks import build_network

    p = get_model_preset(preset)
    if seed is not None:
        torch.manual_seed(seed)
    net = build_network(p.network)
    meta = {"kind": p.kind, "name": p.name, "preset": p.name, "data": dict(p.data)}
    return DiffusionModel(net, p.diffusion, meta).to(device, channels_last=False)
