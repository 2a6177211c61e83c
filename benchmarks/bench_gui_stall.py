"""The longest event-loop stall in napari while a sampling run streams into the layers.

Opens napari (under Xvfb when there is no display), docks the plugin's widget the way a user
does (Plugins menu → ``add_plugin_dock_widget``), loads the bundled model with the model
panel's Load button (or ``--model PATH`` through the same loader), adds a phantom image and
presses Sample. A ``QTimer`` probe ticking every ``--probe-ms`` on the main thread records
its ticks from the click until the run has finished; a stall is a gap between two ticks.
Reports per run the largest gap and the 99th percentile of the gaps while streaming (from
the first to the last frame shown in the layers), the largest gap over the whole run (from
the return of the click, which prepares the input and adds the layers synchronously, to the
end of the ``finished`` callback), the click's own duration, and the longest time the
widget's per-step callback (layer updates, progress bar) held the main thread; then medians over
``--repeats`` runs (after one warm-up run). Not a test: nothing here asserts a time.

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python benchmarks/bench_gui_stall.py
    python benchmarks/bench_gui_stall.py --n 16 --size 128 --interval-ms 100 --repeats 3
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
from _common import base_parser, describe, machine, median, print_table, test_image, write_json

WIDGET = ("napari-berdiff", "Diffusion segmentation")
COLUMNS = [("run", "run", "d"), ("max_busy", "max busy", ".2f"), ("max_gap_ms", "streaming max gap ms", ".1f"),
           ("p99_gap_ms", "p99 ms", ".1f"), ("median_gap_ms", "median ms", ".1f"),
           ("run_max_gap_ms", "whole-run max gap ms", ".1f"), ("click_ms", "click ms", ".1f"),
           ("max_callback_ms", "longest step callback ms", ".1f"),
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


def gap_stats(ticks: Sequence[float], lo: float, hi: float) -> dict[str, float]:
    """Largest, 99th-percentile and median gap (ms) between probe ticks within [lo, hi]."""
    t = np.array([lo] + [x for x in ticks if lo < x < hi] + [hi])
    gaps = np.diff(t) * 1000
    return {"max_gap_ms": float(gaps.max()), "p99_gap_ms": float(np.percentile(gaps, 99)),
            "median_gap_ms": float(np.median(gaps))}


def time_callbacks(widget: Any) -> list[float]:
    """Time the widget's per-step callback on the main thread (layer updates included).

    The run's worker looks the callback up on the widget at every step, so an instance
    attribute wraps it for this run; returns the list the durations (ms) go to.
    """
    durations: list[float] = []
    method = type(widget)._on_yielded.__get__(widget)

    def timed(*args: Any) -> None:
        tic = time.perf_counter()
        method(*args)
        durations.append(1000 * (time.perf_counter() - tic))

    widget._on_yielded = timed
    return durations


def measured_run(widget: Any, probe_ms: int) -> dict[str, Any]:
    """Press Sample and record the probe's ticks until the run has finished.

    The streaming window runs from the first to the last frame that reached the layers; the
    whole run from the click (which prepares the input and adds the layers synchronously)
    to the end of the ``finished`` callback.
    """
    from qtpy.QtCore import QEventLoop, Qt, QTimer

    ticks: list[float] = []
    pushed: list[float] = []
    timer = QTimer()
    timer.setTimerType(Qt.TimerType.PreciseTimer)
    timer.setInterval(probe_ms)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    loop = QEventLoop()
    widget.run_finished.connect(loop.quit)
    on_push = lambda _u: pushed.append(time.perf_counter())  # noqa: E731
    widget.frame_pushed.connect(on_push)
    callbacks = time_callbacks(widget)
    timer.start()
    tic = time.perf_counter()
    widget.sampling.sample_btn.click()
    clicked = time.perf_counter()
    loop.exec()
    toc = time.perf_counter()
    timer.stop()
    widget.run_finished.disconnect(loop.quit)
    widget.frame_pushed.disconnect(on_push)
    del widget._on_yielded  # back to the class's method
    stream = gap_stats(ticks, pushed[0], pushed[-1])
    whole = gap_stats(ticks, clicked, toc)
    return stream | {f"run_{k}": v for k, v in whole.items()} | {
        "click_ms": 1000 * (clicked - tic), "ticks": len(ticks), "frames_pushed": len(pushed),
        "max_callback_ms": max(callbacks, default=0.0),
        "run_s": toc - tic}


def main() -> None:
    ap = base_parser(__doc__, "bench_gui_stall")
    ap.add_argument("--model", default=None, help="a .safetensors (default: bundled)")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=None, help="default: the model's")
    ap.add_argument("--interval-ms", type=int, default=100,
                    help="the widget's 'Stream every' setting (its default is 100 ms)")
    ap.add_argument("--probe-ms", type=int, default=5)
    ap.add_argument("--max-busy", type=float, nargs="+", default=[0.25],
                    help="the widget's cap on the main thread's share spent showing frames "
                         "(0: none); several values alternate run by run within this run")
    ap.add_argument("--lidc", action="store_true",
                    help="the semi-real LIDC nodule sample (128² at 0.5 mm, resampled to the "
                         "model's spacing) instead of a phantom of --size")
    args = ap.parse_args()
    if args.threads:
        ap.error("the plugin's worker chooses its own torch threads (cores - 1)")
    ensure_display()

    viewer, widget = open_widget(args.model)
    if args.lidc:
        from napari_berdiff._qt._sample_data import lidc_nodule_sample

        data, kwargs, _ = lidc_nodule_sample()[0]
        layer = viewer.add_image(data, **kwargs)
        widget.sampling.image_combo.set_layer(layer)
        args.size = data.shape[-1]
    else:
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
        order = args.max_busy if r % 2 == 0 else args.max_busy[::-1]
        for busy in order:
            widget.stream_max_busy = busy
            rows.append({"run": r, "max_busy": busy} | measured_run(widget, args.probe_ms))
            print_table(rows[-1:], COLUMNS)
    summaries = {}
    for busy in args.max_busy:
        mine = [row for row in rows if row["max_busy"] == busy]
        summary = {k: median(row[k] for row in mine) for k in mine[0] if k != "run"}
        summaries[str(busy)] = summary
        print(f"\nmax_busy {busy}: median over {len(mine)} runs: longest stall while "
              f"streaming {summary['max_gap_ms']:.1f} ms, p99 gap {summary['p99_gap_ms']:.1f} "
              f"ms; whole run (click to finished) {summary['run_s']:.2f} s, the click itself "
              f"{summary['click_ms']:.1f} ms; longest per-step callback "
              f"{summary['max_callback_ms']:.1f} ms; frames pushed "
              f"{summary['frames_pushed']:.0f} (probe every {args.probe_ms} ms, N = {args.n}, "
              f"{args.size}², model {widget.model.name}, stream every {args.interval_ms} ms)")
    settings = {"n": args.n, "size": args.size, "steps": sp.steps_spin.value(),
                "interval_ms": args.interval_ms, "probe_ms": args.probe_ms,
                "max_busy": args.max_busy, "model": widget.model.name}
    summary = summaries[str(args.max_busy[0])]
    write_json(args.name, {"settings": settings, "median": summary, "by_max_busy": summaries,
                           "runs": rows}, info)
    viewer.close()


if __name__ == "__main__":
    main()
