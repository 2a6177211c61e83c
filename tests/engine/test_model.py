"""The model object: presets, normalisation, sampling a real (tiny) UNet end to end."""

import numpy as np
import pytest
import torch

from napari_berdiff.diffusion import DiffusionConfig
from napari_berdiff.model import DiffusionModel, model_from_preset, normalise_image
from napari_berdiff.model_presets import MODEL_PRESETS, get_model_preset
from napari_berdiff.networks import build_network, tiny_config


def tiny_model(kind="bernoulli", **net_overrides):
    torch.manual_seed(0)
    cfg = dict(image_size=16)
    if kind == "gaussian":
        cfg.update(output_activation="none")
    cfg.update(net_overrides)
    net = build_network(tiny_config(**cfg))
    diff = DiffusionConfig(kind="gaussian" if kind == "gaussian" else "bernoulli",
                           timesteps=100, default_steps=4,
                           schedule="alpha_bar_linear" if kind == "refiner" else "cosine")
    return DiffusionModel(net, diff, {"kind": kind, "name": f"tiny-{kind}"})


def test_presets_build_the_official_networks():
    m = model_from_preset("berdiff-lidc-128")
    assert m.num_parameters() == 85_599_233
    assert m.kind == "bernoulli" and m.diffusion.schedule == "cosine"
    assert m.diffusion.default_steps == "ddimuni10" and m.diffusion.prediction == "eps"
    assert m.data["normalisation"] == {"mode": "unit"}
    assert set(MODEL_PRESETS) == {"berdiff-lidc-128", "wolleb-brats-256", "cdal-lung-256",
                                  "cdal-monu-256", "cdal-hippo-32"}


def test_unknown_preset_is_named():
    with pytest.raises(ValueError, match="unknown preset 'lidc'.*berdiff-lidc-128"):
        get_model_preset("lidc")
    with pytest.raises(ValueError, match="unknown preset 'lidc'"):
        model_from_preset("lidc")


@pytest.mark.parametrize("kind", ["bernoulli", "gaussian"])
def test_tiny_model_samples_any_roi_size(kind):
    """Sizes that the UNet cannot take are padded and cropped back transparently."""
    m = tiny_model(kind)
    img = np.random.default_rng(0).random((23, 30)).astype(np.float32) * 900 - 100
    frames = list(m.sample(img, n=3, steps=4, seed=1, roi=(2, 1, 19, 30)))
    assert len(frames) == 4
    assert frames[-1].x0_prob.shape == (3, 17, 29)
    assert frames[-1].maps["variance"].shape == (17, 29)
    res = m.sample_all(img, n=3, steps=4, seed=1, roi=(2, 1, 19, 30))
    np.testing.assert_array_equal(res.probs, frames[-1].x0_prob)


def test_draw_correlation_can_be_overridden_per_call():
    m = tiny_model()
    with torch.no_grad():  # the zero-initialised output would ignore x_t altogether
        for p in m.net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    img = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    default = m.sample_all(img, n=4, steps=4, seed=1)
    same = m.sample_all(img, n=4, steps=4, seed=1, draw_correlation=0.0)
    np.testing.assert_array_equal(default.probs, same.probs)
    other = m.sample_all(img, n=4, steps=4, seed=1, draw_correlation=0.9)
    assert not np.array_equal(default.probs, other.probs)
    assert m.diffusion.draw_correlation == 0.0  # the model itself is unchanged
    with pytest.raises(ValueError, match="Bernoulli kernel only"):
        tiny_model("gaussian").sample_all(img, n=2, steps=2, draw_correlation=0.5)


def test_temperature_can_be_overridden_per_call():
    """A sharpened run starts from the same x̂0 (same seed, same x_T) and then differs; its
    probabilities stay the network's own, so the masks are still ``probs > 0.5``."""
    m = tiny_model()
    with torch.no_grad():
        for p in m.net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    img = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    plain = list(m.sample(img, n=4, steps=4, seed=1))
    sharp = list(m.sample(img, n=4, steps=4, seed=1, temperature=0.25))
    np.testing.assert_array_equal(plain[0].x0_prob, sharp[0].x0_prob)
    assert not np.array_equal(plain[-1].x0_prob, sharp[-1].x0_prob)
    res = m.sample_all(img, n=4, steps=4, seed=1, temperature=0.25)
    np.testing.assert_array_equal(res.probs, sharp[-1].x0_prob)
    np.testing.assert_array_equal(res.masks, res.probs > 0.5)
    same = m.sample_all(img, n=4, steps=4, seed=1, temperature=1.0)
    np.testing.assert_array_equal(same.probs, plain[-1].x0_prob)
    assert m.diffusion.temperature == 1.0  # the model itself is unchanged
    with pytest.raises(ValueError, match="Bernoulli kernel only"):
        tiny_model("gaussian").sample_all(img, n=2, steps=2, temperature=0.5)


