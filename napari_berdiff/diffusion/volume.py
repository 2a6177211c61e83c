"""Sampling a volume's slices several at a time: one batch of ``slices × n`` rows per
network call, under the memory plan, streaming a frame per slice and step (DESIGN §6, §8).

Each slice keeps its own seed, generator and condition (the image encoder runs once per
slice), so a batched run gives each slice the samples a run of that slice alone gives.
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass
import time

import numpy as np
import torch

from ..lazy import LazySequence
from .device import select_device
from .sampler import (DEFAULT_MEMORY_BUDGET_MB, CancelLike, ConditionalNet, Frame, Kernel,
                      KeptReturnStream, MemoryBudgetError, MemoryPlan, Roi, SampleResult,
                      SliceInput, _is_cancelled, check_image, check_run, check_seed, plan_memory,
                      stream_images)

#: Slices batched together at most, by default (the issue's 4 slices × 16 samples).
DEFAULT_MAX_SLICES = 4
#: Rows per network call that batching slices stops at on the CPU, where a larger call is no
#: faster per row: with the default network at 128², one thread, 32 slices × 16 samples took
#: 0.99-1.07× (32 rows per call) and 1.12× (64 rows) the time of slice by slice (16 rows;
#: benchmarks/bench_volume.py, BENCHMARKS.md). Smaller runs (n < 16) still share calls.
CPU_MAX_ROWS = 16


def default_max_rows(device: torch.device) -> int | None:
    """The rows per network call that batching slices stops at on ``device`` (None: the
    memory plan and the slice cap alone decide)."""
    return CPU_MAX_ROWS if device.type == "cpu" else None


@dataclass(frozen=True)
class SlicePlan:
    """How a volume run batches: ``slices`` per batch, ``chunk`` rows per network call (a
    batch of several slices goes through in one call), and the batch's memory plan."""

    slices: int
    chunk: int
    memory: MemoryPlan


def plan_slices(net: ConditionalNet, n: int, channels: int, h: int, w: int, n_slices: int,
                max_slices: int = DEFAULT_MAX_SLICES, max_batch: int | None = None,
                memory_budget_mb: float | None = DEFAULT_MEMORY_BUDGET_MB,
                device: torch.device | None = None, available: int | None = None,
                max_rows: int | None = None) -> SlicePlan:
    """The most slices (up to ``max_slices`` and ``n_slices``) whose ``slices × n`` samples
    fit the memory budget, ``max_batch`` and ``max_rows`` in one network call; one slice at
    a time (chunked as :func:`plan_memory` says) when two do not fit.

    Raises
    ------
    MemoryBudgetError
        When even one slice's ``n`` samples, one at a time, exceed the budget.
    """
    for k in range(min(int(max_slices), int(n_slices)), 1, -1):
        rows = k * n
        if any(cap is not None and rows > cap for cap in (max_batch, max_rows)):
            continue
        try:
            plan = plan_memory(net, rows, channels, h, w, max_batch, memory_budget_mb,
                               device, available, images=k)
        except MemoryBudgetError:
            continue
        if plan.chunk >= rows:
            return SlicePlan(k, plan.chunk, plan)
    plan = plan_memory(net, n, channels, h, w, max_batch, memory_budget_mb, device, available)
    return SlicePlan(1, plan.chunk, plan)


