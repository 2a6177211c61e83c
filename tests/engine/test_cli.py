"""The ``berdiff`` command, run in-process through ``main(argv)`` on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_berdiff.checkpoints import load_model, save_model, sha256_of
from napari_berdiff.cli import main

from .ckpt_helpers import (  # noqa: F401 (one_torch_thread is an autouse fixture)
    TINY_PRESET,
    CreateFileOnLoad,
    one_torch_thread,
    plain_state_dict,
    register_tiny_preset,
    tiny_model,
)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("cli")
    model = tiny_model(metrics={"ged2": 0.4})
    model_path = save_model(model, root / "tiny.safetensors")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(root / "img.png")
    Image.fromarray(rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)).save(root / "rgb.png")
    Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8)).save(root / "big.png")
    np.save(root / "vol.npy", rng.random((3, 16, 16)).astype(np.float32))
    return {"root": root, "model": model_path, "params": model.num_parameters()}


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _sample(capsys, files, out: Path, *extra: str, image: str = "img.png"):
    return _run(capsys, "sample", "--model", files["model"], "--image", files["root"] / image,
                "--n", "3", "--steps", "2", "--seed", "7", "--out", out, "--device", "cpu", *extra)


def test_sample_writes_every_file_and_reproduces(capsys, files, tmp_path):
    code, out, err = _sample(capsys, files, tmp_path / "a")
    assert code == 0, err
    names = {p.name for p in (tmp_path / "a").iterdir()}
    expected = {f"sample_{i:02d}.{ext}" for i in range(3) for ext in ("npy", "tif", "png")}
    expected |= {f"{m}.{ext}" for m in ("frequency", "variance", "entropy")
                 for ext in ("npy", "tif", "png")}
    expected |= {"run.json", "probabilities.npy"}
    assert expected <= names
    assert np.load(tmp_path / "a" / "sample_00.npy").shape == (32, 32)
    assert "sampling" in err  # the tqdm bar on stderr

    run = json.loads((tmp_path / "a" / "run.json").read_text())
    assert run["model_sha256"] == sha256_of(files["model"])
    assert run["seed"] == 7 and run["n"] == 3 and run["steps"] == 2
    assert len(run["timesteps"]) == 2 and run["timesteps"] == sorted(run["timesteps"], reverse=True)
    assert run["roi"] == [0, 0, 32, 32] and run["roi_requested"] is False
    assert run["device"] == "cpu"
    assert run["presence"] is None and run["readers"] is None  # a plain model
    assert run["image_path"].endswith("img.png") and run["image_shape"] == [32, 32]
    for key in ("total_s", "network_s", "first_frame_s", "wall_s"):
        assert run["timings"][key] > 0
    assert set(run["outputs"]) == expected

    code, _, err = _sample(capsys, files, tmp_path / "b", "--quiet")
    assert code == 0, err
    for f in sorted((tmp_path / "a").glob("*.npy")):
        np.testing.assert_array_equal(np.load(f), np.load(tmp_path / "b" / f.name), err_msg=f.name)


def test_sample_records_the_reader_of_each_sample(capsys, files, tmp_path):
    from napari_berdiff.diffusion import DiffusionConfig
    from napari_berdiff.model import DiffusionModel
    from napari_berdiff.networks import CondOnceConfig, ConditionOnceNet

    net = ConditionOnceNet(CondOnceConfig(image_size=32, model_channels=8, encoder_channels=8,
                                          channel_mult=(1, 2), readers=2))
    model = DiffusionModel(net, DiffusionConfig(kind="bernoulli", timesteps=20, default_steps=2))
    path = save_model(model, tmp_path / "readers.safetensors")
    code, _, err = _run(capsys, "sample", "--model", path, "--image", files["root"] / "img.png",
                        "--n", "3", "--out", tmp_path / "r", "--quiet")
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "run.json").read_text())["readers"] == [0, 1, 0]


def test_sample_roi_slice_and_grey_notice(capsys, files, tmp_path):
    code, _, err = _sample(capsys, files, tmp_path / "roi", "--roi", "4,8,20,24", "--quiet")
    assert code == 0, err
    assert np.load(tmp_path / "roi" / "frequency.npy").shape == (16, 16)
    run = json.loads((tmp_path / "roi" / "run.json").read_text())
    assert run["roi"] == [4, 8, 20, 24] and run["roi_requested"] is True

    code, _, err = _sample(capsys, files, tmp_path / "rgb", "--quiet", image="rgb.png")
    assert code == 0, err
    assert "converted it to grey" in err
    assert json.loads((tmp_path / "rgb" / "run.json").read_text())["converted_to_grey"] is True

    code, _, err = _sample(capsys, files, tmp_path / "vol", "--slice", "1", "--quiet",
                           image="vol.npy")
    assert code == 0, err
    assert json.loads((tmp_path / "vol" / "run.json").read_text())["slice"] == 1


def test_sample_errors_are_clear(capsys, files, tmp_path):
    code, _, err = _sample(capsys, files, tmp_path / "x", image="big.png")
    assert code == 2
    assert err.startswith("berdiff: error: big.png is 40×48 pixels, more than twice")
    assert "--roi" in err and "--allow-large" in err and "Traceback" not in err

    code, _, err = _sample(capsys, files, tmp_path / "x", image="vol.npy")
    assert code == 2 and "3D volume" in err and "--slice" in err

    # An odd-sized box is padded for the network and cropped back, never refused.
    code, _, err = _sample(capsys, files, tmp_path / "odd", "--roi", "0,0,15,16")
    assert code == 0, err
    assert np.load(tmp_path / "odd" / "frequency.npy").shape == (15, 16)

    code, _, err = _sample(capsys, files, tmp_path / "x", "--roi", "0,0,99,99")
    assert code == 2 and "outside the 32x32 image" in err

    two = save_model(tiny_model(image_channels=2), tmp_path / "two.safetensors")
    code, _, err = _run(capsys, "sample", "--model", two, "--image", files["root"] / "img.png",
                        "--out", tmp_path / "x", "--quiet")
    assert code == 2
    assert "the model takes 2 image channel(s) but the image has 1" in err

    code, _, err = _run(capsys, "sample", "--model", files["model"], "--image",
                        files["root"] / "nope.xyz", "--out", tmp_path / "x")
    assert code == 2 and "berdiff: error:" in err

    broken = tiny_model()
    with torch.no_grad():
        broken.net.out[2].bias.fill_(float("nan"))
    nan_path = save_model(broken, tmp_path / "nan.safetensors")
    code, _, err = _run(capsys, "sample", "--model", nan_path, "--image", files["root"] / "img.png",
                        "--n", "1", "--steps", "1", "--out", tmp_path / "nan", "--quiet")
    # NaN weights are refused when the file is loaded, by tensor name.
    assert code == 2 and "NaN or infinite weights: out.2.bias" in err
    assert not (tmp_path / "nan").exists()


def test_info(capsys, files):
    code, out, _ = _run(capsys, "info", files["model"])
    assert code == 0
    assert "bernoulli" in out and f"{files['params']:,}" in out and "ged2=0.4" in out
    code, out, _ = _run(capsys, "info", files["model"], "--json")
    info = json.loads(out)
    assert info["kind"] == "bernoulli" and info["parameters"] == files["params"]


def test_convert_round_trip(capsys, tmp_path, monkeypatch):
    register_tiny_preset(monkeypatch)
    sd = plain_state_dict(tiny_model(seed=3))
    official = tmp_path / "model000500.pt"
    torch.save({"module." + k: v for k, v in sd.items()}, official)
    out = tmp_path / "converted.safetensors"
    code, stdout, err = _run(capsys, "convert", official, "--preset", TINY_PRESET, "-o", out)
    assert code == 0, err
    assert TINY_PRESET in stdout
    model = load_model(out)
    assert model.metadata["preset"] == TINY_PRESET
    assert model.metadata["training"]["converted_from"]["sha256"] == sha256_of(official)
    for k, v in model.net.state_dict().items():
        assert torch.equal(v, sd[k]), k

    code, _, err = _run(capsys, "convert", official, "-o", out)  # exists, no --force
    assert code == 2 and "--force" in err
    code, _, err = _run(capsys, "convert", official, "-o", out, "--force")  # preset recognised
    assert code == 0, err


def test_bad_checkpoints_print_errors_not_tracebacks(capsys, tmp_path):
    marker = tmp_path / "marker"
    evil = tmp_path / "ema_0.9999_000100.pt"
    torch.save({"w": CreateFileOnLoad(marker)}, evil)
    code, _, err = _run(capsys, "info", evil)
    assert code == 2 and "could run code" in err and "Traceback" not in err
    assert not marker.exists()

    trunc = tmp_path / "model000100.pt"
    torch.save({"w": torch.ones(100)}, trunc)
    trunc.write_bytes(trunc.read_bytes()[:200])
    code, _, err = _run(capsys, "convert", trunc, "-o", tmp_path / "o.safetensors")
    assert code == 2 and "truncated or corrupt" in err

    code, _, err = _run(capsys, "info", tmp_path / "absent.pt")
    assert code == 2 and "no such" in err
    assert main([]) == 2
    assert main(["info", "--help"]) == 0


@pytest.mark.parametrize("flag,key,default,value,bad,message", [
    ("--draw-correlation", "draw_correlation", 0.0, "0.9", "1.5",
     "draw_correlation must lie in [0, 1], got 1.5"),
    ("--temperature", "temperature", 1.0, "0.25", "0",
     "temperature must be a positive number, got 0.0"),
])
def test_sample_step_option_is_recorded_and_checked(capsys, files, tmp_path, flag, key, default,
                                                    value, bad, message):
    """A Bernoulli step option: the model's value by default, the flag's when given (the
    probabilities change), and a bad value refused before anything is written."""
    code, _, err = _sample(capsys, files, tmp_path / "plain", "--quiet")
    assert code == 0, err
    assert json.loads((tmp_path / "plain" / "run.json").read_text())[key] == default
    code, _, err = _sample(capsys, files, tmp_path / "set", "--quiet", flag, value)
    assert code == 0, err
    assert json.loads((tmp_path / "set" / "run.json").read_text())[key] == float(value)
    assert not np.array_equal(np.load(tmp_path / "plain" / "probabilities.npy"),
                              np.load(tmp_path / "set" / "probabilities.npy"))

    code, _, err = _sample(capsys, files, tmp_path / "bad", flag, bad)
    assert code == 2 and message in err
    assert not (tmp_path / "bad").exists()


def test_threads_are_honoured_and_recorded(capsys, files, tmp_path):
    before = torch.get_num_threads()
    try:
        code, _, err = _sample(capsys, files, tmp_path / "t1", "--threads", "1")
        assert code == 0, err
        assert torch.get_num_threads() == 1
        assert json.loads((tmp_path / "t1" / "run.json").read_text())["threads"] == 1
        code, _, err = _sample(capsys, files, tmp_path / "ta", "--threads", "auto")
        assert code == 0, err
        used = json.loads((tmp_path / "ta" / "run.json").read_text())["threads"]
        assert isinstance(used, int) and used >= 1 and torch.get_num_threads() == used
        for bad in ("0", "many"):
            code, _, err = _sample(capsys, files, tmp_path / f"b{bad}", "--threads", bad)
            assert code == 2 and "'auto' or a whole number" in err
            assert not (tmp_path / f"b{bad}").exists()
    finally:
        torch.set_num_threads(before)
