"""Output folders of ``berdiff sample``, ``refine`` and ``data phantoms``: written whole or
not at all, checked before any work, replaced only with ``--force`` (issue 21, item 1)."""

from __future__ import annotations

import functools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import napari_berdiff.outfolder as outfolder
from napari_berdiff.checkpoints import save_model
from napari_berdiff.cli import main
from napari_berdiff.outfolder import OutputFolder

from .ckpt_helpers import one_torch_thread, tiny_model  # noqa: F401 (autouse fixture)
from .crashes import KILLED, run_killed_at

REPO = Path(__file__).resolve().parents[2]
MODELS = REPO / "models"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from PIL import Image

    root = tmp_path_factory.mktemp("outfolder")
    model = save_model(tiny_model(), root / "tiny.safetensors")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(root / "img.png")
    return {"root": root, "model": model, "image": root / "img.png"}


def _no_exchange(a, b) -> bool:
    """``outfolder._exchange`` on a system without renameat2's exchange."""
    return False


def _sample_argv(files, out, *extra, n=3, seed=7):
    # One thread: 'auto' picks 1 or 2 by the machine's load at the moment, and the float
    # bytes of the same seeded run differ between thread counts, which the byte-for-byte
    # comparisons below would take for a torn write.
    return ["sample", "--model", str(files["model"]), "--image", str(files["image"]),
            "--n", str(n), "--steps", "2", "--seed", str(seed), "--out", str(out),
            "--device", "cpu", "--threads", "1", "--quiet", *map(str, extra)]


def _run(capsys, argv):
    code = main(argv)
    return code, capsys.readouterr().err


def whole_run(folder: Path) -> tuple:
    """(n, seed, probabilities' bytes) of the run in ``folder``, after checking that the
    folder holds exactly that run: the files its run.json lists and no other, every mask
    equal to its probabilities thresholded (no mix of two runs)."""
    run = json.loads((folder / "run.json").read_text())
    assert {p.name for p in folder.iterdir()} == set(run["outputs"])
    probs = np.load(folder / "probabilities.npy")
    assert probs.shape[0] == run["n"]
    digits = max(2, len(str(run["n"] - 1)))
    for i in range(run["n"]):
        mask = np.load(folder / f"sample_{i:0{digits}d}.npy")
        np.testing.assert_array_equal(mask, (probs[i] > 0.5).astype(mask.dtype))
    np.testing.assert_allclose(np.load(folder / "frequency.npy"), (probs > 0.5).mean(0),
                               atol=1e-6)
    return run["n"], run["seed"], probs.tobytes()


def _beside(out: Path) -> list[str]:
    """Names beside ``out`` that a writer made (temporary or moved-aside folders)."""
    return sorted(p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}."))


# ---------------------------------------------------------------------------- behaviour
def test_a_second_run_needs_force_and_then_replaces_the_first_whole(capsys, files, tmp_path):
    out = tmp_path / "o"
    code, err = _run(capsys, _sample_argv(files, out, n=16, seed=0))
    assert code == 0, err
    first = whole_run(out)
    assert first[:2] == (16, 0)
    umask = os.umask(0o022)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask  # a folder as mkdir makes it

    code, err = _run(capsys, _sample_argv(files, out, n=4, seed=1))
    assert code == 2
    assert f"berdiff: error: --out {out} is not empty; choose a new folder, or pass --force " \
           "to replace it whole" in err
    assert whole_run(out) == first  # untouched

    code, err = _run(capsys, _sample_argv(files, out, "--force", n=4, seed=1))
    assert code == 0, err
    assert whole_run(out)[:2] == (4, 1)  # 4 samples, none of the first run's 16 left
    assert len(list(out.glob("sample_*.npy"))) == 4
    assert _beside(out) == []

    # An empty folder is fine without --force (it is replaced by the run).
    (tmp_path / "empty").mkdir()
    code, err = _run(capsys, _sample_argv(files, tmp_path / "empty", n=2))
    assert code == 0, err
    assert whole_run(tmp_path / "empty")[0] == 2


def test_bad_out_is_refused_before_the_model_is_loaded(capsys, files, tmp_path, monkeypatch):
    import napari_berdiff.checkpoints as checkpoints

    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(checkpoints, "load_model", no_loading)
    a_file = tmp_path / "a.txt"
    a_file.write_text("x")
    stranger = tmp_path / "mine"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep me")
    inside = tmp_path / "run_with_input"
    inside.mkdir()
    (inside / "run.json").write_text("{}")
    (inside / "img.png").write_bytes(files["image"].read_bytes())
    cases = [
        (a_file, [], f"--out {a_file} is an existing file, not a folder; give a folder name"),
        (a_file / "sub", [], f"--out {a_file / 'sub'}: {a_file} is a file, not a folder"),
        (stranger, ["--force"], f"--out {stranger} is not empty and holds no run.json, so it "
                                "is not a previous run; --force replaces only a previous run"),
    ]
    for out, extra, message in cases:
        code, err = _run(capsys, _sample_argv(files, out, *extra))
        assert code == 2 and message in err, err
        assert "Traceback" not in err
    assert (stranger / "notes.txt").read_text() == "keep me"

    argv = _sample_argv(files, inside, "--force")
    argv[argv.index("--image") + 1] = str(inside / "img.png")
    code, err = _run(capsys, argv)
    assert code == 2 and f"--out {inside} holds the input {inside / 'img.png'}" in err
    assert (inside / "img.png").exists()

    def refused(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "mkdir", refused)
    code, err = _run(capsys, _sample_argv(files, tmp_path / "ro"))
    assert code == 2
    assert f"--out {tmp_path / 'ro'} cannot be written (Permission denied); choose a folder " \
           "you can write to" in err


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs /proc")
def test_an_unwritable_out_is_refused_before_sampling(capsys, files, monkeypatch):
    import napari_berdiff.checkpoints as checkpoints

    monkeypatch.setattr(checkpoints, "load_model", lambda *a, **k: 1 / 0)
    out = Path("/proc/berdiff-out")  # no one, not even root, can make a folder there
    code, err = _run(capsys, _sample_argv(files, out))
    assert code == 2 and f"--out {out} cannot be written" in err and "Traceback" not in err


