"""The exact recipe behind ``models/cdal-phantom-64``, its held-out figures, and the same-run
comparison of the BerDiff default, the cDAL model and the Gaussian model; prints its figures.

    .venv/bin/python benchmarks/train_cdal.py train --minutes 15
    .venv/bin/python benchmarks/train_cdal.py evaluate --card      # held-out phantoms, N = 16
    .venv/bin/python benchmarks/train_cdal.py compare              # the BENCHMARKS.md table

Data as ``train_default.py``: 64×64 phantoms with K = 4 annotators, 8-bit quantised;
training seeds 10000..10000+n_train−1, held-out test seeds 900000..900000+n_test−1 (the cases
``berdiff data phantoms --seed 9 --size 64 --cases n_test`` writes).
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
sys.path.insert(0, str(ROOT / "benchmarks"))

from train_default import TEST_SEED0, TRAIN_SEED0, phantom_dataset  # noqa: E402

from napari_berdiff.networks import network_description  # noqa: E402
from napari_berdiff.training import (  # noqa: E402
    TrainConfig,
    default_diffusion,
    default_network,
    train,
)

NAME = "cdal-phantom-64"
MODELS = ROOT / "models"
SIZE = 64


def recipe(steps: int, minutes: float, batch: int, lr: float, adv_weight: float) -> TrainConfig:
    """The bundled model's recipe: ``berdiff train --kind cdal`` defaults, except as given."""
    return TrainConfig(
        kind="cdal", network=network_description(default_network("cdal", SIZE, 1)),
        diffusion=default_diffusion("cdal").to_dict(), steps=steps, batch_size=batch, lr=lr,
        betas=(0.5, 0.9), warmup=50, ema_decay=0.999, grad_clip=1.0, augment=True,
        normalisation="minmax", checkpoint_every=100, max_minutes=minutes, seed=0, threads=1,
        lr_d=1e-4, r1_gamma=1.0, disc_channels=16, attn_scale=2, adv_weight=adv_weight,
    )


def cmd_train(args: argparse.Namespace) -> int:
    cfg = recipe(args.steps, args.minutes, args.batch, args.lr, args.adv_weight)
    ds = phantom_dataset(TRAIN_SEED0, args.n_train)
    out = Path(args.out or MODELS / f"{NAME}.safetensors")
    cmd = " ".join(sys.argv[1:])
    res = train(cfg, ds, out, resume=args.resume, name=NAME,
                extra_meta={"training": {"command": f"benchmarks/train_cdal.py {cmd}"}})
    print(f"step {res.step} in {res.elapsed_s / 60:.1f} min; last-100 mean loss "
          f"{np.mean(res.losses[-100:]):.4f}; wrote {out}")
    return 0


def heldout_scores(model, n_items: int, n: int = 16) -> dict[str, np.ndarray]:
    """Per-phantom GED², HM-IoU and majority-vote Dice of ``n`` masks (seed i for phantom i)."""
    from napari_berdiff.training.evaluate import item_metrics

    ds = phantom_dataset(TEST_SEED0, n_items)
    rows = []
    for i, it in enumerate(ds.items):
        masks = model.sample_all(it.image, n=n, seed=i).masks
        sc = item_metrics(masks, it.masks)
        rows.append((sc["ged2"], sc["hm_iou"], sc["mv_dice"]))
    arr = np.array(rows)
    return {"ged2": arr[:, 0], "hm_iou": arr[:, 1], "mv_dice": arr[:, 2]}


def _mean_sem(v: np.ndarray) -> str:
    return f"{v.mean():.3f} ± {v.std(ddof=1) / np.sqrt(len(v)):.3f}"


def sample_time(model, size: int, n: int = 16, repeats: int = 3) -> float:
    """Median seconds for ``n`` masks of ``size``×``size`` at the model's default steps."""
    from napari_berdiff.data.phantoms import make_phantom

    img = make_phantom(1, size).image
    model.sample_all(img, n=n, seed=0)
    times = []
    for r in range(repeats):
        tic = time.perf_counter()
        model.sample_all(img, n=n, seed=r)
        times.append(time.perf_counter() - tic)
    return float(np.median(times))


