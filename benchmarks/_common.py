"""Shared helpers of the benchmark scripts: the machine, timing, models, quality, JSON.

Every script records :func:`machine` next to its figures and writes its JSON with
:func:`write_json` to ``benchmarks/results/<name>.json`` (git-ignored). Figures are medians
over several runs (:func:`median`); nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BUNDLED = ROOT / "models" / "berdiff-phantom-64.safetensors"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


# ---------------------------------------------------------------------------- the machine
def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (or what :mod:`platform` knows)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (other work sharing the CPU shows here)."""
    try:
        return [float(v) for v in os.getloadavg()]
    except OSError:
        return []


def machine(device: str = "cpu") -> dict[str, Any]:
    """Cores, torch threads, device, versions, CPU model and the current load average."""
    import torch

    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "load_average": load_average(),
        "utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def describe(info: dict[str, Any]) -> str:
    """One line for the top of a printed table."""
    load = ", ".join(f"{v:.1f}" for v in info.get("load_average", []))
    return (f"machine: {info['cpu_model']}, {info['cpu_count']} cores, "
            f"{info['torch_threads']} torch thread(s), device {info['device']}, "
            f"torch {info['torch']}, load average [{load}]")


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (default: what the plugin's worker uses) and return it."""
    import torch

    from napari_berdiff._qt._run import default_threads

    n = threads or default_threads()
    torch.set_num_threads(n)
    return n


# ---------------------------------------------------------------------------- timing
def median(values: Iterable[float]) -> float:
    """The median of a non-empty iterable of numbers."""
    return float(statistics.median(list(values)))


def time_runs(fn: Callable[[], Any], repeats: int) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls of ``fn``."""
    out = []
    for _ in range(repeats):
        tic = time.perf_counter()
        fn()
        out.append(time.perf_counter() - tic)
    return out


def median_of(rows: Sequence[dict[str, float]]) -> dict[str, float]:
    """Key-wise median of per-run dicts of figures."""
    return {k: median(r[k] for r in rows) for k in rows[0]}


# ---------------------------------------------------------------------------- models
def random_base32():
    """The official BerDiff UNet layout scaled down to 32 base channels, random weights."""
    import torch

    from napari_berdiff.diffusion import DiffusionConfig
    from napari_berdiff.model import DiffusionModel
    from napari_berdiff.networks import build_network, get_network_preset

    cfg = get_network_preset("berdiff-lidc-128").replace(model_channels=32)
    torch.manual_seed(0)
    return DiffusionModel(build_network(cfg), DiffusionConfig(kind="bernoulli"),
                          {"name": "base32 (random)"})


def load_bench_model(spec: str):
    """A model for a benchmark: ``base32``, ``lidc`` (the berdiff-lidc-128 preset with
    random weights), ``bundled`` or a ``.safetensors`` path; moved to the CPU the way the
    plugin does it (channels_last on the CPU)."""
    from napari_berdiff.model import model_from_preset

    if spec == "base32":
        model = random_base32()
    elif spec == "lidc":
        model = model_from_preset("berdiff-lidc-128")
        model.metadata["name"] = "berdiff-lidc-128 (random)"
    else:
        from napari_berdiff import load_model

        path = BUNDLED if spec == "bundled" else Path(spec)
        model = load_model(path)
        if not model.name:
            model.metadata["name"] = path.stem
    return model.to("auto")


def is_trained(spec: str) -> bool:
    """Whether a model spec names trained weights (quality figures mean something)."""
    return spec not in ("base32", "lidc")


def test_image(size: int) -> np.ndarray:
    """A phantom of ``size`` × ``size`` (held-out seed), the image the speed runs sample."""
    from napari_berdiff.data.phantoms import make_phantom

    return make_phantom(900_000, size).image.astype(np.float32)


# ---------------------------------------------------------------------------- quality
def held_out(n_test: int):
    """The first ``n_test`` held-out phantoms of ``train_default.py`` (seeds 900000…)."""
    from train_default import TEST_SEED0, phantom_dataset

    return phantom_dataset(TEST_SEED0, n_test)


def quality(model: Any, n_test: int, n: int = 16, steps: int | str | None = None,
            seed: int = 0) -> dict[str, float]:
    """GED², HM-IoU and soft Dice of ``n`` samples per held-out phantom (means over the
    phantoms, with standard errors for GED² and HM-IoU), and the seconds spent sampling per
    image (napari_berdiff.training.evaluate)."""
    from napari_berdiff.training.evaluate import evaluate

    rep = evaluate(model, held_out(n_test), n=n, steps=steps, seed=seed, baseline=None,
                   oracle=False, annotators=False)
    s = rep.summary()["model"]
    return {"ged2": s["ged2"], "hm_iou": s["hm_iou"], "soft_dice": s["soft_dice"],
            "ged2_sem": s["ged2_sem"], "hm_iou_sem": s["hm_iou_sem"],
            "n_test": n_test, "n_samples": n,
            "seconds_per_image": rep.seconds.get("model", float("nan")) / n_test}


# ---------------------------------------------------------------------------- output
def base_parser(doc: str, name: str | None = None, repeats: int | None = 3
                ) -> argparse.ArgumentParser:
    """An argument parser with ``--threads``, and ``--name`` (the JSON's name, default
    ``name``) and ``--repeats`` unless they are None."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0], epilog=doc,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    if name is not None:
        ap.add_argument("--name", default=name, help="write results/<name>.json")
    if repeats is not None:
        ap.add_argument("--repeats", type=int, default=repeats, help="runs per figure (median)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: the plugin's worker default, cores - 1)")
    return ap


def print_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> None:
    """Print ``rows`` with ``columns`` = (key, header, format spec) triples; text columns
    (empty format spec) are left-aligned, numbers right-aligned."""
    cells = [[("–" if r.get(k) is None else format(r[k], fmt)) for k, _, fmt in columns]
             for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h, _) in enumerate(columns)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.ljust(w) if fmt == "" else v.rjust(w)
                         for v, w, (_, _, fmt) in zip(values, widths, columns))

    print(line([h for _, h, _ in columns]))
    for c in cells:
        print(line(c))


def write_json(name: str, payload: dict[str, Any], info: dict[str, Any]) -> Path:
    """Write ``{"machine": info, "command": argv, **payload}`` to ``results/<name>.json``."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"{name}.json"
    doc = {"machine": info, "command": " ".join(sys.argv), **payload}
    out.write_text(json.dumps(doc, indent=2, default=str))
    print(f"wrote {out.relative_to(ROOT)}")
    return out
