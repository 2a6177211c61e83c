"""The demo: napari with a sample image, the bundled default model loaded and the widget docked.

The sample follows the model: a lung-nodule model (trained on the semi-real LIDC) opens a
test-split nodule, CT rendered around its four readers' real contours, which become the
reference layer; a phantom model opens a phantom with its simulated annotators.

    python -m napari_berdiff.demo                      # interactive: press Sample
    python -m napari_berdiff.demo --screenshot out.png  # one full run, a screenshot, exit 0

``make demo`` runs the first, ``make demo DEMO_SCREENSHOT=out.png`` the second. When no
bundled model can be loaded, a tiny *untrained* model stands in, with a visible warning:
the GUI then works, but its samples are random shapes, not segmentations.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

DEMO_MODEL_NAME = "tiny demo model (UNTRAINED)"


def bundled_model(device: str = "cpu") -> tuple[Any | None, str]:
    """The first bundled model, loaded, with its name; or ``(None, why not)``."""
    try:
        from .checkpoints import list_bundled_models, load_model
    except ImportError as exc:
        return None, f"the checkpoints module is not available ({exc})"
    paths = list_bundled_models()
    if not paths:
        return None, "no bundled model was found in models/"
    path = Path(paths[0])
    try:
        return load_model(path, device=device), path.name.split(".")[0]
    except Exception as exc:  # noqa: BLE001 - reported, then the demo model stands in
        return None, f"{path.name} could not be loaded ({exc})"


def make_demo_model(image_size: int = 64, seed: int = 0) -> Any:
    """A tiny, untrained Bernoulli model: only for trying the GUI without a checkpoint."""
    import torch

    from .diffusion import DiffusionConfig
    from .model import DiffusionModel
    from .networks.presets import build_network, tiny_config

    torch.manual_seed(seed)
    net = build_network(tiny_config(image_size=image_size, model_channels=16, norm_groups=8))
    meta = {
        "name": DEMO_MODEL_NAME,
        "untrained": True,
        "data": {"image_size": image_size, "image_channels": 1,
                 "normalisation": {"mode": "minmax"},
                 "description": ""},
    }
    diffusion = DiffusionConfig(kind="bernoulli", timesteps=1000, schedule="cosine",
                                prediction="eps", default_steps=10)
    return DiffusionModel(net, diffusion, meta).to("cpu")


def _add_layers(viewer: Any, layer_data: list[tuple[Any, dict, str]]) -> list[Any]:
    """Add napari layer-data tuples ``(data, kwargs, kind)`` to the viewer; returns the layers."""
    return [getattr(viewer, f"add_{kind}")(data, **kwargs) for data, kwargs, kind in layer_data]


def add_phantom(viewer: Any, size: int = 128, seed: int = 3) -> list[Any]:
    """Add the sample data (phantom + annotators) at a given size; returns the layers."""
    from ._qt._sample_data import phantom_sample

    return _add_layers(viewer, phantom_sample(seed=seed, size=size))


def add_lidc_nodule(viewer: Any) -> list[Any]:
    """Add the semi-real LIDC nodule (rendered CT + the readers' real contours)."""
    from ._qt._sample_data import lidc_nodule_sample

    return _add_layers(viewer, lidc_nodule_sample())


def is_lidc_model(model: Any) -> bool:
    """Whether a model was trained on the (semi-real) LIDC crops."""
    data = getattr(model, "data", None) or {}
    text = f"{data.get('description', '')} {(data.get('dataset') or {}).get('layout', '')}"
    return "LIDC" in text.upper()


def _parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="python -m napari_berdiff.demo",
        description="Open napari with the phantom sample, the bundled model and the "
                    "Diffusion segmentation widget.",
    )
    ap.add_argument("--screenshot", metavar="PNG",
                    help="run one full sampling pass, save a screenshot of the whole window "
                         "to PNG and exit")
    ap.add_argument("--samples", type=int, default=None, help="number of samples (N)")
    ap.add_argument("--steps", type=int, default=None, help="reverse steps")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--sample", choices=["auto", "lidc", "phantom"], default="auto",
                    help="the image to open: the semi-real LIDC nodule, a phantom, or (auto) "
                         "the one the model was trained on")
    ap.add_argument("--phantom", type=int, default=3, help="phantom case (its seed)")
    ap.add_argument("--timeout", type=float, default=900.0,
                    help="with --screenshot: give up (exit 3) after this many seconds")
    return ap.parse_args(argv)


