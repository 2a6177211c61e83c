"""Evaluation against several annotators: GED², HM-IoU, soft Dice and Dice.

Methods compared on every item of a data set, each giving N binary masks:

* ``model``: N samples of the diffusion model (or, for a segmentor, its mask N times);
* ``deterministic``: the deterministic U-Net baseline's mask repeated N times;
* ``oracle``: the item's K annotations drawn uniformly with replacement, the best any method
  can do with N samples against those K annotations (DESIGN §7);
* ``oracle_fresh`` (phantoms only): N *new* annotations drawn from the phantom's generative
  process (:func:`~napari_berdiff.data.phantoms.oracle_samples` with ``fresh=True``), i.e.
  what a perfect model of the mask distribution scores, since the boundary jitter of the
  reference annotations cannot be predicted from the image;
* ``annotator_k``: annotator k's mask repeated N times (perfect shapes, no diversity);
  ``best_annotator`` repeats the summary of the annotator with the lowest mean GED².

Metrics per item (then averaged over items):

* ``ged2``: squared generalised energy distance with d = 1 − IoU (BerDiff's ``test.py``);
* ``hm_iou``: Hungarian-matched IoU, labels repeated to N;
* ``soft_dice``: Dice of the mean mask vs the mean label, averaged over thresholds
  {.1, .3, .5, .7, .9};
* ``dice``: mean Dice over all (sample, annotator) pairs (1 when both are empty);
* ``hm_iou_loo``: HM-IoU against the annotations with one annotator left out, averaged over
  which one; ``annotator_k`` is scored against the others only. Plain ``hm_iou`` gives a
  repeated annotator N/K exact matches with its own copies in the reference (IoU 1 each),
  which no sample of a model can get; this one compares them on equal terms. Needs K ≥ 2.

Items of phantoms carry ``faint``; the summary also gives each metric on the *clear* items.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..data.dataset import SegDataset
from ..uncertainty import ged2, hm_iou, majority_vote_dice, soft_dice

__all__ = ["Method", "EvalReport", "evaluate", "evaluate_methods", "model_method",
           "segmentor_method", "constant_method", "format_table", "item_metrics",
           "hm_iou_leave_one_out", "default_baseline_path", "METRICS"]

METRICS = ("ged2", "hm_iou", "soft_dice", "dice", "mv_dice")
#: Every per-item figure of a report: :data:`METRICS` and ``hm_iou_loo``.
REPORTED = METRICS + ("hm_iou_loo",)
#: A method maps (image (C,H,W) float32 as loaded, n, seed) to (n, H, W) binary masks.
Method = Callable[[np.ndarray, int, int], np.ndarray]


def mean_pair_dice(samples: np.ndarray, labels: np.ndarray) -> float:
    """Mean Dice over all (sample, label) pairs; 1 for two empty masks."""
    s = samples.reshape(samples.shape[0], -1).astype(bool)
    y = labels.reshape(labels.shape[0], -1).astype(bool)
    inter = s.astype(np.float64) @ y.T.astype(np.float64)
    denom = s.sum(1)[:, None] + y.sum(1)[None, :]
    d = np.where(denom > 0, 2 * inter / np.maximum(denom, 1), 1.0)
    return float(d.mean())


def item_metrics(samples: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """The five metrics of N binary samples against K labels."""
    samples = (np.asarray(samples) > 0).astype(np.uint8)
    labels = (np.asarray(labels) > 0).astype(np.uint8)
    return {
        "ged2": ged2(samples, labels),
        "hm_iou": hm_iou(samples, labels),
        "soft_dice": soft_dice(samples.astype(np.float32), labels),
        "dice": mean_pair_dice(samples, labels),
        "mv_dice": majority_vote_dice(samples, labels),
    }


def hm_iou_leave_one_out(samples: np.ndarray, labels: np.ndarray, own: int | None = None
                         ) -> float:
    """HM-IoU against ``labels`` without label ``own``; with ``own=None`` the mean over every
    label left out in turn. NaN for fewer than two labels."""
    samples = (np.asarray(samples) > 0).astype(np.uint8)
    labels = (np.asarray(labels) > 0).astype(np.uint8)
    k = labels.shape[0]
    if k < 2:
        return float("nan")
    left_out = range(k) if own is None else [own]
    return float(np.mean([hm_iou(samples, np.delete(labels, j, 0)) for j in left_out]))


# ---------------------------------------------------------------------------- methods
def model_method(model: Any, steps: int | str | None = None, max_batch: int | None = None,
                 spacing: Any = None) -> Method:
    """Sampling a :class:`~napari_berdiff.model.DiffusionModel` (a segmentor repeats its mask).

    ``spacing`` (mm per pixel of the images, when known) resamples each image to the model's
    spacing and the masks back (:mod:`napari_berdiff.spacing`).
    """
    if getattr(model, "kind", None) == "segmentor":
        return segmentor_method(model, spacing)
    if getattr(model, "kind", None) == "refiner":
        raise ValueError("a refiner needs a prior mask for every image; evaluate it with the "
                         "refiner tools, not with `berdiff evaluate`")

    from ..spacing import sample_at_spacing

    def run(image: np.ndarray, n: int, seed: int) -> np.ndarray:
        res = sample_at_spacing(model, image, spacing, n=n, steps=steps, seed=seed,
                                max_batch=max_batch)
        return res.masks

    return run


def segmentor_method(model: Any, spacing: Any = None) -> Method:
    """The deterministic baseline: one mask (UNet fed zeros at t = 0, > 0.5) repeated N times."""
    from ..spacing import segment_at_spacing

    def run(image: np.ndarray, n: int, seed: int) -> np.ndarray:
        prob = segment_at_spacing(model, image, spacing)
        return np.repeat((prob > 0.5).astype(np.uint8)[None], n, 0)

    return run


def constant_method(mask: np.ndarray) -> Method:
    """Always the same mask (a sanity reference)."""
    m = (np.asarray(mask) > 0).astype(np.uint8)

    def run(image: np.ndarray, n: int, seed: int) -> np.ndarray:
        return np.repeat(m[None], n, 0)

    return run


def default_baseline_path(model: Any = None, model_path: str | Path | None = None) -> Path | None:
    """The baseline a model is compared against by default.

    The model's metadata may name it (``training.baseline``, a file next to the model);
    otherwise the bundled ``models/unet-phantom-64.safetensors`` when it exists.
    """
    meta = getattr(model, "metadata", {}) or {}
    named = (meta.get("training") or {}).get("baseline") or meta.get("baseline")
    if named and model_path is not None:
        p = Path(model_path).parent / str(named)
        if p.exists():
            return p
    bundled = Path(__file__).resolve().parents[2] / "models" / "unet-phantom-64.safetensors"
    return bundled if bundled.exists() else None


# ---------------------------------------------------------------------------- the report
@dataclass
class EvalReport:
    """Per-item metrics by method, and their summary."""

    per_item: dict[str, dict[str, list[float]]]
    items: list[dict[str, Any]]
    n: int
    seconds: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, dict[str, Any]]:
        """``{method: {metric: mean, metric_sem: …, metric_clear: …, n_items: …}}`` with
        ``best_annotator`` added, and for ``model`` the fraction of the GED² gap between the
        best annotator and the oracle that it closes."""
        clear = np.array([not it.get("faint", False) for it in self.items])
        out: dict[str, dict[str, Any]] = {}
        for meth, mets in self.per_item.items():
            d: dict[str, Any] = {}
            for k, vals in mets.items():
                v = np.asarray(vals, dtype=np.float64)
                ok = np.isfinite(v)
                d[k] = float(v[ok].mean()) if ok.any() else float("nan")
                d[f"{k}_sem"] = float(v[ok].std(ddof=1) / math.sqrt(ok.sum())) if ok.sum() > 1 \
                    else float("nan")
                if clear.any() and (~clear).any():
                    c = ok & clear
                    d[f"{k}_clear"] = float(v[c].mean()) if c.any() else float("nan")
                d["n_items"] = int(ok.sum())
            if meth in self.seconds:
                d["seconds"] = round(self.seconds[meth], 2)
            out[meth] = d
        annot = [m for m in out if m.startswith("annotator_")]
        if annot:
            best = min(annot, key=lambda m: out[m]["ged2"])
            out["best_annotator"] = {**out[best], "which": best}
            loo = [m for m in annot if np.isfinite(out[m].get("hm_iou_loo", float("nan")))]
            if loo:
                best_loo = max(loo, key=lambda m: out[m]["hm_iou_loo"])
                out["best_annotator_loo"] = {**out[best_loo], "which": best_loo}
            if "model" in out and "oracle" in out:
                gap = out["best_annotator"]["ged2"] - out["oracle"]["ged2"]
                if gap > 0:
                    out["model"]["ged2_gap_closed"] = float(
                        (out["best_annotator"]["ged2"] - out["model"]["ged2"]) / gap)
            if "model" in out and "oracle_fresh" in out:
                gap = out["best_annotator"]["ged2"] - out["oracle_fresh"]["ged2"]
                if gap > 0:
                    out["model"]["ged2_gap_closed_fresh"] = float(
                        (out["best_annotator"]["ged2"] - out["model"]["ged2"]) / gap)
        return out

    def to_json(self, path: str | Path | None = None) -> str:
        doc = {**self.summary(), "_settings": {**self.settings, "n": self.n,
                                                "n_items": len(self.items)}}
        text = json.dumps(doc, indent=1, allow_nan=True)
        if path is not None:
            Path(path).write_text(text)
        return text


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    """A plain-text table: one row per method."""
    order = ["model", "deterministic", "oracle", "oracle_fresh", "best_annotator",
             "best_annotator_loo"]
    rows = [m for m in order if m in summary] + sorted(
        m for m in summary if m not in order)
    has_clear = any("hm_iou_clear" in summary[m] for m in rows)
    head = f"{'method':<20}{'GED²':>8}{'HM-IoU':>8}{'softDice':>10}{'Dice':>8}{'HM-IoU LOO':>12}"
    if has_clear:
        head += f"{'HM-IoU clear':>14}"
    lines = [head, "-" * len(head)]
    nan = float("nan")
    for m in rows:
        s = summary[m]
        label = m
        if m == "best_annotator":
            label = f"best annot. {s.get('which', '')[10:]}"
        elif m == "best_annotator_loo":
            label = f"best LOO annot. {s.get('which', '')[10:]}"
        line = (f"{label:<20}{s['ged2']:>8.4f}{s['hm_iou']:>8.4f}{s['soft_dice']:>10.4f}"
                f"{s['dice']:>8.4f}{s.get('hm_iou_loo', nan):>12.4f}")
        if has_clear:
            line += f"{s.get('hm_iou_clear', nan):>14.4f}"
        lines.append(line)
    lines.append("HM-IoU LOO: against the annotations with one annotator left out (a repeated "
                 "annotator: the others only)")
    if "ged2_gap_closed" in summary.get("model", {}):
        lines.append(f"model closes {100 * summary['model']['ged2_gap_closed']:.0f}% of the GED² "
                     "gap between the best single annotator and the oracle")
    if "ged2_gap_closed_fresh" in summary.get("model", {}):
        lines.append(f"model closes {100 * summary['model']['ged2_gap_closed_fresh']:.0f}% of the "
                     "GED² gap between the best single annotator and oracle_fresh")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- evaluation
def _phantom_of(item: Any) -> Any:
    """The phantom an item was generated from, when its info says so and it matches."""
    from ..data.phantoms import make_phantom

    info = item.info or {}
    if "seed" not in info or "size" not in info or "thresholds" not in info:
        return None
    try:
        ph = make_phantom(int(info["seed"]), int(info["size"]), len(info["thresholds"]))
    except (TypeError, ValueError):
        return None
    return ph if np.array_equal(ph.masks, (item.masks > 0).astype(np.uint8)) else None


def _record(into: dict[str, list[float]], masks: np.ndarray, labels: np.ndarray,
            own: int | None = None) -> None:
    """Append one item's figures (``own``: the annotator whose masks these are)."""
    for k, v in item_metrics(masks, labels).items():
        into[k].append(v)
    into["hm_iou_loo"].append(hm_iou_leave_one_out(masks, labels, own))


