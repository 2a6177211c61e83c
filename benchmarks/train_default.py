"""The exact recipe behind the bundled models in ``models/``; prints its figures.

    .venv/bin/python benchmarks/train_default.py train --kind bernoulli --minutes 70
    .venv/bin/python benchmarks/train_default.py train --kind deterministic --minutes 70
    # (the bundled pair then ran `train ... --resume --minutes 45` to reach the 4500 steps)
    .venv/bin/python benchmarks/train_default.py evaluate --card   # held-out phantoms, N = 16

The bundled ``berdiff-phantom-64`` (session 11) came from::

    train --kind bernoulli --variant co-presence-readers --steps 14000 --n-train 6000 \
        --minutes 100
    tune --model M --candidates ddim:10:0:1 ddim:10:0:0.25 ddim:5:0:0.25 --n-val 200

The first bundled pair's two training runs ran at the same time, each with one torch thread,
on a 2-core CPU shared with other work, so they had the same wall-clock budget.

Data: phantoms from :mod:`napari_berdiff.data.phantoms` at 64×64 with K = 4 annotators,
quantised to 8 bits as the LIDC-layout PNGs are. Training seeds 10000..10000+n_train-1;
held-out test seeds 900000..900000+n_test-1, i.e. the cases
``berdiff data phantoms --seed 9 --size 64 --cases n_test`` writes. Each figure of the card
is measured by this script (``evaluate --card``) and stored in the model's metadata too.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from napari_berdiff.data.dataset import SegDataset, SegItem  # noqa: E402
from napari_berdiff.data.phantoms import make_phantom  # noqa: E402
from napari_berdiff.diffusion import DiffusionConfig  # noqa: E402
from napari_berdiff.networks import network_description  # noqa: E402
from napari_berdiff.training import (  # noqa: E402
    TrainConfig,
    condition_once_network as lib_condition_once_network,
    default_diffusion,
    default_network,
    train,
)

SIZE = 64
TRAIN_SEED0, TEST_SEED0 = 10_000, 900_000
#: Validation phantoms for choosing sampling settings (``tune``): never the test cases.
VAL_SEED0 = 800_000
NAMES = {"bernoulli": "berdiff-phantom-64", "gaussian": "gaussian-phantom-64",
         "deterministic": "unet-phantom-64"}
MODELS = ROOT / "models"
#: the ``train`` command's defaults (the card names the options only where a run changed them)
DEFAULT_STEPS, DEFAULT_N_TRAIN = 4500, 3000


def phantom_dataset(seed0: int, n: int, size: int = SIZE) -> SegDataset:
    items = []
    for s in range(seed0, seed0 + n):
        p = make_phantom(s, size)
        img = np.round(p.image * 255) / 255  # as the 8-bit PNG layout stores it
        items.append(SegItem(img.astype(np.float32), p.masks, f"phantom{s:06d}", "000",
                             info=p.info))
    desc = (f"synthetic CT-like phantoms {size}x{size}, 4 annotators "
            f"(napari_berdiff.data.phantoms), seeds {seed0}..{seed0 + n - 1}")
    return SegDataset(items, {"layout": "phantoms", "description": desc})


def _split_readers(variant: str) -> tuple[str, int]:
    """``(base variant, reader count)``: a ``-readers`` suffix conditions on 4 readers."""
    if variant.endswith("-readers"):
        return variant[: -len("-readers")], 4
    return variant, 0


def condition_once_network(kind: str, variant: str = "co") -> dict:
    """The condition-once network of the ``co`` variants (issue 7): a full-resolution image
    encoder run once, and a base-24 denoiser with 2 res blocks per level at half resolution
    (:func:`napari_berdiff.training.condition_once_network`).
    ``co-full``: a base-16 denoiser at full resolution, widths 16/32/64.
    ``co-head``: the ``co`` network with a width-16 full-resolution output head.
    ``co-deep``: the ``co`` network with a 4× (not 2×) wide lowest denoiser level.
    ``co-sc``: the ``co`` network, self-conditioned on the previous step's x̂0.
    ``co-sc-head``: ``co-head`` self-conditioned (the head sees x̂0 at full resolution too).
    ``co-sc-gap``: ``co-sc`` trained on x̂0 from a state 111 steps noisier (the sampler's gap).
    ``co-unroll-25-prior``: the ``co`` network with a prior head (``prior_head``).
    ``co-presence``, ``co-unroll-25-presence``: the ``co`` network with a presence head
    (``presence_head``).
    ``<variant>-readers``: that network conditioned on the 4 annotators (``readers``)."""
    variant, readers = _split_readers(variant)
    cfg = lib_condition_once_network(kind, SIZE, self_condition=variant.startswith("co-sc"))
    cfg = cfg.replace(readers=readers)
    if variant == "co-full":
        cfg = cfg.replace(model_channels=16, channel_mult=(1, 2, 4), unshuffle=1)
    elif variant == "co-deep":
        cfg = cfg.replace(channel_mult=(1, 2, 4))
    elif variant in ("co-head", "co-sc-head"):
        cfg = cfg.replace(full_res_head=16)
    elif variant == "co-unroll-25-prior":
        cfg = cfg.replace(prior_head=True)
    elif variant.endswith("-presence"):
        cfg = cfg.replace(presence_head=True)
    return network_description(cfg)


def recipe(kind: str, steps: int, minutes: float, batch: int, variant: str = "v1") -> TrainConfig:
    """A recipe variant.

    ``v1``: the session-1 models (ConditionalUNet base 16, attention at downsample 4).
    ``v2``: the same without attention at downsample 4 (about 1.5x faster per step) and
    timesteps drawn only among the 10 the sampler visits.
    ``co``: the condition-once network (:func:`condition_once_network`), uniform timesteps.
    ``co-visited``: the same, timesteps drawn among the visited ones.
    ``co-full``, ``co-head``, ``co-deep``, ``co-sc``: other condition-once networks
    (:func:`condition_once_network`).
    ``co-eps``: the ``co`` network predicting the flip map ε instead of x0.
    ``co-unroll``, ``co-unroll-all``: the ``co`` recipe with half / all of the training
    states made by one sampler step of the network itself (``TrainConfig.unroll_prob``).
    ``co-unroll-25``: ``co-unroll-all`` for a 25-step sampler (the default step count, so the
    unrolled step's gap is 25-step spacing); ``co-unroll-25-prior``: the same with a prior
    head trained with BCE + Dice (:func:`condition_once_network`).
    ``co-presence``, ``co-unroll-25-presence``: ``co`` and ``co-unroll-25`` with a presence
    head, the denoiser trained on non-empty annotations only.
    ``<co variant>-readers``: that recipe with the network conditioned on the annotator.
    """
    net = default_network("gaussian" if kind == "gaussian" else "bernoulli", SIZE)
    if variant == "v2":
        net = net.replace(attention_resolutions=())
    net = net.to_dict()
    if variant.startswith("co"):
        net = condition_once_network(kind, variant)
    variant, _ = _split_readers(variant)
    # Gaussian: Wolleb et al.'s linear schedule and DDPM (see default_diffusion).
    diff = default_diffusion(kind)
    if variant == "co-eps":
        diff = diff.replace(prediction="eps")
    elif variant.startswith("co-unroll-25"):
        diff = diff.replace(default_steps=25)
    return TrainConfig(kind=kind, network=net, diffusion=diff.to_dict(), steps=steps,
                       batch_size=batch, lr=1e-3, warmup=200, min_lr_ratio=0.05,
                       ema_decay=0.999, grad_clip=1.0, augment=True, checkpoint_every=250,
                       max_minutes=minutes, seed=0, threads=1,
                       t_sampling="visited" if variant in ("v2", "co-visited") else "uniform",
                       self_condition_gap=111 if variant == "co-sc-gap" else 0,
                       unroll_prob={"co-unroll": 0.5, "co-unroll-all": 1.0,
                                    "co-unroll-25": 1.0, "co-unroll-25-prior": 1.0,
                                    "co-unroll-25-presence": 1.0}.get(variant, 0.0))


def sampling_speed(model, size: int, n: int = 16, steps: int = 10, repeats: int = 3) -> float:
    """Median seconds to sample n masks × steps on a size × size phantom."""
    img = make_phantom(1, size).image
    times = []
    for r in range(repeats):
        tic = time.perf_counter()
        model.sample_all(img, n=n, steps=steps, seed=r)
        times.append(time.perf_counter() - tic)
    return float(np.median(times))


# ---------------------------------------------------------------------------- model cards
def _f(summary: dict, m: str, k: str) -> str:
    v = summary.get(m, {}).get(k)
    return "–" if v is None or v != v else f"{v:.3f}"


def _table(summary: dict, own: str, name: str) -> str:
    labels = {
        "model": "Bernoulli diffusion model (berdiff-phantom-64, condition-once network)",
        "deterministic": "deterministic U-Net baseline (unet-phantom-64), mask repeated N times",
        "best_annotator": "best single annotator repeated N times "
                          f"({summary.get('best_annotator', {}).get('which', '?')})",
        "best_annotator_loo": "best single annotator by HM-IoU LOO, repeated N times "
                              f"({summary.get('best_annotator_loo', {}).get('which', '?')})",
        "oracle": "oracle: the 4 reference annotations resampled uniformly",
        "oracle_fresh": "oracle_fresh: new annotations from the phantom's generative process "
                        "(a perfect model)",
    }
    labels[own] = f"**{name} (this model)**"
    rows = ["| method | GED² ↓ | HM-IoU ↑ | soft Dice ↑ | Dice ↑ | HM-IoU LOO ↑ "
            "| GED² clear | HM-IoU clear |",
            "|---|---|---|---|---|---|---|---|"]
    same_best = (summary.get("best_annotator_loo", {}).get("which")
                 == summary.get("best_annotator", {}).get("which"))
    for m in ("model", "deterministic", "best_annotator", "best_annotator_loo", "oracle_fresh",
              "oracle"):
        if m in summary and not (m == "best_annotator_loo" and same_best):
            rows.append(f"| {labels[m]} | {_f(summary, m, 'ged2')} ± {_f(summary, m, 'ged2_sem')}"
                        f" | {_f(summary, m, 'hm_iou')} | {_f(summary, m, 'soft_dice')} | "
                        f"{_f(summary, m, 'dice')} | {_f(summary, m, 'hm_iou_loo')} | "
                        f"{_f(summary, m, 'ged2_clear')} | {_f(summary, m, 'hm_iou_clear')} |")
    return "\n".join(rows)


def variant_of(net: dict, diffusion: dict | None = None, recipe: dict | None = None) -> str:
    """The ``--variant`` of :func:`recipe` that builds this network (diffusion, recipe)."""
    base = _base_variant_of(net, diffusion, recipe)
    return base + "-readers" if net.get("readers") else base


def _base_variant_of(net: dict, diffusion: dict | None, recipe: dict | None) -> str:
    unroll = (recipe or {}).get("unroll_prob", 0.0)
    if unroll:
        if unroll == 1.0 and (diffusion or {}).get("default_steps") == 25:
            if net.get("presence_head"):
                return "co-unroll-25-presence"
            return "co-unroll-25-prior" if net.get("prior_head") else "co-unroll-25"
        return "co-unroll-all" if unroll == 1.0 else "co-unroll"
    if net.get("type") != "condition_once":
        return "v1" if net.get("attention_resolutions") else "v2"
    if net.get("unshuffle") == 1:
        return "co-full"
    if net.get("full_res_head"):
        return "co-sc-head" if net.get("self_condition") else "co-head"
    if tuple(net.get("channel_mult", ())) == (1, 2, 4):
        return "co-deep"
    if net.get("self_condition"):
        return "co-sc"
    if net.get("presence_head"):
        return "co-presence"
    diffusion = diffusion or {}
    eps_bernoulli = diffusion.get("kind") == "bernoulli" and diffusion.get("prediction") == "eps"
    return "co-eps" if eps_bernoulli else "co"


def _network_line(net: dict) -> str:
    if net.get("type") == "condition_once":
        where = (f"at 1/{net['unshuffle']} resolution (pixel-unshuffle; "
                 if net["unshuffle"] > 1 else "at full resolution (")
        head = (f", and a full-resolution output head of width {net['full_res_head']} that "
                "joins the shuffled-up denoiser features, the encoder's full-resolution "
                "features and x_t" if net.get("full_res_head") else "")
        sc = (", self-conditioned: the denoiser also takes the previous step's x̂0 (zeros at "
              "the first step, and on half the training steps)" if net.get("self_condition")
              else "")
        pres = (", and a presence head: from the deepest image features, the probability "
                "that an annotator marks anything; each sample is empty with the complement "
                "of it, and otherwise drawn by the denoiser, which is trained on non-empty "
                "annotations only" if net.get("presence_head") else "")
        readers = (f", conditioned on the reader: an embedding of the annotator index "
                   f"(0..{net['readers'] - 1}) joins the timestep embedding; sample i is "
                   f"drawn as reader i mod {net['readers']}" if net.get("readers") else "")
        return (f"ConditionOnceNet: an image encoder run once per call (base "
                f"{net['encoder_channels']}, {net['encoder_blocks']} residual blocks per level), "
                f"a per-step denoiser {where}"
                f"base {net['model_channels']}, channel_mult {tuple(net['channel_mult'])}, "
                f"{net['num_res_blocks']} res blocks per level, no attention){head}"
                f"{sc}{pres}{readers}; GroupNorm "
                f"with {net['norm_groups']} groups")
    return (f"ConditionalUNet (concatenation: mask state and image enter together every "
            f"step), base {net['model_channels']} channels, channel_mult "
            f"{tuple(net['channel_mult'])}, {net['num_res_blocks']} res blocks per level, "
            f"attention at downsample {tuple(net['attention_resolutions'])} and in the middle "
            f"block, GroupNorm with {net['norm_groups']} groups")


def _update_model(path: Path, metadata: dict, diffusion: DiffusionConfig | None = None) -> None:
    """Rewrite a model file in place with extra metadata (and other diffusion settings)."""
    from napari_berdiff.checkpoints import load_model, save_model

    m = load_model(path)
    tmp = path.with_name(path.name + ".tmp")
    save_model(m, tmp, diffusion=diffusion, metadata=metadata)
    tmp.replace(path)


def _tuning_lines(tuned: dict | None, kind: str) -> list[str]:
    """The validation scores behind the default sampling settings (``tune``), as a list."""
    if not tuned:
        return []
    seeds = tuned.get("validation_seeds", ["?", "?"])
    out = [f"- Sampling settings chosen by `train_default.py tune` on {seeds[1] - seeds[0] + 1} "
           f"validation phantoms (seeds {seeds[0]}..{seeds[1]}, never the test cases), "
           f"N = {tuned.get('n')}:"]
    for r in tuned.get("candidates", []):
        how = (f"{r['sampler'].upper()}, {r['steps']} steps" if kind == "gaussian" else
               f"{r['steps']} steps, draw correlation {r.get('draw_correlation', 0.0):g}, "
               f"temperature {r.get('temperature', 1.0):g}")
        out.append(f"  - {how}: HM-IoU {r['hm_iou']:.3f}, GED² {r['ged2']:.3f}")
    return out


def _size_options(rec: dict, meta: dict) -> str:
    """``--steps`` and ``--n-train`` of the ``train`` command, where not the defaults."""
    items = (meta.get("data", {}).get("dataset") or {}).get("items")
    out = f" --steps {rec['steps']}" if rec.get("steps") not in (None, DEFAULT_STEPS) else ""
    return out + (f" --n-train {items}" if items not in (None, DEFAULT_N_TRAIN) else "")


def write_card(path: Path, own: str, summary: dict, settings: dict, speed: dict | None,
               machine: str, note: str = "", speed_idle: bool = False) -> Path:
    """Store the held-out figures in the file's metadata and write ``<name>.md`` next to it."""
    from napari_berdiff.checkpoints import load_model

    heldout = {m: {k: v for k, v in d.items() if isinstance(v, (int, float, str))}
               for m, d in summary.items()}
    metrics = {"heldout_phantoms": heldout, "settings": settings}
    if speed:
        metrics["sampling_s_16_masks"] = speed
    _update_model(path, {"metrics": metrics})
    model = load_model(path)
    meta = model.metadata
    name = meta.get("name", path.stem)
    tr = meta.get("training", {})
    rec = tr.get("recipe", {})
    net = meta["network"]
    kind = meta.get("kind")
    gap = summary.get("model", {}).get("ged2_gap_closed")
    what = {"bernoulli": "A Bernoulli diffusion (BerDiff) segmentation model",
            "gaussian": "A Gaussian diffusion (Wolleb et al.) segmentation model",
            "segmentor": "The deterministic U-Net baseline (same backbone, BCE + Dice)"}[kind]
    lines = [
        f"# {name}", "",
        f"{what} trained on the synthetic phantoms of `napari_berdiff.data.phantoms`, bundled "
        "so that the plugin works offline. It is **not** a clinical model: it has only seen "
        "phantoms.", "",
        "## Data",
        f"- Training: {meta.get('data', {}).get('description', '')}.",
        f"- {SIZE}×{SIZE} crops centred near a lesion with K = 4 annotators (loosest to "
        "tightest contour, boundary jitter, faint lesions sometimes missed), 8-bit images "
        "normalised per image with min-max (stored in the metadata; sampling applies it).",
        f"- Held out: {settings['n_items']} phantoms, seeds {settings['test_seeds'][0]}.."
        f"{settings['test_seeds'][1]} (`berdiff data phantoms --seed 9 --size {SIZE} "
        f"--cases {settings['n_items']}` writes the same cases), "
        f"{settings.get('n_faint', '?')} of them faint.", "",
        "## Network",
        f"- {_network_line(net)}; {model.num_parameters():,} parameters.",
    ]
    if kind == "segmentor":
        lines.append("- Used as a segmentor: the mask input is all zeros and t = 0; the "
                     "sigmoid output > 0.5 is the mask.")
    else:
        d = meta["diffusion"]
        lines.append(f"- Diffusion: T = {d['timesteps']}, {d['schedule']} schedule, "
                     f"{d['prediction']}-prediction, {d['default_steps']} sampling steps by "
                     "default" + (f" ({d['sampler'].upper()})" if kind == "gaussian" else "")
                     + (f", correlated draws within a sample (draw_correlation ρ = "
                        f"{d['draw_correlation']:g}; 0 is BerDiff's independent draws)"
                        if d.get("draw_correlation") else "")
                     + (f", each step drawn from x̂0 sharpened with temperature "
                        f"{d['temperature']:g} (1 is BerDiff's step; the returned probabilities "
                        "are not sharpened)" if d.get("temperature", 1.0) != 1.0 else "") + ".")
        lines += _tuning_lines(meta.get("sampling_tuned"), kind)
    lines += [
        "", "## Recipe",
        "`benchmarks/train_default.py train --kind "
        f"{'deterministic' if kind == 'segmentor' else kind}"
        + ("" if kind == "segmentor" else f" --variant {variant_of(net, meta.get('diffusion'), rec)}")
        + _size_options(rec, meta) + "` (the exact script):",
        "", "```json", json.dumps(rec, indent=1), "```", "",
        f"Trained for **{tr.get('steps_done')} steps in {tr.get('train_time_s', 0) / 60:.1f} "
        f"min** of wall-clock time ({machine})." + (f" {note}" if note else ""), "",
        f"## Held-out figures (N = {settings['n']} masks per image"
        + (f", {settings.get('steps')} sampling steps" if kind != "segmentor" else "")
        + f", {settings['n_items']} phantoms, mean ± s.e.m.)", "",
        _table(summary, "model" if kind != "segmentor" else "deterministic", name), "",
        "GED² uses d = 1 − IoU (BerDiff's test.py); HM-IoU matches the samples to the "
        "annotations repeated to N; soft Dice averages thresholds .1 … .9; Dice is the mean "
        "over (mask, annotator) pairs. *HM-IoU LOO*: HM-IoU against the annotations with one "
        "annotator left out, averaged over which one; a repeated annotator is scored against "
        "the other annotators only (in plain HM-IoU its own copies in the reference give it "
        "N/K matches of IoU 1, which no model sample can get). *clear*: the held-out "
        "phantoms whose lesion is not faint.",
    ]
    if gap is not None and kind != "segmentor":
        lines += ["", f"The model closes **{100 * gap:.0f}%** of the GED² gap between the best "
                  "single annotator and the oracle."]
        gap_f = summary["model"].get("ged2_gap_closed_fresh")
        if gap_f is not None:
            lines += [f"It closes **{100 * gap_f:.0f}%** of the gap between the best single "
                      "annotator and oracle_fresh, the score of a perfect model of the mask "
                      "distribution (the reference annotations' boundary jitter cannot be "
                      "predicted from the image, so the resampling oracle is out of reach)."]
        verdict = []
        for ref, label in (("best_annotator", "the best single annotator"),
                           ("deterministic", "the deterministic baseline")):
            if ref not in summary:
                continue
            for k, name_k, better in (("ged2", "GED²", -1), ("hm_iou", "HM-IoU", 1)):
                a, b = summary["model"][k], summary[ref][k]
                beats = (a - b) * better > 0
                verdict.append(f"{'beats' if beats else 'does NOT beat'} {label} on {name_k} "
                               f"({a:.3f} vs {b:.3f})")
        lines += ["", "Against the two references the model " + "; ".join(verdict) + "."]
        if "best_annotator_loo" in summary:
            a, b = summary["model"]["hm_iou_loo"], summary["best_annotator_loo"]["hm_iou_loo"]
            lines += [f"With each annotator's own masks left out of its reference (HM-IoU LOO) "
                      f"the model scores {a:.3f} against the best single annotator's {b:.3f}."]
    if speed:
        lines += ["", "## Speed",
                  "Sampling 16 masks with one torch thread on this CPU (median of 3, "
                  + ("measured with no other job running" if speed_idle else
                     "measured while other jobs shared the 2 cores, so an upper bound") + "): "
                  + ", ".join(f"{k}: {v:.2f} s" for k, v in speed.items()) + "."]
    lines += ["", "Reproduce the figures with `benchmarks/train_default.py evaluate`.", ""]
    card = path.with_suffix(".md")
    card.write_text("\n".join(lines))
    return card


def _validation_scores(model, ds, steps: int | None, n: int) -> dict[str, np.ndarray]:
    """Per-phantom GED² and HM-IoU of ``n`` masks (seed i for phantom i)."""
    from napari_berdiff.training.evaluate import item_metrics

    scores = [item_metrics(model.sample_all(it.image, n=n, steps=steps, seed=i).masks, it.masks)
              for i, it in enumerate(ds.items)]
    return {k: np.array([sc[k] for sc in scores]) for k in ("ged2", "hm_iou")}


def _scored_row(per_case: dict[str, np.ndarray], first: dict[str, np.ndarray]) -> dict:
    """Means, ``HM-IoU + (1 − GED²)/2``, and the paired difference from ``first`` with its
    standard error (with 40 phantoms a difference of 0.02 in HM-IoU can be chance)."""
    row = {k: float(v.mean()) for k, v in per_case.items()}
    row["score"] = row["hm_iou"] + (1 - row["ged2"]) / 2
    for k, v in per_case.items():
        d = v - first[k]
        row[f"{k}_minus_first"] = float(d.mean())
        sem = d.std(ddof=1) / np.sqrt(len(d)) if len(d) > 1 else 0.0
        row[f"{k}_minus_first_sem"] = float(sem)
    return row


def tune_sampling(path: Path, candidates: list[tuple[str, int, float, float]], n_val: int = 40,
                  n: int = 16) -> list[dict]:
    """Score (sampler, steps, draw correlation, temperature) candidates on validation
    phantoms and store the best in the model.

    The best has the highest HM-IoU + (1 − GED²)/2, both means over ``n_val`` phantoms of
    seeds ``VAL_SEED0..`` (disjoint from the training and the test seeds), ``n`` masks each.
    Each row also holds its paired difference from the first candidate (:func:`_scored_row`).
    The draw correlation and the temperature apply to Bernoulli models only (Gaussian
    candidates use 0 and 1).
    """
    from napari_berdiff.checkpoints import load_model
    from napari_berdiff.model import DiffusionModel

    model = load_model(path)
    ds = phantom_dataset(VAL_SEED0, n_val)
    rows, first = [], None
    for sampler, steps, rho, tau in candidates:
        diffusion = model.diffusion.replace(sampler=sampler, draw_correlation=rho,
                                            temperature=tau)
        per_case = _validation_scores(DiffusionModel(model.net, diffusion, model.metadata), ds,
                                      steps, n)
        first = per_case if first is None else first
        row = {"sampler": sampler, "steps": steps, "draw_correlation": rho, "temperature": tau,
               **_scored_row(per_case, first)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    best = max(rows, key=lambda r: r["score"])
    chosen = model.diffusion.replace(sampler=best["sampler"], default_steps=best["steps"],
                                     draw_correlation=best["draw_correlation"],
                                     temperature=best["temperature"])
    _update_model(path, {"sampling_tuned": {
        "validation_seeds": [VAL_SEED0, VAL_SEED0 + n_val - 1], "n": n, "candidates": rows}},
        diffusion=chosen)
    return rows


def compare_models(paths: list[Path], n_val: int = 100, n: int = 16, skip: int = 0
                   ) -> list[dict]:
    """Score models, each with its own default sampling settings, on the same validation
    phantoms (seeds ``VAL_SEED0 + skip ..``); every row holds its paired difference from
    the first model. Read-only."""
    from napari_berdiff.checkpoints import load_model

    ds = phantom_dataset(VAL_SEED0 + skip, n_val)
    rows, first = [], None
    for path in paths:
        per_case = _validation_scores(load_model(path), ds, None, n)
        first = per_case if first is None else first
        row = {"model": str(path), **_scored_row(per_case, first)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def parse_candidate(text: str) -> tuple[str, int, float, float]:
    """``sampler:steps[:draw_correlation[:temperature]]``, e.g. ``ddim:10:0:0.25``."""
    parts = text.split(":")
    if len(parts) not in (2, 3, 4):
        raise argparse.ArgumentTypeError(
            f"a candidate is sampler:steps[:draw_correlation[:temperature]], got {text!r}")
    rho = float(parts[2]) if len(parts) > 2 else 0.0
    return parts[0], int(parts[1]), rho, float(parts[3]) if len(parts) > 3 else 1.0


# ---------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--kind", default="bernoulli", choices=list(NAMES))
    t.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    t.add_argument("--batch", type=int, default=12)
    t.add_argument("--minutes", type=float, default=70)
    t.add_argument("--n-train", type=int, default=DEFAULT_N_TRAIN)
    t.add_argument("--out", default=None)
    t.add_argument("--resume", action="store_true")
    t.add_argument("--variant", default="v1",
                   choices=["v1", "v2", "co", "co-visited", "co-full", "co-head", "co-eps",
                            "co-deep", "co-sc", "co-sc-head",
                            "co-sc-gap", "co-unroll", "co-unroll-all", "co-unroll-25",
                            "co-unroll-25-prior", "co-presence", "co-unroll-25-presence",
                            "co-readers", "co-presence-readers",
                            "co-unroll-25-presence-readers"])
    e = sub.add_parser("evaluate")
    e.add_argument("--model", default=str(MODELS / f"{NAMES['bernoulli']}.safetensors"))
    e.add_argument("--baseline", default=str(MODELS / f"{NAMES['deterministic']}.safetensors"))
    e.add_argument("--n-test", type=int, default=100)
    e.add_argument("--n", type=int, default=16)
    e.add_argument("--steps", type=int, default=None)
    e.add_argument("--card", action="store_true",
                   help="store the figures in the files' metadata and write the model cards")
    e.add_argument("--json", default=None)
    e.add_argument("--note", default="", help="a sentence added to the model card's recipe section")
    e.add_argument("--speed-idle", action="store_true",
                   help="the card says the speed was measured with no other job running")
    e.add_argument("--baseline-note", default="",
                   help="a sentence added to the baseline card's recipe section")
    u = sub.add_parser("tune", help="choose the sampler and step count on validation phantoms")
    u.add_argument("--model", required=True)
    u.add_argument("--candidates", nargs="+", type=parse_candidate,
                   default=[("ddim", 10, 0.0, 1.0), ("ddpm", 10, 0.0, 1.0),
                            ("ddpm", 25, 0.0, 1.0)],
                   help="sampler:steps[:draw_correlation[:temperature]] (the last two: "
                        "Bernoulli only)")
    u.add_argument("--n-val", type=int, default=40)
    c = sub.add_parser("compare", help="models side by side on the same validation phantoms")
    c.add_argument("--models", nargs="+", required=True)
    c.add_argument("--n-val", type=int, default=100)
    c.add_argument("--skip", type=int, default=0,
                   help="start at validation seed 800000 + SKIP (fresh phantoms to confirm)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.cmd == "tune":
        tune_sampling(Path(args.model), args.candidates, args.n_val)
        return 0
    if args.cmd == "compare":
        compare_models([Path(m) for m in args.models], args.n_val, skip=args.skip)
        return 0
    if args.cmd == "train":
        tic = time.perf_counter()
        ds = phantom_dataset(TRAIN_SEED0, args.n_train)
        print(f"generated {len(ds)} training phantoms in {time.perf_counter() - tic:.1f} s",
              flush=True)
        name = NAMES[args.kind]
        out = Path(args.out or MODELS / f"{name}.safetensors")
        cfg = recipe(args.kind, args.steps, args.minutes, args.batch, args.variant)
        res = train(cfg, ds, out, resume=args.resume, name=name, progress=False)
        print(json.dumps({"kind": args.kind, "steps": res.step,
                          "train_time_s": round(res.elapsed_s, 1),
                          "stopped_by_time": res.stopped_by_time,
                          "final_loss_mean_last100": float(np.mean(res.losses[-100:])),
                          "out": str(out)}), flush=True)
        return 0

    from napari_berdiff.checkpoints import load_model
    from napari_berdiff.training.evaluate import evaluate, format_table

    model = load_model(args.model)
    bpath = Path(args.baseline) if args.baseline else None
    baseline = load_model(bpath) if bpath is not None and bpath.exists() else None
    ds = phantom_dataset(TEST_SEED0, args.n_test)
    tic = time.perf_counter()
    rep = evaluate(model, ds, n=args.n, steps=args.steps, seed=0, baseline=baseline)
    summary = rep.summary()
    secs = time.perf_counter() - tic
    print(format_table(summary))
    print(f"evaluated {len(ds)} held-out phantoms in {secs:.0f} s")
    settings = {**rep.settings, "n": args.n, "n_items": len(ds),
                "n_faint": int(sum(it["faint"] for it in rep.items)),
                "test_seeds": [TEST_SEED0, TEST_SEED0 + args.n_test - 1]}
    if args.json:
        Path(args.json).write_text(rep.to_json())
    if args.card:
        machine = (f"{platform.machine()} CPU, {torch.get_num_threads()} torch thread, "
                   f"torch {torch.__version__}, 2 cores shared with other jobs")
        steps = sorted({10, int(model.diffusion.default_steps)})
        speed = {f"{s}x{s}, {k} steps": round(sampling_speed(model, s, steps=k), 2)
                 for k in steps for s in (SIZE, 128)}
        print("sampling 16 masks (s):", speed)
        print("wrote", write_card(Path(args.model), "model", summary, settings, speed, machine,
                                        args.note, args.speed_idle))
        if baseline is not None:
            print("wrote", write_card(bpath, "deterministic", summary, settings, None, machine,
                                            args.baseline_note))
        (Path(args.model).with_suffix(".eval.json")).write_text(rep.to_json())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
