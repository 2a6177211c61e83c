"""The reverse process as an animation for slides: one frame per diffusion step.

A :class:`ReverseRecorder` keeps a compact copy of every step of a run (the frequency and
variance maps, float16) while it streams; :func:`write_animation` renders them as
``image | frequency | variance`` panels with a caption and writes an animated GIF
(imageio's Pillow plugin) or, when ``imageio-ffmpeg`` is installed, an MP4. No Qt here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

#: the maps shown, with their colormap and the value at the top of the scale
PANELS = (("frequency", "viridis", 1.0), ("variance", "magma", 0.25))
#: hard cap on what a recorder keeps (bytes), so a long volume run cannot exhaust memory
MAX_BYTES = 256 * 2**20


@dataclass
class RecordedStep:
    slice_pos: int
    step: int
    n_steps: int
    t: int
    maps: dict[str, np.ndarray]


@dataclass
class ReverseRecorder:
    """Collects every reverse step of a run (fed from the sampling worker)."""

    steps: list[RecordedStep] = field(default_factory=list)
    images: dict[int, np.ndarray] = field(default_factory=dict)
    nbytes: int = 0
    truncated: bool = False

    def set_image(self, slice_pos: int, crop: np.ndarray) -> None:
        """The model input of a slice, (h, w) or (C, h, w); shown in grey."""
        img = np.asarray(crop, dtype=np.float32)
        if img.ndim == 3:
            img = img.mean(axis=0)
        self.images[slice_pos] = img

    def add(self, slice_pos: int, frame: Any) -> None:
        """Keep ``frame`` (a sampler frame with ``maps``, ``step``, ``n_steps``, ``t``)."""
        if self.truncated:
            return
        maps = {name: np.asarray(frame.maps[name], dtype=np.float16) for name, _, _ in PANELS}
        size = sum(m.nbytes for m in maps.values())
        if self.nbytes + size > MAX_BYTES:
            self.truncated = True
            return
        self.nbytes += size
        self.steps.append(RecordedStep(slice_pos, int(frame.step), int(frame.n_steps),
                                       int(frame.t), maps))

    def slices(self) -> list[int]:
        return sorted({s.slice_pos for s in self.steps})

    def frames_of(self, slice_pos: int) -> list[RecordedStep]:
        return [s for s in self.steps if s.slice_pos == slice_pos]


def _lut(name: str) -> np.ndarray:
    """A (256, 3) uint8 colour table (matplotlib's colormap; grey without matplotlib)."""
    ramp = np.linspace(0.0, 1.0, 256)
    try:
        import matplotlib

        rgb = matplotlib.colormaps[name](ramp)[:, :3]
    except ImportError:
        rgb = np.repeat(ramp[:, None], 3, axis=1)
    return (rgb * 255).round().astype(np.uint8)


def _to_rgb(values: np.ndarray, top: float, lut: np.ndarray, px: int) -> np.ndarray:
    idx = np.clip(np.asarray(values, dtype=np.float32) / top, 0.0, 1.0)
    rgb = lut[(idx * 255).round().astype(np.intp)]
    rep = max(1, px // max(rgb.shape[:2]))
    return np.repeat(np.repeat(rgb, rep, axis=0), rep, axis=1)


def _grey(image: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(image)), float(np.max(image))
    return (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)


def render_frames(recorder: ReverseRecorder, slice_pos: int | None = None, px: int = 256,
                  title: str = "") -> list[np.ndarray]:
    """One RGB frame (uint8) per recorded step of ``slice_pos`` (the first one by default):
    ``image | frequency | variance`` with a caption (the step, and ``title``)."""
    from PIL import Image, ImageDraw, ImageFont

    if not recorder.steps:
        raise ValueError("No reverse steps were recorded: run Sample first, then export.")
    slices = recorder.slices()
    pos = slices[0] if slice_pos is None else slice_pos
    if pos not in slices:
        raise ValueError(f"Slice {pos} was not sampled in this run (sampled: {slices}).")
    steps = recorder.frames_of(pos)
    grey = _lut("gray")
    image = recorder.images.get(pos)
    luts = {name: _lut(cmap) for name, cmap, _ in PANELS}
    font = ImageFont.load_default(size=max(12, px // 14))
    caption_h = max(24, px // 8)
    frames = []
    for rec in steps:
        panels = []
        if image is not None:
            panels.append(_to_rgb(_grey(image), 1.0, grey, px))
        for name, _, top in PANELS:
            panels.append(_to_rgb(rec.maps[name].astype(np.float32), top, luts[name], px))
        h = max(p.shape[0] for p in panels)
        gap = np.zeros((h, 6, 3), np.uint8)
        row = np.concatenate([x for p in panels for x in (p, gap)][:-1], axis=1)
        canvas = Image.new("RGB", (row.shape[1], h + caption_h), (0, 0, 0))
        canvas.paste(Image.fromarray(row), (0, caption_h))
        draw = ImageDraw.Draw(canvas)
        names = (["image"] if image is not None else []) + [n for n, _, _ in PANELS]
        text = (f"{title} · " if title else "") + (
            f"step {rec.step + 1}/{rec.n_steps} (t = {rec.t}) · " + " | ".join(names))
        draw.text((6, caption_h // 2), text, fill=(255, 255, 255), font=font, anchor="lm")
        frames.append(np.asarray(canvas))
    return frames


def write_animation(recorder: ReverseRecorder, path: str | Path, fps: float = 4.0,
                    slice_pos: int | None = None, px: int = 256, title: str = "") -> Path:
    """Write the run's reverse process to ``path``: ``.gif`` (always), ``.mp4`` (with
    imageio-ffmpeg). The last frame is held for a second. Returns the path written."""
    import imageio.v3 as iio

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".gif", ".mp4"):
        raise ValueError(f"Cannot write '{path.name}': choose a .gif (or .mp4) file name.")
    frames = render_frames(recorder, slice_pos, px, title)
    hold = max(1, int(round(fps)))
    if suffix == ".gif":
        durations = [1000.0 / fps] * (len(frames) - 1) + [1000.0 / fps * (1 + hold)]
        iio.imwrite(path, np.stack(frames), extension=".gif", duration=durations, loop=0)
        return path
    try:
        import imageio_ffmpeg  # noqa: F401
    except ImportError:
        raise ValueError(f"Writing '{path.name}' needs imageio-ffmpeg (pip install "
                         "imageio-ffmpeg); a .gif needs nothing more.") from None
    even = [f[: f.shape[0] // 2 * 2, : f.shape[1] // 2 * 2] for f in frames]
    even += [even[-1]] * hold
    iio.imwrite(path, np.stack(even), extension=".mp4", fps=fps)
    return path
