"""How long one napari canvas repaint takes here (the floor of any event-loop stall).

Opens a shown viewer (1500×950) with a 128² image, a 16×128² Labels stack and three heatmaps
(what a streaming run shows), then times ``canvas.repaint()`` 10 times, without and with new
layer data. Under Xvfb the canvas renders with Mesa's software OpenGL, so this is the cost of a
frame on this machine's CPU, not on a laptop's GPU. Not a test.

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python benchmarks/bench_canvas_paint.py
"""
import time, numpy as np, napari
from qtpy.QtWidgets import QApplication
v = napari.Viewer(show=True)
v.window._qt_window.resize(1500, 950)
rng = np.random.default_rng(0)
v.add_image(rng.random((128, 128)).astype(np.float32), name="img")
lab = v.add_labels((rng.random((16, 128, 128)) > 0.5).astype(np.uint8), name="samples")
ims = [v.add_image(rng.random((128, 128)).astype(np.float32), name=f"h{i}", opacity=0.5) for i in range(3)]
app = QApplication.instance()
for _ in range(5): app.processEvents()
canvas = v.window._qt_viewer.canvas.native
for what in ("repaint only", "refresh + repaint"):
    ts = []
    for i in range(10):
        if what != "repaint only":
            lab.data = (rng.random((16, 128, 128)) > 0.5).astype(np.uint8)
            for im in ims: im.data = rng.random((128, 128)).astype(np.float32)
            app.processEvents()
        t = time.perf_counter(); canvas.repaint(); ts.append(1000 * (time.perf_counter() - t))
    print(what, "canvas repaint ms: median %.1f max %.1f" % (np.median(ts), max(ts)))
v.close()
