"""Imports a first run needs, done on a background thread when the widget opens.

A first Sample click creates a napari Labels layer, whose features table imports pandas,
and the uncertainty maps, which import scipy. Done at the click, these imports block the
event loop for about a second before anything streams (see BENCHMARKS.md, "The first
click"); done while the user picks an image and a model, nobody waits for them.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Sequence

#: what the first run would otherwise import on the main thread
MODULES = ("pandas", "napari_berdiff.uncertainty")


def preload(modules: Sequence[str] = MODULES) -> threading.Thread:
    """Import ``modules`` on a daemon thread; returns the started thread.

    A module that fails to import is skipped: the run imports it again on the main thread
    and reports the problem there, where the user sees it.
    """

    def run() -> None:
        for name in modules:
            try:
                importlib.import_module(name)
            except Exception:  # noqa: BLE001 - reported by the import that needs it
                continue

    thread = threading.Thread(target=run, name="napari-berdiff-preload", daemon=True)
    thread.start()
    return thread
