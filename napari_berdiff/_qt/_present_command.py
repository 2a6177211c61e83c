"""The manifest command "BerDiff presentation view" (menu Layers ▸ Visualize).

A separate module because napari injects the viewer by the parameter's annotation, which
must be importable when napari inspects the command; the dock widget's module stays light.
"""

from typing import Any

import napari.viewer

from . import _notify


def present_view(viewer: napari.viewer.Viewer) -> Any:
    """Open the presentation view of the last run of a docked Diffusion segmentation or
    Mask refiner widget (the first one that has a finished run)."""
    from ._widget import DiffusionSegmentationWidget

    docked = [w for w in viewer.window.dock_widgets.values()
              if isinstance(w, DiffusionSegmentationWidget)]
    ready = [w for w in docked
             if w.last_run is not None and w.last_run.pushed and not w.running]
    if not ready:
        _notify.error("Nothing to present yet: open Plugins ▸ Diffusion segmentation "
                      "(napari-berdiff), press Sample and wait for the run to end.")
        return None
    return ready[0].open_presentation()