def setup_viewer(args: argparse.Namespace) -> tuple[Any, Any]:
    """Viewer with the phantom, the widget docked and a model loaded."""
    import napari
    from napari.utils.notifications import show_warning

    viewer = napari.Viewer(title="napari-berdiff demo")
    viewer.window.resize(1500, 950)
    _, widget = viewer.window.add_plugin_dock_widget("napari-berdiff", "Diffusion segmentation")
    model, label = bundled_model()
    if model is None:
        why = label
        model, label = make_demo_model(), DEMO_MODEL_NAME
        show_warning(
            f"No trained model: {why}. Using a tiny UNTRAINED demo model instead: the GUI "
            "works, but its samples are random shapes, not segmentations."
        )
        print(f"napari-berdiff demo: {why}; using an untrained demo model.", file=sys.stderr)
    sample = args.sample
    if sample == "auto":
        sample = "lidc" if is_lidc_model(model) else "phantom"
    if sample == "lidc":
        layers = add_lidc_nodule(viewer)
    else:  # the phantom at the model's training size, so the lesion has the scale it learnt
        size = (getattr(model, "data", None) or {}).get("image_size") or 128
        layers = add_phantom(viewer, size=int(size), seed=args.phantom)
    widget.set_model(model, label)
    image = next((lay for lay in layers if lay._type_string == "image"), None)
    ref = next((lay for lay in layers if lay._type_string == "labels"), None)
    if image is not None:
        widget.sampling.image_combo.set_layer(image)
        viewer.layers.selection.active = image
    if ref is not None:
        ref.contour = 1  # outlines: the annotators stay readable under the results
        widget.metrics.ref_combo.set_layer(ref)
    if args.samples:
        widget.sampling.n_spin.setValue(args.samples)
    if args.steps:
        widget.sampling.steps_spin.setValue(args.steps)
    widget.sampling.seed_spin.setValue(args.seed)
    return viewer, widget


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    viewer, widget = setup_viewer(args)
    if not args.screenshot:
        napari.run()
        return 0

    out = Path(args.screenshot).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    state = {"rc": 1, "done": False}

    def finish(rc: int) -> None:
        if state["done"]:
            return
        state["done"] = True
        state["rc"] = rc
        try:
            widget.show_sample(0)
            viewer.screenshot(str(out), canvas_only=False, flash=False)
            print(f"napari-berdiff demo: screenshot saved to {out}")
        except Exception as exc:  # noqa: BLE001
            print(f"napari-berdiff demo: screenshot failed: {exc}", file=sys.stderr)
            state["rc"] = 4
        viewer.close()
        QApplication.instance().quit()

    def on_finished(outcome: Any) -> None:
        ok = outcome is not None and not outcome.cancelled
        QTimer.singleShot(300, lambda: finish(0 if ok else 5))

    def start() -> None:
        if widget.sample() is None:
            print("napari-berdiff demo: sampling could not start", file=sys.stderr)
            finish(2)

    def give_up() -> None:
        print(f"napari-berdiff demo: no result after {args.timeout:.0f} s", file=sys.stderr)
        widget.cancel()
        QTimer.singleShot(2000, lambda: finish(3))

    widget.run_finished.connect(on_finished)
    QTimer.singleShot(500, start)
    QTimer.singleShot(int(args.timeout * 1000), give_up)
    napari.run()
    return int(state["rc"])


if __name__ == "__main__":
    sys.exit(main())
