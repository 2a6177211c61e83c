"""Where a model's GED² on the semi-real LIDC comes from: presence or shape (issue 20).

``GED² = 2·E d(Y, S) − E d(S, S') − E d(Y, Y')`` with ``d = 1 − IoU`` (0 for two empty
masks). A pair with exactly one empty mask has ``d = 1``; a pair of non-empty masks has
``d = 1 − IoU``. So each expectation, and GED² itself, splits into a **presence** part (pairs
where one mask is empty) and a **shape** part (pairs of non-empty masks)::

    GED² = [2·P_ys − P_ss − P_yy] + [2·D_ys − D_ss − D_yy]

where ``P`` is the fraction of pairs with exactly one empty mask and ``D`` the mean of
``(1 − IoU)`` over all pairs, counting only non-empty ones. Printed for the model and for the
best single reader (a reader's mask repeated N times), per slice then averaged (mean ±
s.e.m.), with the empty-mask rates. Reads validation slices only.

    python benchmarks/lidc_ged_parts.py --model M --data D/val --items 300 --reader 2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def ged_parts(samples: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The presence and shape parts of GED² (they sum to it) and the empty-mask rates."""
    from napari_berdiff.uncertainty import pairwise_iou

    s = samples.reshape(len(samples), -1) > 0
    y = labels.reshape(len(labels), -1) > 0
    es, ey = ~s.any(1), ~y.any(1)

    def split(a_empty: np.ndarray, b_empty: np.ndarray, iou: np.ndarray) -> tuple[float, float]:
        one = a_empty[:, None] ^ b_empty[None, :]
        both = ~a_empty[:, None] & ~b_empty[None, :]
        return float(one.mean()), float(((1.0 - iou) * both).mean())

    p_ys, d_ys = split(ey, es, pairwise_iou(y, s))
    p_ss, d_ss = split(es, es, pairwise_iou(s, s))
    p_yy, d_yy = split(ey, ey, pairwise_iou(y, y))
    presence = 2 * p_ys - p_ss - p_yy
    shape = 2 * d_ys - d_ss - d_yy
    return {"ged2": presence + shape, "presence": presence, "shape": shape,
            "empty_samples": float(es.mean()), "empty_readers": float(ey.mean())}


def _stat(values: list[float]) -> str:
    a = np.asarray(values, np.float64)
    return f"{a.mean():.4f} ± {a.std(ddof=1) / np.sqrt(a.size):.4f}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="a validation folder (LIDC-crops layout)")
    ap.add_argument("--items", type=int, default=300, help="the first items")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--reader", type=int, default=2, help="the best single reader's position")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    desc = json.loads((Path(args.data) / "dataset.json").read_text())
    if desc.get("split") != "val":
        raise SystemExit(f"this diagnostic reads the validation split only; {args.data} is "
                         f"{desc.get('split')!r}")
    import torch

    from napari_berdiff.checkpoints import load_model
    from napari_berdiff.data.layout import load_dataset
    from napari_berdiff.spacing import sample_at_spacing

    torch.set_num_threads(1)
    model = load_model(args.model)
    ds = load_dataset(args.data)[: args.items]
    spacing = desc.get("spacing")
    rows: dict[str, list[dict[str, float]]] = {"model": [], "reader": []}
    for i, item in enumerate(ds):
        labels = np.asarray(item.masks) > 0
        res = sample_at_spacing(model, item.image_chw[0], spacing, n=args.n, seed=i)
        rows["model"].append(ged_parts(res.masks, labels))
        k = min(args.reader, len(labels) - 1)
        rows["reader"].append(ged_parts(np.repeat(labels[k:k + 1], args.n, 0), labels))
    print(f"{model.name}: {len(ds)} slices of {args.data}, N = {args.n}; best reader = "
          f"position {args.reader}")
    print(f"{'':8} {'GED²':>17} {'presence part':>17} {'shape part':>17} "
          f"{'empty samples':>17} {'empty readers':>17}")
    summary = {}
    for who, rs in rows.items():
        cols = {k: [r[k] for r in rs] for k in rs[0]}
        summary[who] = {k: float(np.mean(v)) for k, v in cols.items()}
        print(f"{who:8} " + " ".join(f"{_stat(cols[k]):>17}" for k in
                                     ("ged2", "presence", "shape", "empty_samples",
                                      "empty_readers")))
    diff = {k: [m[k] - r[k] for m, r in zip(rows["model"], rows["reader"])]
            for k in ("ged2", "presence", "shape")}
    print("model − reader (paired): " + ", ".join(f"{k} {_stat(v)}" for k, v in diff.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "rows": rows,
                                               "args": vars(args)}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
