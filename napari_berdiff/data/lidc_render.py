"""CT-like slices rendered around the LIDC readers' real contours (DESIGN §9).

The annotations are real; the images are synthetic. Each item is rendered in Hounsfield
units on the 180×180 grid at 0.5 mm, windowed to lung (W 1500 / L −600) and quantised to
8 bits like the LIDC crops:

* aerated parenchyma (about −875 HU) with smooth and fine texture;
* vessels: branching 3D tubes around the nodule, cut by the slice (dots, ovals and
  branches), the same for every slice of a nodule;
* sometimes a fissure (a thin curved sheet) and sometimes the chest wall (pleura, fat,
  muscle and ribs), placed outside the readers' masks on every slice of the nodule;
* the nodule: its density follows the readers' texture rating (ground glass, part-solid,
  solid), a calcification rating below 6 adds calcium (central, laminated, popcorn, …), its
  edge sharpness follows the margin rating, and its contrast the subtlety rating. Partial
  volume follows the readers' agreement: the core every reader marks is dense, the band only
  some mark is in between;
* a detector blur and correlated quantum noise.

Everything is deterministic by ``seed`` (and the item's patient, nodule and slice).
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from .lidc import LIDC_CROP, LIDC_SPACING_MM, ReaderSlice

__all__ = ["render_slice", "window", "LUNG_WINDOW", "HU_AIR"]

#: Lung window (width, level) in HU.
LUNG_WINDOW = (1500.0, -600.0)
HU_AIR = -1000.0
_PARENCHYMA = -875.0
_BLOOD = 40.0
_SOFT = 40.0
_FAT = -100.0
_BONE = 700.0


def window(hu: np.ndarray, width: float = LUNG_WINDOW[0], level: float = LUNG_WINDOW[1]
           ) -> np.ndarray:
    """HU to [0, 1] through a window, quantised to 8 bits (as the LIDC crops are stored)."""
    v = np.clip((hu - (level - width / 2)) / width, 0.0, 1.0)
    return (np.round(v * 255) / 255).astype(np.float32)


def _rng(seed: int, *keys: Any) -> np.random.Generator:
    words = [int(seed) & 0xFFFFFFFF]
    for k in keys:
        h = hashlib.sha256(str(k).encode()).digest()
        words.append(int.from_bytes(h[:4], "little"))
    return np.random.default_rng(np.random.SeedSequence(words))


def _noise(rng: np.random.Generator, sigma: float, shape=(LIDC_CROP, LIDC_CROP)) -> np.ndarray:
    """Gaussian-filtered white noise of unit standard deviation (smooth fields are drawn on a
    4× coarser grid and interpolated: the same look for a fraction of the cost)."""
    if sigma >= 6:
        coarse = tuple(-(-n // 4) + 1 for n in shape)
        f = ndi.gaussian_filter(rng.standard_normal(coarse), sigma / 4, mode="wrap")
        f = ndi.zoom(f, 4, order=1)[:shape[0], :shape[1]]
    else:
        f = ndi.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return f / (f.std() + 1e-12)


def _rating(item: ReaderSlice, name: str, default: float) -> float:
    v = item.rating(name)
    v = v[v > 0]
    return float(np.median(v)) if v.size else default


# ---------------------------------------------------------------------------- nodule-level scene
def _vessel_tree(rng: np.random.Generator) -> list[tuple[np.ndarray, np.ndarray, float]]:
    """Segments (start mm, end mm, radius mm) of a few branching, bending vessel trees."""
    half = LIDC_CROP * LIDC_SPACING_MM / 2
    segs: list[tuple[np.ndarray, np.ndarray, float]] = []
    for _ in range(int(rng.integers(14, 22))):
        start = np.array([rng.uniform(-half, half), rng.uniform(-half, half),
                          rng.uniform(-20, 20)])
        d = rng.standard_normal(3)
        stack = [(start, d / np.linalg.norm(d), rng.uniform(0.5, 1.9), 0)]
        tree_end = len(segs) + 140
        while stack and len(segs) < tree_end:
            p, d, r, depth = stack.pop()
            # a branch is a few short, slightly bending pieces
            for _piece in range(int(rng.integers(2, 5))):
                d = d + rng.standard_normal(3) * 0.18
                d /= np.linalg.norm(d)
                end = p + d * rng.uniform(3, 7) * (0.8 ** depth)
                segs.append((p, end, r))
                p = end
            if depth < 4 and r > 0.3:
                for _k in range(2 if rng.random() < 0.75 else 1):
                    nd = d + rng.standard_normal(3) * 0.7
                    stack.append((p, nd / np.linalg.norm(nd), r * rng.uniform(0.6, 0.8),
                                  depth + 1))
    return segs


def _scene(seed: int, item: ReaderSlice) -> dict[str, Any]:
    """What is shared by every slice of one nodule (cached: slices come nodule by nodule)."""
    return _scene_of(int(seed), item.patient, int(item.nodule), tuple(item.bbox))


@lru_cache(maxsize=64)
def _scene_of(seed: int, patient: str, nodule: int, bbox: tuple[int, int, int, int]
              ) -> dict[str, Any]:
    rng = _rng(seed, "scene", patient, nodule)
    scene: dict[str, Any] = {"vessels": _vessel_tree(rng)}
    if rng.random() < 0.3:
        ang = rng.uniform(0, 2 * np.pi)
        scene["fissure"] = (np.array([np.cos(ang), np.sin(ang), rng.uniform(-0.3, 0.3)]),
                            rng.uniform(-30, 30), rng.uniform(-0.003, 0.003))
    if rng.random() < 0.35:
        # the chest wall beyond the nodule along a random in-plane direction
        ang = rng.uniform(0, 2 * np.pi)
        n = np.array([np.cos(ang), np.sin(ang)])
        r0, c0, h, w = bbox
        corners = (np.array([[r0, c0], [r0, c0 + w], [r0 + h, c0], [r0 + h, c0 + w]], float)
                   - (LIDC_CROP - 1) / 2) * LIDC_SPACING_MM
        curv = rng.uniform(1 / 600, 1 / 200)
        # the wall's surface (see _chest_wall) is convex: its furthest reach over the
        # nodule's bounding box is at a corner, so the wall never covers a reader's mask
        along = corners @ np.array([-n[1], n[0]])
        reach = float((corners @ n + curv * along ** 2).max())
        gap = 0.0 if rng.random() < 0.35 else rng.uniform(1.0, 20.0)
        scene["wall"] = (n, reach + 1.0 + gap, curv, rng.uniform(3, 7),
                         int(rng.integers(1, 3)), rng.uniform(0, 1))
    return scene


# ---------------------------------------------------------------------------- drawing
def _grid(z_mm: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    c = (np.arange(LIDC_CROP) - (LIDC_CROP - 1) / 2) * LIDC_SPACING_MM
    yy, xx = np.meshgrid(c, c, indexing="ij")
    return yy, xx, np.full_like(yy, z_mm)


def _vessels(segs, z: float, thickness: float) -> np.ndarray:
    """Fraction of blood in each pixel (0..1), slab of ``thickness`` mm approximated."""
    out = np.zeros((LIDC_CROP, LIDC_CROP))
    half_t = thickness / 2
    centre = (LIDC_CROP - 1) / 2
    for a, b, r in segs:
        if min(a[2], b[2]) - r - half_t > z or max(a[2], b[2]) + r + half_t < z:
            continue
        # only the pixels near the segment
        lo = (np.minimum(a[:2], b[:2]) - r - 1) / LIDC_SPACING_MM + centre
        hi = (np.maximum(a[:2], b[:2]) + r + 1) / LIDC_SPACING_MM + centre
        r0, c0 = max(int(lo[0]), 0), max(int(lo[1]), 0)
        r1, c1 = min(int(hi[0]) + 2, LIDC_CROP), min(int(hi[1]) + 2, LIDC_CROP)
        if r1 <= r0 or c1 <= c0:
            continue
        yy = ((np.arange(r0, r1) - centre) * LIDC_SPACING_MM)[:, None]
        xx = ((np.arange(c0, c1) - centre) * LIDC_SPACING_MM)[None, :]
        ab = b - a
        denom = float(ab @ ab) + 1e-9
        t = ((yy - a[0]) * ab[0] + (xx - a[1]) * ab[1] + (z - a[2]) * ab[2]) / denom
        t = np.clip(t, 0.0, 1.0)
        dy, dx, dz = yy - (a[0] + t * ab[0]), xx - (a[1] + t * ab[1]), z - (a[2] + t * ab[2])
        dz = np.maximum(np.abs(dz) - half_t * 0.5, 0.0)
        d = np.sqrt(dy * dy + dx * dx + dz * dz)
        # partial volume across the slab: thin vessels look fainter
        frac = np.clip((r - d) / 0.35 + 0.5, 0.0, 1.0) * min(1.0, (2 * r / thickness) ** 0.5)
        view = out[r0:r1, c0:c1]
        np.maximum(view, frac, out=view)
    return out


def _chest_wall(wall, yy, xx, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """HU of the wall and the fraction (0..1) of each pixel inside it.

    From the lung outwards: the pleura, the ribs in the intercostal muscle, a muscle layer,
    then subcutaneous fat.
    """
    n, offset, curv, fat_mm, n_ribs, phase = wall
    s = yy * n[0] + xx * n[1] - offset
    along = -yy * n[1] + xx * n[0]
    s = s + curv * along ** 2  # the wall wraps around the lung
    inside = np.clip(s / 0.4 + 0.5, 0.0, 1.0)
    hu = np.full_like(yy, _SOFT + 15)
    fat_from = 16.0 + 3 * fat_mm
    hu = np.where(s > fat_from, _FAT, hu)
    hu = np.where((s > 1.0) & (s < 1.0 + fat_mm * 0.3), _FAT + 60, hu)  # extrapleural fat
    for k in range(n_ribs):
        centre_along = (phase + k) * 30.0 - 30.0
        e = ((along - centre_along) / 8.0) ** 2 + ((s - 7.0) / 4.5) ** 2
        hu = np.where(e < 1.0, np.where(e > 0.5, _BONE, 250.0), hu)
    hu = ndi.gaussian_filter(hu, 0.8) + 12 * _noise(rng, 2.0)
    return hu, inside


def _calcium(kind: int, core: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Fraction of calcium (0..1) by the calcification rating (1 popcorn … 5 central)."""
    if not core.any():
        return np.zeros(core.shape)
    dist = ndi.distance_transform_edt(core)
    rmax = dist.max()
    yy, xx = np.nonzero(core)
    cy, cx = yy.mean(), xx.mean()
    g = np.indices(core.shape)
    if kind == 3:  # solid
        calc = dist > 0.25 * rmax
    elif kind == 5:  # central
        calc = (g[0] - cy) ** 2 + (g[1] - cx) ** 2 < (0.45 * rmax) ** 2
    elif kind == 2:  # laminated: rings
        calc = (np.sin(dist / max(rmax, 1) * 3 * np.pi) > 0.3) & (dist > 1)
    elif kind == 4:  # non-central
        i = rng.integers(yy.size)
        calc = ((g[0] - yy[i]) ** 2 + (g[1] - xx[i]) ** 2 < (0.35 * rmax + 1) ** 2)
    else:  # 1 popcorn: a few blobs
        calc = np.zeros(core.shape, bool)
        for _ in range(int(rng.integers(3, 6))):
            i = rng.integers(yy.size)
            calc |= (g[0] - yy[i]) ** 2 + (g[1] - xx[i]) ** 2 < (0.2 * rmax + 1) ** 2
    return ndi.gaussian_filter((calc & core).astype(float), 0.7)