def test_roi_is_normalised_on_its_own_like_a_crop():
    """Sampling a region equals sampling the cropped image (as the widgets do): min-max
    statistics come from the region, not from the rest of the slice."""
    m = tiny_model()
    torch.manual_seed(1)
    with torch.no_grad():  # the output layer starts at zero: make the net see its input
        for p in m.net.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    img = np.random.default_rng(3).random((40, 48)).astype(np.float32) * 1000
    img[:5] = 5000  # bright rows outside the region change whole-image min-max
    box = (8, 4, 40, 36)
    whole = m.sample_all(img, n=2, steps=3, seed=4, roi=box)
    crop = m.sample_all(img[8:40, 4:36], n=2, steps=3, seed=4)
    np.testing.assert_allclose(whole.probs, crop.probs, atol=1e-6)
    unscaled = m.sample_all(img[8:40, 4:36] / 5000, n=2, steps=3, seed=4, normalise=False)
    assert np.abs(unscaled.probs - crop.probs).max() > 1e-3  # the scaling matters
    cond = m.prepare(img, roi=box)
    assert cond[0, 8:40, 4:36].min() == 0 and cond[0, 8:40, 4:36].max() == 1


def test_channels_last_gives_the_same_samples():
    m = tiny_model()
    img = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    a = m.sample_all(img, n=2, steps=3, seed=4)
    m.to("cpu", channels_last=True)
    b = m.sample_all(img, n=2, steps=3, seed=4)
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-5)


def test_refiner_appends_the_prior_channel():
    m = tiny_model("refiner", image_channels=2)
    assert m.image_channels == 1 and m.network_channels == 2
    img = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    prior = np.zeros((16, 16), np.float32)
    prior[4:10, 4:12] = 1
    cond = m.prepare(img, prior)
    assert cond.shape == (2, 16, 16)
    np.testing.assert_array_equal(cond[1], prior)
    assert m.sample_all(img, n=2, steps=3, prior=prior).probs.shape == (2, 16, 16)
    with pytest.raises(ValueError, match="needs a prior"):
        m.sample(img, n=2)
    with pytest.raises(ValueError, match="prior's shape"):
        m.sample(img, n=2, prior=np.zeros((8, 8)))


def test_wrong_channel_count_names_both_numbers():
    m = tiny_model()
    with pytest.raises(ValueError, match="takes 1 image channel.*has 3"):
        m.sample(np.zeros((3, 16, 16), np.float32), n=1)


@pytest.mark.parametrize(
    "spec, expect",
    [
        ({"mode": "minmax"}, [0.0, 0.5, 1.0]),
        ({"mode": "fixed", "min": 0, "max": 100}, [0.0, 1.0, 1.0]),
        ({"mode": "none"}, [-50.0, 100.0, 250.0]),
    ],
)
def test_normalisation(spec, expect):
    img = np.array([[[-50.0, 100.0, 250.0]]], np.float32)
    np.testing.assert_allclose(normalise_image(img, spec)[0, 0], expect, atol=1e-6)
    np.testing.assert_allclose(normalise_image(img, {"mode": "unit"})[0, 0], [0, 0.5, 1])
    u8 = np.array([[[0, 51, 255]]], np.uint8)
    np.testing.assert_allclose(normalise_image(u8, {"mode": "unit"})[0, 0], [0, 0.2, 1])
    unit = np.array([[[0.1, 0.2]]], np.float32)
    np.testing.assert_allclose(normalise_image(unit, {"mode": "unit"}), unit)
    z = normalise_image(img, {"mode": "zscore"})
    assert abs(z.mean()) < 1e-6 and z.std() == pytest.approx(1.0, rel=1e-5)
    with pytest.raises(ValueError, match="normalisation 'gamma'"):
        normalise_image(img, {"mode": "gamma"})


def test_summary_describes_the_model():
    s = tiny_model().summary()
    assert s["kind"] == "bernoulli" and s["parameters"] > 0 and s["device"] == "cpu"
    assert s["diffusion"]["timesteps"] == 100
