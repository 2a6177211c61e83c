"""The live result layers of one sampling run, updated in place while the run streams.

Each layer owns one preallocated numpy array; a streamed frame is copied into it and the
layer refreshed, so no layer is re-created while the reverse process runs. Layers sit over
the full image through ``translate`` (the region's offset), never by padding.

A new run over the same region with the same number of samples takes over the previous
run's layers (:meth:`RunLayers.take_over`): removing and adding five napari layers blocks the
event loop for seconds (each removal runs a full garbage collection), emptying them takes
milliseconds.
"""

from __future__ import annotations

import contextlib
from typing import Any

import numpy as np

from ._inputs import MODE_2D, Placement

META_KEY = "napari_berdiff"

#: the samples layer's name after the run that made it (a Gaussian model's run: "Wolleb")
SAMPLES = "BerDiff samples"
REFINED_SAMPLES = "Refined samples"
GAUSSIAN_SAMPLES = "Wolleb samples"
CDAL_SAMPLES = "cDAL samples"
#: the mean over the samples of the model's predicted foreground probability
PROBS = "mean probability"
#: colour-blind-safe (Okabe–Ito) outline colours: the samples, then reference annotators
#: (vermillion stands out on every colour of the viridis frequency map under it)
SAMPLE_COLOR = "#D55E00"
REFERENCE_COLORS = ("#CC79A7", "#56B4E9", "#F0E442", "#0072B2", "#009E73", "#E69F00")
#: the samples layer's opacity: filled while streaming, outlines once final
STREAM_OPACITY, OUTLINE_OPACITY = 0.55, 0.9
#: display name, colormap, initially visible, opacity — bottom to top
MAP_STYLE = {
    "entropy": ("entropy", "inferno", False, 0.75),
    "variance": ("variance", "magma", False, 0.75),
    "frequency": ("frequency", "viridis", True, 0.6),
}


def _limits() -> dict[str, tuple[float, float]]:
    from ..uncertainty import MAP_LIMITS

    return MAP_LIMITS


_FADED: dict[str, Any] = {}


def faded_colormap(name: str) -> Any:
    """A napari colormap that is transparent at its low end, so a heatmap overlays the image."""
    if name not in _FADED:
        from napari.utils.colormaps import Colormap, ensure_colormap

        base = ensure_colormap(name)
        colors = np.array(base.colors, dtype=np.float32, copy=True)
        controls = np.asarray(base.controls, dtype=np.float32)
        colors[:, 3] = np.clip(controls / 0.12, 0.0, 1.0)
        _FADED[name] = Colormap(colors=colors, controls=controls, name=f"{name} (fade)",
                                display_name=f"{name} (fade)")
    return _FADED[name]


def label_colormap(color: str) -> Any:
    """A Labels colormap drawing every non-zero label in one ``color``."""
    from napari.utils.colormaps import DirectLabelColormap

    return DirectLabelColormap(color_dict={None: color, 0: "transparent"})


def show_colorbar(layer: Any) -> None:
    """A heatmap's legend: napari's colour bar overlay (drawn while the layer is visible),
    where the napari version has it."""
    bar = getattr(layer, "colorbar", None)
    if bar is not None:
        bar.visible = True
        bar.font_size = 11


def axis_labels(ndim: int, stacked: bool) -> tuple[str, ...]:
    """Dims names of a result layer: ``sample``, then ``slice`` in a volume run, ``y``, ``x``."""
    names = ["y", "x"]
    if ndim - int(stacked) == 3:
        names.insert(0, "slice")
    if stacked:
        names.insert(0, "sample")
    return tuple(names[-ndim:])


def is_result_layer(layer: Any) -> bool:
    """Whether a layer is one of the plugin's result layers."""
    return META_KEY in getattr(layer, "metadata", {})


def result_info(layer: Any) -> dict[str, Any] | None:
    return getattr(layer, "metadata", {}).get(META_KEY)


