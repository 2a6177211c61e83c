"""A training run's files across kills: the log holds every step of the state, ``--force``
never truncates the old run, no temporary file survives, and ``--resume`` refuses options
that contradict the stored recipe (issue 21, item 4)."""

from __future__ import annotations

import csv
import functools
import random
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from napari_berdiff.training import log_path_for, state_path_for, train
from napari_berdiff.training.loop import RunFiles, load_state

from .crashes import KILLED, run_killed_at, start_child
from .test_training import _config, _dataset


@pytest.fixture(scope="module")
def data():
    return _dataset(n=4)


def _files(out: Path) -> list[Path]:
    return [out, state_path_for(out), log_path_for(out)]


def _log(out: Path) -> tuple[list[str], list[list[str]]]:
    with open(log_path_for(out), newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def _log_steps(out: Path) -> list[int]:
    return [int(r[0]) for r in _log(out)[1]]


def _snapshot(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in _files(out) if p.exists()}


def _restore(out: Path, files: dict[str, bytes]) -> None:
    for p in _files(out):
        if p.name in files:
            p.write_bytes(files[p.name])
        else:
            p.unlink(missing_ok=True)


def _leftovers(folder: Path) -> list[str]:
    """Temporary files and moved-aside runs in ``folder``."""
    return sorted(p.name for p in folder.iterdir()
                  if p.name.endswith(".tmp") or ".old-" in p.name)


def _check_in_step(out: Path) -> int:
    """The state's step S, after checking that the log holds every step 1..S, whole (a kill
    may leave later steps, or half a row after them)."""
    step = int(load_state(state_path_for(out))["step"])
    header, rows = _log(out)
    whole = [r for r in rows if len(r) == len(header)]
    assert [int(r[0]) for r in whole[:step]] == list(range(1, step + 1))
    return step


# ---------------------------------------------------------------------------- --force
def test_force_keeps_the_old_run_until_the_new_one_has_checkpointed(tmp_path, data):
    out = tmp_path / "m.safetensors"
    train(_config(steps=3, checkpoint_every=2), data, out, progress=False)
    old = _snapshot(out)
    assert len(old) == 3 and _log_steps(out) == [1, 2, 3]

    # A new run over it (first checkpoint at step 2), killed before a write operation
    # chosen at random: the old run comes back whole, or the new one is there, in step.
    fresh = _config(steps=4, checkpoint_every=5, seed=9)
    new_run = functools.partial(train, fresh, data, out, progress=False, stop_after=2)
    n_ops = run_killed_at(None, new_run)
    assert 8 < n_ops < 199 and _check_in_step(out) == 2
    _restore(out, old)
    points = sorted(set(random.Random(n_ops).sample(range(n_ops), 3)) | {0, n_ops - 1})
    for k in points:
        assert run_killed_at(k, new_run) == KILLED
        RunFiles(_files(out))  # what the next run does first: put the old run back
        assert _leftovers(tmp_path) == [], k
        if _snapshot(out) != old:  # the new run's first checkpoint is complete
            assert _check_in_step(out) == 2 and len(_snapshot(out)) == 3, k
            _restore(out, old)

    # Completed, the new run replaces the old one; nothing is left beside it.
    train(fresh, data, out, progress=False)
    assert _log_steps(out) == list(range(1, 5)) and _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------- kills
def test_a_training_run_killed_at_random_moments_keeps_log_and_state_in_step(tmp_path, data):
    """SIGKILL a run (and each resumed run) after a random delay; the log always holds
    every step of the state; resuming leaves no temporary file and a log of steps 1..N."""
    out = tmp_path / "m.safetensors"
    cfg = _config(steps=100_000, checkpoint_every=2)
    rng = random.Random(6)  # reproducible delays
    kills = 0
    for attempt in range(6):
        resume = state_path_for(out).exists()
        proc = start_child(functools.partial(train, cfg, data, out, progress=False,
                                             resume=resume))
        deadline = time.monotonic() + 120
        while attempt == 0 and not state_path_for(out).exists() and time.monotonic() < deadline:
            time.sleep(0.01)  # the first run: kill it after its first checkpoint
        time.sleep(rng.uniform(0.0, 0.4))
        proc.kill()
        proc.join()
        kills += proc.exitcode == -signal.SIGKILL
        if state_path_for(out).exists():
            _check_in_step(out)
    assert kills == 6
    step = _check_in_step(out)
    res = train(cfg.replace(steps=step + 3), data, out, progress=False, resume=True)
    assert res.step == step + 3
    assert _log_steps(out) == list(range(1, step + 4))
    assert _leftovers(tmp_path) == []


def test_resume_drops_log_rows_after_the_state_and_a_torn_row(tmp_path, data):
    out = tmp_path / "m.safetensors"
    cfg = _config(steps=4, checkpoint_every=2)
    train(cfg, data, out, progress=False)
    with open(log_path_for(out), "a") as f:  # as a kill after step 6 would leave them
        f.write("5,0.5,0.1,0.1,0.001,1,0.1\n6,0.5,0.1,0.1,0.001,1,0.1\n7,0.4")
    (tmp_path / f".m.state.pt.{2**22 + 7}.tmp").write_bytes(b"half a state")  # a dead pid's
    (tmp_path / "m.safetensors.tmp").write_bytes(b"left by an earlier version")
    train(cfg.replace(steps=6), data, out, progress=False, resume=True)
    assert _log_steps(out) == [1, 2, 3, 4, 5, 6]
    assert _leftovers(tmp_path) == []
    header, rows = _log(out)
    assert all(len(r) == len(header) for r in rows)
    assert np.isfinite([float(r[1]) for r in rows]).all()


# ---------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from napari_berdiff.cli import main

    d = tmp_path_factory.mktemp("train_files") / "data"
    assert main(["data", "phantoms", "--out", str(d), "--cases", "6", "--size", "16"]) == 0
    return d


def _train_argv(d: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(d), "-o", str(out), "--base-channels", "8",
            "--channel-mult", "1,2", "--res-blocks", "1", "--norm-groups", "4",
            "--batch-size", "2", "--timesteps", "20", "--sampling-steps", "4",
            "--checkpoint-every", "2", "--threads", "1", "--quiet", *extra]


def test_resume_refuses_options_that_contradict_the_stored_recipe(tmp_path, phantoms, capsys):
    from napari_berdiff.cli import main

    out = tmp_path / "m.safetensors"
    assert main(_train_argv(phantoms, out, "--steps", "2")) == 0
    before = _snapshot(out)
    capsys.readouterr()

    assert main(_train_argv(phantoms, out, "--steps", "4", "--resume", "--kind", "gaussian",
                            "--lr", "0.5", "--batch-size", "7")) == 2
    err = capsys.readouterr().err
    assert ("berdiff: error: --resume continues the recipe stored in m.state.pt, and these "
            "options contradict it: ") in err
    assert "--kind gaussian (the run has kind = 'bernoulli')" in err
    assert "--lr 0.5 (the run has lr = 0.001)" in err
    assert "--batch-size 7 (the run has batch_size = 2)" in err
    assert "Drop them to resume, or start a new run" in err
    assert "training a gaussian model" not in err and _snapshot(out) == before

    cases = [(["--no-augment"], "--no-augment (the run has augment = True)"),
             (["--timesteps", "30"], "--timesteps 30 (the run has diffusion.timesteps = 20)"),
             (["--base-channels", "16"],
              "--base-channels 16 (the run has network.model_channels = 8)"),
             (["--val-fraction", "0.2"],
              "--val-fraction 0.2 (the run has data.split_fractions.1 = 0.1)"),
             (["--force"], "--resume continues the run and --force replaces it; give one")]
    for extra, message in cases:
        assert main(_train_argv(phantoms, out, "--steps", "4", "--resume", *extra)) == 2
        assert message in capsys.readouterr().err, extra
    assert _snapshot(out) == before

    # Called without main (no command line recorded): options off their defaults count.
    from napari_berdiff.cli import build_parser
    from napari_berdiff.cli_training import cmd_train

    args = build_parser().parse_args(_train_argv(phantoms, out, "--resume", "--lr", "0.5"))
    with pytest.raises(ValueError, match=r"--lr 0\.5 \(the run has lr = 0\.001\)"):
        cmd_train(args)

    # Restating the recipe, or changing only run settings, resumes.
    assert main(_train_argv(phantoms, out, "--steps", "4", "--resume", "--lr", "0.001",
                            "--kind", "bernoulli", "--minutes", "5")) == 0
    assert "resuming a bernoulli model" in capsys.readouterr().err
    assert _log_steps(out) == [1, 2, 3, 4]

    # A fresh run where a run's state or log is: refused without --force.
    (tmp_path / "n.log.csv").write_text("step,loss\n1,0.5\n")
    assert main(_train_argv(phantoms, tmp_path / "n.safetensors", "--steps", "2")) == 2
    assert f"{tmp_path / 'n.log.csv'} exists; use --resume to continue its run or --force " \
           "to replace it" in capsys.readouterr().err
