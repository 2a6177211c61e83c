"""What the semi-real LIDC images can say about presence (issue 20): the presence head against
oracles that know the renderer's own inputs.

A slice's target for the presence head is ``q``, the share of its 4 reader masks that are not
empty. The renderer draws the nodule's density from the readers' agreement ``k(x) / m`` (``k``
readers marking pixel ``x`` of the ``m`` who marked the nodule), with contrast, texture and
edge blur from the readers' ratings (``napari_berdiff.data.lidc_render``). Each oracle below
predicts ``q`` from noise-free summaries of those inputs: the mean ``q`` of the training
slices in the same cell (continuous features cut at their training quantiles), validation
slices scored. The presence head sees only the 1 mm image. Reads train and validation only.

    python benchmarks/lidc_presence_limit.py --train D/train --val D/val --val64 D/val64 \
        --model models/berdiff-lidc-semireal-64.safetensors
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

#: name → what it is, for the printed table
FEATURES = {
    "area": "pixels any reader marks",
    "ratings": "the readers' median subtlety, texture and margin",
    "max_agreement": "the largest k/m on the slice (the densest core)",
    "levels": "distinct agreement levels k/m on the slice (the density terraces)",
}
ORACLES = (("area",), ("area", "ratings"), ("area", "ratings", "max_agreement"), ("levels",))


def slice_features(root: Path) -> tuple[dict[str, np.ndarray], np.ndarray, list[str]]:
    """Per slice of a ``berdiff data lidc`` folder: the oracle features, ``q`` and the ids."""
    from napari_berdiff.data.layout import load_lidc_layout

    info = json.loads((root / "dataset.json").read_text())["info"]
    rows: dict[str, list] = {k: [] for k in FEATURES}
    q, ids = [], []
    for item in load_lidc_layout(root, crop=True):
        key = f"{item.case}/{item.slice}"
        meta = info[key]
        agree = item.masks.sum(0) / max(int(meta["readers"]), 1)
        rated = [[v for v in meta["ratings"][name] if v > 0]
                 for name in ("subtlety", "texture", "margin")]
        rows["area"].append([float((agree > 0).sum())])
        rows["ratings"].append([float(np.median(v)) if v else 0.0 for v in rated])
        rows["max_agreement"].append([float(agree.max())])
        rows["levels"].append([float(len(np.unique(np.round(agree[agree > 0], 4))))])
        q.append(float(item.masks.reshape(len(item.masks), -1).any(1).mean()))
        ids.append(key)
    return {k: np.asarray(v) for k, v in rows.items()}, np.asarray(q), ids


def cells(train: np.ndarray, other: np.ndarray, bins: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Each row's cell id, per column: values with few distinct levels as they are, others cut
    at the training quantiles."""
    ta, oa = [], []
    for c in range(train.shape[1]):
        col = train[:, c]
        if len(np.unique(col)) <= 12:
            ta.append(col), oa.append(other[:, c])
        else:
            edges = np.unique(np.quantile(col, np.linspace(0, 1, bins + 1)[1:-1]))
            ta.append(np.digitize(col, edges)), oa.append(np.digitize(other[:, c], edges))
    return np.stack(ta, 1), np.stack(oa, 1)


def cell_means(train_x: np.ndarray, train_q: np.ndarray, val_x: np.ndarray,
               min_count: int = 5) -> np.ndarray:
    """The mean training ``q`` of each validation row's cell (the overall mean for a cell with
    fewer than ``min_count`` training slices)."""
    tc, vc = cells(train_x, val_x)
    sums: dict[tuple, list[float]] = {}
    for key, value in zip(map(tuple, tc), train_q):
        sums.setdefault(key, []).append(value)
    overall = float(train_q.mean())
    return np.array([np.mean(sums[k]) if len(sums.get(k, ())) >= min_count else overall
                     for k in map(tuple, vc)])


def head_presence(model_path: str, root64: Path) -> dict[str, float]:
    """The presence head's p for every slice of a 1 mm folder, by slice id."""
    import torch

    from napari_berdiff import load_model
    from napari_berdiff.data.layout import load_lidc_layout

    model = load_model(model_path)
    items = list(load_lidc_layout(root64, crop=False))
    out: dict[str, float] = {}
    with torch.inference_mode():
        for i in range(0, len(items), 64):
            batch = items[i:i + 64]
            x = torch.from_numpy(np.stack([model.prepare(it.image) for it in batch]))
            p = torch.sigmoid(model.net.presence(model.net.encode(x))).numpy()
            out.update({f"{it.case}/{it.slice}": float(v) for it, v in zip(batch, p)})
    return out


def mean_sem(v: np.ndarray) -> str:
    return f"{v.mean():.4f} ± {v.std(ddof=1) / np.sqrt(len(v)):.4f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train", type=Path, required=True, help="berdiff data lidc, train")
    ap.add_argument("--val", type=Path, required=True, help="berdiff data lidc, val")
    ap.add_argument("--val64", type=Path, required=True, help="val at 1 mm (lidc_half_res)")
    ap.add_argument("--model",
                    default=str(ROOT / "models" / "berdiff-lidc-semireal-64.safetensors"))
    args = ap.parse_args()
    ftr, qtr, _ = slice_features(args.train)
    fva, qva, ids = slice_features(args.val)
    head = head_presence(args.model, args.val64)
    p = np.array([head[i] for i in ids])
    err_head = (p - qva) ** 2
    terraces = np.mean(np.isclose(fva["levels"][:, 0] / 4, qva))
    print(f"{len(qtr)} training and {len(qva)} validation slices; validation q mean "
          f"{qva.mean():.3f}; q equals (agreement levels)/4 on {terraces:.1%} of them")
    print(f"the training mean alone: MSE {mean_sem((qtr.mean() - qva) ** 2)}")
    print(f"the presence head (sees the 1 mm image): MSE {mean_sem(err_head)}")
    for names in ORACLES:
        xtr = np.concatenate([ftr[n] for n in names], 1)
        xva = np.concatenate([fva[n] for n in names], 1)
        err = (cell_means(xtr, qtr, xva) - qva) ** 2
        print(f"oracle on {' + '.join(names)}: MSE {mean_sem(err)}; "
              f"paired difference from the head {mean_sem(err - err_head)}")
    for name, text in FEATURES.items():
        print(f"  {name}: {text}")


if __name__ == "__main__":
    main()
