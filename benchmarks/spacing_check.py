"""The same phantom scenes at 64 and 128 pixels score about the same with spacing handling.

    python benchmarks/spacing_check.py [--cases 24] [--n 16] [--model berdiff-phantom-64]

Writes ``--cases`` phantoms (seed 3) at 64×64 (1 mm) and 128×128 (0.5 mm, recorded in
dataset.json), and evaluates the model on both: with the spacing (the 128 px images resampled
to the model's 1 mm and the masks back) and, for comparison, with the 128 px images taken as
if they were at the model's spacing (``spacing=1``, what happened before spacing was handled).
Prints GED² and HM-IoU of the model and of the deterministic baseline.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    import torch

    from napari_berdiff.checkpoints import load_model
    from napari_berdiff.cli import _resolve_model
    from napari_berdiff.cli import main as berdiff
    from napari_berdiff.data.layout import load_dataset
    from napari_berdiff.training.evaluate import default_baseline_path, evaluate

    p = argparse.ArgumentParser()
    p.add_argument("--cases", type=int, default=24)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--model", default="berdiff-phantom-64")
    args = p.parse_args()
    torch.set_num_threads(1)
    path = _resolve_model(args.model)
    model = load_model(path)
    baseline = load_model(default_baseline_path(model, path))
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for size in (64, 128):
            out = Path(tmp) / f"p{size}"
            berdiff(["data", "phantoms", "--out", str(out), "--cases", str(args.cases),
                     "--size", str(size), "--seed", "3"])
            ds = load_dataset(out)
            cases = [("dataset.json", None)] + ([("as if 1 mm", 1.0)] if size == 128 else [])
            for label, spacing in cases:
                rep = evaluate(model, ds, n=args.n, baseline=baseline, spacing=spacing,
                               annotators=False).summary()
                rows.append((size, label, rep["model"]["ged2"], rep["model"]["hm_iou"],
                             rep["deterministic"]["ged2"], rep["deterministic"]["hm_iou"]))
    print(f"{'size':>5} {'spacing':<14} {'GED²':>7} {'HM-IoU':>7} {'det GED²':>9} {'det HM':>7}")
    for r in rows:
        print(f"{r[0]:>5} {r[1]:<14} {r[2]:7.3f} {r[3]:7.3f} {r[4]:9.3f} {r[5]:7.3f}")


if __name__ == "__main__":
    main()