def _sized(model, size: int):
    """The model itself, or for a one-size cDAL network the same network built for ``size``
    (random weights: only its speed is measured)."""
    from napari_berdiff.model import DiffusionModel
    from napari_berdiff.networks import NCSNppConfig, NCSNppGenerator

    cfg = model.net.config
    if not isinstance(cfg, NCSNppConfig) or cfg.image_size == size:
        return model
    scale = size // cfg.image_size
    big = cfg.replace(image_size=size, attn_resolutions=tuple(r * scale
                                                              for r in cfg.attn_resolutions))
    return DiffusionModel(NCSNppGenerator(big), model.diffusion,
                          {**model.metadata, "network": None}).to("cpu")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from napari_berdiff.checkpoints import load_model

    path = Path(args.model or MODELS / f"{NAME}.safetensors")
    model = load_model(path)
    torch.set_num_threads(1)
    tic = time.perf_counter()
    sc = heldout_scores(model, args.n_items, args.n)
    took = time.perf_counter() - tic
    metrics = {k: float(v.mean()) for k, v in sc.items()}
    metrics.update({f"{k}_sem": float(v.std(ddof=1) / np.sqrt(len(v))) for k, v in sc.items()})
    metrics.update({"n_items": args.n_items, "n_samples": args.n,
                    "test_seeds": [TEST_SEED0, TEST_SEED0 + args.n_items - 1]})
    print(json.dumps(metrics, indent=1))
    print(f"({took:.0f} s on {platform.processor() or platform.machine()}, torch threads 1)")
    if args.card:
        write_card(path, model, sc, metrics)
    return 0


def write_card(path: Path, model, sc: dict[str, np.ndarray], metrics: dict) -> None:
    """Store the figures in the model's metadata and write its card next to it."""
    from safetensors.torch import load_file, save_file

    from napari_berdiff.checkpoints.ours import METADATA_KEY, read_description
    from napari_berdiff.checkpoints.sniff import read_safetensors_header

    doc = read_description(path, read_safetensors_header(path))
    doc["metrics"] = {"heldout_phantoms": metrics}
    tensors = load_file(str(path))
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(doc)})
    tr = doc.get("training", {})
    rec = tr.get("recipe", {})
    net = rec.get("network", {})
    n_par = sum(int(np.prod(v.shape)) for v in tensors.values())
    lines = [
        f"# {NAME}",
        "",
        "A cDAL model (few-step conditional diffusion with a latent z and discriminator "
        "attention; Hejrati et al.) trained on the synthetic phantoms of "
        "`napari_berdiff.data.phantoms`, bundled so that the plugin offers a cDAL run offline. "
        "It is **not** a clinical model: it has only seen phantoms, and it was trained for a "
        "quarter of an hour on a shared 2-core CPU.",
        "",
        "## Data",
        f"- Training: {doc.get('data', {}).get('description', '')}.",
        "- 64×64 crops with K = 4 annotators; 8-bit images normalised per image with min-max.",
        f"- Held out: {metrics['n_items']} phantoms, seeds {metrics['test_seeds'][0]}.."
        f"{metrics['test_seeds'][1]} (`berdiff data phantoms --seed 9 --size 64 --cases "
        f"{metrics['n_items']}` writes the same cases).",
        "",
        "## Network and diffusion",
        f"- NCSN++ generator with adaptive group norm (official cDAL layout): nf {net.get('nf')}, "
        f"ch_mult {tuple(net.get('ch_mult', ()))}, {net.get('num_res_blocks')} residual block "
        f"per level, attention at {tuple(net.get('attn_resolutions', ()))} px, an image encoder "
        f"of {net.get('cond_enc_layers', 0) * net.get('cond_enc_num_res_blocks', 0)} blocks, "
        f"nz {net.get('nz')}, style width {net.get('z_emb_dim')}; {n_par:,} parameters. "
        "Takes 64×64 images only.",
        f"- Diffusion: T = {model.diffusion.timesteps} (cDAL's VP schedule, β 0.1..20), "
        "x0 prediction, Gaussian posterior steps, a fresh z per step; masks in [-1, 1], a "
        "sample's mask is x̂0 > 0; the consensus is the majority vote.",
        "",
        "## Recipe",
        f"`{tr.get('command', 'benchmarks/train_cdal.py train')}` (the exact script): "
        f"{tr.get('steps_done')} steps in {tr.get('train_time_s', 0) / 60:.1f} min, batch "
        f"{rec.get('batch_size')}, Adam(β = {tuple(rec.get('betas', ()))}) lr {rec.get('lr')} "
        f"(generator) / {rec.get('lr_d')} (discriminator), R1 γ = {rec.get('r1_gamma')}, "
        f"attention from discriminator feature map {rec.get('attn_scale')}, generator loss "
        f"MSE on x̂0" + (f" + {rec.get('adv_weight')} × adversarial" if rec.get('adv_weight')
                          else " (as the released code)") + "; the EMA weights are bundled.",
        "",
        "## Held-out figures (N = 16 samples per phantom, mean ± s.e.m.)",
        f"- GED² {_mean_sem(sc['ged2'])}",
        f"- HM-IoU {_mean_sem(sc['hm_iou'])}",
        f"- Majority-vote Dice (against each annotator) {_mean_sem(sc['mv_dice'])}",
        "",
        "Measured by `benchmarks/train_cdal.py evaluate --card`; the figures are also stored in "
        "the model's metadata. See BENCHMARKS.md for the same-run comparison with the "
        "bundled BerDiff and Gaussian models.",
        "",
    ]
    path.with_suffix(".md").write_text("\n".join(lines))


