"""Watcher and scan on real files with real inotify under tmp_path."""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from watchdog.events import EventsLostEvent
from watchdog.observers import inotify_c
from watchdog.observers.inotify import InotifyObserver

from tvm_upload import scan as scan_module
from tvm_upload.config import LogDirectory
from tvm_upload.scan import scan
from tvm_upload.watcher import WATCH_RETRY_SECONDS, Watcher

EVENT_TIMEOUT_SECONDS = 5.0


class Recorder:
    """Collect ``on_event`` calls from watchdog's threads and wait for them."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self.events: list[tuple[Path, LogDirectory]] = []

    def __call__(self, path: Path, directory: LogDirectory) -> None:
        with self._condition:
            self.events.append((path, directory))
            self._condition.notify_all()

    def paths(self) -> set[Path]:
        with self._condition:
            return {path for path, _ in self.events}

    def wait_for(self, *paths: Path) -> None:
        expected = set(paths)
        with self._condition:
            found = self._condition.wait_for(
                lambda: expected <= {path for path, _ in self.events}, EVENT_TIMEOUT_SECONDS
            )
        assert found, f"not reported: {sorted(expected - self.paths())}"

    def clear(self) -> None:
        with self._condition:
            self.events.clear()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def log_directory(path: Path, source: str = "logs", **settings: Any) -> LogDirectory:
    return LogDirectory(path=path, source=source, **settings)


def write(path: Path, data: bytes = b"data\n") -> Path:
    with open(path, "wb") as f:
        f.write(data)
    return path


def sentinel(root: Path, recorder: Recorder, name: str = "sentinel.log") -> None:
    """Write a file and wait for its report; inotify delivers events of one instance in order."""
    recorder.wait_for(write(root / name))


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "logs"
    path.mkdir()
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "outside"
    path.mkdir()
    return path


StartWatcher = Callable[..., Watcher]


@pytest.fixture
def start_watcher(recorder: Recorder) -> Iterator[StartWatcher]:
    """Start watchers for a test, stop them afterwards and fail if a thread was left behind."""
    threads_before = set(threading.enumerate())
    watchers: list[Watcher] = []

    def start(directories: list[LogDirectory], **options: Any) -> Watcher:
        watcher = Watcher(directories, recorder, **options)
        watchers.append(watcher)
        watcher.start()
        return watcher

    yield start

    for watcher in watchers:
        watcher.stop()
    leaked = [t.name for t in set(threading.enumerate()) - threads_before if t.is_alive()]
    assert leaked == []


def test_created_file_reported(start_watcher: StartWatcher, recorder: Recorder, root: Path) -> None:
    directory = log_directory(root)
    start_watcher([directory])

    path = write(root / "a.log")

    recorder.wait_for(path)
    assert (path, directory) in recorder.events


def test_reading_a_file_reports_nothing(
    start_watcher: StartWatcher, recorder: Recorder, root: Path
) -> None:
    """Given a watched file, when it is opened, read and closed without writing, as the
    uploader does, then no event is reported for it. Only the later sentinel file is."""
    path = write(root / "a.log", b"line\n" * 1000)
    start_watcher([log_directory(root)])

    for _ in range(3):
        with open(path, "rb") as handle:
            handle.read()
    sentinel(root, recorder)

    assert recorder.paths() == {root / "sentinel.log"}


def test_file_written_then_closed_reported(
    start_watcher: StartWatcher, recorder: Recorder, root: Path
) -> None:
    start_watcher([log_directory(root)])
    path = root / "a.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    recorder.wait_for(path)
    recorder.clear()

    os.write(fd, b"payload")
    os.close(fd)

    recorder.wait_for(path)


def test_append_to_existing_file_reported(
    start_watcher: StartWatcher, recorder: Recorder, root: Path
) -> None:
    path = write(root / "a.log")
    start_watcher([log_directory(root)])

    with open(path, "ab") as f:
        f.write(b"more\n")

    recorder.wait_for(path)


def test_existing_files_not_reported_at_start(
    start_watcher: StartWatcher, recorder: Recorder, root: Path
) -> None:
    old = write(root / "old.log")
    start_watcher([log_directory(root)])

    sentinel(root, recorder)

    assert old not in recorder.paths()


def test_file_renamed_into_tree_reported(
    start_watcher: StartWatcher, recorder: Recorder, root: Path, outside: Path
) -> None:
    start_watcher([log_directory(root)])
    source = write(outside / "rotated.log")

    destination = root / "rotated.log"
    os.rename(source, destination)

    recorder.wait_for(destination)
    assert source not in recorder.paths()


def test_atomic_writer_reports_final_name_only(
    start_watcher: StartWatcher, recorder: Recorder, root: Path
) -> None:
    start_watcher([log_directory(root)])
    temporary = write(root / "state.json.tmp", b"{}")

    final = root / "state.json"
    os.rename(temporary, final)

    recorder.wait_for(final)
    assert temporary not in recorder.paths()


def test_new_subdirectory_files_reported(
    start_watcher: StartWatcher, recorder: Recorder, root: Path
) -> None:
    start_watcher([log_directory(root)])

    run = root / "2026-12-04-09-00-00" / "nested"
    run.mkdir(parents=True)
    path = write(run / "launch.log")

    recorder.wait_for(path)


def test_directory_moved_in_reported_whole(
    start_watcher: StartWatcher, recorder: Recorder, root: Path, outside: Path, tmp_path: Path
) -> None:
    start_watcher([log_directory(root)])
    run = outside / "run"
    (run / "deep").mkdir(parents=True)
    top = write(run / "a.log")
    deep = write(run / "deep" / "b.log")
    (run / "escape.log").symlink_to(write(tmp_path / "secret.log"))

    os.rename(run, root / "run")

    recorder.wait_for(root / "run" / "a.log", root / "run" / "deep" / "b.log")
    sentinel(root, recorder)
    assert top not in recorder.paths()
    assert deep not in recorder.paths()
    assert root / "run" / "escape.log" not in recorder.paths()


def test_directory_renamed_inside_tree_reported(
    start_watcher: StartWatcher, recorder: Recorder, root: Path
) -> None:
    (root / "current").mkdir()
    write(root / "current" / "a.log")
    start_watcher([log_directory(root)])

    os.rename(root / "current", root / "finished")

    recorder.wait_for(root / "finished" / "a.log")


def test_missing_root_watched_once_it_appears(
    start_watcher: StartWatcher, recorder: Recorder, tmp_path: Path
) -> None:
    root = tmp_path / "later" / "logs"
    watcher = start_watcher([log_directory(root)])
    watcher.poll()

    root.mkdir(parents=True)
    existing = write(root / "early.log")
    watcher.poll()
    recorder.wait_for(existing)

    later = write(root / "later.log")
    recorder.wait_for(later)


def test_root_recreated_watched_again(
    start_watcher: StartWatcher, recorder: Recorder, root: Path
) -> None:
    watcher = start_watcher([log_directory(root)])
    write(root / "a.log")
    recorder.wait_for(root / "a.log")

    (root / "a.log").unlink()
    root.rmdir()
    watcher.poll()
    root.mkdir()
    watcher.poll()

    path = write(root / "b.log")
    recorder.wait_for(path)


def test_root_replaced_between_polls_watched_again(
    start_watcher: StartWatcher, recorder: Recorder, root: Path
) -> None:
    watcher = start_watcher([log_directory(root)])
    watcher.poll()

    root.rmdir()
    root.mkdir()
    path = write(root / "b.log")

    deadline = time.monotonic() + EVENT_TIMEOUT_SECONDS
    while path not in recorder.paths() and time.monotonic() < deadline:
        watcher.poll()
        time.sleep(0.01)
    assert path in recorder.paths()

    recorder.clear()
    later = write(root / "c.log")
    recorder.wait_for(later)


def test_non_recursive_root_reports_direct_children(
    start_watcher: StartWatcher, recorder: Recorder, root: Path
) -> None:
    (root / "sub").mkdir()
    start_watcher([log_directory(root, recursive=False)])

    nested = write(root / "sub" / "nested.log")
    (root / "moved").mkdir()
    top = write(root / "top.log")

    recorder.wait_for(top)
    sentinel(root, recorder)
    assert nested not in recorder.paths()


def test_pattern_and_exclude_honoured(
    start_watcher: StartWatcher, recorder: Recorder, root: Path
) -> None:
    directory = log_directory(root, pattern=["*.log", "*.mcap"], exclude=["*.active", "skip*"])
    start_watcher([directory])

    wanted = write(root / "run.mcap")
    write(root / "notes.txt")
    write(root / "run.mcap.active")
    write(root / "skip-me.log")
    write(root / ".hidden.log")

    recorder.wait_for(wanted)
    sentinel(root, recorder)
    assert recorder.paths() == {wanted, root / "sentinel.log", root / ".hidden.log"}


def test_symlink_to_outside_file_not_reported(
    start_watcher: StartWatcher, recorder: Recorder, root: Path, outside: Path
) -> None:
    target = write(outside / "secret.log")
    start_watcher([log_directory(root)])

    link = root / "link.log"
    link.symlink_to(target)
    write(target, b"changed\n")

    sentinel(root, recorder)
    assert link not in recorder.paths()
    assert target not in recorder.paths()


def test_symlinked_directory_not_followed(
    start_watcher: StartWatcher, recorder: Recorder, root: Path, outside: Path
) -> None:
    (root / "real").mkdir()
    (root / "alias").symlink_to(root / "real")
    (root / "elsewhere").symlink_to(outside)
    start_watcher([log_directory(root)])

    inside = write(root / "real" / "a.log")
    write(outside / "b.log")

    recorder.wait_for(inside)
    sentinel(root, recorder)
    assert recorder.paths() == {inside, root / "sentinel.log"}


def test_file_moved_out_needs_nothing(
    start_watcher: StartWatcher, recorder: Recorder, root: Path, outside: Path
) -> None:
    path = write(root / "a.log")
    start_watcher([log_directory(root)])

    os.rename(path, outside / "a.log")

    sentinel(root, recorder)
    assert recorder.paths() == {root / "sentinel.log"}


def test_odd_names_reported(start_watcher: StartWatcher, recorder: Recorder, root: Path) -> None:
    start_watcher([log_directory(root)])
    names = ["with space.log", "new\nline.log", "100%.log", "a+b.log", "日志 ünï.log"]

    paths = [write(root / name) for name in names]
    raw_name = b"raw-\xff.log"
    fd = os.open(os.fsencode(root) + b"/" + raw_name, os.O_WRONLY | os.O_CREAT)
    os.close(fd)

    recorder.wait_for(*paths, root / os.fsdecode(raw_name))


def test_symlinked_root_reported_under_configured_path(
    start_watcher: StartWatcher, recorder: Recorder, tmp_path: Path, outside: Path
) -> None:
    configured = tmp_path / "configured"
    configured.symlink_to(outside)
    start_watcher([log_directory(configured)])

    write(outside / "a.log")

    recorder.wait_for(configured / "a.log")
    assert outside / "a.log" not in recorder.paths()


def test_two_roots_report_their_directory(
    start_watcher: StartWatcher, recorder: Recorder, tmp_path: Path
) -> None:
    first = log_directory(tmp_path / "ros", source="ros")
    second = log_directory(tmp_path / "syslog", source="syslog")
    first.path.mkdir()
    second.path.mkdir()
    start_watcher([first, second])

    write(first.path / "a.log")
    write(second.path / "b.log")

    recorder.wait_for(first.path / "a.log", second.path / "b.log")
    assert (first.path / "a.log", first) in recorder.events
    assert (second.path / "b.log", second) in recorder.events


def test_update_adds_and_removes_roots(
    start_watcher: StartWatcher, recorder: Recorder, tmp_path: Path
) -> None:
    first = log_directory(tmp_path / "first", source="first")
    second = log_directory(tmp_path / "second", source="second")
    first.path.mkdir()
    second.path.mkdir()
    watcher = start_watcher([first])

    watcher.update([second])
    write(first.path / "dropped.log")
    added = write(second.path / "added.log")

    recorder.wait_for(added)
    sentinel(second.path, recorder)
    assert first.path / "dropped.log" not in recorder.paths()


def test_update_applies_changed_pattern(
    start_watcher: StartWatcher, recorder: Recorder, root: Path
) -> None:
    watcher = start_watcher([log_directory(root, pattern=["*.log"])])

    watcher.update([log_directory(root, pattern=["*.txt"])])
    path = write(root / "notes.txt")

    recorder.wait_for(path)


def test_failing_callback_does_not_stop_watcher(
    recorder: Recorder, root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def on_event(path: Path, directory: LogDirectory) -> None:
        if path.name == "bad.log":
            raise RuntimeError("queue is broken")
        recorder(path, directory)

    watcher = Watcher([log_directory(root)], on_event)
    watcher.start()
    try:
        write(root / "bad.log")
        good = write(root / "good.log")
        recorder.wait_for(good)
    finally:
        watcher.stop()

    assert "bad.log" in caplog.text


def test_stop_leaves_no_watchdog_threads(recorder: Recorder, root: Path) -> None:
    threads_before = set(threading.enumerate())
    watcher = Watcher([log_directory(root)], recorder)
    watcher.start()
    sentinel(root, recorder)
    assert set(threading.enumerate()) - threads_before

    watcher.stop()

    assert [t for t in set(threading.enumerate()) - threads_before if t.is_alive()] == []
    assert logging.getLogger("watchdog.observers.inotify").filters == []


class ExhaustedObserver(InotifyObserver):
    """An inotify observer that rejects some paths as if the watch limit were reached."""

    def __init__(self, rejected_paths: set[str]) -> None:
        super().__init__()
        self.rejected_paths = rejected_paths

    def schedule(self, event_handler: Any, path: Any, **options: Any) -> Any:
        if os.fspath(path) in self.rejected_paths:
            raise OSError(errno.ENOSPC, "inotify watch limit reached")
        return super().schedule(event_handler, path, **options)


def test_watch_limit_falls_back_to_scanning(
    start_watcher: StartWatcher,
    recorder: Recorder,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given two roots that inotify rejects and one it accepts,
    scanned = [log_directory(tmp_path / name, source=name) for name in ("a", "b")]
    accepted = log_directory(tmp_path / "c", source="c")
    for directory in [*scanned, accepted]:
        directory.path.mkdir()
    existing = write(scanned[0].path / "existing.log")
    clock = FakeClock()
    rejected_paths = {os.fspath(d.path) for d in scanned}
    watcher = start_watcher(
        [*scanned, accepted],
        observer_factory=lambda: ExhaustedObserver(rejected_paths),
        clock=clock,
        fallback_scan_seconds=10.0,
    )

    # when files appear in all of them,
    new = write(scanned[0].path / "new.log")
    nested = scanned[1].path / "run" / "b.log"
    nested.parent.mkdir()
    write(nested)
    watched = write(accepted.path / "c.log")
    recorder.wait_for(watched)
    watcher.poll()
    assert recorder.paths() == {watched}

    # then scans find the new files once the scan interval has passed,
    clock.now += 10.0
    watcher.poll()
    assert recorder.paths() == {watched, new, nested}

    # and unchanged files are not reported again.
    recorder.clear()
    clock.now += 10.0
    watcher.poll()
    assert recorder.paths() == set()
    assert existing not in recorder.paths()

    limit_warnings = [r for r in caplog.records if "fs.inotify.max_user_watches" in r.message]
    assert len(limit_warnings) == 1
    assert limit_warnings[0].levelno == logging.WARNING
    assert "sysctl -w fs.inotify.max_user_watches=" in limit_warnings[0].message


def test_scanned_root_reports_changed_file(
    start_watcher: StartWatcher, recorder: Recorder, root: Path
) -> None:
    path = write(root / "a.log")
    clock = FakeClock()
    watcher = start_watcher(
        [log_directory(root)],
        observer_factory=lambda: ExhaustedObserver({os.fspath(root)}),
        clock=clock,
    )

    with open(path, "ab") as f:
        f.write(b"more\n")
    clock.now += 60.0
    watcher.poll()

    assert recorder.paths() == {path}


def test_watching_retried_after_limit(
    start_watcher: StartWatcher, recorder: Recorder, root: Path
) -> None:
    rejected_paths = {os.fspath(root)}
    clock = FakeClock()
    watcher = start_watcher(
        [log_directory(root)],
        observer_factory=lambda: ExhaustedObserver(rejected_paths),
        clock=clock,
    )
    missed = write(root / "during-fallback.log")

    rejected_paths.clear()
    clock.now += WATCH_RETRY_SECONDS
    watcher.poll()
    assert recorder.paths() == {missed}

    path = write(root / "watched.log")
    recorder.wait_for(path)


def test_missing_root_with_limit_reports_existing(
    start_watcher: StartWatcher, recorder: Recorder, tmp_path: Path
) -> None:
    root = tmp_path / "later"
    watcher = start_watcher(
        [log_directory(root)],
        observer_factory=lambda: ExhaustedObserver({os.fspath(root)}),
        clock=FakeClock(),
    )

    root.mkdir()
    path = write(root / "a.log")
    watcher.poll()

    assert recorder.paths() == {path}


def test_subdirectory_watch_limit_falls_back(
    start_watcher: StartWatcher,
    recorder: Recorder,
    root: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Given a kernel that rejects watches on directories named "deep",
    add_watch = inotify_c.inotify_add_watch

    def limited_add_watch(fd: int, path: bytes, mask: int) -> int:
        if path.endswith(b"/deep"):
            ctypes.set_errno(errno.ENOSPC)
            return -1
        return add_watch(fd, path, mask)

    monkeypatch.setattr(inotify_c, "inotify_add_watch", limited_add_watch)
    clock = FakeClock()
    watcher = start_watcher([log_directory(root)], clock=clock, fallback_scan_seconds=5.0)

    # when such a directory appears after start,
    (root / "deep").mkdir()
    sentinel(root, recorder)
    watcher.poll()

    # then the root is scanned instead and the reconciliation flag is set.
    assert watcher.overflowed() is True
    assert watcher.overflowed() is False
    assert "fs.inotify.max_user_watches" in caplog.text
    path = write(root / "deep" / "a.log")
    clock.now += 5.0
    watcher.poll()
    assert path in recorder.paths()


def test_queue_overflow_sets_flag_and_warns_once(
    recorder: Recorder, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directories = [log_directory(tmp_path / name, source=name) for name in ("a", "b")]
    for directory in directories:
        directory.path.mkdir()
    observers: list[InotifyObserver] = []

    def observer_factory() -> InotifyObserver:
        observers.append(InotifyObserver())
        return observers[0]

    watcher = Watcher(directories, recorder, observer_factory=observer_factory)
    watcher.start()
    try:
        assert watcher.overflowed() is False

        # An overflow reaches every watch of the inotify instance.
        for emitter in list(observers[0].emitters):
            emitter.queue_event(EventsLostEvent(emitter.watch.path, is_directory=True))
        sentinel(directories[0].path, recorder)
    finally:
        watcher.stop()

    assert watcher.overflowed() is True
    assert watcher.overflowed() is False
    overflow_warnings = [r for r in caplog.records if "max_queued_events" in r.message]
    assert len(overflow_warnings) == 1


def test_scan_finds_log_files(root: Path, outside: Path) -> None:
    directory = log_directory(root, pattern=["*.log"])
    top = write(root / "a.log")
    (root / "run" / "deep").mkdir(parents=True)
    deep = write(root / "run" / "deep" / "b.log")
    write(root / "notes.txt")
    write(root / "c.log.tmp")
    (root / "link.log").symlink_to(write(outside / "secret.log"))
    (root / "linked-dir").symlink_to(outside)
    os.mkfifo(root / "pipe.log")

    found = list(scan([directory]))

    assert sorted(f.path for f in found) == [top, deep]
    assert all(f.directory == directory for f in found)
    assert {f.path: f.stat.st_size for f in found} == {top: 5, deep: 5}


def test_scan_non_recursive(root: Path) -> None:
    top = write(root / "a.log")
    (root / "sub").mkdir()
    write(root / "sub" / "b.log")

    found = [f.path for f in scan([log_directory(root, recursive=False)])]

    assert found == [top]


def test_scan_skips_files_older_than_min_mtime(root: Path) -> None:
    old = write(root / "old.log")
    two_days_ago = time.time() - 2 * 86400
    os.utime(old, (two_days_ago, two_days_ago))
    new = write(root / "new.log")

    found = [f.path for f in scan([log_directory(root)], min_mtime=time.time() - 3600)]

    assert found == [new]


def test_scan_keeps_files_dated_by_a_dead_rtc(root: Path) -> None:
    wrong_clock = write(root / "written-before-ntp.log")
    os.utime(wrong_clock, (1_000_000_000, 1_000_000_000))

    found = [f.path for f in scan([log_directory(root)], min_mtime=time.time() - 3600)]

    assert found == [wrong_clock]


def test_scan_missing_root_yields_nothing(tmp_path: Path) -> None:
    assert list(scan([log_directory(tmp_path / "absent")])) == []


def test_scan_uses_one_stat_per_file(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # DirEntry.stat does the only lstat; an os.stat or os.lstat call on a file below root fails.
    paths = {write(root / f"{n}.log") for n in range(20)}
    real_stat, real_lstat = os.stat, os.lstat

    def guarded(real: Callable[..., os.stat_result]) -> Callable[..., os.stat_result]:
        def call(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
            if os.fspath(path).startswith(os.fspath(root) + "/"):
                raise AssertionError(f"scan called stat on {path}")
            return real(path, *args, **kwargs)

        return call

    monkeypatch.setattr(os, "stat", guarded(real_stat))
    monkeypatch.setattr(os, "lstat", guarded(real_lstat))
    found = {f.path for f in scan([log_directory(root)])}
    monkeypatch.undo()

    assert found == paths


def test_scan_unreadable_directory_logged_once(
    root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # The tests may run as root, which reads any directory, so the denial is injected.
    (root / "locked").mkdir()
    write(root / "locked" / "hidden.log")
    readable = write(root / "a.log")
    real_open = os.open

    def open_file(path: str, flags: int, *args: Any, **kwargs: Any) -> int:
        if os.fspath(path).endswith("/locked"):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_file)
    monkeypatch.setattr(scan_module, "unreadable_warnings", scan_module.RateLimitedWarnings(600.0))

    first = [f.path for f in scan([log_directory(root)])]
    second = [f.path for f in scan([log_directory(root)])]

    assert first == [readable]
    assert second == [readable]
    warnings = [r for r in caplog.records if "locked" in r.message]
    assert len(warnings) == 1
    assert warnings[0].levelno == logging.WARNING


def test_rate_limited_warnings_repeat_after_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    warnings = scan_module.RateLimitedWarnings(600.0, clock=clock)

    warnings.warn("/a", "Cannot read %s", "/a")
    warnings.warn("/a", "Cannot read %s", "/a")
    warnings.warn("/b", "Cannot read %s", "/b")
    clock.now += 600.0
    warnings.warn("/a", "Cannot read %s", "/a")

    assert [r.message for r in caplog.records] == [
        "Cannot read /a",
        "Cannot read /b",
        "Cannot read /a",
    ]


@pytest.mark.microbench
def test_scan_speed_100k_files(tmp_path: Path) -> None:
    root = tmp_path / "many"
    for d in range(100):
        sub = root / f"run-{d:03d}"
        sub.mkdir(parents=True)
        for n in range(1000):
            (sub / f"{n}.log").touch()

    started = time.perf_counter()
    count = sum(1 for _ in scan([log_directory(root)]))
    elapsed_seconds = time.perf_counter() - started

    assert count == 100_000
    print(f"scanned {count} files in {elapsed_seconds:.2f} s")
