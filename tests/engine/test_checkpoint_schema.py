"""Checkpoint metadata is data from a file: the whole document is validated before anything
is built, NaN weights are refused, and ``berdiff info`` verifies the file (issue 21, item 2)."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import tracemalloc
from pathlib import Path

import pytest
import torch

from napari_berdiff.checkpoints import CheckpointError, describe, list_bundled_models, load_model
from napari_berdiff.checkpoints import schema
from napari_berdiff.checkpoints.sniff import read_safetensors_header
from napari_berdiff.cli import main
from napari_berdiff.diffusion import DiffusionConfig
from napari_berdiff.diffusion.device import select_device
from napari_berdiff.model import DiffusionModel
from napari_berdiff.networks import CondOnceConfig, ConditionOnceNet, UNetConfig
from napari_berdiff.checkpoints import save_model

from .ckpt_helpers import one_torch_thread, tiny_model  # noqa: F401 (autouse fixture)


def _tiny_cond_once() -> DiffusionModel:
    torch.manual_seed(0)
    net = ConditionOnceNet(CondOnceConfig(image_size=16, model_channels=8, encoder_channels=8,
                                          channel_mult=(1, 2), norm_groups=4))
    return DiffusionModel(net, DiffusionConfig(timesteps=100, default_steps=3),
                          {"name": "tiny-cond", "data": {"image_size": 16}})


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return save_model(_tiny_cond_once(), tmp_path_factory.mktemp("schema") / "good.safetensors")


def _document(path: Path) -> dict:
    return json.loads(read_safetensors_header(path)["__metadata__"]["napari_berdiff"])


def _rewrite(src: Path, dst: Path, doc: dict) -> Path:
    """``src``'s tensors with ``doc`` as the description (Infinity written as JSON allows)."""
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(src)), str(dst),
              metadata={"napari_berdiff": json.dumps(doc), "format": "pt"})
    return dst


def _set(doc: dict, where: str, value) -> dict:
    *parents, key = where.split(".")
    target = doc
    for p in parents:
        target = target[p]
    target[key] = value
    return doc


#: (field, bad value, what the message must name): every case listed in issue 21, and more.
BAD = [
    ("diffusion.timesteps", 10**9, "diffusion.timesteps"),
    ("diffusion.timesteps", math.inf, "diffusion.timesteps"),
    ("network.num_res_blocks", 10**6, "network.num_res_blocks"),
    ("network.channel_mult", [1] * 10**5, "network.channel_mult"),
    ("network.channel_mult", [], "network.channel_mult"),
    ("data", "x", "data"),
    ("network.model_channels", -8, "network.model_channels"),
    ("network.norm_groups", 0, "network.norm_groups"),
    ("network.type", [0], "network.type"),
    ("network.encoder_channels", 1e18, "network.encoder_channels"),
    ("network.encoder_channels", 10**18, "network.encoder_channels"),
    ("kind", "banana", "kind"),
    ("kind", 1.5, "kind"),
    ("kind", 7, "kind"),
    ("diffusion.temperature", True, "diffusion.temperature"),
    ("diffusion.temperature", math.nan, "diffusion.temperature"),
    ("diffusion.presence_draw", "sorted", "diffusion.presence_draw"),
    ("diffusion.latent_draw", "sobol", "diffusion.latent_draw"),
    ("diffusion.presence_temperature", 0.0, "diffusion.presence_temperature"),
    ("data.image_size", 1e18, "data.image_size"),
    ("data.image_size", 10**18, "data.image_size"),
    ("data.normalisation", {"mode": "fixed", "min": 3.0, "max": 3.0}, "data.normalisation"),
    ("network.norm_groups", 3, "norm_groups=3"),  # valid alone; the widths do not divide
    ("diffusion.kind", "gaussian", "contradicts diffusion.kind"),
    ("network.unknown_field", 1, "network.unknown_field"),
]


@pytest.mark.parametrize("where,value,named", BAD, ids=[f"{w}={str(v)[:12]}" for w, v, _ in BAD])
def test_bad_documents_are_refused_by_field_without_allocating(good, tmp_path, where, value,
                                                                named):
    doc = _set(_document(good), where, value)
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError) as err:
            schema.validate_description(doc, "bad.safetensors")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    message = str(err.value)
    assert named in message and "bad.safetensors" in message
    assert peak < 2**20, f"validation allocated {peak} bytes"  # nothing large: < 1 MiB

    # The same document in a file: load_model, describe and berdiff info all refuse it,
    # with a ValueError (CheckpointError) naming the field, before any tensor is read.
    bad = _rewrite(good, tmp_path / "bad.safetensors", doc)
    with pytest.raises(ValueError, match="bad.safetensors") as err:
        load_model(bad)
    assert named in str(err.value)
    with pytest.raises(CheckpointError, match="bad.safetensors"):
        describe(bad)


