"""Scan batches, the file name filter, and the startup scan of ``Intake`` against the state store.

The older scan tests (symlinks, age limit, unreadable directories) are in
test_watcher.py.
"""

from __future__ import annotations

import errno
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from breaker_support import make_config

from tvm_upload.clock import Clock
from tvm_upload.config import LogDirectory
from tvm_upload.files import FileIdentity
from tvm_upload.intake import Intake
from tvm_upload.scan import BATCH_FILES, name_filter, scan, scan_batches, walk, walk_batches
from tvm_upload.state import EnqueueResult, FileState, StateStore

NAMES = [
    "a.log",
    "a.LOG",
    ".hidden.log",
    "a.log.tmp",
    "a.tmp.log",
    "bag.mcap",
    "bag.mcap.active",
    "x.part",
    ".swp",
    "name.swp",
    "line\nbreak.log",
    "\u00e9t\u00e9.log",
    "[bracket].log",
    "b",
    "ab",
    "abc",
    "*",
    "?",
    "100%.log",
    "under_score.log",
]

GLOB_SETTINGS: list[dict[str, Any]] = [
    {},
    {"pattern": ["*.log"]},
    {"pattern": ["*.log", "*.mcap"], "exclude": []},
    {"pattern": "*.LOG", "exclude": "a*"},
    {"pattern": ["?"], "exclude": ["[*]"]},
    {"pattern": ["[!a]*", "a?c"], "exclude": ["*.swp", "[[]*"]},
    {"pattern": ["*"], "exclude": ["*"]},
    {"pattern": ["*\n*"], "exclude": []},
    {"pattern": ["*[*"]},
]


def log_directory(path: Path, **settings: Any) -> LogDirectory:
    return LogDirectory(path=path, source="logs", **settings)


