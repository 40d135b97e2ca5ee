"""Readiness of log files, on real files with an injected monotonic clock."""

from __future__ import annotations

import contextlib
import os
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tvm_upload.config import LogDirectory
from tvm_upload.files import FileIdentity
from tvm_upload.stability import MCAP_MAGIC, StabilityTracker

STABLE_SECONDS = 60.0


class FakeClock:
    """A clock that moves only when the test advances it."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def directory(tmp_path: Path) -> LogDirectory:
    root = tmp_path / "logs"
    root.mkdir()
    return LogDirectory(path=root, source="logs")


@pytest.fixture
def tracker(clock: FakeClock) -> StabilityTracker:
    # The wall clock is real, so files written by the test are fresh, not old.
    return StabilityTracker(STABLE_SECONDS, clock=clock)


def write(path: Path, data: bytes, *, append: bool = False) -> Path:
    with open(path, "ab" if append else "wb") as f:
        f.write(data)
    return path


def make_old(path: Path, age_seconds: float) -> None:
    then = time.time() - age_seconds
    os.utime(path, (then, then))


def mcap_bytes(*, closed: bool) -> bytes:
    """A minimal MCAP file: magic, header record, and (if closed) footer record and magic."""
    header_content = struct.pack("<I", 4) + b"ros2" + struct.pack("<I", 0)
    data = MCAP_MAGIC + struct.pack("<BQ", 0x01, len(header_content)) + header_content
    if closed:
        data += struct.pack("<BQ", 0x02, 20) + struct.pack("<QQI", 0, 0, 0) + MCAP_MAGIC
    return data


def test_new_file_ready_after_quiet_period(
    tracker: StabilityTracker, clock: FakeClock, directory: LogDirectory
) -> None:
    path = write(directory.path / "a.log", b"hello")
    tracker.observe(path, directory)

    clock.advance(STABLE_SECONDS - 1)
    assert tracker.poll() == []

    clock.advance(1)
    ready = tracker.poll()
    assert [r.path for r in ready] == [path]
    assert ready[0].directory == directory
    assert ready[0].identity == FileIdentity.of(path)
    assert len(tracker) == 0


def test_change_restarts_quiet_period(
    tracker: StabilityTracker, clock: FakeClock, directory: LogDirectory
) -> None:
    path = write(directory.path / "a.log", b"one")
    tracker.observe(path, directory)

    clock.advance(STABLE_SECONDS - 1)
    write(path, b"two", append=True)
    assert tracker.poll() == []

    clock.advance(STABLE_SECONDS - 1)
    assert tracker.poll() == []

    clock.advance(1)
    ready = tracker.poll()
    assert [r.path for r in ready] == [path]
    assert ready[0].identity.size == 6


def test_observe_of_changed_file_restarts(
    tracker: StabilityTracker, clock: FakeClock, directory: LogDirectory
) -> None:
    path = write(directory.path / "a.log", b"one")
    tracker.observe(path, directory)
    clock.advance(STABLE_SECONDS - 1)

    write(path, b"two", append=True)
    tracker.observe(path, directory)
    clock.advance(1)

    assert tracker.poll() == []


def test_repeated_observe_keeps_quiet_period(
    tracker: StabilityTracker, clock: FakeClock, directory: LogDirectory
) -> None:
    path = write(directory.path / "a.log", b"one")
    tracker.observe(path, directory)
    clock.advance(STABLE_SECONDS - 1)

    tracker.observe(path, directory)
    clock.advance(1)

    assert [r.path for r in tracker.poll()] == [path]


def test_replaced_file_restarts_quiet_period(
    tracker: StabilityTracker, clock: FakeClock, directory: LogDirectory
) -> None:
    path = write(directory.path / "a.log", b"same")
    tracker.observe(path, directory)
    clock.advance(STABLE_SECONDS - 1)

    replacement = write(directory.path / "a.log.new", b"same")
    stat_before = os.stat(path)
    os.utime(replacement, ns=(stat_before.st_atime_ns, stat_before.st_mtime_ns))
    os.replace(replacement, path)
    clock.advance(1)

    assert tracker.poll() == []


def test_vanished_file_dropped(
    tracker: StabilityTracker, clock: FakeClock, directory: LogDirectory
) -> None:
    path = write(directory.path / "a.log", b"data")
    tracker.observe(path, directory)
    path.unlink()
    clock.advance(STABLE_SECONDS)

    assert tracker.poll() == []
    assert len(tracker) == 0


def test_missing_file_not_tracked(tracker: StabilityTracker, directory: LogDirectory) -> None:
    tracker.observe(directory.path / "never-written.log", directory)

    assert len(tracker) == 0


def test_symlink_not_tracked(tracker: StabilityTracker, directory: LogDirectory) -> None:
    target = write(directory.path.parent / "outside.log", b"secret")
    link = directory.path / "link.log"
    link.symlink_to(target)

    tracker.observe(link, directory)

    assert len(tracker) == 0


def test_file_replaced_by_symlink_dropped(
    tracker: StabilityTracker, clock: FakeClock, directory: LogDirectory
) -> None:
    path = write(directory.path / "a.log", b"data")
    tracker.observe(path, directory)
    path.unlink()
    path.symlink_to(write(directory.path.parent / "outside.log", b"data"))
    clock.advance(STABLE_SECONDS)

    assert tracker.poll() == []
    assert len(tracker) == 0


def test_old_unchanged_file_ready_at_first_poll(
    tracker: StabilityTracker, directory: LogDirectory
) -> None:
    path = write(directory.path / "old.log", b"yesterday")
    make_old(path, 86400)
    tracker.observe(path, directory)

    assert [r.path for r in tracker.poll()] == [path]


def test_old_file_changed_before_poll_waits(
    tracker: StabilityTracker, clock: FakeClock, directory: LogDirectory
) -> None:
    path = write(directory.path / "old.log", b"yesterday")
    make_old(path, 86400)
    tracker.observe(path, directory)

    write(path, b" and today", append=True)
    assert tracker.poll() == []

    clock.advance(STABLE_SECONDS)
    assert [r.path for r in tracker.poll()] == [path]


def test_future_mtime_not_treated_as_old(
    tracker: StabilityTracker, clock: FakeClock, directory: LogDirectory
) -> None:
    path = write(directory.path / "future.log", b"tomorrow")
    make_old(path, -86400)
    tracker.observe(path, directory)

    assert tracker.poll() == []

    clock.advance(STABLE_SECONDS)
    assert [r.path for r in tracker.poll()] == [path]


def test_old_by_wall_clock_uses_injected_clock(clock: FakeClock, directory: LogDirectory) -> None:
    path = write(directory.path / "a.log", b"data")
    mtime = os.stat(path).st_mtime
    tracker = StabilityTracker(STABLE_SECONDS, clock=clock, wall_clock=lambda: mtime + 61)

    tracker.observe(path, directory)

    assert [r.path for r in tracker.poll()] == [path]


def test_closed_mcap_ready_early(
    tracker: StabilityTracker, clock: FakeClock, directory: LogDirectory
) -> None:
    path = write(directory.path / "run_0.mcap", mcap_bytes(closed=True))
    tracker.observe(path, directory)
    clock.advance(1)

    assert [r.path for r in tracker.poll()] == [path]


def test_upper_case_mcap_suffix_ready_early(
    tracker: StabilityTracker, directory: LogDirectory
) -> None:
    path = write(directory.path / "RUN_0.MCAP", mcap_bytes(closed=True))
    tracker.observe(path, directory)

    assert [r.path for r in tracker.poll()] == [path]


def test_open_mcap_waits(
    tracker: StabilityTracker, clock: FakeClock, directory: LogDirectory
) -> None:
    path = write(directory.path / "run_0.mcap", mcap_bytes(closed=False) + b"\x05" * 100)
    tracker.observe(path, directory)
    clock.advance(1)

    assert tracker.poll() == []


def test_mcap_with_only_leading_magic_waits(
    tracker: StabilityTracker, clock: FakeClock, directory: LogDirectory
) -> None:
    path = write(directory.path / "run_0.mcap", MCAP_MAGIC)
    tracker.observe(path, directory)
    clock.advance(1)

    assert tracker.poll() == []


def test_mcap_magic_without_footer_waits(
    tracker: StabilityTracker, clock: FakeClock, directory: LogDirectory
) -> None:
    path = write(
        directory.path / "run_0.mcap", mcap_bytes(closed=False) + b"\x00" * 64 + MCAP_MAGIC
    )
    tracker.observe(path, directory)
    clock.advance(1)

    assert tracker.poll() == []


def test_mcap_closed_while_polled_needs_unchanged_poll(
    tracker: StabilityTracker, clock: FakeClock, directory: LogDirectory
) -> None:
    open_part = mcap_bytes(closed=False)
    path = write(directory.path / "run_0.mcap", open_part)
    tracker.observe(path, directory)
    assert tracker.poll() == []

    write(path, mcap_bytes(closed=True)[len(open_part) :], append=True)
    clock.advance(1)
    assert tracker.poll() == []

    clock.advance(1)
    assert [r.path for r in tracker.poll()] == [path]


def test_mcap_magic_on_other_suffix_ignored(
    tracker: StabilityTracker, clock: FakeClock, directory: LogDirectory
) -> None:
    path = write(directory.path / "run_0.bin", mcap_bytes(closed=True))
    tracker.observe(path, directory)
    clock.advance(1)

    assert tracker.poll() == []


def test_sample_mcap_ready_early(
    tracker: StabilityTracker, directory: LogDirectory, shared_dir: Path
) -> None:
    samples = sorted((shared_dir / "data").rglob("*.mcap"))
    if not samples:
        pytest.skip("no sample MCAP files in the shared data")
    path = write(directory.path / "sample.mcap", samples[0].read_bytes())
    tracker.observe(path, directory)

    assert [r.path for r in tracker.poll()] == [path]


def test_forget_len_and_tracked(tracker: StabilityTracker, directory: LogDirectory) -> None:
    first = write(directory.path / "a.log", b"a")
    second = write(directory.path / "b.log", b"b")
    tracker.observe(first, directory)
    tracker.observe(second, directory)
    assert len(tracker) == 2
    assert tracker.tracked() == [first, second]

    tracker.forget(first)
    tracker.forget(directory.path / "unknown.log")

    assert len(tracker) == 1
    assert tracker.tracked() == [second]


def test_negative_stable_seconds_rejected() -> None:
    with pytest.raises(ValueError, match="stable_seconds"):
        StabilityTracker(-1)


def test_shorter_stable_seconds_applies_to_tracked(
    tracker: StabilityTracker, clock: FakeClock, directory: LogDirectory
) -> None:
    path = write(directory.path / "a.log", b"data")
    tracker.observe(path, directory)
    clock.advance(10)

    tracker.stable_seconds = 10

    assert tracker.stable_seconds == 10
    assert [r.path for r in tracker.poll()] == [path]


@contextlib.contextmanager
def appending(path: Path, interval_seconds: float) -> Iterator[None]:
    """Append a line to ``path`` every ``interval_seconds`` on a thread while the block runs."""
    stopped = threading.Event()

    def append_lines() -> None:
        while not stopped.is_set():
            write(path, b"line\n", append=True)
            stopped.wait(interval_seconds)

    thread = threading.Thread(target=append_lines, name="appender")
    thread.start()
    try:
        yield
    finally:
        stopped.set()
        thread.join()


@pytest.fixture
def appended_file(directory: LogDirectory) -> Iterator[Path]:
    yield write(directory.path / "growing.log", b"")


def test_appended_file_never_ready_fake_clock(
    clock: FakeClock, directory: LogDirectory, appended_file: Path
) -> None:
    # Given a 1 s quiet period and a fake clock moving about as fast as real time,
    tracker = StabilityTracker(1.0, clock=clock)
    tracker.observe(appended_file, directory)

    # when a writer appends every 0.2 s for 1.5 s,
    with appending(appended_file, 0.2):
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            clock.advance(0.05)
            assert tracker.poll() == []
            time.sleep(0.05)

    # then the file is ready only after the writer stopped, with its final content.
    clock.advance(1.0)
    ready = tracker.poll()
    assert [r.path for r in ready] == [appended_file]
    assert ready[0].identity == FileIdentity.of(appended_file)


def test_appended_file_never_ready_real_clock(directory: LogDirectory, appended_file: Path) -> None:
    tracker = StabilityTracker(1.0)
    tracker.observe(appended_file, directory)

    with appending(appended_file, 0.2):
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            assert tracker.poll() == []
            time.sleep(0.05)

    final_identity = FileIdentity.of(appended_file)
    deadline = time.monotonic() + 3.0
    ready = tracker.poll()
    while not ready and time.monotonic() < deadline:
        time.sleep(0.05)
        ready = tracker.poll()
    assert [r.identity for r in ready] == [final_identity]
