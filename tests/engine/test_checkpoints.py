"""Checkpoints: our safetensors format, official state_dicts, and every bad file we refuse."""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
from pathlib import Path

import pytest
import torch

import napari_berdiff
from napari_berdiff.checkpoints import (
    FORMAT,
    METADATA_KEY,
    CheckpointError,
    PresetRequired,
    describe,
    list_bundled_models,
    load_model,
    matching_presets,
    recognise_preset,
    save_model,
    sha256_of,
)
from napari_berdiff.checkpoints.info import DEFAULT_MODEL
from napari_berdiff.model import DiffusionModel

from .ckpt_helpers import (
    TINY_PRESET,
    CreateFileOnLoad,
    one_torch_thread,  # noqa: F401 (autouse fixture)
    plain_state_dict,
    random_preset_state_dict,
    register_tiny_preset,
    tiny_model,
)

REFERENCE = Path(__file__).parent / "reference"


def _assert_same_weights(a: torch.nn.Module | dict, b: torch.nn.Module | dict) -> None:
    sa = a if isinstance(a, dict) else a.state_dict()
    sb = b if isinstance(b, dict) else b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k], sb[k]), k


# ---------------------------------------------------------------------------- our format
def test_round_trip_keeps_every_tensor_and_the_metadata(tmp_path):
    extra = {
        "training": {"recipe": "phantoms", "steps": 10, "lr": 1e-4},
        "metrics": {"ged2": 0.25, "hm_iou": 0.5},
        "data": {"image_size": 16, "image_channels": 1, "spacing": [0.7, 0.7],
                 "normalisation": {"mode": "fixed", "min": -1000, "max": 400},
                 "description": "phantoms"},
        "preset": None,
    }
    model = tiny_model(**extra)
    path = save_model(model, tmp_path / "tiny.safetensors")
    assert path == tmp_path / "tiny.safetensors"

    loaded = load_model(path)
    assert isinstance(loaded, DiffusionModel)
    _assert_same_weights(model.net, loaded.net)
    for key in ("format", "kind", "name", "network", "diffusion", "data", "training", "metrics"):
        assert loaded.metadata[key] == model.metadata[key], key
    assert loaded.metadata["format"] == FORMAT
    assert loaded.diffusion == model.diffusion
    assert loaded.net.config == model.net.config

    # The file itself: float32 tensors and the JSON document under our metadata key.
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        doc = json.loads(f.metadata()[METADATA_KEY])
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float32}
    assert doc["format"] == FORMAT and doc["kind"] == "bernoulli"
    assert doc["network"]["type"] == "unet"
    assert doc["diffusion"]["timesteps"] == 100 and doc["diffusion"]["default_steps"] == 3
    assert doc["data"]["normalisation"] == {"mode": "fixed", "min": -1000, "max": 400}

    # Same function: the loaded net predicts exactly what the saved one did.
    x = torch.randint(0, 2, (2, 1, 16, 16)).float()
    img = torch.rand(1, 1, 16, 16)
    with torch.inference_mode():
        out_a = model.net(x, torch.tensor([5, 50]), img)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        out_b = loaded.net(x_cl, torch.tensor([5, 50]), img)
    assert out_b.shape == (2, 1, 16, 16)
    torch.testing.assert_close(out_a, out_b)


def test_save_handles_shared_and_channels_last_tensors(tmp_path):
    model = tiny_model()
    block = model.net.input_blocks[1][0]
    block.out_layers[3].weight = block.in_layers[2].weight  # tied: same storage twice
    model.to("cpu", channels_last=True)  # 4D weights no longer contiguous
    path = save_model(model, tmp_path / "shared.safetensors")
    loaded = load_model(path)
    _assert_same_weights(model.net, loaded.net)
    sd = loaded.net.state_dict()
    assert torch.equal(sd["input_blocks.1.0.out_layers.3.weight"],
                       sd["input_blocks.1.0.in_layers.2.weight"])


