"""The shared thread policy of the CLI and the widget."""

from __future__ import annotations

import os

import pytest
import torch

from napari_berdiff import threads


def test_explicit_counts_are_used_and_bad_ones_refused():
    assert threads.resolve_threads(1) == 1
    assert threads.resolve_threads("1") == 1
    for bad in (0, -2, "two", 1.5, (os.cpu_count() or 1) + 1):
        with pytest.raises(ValueError, match="'auto' or a whole number"):
            threads.resolve_threads(bad)


def test_auto_leaves_the_cores_other_processes_keep_busy(monkeypatch):
    monkeypatch.setattr(threads, "available_cores", lambda: 4)
    for busy, expected in ((0.0, 4), (0.4, 4), (1.1, 3), (2.6, 1), (7.0, 1)):
        monkeypatch.setattr(threads, "busy_cores", lambda window_s=0.05, b=busy: b)
        assert threads.resolve_threads("auto") == expected
        assert threads.resolve_threads(None) == expected
    monkeypatch.setattr(threads, "busy_cores", lambda window_s=0.05: None)
    assert threads.auto_threads() == 3  # unknown load: leave one core


def test_busy_cores_measures_something_plausible():
    busy = threads.busy_cores(0.02)
    assert busy is None or 0.0 <= busy <= (os.cpu_count() or 1) + 0.5


def test_use_threads_sets_torch():
    before = torch.get_num_threads()
    try:
        assert threads.use_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
