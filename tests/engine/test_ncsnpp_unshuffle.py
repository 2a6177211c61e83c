"""The NCSN++ generator's pixel-unshuffle variant (our CPU option, ``NCSNppConfig.unshuffle``):
it equals the same network run by hand on pixel-unshuffled inputs, keeps the official layout
at ``unshuffle=1``, and trains and loads through ``berdiff train --kind cdal --unshuffle``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from napari_berdiff.checkpoints import load_model
from napari_berdiff.cli import main
from napari_berdiff.networks import NCSNppConfig, NCSNppGenerator, get_network_preset

SMALL = dict(nf=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), nz=8,
             z_emb_dim=16, n_mlp=1, cond_enc_layers=1, cond_enc_num_res_blocks=1)


def _net(seed: int = 0, **kw) -> NCSNppGenerator:
    torch.manual_seed(seed)
    return NCSNppGenerator(NCSNppConfig(**{**SMALL, **kw})).eval()


def test_presets_keep_the_official_layout():
    for name in ("cdal-lung-256", "cdal-monu-256", "cdal-hippo-32"):
        cfg = get_network_preset(name)
        assert cfg.unshuffle == 1 and cfg.inner_size == cfg.image_size


def test_unshuffled_net_has_the_inner_nets_layout_with_u2_channels():
    outer = _net(image_size=32, unshuffle=2, image_channels=1, mask_channels=1)
    inner = _net(image_size=16, image_channels=4, mask_channels=4)
    a = {k: tuple(v.shape) for k, v in outer.state_dict().items()}
    b = {k: tuple(v.shape) for k, v in inner.state_dict().items()}
    assert a == b
    assert outer.config.resolutions == [16, 8]
    assert a["all_modules.2.weight"] == (32, 4, 3, 3)  # the encoder's first conv: 4 = 1·2²


def test_unshuffled_forward_equals_the_inner_net_by_hand():
    """G_u(x, t, img, z) = tanh(pixel_shuffle(G_inner(unshuffle(x), t, unshuffle(img), z)))."""
    outer = _net(1, image_size=32, unshuffle=2)
    inner = _net(2, image_size=16, image_channels=4, mask_channels=4, use_tanh=False)
    inner.load_state_dict(outer.state_dict())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 32, 32, generator=g)
    img = torch.rand(3, 1, 32, 32, generator=g)
    z = torch.randn(3, 8, generator=g)
    t = torch.tensor([0, 1, 1])
    with torch.no_grad():
        got = outer(x, t, img, z)
        want = torch.tanh(F.pixel_shuffle(inner(F.pixel_unshuffle(x, 2), t,
                                                F.pixel_unshuffle(img, 2), z), 2))
        # the encode-once path the sampler uses agrees too
        cached = outer.predict(x, t, outer.encode(img[:1]).expand(3, -1, -1, -1), z)
        cached_want = outer(x, t, img[:1].expand(3, -1, -1, -1), z)
    assert got.shape == (3, 1, 32, 32)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cached, cached_want, rtol=1e-5, atol=1e-6)
    # and it differs from running the same weights in another pixel order
    wrong = torch.tanh(F.pixel_shuffle(inner(F.pixel_unshuffle(x.transpose(2, 3), 2), t,
                                             F.pixel_unshuffle(img, 2), z), 2))
    assert not torch.allclose(got, wrong, atol=1e-3)


def test_sizes_are_checked_outside_and_validated():
    net = _net(image_size=32, unshuffle=2)
    with pytest.raises(ValueError, match="32x32"):
        net(torch.zeros(1, 1, 16, 16), torch.zeros(1, dtype=torch.long), torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match="unshuffle"):
        NCSNppConfig(**{**SMALL, "image_size": 30, "unshuffle": 4})
    with pytest.raises(ValueError, match="unshuffle"):
        NCSNppConfig(**{**SMALL, "image_size": 32, "unshuffle": 0})
    with pytest.raises(ValueError, match="divisible"):
        NCSNppConfig(**{**SMALL, "image_size": 36, "unshuffle": 2, "ch_mult": (1, 2, 2)})


def test_activation_bytes_are_those_of_the_inner_maps():
    outer = _net(image_size=32, unshuffle=2)
    inner = _net(image_size=16, image_channels=4, mask_channels=4)
    assert outer.activation_bytes(32, 32) == inner.activation_bytes(16, 16)
    assert outer.activation_bytes(32, 32) < _net(image_size=32,
                                                 attn_resolutions=(16,)).activation_bytes(32, 32)


def test_train_with_unshuffle_writes_a_loadable_model(tmp_path):
    data, out = tmp_path / "ph", tmp_path / "u.safetensors"
    assert main(["data", "phantoms", "--out", str(data), "--cases", "6", "--size", "16"]) == 0
    assert main(["train", "--data", str(data), "--kind", "cdal", "-o", str(out), "--steps", "3",
                 "--batch-size", "2", "--warmup", "1", "--quiet", "--channel-mult", "1,2",
                 "--unshuffle", "2", "--split", "all"]) == 0
    model = load_model(out)
    cfg = model.net.config
    assert (cfg.unshuffle, cfg.image_size, cfg.attn_resolutions) == (2, 16, (2,))
    res = model.sample_all(np.random.default_rng(1).random((16, 16)), n=2, seed=0)
    assert res.masks.shape == (2, 16, 16) and res.steps_done == 2


def test_unshuffle_is_refused_for_other_kinds(tmp_path, capsys):
    data = tmp_path / "ph"
    assert main(["data", "phantoms", "--out", str(data), "--cases", "4", "--size", "16"]) == 0
    assert main(["train", "--data", str(data), "--kind", "bernoulli", "-o",
                 str(tmp_path / "b.safetensors"), "--steps", "1", "--unshuffle", "2",
                 "--split", "all"]) != 0
    assert "--unshuffle applies to --kind cdal only" in capsys.readouterr().err
    assert not (tmp_path / "b.safetensors").exists()
