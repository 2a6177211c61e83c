"""From the panels' choices to a validated sampling job, or a clear message saying why not.

No Qt here (only napari layer objects are read), so every rule is easy to test. Bad input
raises :class:`InputProblem`, whose message the widget shows as an error notification;
soft problems (an image far from the training size) come back as warnings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: Without a known training size, images larger than this (in pixels, either side) need a region.
DEFAULT_MAX_WHOLE = 256

MODE_2D, MODE_SLICE, MODE_VOLUME = "2d", "slice", "volume"


class InputProblem(ValueError):
    """Bad input; the message is written for the user and shown as a notification."""


@dataclass(frozen=True)
class Placement:
    """Where a run's results sit in the full image.

    ``spatial_shape`` is the image's spatial shape, (H, W) or (Z, H, W); ``roi`` is
    ``(y0, x0, y1, x1)`` in pixels; ``z`` the slice for ``mode == "slice"``. ``scale`` and
    ``translate`` are the image layer's world transform of those spatial axes.
    """

    mode: str
    spatial_shape: tuple[int, ...]
    roi: tuple[int, int, int, int]
    z: int | None = None
    scale: tuple[float, ...] = ()
    translate: tuple[float, ...] = ()

    @property
    def hw(self) -> tuple[int, int]:
        y0, x0, y1, x1 = self.roi
        return (y1 - y0, x1 - x0)

    @property
    def result_shape(self) -> tuple[int, ...]:
        """Shape of one result map: (h, w), (1, h, w) for a slice, (Z, h, w) for a volume."""
        if self.mode == MODE_2D:
            return self.hw
        if self.mode == MODE_SLICE:
            return (1, *self.hw)
        return (self.spatial_shape[0], *self.hw)

    @property
    def n_slices(self) -> int:
        return self.spatial_shape[0] if self.mode == MODE_VOLUME else 1

    @property
    def start(self) -> tuple[int, ...]:
        y0, x0, _, _ = self.roi
        if self.mode == MODE_2D:
            return (y0, x0)
        return (self.z if self.mode == MODE_SLICE else 0, y0, x0)

    @property
    def region(self) -> tuple[slice, ...]:
        """Index of the results' footprint in an array of the image's spatial shape."""
        return tuple(slice(s, s + n) for s, n in zip(self.start, self.result_shape))

    def transform(self, leading: int = 0) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """``(scale, translate)`` for a result array with ``leading`` extra leading axes."""
        sc = tuple(self.scale) or (1.0,) * len(self.start)
        tr = tuple(self.translate) or (0.0,) * len(self.start)
        spatial_t = tuple(t + s * k for t, s, k in zip(tr, sc, self.start))
        return (1.0,) * leading + sc, (0.0,) * leading + spatial_t

    def describe(self) -> str:
        y0, x0, y1, x1 = self.roi
        where = f"rows {y0}–{y1 - 1}, cols {x0}–{x1 - 1}"
        if self.mode == MODE_SLICE:
            return f"slice {self.z}, {where}"
        if self.mode == MODE_VOLUME:
            return f"all {self.spatial_shape[0]} slices, {where}"
        return where


@dataclass
class PreparedInput:
    """What the worker needs: one (C, h, w) float32 crop per slice, with its seed offset."""

    placement: Placement
    crops: list[np.ndarray]
    seed_offsets: list[int]
    warnings: list[str] = field(default_factory=list)
    #: a refiner's prior map per crop (set by the Mask refiner widget), else None
    priors: list[np.ndarray] | None = None
    #: the refiner's hard constraints per crop (−1 free, 0 never, 1 keep), else None
    constraints: list[np.ndarray | None] | None = None
    #: the image's intensity units ("HU" for CT from DICOM), which select the model's window
    units: str | None = None
    #: the image layer's geometry metadata (NIfTI / DICOM), inherited by the layers made over it
    geometry: dict[str, Any] = field(default_factory=dict)


def training_size(model: Any) -> int | None:
    """The image size a model was trained on, when it says."""
    size = (getattr(model, "data", None) or {}).get("image_size")
    if size is None:
        cfg = getattr(getattr(model, "net", None), "config", None)
        size = getattr(cfg, "image_size", None)
    try:
        return int(size) if size else None
    except (TypeError, ValueError):
        return None


def _image_axes(layer: Any, channels: int) -> tuple[tuple[int, ...], bool]:
    """(spatial shape, has a leading channel axis) of an image layer, or an InputProblem."""
    shape = tuple(int(s) for s in layer.data.shape)
    name = layer.name
    if getattr(layer, "rgb", False):
        raise InputProblem(
            f"'{name}' is an RGB(A) colour image; the model takes {channels} grey channel(s). "
            "Convert it first (right-click the layer ▸ Split RGB, then pick one channel)."
        )
    if getattr(layer, "multiscale", False):
        raise InputProblem(
            f"'{name}' is a multiscale (pyramid) image, which is not supported yet. "
            "Open its full-resolution level as a plain image layer."
        )
    if channels == 1:
        if len(shape) == 2:
            return shape, False
        if len(shape) == 3:
            return shape, False  # a volume (Z, H, W)
        raise InputProblem(
            f"'{name}' has {len(shape)} dimensions {shape}; the model takes a 2D image "
            "(H, W) or a volume (Z, H, W) with 1 channel."
        )
    if len(shape) == 3 and shape[0] == channels:
        return shape[1:], True
    have = shape[0] if len(shape) == 3 else 1
    raise InputProblem(
        f"The model takes {channels} image channels, but '{name}' has {have} "
        f"(shape {shape}). Give a ({channels}, H, W) image with the channels on the first axis."
    )


def current_z(viewer: Any, layer: Any) -> int:
    """The slice of a (Z, H, W) layer that the viewer currently shows."""
    data_pt = layer.world_to_data(np.asarray(viewer.dims.point))
    z = int(round(float(data_pt[-3])))
    return int(np.clip(z, 0, layer.data.shape[-3] - 1))


def region_from_shapes(shapes: Any, image: Any, hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """The pixel box ``(y0, x0, y1, x1)`` of a Shapes layer's selected (else last) shape.

    The box covers the image pixels whose centres lie inside the shape's bounding box;
    coordinates go through world space, so scaled or translated layers line up.
    """
    if len(shapes.data) == 0:
        raise InputProblem(
            f"The Shapes layer '{shapes.name}' has no shape. Draw a rectangle around the "
            "region (select the layer, press R and drag), or choose 'Whole image'."
        )
    selected = sorted(getattr(shapes, "selected_data", set()) or [])
    verts = np.asarray(shapes.data[selected[-1] if selected else -1], dtype=float)
    pts = []
    for v in verts:
        world = shapes.data_to_world(v)
        pts.append(np.asarray(image.world_to_data(world), dtype=float)[-2:])
    pts = np.asarray(pts)
    lo, hi = pts.min(0), pts.max(0)
    h, w = hw
    y0 = max(0, math.ceil(lo[0]))
    x0 = max(0, math.ceil(lo[1]))
    y1 = min(h, math.ceil(hi[0]))
    x1 = min(w, math.ceil(hi[1]))
    if y1 <= y0 or x1 <= x0:
        raise InputProblem(
            f"The region drawn in '{shapes.name}' does not cover any pixel of "
            f"'{image.name}' ({h}×{w}). Draw the rectangle over the image."
        )
    return (y0, x0, y1, x1)


def prepare_input(
    viewer: Any,
    model: Any,
    image: Any,
    region: Any | None,
    volume_mode: str = MODE_SLICE,
    refiner: bool = False,
) -> PreparedInput:
    """Validate the choices and cut the crops to sample.

    Parameters
    ----------
    model
        The loaded model (``None`` when none is).
    image
        The chosen napari Image layer, or ``None``.
    region
        A Shapes layer holding the region of interest, or ``None`` for the whole image.
    volume_mode
        ``"slice"`` (the current slice) or ``"volume"`` (all slices), for 3D layers.
    refiner
        Whether the run refines a prior mask (the Mask refiner widget): the model must
        then be a mask refiner, which plain sampling refuses.
    """
    if model is None:
        raise InputProblem(
            "No model is loaded. Choose one under Model and press Load, "
            "or use 'Open checkpoint…'."
        )
    kind = getattr(model, "kind", "bernoulli")
    if refiner and kind != "refiner":
        raise InputProblem(
            f"This is a {kind} model, not a mask refiner. Load a refiner here (for example "
            "refiner-phantom-64), or sample with it in the 'Diffusion segmentation' widget."
        )
    if kind == "refiner" and not refiner:
        raise InputProblem(
            "This model is a mask refiner: it refines a mask you give it. Use the "
            "'Mask refiner' widget, or load a BerDiff / Wolleb sampling model here."
        )
    if kind == "segmentor":
        raise InputProblem(
            "This model is a deterministic segmentor, not a diffusion model: it cannot "
            "draw samples. Load a BerDiff / Wolleb sampling model here."
        )
    if image is None:
        raise InputProblem(
            "There is no image layer to sample. Open an image (File ▸ Open, or "
            "File ▸ Open Sample ▸ napari-berdiff ▸ Phantom lesion with annotators) "
            "and pick it under Image."
        )
    channels = int(getattr(model, "image_channels", 1))
    spatial, has_channels = _image_axes(image, channels)
    dtype = np.dtype(image.data.dtype)
    if dtype.kind not in "biuf":
        raise InputProblem(f"'{image.name}' holds {dtype} values; the model needs real numbers.")
    hw = spatial[-2:]
    warnings: list[str] = []
    size = training_size(model)

    if region is not None:
        roi = region_from_shapes(region, image, hw)
    else:
        roi = (0, 0, hw[0], hw[1])
        limit = 2 * size if size else DEFAULT_MAX_WHOLE
        if max(hw) > limit:
            trained = f"on {size}×{size} crops" if size else "on small crops"
            raise InputProblem(
                f"'{image.name}' is {hw[0]}×{hw[1]} pixels, but the model was trained {trained}. "
                "Choose a region of interest first: press 'Draw box', drag a rectangle around "
                "the lesion, and sample again. Nothing is cropped or resized silently."
            )
    h, w = roi[2] - roi[0], roi[3] - roi[1]
    if size and (max(h, w) > 2 * size or min(h, w) < size / 2):
        warnings.append(
            f"The region is {h}×{w} pixels but the model was trained on {size}×{size}: "
            "results may be unreliable. A region close to the training size works best."
        )

    if len(spatial) == 3:
        mode = MODE_VOLUME if volume_mode == MODE_VOLUME else MODE_SLICE
    else:
        mode = MODE_2D
    z = current_z(viewer, image) if mode == MODE_SLICE else None
    nd = len(spatial)
    scale = tuple(float(s) for s in image.scale[-nd:])
    translate = tuple(float(t) for t in image.translate[-nd:])
    placement = Placement(mode, spatial, roi, z, scale, translate)

    y0, x0, y1, x1 = roi
    data = image.data
    if mode == MODE_2D:
        crop = np.asarray(data[..., y0:y1, x0:x1])
        crops = [crop if has_channels else crop[None]]
        offsets = [0]
        where = [""]
    elif mode == MODE_SLICE:
        crops = [np.asarray(data[z, y0:y1, x0:x1])[None]]
        offsets = [z]
        where = [f" of slice {z}"]
    else:
        vol = np.asarray(data[:, y0:y1, x0:x1])
        crops = [vol[k][None] for k in range(vol.shape[0])]
        offsets = list(range(vol.shape[0]))
        where = [f" of slice {k}" for k in offsets]
    out = []
    for crop, wh in zip(crops, where):
        arr = np.asarray(crop, dtype=np.float32)
        bad = ~np.isfinite(arr)
        if bad.any():
            raise InputProblem(
                f"'{image.name}' has {int(bad.sum())} NaN or infinite value(s) in the region{wh}. "
                "Fill or mask them (or choose a region without them) before sampling."
            )
        out.append(np.ascontiguousarray(arr))
    from ..geometry import layer_affine, source_geometry
    from ..windowing import layer_units

    meta = getattr(image, "metadata", None)
    geometry = source_geometry(meta)
    affine = layer_affine(image, nd)
    if affine is not None:
        geometry["layer_affine"] = affine
    return PreparedInput(placement, out, offsets, warnings, units=layer_units(meta),
                         geometry=geometry)
