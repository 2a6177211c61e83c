"""The work a sampling run does in its worker thread (no Qt, no napari layers here).

:func:`run_job` is a generator: napari's ``thread_worker`` runs it in another thread and
delivers every yielded :class:`Update` to the main thread, where the widget (and only the
widget) touches layers. It yields once per diffusion step so progress and cancel stay
responsive, but only *some* updates carry arrays: at most one every ``interval_s`` seconds,
plus the first and the last frame of every slice. Where showing a frame is slow (software
OpenGL, a busy laptop), the gap also grows so that the main thread spends at most
``max_busy`` of the run showing frames (:func:`push_due`). The host copies and the
uncertainty maps of those frames are computed here, in the worker, so the event loop only
copies arrays.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..lazy import LazySequence

MAP_NAMES = ("frequency", "variance", "entropy")
#: The default largest share of a run the main thread may spend showing frames.
MAX_BUSY = 0.25


class SamplingError(Exception):
    """An error raised while sampling.

    Deliberately not a ``RuntimeError``: superqt's generator worker swallows those (it takes
    them for a deleted Qt object) and never emits ``errored`` or ``finished``.
    """


@dataclass
class Job:
    model: Any
    crops: list[np.ndarray]
    seed_offsets: list[int]
    n: int
    steps: int | None
    seed: int
    interval_s: float = 0.1
    #: torch threads: a count, or "auto"/None for the shared policy (napari_berdiff.threads)
    threads: int | str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    #: set by the main thread once the last update with arrays has reached the layers
    consumed: threading.Event = field(default_factory=threading.Event)
    #: the largest fraction of the time the main thread may spend showing frames (0: no
    #: limit); with ``interval_s == 0`` every frame is shown regardless
    max_busy: float = MAX_BUSY
    #: when the main thread last set ``consumed`` (``time.perf_counter``), see
    #: :meth:`mark_consumed`
    consumed_at: float = 0.0
    #: a refiner's prior probability map per crop (same (h, w) as the crop), else None
    priors: list[np.ndarray] | None = None
    #: a Bernoulli step temperature other than the model's own, else None
    temperature: float | None = None
    #: the image's intensity units ("HU"): the model's window applies when it has one
    units: str | None = None
    #: keeps every step for an animation (:class:`~napari_berdiff.animation.ReverseRecorder`)
    recorder: Any = None
    #: the refiner's hard constraints per crop (−1 free, 0 never, 1 keep), else None
    constraints: list[np.ndarray | None] | None = None
    #: the image's pixel spacing in mm (the layer's scale) when known: each crop is sampled
    #: at the model's spacing and the frames mapped back (napari_berdiff.spacing)
    spacing: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        self.consumed.set()

    def mark_consumed(self) -> None:
        """Called by the main thread once a pushed frame is shown (and drawn)."""
        self.consumed_at = time.perf_counter()
        self.consumed.set()


def push_due(now: float, last_push: float, interval_s: float, show_cost_s: float,
             max_busy: float) -> bool:
    """Whether a frame may be pushed at ``now``.

    At least ``interval_s`` after the last push and, unless ``interval_s`` is 0 (every
    frame), long enough that showing frames (``show_cost_s`` each, measured from the push to
    the main thread's ``mark_consumed``) takes at most ``max_busy`` of the time.
    """
    gap = interval_s
    if interval_s > 0 and max_busy > 0:
        gap = max(gap, show_cost_s / max_busy)
    return now - last_push >= gap


class _Pacer:
    """The worker's side of :func:`push_due`: when it last pushed, and what that cost."""

    def __init__(self, job: Job):
        self.job, self.last_push, self.cost = job, -float("inf"), 0.0

    def due(self, now: float) -> bool:
        job = self.job
        if not job.consumed.is_set():
            return False
        if job.consumed_at >= self.last_push > -float("inf"):
            self.cost = job.consumed_at - self.last_push
        return push_due(now, self.last_push, job.interval_s, self.cost, job.max_busy)

    def pushed(self) -> None:
        self.job.consumed.clear()
        self.last_push = time.perf_counter()


@dataclass
class Update:
    """One reverse step done. ``states`` etc. are set only on updates meant for the layers."""

    slice_pos: int
    n_slices: int
    step: int
    n_steps: int
    t: int
    elapsed: float
    final: bool
    states: np.ndarray | None = None
    probs: np.ndarray | None = None
    maps: dict[str, np.ndarray] | None = None
    catch_up: bool = False  # re-sends an already counted step's arrays (after a cancel)

    @property
    def has_data(self) -> bool:
        return self.states is not None

    @property
    def done_steps(self) -> int:
        return self.slice_pos * self.n_steps + self.step + 1


@dataclass
class Outcome:
    cancelled: bool
    slices_done: int
    n_slices: int
    steps_done: int
    n_steps: int
    seconds: float
    device: str = ""
    #: Models with a presence head: the mean over the slices of the probability that an
    #: annotator marks anything (samples drawn unmarked are empty masks); None otherwise.
    presence: float | None = None
    #: the torch threads the run used (in its worker thread)
    threads: int = 0


def default_threads() -> int:
    """The thread count of the shared ``auto`` policy (:mod:`napari_berdiff.threads`)."""
    from ..threads import auto_threads

    return auto_threads()


def _fill(upd: Update, frame: Any, how: Any = None, fixed: np.ndarray | None = None
          ) -> Update:
    upd.states = frame.states
    upd.probs = frame.x0_prob
    maps = frame.maps
    upd.maps = {k: maps[k] for k in MAP_NAMES}
    if how is not None:  # sampled at the model's spacing: back onto the crop's pixels
        from ..spacing import resample_back

        upd.states = (resample_back(upd.states.astype(np.float32), how.shape) > 0.5
                      ).astype(upd.states.dtype)
        upd.probs = resample_back(upd.probs, how.shape).clip(0, 1)
        upd.maps = {k: resample_back(v[None], how.shape)[0] for k, v in upd.maps.items()}
        if fixed is not None:  # hard constraints hold on the crop's own pixels too
            sel = fixed >= 0
            upd.states = upd.states.copy()
            upd.states[:, sel] = fixed[sel].astype(upd.states.dtype)
            upd.probs[:, sel] = fixed[sel].astype(upd.probs.dtype)
    return upd


def _constrain(extra: dict[str, Any], fixed: np.ndarray, how: Any,
               shape: tuple[int, int]) -> None:
    """Add the hard constraints ``fixed`` (on the crop's grid) to the sampling keywords, on
    the model's grid (``shape``) when the crop is resampled (``how``), and clamp the prior map
    there too."""
    from ..refine import constrain_prior
    from ..spacing import constraints_to_model_grid

    c = fixed if how is None else constraints_to_model_grid(fixed, how, shape)
    if c is None:
        return
    extra["constraints"] = c
    if "prior" in extra:
        extra["prior"] = constrain_prior(np.asarray(extra["prior"], np.float32), c)


def _slice_inputs(job: Job, pos: int, crop: np.ndarray
                  ) -> tuple[np.ndarray, dict[str, Any], Any, np.ndarray | None]:
    """Crop ``pos`` as sampled (on the model's grid when ``job.spacing`` says), with its
    sampling keywords (prior, constraints, temperature, units), the resampling ``how`` (or
    None) and its hard constraints on the crop's own grid (or None)."""
    extra: dict[str, Any] = {} if job.priors is None else {"prior": job.priors[pos]}
    if job.temperature is not None:
        extra["temperature"] = job.temperature
    if job.units:
        extra["units"] = job.units
    fixed = None if job.constraints is None else job.constraints[pos]
    how = None
    if job.spacing is not None:
        from ..spacing import to_model_spacing

        crop, prior, how = to_model_spacing(job.model, crop, job.spacing, None,
                                            extra.get("prior"))
        if prior is not None:
            extra["prior"] = prior
    if fixed is not None:
        _constrain(extra, fixed, how, tuple(np.shape(crop)[-2:]))
    return crop, extra, how, fixed


def run_job(job: Job) -> Generator[Update, None, Outcome]:
    """Sample every crop of ``job``, yielding an :class:`Update` per slice and step: one
    crop alone, a volume's crops several per batch (:meth:`sample_slices`, when the model
    has it)."""
    import torch

    from ..threads import use_threads

    use_threads(job.threads or "auto")
    threads = torch.get_num_threads()  # what torch runs with in this (the worker) thread
    batched = len(job.crops) > 1 and callable(getattr(job.model, "sample_slices", None))
    with torch.inference_mode():
        outcome = yield from (_run_batched(job) if batched else _run_each(job))
    outcome.threads = threads
    return outcome


def _run_batched(job: Job) -> Generator[Update, None, Outcome]:
    """A volume's crops, several per network call; each slice's samples are those of a run
    of that slice alone with its seed."""
    t0 = time.perf_counter()
    n_slices = len(job.crops)
    try:  # each slice is resampled when its batch starts, not all before the first frame
        prepared = LazySequence(lambda pos: _slice_inputs(job, pos, job.crops[pos]), n_slices)

        def part(get: Any) -> LazySequence:
            return LazySequence(lambda pos: get(prepared[pos]), n_slices)

        common = {k: v for k, v in prepared[0][1].items() if k in ("temperature", "units")}
        priors = None if job.priors is None else part(lambda p: p[1]["prior"])
        constraints = (None if job.constraints is None
                       else part(lambda p: p[1].get("constraints")))
        stream = job.model.sample_slices(
            part(lambda p: p[0]), job.n, job.steps,
            [job.seed + off for off in job.seed_offsets], priors=priors,
            constraints=constraints, cancel=job.cancel, **common)
    except Exception as exc:  # noqa: BLE001 - reported to the user
        raise SamplingError(str(exc)) from exc
    last: dict[int, tuple[Any, bool]] = {}  # slice → (its last frame, whether it was pushed)
    pacer, burst = _Pacer(job), False
    n_steps = 0
    while True:
        try:
            sf = next(stream)
        except StopIteration:
            break
        except Exception as exc:  # noqa: BLE001
            raise SamplingError(f"{type(exc).__name__}: {exc}") from exc
        pos, frame = sf.slice_index, sf.frame
        n_steps = frame.n_steps
        if job.recorder is not None:
            if pos not in job.recorder.images:
                job.recorder.set_image(pos, prepared[pos][0])
            job.recorder.add(pos, frame)
        now = time.perf_counter()
        if pos == sf.batch[0]:  # a batch's frames of one step are pushed together, or not
            burst = pacer.due(now)
        upd = Update(pos, n_slices, frame.step, frame.n_steps, frame.t, now - t0, frame.final)
        push = frame.final or frame.step == 0 or burst
        if push:
            _, _, how, fixed = prepared[pos]
            _fill(upd, frame, how, fixed)
            pacer.pushed()
        last[pos] = (frame, push)
        yield upd
    results = stream.results or []
    cancelled = stream.cancelled
    if cancelled:  # bring each unfinished slice's layers to its last completed step
        for pos, (frame, pushed) in sorted(last.items()):
            if not pushed:
                _, _, how, fixed = prepared[pos]
                yield _fill(Update(pos, n_slices, frame.step, frame.n_steps, frame.t,
                                   time.perf_counter() - t0, False, catch_up=True),
                            frame, how, fixed)
    presences = [r.presence for r in results if r.presence is not None]
    return Outcome(cancelled, sum(not r.cancelled for r in results), n_slices,
                   sum(r.steps_done for r in results), n_steps, time.perf_counter() - t0,
                   results[0].device if results else "",
                   sum(presences) / len(presences) if presences else None)


def _run_each(job: Job) -> Generator[Update, None, Outcome]:
    """Each crop in turn, one run per crop."""
    t0 = time.perf_counter()
    n_slices = len(job.crops)
    pacer = _Pacer(job)
    cancelled = False
    slices_done = 0
    steps_done = 0
    n_steps = 0
    device = ""
    presences: list[float] = []
    for pos, (crop, off) in enumerate(zip(job.crops, job.seed_offsets)):
        if job.cancel.is_set():
            cancelled = True
            break
        try:
            crop, extra, how, fixed = _slice_inputs(job, pos, crop)
            stream = job.model.sample(crop, job.n, job.steps, job.seed + off,
                                      cancel=job.cancel, **extra)
        except Exception as exc:  # noqa: BLE001 - reported to the user
            raise SamplingError(str(exc)) from exc
        last_frame, last_pushed = None, True
        if job.recorder is not None:
            job.recorder.set_image(pos, crop)
        while True:
            try:
                frame = next(stream)
            except StopIteration as stop:
                result = stop.value
                break
            except Exception as exc:  # noqa: BLE001
                raise SamplingError(f"{type(exc).__name__}: {exc}") from exc
            n_steps = frame.n_steps
            if job.recorder is not None:
                job.recorder.add(pos, frame)
            now = time.perf_counter()
            upd = Update(pos, n_slices, frame.step, frame.n_steps, frame.t, now - t0,
                         frame.final)
            push = frame.final or frame.step == 0 or pacer.due(now)
            if push:
                _fill(upd, frame, how, fixed)
                pacer.pushed()
            last_frame, last_pushed = frame, push
            yield upd
        steps_done += result.steps_done
        device = result.device
        if result.presence is not None:
            presences.append(result.presence)
        if result.cancelled:
            cancelled = True
            if last_frame is not None and not last_pushed:
                # bring the layers to the last completed step, all of them from one frame
                yield _fill(Update(pos, n_slices, last_frame.step, last_frame.n_steps,
                                   last_frame.t, time.perf_counter() - t0, False,
                                   catch_up=True), last_frame, how, fixed)
            break
        slices_done += 1
    return Outcome(cancelled, slices_done, n_slices, steps_done, n_steps,
                   time.perf_counter() - t0, device,
                   sum(presences) / len(presences) if presences else None)
