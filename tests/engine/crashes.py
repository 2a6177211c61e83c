"""Kill a writer before its k-th write operation: a forked child that dies with ``os._exit``
(no clean-up, no ``finally``), as a SIGKILL or a power cut at that moment would."""

from __future__ import annotations

import builtins
import io
import os
import shutil
import sys
from typing import Callable

import napari_berdiff.outfolder as outfolder

#: (module, function) pairs that change files: each call is one write operation.
WRITE_OPS = [(os, "rename"), (os, "replace"), (os, "fsync"), (os, "mkdir"), (os, "unlink"),
             (outfolder, "_exchange"), (shutil, "rmtree")]
KILLED = 200


def run_killed_at(k: int | None, fn: Callable[[], object]) -> int:
    """Run ``fn`` in a forked child that dies just before its ``k``-th write operation (a
    file opened for writing, a rename, an fsync …). Returns ``KILLED`` when it died there,
    else (``k`` None, or fewer operations) the number of write operations it made (capped
    at 199), or 201 when ``fn`` raised."""
    pid = os.fork()
    if pid == 0:
        try:
            count = [0]

            def hook(func):
                def wrapped(*a, **kw):
                    if k is not None and count[0] == k:
                        os._exit(KILLED)
                    count[0] += 1
                    return func(*a, **kw)
                return wrapped

            for mod, name in WRITE_OPS:
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
            os._exit(201)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)