def cmd_compare(args: argparse.Namespace) -> int:
    """Held-out GED², HM-IoU, majority-vote Dice and the time for 16 samples of 128×128 at
    each model's default steps, all in one run."""
    from napari_berdiff.checkpoints import load_model

    torch.set_num_threads(1)
    rows = []
    for name in args.models:
        model = load_model(MODELS / f"{name}.safetensors")
        sc = heldout_scores(model, args.n_items, 16)
        secs = sample_time(_sized(model, 128), 128, 16)
        rows.append((name, model.diffusion.default_step_count, sc, secs))
    print("| model | steps | GED² | HM-IoU | majority-vote Dice | 16 × 128² (s) |")
    print("|---|---|---|---|---|---|")
    for name, steps, sc, secs in rows:
        print(f"| {name} | {steps} | {_mean_sem(sc['ged2'])} | {_mean_sem(sc['hm_iou'])} | "
              f"{_mean_sem(sc['mv_dice'])} | {secs:.2f} |")
    print(f"\n{args.n_items} held-out phantoms (seeds {TEST_SEED0}..), N = 16, mean ± s.e.m.; "
          f"time: median of 3 runs, 1 torch thread, {platform.machine()}")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--steps", type=int, default=3000)
    t.add_argument("--minutes", type=float, default=15.0)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--lr", type=float, default=5e-4)
    t.add_argument("--adv-weight", type=float, default=0.0)
    t.add_argument("--n-train", type=int, default=2000)
    t.add_argument("--out")
    t.add_argument("--resume", action="store_true")
    e = sub.add_parser("evaluate")
    e.add_argument("--model")
    e.add_argument("--n-items", type=int, default=60)
    e.add_argument("--n", type=int, default=16)
    e.add_argument("--card", action="store_true")
    c = sub.add_parser("compare")
    c.add_argument("--models", nargs="+",
                   default=["berdiff-phantom-64", NAME, "gaussian-phantom-64"])
    c.add_argument("--n-items", type=int, default=60)
    args = ap.parse_args(argv)
    return {"train": cmd_train, "evaluate": cmd_evaluate, "compare": cmd_compare}[args.cmd](args)


if __name__ == "__main__":
    raise SystemExit(main())