def test_save_bare_network_needs_diffusion(tmp_path):
    model = tiny_model()
    with pytest.raises(ValueError, match="diffusion"):
        save_model(model.net, tmp_path / "x.safetensors")
    path = save_model(model.net, tmp_path / "x.safetensors", diffusion=model.diffusion,
                      metadata={"kind": "bernoulli", "name": "bare"})
    loaded = load_model(path)
    assert loaded.name == "bare" and loaded.diffusion == model.diffusion
    _assert_same_weights(model.net, loaded.net)


def test_public_entry_point_and_describe(tmp_path):
    model = tiny_model(metrics={"ged2": 0.3})
    path = save_model(model, tmp_path / "tiny.safetensors")
    assert napari_berdiff.load_model is load_model
    info = describe(path)
    assert info["kind"] == "bernoulli"
    assert info["parameters"] == model.num_parameters()
    assert info["tensors"] == len(model.net.state_dict())
    assert info["architecture"]["type"] == "unet"
    assert info["diffusion"]["timesteps"] == 100
    assert info["metrics"] == {"ged2": 0.3}
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert FORMAT in info["file_format"]


def test_sha256_and_bundled_models(tmp_path):
    f = tmp_path / "blob.bin"
    f.write_bytes(b"x" * (3 << 20))  # more than one chunk
    assert sha256_of(f) == hashlib.sha256(f.read_bytes()).hexdigest()
    bundled = list_bundled_models()
    assert isinstance(bundled, list)
    assert all(isinstance(p, Path) and p.suffix == ".safetensors" for p in bundled)
    assert bundled[0].name == f"{DEFAULT_MODEL}.safetensors"  # the demo's and widget's first


# ---------------------------------------------------------------------------- official files
@pytest.fixture(scope="module")
def lidc(tmp_path_factory):
    """A berdiff-lidc-128 state_dict written the way the official code writes it."""
    sd = random_preset_state_dict("berdiff-lidc-128", seed=1)
    path = tmp_path_factory.mktemp("lidc") / "BerDiff_epsilon.pt"
    torch.save(sd, path)
    yield path, sd
    path.unlink()  # 340 MB: do not leave it for pytest's temp-dir rotation


def test_official_berdiff_file_is_recognised_and_loads_strictly(lidc, tmp_path):
    path, sd = lidc
    assert recognise_preset(sd) == "berdiff-lidc-128"
    model = load_model(path)
    assert model.metadata["preset"] == "berdiff-lidc-128"
    assert model.kind == "bernoulli" and model.diffusion.schedule == "cosine"
    assert model.num_parameters() == 85_599_233
    _assert_same_weights(sd, model.net.state_dict())
    assert model.net.config.output_activation == "sigmoid"  # .net gives probabilities
    assert model.net.config.concat_order == "mask_first"

    info = describe(path, checksum=False)
    assert info["preset"] == "berdiff-lidc-128"
    assert info["parameters"] == 85_599_233 and info["tensors"] == 368
    assert "official" in info["file_format"]


def test_official_file_with_dataparallel_prefix(lidc, tmp_path):
    path, sd = lidc
    prefixed = tmp_path / "model010000.pt"
    torch.save({"module." + k: v for k, v in sd.items()}, prefixed)
    model = load_model(prefixed)  # recognised despite the prefix
    prefixed.unlink()
    assert model.metadata["preset"] == "berdiff-lidc-128"
    _assert_same_weights(sd, model.net.state_dict())


def test_official_wolleb_file_is_recognised(tmp_path):
    sd = random_preset_state_dict("wolleb-brats-256", seed=2, prefix="module.")
    path = tmp_path / "emasavedmodel_0.9999_100000.pt"
    torch.save(sd, path)
    loaded = load_model(path)
    path.unlink()
    assert loaded.metadata["preset"] == "wolleb-brats-256"
    assert loaded.kind == "gaussian" and loaded.image_channels == 4
    _assert_same_weights({k[len("module."):]: v for k, v in sd.items()},
                         loaded.net.state_dict())