def evaluate_methods(
    dataset: SegDataset,
    methods: dict[str, Method],
    n: int = 16,
    seed: int = 0,
    oracle: bool = True,
    annotators: bool = True,
    progress: bool = False,
    settings: dict[str, Any] | None = None,
    fresh_oracle: bool | None = None,
) -> EvalReport:
    """Score every method on every item of ``dataset`` with N masks per item.

    The seed of item i is ``seed + i`` for every method, so runs are reproducible.
    ``fresh_oracle`` adds ``oracle_fresh`` (None: when the items are phantoms).
    """
    from ..data.phantoms import oracle_samples

    if len(dataset) == 0:
        raise ValueError("nothing to evaluate: the data set (split) is empty")
    if int(n) < 1:
        raise ValueError(f"N must be >= 1, got {n}")
    n = int(n)
    kmax = dataset.max_annotators()
    names = list(methods)
    phantoms: list[Any] = []
    if fresh_oracle is not False:
        phantoms = [_phantom_of(it) for it in dataset]
        if any(p is None for p in phantoms):
            if fresh_oracle:
                raise ValueError("oracle_fresh needs phantom items (info with seed and size)")
            phantoms = []
    if oracle:
        names.append("oracle")
    if phantoms:
        names.append("oracle_fresh")
    if annotators:
        names += [f"annotator_{k}" for k in range(kmax)]
    per_item = {m: {k: [] for k in REPORTED} for m in names}
    seconds = {m: 0.0 for m in methods}
    items_info = []
    it = enumerate(dataset)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, total=len(dataset), desc="evaluate", unit="item")
    for i, item in it:
        labels = (item.masks > 0).astype(np.uint8)
        items_info.append({"case": item.case, "slice": item.slice,
                           "faint": bool(item.info.get("faint", False))})
        for name, fn in methods.items():
            tic = time.perf_counter()
            masks = np.asarray(fn(item.image, n, seed + i))
            seconds[name] += time.perf_counter() - tic
            if masks.shape != (n, *labels.shape[1:]):
                raise ValueError(f"method {name!r} returned masks of shape {masks.shape}; "
                                 f"expected {(n, *labels.shape[1:])}")
            _record(per_item[name], masks, labels)
        if oracle:
            rng = np.random.default_rng([seed, i, 7])
            _record(per_item["oracle"], labels[rng.integers(0, labels.shape[0], n)], labels)
        if phantoms:
            o = oracle_samples(phantoms[i], n, np.random.default_rng([seed, i, 11]), fresh=True)
            _record(per_item["oracle_fresh"], o, labels)
        if annotators:
            for a in range(kmax):
                key = f"annotator_{a}"
                if a < labels.shape[0]:
                    _record(per_item[key], np.repeat(labels[a:a + 1], n, 0), labels, own=a)
                else:
                    for k in REPORTED:
                        per_item[key][k].append(float("nan"))
    return EvalReport(per_item=per_item, items=items_info, n=n, seconds=seconds,
                      settings=dict(settings or {}))


