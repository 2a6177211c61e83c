"""Kill a writer before its k-th write operation: a child process that dies with ``os._exit``
(no clean-up, no ``finally``), as a SIGKILL or a power cut at that moment would.

Children are *spawned* (a fresh interpreter), never forked: a child forked from a pytest
process that has already run torch inherits OpenMP's thread pool and whatever locks other
threads held at that moment, and can wait on a futex for ever (a full-suite CI run hung
exactly so). ``fn`` and the patches must therefore be picklable: module-level functions and
``functools.partial`` of them."""

from __future__ import annotations

import builtins
import importlib
import io
import multiprocessing
import os
import shutil
import sys
from typing import Any, Callable, Sequence

KILLED = 200
RAISED = 201
#: Seconds a child may run before the test calls it hung and kills it.
CHILD_TIMEOUT = 300

#: (module, function) pairs that change files: each call is one write operation.
WRITE_OPS = [("os", "rename"), ("os", "replace"), ("os", "fsync"), ("os", "mkdir"),
             ("os", "unlink"), ("napari_berdiff.outfolder", "_exchange"),
             ("shutil", "rmtree")]

Patch = tuple[str, str, Any]  # (module name, attribute, new value), set in the child


def _spawn() -> multiprocessing.context.SpawnContext:
    return multiprocessing.get_context("spawn")


def _apply(patches: Sequence[Patch]) -> None:
    for module, name, value in patches:
        setattr(importlib.import_module(module), name, value)


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def _killed_child(k: int | None, fn: Callable[[], object], patches: Sequence[Patch]) -> None:
    try:
        _one_thread()
        _apply(patches)
        count = [0]

        def hook(func):
            def wrapped(*a, **kw):
                if k is not None and count[0] == k:
                    os._exit(KILLED)
                count[0] += 1
                return func(*a, **kw)
            return wrapped

        for module, name in WRITE_OPS:
            mod = importlib.import_module(module)
            setattr(mod, name, hook(getattr(mod, name)))
        real_open = builtins.open
        counted_open = hook(real_open)

        def any_open(f, mode="r", *a, **kw):
            writes = any(c in mode for c in "wax+")
            return (counted_open if writes else real_open)(f, mode, *a, **kw)

        builtins.open = io.open = any_open
        sys.stdout = sys.stderr = real_open(os.devnull, "w")
        fn()
        os._exit(min(count[0], 199))
    except BaseException:
        os._exit(RAISED)


def _join(proc: multiprocessing.process.BaseProcess, timeout: float) -> int:
    proc.join(timeout)
    if proc.is_alive():
        proc.kill()
        proc.join()
        raise AssertionError(f"the child process did not finish within {timeout:.0f} s")
    return proc.exitcode


def run_killed_at(k: int | None, fn: Callable[[], object], patches: Sequence[Patch] = (),
                  timeout: float = CHILD_TIMEOUT) -> int:
    """Run ``fn`` in a spawned child that dies just before its ``k``-th write operation (a
    file opened for writing, a rename, an fsync …). Returns ``KILLED`` when it died there,
    else (``k`` None, or fewer operations) the number of write operations it made (capped
    at 199), or ``RAISED`` when ``fn`` raised. ``patches`` are set in the child first."""
    proc = _spawn().Process(target=_killed_child, args=(k, fn, tuple(patches)))
    proc.start()
    return _join(proc, timeout)


def _started_child(started, fn: Callable[[], object]) -> None:
    _one_thread()
    started.set()
    fn()


def start_child(fn: Callable[[], object], timeout: float = CHILD_TIMEOUT):
    """Spawn a child running ``fn`` and return it once its interpreter is up and ``fn`` is
    about to run (so that a kill after a delay lands in ``fn``, not in ``import torch``)."""
    ctx = _spawn()
    started = ctx.Event()
    proc = ctx.Process(target=_started_child, args=(started, fn))
    proc.start()
    if not started.wait(timeout):
        proc.kill()
        proc.join()
        raise AssertionError(f"the child process did not start within {timeout:.0f} s")
    return proc