def _nodule_hu(item: ReaderSlice, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The nodule's HU and its density weight (0..1) on this slice."""
    masks = item.masks.astype(np.float64)
    n_marked = max(int(item.marked.sum()), 1)
    agree = masks.sum(axis=0) / n_marked  # 1 where every reader of the nodule marked it
    texture = _rating(item, "texture", 5)
    margin = _rating(item, "margin", 4)
    subtlety = _rating(item, "subtlety", 4)
    calc_votes = item.rating("calcification")
    calc_votes = calc_votes[calc_votes > 0]
    # partial volume where readers disagree: the band marked by some is in between
    density = agree ** 0.7
    sigma_mm = float(np.interp(margin, [1, 2, 3, 4, 5], [1.6, 1.15, 0.8, 0.55, 0.35]))
    weight = ndi.gaussian_filter(density, sigma_mm / LIDC_SPACING_MM)
    # ground glass (1) … solid (5)
    solid_hu = float(np.interp(texture, [1, 2, 3, 4, 5], [-640, -520, -420, -120, 10]))
    hu = solid_hu + 30 * _noise(rng, 1.2)
    if 2.5 <= texture < 4.5:  # part-solid: a solid component in the core
        core = ndi.binary_erosion(agree >= 1.0, iterations=2)
        if core.any():
            comp = ndi.gaussian_filter(core.astype(float), 1.5)
            hu = hu + comp / max(comp.max(), 1e-6) * (20 - solid_hu) * 0.9
    if calc_votes.size and np.median(calc_votes) < 6:
        kind = int(np.bincount(calc_votes[calc_votes < 6]).argmax())
        calc = _calcium(kind, agree >= 0.5, rng)
        hu = hu + calc * (rng.uniform(350, 900) - hu)
    # subtle nodules have less contrast
    contrast = float(np.interp(subtlety, [1, 5], [0.55, 1.0]))
    return hu, np.clip(weight * contrast, 0.0, 1.0)


def render_slice(item: ReaderSlice, seed: int = 0, thickness_mm: float = 1.5
                 ) -> dict[str, np.ndarray]:
    """Render one item.

    Parameters
    ----------
    item
        A :class:`~napari_berdiff.data.lidc.ReaderSlice` (masks at 0.5 mm, 180×180).
    seed
        Same seed, same image, bit for bit.
    thickness_mm
        Slice thickness for the partial volume of vessels.

    Returns
    -------
    dict
        ``hu`` (180, 180) float32 Hounsfield units, ``image`` (180, 180) float32 in [0, 1]
        (lung window, 8-bit steps).
    """
    scene = _scene(seed, item)
    rng = _rng(seed, "slice", item.patient, item.nodule, item.slice_index)
    z = item.z - item.z_centre
    yy, xx, _ = _grid(z)
    # parenchyma: gravity-like gradient, smooth variation, fine texture
    grad = rng.standard_normal(2) * 0.12
    hu = (_PARENCHYMA + rng.uniform(-40, 30) + (yy * grad[0] + xx * grad[1])
          + 20 * _noise(rng, 18.0) + 14 * _noise(rng, 2.5) + 8 * _noise(rng, 1.0))
    # vessels (blood, with partial volume)
    ves = _vessels(scene["vessels"], z, thickness_mm)
    hu = hu + ves * (_BLOOD - hu)
    if "fissure" in scene:
        nrm, off, curv = scene["fissure"]
        s = yy * nrm[0] + xx * nrm[1] + z * nrm[2] - off + curv * (xx * nrm[0] - yy * nrm[1]) ** 2
        hu = hu + 420 * np.exp(-0.5 * (s / 0.35) ** 2) * (0.6 + 0.4 * _noise(rng, 6.0).clip(-1, 1))
    # the nodule (vessels stay visible through ground glass: the brighter one wins)
    nod_hu, weight = _nodule_hu(item, rng)
    base = hu
    hu = np.maximum(base, base + weight * (nod_hu - base))
    if "wall" in scene:
        wall_hu, inside = _chest_wall(scene["wall"], yy, xx, rng)
        hu = hu * (1 - inside) + wall_hu * inside
    # detector blur and correlated quantum noise
    hu = ndi.gaussian_filter(hu, 0.6)
    hu = hu + rng.uniform(15, 35) * _noise(rng, 0.7)
    hu = hu.astype(np.float32)
    return {"hu": hu, "image": window(hu)}
