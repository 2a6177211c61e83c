"""Quality against the number of sampling steps: GED², HM-IoU, soft Dice and seconds/image.

For each step count (default 1, 2, 4, 10, 25) the model draws N = 16 samples for each of K
held-out phantoms (the test split of ``train_default.py``: 64×64, seeds 900000…, 4
annotators) with the same seed, and ``napari_berdiff.training.evaluate.evaluate`` scores
them. ``s/image`` is the sampling time per phantom (N samples × steps). Not a test.

    python benchmarks/bench_quality_steps.py                       # bundled model, K = 50
    python benchmarks/bench_quality_steps.py --model runs/co.safetensors --n-test 20
"""

from __future__ import annotations

from _common import (BUNDLED, base_parser, describe, load_bench_model, machine, print_table,
                     quality, set_threads, write_json)

COLUMNS = [("steps", "steps", "d"), ("ged2", "GED²", ".4f"), ("hm_iou", "HM-IoU", ".4f"),
           ("soft_dice", "soft Dice", ".4f"), ("seconds_per_image", "s/image", ".3f")]


def main() -> None:
    ap = base_parser(__doc__, "bench_quality_steps", repeats=None)
    ap.add_argument("--model", default=str(BUNDLED), help="a .safetensors model")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 10, 25])
    ap.add_argument("--n-test", type=int, default=50, help="K held-out phantoms")
    ap.add_argument("--n", type=int, default=16, help="samples per phantom")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    set_threads(args.threads)

    model = load_bench_model(args.model)
    info = machine()
    print(describe(info))
    print(f"model {model.name}: N = {args.n} samples on {args.n_test} held-out phantoms")
    rows = []
    for steps in args.steps:
        rows.append({"steps": steps} | quality(model, args.n_test, n=args.n, steps=steps,
                                               seed=args.seed))
        print_table(rows[-1:], COLUMNS)
    print("\nsummary:")
    print_table(rows, COLUMNS)
    write_json(args.name, {"model": model.name, "model_path": args.model, "n": args.n,
                           "n_test": args.n_test, "results": rows}, info)


if __name__ == "__main__":
    main()
