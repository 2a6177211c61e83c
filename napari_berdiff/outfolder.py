"""Output folders written whole or not at all (``berdiff sample``, ``refine``, ``data``).

A run is written into a temporary folder beside its destination, ``.<name>.partial-<pid>-…``,
and moved into place only when it is complete. The destination is checked before any work:
an existing file, a folder that cannot be written, or a non-empty folder without ``force``
is refused with a message that says what to do. ``force`` replaces a previous run whole:
the new folder and the old one swap places in one step where the system can
(``renameat2(RENAME_EXCHANGE)`` on Linux), else the old one is moved aside first; the old
one is removed only after the new one is in place. Whatever kills the writer, the
destination holds the old run or the new one, complete; what a killed writer leaves beside
it is cleaned up by the next run into the same destination.

    with OutputFolder(args.out, force=args.force, inputs=[model, image]) as tmp:
        ...write the files into tmp...
    # now args.out holds them all
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import shutil
import sys
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

__all__ = ["OutputFolder", "atomic_write_text", "temporary_path", "replace_from_temporary",
           "remove_stale_temporaries", "pid_alive"]

_PARTIAL, _OLD = "partial", "old"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (the writer of a temporary file or folder)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2``); False where that is unavailable."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # e.g. a file system without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def _new_folder(parent: Path, prefix: str) -> Path:
    """A new folder ``<prefix><pid>-<random>`` in ``parent``, with the usual permissions."""
    while True:
        path = parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_path(path: str | Path) -> Path:
    """Where to write ``path`` before :func:`replace_from_temporary` moves it into place:
    ``.<name>.<pid>.tmp`` beside it (the pid tells a killed writer's file from a live one's)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def replace_from_temporary(tmp: Path, path: str | Path) -> None:
    """Flush ``tmp`` to disk and rename it to ``path`` in one step."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(Path(path).parent)


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporary files of ``path`` that killed writers left (and the
    ``<name>.tmp`` of earlier versions); returns them."""
    path = Path(path)
    stale = [p for p in path.parent.glob(f".{path.name}.*.tmp")
             if p.name[len(path.name) + 2:-4].isdigit()
             and not pid_alive(int(p.name[len(path.name) + 2:-4]))]
    legacy = path.with_name(path.name + ".tmp")
    stale += [legacy] if legacy.exists() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a text file whole or not at all (a temporary file, fsync, then rename)."""
    tmp = temporary_path(path)
    try:
        tmp.write_text(text)
        replace_from_temporary(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class OutputFolder:
    """A destination folder that receives a run whole, or keeps what it held.

    Parameters
    ----------
    out
        The destination folder (created with its parents when missing).
    force
        Replace a non-empty destination (it must hold a previous run: ``marker`` in it).
    inputs
        Files the run reads; a destination that contains one of them is never replaced.
    marker
        The file that identifies a previous run (``run.json``; a data folder's
        ``dataset.json``).
    option
        How the command line names the destination, for messages (``--out``).
    """

    def __init__(self, out: str | Path, *, force: bool = False,
                 inputs: Iterable[str | Path] = (), marker: str = "run.json",
                 option: str = "--out"):
        self.out = Path(out)
        self.force = force
        self.inputs = [Path(p) for p in inputs]
        self.marker = marker
        self.option = option
        self.tmp: Path | None = None

    # ---------------------------------------------------------------- checks
    def _prefix(self, kind: str) -> str:
        return f".{self.out.name}.{kind}-"

    def _leftovers(self, kind: str) -> list[tuple[Path, int]]:
        """Folders a killed writer left beside the destination, with their writer's pid."""
        found = []
        parent = self.out.parent
        if not parent.is_dir():
            return found
        for p in parent.glob(self._prefix(kind) + "*"):
            pid_text = p.name[len(self._prefix(kind)):].split("-", 1)[0]
            if pid_text.isdigit() and not pid_alive(int(pid_text)):
                found.append((p, int(pid_text)))
        return found

    def recover(self) -> None:
        """Tidy what a killed writer left: put a moved-aside old run back where a kill came
        between the two renames of a replacement, and remove stale temporary folders."""
        olds = self._leftovers(_OLD)
        if olds and not self.out.exists():  # killed between moving aside and moving in
            os.rename(olds[0][0], self.out)
            olds = olds[1:]
        for p, _ in olds + self._leftovers(_PARTIAL):
            shutil.rmtree(p, ignore_errors=True)

    def check(self) -> None:
        """Refuse a destination this run must not write, before any work is done."""
        out, opt = self.out, self.option
        if out.exists() and not out.is_dir():
            raise ValueError(f"{opt} {out} is an existing file, not a folder; give a folder "
                             "name (it is created)")
        for anc in out.parents:
            if anc.exists():
                if not anc.is_dir():
                    raise ValueError(f"{opt} {out}: {anc} is a file, not a folder; give a "
                                     "folder name under an existing folder")
                break
        self.recover()
        if out.is_dir() and any(out.iterdir()):
            if not self.force:
                raise ValueError(f"{opt} {out} is not empty; choose a new folder, or pass "
                                 "--force to replace it whole")
            if not (out / self.marker).is_file():
                raise ValueError(f"{opt} {out} is not empty and holds no {self.marker}, so it "
                                 "is not a previous run; --force replaces only a previous "
                                 "run, so choose a new folder")
            root = out.resolve()
            for f in self.inputs:
                if root == f.resolve() or root in f.resolve().parents:
                    raise ValueError(f"{opt} {out} holds the input {f}; --force would delete "
                                     "it, so choose another folder")

    # ---------------------------------------------------------------- writing
    def open(self) -> Path:
        """Check the destination and create the temporary folder the run writes into."""
        self.check()
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = _new_folder(self.out.parent, self._prefix(_PARTIAL))
        except OSError as e:
            raise ValueError(f"{self.option} {self.out} cannot be written "
                             f"({e.strerror or e}); choose a folder you can write to") from None
        return self.tmp

    def commit(self) -> None:
        """Move the complete run into place (replacing a previous run whole)."""
        assert self.tmp is not None, "open() first"
        tmp, out = self.tmp, self.out
        for folder, _, names in os.walk(tmp):  # the files' bytes first, then the rename
            for name in names:
                with open(os.path.join(folder, name), "rb") as fh:
                    os.fsync(fh.fileno())
            _fsync_dir(Path(folder))
        if not out.exists():
            os.rename(tmp, out)
        elif _exchange(tmp, out):
            shutil.rmtree(tmp)  # it now holds the old run
        else:
            aside = tmp.with_name(tmp.name.replace(self._prefix(_PARTIAL), self._prefix(_OLD)))
            os.rename(out, aside)
            os.rename(tmp, out)
            shutil.rmtree(aside)
        _fsync_dir(out.parent)
        self.tmp = None

    def discard(self) -> None:
        """Remove the temporary folder of a run that did not finish."""
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None

    def __enter__(self) -> Path:
        return self.open()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()
