"""Readiness checks: the per-file cost of ``StabilityTracker`` on real files."""

from __future__ import annotations

from pathlib import Path

import pytest

from tvm_upload.config import LogDirectory
from tvm_upload.stability import StabilityTracker

pytestmark = pytest.mark.microbench

FILE_COUNT = 1000


class FixedClock:
    """A clock that stays where the test puts it."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_poll_unchanged_files_not_yet_ready(benchmark, log_tree) -> None:  # type: ignore[no-untyped-def]
    """One poll over 1,000 tracked files whose quiet period has not passed (one lstat each)."""
    directory, paths = log_tree
    clock = FixedClock(100.0)
    tracker = StabilityTracker(60, clock=clock, wall_clock=FixedClock(0.0))
    for path in paths:
        tracker.observe(path, directory)

    ready = benchmark(tracker.poll)

    assert ready == []
    assert len(tracker) == FILE_COUNT
    benchmark.extra_info["files_per_call"] = FILE_COUNT


def test_observe_and_poll_old_files(benchmark, log_tree) -> None:  # type: ignore[no-untyped-def]
    """Observe 1,000 old files and poll them ready, as a startup scan does."""
    directory, paths = log_tree
    tracker = StabilityTracker(60)

    def observe_and_poll() -> int:
        for path in paths:
            tracker.observe(path, directory)
        return len(tracker.poll())

    ready_count = benchmark(observe_and_poll)

    assert ready_count == FILE_COUNT
    benchmark.extra_info["files_per_call"] = FILE_COUNT


def test_observe_tracked_unchanged_file(benchmark, log_tree) -> None:  # type: ignore[no-untyped-def]
    """A repeated inotify event for a file already tracked and unchanged."""
    directory, paths = log_tree
    tracker = StabilityTracker(60, wall_clock=FixedClock(0.0))
    tracker.observe(paths[0], directory)

    benchmark(tracker.observe, paths[0], directory)

    assert len(tracker) == 1


def test_poll_closed_mcap_file(benchmark, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Poll of a young ``.mcap`` file that ends with the footer and end magic (ready early)."""
    magic = b"\x89MCAP0\r\n"
    footer = bytes([0x02]) + (20).to_bytes(8, "little") + bytes(20)
    path = tmp_path / "bags" / "run_0.mcap"
    path.parent.mkdir()
    path.write_bytes(magic + b"\x00" * 4096 + footer + magic)
    directory = LogDirectory(path=tmp_path / "bags", source="bags")
    tracker = StabilityTracker(60)

    def observe_and_poll() -> int:
        tracker.observe(path, directory)
        return len(tracker.poll())

    ready_count = benchmark(observe_and_poll)

    assert ready_count == 1
