"""A refiner conditioned on its segmentor's multi-scale features (HiDiff, issue 23 item 1):
the network option, the trainer's shared segmentor, collaborative gradient and warm start."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from napari_berdiff.data.dataset import SegDataset, SegItem
from napari_berdiff.data.phantoms import make_phantom
from napari_berdiff.networks import CondOnceConfig, network_description
from napari_berdiff.networks.condition_once import ConditionOnceNet
from napari_berdiff.refine import load_refiner, refine_all
from napari_berdiff.training import TrainConfig, default_diffusion, train
from napari_berdiff.training.refiner import init_pair_from
from napari_berdiff.training.trainer import load_state, segmentor_predict

SIZE = 16


def _seg_desc() -> dict:
    return network_description(CondOnceConfig(
        image_size=SIZE, image_channels=1, model_channels=8, channel_mult=(1, 2),
        num_res_blocks=1, encoder_channels=8, norm_groups=4))


def _refiner_desc(features: bool) -> dict:
    d = network_description(CondOnceConfig(
        image_size=SIZE, image_channels=2, model_channels=8, channel_mult=(1, 2),
        num_res_blocks=1, encoder_channels=8, norm_groups=4))
    return {**d, "segmentor": _seg_desc()} if features else d


def _dataset(n: int = 6) -> SegDataset:
    items = [SegItem(make_phantom(s, SIZE).image, make_phantom(s, SIZE).masks, f"c{s}", "0")
             for s in range(n)]
    return SegDataset(items, {"layout": "phantoms", "description": "test phantoms"})


def _config(features: bool = True, **kw) -> TrainConfig:
    base = dict(kind="refiner", network=_refiner_desc(features), segmentor_network=_seg_desc(),
                diffusion=default_diffusion("refiner").to_dict(), steps=6, batch_size=3,
                lr=3e-3, warmup=0, checkpoint_every=100, threads=1, seed=1)
    base.update(kw)
    return TrainConfig(**base)


def _net(features: bool) -> ConditionOnceNet:
    from napari_berdiff.networks.registry import network_from_metadata

    torch.manual_seed(0)
    return network_from_metadata(_refiner_desc(features))


def test_segmentor_features_enter_every_level_through_their_projection():
    net = _net(True)
    assert net.has_segmentor and not _net(False).has_segmentor
    for proj in net.seg_proj:  # zero-initialised: the refiner starts blind to them
        torch.nn.init.normal_(proj.weight)
    img = torch.rand(2, 2, SIZE, SIZE)
    prob, feats = net.segmentor.segment_with_features(img[:, :1])
    # the segmentor's output is its usual segmentation (all-zero mask, t = 0)
    torch.testing.assert_close(prob, segmentor_predict(net.segmentor, img[:, :1]))
    assert [f.shape[1] for f in feats] == [8, 16]
    assert [f.shape[-1] for f in feats] == [SIZE // 2, SIZE // 4]
    plain = [proj(f) for proj, f in zip(net.cond_proj, _encoder_features(net, img))]
    cond = net.encode(img)
    for level in range(2):
        expect = plain[level] + net.seg_proj[level](feats[level])
        torch.testing.assert_close(cond[level], expect)
    # given features are used as they are
    torch.testing.assert_close(net.encode(img, feats)[0], cond[0])


def _encoder_features(net: ConditionOnceNet, img: torch.Tensor) -> list[torch.Tensor]:
    h = net.enc_stem(img)
    out = []
    for down, blocks in zip(net.enc_down, net.enc_blocks):
        h = blocks(down(h))
        out.append(h)
    return out


def test_the_segmentor_part_depends_on_the_image_alone():
    net = _net(True)
    for proj in net.seg_proj:
        torch.nn.init.normal_(proj.weight)
    img = torch.rand(1, 1, SIZE, SIZE)
    a = torch.cat([img, torch.rand(1, 1, SIZE, SIZE)], 1)
    b = torch.cat([img, torch.zeros(1, 1, SIZE, SIZE)], 1)
    _, fa = net.segmentor.segment_with_features(a[:, :1])
    _, fb = net.segmentor.segment_with_features(b[:, :1])
    for x, y in zip(fa, fb):
        torch.testing.assert_close(x, y)


def test_descriptions_without_a_segmentor_are_unchanged_and_bad_segmentors_refused():
    assert "segmentor" not in _refiner_desc(False)
    cfg = CondOnceConfig.from_dict({k: v for k, v in _refiner_desc(True).items() if k != "type"})
    assert cfg.segmentor_config().image_channels == 1
    bad = {**_seg_desc(), "channel_mult": [1, 2, 2]}
    with pytest.raises(ValueError, match="levels and unshuffle"):
        CondOnceConfig(image_channels=2, model_channels=8, channel_mult=(1, 2), norm_groups=4,
                       encoder_channels=8, segmentor=bad)
    with pytest.raises(ValueError, match="segmentor_feature_grad needs"):
        _config(features=False, segmentor_feature_grad=0.5)
    with pytest.raises(ValueError, match="refiner_dice_weight"):
        _config(refiner_dice_weight=-1.0)
    with pytest.raises(ValueError, match="own segmentor"):
        _config(segmentor_network={**_seg_desc(), "num_res_blocks": 2})


@pytest.mark.parametrize("grad, dice", [(0.0, 0.0), (0.5, 1.0)])
def test_training_shares_one_segmentor_and_its_files_load(tmp_path, grad, dice):
    out = tmp_path / "r.safetensors"
    res = train(_config(segmentor_feature_grad=grad, refiner_dice_weight=dice), _dataset(),
                out, progress=False)
    assert res.step == 6 and all(np.isfinite(res.losses))
    refiner, segmentor = load_refiner(out, device="cpu")
    assert refiner.net.has_segmentor and segmentor.kind == "segmentor"
    assert "features" in refiner.metadata["refiner"]["conditioning"]
    # the refiner's own segmentor is the exported one (one set of weights)
    own = {k[len("segmentor."):]: v for k, v in refiner.net.state_dict().items()
           if k.startswith("segmentor.")}
    for k, v in segmentor.net.state_dict().items():
        torch.testing.assert_close(own[k], v)
    st = load_state(res.state)
    assert set(st["seg"]) == set(own)
    img = make_phantom(9, SIZE).image
    r = refine_all(refiner, img, (img > 0.5).astype(np.uint8), n=2, seed=0)
    assert r.masks.shape == (2, SIZE, SIZE)


def test_the_refiners_loss_trains_the_segmentor_only_with_a_positive_weight(tmp_path):
    """Two runs that differ only in the refiner's loss (vb_weight) train the same segmentor
    when the features are detached (weight 0), and different ones with weight > 0. Three
    steps: the output layer and the feature projections start at zero, so the features
    get no gradient before the third step."""
    data = _dataset()

    def segmentor_after(grad: float, vb: float) -> dict:
        res = train(_config(steps=3, segmentor_feature_grad=grad, vb_weight=vb), data,
                    tmp_path / f"g{grad}-{vb}.safetensors", progress=False)
        return load_state(res.state)["seg"]

    def gap(a: dict, b: dict) -> float:
        return max(float((a[k] - b[k]).abs().max()) for k in a)

    assert gap(segmentor_after(0.0, 1.0), segmentor_after(0.0, 3.0)) == 0.0
    assert gap(segmentor_after(0.5, 1.0), segmentor_after(0.5, 3.0)) > 1e-6


def test_warm_start_from_a_plain_pair_starts_as_that_pair(tmp_path):
    old = tmp_path / "old.safetensors"
    train(_config(features=False, steps=2), _dataset(), old, progress=False)
    plain, plain_seg = load_refiner(old, device="cpu")
    net = _net(True)
    init_pair_from(old, net, net.segmentor)
    img = torch.rand(2, 2, SIZE, SIZE)
    x_t = torch.bernoulli(torch.full((2, 1, SIZE, SIZE), 0.5))
    t = torch.tensor([3, 7])
    with torch.no_grad():
        torch.testing.assert_close(net(x_t, t, img), plain.net(x_t, t, img))
        torch.testing.assert_close(segmentor_predict(net.segmentor, img[:, :1]),
                                   segmentor_predict(plain_seg.net, img[:, :1]))
    # a run started from it holds the same weights before its first update
    out = tmp_path / "warm.safetensors"
    res = train(_config(steps=1, init_from=str(old), lr=1e-12), _dataset(), out,
                progress=False)
    warm, _ = load_refiner(out, device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(warm.net(x_t, t, img), plain.net(x_t, t, img),
                                   rtol=1e-4, atol=1e-5)
    assert res.step == 1