@pytest.mark.parametrize("preset", ["berdiff-lidc-128", "wolleb-brats-256"])
def test_recognition_from_the_official_key_listing(preset):
    ref = json.loads((REFERENCE / f"{preset}.keys.json").read_text())
    sd = {k: torch.empty(shape, device="meta") for k, shape in ref["keys"]}
    assert matching_presets(sd) == [preset]
    assert sum(v.numel() for v in sd.values()) == ref["parameters"]


def test_tiny_official_file_with_explicit_and_recognised_preset(tmp_path, monkeypatch):
    register_tiny_preset(monkeypatch)
    model = tiny_model()
    sd = plain_state_dict(model)
    path = tmp_path / "ema_0.9999_000100.pt"
    torch.save({"state_dict": sd, "step": 100}, path)  # a wrapped state_dict is unwrapped too
    for preset in (TINY_PRESET, None):
        loaded = load_model(path, preset=preset)
        assert loaded.metadata["preset"] == TINY_PRESET
        _assert_same_weights(sd, loaded.net.state_dict())

    half = tmp_path / "model_fp16.pt"  # fp16 weights are widened to float32 on load
    torch.save({k: v.half() for k, v in sd.items()}, half)
    _assert_same_weights({k: v.half().float() for k, v in sd.items()},
                         load_model(half).net.state_dict())


# ---------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_pickle_that_runs_code_is_refused(tmp_path, writer):
    marker = tmp_path / "pwned.txt"
    payload = {"time_embed.0.weight": torch.ones(2), "evil": CreateFileOnLoad(marker)}
    path = tmp_path / "model000100.pt"
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(CheckpointError, match="contains Python objects other than tensors; "
                                              "refusing to load it because loading could run code"):
        load_model(path)
    with pytest.raises(CheckpointError, match="could run code"):
        describe(path)
    assert not marker.exists()

    # The payload is live: an unsafe unpickler would have created the marker.
    live = tmp_path / "live.txt"
    opened = pickle.loads(pickle.dumps({"evil": CreateFileOnLoad(live)}))
    opened["evil"].close()
    assert live.exists()


def _truncate(path: Path, keep: float = 0.5) -> Path:
    data = path.read_bytes()
    out = path.with_name("cut_" + path.name)
    out.write_bytes(data[: int(len(data) * keep)])
    return out


def test_truncated_or_corrupt_files(tmp_path):
    model = tiny_model()
    ours = save_model(model, tmp_path / "tiny.safetensors")
    pt_zip = tmp_path / "model.pt"
    torch.save(plain_state_dict(model), pt_zip)
    pt_legacy = tmp_path / "legacy.pt"
    torch.save(plain_state_dict(model), pt_legacy, _use_new_zipfile_serialization=False)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a checkpoint" * 10)
    bad_header = tmp_path / "bad_header.safetensors"
    bad_header.write_bytes(struct.pack("<Q", 12) + b"{not json!!}")

    bad = [_truncate(ours), _truncate(ours, 0.999), _truncate(pt_zip), _truncate(pt_legacy),
           empty, garbage, bad_header]
    for path in bad:
        with pytest.raises(CheckpointError,
                           match=rf"{path.name}: the file is truncated or corrupt"):
            load_model(path)


def test_optimiser_state_is_identified(tmp_path):
    model = tiny_model()
    opt = torch.optim.AdamW(model.net.parameters(), lr=1e-4)
    for p in model.net.parameters():
        p.grad = torch.full_like(p, 1e-3)
    opt.step()  # creates the exp_avg / exp_avg_sq state
    path = tmp_path / "opt010000.pt"
    torch.save(opt.state_dict(), path)
    with pytest.raises(CheckpointError,
                       match=r"optimiser state.*model010000\.pt.*ema_\*_010000\.pt"):
        load_model(path)
    wolleb = tmp_path / "optsavedmodel010000.pt"
    torch.save(opt.state_dict(), wolleb)
    with pytest.raises(CheckpointError, match=r"optimiser state.*savedmodel010000\.pt"):
        load_model(wolleb, preset="wolleb-brats-256")