class RunLayers:
    """The layers of one run: the samples, their ``mean probability`` and the uncertainty
    maps.

    ``readers``: a reader-conditioned model's reader count (sample i is drawn as reader
    ``i mod readers``); 0 for other models. ``samples_name``: the samples layer's name,
    after the run (:data:`SAMPLES`, :data:`REFINED_SAMPLES`)."""

    def __init__(self, viewer: Any, placement: Placement, n: int, run_id: int,
                 label: str = "", readers: int = 0, samples_name: str = SAMPLES):
        self.viewer = viewer
        self.placement = placement
        self.n = n
        self.readers = readers
        self.run_id = run_id
        shape = placement.result_shape
        self.samples = np.zeros((n, *shape), dtype=np.uint8)
        self.probs = np.zeros((n, *shape), dtype=np.float32)
        self.maps = {k: np.zeros(shape, dtype=np.float32) for k in MAP_STYLE}
        self.label = label
        self.samples_name = samples_name
        self.layers: dict[str, Any] = {}
        self.pushed = 0
        self.last_step: int | None = None
        #: the source image's geometry metadata and layer affine (set by the widget)
        self.geometry: dict[str, Any] = {}
        #: how the run was made, for the provenance of accepted masks (set by the widget)
        self.provenance: dict[str, Any] = {}

    # ------------------------------------------------------------------ creation
    def _meta(self, role: str) -> dict[str, Any]:
        p = self.placement
        meta: dict[str, Any] = {META_KEY: {"role": role, "run": self.run_id, "mode": p.mode,
                                           "roi": list(p.roi), "z": p.z, "model": self.label}}
        if self.geometry:  # the source's NIfTI / DICOM geometry, moved to the results' place
            from ..geometry import derived_metadata

            lead = (self.n,) if role in ("samples", "probs") else ()
            meta.update(derived_metadata(self.geometry, p.start, (*lead, *p.result_shape)))
        return meta

    def _inherit_affine(self) -> None:
        """Give the new layers the source layer's own (napari) affine, if it has one."""
        from ..geometry import expand_affine

        matrix = self.geometry.get("layer_affine")
        if matrix is not None:
            for layer in self.layers.values():
                layer.affine = expand_affine(matrix, layer.ndim)

    def add(self) -> None:
        from napari.layers import Image, Labels

        limits = _limits()
        scale_m, tr_m = self.placement.transform(0)
        scale_s, tr_s = self.placement.transform(1)
        for key, (name, cmap, visible, opacity) in MAP_STYLE.items():
            layer = Image(self.maps[key], name=name, colormap=faded_colormap(cmap),
                          contrast_limits=limits[key], scale=scale_m, translate=tr_m,
                          axis_labels=axis_labels(self.maps[key].ndim, False),
                          opacity=opacity, visible=visible, blending="translucent",
                          interpolation2d="nearest", metadata=self._meta(key))
            self.layers[key] = self.viewer.add_layer(layer)
        probs = Image(self.probs, name=PROBS, colormap=faded_colormap("plasma"),
                      contrast_limits=(0.0, 1.0), scale=scale_s, translate=tr_s, opacity=0.7,
                      axis_labels=axis_labels(self.probs.ndim, True),
                      visible=False, blending="translucent", metadata=self._meta("probs"))
        self.layers["probs"] = self.viewer.add_layer(probs)
        for key in (*MAP_STYLE, "probs"):
            show_colorbar(self.layers[key])
        samples = Labels(self.samples, name=self.samples_name, scale=scale_s, translate=tr_s,
                         opacity=STREAM_OPACITY, metadata=self._meta("samples"),
                         colormap=label_colormap(SAMPLE_COLOR),
                         axis_labels=axis_labels(self.samples.ndim, True))
        self.layers["samples"] = self.viewer.add_layer(samples)
        self._inherit_affine()

    def take_over(self, previous: RunLayers) -> bool:
        """Reuse ``previous``'s layers and arrays, emptied, for this run; False (nothing
        changed) unless they all still exist and the region and number of samples match."""
        if (previous.viewer is not self.viewer or previous.n != self.n
                or previous.placement != self.placement or not previous.layers
                or len(previous.all_layers()) != len(previous.layers)):
            return False
        self.samples, self.probs, self.maps = previous.samples, previous.probs, previous.maps
        for arr in (self.samples, self.probs, *self.maps.values()):
            arr.fill(0)
        self.layers = dict(previous.layers)
        previous.layers = {}
        from ..geometry import GEOMETRY_KEYS

        for key, layer in self.layers.items():
            kept = {k: v for k, v in layer.metadata.items() if k not in GEOMETRY_KEYS}
            layer.metadata = {**kept, **self._meta(key)}
            if key == "samples":
                layer.contour = 0  # filled while streaming, outlines once final
                layer.opacity = STREAM_OPACITY
                layer.name = self.samples_name
            layer.refresh()
        return True

    # ------------------------------------------------------------------ updates
    def alive(self, key: str) -> bool:
        layer = self.layers.get(key)
        return layer is not None and layer in self.viewer.layers

    def push(self, upd: Any) -> None:
        """Copy a streamed frame into the arrays and refresh the layers that still exist."""
        if self.placement.mode == MODE_2D:
            s_ix: tuple = (Ellipsis,)
            m_ix: tuple = (Ellipsis,)
        else:
            s_ix = (slice(None), upd.slice_pos)
            m_ix = (upd.slice_pos,)
        self.samples[s_ix] = upd.states
        self.probs[s_ix] = upd.probs
        for key, arr in self.maps.items():
            arr[m_ix] = upd.maps[key]
        self.pushed += 1
        self.last_step = upd.step
        for key in self.layers:
            if self.alive(key):
                self.layers[key].refresh()

    # ------------------------------------------------------------------ life cycle
    def all_layers(self) -> list[Any]:
        return [lay for key, lay in self.layers.items() if self.alive(key)]

    def remove(self) -> None:
        for layer in self.all_layers():
            self.viewer.layers.remove(layer)

    def keep(self) -> None:
        """Rename the layers so that the next run's layers can take the plain names."""
        for layer in self.all_layers():
            if not layer.name.endswith(")"):
                layer.name = f"{layer.name} (run {self.run_id})"


def batched_layer_changes(viewer: Any) -> contextlib.AbstractContextManager:
    """Group layer additions and removals so that napari updates its scene graph (and
    collects garbage) once, not once per layer (``LayerList.batched_update`` where the
    napari version has it)."""
    batched = getattr(viewer.layers, "batched_update", None)
    return batched() if callable(batched) else contextlib.nullcontext()