def batch_sizes(n_slices: int, per_batch: int, first_alone: bool = True) -> list[int]:
    """Slices in each batch, in order: ``per_batch`` at a time, after a first slice alone
    when ``first_alone`` (so the first frames come after one single-slice step)."""
    sizes = [1] if first_alone and per_batch > 1 and n_slices > 0 else []
    rest = n_slices - len(sizes)
    sizes += [per_batch] * (rest // per_batch)
    if rest % per_batch:
        sizes.append(rest % per_batch)
    return sizes


@dataclass(frozen=True)
class SliceFrame:
    """One slice's :class:`Frame` after one step; ``slice_index`` counts from 0 in the order
    the slices were given; ``batch`` is ``(first slice, slice count)`` of the batch it ran
    in (a batch's frames of one step come together, first slice first)."""

    slice_index: int
    frame: Frame
    batch: tuple[int, int]


class SliceStream(KeptReturnStream[SliceFrame, list[SampleResult]]):
    """An iterator of :class:`SliceFrame`; afterwards ``results`` holds a
    :class:`SampleResult` per slice started (in slice order)."""

    def __init__(self, gen: Generator[SliceFrame, None, list[SampleResult]], n_slices: int,
                 plan: SlicePlan):
        super().__init__(gen)
        self.n_slices = n_slices
        self.plan = plan

    @property
    def results(self) -> list[SampleResult] | None:
        """One result per slice started (None until the stream ends)."""
        return self.returned

    @property
    def cancelled(self) -> bool:
        """Whether the run stopped before every slice was finished (None until it ends)."""
        res = self.results or []
        return len(res) < self.n_slices or any(r.cancelled for r in res)


def sample_slices(
    net: ConditionalNet,
    kernel: Kernel,
    images: Sequence[np.ndarray | torch.Tensor],
    *,
    seeds: Sequence[int],
    n: int = 16,
    steps: int | str | None = None,
    priors: Sequence[np.ndarray | float | None] | None = None,
    roi: Roi | None = None,
    constraints: Sequence[np.ndarray | None] | None = None,
    device: str | torch.device | None = "auto",
    max_batch: int | None = None,
    memory_budget_mb: float | None = DEFAULT_MEMORY_BUDGET_MB,
    max_slices: int = DEFAULT_MAX_SLICES,
    max_rows: int | str | None = "auto",
    first_alone: bool = True,
    cancel: CancelLike = None,
    image_channels: int | None = None,
    profile: bool = False,
) -> SliceStream:
    """Validate the arguments, then return a stream that samples ``n`` samples of each
    same-size slice, several slices per network call.

    Parameters
    ----------
    images
        The slices, each (H, W) or (C, H, W) and normalised, all of one shape.
    seeds
        One seed per slice: slice ``i`` gets exactly the samples of
        ``sample_stream(net, kernel, images[i], seed=seeds[i], ...)``.
    priors, constraints
        One prior / constraint map per slice (or None), as :func:`sample_stream` takes.
    max_slices, max_rows, first_alone
        At most ``max_slices`` slices and ``max_rows`` samples per batch (fewer slices when
        the memory plan says so, see :func:`plan_slices`; ``"auto"``:
        :func:`default_max_rows` of the device, None: no row cap); the first slice runs
        alone when ``first_alone``, so its first frame comes after one single-slice step.
    n, steps, roi, device, max_batch, memory_budget_mb, cancel, image_channels, profile
        As for :func:`sample_stream`. ``cancel`` is checked before every step and every
        batch.

    Returns
    -------
    SliceStream
        Yields a :class:`SliceFrame` per slice and step (a batch's slices in order, step
        by step); afterwards ``.results`` holds a :class:`SampleResult` per slice started.
        Bad arguments raise ``ValueError`` (:class:`MemoryBudgetError` for memory) here;
        ``images`` may be a lazy sequence: slice 0 is read and checked here, each other
        slice only when its batch starts (a bad one raises ``ValueError`` from the stream
        then, after the slices before it have streamed).
    """
    t_start = time.perf_counter()
    n, visited = check_run(net, kernel, n, steps)
    count = len(images)
    if count < 1:
        raise ValueError("give at least one slice to sample")
    for name, seq in (("seeds", seeds), ("priors", priors), ("constraints", constraints)):
        if seq is not None and len(seq) != count:
            raise ValueError(f"{name} must hold one entry per slice ({count}); "
                             f"got {len(seq)}")

    box: Roi = None  # slice 0's region, the same for every slice

    def check(i: int) -> SliceInput:
        nonlocal box
        img, box_i, prior_t, constraint_t = check_image(
            net, kernel, images[i], roi, None if priors is None else priors[i],
            None if constraints is None else constraints[i], image_channels)
        if i and img.shape != inputs[0].image.shape:
            raise ValueError(f"every slice must have one shape; slice {i} is "
                             f"{img.shape}, slice 0 {inputs[0].image.shape}")
        if not i:
            box = box_i
        return SliceInput(img, check_seed(seeds[i]), prior_t, constraint_t)

    inputs = LazySequence(check, count)  # slice 0 now, the others when their batch starts
    c, h, w = inputs[0].image.shape
    dev = select_device(device)
    rows = default_max_rows(dev) if max_rows == "auto" else max_rows
    plan = plan_slices(net, n, c, h, w, count, max_slices, max_batch, memory_budget_mb, dev,
                       max_rows=rows)
    alone = plan.chunk if plan.slices == 1 else plan_memory(
        net, n, c, h, w, max_batch, memory_budget_mb, dev).chunk
    sizes = batch_sizes(count, plan.slices, first_alone)
    gen = _run_batches(net, kernel, inputs, sizes, n, visited, box, dev, plan.chunk, alone,
                       cancel, profile, t_start)
    return SliceStream(gen, count, plan)


def _run_batches(net: ConditionalNet, kernel: Kernel, inputs: Sequence[SliceInput],
                 sizes: list[int], n: int, visited: list[int], box: Roi, dev: torch.device,
                 chunk: int, alone_chunk: int, cancel: CancelLike, profile: bool,
                 t_start: float) -> Generator[SliceFrame, None, list[SampleResult]]:
    """The generator behind :func:`sample_slices`: each batch in turn, until one is
    cancelled (or ``cancel`` is set between batches)."""
    results: list[SampleResult] = []
    pos = 0
    for size in sizes:
        if _is_cancelled(cancel):
            break
        core = stream_images(net, kernel, inputs[pos:pos + size], n, visited, box, dev,
                             chunk if size > 1 else alone_chunk, cancel, profile, t_start)
        try:
            while True:
                try:
                    frames = next(core)
                except StopIteration as stop:
                    results.extend(stop.value)
                    break
                for i, frame in enumerate(frames):
                    yield SliceFrame(pos + i, frame, (pos, size))
        finally:
            core.close()
        if results[-1].cancelled:
            break
        pos += size
    return results
