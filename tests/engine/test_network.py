"""The conditional UNet: official state-dict layout and forward semantics.

No Qt, no napari. The two official-size networks are only ever built on the ``meta`` device.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from napari_berdiff.networks import (
    NETWORK_PRESETS,
    AttentionBlock,
    ConditionalUNet,
    GroupNorm32,
    UNetConfig,
    build_network,
    get_network_preset,
    official_attention_ds,
    qkv_attention,
    timestep_embedding,
    tiny_config,
)

_REFERENCE_DIR = Path(__file__).resolve().parent / "reference"


def _reference(name: str) -> dict:
    """The key list read off the official code (a copy of shared/reference/*.keys.json)."""
    return json.loads((_REFERENCE_DIR / f"{name}.keys.json").read_text())


def _meta_network(name: str) -> ConditionalUNet:
    with torch.device("meta"):
        return build_network(name)


def _layout(net: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in net.state_dict().items()]


def _randomize(net: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
    """Give every parameter (including the zero-initialised ones) random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    return net


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


# ------------------------------------------------------------------------------------
# official layouts
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["berdiff-lidc-128", "wolleb-brats-256"])
def test_preset_matches_official_layout(name):
    net = _meta_network(name)
    layout = _layout(net)
    data = _reference(name)
    expected = [(k, tuple(s)) for k, s in data["keys"]]
    ours, theirs = dict(layout), dict(expected)
    assert sorted(set(theirs) - set(ours)) == [], "missing keys"
    assert sorted(set(ours) - set(theirs)) == [], "unexpected keys"
    assert [k for k in theirs if theirs[k] != ours[k]] == [], "shape mismatch"
    assert layout == expected, "state_dict order differs"
    assert len(layout) == data["tensors"]
    assert net.num_parameters() == data["parameters"]
    assert sum(math.prod(s) for _, s in layout) == data["parameters"]


def test_berdiff_preset_facts():
    cfg = get_network_preset("berdiff-lidc-128")
    # The official flag "16" (16x16 feature maps at 128 px) means downsample factor 8.
    assert official_attention_ds(128, "16") == (8,)
    assert cfg.attention_resolutions == (8,)
    assert cfg.concat_order == "mask_first" and cfg.output_activation == "sigmoid"

    net = _meta_network("berdiff-lidc-128")
    sd = net.state_dict()
    assert len(sd) == 368
    assert net.num_parameters() == 85_599_233
    assert tuple(sd["input_blocks.0.0.weight"].shape) == (128, 2, 3, 3)
    assert tuple(sd["out.2.weight"].shape) == (1, 128, 3, 3)

    attention_blocks = {k.rsplit(".qkv.", 1)[0] for k in sd if ".qkv." in k}
    assert attention_blocks == {
        "input_blocks.10.1", "input_blocks.11.1", "middle_block.1",
        "output_blocks.3.1", "output_blocks.4.1", "output_blocks.5.1",
    }
    assert tuple(sd["middle_block.1.qkv.weight"].shape) == (1536, 512, 1)
    assert all(m.num_heads == 1 for m in net.modules() if isinstance(m, AttentionBlock))


def test_wolleb_preset_facts():
    cfg = get_network_preset("wolleb-brats-256")
    assert official_attention_ds(256, "16") == (16,) == cfg.attention_resolutions
    assert cfg.in_channels == 5 and cfg.out_channels == 2
    assert cfg.concat_order == "image_first" and cfg.output_activation == "none"
    sd = _meta_network("wolleb-brats-256").state_dict()
    assert tuple(sd["input_blocks.0.0.weight"].shape) == (128, 5, 3, 3)
    assert tuple(sd["out.2.weight"].shape) == (2, 128, 3, 3)


def test_unknown_preset_names_it():
    with pytest.raises(ValueError) as err:
        get_network_preset("berdiff-lidc-512")
    msg = str(err.value)
    assert "berdiff-lidc-512" in msg
    for known in NETWORK_PRESETS:
        assert known in msg
    with pytest.raises(ValueError, match="no-such-net"):
        build_network("no-such-net")


def test_config_round_trip_and_validation():
    for cfg in [*NETWORK_PRESETS.values(), tiny_config()]:
        d = json.loads(json.dumps(cfg.to_dict()))
        assert type(cfg).from_dict(d) == cfg
    with pytest.raises(ValueError, match="bogus"):
        UNetConfig.from_dict({**tiny_config().to_dict(), "bogus": 1})
    # A resolution passed where a downsample factor is expected is caught.
    with pytest.raises(ValueError, match="downsample"):
        tiny_config(attention_resolutions=(16,))
    with pytest.raises(ValueError):
        tiny_config(concat_order="sideways")
    with pytest.raises(ValueError):
        tiny_config(model_channels=8)  # not divisible into 32 groups


# ------------------------------------------------------------------------------------
# forward semantics on tiny networks
# ------------------------------------------------------------------------------------
def test_fresh_network_is_zero_initialised():
    net = build_network(tiny_config()).eval()
    zero = [k for k, v in net.state_dict().items()
            if k.endswith(("out_layers.3.weight", "proj_out.weight")) or k == "out.2.weight"]
    assert zero and all(net.state_dict()[k].abs().max() == 0 for k in zero)
    x = torch.bernoulli(torch.full((2, 1, 16, 16), 0.5))
    with torch.no_grad():
        out = net(x, 10, torch.randn(1, 1, 16, 16))
    assert torch.equal(out, torch.full_like(out, 0.5))  # sigmoid(0)


def test_forward_shape_range_broadcast_and_predict():
    torch.manual_seed(0)
    net = _randomize(build_network(tiny_config(image_channels=2))).eval()
    n = 3
    x = torch.bernoulli(torch.full((n, 1, 16, 16), 0.5))
    img = torch.randn(1, 2, 16, 16)
    t = torch.tensor([0, 5, 999])
    with torch.no_grad():
        out = net(x, t, img)
        assert out.shape == (n, 1, 16, 16)
        assert out.min() > 0 and out.max() < 1
        repeated = net(x, t, img.repeat(n, 1, 1, 1))
        via_cond = net.predict(x, t, net.encode(img))
        assert torch.allclose(out, repeated, atol=1e-6)
        assert torch.equal(out, via_cond)
        # scalar t equals a full (N,) tensor of that value
        assert torch.equal(net(x, 7, img), net(x, torch.full((n,), 7), img))
        assert torch.equal(net(x, torch.tensor(7), img), net(x, torch.full((n,), 7), img))
        # the timestep matters
        assert not torch.allclose(net(x, 0, img), net(x, 999, img))
    assert net.encode(img) is img
    with pytest.raises(ValueError):
        net(x, torch.tensor([1, 2]), img)
    with pytest.raises(ValueError):
        net(x, t, torch.randn(2, 2, 16, 16))


def test_concat_order_and_raw_output():
    """The image channels go after x_t for mask_first and before it for image_first."""
    base = dict(image_channels=2, out_channels=2, output_activation="none")
    a = _randomize(build_network(tiny_config(concat_order="mask_first", **base))).eval()
    b = build_network(tiny_config(concat_order="image_first", **base)).eval()
    sd = dict(a.state_dict())
    w = sd["input_blocks.0.0.weight"]  # (C, 1 + 2, 3, 3): [x_t | img] for a
    sd["input_blocks.0.0.weight"] = torch.cat([w[:, 1:], w[:, :1]], dim=1)  # [img | x_t]
    b.load_state_dict(sd)
    x = torch.randn(2, 1, 16, 16)
    img = torch.randn(2, 2, 16, 16)
    with torch.no_grad():
        ya, yb = a(x, 3, img), b(x, 3, img)
    assert ya.shape == (2, 2, 16, 16)
    assert torch.allclose(ya, yb, atol=1e-5)
    assert ya.min() < 0 or ya.max() > 1  # no activation


def test_channels_last():
    cfg = tiny_config(image_channels=2, num_heads=2)
    net = _randomize(build_network(cfg)).eval()
    net_cl = build_network(cfg).eval()
    net_cl.load_state_dict(net.state_dict())
    net_cl = net_cl.to(memory_format=torch.channels_last)
    x = torch.bernoulli(torch.full((2, 1, 16, 16), 0.5))
    img = torch.randn(1, 2, 16, 16)
    with torch.no_grad():
        ref = net(x, 4, img)
        out = net_cl(x.contiguous(memory_format=torch.channels_last), 4,
                     img.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(ref, out, atol=1e-5)


def test_bfloat16_network_runs():
    net = _randomize(build_network(tiny_config())).eval()
    x = torch.bernoulli(torch.full((2, 1, 16, 16), 0.5))
    img = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        ref = net(x, 50, img)
        out = net.to(torch.bfloat16)(x, 50, img)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.1


def test_resblock_updown_and_scale_shift_build_and_run():
    cfg = tiny_config(resblock_updown=True, use_scale_shift_norm=True, num_head_channels=16,
                      use_new_attention_order=True, channel_mult=(1, 2, 2), num_res_blocks=2)
    net = _randomize(build_network(cfg)).eval()
    keys = net.state_dict().keys()
    assert "input_blocks.3.0.in_layers.2.weight" in keys  # a down-ResBlock replaces `op`
    assert not any(k.endswith(".op.weight") or ".conv." in k for k in keys)
    assert net.state_dict()["input_blocks.1.0.emb_layers.1.weight"].shape[0] == 2 * 32
    with torch.no_grad():
        out = net(torch.rand(2, 1, 16, 16), torch.tensor([1, 2]), torch.randn(2, 1, 16, 16))
    assert out.shape == (2, 1, 16, 16)


# ------------------------------------------------------------------------------------
# the numerical conventions, checked by brute force
# ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dim", [128, 33])
def test_timestep_embedding_cos_first(dim):
    t = torch.tensor([0, 1, 17, 500, 999])
    emb = timestep_embedding(t, dim)
    assert emb.shape == (len(t), dim) and emb.dtype == torch.float32
    half = dim // 2
    for r, tv in enumerate(t.tolist()):
        for i in range(half):
            f = math.exp(-math.log(10000.0) * i / half)
            assert abs(emb[r, i].item() - math.cos(tv * f)) < 3e-4
            assert abs(emb[r, half + i].item() - math.sin(tv * f)) < 3e-4
        if dim % 2:
            assert emb[r, -1].item() == 0.0
    # t = 0: cosines are all one, sines all zero
    assert torch.equal(emb[0, :half], torch.ones(half))
    assert torch.equal(emb[0, half:2 * half], torch.zeros(half))


def test_groupnorm32_runs_in_float32():
    gn = GroupNorm32(32, 64)
    with torch.no_grad():
        gn.weight.copy_(torch.rand(64) + 0.5)
        gn.bias.copy_(torch.randn(64))
    x = (torch.randn(2, 64, 5, 5) * 30 + 100).to(torch.bfloat16)
    y = gn(x)
    assert y.dtype == torch.bfloat16
    expected = F.group_norm(x.float(), 32, gn.weight, gn.bias, gn.eps).to(torch.bfloat16)
    assert torch.equal(y, expected)
    x32 = torch.randn(2, 64, 5, 5)
    assert torch.equal(gn(x32), F.group_norm(x32, 32, gn.weight, gn.bias, gn.eps))


def _brute_force_attention(block: AttentionBlock, x: torch.Tensor, new_order: bool) -> torch.Tensor:
    b, c, hgt, wid = x.shape
    flat = x.reshape(b, c, hgt * wid).double()
    normed = F.group_norm(
        flat, 32, block.norm.weight.double(), block.norm.bias.double(), block.norm.eps
    )
    qkv = torch.einsum("oc,bct->bot", block.qkv.weight[:, :, 0].double(), normed) \
        + block.qkv.bias.double()[None, :, None]
    heads = block.num_heads
    d = c // heads
    outs = []
    for n in range(b):
        per_head = []
        for h in range(heads):
            if new_order:  # [q | k | v], each split into heads
                q = qkv[n, h * d:(h + 1) * d]
                k = qkv[n, c + h * d:c + (h + 1) * d]
                v = qkv[n, 2 * c + h * d:2 * c + (h + 1) * d]
            else:  # legacy: each head owns a contiguous [q | k | v] slab of 3d channels
                base = 3 * d * h
                q = qkv[n, base:base + d]
                k = qkv[n, base + d:base + 2 * d]
                v = qkv[n, base + 2 * d:base + 3 * d]
            logits = q.T @ k / math.sqrt(d)  # (T, T): query position × key position
            weights = torch.softmax(logits, dim=1)
            per_head.append(v @ weights.T)  # (d, T)
        outs.append(torch.cat(per_head, dim=0))
    attn = torch.stack(outs)
    proj = torch.einsum("oc,bct->bot", block.proj_out.weight[:, :, 0].double(), attn) \
        + block.proj_out.bias.double()[None, :, None]
    return (flat + proj).reshape(b, c, hgt, wid)


@pytest.mark.parametrize("heads", [1, 4])
@pytest.mark.parametrize("new_order", [False, True])
def test_attention_split_matches_brute_force(heads, new_order):
    torch.manual_seed(1)
    block = AttentionBlock(64, num_heads=heads, use_new_attention_order=new_order)
    _randomize(block, seed=heads)
    x = torch.randn(2, 64, 4, 5)
    with torch.no_grad():
        out = block(x)
        ref = _brute_force_attention(block, x, new_order)
        other = _brute_force_attention(block, x, not new_order)
    assert torch.allclose(out.double(), ref, atol=1e-5)
    if heads > 1:  # the two orders really differ
        assert not torch.allclose(out.double(), other, atol=1e-3)


def test_released_configs_use_legacy_order():
    for name in NETWORK_PRESETS:
        if isinstance(get_network_preset(name), UNetConfig):
            assert get_network_preset(name).use_new_attention_order is False


def test_qkv_attention_low_precision_output_dtype():
    qkv = torch.randn(2, 3 * 32, 10).to(torch.bfloat16)
    out = qkv_attention(qkv, num_heads=2)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 32, 10)