def test_a_hostile_document_is_refused_end_to_end_without_a_large_allocation(good, tmp_path):
    bad = _rewrite(good, tmp_path / "t.safetensors",
                   _set(_document(good), "diffusion.timesteps", 10**9))
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=r"diffusion\.timesteps = 1000000000"):
            load_model(bad)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * 2**20  # before the fix: a list of 10**9 floats


def test_the_schema_knows_exactly_the_config_fields():
    """The schema and the config dataclasses must not drift apart."""
    from napari_berdiff.networks import NCSNppConfig

    for section, config in ((schema.UNetSection, UNetConfig),
                            (schema.CondOnceSection, CondOnceConfig),
                            (schema.NCSNppSection, NCSNppConfig),
                            (schema.DiffusionSection, DiffusionConfig)):
        fields = set(section.model_fields) - {"type"}
        assert fields == {f.name for f in dataclasses.fields(config)}, section.__name__


def test_every_bundled_model_passes_the_schema():
    models = list_bundled_models()
    assert models
    for path in models:
        doc = _document(path)
        assert schema.validate_description(doc, path) is doc


def test_a_network_too_large_for_the_machine_is_refused_by_name(good, monkeypatch):
    monkeypatch.setattr(schema, "available_memory_bytes", lambda: 1000)
    with pytest.raises(CheckpointError) as err:
        load_model(good)
    message = str(err.value)
    assert "good.safetensors" in message and "parameters" in message
    assert "model_channels=8" in message and "more than this machine can hold" in message


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_nan_or_infinite_weights_are_refused_on_load(tmp_path, bad_value):
    model = tiny_model()
    with torch.no_grad():
        model.net.out[2].weight[0, 0, 0, 0] = bad_value
    path = save_model(model, tmp_path / "broken.safetensors")
    with pytest.raises(CheckpointError, match=r"broken\.safetensors: 1 tensor\(s\) hold NaN "
                                              r"or infinite weights: out\.2\.weight"):
        load_model(path)
    info = describe(path)  # without verify: the header only
    assert info["kind"] == "bernoulli"
    with pytest.raises(CheckpointError, match="NaN or infinite weights"):
        describe(path, verify=True)


def test_info_verifies_the_file_and_fails_on_a_cut_file(good, tmp_path, capsys):
    assert main(["info", str(good)]) == 0
    out = capsys.readouterr().out
    assert "verified" in out and "every tensor read, finite" in out

    data = good.read_bytes()
    half = tmp_path / "half.safetensors"
    half.write_bytes(data[: len(data) // 2])
    assert main(["info", str(half)]) == 2
    err = capsys.readouterr().err
    assert "half.safetensors: the file is truncated or corrupt" in err


@pytest.mark.parametrize("kind", ["zip", "legacy", "pickle"])
def test_torch_and_pickle_files_named_safetensors_get_a_clear_message(tmp_path, kind):
    path = tmp_path / "model.safetensors"
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"a": 1}))
    else:
        torch.save({"a": torch.zeros(2)}, path, _use_new_zipfile_serialization=kind == "zip")
    for call in (load_model, describe):
        with pytest.raises(CheckpointError, match=r"model\.safetensors is named \.safetensors "
                                                  r"but holds .*rename it to \.pt"):
            call(path)


def test_unknown_device_is_a_clear_value_error(good):
    with pytest.raises(ValueError, match="unknown device 'bogus'; choose one of"):
        select_device("bogus")
    with pytest.raises(ValueError, match="unknown device 'bogus'"):
        load_model(good, device="bogus")


def test_a_nan_presence_never_silently_empties_every_sample():
    """Weights that pass the load check can still give NaN (overflow): a NaN presence
    probability must stop the run, not draw every sample empty."""
    torch.manual_seed(0)
    net = ConditionOnceNet(CondOnceConfig(image_size=16, model_channels=8, encoder_channels=8,
                                          channel_mult=(1, 2), norm_groups=4,
                                          presence_head=True))
    with torch.no_grad():
        net.presence_out.bias.fill_(float("nan"))
    model = DiffusionModel(net, DiffusionConfig(timesteps=100, default_steps=3))
    with pytest.raises(ValueError, match="presence head gave NaN"):
        model.sample_all(torch.rand(16, 16).numpy(), n=4, steps=2)
