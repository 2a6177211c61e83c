"""Condition-once network vs concatenation UNet: speed and quality in one run (issue 7 §3).

For every model: milliseconds per sampling step and seconds for 16 masks × 10 steps on a
128×128 region (median of ``--repeats`` runs), then GED², HM-IoU and soft Dice of N = 16
samples on the same held-out phantoms (seeds 900000…, as ``train_default.py evaluate``), all
models interleaved item by item, next to the best single annotator and the fresh oracle.
The quality ratio column compares every model with the first one.

    .venv/bin/python benchmarks/compare_networks.py \\
        --models models/berdiff-phantom-64.safetensors models/berdiff-unet-phantom-64.safetensors
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from _common import (
    base_parser,
    describe,
    held_out,
    load_bench_model,
    machine,
    median,
    print_table,
    set_threads,
    test_image,
    write_json,
)


def speed(model: Any, size: int, n: int, steps: int, repeats: int) -> dict[str, float]:
    """Median total seconds, network ms per step and first-frame seconds of ``n`` × ``steps``."""
    img = test_image(size)
    model.sample_all(img, n=n, steps=steps, seed=99)  # warm-up
    runs = [model.sample_all(img, n=n, steps=steps, seed=r).timings for r in range(repeats)]
    return {
        "total_s": median(t["total_s"] for t in runs),
        "ms_per_step": 1000 * median(t["total_s"] for t in runs) / steps,
        "network_ms_per_step": 1000 * median(t["network_s"] for t in runs) / steps,
        "first_frame_s": median(t["first_frame_s"] for t in runs),
    }


def main(argv: list[str] | None = None) -> int:
    ap = base_parser(__doc__, name="compare_networks")
    ap.add_argument("--models", nargs="+", required=True, help=".safetensors files to compare")
    ap.add_argument("--n-test", type=int, default=100, help="held-out phantoms for quality")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--size", type=int, default=128, help="region size for the speed runs")
    args = ap.parse_args(argv)
    set_threads(args.threads)
    info = machine()
    print(describe(info))

    from napari_berdiff.training.evaluate import evaluate_methods, model_method

    models = {Path(p).stem: load_bench_model(p) for p in args.models}
    rows = []
    for name, m in models.items():
        row = {"model": name, "network": m.metadata["network"].get("type", "unet"),
               "params": m.num_parameters(),
               **speed(m, args.size, args.n, args.steps, args.repeats)}
        rows.append(row)
        print(f"{name}: {row['ms_per_step']:.0f} ms/step, {row['total_s']:.2f} s for "
              f"{args.n}x{args.steps} at {args.size}^2", flush=True)

    methods = {name: model_method(m, args.steps) for name, m in models.items()}
    rep = evaluate_methods(held_out(args.n_test), methods, n=args.n, seed=0, oracle=False,
                           annotators=True, progress=True)
    summary = rep.summary()
    first = rows[0]["model"]
    for r in rows:
        s = summary[r["model"]]
        r.update(ged2=s["ged2"], hm_iou=s["hm_iou"], soft_dice=s["soft_dice"])
        r["ged2_vs_first_pct"] = 100 * (s["ged2"] / summary[first]["ged2"] - 1)
        r["hm_iou_vs_first_pct"] = 100 * (s["hm_iou"] / summary[first]["hm_iou"] - 1)
        r["speedup_vs_first"] = r["ms_per_step"] / rows[0]["ms_per_step"]
    refs = {k: summary[k] for k in ("best_annotator", "oracle_fresh") if k in summary}
    print()
    print_table(rows, [("model", "model", ""), ("network", "network", ""),
                       ("params", "params", ",d"), ("ms_per_step", "ms/step", ".0f"),
                       ("total_s", f"{args.n}x{args.steps} s", ".2f"),
                       ("first_frame_s", "1st frame s", ".2f"),
                       ("ged2", "GED²", ".4f"), ("hm_iou", "HM-IoU", ".4f"),
                       ("soft_dice", "softDice", ".4f"),
                       ("ged2_vs_first_pct", "GED² Δ%", "+.1f"),
                       ("hm_iou_vs_first_pct", "HM-IoU Δ%", "+.1f")])
    for k, s in refs.items():
        print(f"{k}: GED² {s['ged2']:.4f}, HM-IoU {s['hm_iou']:.4f}, soft Dice "
              f"{s['soft_dice']:.4f}")
    print(f"({args.n_test} held-out phantoms, N = {args.n}, {args.steps} steps; speed at "
          f"{args.size}x{args.size}, median of {args.repeats})")
    write_json(args.name, {"rows": rows, "references": refs,
                                    "settings": vars(args)}, info)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
