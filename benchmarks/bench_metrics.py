"""Time GED² and HM-IoU (napari_berdiff.uncertainty) at the sizes the evaluation uses.

Random masks (30 % foreground), N samples against K labels; each figure is the median of
``--repeats`` calls. The metrics run in numpy alone (no BLAS, no threads), so a busy machine
slows them only by the share of a core it leaves; the load average is recorded.

    python benchmarks/bench_metrics.py                       # N 16 and 32, K 4, 64² and 128²
    python benchmarks/bench_metrics.py --n 16 --sizes 512 --repeats 5
"""

from __future__ import annotations

import numpy as np
from _common import base_parser, describe, machine, median, print_table, time_runs, write_json

COLUMNS = [("n", "N", "d"), ("k", "K", "d"), ("size", "size", "d"),
           ("ged2_ms", "GED² ms", ".2f"), ("hm_iou_ms", "HM-IoU ms", ".2f")]


def main() -> None:
    ap = base_parser(__doc__, name="metrics", repeats=7)
    ap.add_argument("--n", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    args = ap.parse_args()
    from napari_berdiff import uncertainty as U

    info = machine()
    print(describe(info))
    rng = np.random.default_rng(0)
    rows = []
    for size in args.sizes:
        for n in args.n:
            samples = rng.random((n, size, size)) < 0.3
            labels = rng.random((args.k, size, size)) < 0.3
            rows.append({
                "n": n, "k": args.k, "size": size,
                "ged2_ms": 1e3 * median(time_runs(lambda: U.ged2(samples, labels),
                                                  args.repeats)),
                "hm_iou_ms": 1e3 * median(time_runs(lambda: U.hm_iou(samples, labels),
                                                    args.repeats)),
            })
    print_table(rows, COLUMNS)
    write_json(args.name, {"rows": rows}, info)


if __name__ == "__main__":
    main()
