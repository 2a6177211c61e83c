"""The reverse process as an animated GIF: one frame per step, read back with imageio."""

import numpy as np
import pytest
import torch

from napari_berdiff.animation import ReverseRecorder, _lut, render_frames, write_animation
from napari_berdiff.diffusion import DiffusionConfig
from napari_berdiff.model import DiffusionModel
from napari_berdiff.networks import build_network, tiny_config

iio = pytest.importorskip("imageio.v3")


def _recorded(steps=4, n=3):
    torch.manual_seed(0)
    net = build_network(tiny_config(image_size=16))
    with torch.no_grad():  # the zero-initialised output would draw the same mask each step
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model = DiffusionModel(net, DiffusionConfig(kind="bernoulli", timesteps=100,
                                                default_steps=steps))
    img = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    rec = ReverseRecorder()
    rec.set_image(0, img)
    frames = []
    for frame in model.sample(img, n=n, steps=steps, seed=1):
        rec.add(0, frame)
        frames.append(frame)
    return rec, frames


def test_one_gif_frame_per_step(tmp_path):
    rec, frames = _recorded(steps=4)
    path = write_animation(rec, tmp_path / "reverse.gif", fps=5, px=64, title="toy")
    back = iio.imread(path, index=None)
    assert back.shape[0] == 4 == len(frames)  # one frame per reverse step
    assert back.shape[-1] == 3 and back.shape[2] == 3 * 64 + 2 * 6  # image | freq | var
    # the frequency panel of the last frame is the run's final frequency map, in viridis
    rendered = render_frames(rec, px=64)[-1]
    top = rendered.shape[0] - 64
    freq = frames[-1].maps["frequency"]
    lut = _lut("viridis")
    want = lut[np.round(np.clip(freq, 0, 1) * 255).astype(int)]
    got = rendered[top::4, 70::4][:16, :16]
    np.testing.assert_array_equal(got, want)
    # GIF quantises colours; the frames still differ from step to step
    assert not np.array_equal(back[0], back[-1])


def test_bad_names_and_empty_runs_are_explained(tmp_path):
    with pytest.raises(ValueError, match="run Sample first"):
        write_animation(ReverseRecorder(), tmp_path / "x.gif")
    rec, _ = _recorded(steps=2)
    with pytest.raises(ValueError, match=r"choose a \.gif"):
        write_animation(rec, tmp_path / "x.png")
    with pytest.raises(ValueError, match="Slice 3 was not sampled"):
        render_frames(rec, slice_pos=3)


def test_the_recorder_stops_at_its_memory_cap(monkeypatch):
    from napari_berdiff import animation

    monkeypatch.setattr(animation, "MAX_BYTES", 3 * 2 * 16 * 16 * 2)  # three steps' maps
    rec, frames = _recorded(steps=5)
    assert len(rec.steps) == 3 and rec.truncated