def write(path: Path, data: bytes = b"data\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    directory = tmp_path / "logs"
    directory.mkdir()
    return directory


@pytest.mark.parametrize("settings", GLOB_SETTINGS)
def test_name_filter_matches_accepts(tmp_path: Path, settings: dict[str, Any]) -> None:
    directory = log_directory(tmp_path, **settings)
    accepts_name = name_filter(directory)

    for name in NAMES:
        expected = directory.accepts(PurePosixPath(name))
        assert accepts_name(name) is expected, name
        assert directory.accepts(PurePosixPath("sub", name)) is expected, name


def test_scan_batches_split_large_directory(root: Path) -> None:
    big = {write(root / "big" / f"{number:04d}.log") for number in range(BATCH_FILES + 5)}
    small = {write(root / "small" / f"{number}.log") for number in range(3)}
    top = write(root / "top.log")

    batches = list(scan_batches([log_directory(root)]))

    sizes = sorted(len(batch.files) for batch in batches)
    assert sizes == [1, 3, 5, BATCH_FILES]
    for batch in batches:
        parents = {os.path.dirname(path) for path, _ in batch.files}
        assert len(parents) == 1
    found = {Path(path) for batch in batches for path, _ in batch.files}
    assert found == big | small | {top}


def test_scan_batch_path_text_is_path_string(root: Path) -> None:
    write(root / "a" / "b" / "c.log")
    write(root / "name with spaces.log")
    write(root / "\u00e9t\u00e9" / "x.log")
    directory = log_directory(root)

    texts = [path for batch in scan_batches([directory]) for path, _ in batch.files]

    assert len(texts) == 3
    for text in texts:
        assert str(Path(text)) == text
    assert sorted(texts) == sorted(str(found.path) for found in scan([directory]))


def test_scan_batch_stat_is_lstat(root: Path) -> None:
    path = write(root / "sub" / "a.log", b"12345678")

    [batch] = list(scan_batches([log_directory(root)]))
    [(text, st)] = batch.files

    assert text == str(path)
    assert FileIdentity.from_stat(st) == FileIdentity.of(path)


def test_walk_below_non_recursive_root(root: Path) -> None:
    write(root / "sub" / "a.log")
    write(root / "top.log")
    directory = log_directory(root, recursive=False)

    assert list(walk_batches(directory, ("sub",), None)) == []
    assert [found.path for found in walk(directory, (), None)] == [root / "top.log"]


def test_walk_from_subdirectory(root: Path) -> None:
    inner = write(root / "run" / "deep" / "a.log")
    write(root / "other" / "b.log")

    found = [found.path for found in walk(log_directory(root), ("run",), None)]

    assert found == [inner]


def test_scan_vanished_directory_logged_at_debug(
    root: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # A directory removed between its parent's listing and its own opening.
    write(root / "gone" / "a.log")
    readable = write(root / "readable.log")
    real_open = os.open

    def open_file(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if os.fspath(path).endswith("/gone"):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_file)
    with caplog.at_level(logging.DEBUG, logger="tvm_upload.scan"):
        found = [found.path for found in scan([log_directory(root)])]

    assert found == [readable]
    assert [r.levelno for r in caplog.records if "gone" in r.message] == [logging.DEBUG]


class FakeClock(Clock):
    """A clock that does not advance, so no scanned file becomes ready during a test."""

    def __init__(self) -> None:
        self.wall = time.time()

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return 1000.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def intake_parts(
    tmp_path: Path, root: Path, clock: FakeClock
) -> Iterator[tuple[Intake, StateStore]]:
    config = make_config(tmp_path, [{"path": root, "source": "logs"}])
    config.state_file.parent.mkdir()
    with StateStore(config.state_file, clock.time) as store:
        yield Intake(config, store, clock), store


def register(store: StateStore, path: Path, state: FileState = FileState.UPLOADED) -> None:
    """Record the current version of ``path`` in ``state`` (uploaded, deleted or pending)."""
    identity = FileIdentity.of(path)
    result = store.enqueue(path, "logs", identity, f"v/2026-01-01/logs/{path.name}")
    assert result is EnqueueResult.QUEUED
    if state is FileState.PENDING:
        return

    [record] = store.claim_paths([path], 0.0)
    store.mark_uploaded(record.id, "0" * 64, 0.0, None, identity)
    if state is FileState.DELETED:
        assert store.mark_deleted(record.id, 0.0)


def test_intake_scan_observes_only_unknown_files(
    root: Path, intake_parts: tuple[Intake, StateStore]
) -> None:
    intake, store = intake_parts
    uploaded = write(root / "uploaded.log")
    pending = write(root / "sub" / "pending.log")
    deleted_same = write(root / "sub" / "deleted.log")
    changed = write(root / "changed.log")
    new = write(root / "sub" / "new.log")
    register(store, uploaded)
    register(store, pending, FileState.PENDING)
    register(store, deleted_same, FileState.DELETED)
    register(store, changed)
    write(changed, b"more data than before\n")

    observed = intake.scan(None)

    assert observed == 2
    assert sorted(intake.stability.tracked()) == sorted([changed, new])


def test_intake_scan_many_files_in_one_directory(
    root: Path, intake_parts: tuple[Intake, StateStore]
) -> None:
    intake, store = intake_parts
    paths = [write(root / "run" / f"{number:04d}.log") for number in range(2 * BATCH_FILES + 7)]
    for path in paths[::2]:
        register(store, path)

    observed = intake.scan(None)

    assert observed == len(paths[1::2])
    assert sorted(intake.stability.tracked()) == paths[1::2]


def test_intake_scan_skips_non_utf8_names(
    root: Path, intake_parts: tuple[Intake, StateStore], caplog: pytest.LogCaptureFixture
) -> None:
    intake, _ = intake_parts
    with open(os.fsencode(root) + b"/bad-\xff.log", "wb") as handle:
        handle.write(b"data\n")
    accented = write(root / "\u00e9t\u00e9.log")

    observed = intake.scan(None)

    assert observed == 1
    assert intake.stability.tracked() == [accented]
    assert any("not valid UTF-8" in r.message for r in caplog.records)


def test_intake_scan_honours_min_mtime(
    root: Path, intake_parts: tuple[Intake, StateStore], clock: FakeClock
) -> None:
    intake, _ = intake_parts
    old = write(root / "old.log")
    os.utime(old, (clock.time() - 7200, clock.time() - 7200))
    new = write(root / "new.log")

    observed = intake.scan(clock.time() - 3600)

    assert observed == 1
    assert intake.stability.tracked() == [new]
