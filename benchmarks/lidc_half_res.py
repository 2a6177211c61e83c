"""The semi-real LIDC crops at half resolution: 1 mm per pixel, 64×64.

Reads a folder written by ``berdiff data lidc`` (180×180 at 0.5 mm), takes the central
128×128 that BerDiff samples (64 mm), and halves it: images by 2×2 area averaging, each
reader's mask by 2×2 averaging then ``>= 0.5``. Writes the same LIDC-crops layout with
``dataset.json`` giving the new spacing (1 mm), so a model trained on it records 1 mm and
the spacing machinery resamples 0.5 mm crops to it when sampling.

    python benchmarks/lidc_half_res.py SRC DST
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from skimage.transform import downscale_local_mean

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from napari_berdiff.data.layout import load_lidc_layout, write_lidc_layout  # noqa: E402


def halve(image: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) image and (K, H, W) masks at half the resolution (H, W even)."""
    img = downscale_local_mean(image.astype(np.float64), (2, 2))
    m = downscale_local_mean(np.asarray(masks, np.float64), (1, 2, 2)) >= 0.5
    return np.clip(img, 0, 1), m.astype(np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    args = ap.parse_args()
    t0 = time.perf_counter()
    ds = load_lidc_layout(args.src)          # the central 128×128 of each 180×180 crop
    src_desc = json.loads((Path(args.src) / "dataset.json").read_text())
    sp = [2 * float(v) for v in src_desc.get("spacing", [0.5, 0.5])]
    items = []
    for it in ds.items:
        img, masks = halve(it.image_chw[0], it.masks)
        items.append((it.case, it.slice, img, masks))
    desc = {k: v for k, v in src_desc.items() if k not in ("info", "n_cases", "size")}
    desc.update(size=items[0][2].shape[0], spacing=sp,
                description=src_desc.get("description", "") +
                f"; central 128x128 halved to 64x64 at {sp[0]:g} mm (lidc_half_res.py)")
    write_lidc_layout(args.dst, items, desc)
    print(f"wrote {len(items)} items at {sp[0]:g} mm to {args.dst} in "
          f"{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
