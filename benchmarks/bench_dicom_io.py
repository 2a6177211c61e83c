"""Time to read a CT series from DICOM and to write an accepted mask as DICOM SEG.

A synthetic single-frame CT series (pydicom, shuffled files) of ``--slices`` × ``--size``²
voxels is written to a temporary folder; the script then times ``read_dicom_volume`` on it,
and ``write_labels_seg`` of a mask covering a few slices (medians of ``--repeats`` runs,
with the min–max spread). Nothing here asserts a time.

    python benchmarks/bench_dicom_io.py                       # 120 slices of 512 × 512
    python benchmarks/bench_dicom_io.py --slices 40 --size 256 --repeats 5
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from _common import ROOT, base_parser, describe, machine, median, time_runs, write_json


def main() -> None:
    ap = base_parser(__doc__, name="dicom_io", repeats=3)
    ap.add_argument("--slices", type=int, default=120)
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()
    import sys

    sys.path.insert(0, str(ROOT))
    from napari_berdiff.dicom_io import read_dicom_volume
    from napari_berdiff.dicom_seg import write_labels_seg
    from napari_berdiff.geometry import derived_metadata
    from tests.engine.dicom_helpers import write_ct_series

    info = machine("cpu")
    rng = np.random.default_rng(0)
    hu = (rng.integers(12, 712, (args.slices, args.size, args.size)) * 2 - 1024).astype(np.int32)
    with tempfile.TemporaryDirectory() as tmp:
        write_ct_series(Path(tmp) / "ct", hu, spacing=(1.25, 0.7, 0.7))
        read_s = time_runs(lambda: read_dicom_volume(Path(tmp) / "ct"), args.repeats)
        vol = read_dicom_volume(Path(tmp) / "ct")
        assert np.array_equal(vol.array, hu)
        mask = np.zeros(hu.shape, np.uint8)
        mid = args.slices // 2
        c = args.size // 2
        mask[mid - 2:mid + 3, c - 20:c + 20, c - 15:c + 25] = 1
        attrs = {"metadata": derived_metadata({"dicom": vol.metadata()}, (0, 0, 0), mask.shape)}
        seg_s = time_runs(lambda: write_labels_seg(str(Path(tmp) / "seg.dcm"), mask, attrs),
                          args.repeats)
    mb = hu.size * 2 / 2**20
    rows = {"read_s": median(read_s), "read_spread": [min(read_s), max(read_s)],
            "read_mb_per_s": mb / median(read_s), "seg_s": median(seg_s),
            "seg_spread": [min(seg_s), max(seg_s)], "slices": args.slices, "size": args.size}
    print(describe(info))
    print(f"read {args.slices} × {args.size}² ({mb:.0f} MB stored): "
          f"median {rows['read_s']:.2f} s "
          f"(min {min(read_s):.2f}, max {max(read_s):.2f}; {rows['read_mb_per_s']:.0f} MB/s)")
    print(f"write a 5-slice SEG: median {rows['seg_s']:.2f} s "
          f"(min {min(seg_s):.2f}, max {max(seg_s):.2f})")
    write_json(args.name, rows, info)


if __name__ == "__main__":
    main()
