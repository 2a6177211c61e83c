"""How many torch threads a run uses: one policy for the CLI and the widget (issue 26).

Measured on a 2-core machine (``benchmarks/bench_threads.py``): torch's OpenMP threads
spin while they wait for each other, so a run with more threads than there are free
cores slows down several-fold (16 samples of 128²: 0.96 s with 1 thread, 6.2–6.8 s with 2
while another process kept a core busy), whereas with the cores free, 2 threads are
about 1.6× faster than 1. The ``auto`` policy therefore counts the cores that other
processes keep busy right before a run and uses the rest (at least 1).
"""

from __future__ import annotations

import os
import time

__all__ = ["available_cores", "busy_cores", "auto_threads", "resolve_threads", "use_threads"]


def available_cores() -> int:
    """The cores this process may run on: physical cores when known, within its CPU
    affinity."""
    logical = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else (os.cpu_count() or 1)
    try:
        import psutil

        physical = psutil.cpu_count(logical=False) or logical
    except ImportError:  # pragma: no cover - psutil comes with napari, not the engine
        physical = logical
    return max(1, min(logical, physical))


def _proc_stat() -> tuple[float, float] | None:
    """(busy, total) CPU jiffies of the whole machine, from /proc/stat (Linux)."""
    try:
        with open("/proc/stat") as f:
            fields = [float(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_cores(window_s: float = 0.05) -> float | None:
    """How many cores other processes keep busy, measured over ``window_s`` seconds
    (this process's own CPU time is subtracted). None where it cannot be measured; then
    the 1-minute load average is used where the system has one."""
    a = _proc_stat()
    if a is None:
        try:
            return float(os.getloadavg()[0])
        except (OSError, AttributeError):
            return None
    own0, wall0 = time.process_time(), time.perf_counter()
    time.sleep(window_s)
    b = _proc_stat()
    own = time.process_time() - own0
    wall = time.perf_counter() - wall0
    if b is None or b[1] <= a[1] or wall <= 0:
        return None
    n_cpu = os.cpu_count() or 1
    machine = (b[0] - a[0]) / (b[1] - a[1]) * n_cpu
    return max(0.0, machine - own / wall)


def auto_threads() -> int:
    """The ``auto`` policy: the available cores less those other processes keep busy
    (a core counts as busy from 0.5 of its time), at least 1."""
    cores = available_cores()
    busy = busy_cores()
    if busy is None:
        return max(1, cores - 1)
    return max(1, min(cores, cores - int(round(busy))))


def resolve_threads(threads: int | str | None) -> int:
    """A thread request as a count: ``None``/``"auto"`` -> :func:`auto_threads`; a whole
    number from 1 to the machine's logical CPU count as it is.

    Raises
    ------
    ValueError
        For anything else, naming what is accepted.
    """
    if threads is None or (isinstance(threads, str) and threads.strip().lower() == "auto"):
        return auto_threads()
    limit = os.cpu_count() or 1
    try:
        n = int(str(threads).strip())
    except ValueError:
        raise ValueError(f"threads must be 'auto' or a whole number from 1 to {limit}; "
                         f"got {threads!r}") from None
    if not 1 <= n <= limit:
        raise ValueError(f"threads must be 'auto' or a whole number from 1 to {limit} "
                         f"(this machine's CPUs); got {n}")
    return n


def use_threads(threads: int | str | None) -> int:
    """Resolve ``threads`` and set torch's intra-op thread count to it; returns it."""
    import torch

    n = resolve_threads(threads)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