def test_wrong_preset_lists_keys_by_name(tmp_path, monkeypatch):
    register_tiny_preset(monkeypatch)
    sd = plain_state_dict(tiny_model())
    sd.pop("out.2.bias")
    sd["extra.weight"] = torch.zeros(3)
    sd["time_embed.0.weight"] = torch.zeros(7, 32)
    path = tmp_path / "model000001.pt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError) as err:
        load_model(path, preset=TINY_PRESET)
    msg = str(err.value)
    assert "1 missing key(s): out.2.bias" in msg
    assert "1 unexpected key(s): extra.weight" in msg
    assert "time_embed.0.weight (file [7, 32], network [128, 32])" in msg

    # A real file against the wrong real preset: long lists are shortened.
    torch.save(plain_state_dict(tiny_model()), path)
    with pytest.raises(CheckpointError, match=r"missing key\(s\):.* … and \d+ more") as err:
        load_model(path, preset="berdiff-lidc-128")
    assert "shape mismatch" in str(err.value) and "unexpected key" in str(err.value)
    assert f"fits preset '{TINY_PRESET}'" in str(err.value)


def test_unrecognised_official_file_lists_presets(tmp_path):
    path = tmp_path / "model000001.pt"
    torch.save(plain_state_dict(tiny_model()), path)
    with pytest.raises(CheckpointError,
                       match=r"matches no known preset.*berdiff-lidc-128.*wolleb-brats-256.*"
                             r"preset='berdiff-lidc-128'.*--preset berdiff-lidc-128"):
        load_model(path)
    assert "no known preset" in describe(path, checksum=False)["note"]


def test_not_a_state_dict(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.ones(3), path)
    with pytest.raises(CheckpointError, match="not a state_dict"):
        load_model(path)
    mixed = tmp_path / "mixed.pt"
    torch.save({"a.weight": torch.ones(2), "epoch": 3}, mixed)
    with pytest.raises(CheckpointError, match="not a plain state_dict.*epoch"):
        load_model(mixed)


def test_foreign_and_future_safetensors(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    sd = plain_state_dict(tiny_model())
    foreign = tmp_path / "someone_else.safetensors"
    save_file(sd, str(foreign), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"not written by napari-berdiff.*'napari-berdiff/1'"):
        load_model(foreign)
    register_tiny_preset(monkeypatch)
    loaded = load_model(foreign, preset=TINY_PRESET)  # an official state_dict in safetensors
    assert describe(foreign, preset=TINY_PRESET, checksum=False)["preset"] == TINY_PRESET
    _assert_same_weights(sd, loaded.net.state_dict())

    future = tmp_path / "future.safetensors"
    save_file(sd, str(future), metadata={METADATA_KEY: json.dumps({"format": "napari-berdiff/2"})})
    with pytest.raises(CheckpointError, match="napari-berdiff/2.*reads napari-berdiff/1"):
        load_model(future)


def test_missing_file_and_image_channel_mismatch(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        load_model(tmp_path / "nope.safetensors")
    model = load_model(save_model(tiny_model(image_channels=2), tmp_path / "two.safetensors"))
    with pytest.raises(ValueError, match=r"takes 2 image channel\(s\) but the image has 1"):
        model.sample(torch.rand(16, 16).numpy(), n=1)


def test_saved_files_are_readable_by_others(tmp_path):
    import os
    import stat

    from .ckpt_helpers import tiny_model

    old = os.umask(0o022)
    try:
        p = save_model(tiny_model(), tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == 0o644
