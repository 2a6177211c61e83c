"""A contact sheet of rendered semi-real LIDC items with their readers' contours.

    python benchmarks/lidc_contact_sheet.py --out sheet.png [--n 24] [--seed 0] [--split train]

Each tile is the central 128×128 of a rendered 180×180 crop (lung window), with the four
readers' contours in four colours; the title gives texture / margin / subtlety / calcification
(median over the readers who marked the nodule) and how many readers marked the slice.
Items are spread over the split: nodules are taken at a fixed stride, the middle slice each.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from skimage import measure

    from napari_berdiff.data.layout import center_crop
    from napari_berdiff.data.lidc import load_lidc_readers
    from napari_berdiff.data.lidc_render import render_slice

    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, default=Path("lidc_sheet.png"))
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split", default="train")
    p.add_argument("--full", action="store_true", help="show the whole 180x180 crop")
    args = p.parse_args()
    lidc = load_lidc_readers()
    nods = lidc.nodules(args.split)
    pick = [nods[i] for i in np.linspace(0, len(nods) - 1, args.n).astype(int)]
    cols = 6
    rows = (len(pick) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 2.6, rows * 2.8))
    colours = ["#ff4040", "#40ff40", "#4080ff", "#ffff40"]
    for ax, nod in zip(axes.ravel(), pick):
        items = list(lidc.nodule_slices(nod))
        item = items[len(items) // 2]
        img = render_slice(item, args.seed)["image"]
        masks = item.masks
        if not args.full:
            img, masks = center_crop(img, 128), center_crop(masks, 128)
        ax.imshow(img, cmap="gray", vmin=0, vmax=1)
        for k, m in enumerate(masks):
            for c in measure.find_contours(m.astype(float), 0.5):
                ax.plot(c[:, 1], c[:, 0], color=colours[k], lw=0.6)
        med = {n: int(np.median(item.rating(n))) for n in
               ("texture", "margin", "subtlety", "calcification")}
        ax.set_title(f"t{med['texture']} m{med['margin']} s{med['subtlety']} "
                     f"c{med['calcification']} r{int(masks.any(axis=(1, 2)).sum())}/"
                     f"{int(item.marked.sum())}", fontsize=8)
        ax.axis("off")
    for ax in axes.ravel()[len(pick):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(args.out)


if __name__ == "__main__":
    main()
