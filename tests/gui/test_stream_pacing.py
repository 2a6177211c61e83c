"""How often the worker hands frames to the layers: the interval, and the cap on the main
thread's time spent showing them (no viewer; times are passed in, not measured)."""

from __future__ import annotations

import pytest

from napari_berdiff._qt._run import Job, _Pacer, push_due


@pytest.mark.parametrize(
    ("elapsed", "interval", "cost", "max_busy", "due"),
    [
        (0.10, 0.1, 0.0, 0.25, True),     # cheap frames: the interval alone
        (0.09, 0.1, 0.0, 0.25, False),
        (0.39, 0.1, 0.1, 0.25, False),    # 100 ms to show a frame: at most one per 400 ms
        (0.40, 0.1, 0.1, 0.25, True),
        (0.15, 0.1, 0.1, 0.0, True),      # no cap
        (0.0, 0.0, 5.0, 0.25, True),      # interval 0: every frame, whatever it costs
        (1.0, 2.0, 0.1, 0.25, False),     # the cap never shortens the interval
    ],
)
def test_push_due_keeps_the_interval_and_caps_the_main_threads_share(
        elapsed, interval, cost, max_busy, due):
    assert push_due(elapsed, 0.0, interval, cost, max_busy) is due


def test_the_pacer_measures_the_cost_from_push_to_consumed_and_waits_for_consumption():
    job = Job(model=None, crops=[], seed_offsets=[], n=1, steps=1, seed=0, interval_s=0.1)
    pacer = _Pacer(job)
    assert pacer.due(0.0)  # nothing pushed yet
    pacer.pushed()
    t0 = pacer.last_push
    assert not pacer.due(t0 + 10.0)  # not consumed yet: never due
    job.consumed_at = t0 + 0.2        # shown 200 ms after the push
    job.consumed.set()
    assert not pacer.due(t0 + 0.79)   # 0.2 / 0.25 = 0.8 s between pushes
    assert pacer.cost == pytest.approx(0.2)
    assert pacer.due(t0 + 0.81)


def test_mark_consumed_records_when():
    job = Job(model=None, crops=[], seed_offsets=[], n=1, steps=1, seed=0)
    job.consumed.clear()
    job.mark_consumed()
    assert job.consumed.is_set() and job.consumed_at > 0
