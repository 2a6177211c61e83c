"""Folder layouts: the LIDC-IDRI crops BerDiff uses, and generic image/mask folders.

**LIDC-crops layout** (also what :func:`write_lidc_layout` writes for phantoms)::

    root/images/<case>/<slice>.png
    root/gt/<case>/<slice>_l0.png … <slice>_l{K-1}.png

Loaded with BerDiff's conventions: PNG intensities scaled to [0, 1] (8-bit / 255, 16-bit /
65535), a centre crop 180 → 128 when an image is 180 pixels wide (the published crops are
180×180; BerDiff trains on their central 128×128), labels binarised with ``> 0``.

**Generic folders**::

    root/images/<name>.<ext>            (or images/<case>/<name>.<ext>)
    root/masks/<name>.<ext>             one mask
    root/masks/<name>_<k>.<ext>         several masks (also <name>_l<k>.<ext>)
    root/masks/<name>/<anything>.<ext>  several masks in a folder

``ext`` is png, tif/tiff, jpg/jpeg, bmp or npy. Masks are binarised with ``> 0``. The case of
an image is its sub-folder under ``images/`` when there is one, otherwise the image itself.
Integer images are scaled to [0, 1] by their dtype's range; float images are kept as they are.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .dataset import SegDataset, SegItem
from .phantoms import Phantom

__all__ = ["write_lidc_layout", "load_lidc_layout", "load_image_mask_folder", "load_dataset",
           "detect_layout", "center_crop", "LIDC_CROP_FROM", "LIDC_CROP_TO"]

LIDC_CROP_FROM, LIDC_CROP_TO = 180, 128
IMAGE_EXTS = (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp", ".npy")
_LABEL_RE = re.compile(r"^(?P<slice>.+)_l(?P<k>\d+)$")


# ---------------------------------------------------------------------------- reading files
def _read(path: Path) -> np.ndarray:
    if path.suffix.lower() == ".npy":
        return np.load(path, allow_pickle=False)
    from skimage.io import imread

    try:
        arr = imread(str(path))
    except Exception as e:  # noqa: BLE001 - any decoder error: say which file
        raise ValueError(f"cannot read {path}: {e}") from None
    return np.asarray(arr)


def _to_gray(arr: np.ndarray, path: Path) -> np.ndarray:
    """RGB(A) images whose colour channels are equal become one channel; other shapes fail."""
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        rgb = arr[..., :3]
        same = np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])
        if not same:
            raise ValueError(f"{path} is a colour image; the models take grayscale images")
        arr = rgb[..., 0]
    if arr.ndim != 2:
        raise ValueError(f"{path} has shape {arr.shape}; expected a 2D grayscale image")
    return arr


def _scale01(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.bool_:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        return (arr.astype(np.float64) / np.iinfo(arr.dtype).max).astype(np.float32)
    return arr.astype(np.float32)


def _read_image(path: Path) -> np.ndarray:
    img = _scale01(_to_gray(_read(path), path))
    if not np.isfinite(img).all():
        raise ValueError(f"{path} contains NaN or infinite values")
    return img


def _read_mask(path: Path) -> np.ndarray:
    return (_to_gray(_read(path), path) > 0).astype(np.uint8)


def center_crop(arr: np.ndarray, size: int) -> np.ndarray:
    """The central ``size × size`` window of the last two axes."""
    h, w = arr.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"cannot centre-crop {h}x{w} to {size}x{size}")
    y0, x0 = (h - size) // 2, (w - size) // 2
    return arr[..., y0:y0 + size, x0:x0 + size]


def _lidc_crop(arr: np.ndarray) -> np.ndarray:
    if arr.shape[-2:] == (LIDC_CROP_FROM, LIDC_CROP_FROM):
        return center_crop(arr, LIDC_CROP_TO)
    return arr


# ---------------------------------------------------------------------------- writing
def _as_case_tuple(i: int, c: Any) -> tuple[str, str, np.ndarray, np.ndarray]:
    if isinstance(c, SegItem):
        return c.case, c.slice, c.image, c.masks
    if isinstance(c, Phantom):
        seed = c.info.get("seed", i)
        return f"phantom{int(seed):06d}", "000", c.image, c.masks
    if isinstance(c, (tuple, list)) and len(c) == 4:
        case, sl, img, masks = c
        return str(case), str(sl), img, masks
    raise TypeError(
        "each case must be a Phantom, a SegItem or a (case, slice, image, masks) tuple; "
        f"got {type(c).__name__}"
    )


def _safe_id(s: str, what: str) -> str:
    if not s or "/" in s or "\\" in s or s in (".", ".."):
        raise ValueError(f"invalid {what} id {s!r}: it becomes a file or folder name")
    return s


def write_lidc_layout(out_dir: str | Path, cases: Iterable[Any],
                      description: dict[str, Any] | None = None) -> Path:
    """Write cases to the LIDC-crops layout.

    Parameters
    ----------
    out_dir
        The root folder (created if needed; existing files with the same names are replaced).
    cases
        :class:`~napari_berdiff.data.phantoms.Phantom` objects (case ``phantom<seed>``, slice
        ``000``), :class:`SegItem` objects, or ``(case, slice, image, masks)`` tuples with
        ``image`` (H, W) in [0, 1] and ``masks`` (K, H, W).
    description
        Written as ``dataset.json`` next to ``images/`` and ``gt/`` (with per-case info).

    Images are written as 8-bit PNG (``round(255·x)``), masks as 0/255 PNG.
    """
    from skimage.io import imsave

    root = Path(out_dir)
    n = 0
    infos = {}
    for i, c in enumerate(cases):
        case, sl, img, masks = _as_case_tuple(i, c)
        _safe_id(case, "case")
        _safe_id(sl, "slice")
        img = np.asarray(img, dtype=np.float64)
        masks = np.asarray(masks)
        if img.ndim != 2:
            raise ValueError(f"case {case}/{sl}: the image must be 2D, got shape {img.shape}")
        if masks.ndim == 2:
            masks = masks[None]
        if masks.ndim != 3 or masks.shape[1:] != img.shape:
            raise ValueError(f"case {case}/{sl}: masks of shape {masks.shape} do not match "
                             f"the image's {img.shape}")
        if not np.isfinite(img).all() or img.min() < 0 or img.max() > 1:
            raise ValueError(f"case {case}/{sl}: image values must lie in [0, 1]")
        (root / "images" / case).mkdir(parents=True, exist_ok=True)
        (root / "gt" / case).mkdir(parents=True, exist_ok=True)
        imsave(str(root / "images" / case / f"{sl}.png"),
               np.round(img * 255).astype(np.uint8), check_contrast=False)
        for k, m in enumerate(masks):
            imsave(str(root / "gt" / case / f"{sl}_l{k}.png"),
                   ((m > 0) * 255).astype(np.uint8), check_contrast=False)
        if isinstance(c, (Phantom, SegItem)) and c.info:
            infos[f"{case}/{sl}"] = c.info
        n += 1
    if n == 0:
        raise ValueError("no cases to write")
    doc = {"layout": "lidc", **(description or {}), "n_cases": n}
    if infos:
        doc["info"] = infos
    (root / "dataset.json").write_text(json.dumps(doc, indent=1))
    return root


# ---------------------------------------------------------------------------- loading
def _dataset_json(root: Path) -> dict[str, Any]:
    f = root / "dataset.json"
    if f.exists():
        try:
            doc = json.loads(f.read_text())
            return doc if isinstance(doc, dict) else {}
        except (OSError, json.JSONDecodeError):
            return {}
    return {}


def _description(root: Path, layout: str) -> dict[str, Any]:
    desc: dict[str, Any] = {"layout": layout, "root": str(root)}
    doc = _dataset_json(root)
    if doc.get("description"):
        desc["description"] = doc["description"]
    for k in ("generator", "seed", "size", "n_annotators", "spacing", "split"):
        if k in doc:
            desc[k] = doc[k]
    return desc


def load_lidc_layout(root: str | Path, crop: bool = True) -> SegDataset:
    """Load ``images/<case>/<slice>.png`` with their ``gt/<case>/<slice>_l{k}.png`` labels.

    Returns a :class:`SegDataset` of items with ``image`` (H, W) float32 in [0, 1] and
    ``masks`` (K, H, W) uint8. ``crop`` applies BerDiff's centre crop 180 → 128.

    Raises
    ------
    ValueError
        If the folders are missing or empty, an image has no labels, or shapes disagree.
    """
    root = Path(root)
    img_dir, gt_dir = root / "images", root / "gt"
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder")
    for d in (img_dir, gt_dir):
        if not d.is_dir():
            raise ValueError(f"{root} is not in the LIDC-crops layout: {d.name}/ is missing "
                             "(expected images/<case>/<slice>.png and gt/<case>/<slice>_l<k>.png)")
    images = sorted(p for p in img_dir.glob("*/*") if p.suffix.lower() in IMAGE_EXTS)
    if not images:
        raise ValueError(f"no images found in {img_dir} (expected images/<case>/<slice>.png)")
    labels: dict[tuple[str, str], dict[int, Path]] = {}
    for p in gt_dir.glob("*/*"):
        if p.suffix.lower() not in IMAGE_EXTS:
            continue
        m = _LABEL_RE.match(p.stem)
        if m:
            labels.setdefault((p.parent.name, m["slice"]), {})[int(m["k"])] = p
    infos = _dataset_json(root).get("info", {})
    items = []
    for p in images:
        case, sl = p.parent.name, p.stem
        found = labels.get((case, sl))
        if not found:
            raise ValueError(f"no masks for image {p.relative_to(root)}: expected "
                             f"gt/{case}/{sl}_l0.png …")
        ks = sorted(found)
        if ks != list(range(len(ks))):
            raise ValueError(f"the masks of {case}/{sl} are numbered {ks}; expected _l0 … "
                             f"_l{len(ks) - 1} with none missing")
        img = _read_image(p)
        masks = []
        for k in ks:
            mk = _read_mask(found[k])
            if mk.shape != img.shape:
                raise ValueError(f"shape mismatch: mask {found[k].relative_to(root)} is "
                                 f"{mk.shape[0]}x{mk.shape[1]} but image {p.relative_to(root)} "
                                 f"is {img.shape[0]}x{img.shape[1]}")
            masks.append(mk)
        mstack = np.stack(masks)
        if crop:
            img, mstack = _lidc_crop(img), _lidc_crop(mstack)
        info = infos.get(f"{case}/{sl}", {})
        items.append(SegItem(np.ascontiguousarray(img), np.ascontiguousarray(mstack), case, sl,
                             info=dict(info) if isinstance(info, dict) else {}))
    desc = _description(root, "lidc")
    desc["crop"] = f"centre {LIDC_CROP_FROM}->{LIDC_CROP_TO}" if crop else "none"
    return SegDataset(items, desc)


def _mask_files_for(mask_dir: Path, rel: Path) -> list[Path]:
    """Masks of the image at ``images/<rel>``, in a stable order."""
    base = mask_dir / rel.parent
    stem = rel.stem
    out: list[tuple[int, str, Path]] = []
    for ext in IMAGE_EXTS:
        p = base / f"{stem}{ext}"
        if p.is_file():
            out.append((-1, p.name, p))
    if base.is_dir():
        pat = re.compile(rf"^{re.escape(stem)}_l?(\d+)$")
        for p in base.iterdir():
            if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
                m = pat.match(p.stem)
                if m:
                    out.append((int(m.group(1)), p.name, p))
    folder = base / stem
    if folder.is_dir():
        for p in sorted(folder.iterdir()):
            if p.is_file() and p.suffix.lower() in IMAGE_EXTS:
                out.append((10**9, p.name, p))
    return [p for _, _, p in sorted(out)]


def load_image_mask_folder(root: str | Path) -> SegDataset:
    """Load a generic ``images/`` + ``masks/`` folder (one or several masks per image).

    Raises
    ------
    ValueError
        If a folder is missing or holds no images, an image has no mask, or a mask's shape
        differs from its image's.
    """
    root = Path(root)
    img_dir, mask_dir = root / "images", root / "masks"
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder")
    if not img_dir.is_dir():
        raise ValueError(f"{root} has no images/ folder (expected images/ and masks/)")
    if not mask_dir.is_dir():
        raise ValueError(f"{root} has no masks/ folder (expected images/ and masks/)")
    images = sorted(p for p in img_dir.rglob("*")
                    if p.is_file() and p.suffix.lower() in IMAGE_EXTS)
    if not images:
        raise ValueError(f"no images found in {img_dir} (looked for {', '.join(IMAGE_EXTS)})")
    items = []
    for p in images:
        rel = p.relative_to(img_dir)
        files = _mask_files_for(mask_dir, rel)
        if not files:
            stem = rel.with_suffix("")
            raise ValueError(f"no mask for image images/{rel}: expected masks/{stem}.png, "
                             f"masks/{stem}_0.png … or a folder masks/{stem}/")
        img = _read_image(p)
        masks = []
        for f in files:
            mk = _read_mask(f)
            if mk.shape != img.shape:
                raise ValueError(f"shape mismatch: mask {f.relative_to(root)} is "
                                 f"{mk.shape[0]}x{mk.shape[1]} but image images/{rel} is "
                                 f"{img.shape[0]}x{img.shape[1]}")
            masks.append(mk)
        case = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        sl = str(rel.with_suffix("")) if len(rel.parts) == 1 else str(
            Path(*rel.parts[1:]).with_suffix(""))
        items.append(SegItem(img, np.stack(masks), case, sl))
    return SegDataset(items, _description(root, "images+masks"))


def detect_layout(root: str | Path) -> str:
    """``"lidc"`` (images/ + gt/) or ``"folder"`` (images/ + masks/)."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root} is not a folder")
    if (root / "images").is_dir() and (root / "gt").is_dir():
        return "lidc"
    if (root / "images").is_dir() and (root / "masks").is_dir():
        return "folder"
    raise ValueError(f"{root} is neither in the LIDC-crops layout (images/ + gt/) nor an "
                     "images/ + masks/ folder")


def load_dataset(root: str | Path) -> SegDataset:
    """Load either layout, detected from the sub-folders."""
    return load_lidc_layout(root) if detect_layout(root) == "lidc" else load_image_mask_folder(root)
