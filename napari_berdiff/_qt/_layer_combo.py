"""A combo box listing the viewer's layers of some types, kept in sync with the layer list."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qtpy.QtCore import Signal
from qtpy.QtWidgets import QComboBox


class LayerCombo(QComboBox):
    """Pick a layer of given types; optional special first entries (e.g. "New layer").

    ``layer()`` returns the chosen layer, or ``None`` for a special entry; ``special()``
    returns the special entry's key. The list follows layers being added, removed,
    reordered and renamed, and keeps the current choice whenever it still exists.
    """

    layer_changed = Signal(object)

    def __init__(
        self,
        viewer: Any,
        layer_types: tuple[type, ...],
        *,
        specials: tuple[tuple[str, str], ...] = (),
        accept: Callable[[Any], bool] | None = None,
        prefer_last: bool = True,
        parent=None,
    ):
        super().__init__(parent)
        self._viewer = viewer
        self._types = layer_types
        self._specials = specials
        self._accept = accept
        self._prefer_last = prefer_last
        self._layers: list[Any] = []
        self._watched: set[int] = set()
        self.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.setMinimumContentsLength(8)
        events = viewer.layers.events
        for ev in (events.inserted, events.removed, events.moved, events.reordered):
            ev.connect(self.refresh)
        self.currentIndexChanged.connect(self._emit_changed)
        self.activated.connect(self._on_activated)
        self.destroyed.connect(self._disconnect_factory(viewer, self.refresh))
        self.refresh()

    @staticmethod
    def _disconnect_factory(viewer: Any, cb: Callable) -> Callable:
        def _disconnect(*_: Any) -> None:
            events = viewer.layers.events
            for ev in (events.inserted, events.removed, events.moved, events.reordered):
                try:
                    ev.disconnect(cb)
                except Exception:  # noqa: BLE001 - already gone at teardown
                    pass

        return _disconnect

    # ------------------------------------------------------------------ content
    def candidates(self) -> list[Any]:
        out = []
        for layer in self._viewer.layers:
            if isinstance(layer, self._types) and (self._accept is None or self._accept(layer)):
                out.append(layer)
        return out

    def refresh(self, *_: Any) -> None:
        try:
            current = self.layer()
            special = self.special()
        except RuntimeError:  # the Qt object is gone
            return
        self._rebuild(current, special)

    def _rebuild(self, current: Any, special: str | None) -> None:
        layers = self.candidates()
        for layer in layers:  # (hash, not id: napari may hand out proxies of the layers)
            if hash(layer) not in self._watched:
                self._watched.add(hash(layer))
                layer.events.name.connect(self.refresh)
        keys = [k for k, _ in self._specials]
        self.blockSignals(True)
        try:
            self.clear()
            for key, text in self._specials:
                self.addItem(text, key)
            for layer in layers:
                self.addItem(layer.name, None)
            self._layers = layers
            if current is not None and current in layers:
                self.setCurrentIndex(len(keys) + layers.index(current))
            elif special in keys and (self._user_special or not self._prefer_last):
                self.setCurrentIndex(keys.index(special))
            elif layers and self._prefer_last:
                self.setCurrentIndex(len(keys) + len(layers) - 1)  # the top-most match
            elif keys:
                self.setCurrentIndex(0)
        finally:
            self.blockSignals(False)
        self._emit_changed()

    _user_special = False
    _last_emitted: Any = object()

    def _on_activated(self, *_: Any) -> None:
        self._user_special = self.special() is not None

    def _emit_changed(self, *_: Any) -> None:
        cur = self.layer() if self.layer() is not None else self.special()
        if cur is not self._last_emitted:
            self._last_emitted = cur
            self.layer_changed.emit(cur)

    # ------------------------------------------------------------------ access
    def layer(self) -> Any | None:
        i = self.currentIndex() - len(self._specials)
        if 0 <= i < len(self._layers):
            return self._layers[i]
        return None

    def special(self) -> str | None:
        i = self.currentIndex()
        if 0 <= i < len(self._specials):
            return self._specials[i][0]
        return None

    def set_layer(self, layer: Any) -> None:
        self.refresh()
        if layer in self._layers:
            self._user_special = False
            self.setCurrentIndex(len(self._specials) + self._layers.index(layer))

    def set_specials(self, specials: tuple[tuple[str, str], ...]) -> None:
        """Replace the special first entries (``(key, text)`` pairs), keeping the choice."""
        if tuple(specials) != tuple(self._specials):
            current, special = self.layer(), self.special()
            self._specials = tuple(specials)
            self._rebuild(current, special)

    def set_special(self, key: str) -> None:
        keys = [k for k, _ in self._specials]
        if key in keys:
            self._user_special = True
            self.setCurrentIndex(keys.index(key))
