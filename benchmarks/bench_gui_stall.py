"""The longest event-loop stall in napari while a sampling run streams into the layers.

Opens napari (under Xvfb when there is no display), docks the plugin's widget the way a user
does (Plugins menu → ``add_plugin_dock_widget``), loads the bundled model with the model
panel's Load button (or ``--model PATH`` through the same loader), adds a phantom image and
presses Sample. A ``QTimer`` probe ticking every ``--probe-ms`` on the main thread records
its ticks from the click until the run has finished; a stall is a gap between two ticks.
Reports per run the largest gap and the 99th percentile of the gaps, then their medians over
``--repeats`` runs (after one warm-up run). Not a test: nothing here asserts a time.

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python benchmarks/bench_gui_stall.py
    python benchmarks/bench_gui_stall.py --n 16 --size 128 --interval-ms 100 --repeats 3
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from typing import Any

import numpy as np
from _common import base_parser, describe, machine, median, print_table, test_image, write_json

WIDGET = ("napari-berdiff", "Diffusion segmentation")
COLUMNS = [("run", "run", "d"), ("max_gap_ms", "max gap ms", ".1f"),
           ("p99_gap_ms", "p99 gap ms", ".1f"), ("median_gap_ms", "median gap ms", ".1f"),
           ("ticks", "ticks", "d"), ("frames_pushed", "frames shown", "d"),
           ("run_s", "run s", ".2f")]


def ensure_display() -> None:
    """Re-run this script under ``xvfb-run`` when there is no X display."""
    if os.environ.get("DISPLAY") or os.environ.get("BERDIFF_BENCH_XVFB"):
        return
    xvfb = shutil.which("xvfb-run")
    if xvfb is None:
        sys.exit("no DISPLAY and no xvfb-run: run under a display or install xvfb")
    os.environ["BERDIFF_BENCH_XVFB"] = "1"
    os.execv(xvfb, [xvfb, "-a", "-s", "-screen 0 1600x1000x24", sys.executable, *sys.argv])


def wait_until(cond: Any, timeout_s: float) -> None:
    """Process Qt events until ``cond()`` holds (setup only, never while measuring)."""
    from qtpy.QtWidgets import QApplication

    end = time.perf_counter() + timeout_s
    while not cond():
        if time.perf_counter() > end:
            raise TimeoutError("timed out waiting for the GUI")
        QApplication.processEvents()
        time.sleep(0.01)


def open_widget(model_path: str | None) -> tuple[Any, Any]:
    """A shown viewer with the plugin docked and a model loaded through the model panel."""
    import napari

    viewer = napari.Viewer(show=True)
    _, widget = viewer.window.add_plugin_dock_widget(*WIDGET)
    panel = widget.model_panel
    if model_path:
        panel.load_path(model_path)
    else:
        panel.bundled.setCurrentIndex(panel.bundled.findText("berdiff-phantom-64"))
        panel.load_btn.click()
    wait_until(lambda: widget.model is not None and not panel.loading, 120)
    return viewer, widget


def measured_run(widget: Any, probe_ms: int) -> dict[str, Any]:
    """Press Sample and record the probe's ticks until the run has finished."""
    from qtpy.QtCore import QEventLoop, Qt, QTimer

    ticks: list[float] = []
    pushed: list[int] = []
    timer = QTimer()
    timer.setTimerType(Qt.TimerType.PreciseTimer)
    timer.setInterval(probe_ms)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    loop = QEventLoop()
    widget.run_finished.connect(loop.quit)
    widget.frame_pushed.connect(lambda _u: pushed.append(1))
    timer.start()
    tic = time.perf_counter()
    ticks.append(tic)
    widget.sampling.sample_btn.click()
    loop.exec()
    ticks.append(time.perf_counter())
    timer.stop()
    widget.run_finished.disconnect(loop.quit)
    gaps = np.diff(ticks) * 1000
    return {"max_gap_ms": float(gaps.max()), "p99_gap_ms": float(np.percentile(gaps, 99)),
            "median_gap_ms": float(np.median(gaps)), "ticks": len(ticks),
            "frames_pushed": len(pushed), "run_s": ticks[-1] - tic}


def main() -> None:
    ap = base_parser(__doc__)
    ap.add_argument("--model", default=None, help="a .safetensors (default: bundled)")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=None, help="default: the model's")
    ap.add_argument("--interval-ms", type=int, default=100,
                    help="the widget's 'Stream every' setting (its default is 100 ms)")
    ap.add_argument("--probe-ms", type=int, default=5)
    args = ap.parse_args()
    if args.threads:
        ap.error("the plugin's worker chooses its own torch threads (cores - 1)")
    ensure_display()

    viewer, widget = open_widget(args.model)
    viewer.add_image(test_image(args.size), name="phantom")
    sp = widget.sampling
    sp.n_spin.setValue(args.n)
    if args.steps:
        sp.steps_spin.setValue(args.steps)
    sp.interval_spin.setValue(args.interval_ms)
    from napari_berdiff._qt._run import default_threads

    # the run's worker thread sets its own torch threads: the plugin's default, cores - 1
    info = machine() | {"display": os.environ.get("DISPLAY"), "torch_threads": default_threads()}
    print(describe(info))
    measured_run(widget, args.probe_ms)  # warm-up
    rows = []
    for r in range(args.repeats):
        rows.append({"run": r} | measured_run(widget, args.probe_ms))
        print_table(rows[-1:], COLUMNS)
    summary = {k: median(row[k] for row in rows)
               for k in ("max_gap_ms", "p99_gap_ms", "median_gap_ms", "run_s")}
    print(f"\nmedian over {len(rows)} runs: longest stall {summary['max_gap_ms']:.1f} ms, "
          f"p99 gap {summary['p99_gap_ms']:.1f} ms (probe every {args.probe_ms} ms, "
          f"N = {args.n}, {args.size}², model {widget.model.name}, stream every "
          f"{args.interval_ms} ms)")
    settings = {"n": args.n, "size": args.size, "steps": sp.steps_spin.value(),
                "interval_ms": args.interval_ms, "probe_ms": args.probe_ms,
                "model": widget.model.name}
    write_json("bench_gui_stall", {"settings": settings, "median": summary, "runs": rows}, info)
    viewer.close()


if __name__ == "__main__":
    main()