def evaluate(
    model: Any,
    dataset: SegDataset,
    n: int = 16,
    steps: int | str | None = None,
    seed: int = 0,
    baseline: Any = None,
    oracle: bool = True,
    annotators: bool = True,
    progress: bool = False,
    spacing: Any = None,
) -> EvalReport:
    """Evaluate a model (and a deterministic baseline, when given) on a data set.

    ``model`` and ``baseline`` are loaded models (:func:`napari_berdiff.load_model`).
    ``spacing`` (mm per pixel; default: the data set's ``dataset.json`` spacing) resamples
    the images to each model's spacing and the masks back to the images' grid.
    """
    spacing = dataset.description.get("spacing") if spacing is None else spacing
    methods: dict[str, Method] = {"model": model_method(model, steps, spacing=spacing)}
    if baseline is not None:
        if getattr(baseline, "kind", None) != "segmentor":
            raise ValueError(f"the baseline must be a deterministic segmentor, got kind "
                             f"{getattr(baseline, 'kind', '?')!r}")
        methods["deterministic"] = segmentor_method(baseline, spacing)
    settings = {"steps": steps if steps is not None else getattr(
        getattr(model, "diffusion", None), "default_steps", None), "seed": seed,
        "model": getattr(model, "name", ""),
        "baseline": getattr(baseline, "name", None) if baseline is not None else None,
        "data": dataset.description.get("description") or dataset.description.get("root", ""),
        "split": dataset.description.get("split", ""), "spacing": spacing}
    return evaluate_methods(dataset, methods, n=n, seed=seed, oracle=oracle,
                            annotators=annotators, progress=progress, settings=settings)