def test_refine_uses_the_same_output_folder(capsys, tmp_path):
    from PIL import Image

    from napari_berdiff.data.phantoms import make_phantom

    p = make_phantom(3, 64)
    img, prior = tmp_path / "img.png", tmp_path / "prior.png"
    Image.fromarray(np.round(p.image * 255).astype(np.uint8)).save(img)
    Image.fromarray((p.masks.max(0) > 0).astype(np.uint8) * 255).save(prior)
    out = tmp_path / "r"
    argv = ["refine", "--model", str(MODELS / "refiner-phantom-64.safetensors"), "--image",
            str(img), "--prior", str(prior), "--steps", "2", "--device", "cpu", "--quiet",
            "--out", str(out)]
    code, err = _run(capsys, argv + ["--n", "3"])
    assert code == 0, err
    assert whole_run(out)[0] == 3 and (out / "prior.npy").exists()
    code, err = _run(capsys, argv + ["--n", "2"])
    assert code == 2 and "is not empty; choose a new folder, or pass --force" in err
    code, err = _run(capsys, argv + ["--n", "2", "--force"])
    assert code == 0, err
    assert whole_run(out)[0] == 2 and _beside(out) == []


def test_data_phantoms_replaces_a_data_folder_whole(capsys, tmp_path):
    out = tmp_path / "d"
    assert main(["data", "phantoms", "--out", str(out), "--cases", "3", "--size", "16"]) == 0
    code, err = _run(capsys, ["data", "phantoms", "--out", str(out), "--cases", "2"])
    assert code == 2 and "is not empty; choose a new folder, or pass --force" in err
    assert main(["data", "phantoms", "--out", str(out), "--cases", "2", "--size", "16",
                 "--force"]) == 0
    assert len(list((out / "images").iterdir())) == 2  # none of the first 3 cases left
    assert json.loads((out / "dataset.json").read_text())["n_cases"] == 2


# ---------------------------------------------------------------------------- crashes
@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "move-aside"])
def test_a_writer_killed_at_any_write_leaves_the_old_run_or_the_new_one(files, tmp_path,
                                                                         exchange, monkeypatch):
    """Kill the second run (``--force``) before each of its write operations, chosen at
    random, and check that the folder holds the first run or the second, whole."""
    patches = []
    if not exchange:  # the two-rename path of systems without renameat2's exchange
        monkeypatch.setattr(outfolder, "_exchange", _no_exchange)
        patches = [("napari_berdiff.outfolder", "_exchange", _no_exchange)]
    out = tmp_path / "o"
    assert main(_sample_argv(files, out, n=2, seed=0)) == 0
    old = whole_run(out)
    argv = _sample_argv(files, out, "--force", n=3, seed=1)
    second_run = functools.partial(main, argv)
    n_ops = run_killed_at(None, second_run, patches)  # a full run: how many write operations
    assert 20 < n_ops < 199
    new = whole_run(out)
    assert main(_sample_argv(files, out, "--force", n=2, seed=0)) == 0  # back to the old
    rng = random.Random(n_ops)  # reproducible: the same points for the same sequence of writes
    points = sorted(set(rng.sample(range(n_ops), 3)) | set(range(n_ops - 3, n_ops)))
    for k in points:
        assert run_killed_at(k, second_run, patches) == KILLED
        if exchange:  # the destination is whole even before anyone tidies up
            assert whole_run(out) in (old, new), k
        OutputFolder(out).recover()  # what the next run does first
        assert _beside(out) == [], k
        got = whole_run(out)
        assert got in (old, new), k
        if got == new:
            assert main(_sample_argv(files, out, "--force", n=2, seed=0)) == 0


def test_a_sampling_loop_killed_with_sigkill_leaves_a_whole_run(files, tmp_path):
    """A real SIGKILL at a random moment of a loop of ``sample --force`` runs."""
    out = tmp_path / "o"
    script = ("import sys; from napari_berdiff.cli import main\n"
              "argv = sys.argv[1:]\n"
              "for seed in range(10**6):\n"
              "    argv[argv.index('--seed') + 1] = str(seed)\n"
              "    assert main(argv) == 0\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-c", script,
                             *_sample_argv(files, out, "--force", n=2)],
                            env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (out / "run.json").exists() and time.monotonic() < deadline:
            assert proc.poll() is None, "the sampling loop stopped"
            time.sleep(0.02)
        time.sleep(random.uniform(0.05, 0.6))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert whole_run(out)[0] == 2
    OutputFolder(out).recover()
    assert _beside(out) == []
    assert whole_run(out)[0] == 2
