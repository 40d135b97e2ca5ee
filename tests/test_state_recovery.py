"""State store under crashes, damaged files, a full disk and a concurrent status reader."""

from __future__ import annotations

import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tvm_upload.errors import StateStoreError
from tvm_upload.files import FileIdentity
from tvm_upload.state import EnqueueResult, FileState, StateStore, open_store
from tvm_upload.state import store as store_module

START = 1_800_000_000.0
STAMP = "20270115T080000Z"
WORKER = Path(__file__).with_name("state_crash_worker.py")


def clock() -> float:
    return START


def identity(number: int) -> FileIdentity:
    return FileIdentity(device=1, inode=number, size=number, mtime_ns=number)


def fill(path: Path, rows: int) -> None:
    """Queue ``rows`` files with long paths in one transaction."""
    with StateStore(path, clock) as store, store.transaction("fill") as conn:
        for number in range(rows):
            path_text = f"/logs/{number:06}-{'x' * 200}.log"
            store.enqueue_in(conn, path_text, "ros", identity(number), "key", START)


def read_rows(path: Path) -> int:
    with StateStore(path, clock) as store:
        return store.summary(START).pending_count


# Crash safety


def run_worker_until_killed(database: Path, first: int, lines: int) -> list[tuple[str, str]]:
    """Start the worker, SIGKILL it after ``lines`` reports, return every report it flushed."""
    worker = subprocess.Popen(
        [sys.executable, str(WORKER), str(database), str(first)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert worker.stdout is not None
    output: list[str] = []
    deadline = time.monotonic() + 20
    while len(output) < lines and time.monotonic() < deadline:
        line = worker.stdout.readline()
        if not line:
            break
        output.append(line)

    os.kill(worker.pid, signal.SIGKILL)
    worker.wait(timeout=10)
    output += worker.stdout.read().splitlines()
    worker.stdout.close()
    assert worker.returncode == -signal.SIGKILL

    words = [line.split() for line in output]
    return [(report[0], report[1]) for report in words if len(report) == 2]


def state_of(store: StateStore, file_id: int) -> FileState | None:
    record = store.get(file_id)
    return None if record is None else record.state


def test_kill_9_loses_no_committed_row(tmp_path: Path) -> None:
    database = tmp_path / "state.db"
    rng = random.Random(7)
    queued: set[str] = set()
    uploaded: set[int] = set()
    recovered = 0

    for round_number in range(3):
        reports = run_worker_until_killed(database, round_number * 100_000, rng.randint(40, 300))
        queued |= {value for event, value in reports if event == "queued"}
        uploaded |= {int(value) for event, value in reports if event == "uploaded"}

        store, rebuilt = open_store(database, clock)
        assert not rebuilt
        assert store.check_integrity() == []
        interrupted = len(list(store.files_in_state(FileState.UPLOADING)))
        assert store.recover_interrupted() == interrupted
        recovered += interrupted
        assert list(store.files_in_state(FileState.UPLOADING)) == []
        lost = {path for path in queued if store.object_key_for(path) is None}
        assert lost == set()
        regressed = {i for i in uploaded if state_of(store, i) is not FileState.UPLOADED}
        assert regressed == set()
        store.close()

    assert len(queued) >= 3 * 40
    assert uploaded
    assert recovered > 0


# Damaged or missing files


def test_open_store_keeps_healthy_database(tmp_path: Path) -> None:
    fill(tmp_path / "state.db", 3)

    store, rebuilt = open_store(tmp_path / "state.db", clock)

    assert not rebuilt
    assert store.summary(START).pending_count == 3
    store.close()


def test_open_store_creates_directory(tmp_path: Path) -> None:
    store, rebuilt = open_store(tmp_path / "var" / "lib" / "state.db", clock)

    assert not rebuilt
    assert (tmp_path / "var" / "lib" / "state.db").exists()
    store.close()


def test_random_bytes_moved_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    database = tmp_path / "state.db"
    garbage = random.Random(3).randbytes(64 * 1024)
    database.write_bytes(garbage)

    with caplog.at_level(logging.ERROR):
        store, rebuilt = open_store(database, clock)

    assert rebuilt
    assert (tmp_path / f"state.db.corrupt-{STAMP}").read_bytes() == garbage
    assert store.check_integrity() == []
    assert store.enqueue("/logs/a.log", "ros", identity(1), "key") is EnqueueResult.QUEUED
    assert f"state.db.corrupt-{STAMP}" in caplog.text
    assert any(record.levelno == logging.ERROR for record in caplog.records)
    store.close()


def test_move_aside_takes_side_files(tmp_path: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        (tmp_path / f"state.db{suffix}").write_text(suffix)

    moved = store_module._move_aside(tmp_path / "state.db", START)

    assert moved == tmp_path / f"state.db.corrupt-{STAMP}"
    for suffix in ("", "-wal", "-shm"):
        assert (tmp_path / f"state.db.corrupt-{STAMP}{suffix}").read_text() == suffix
        assert not (tmp_path / f"state.db{suffix}").exists()


def test_truncated_database_moved_aside(tmp_path: Path) -> None:
    database = tmp_path / "state.db"
    fill(database, 2000)
    size = database.stat().st_size
    with database.open("r+b") as file:
        file.truncate(size // 2)

    store, rebuilt = open_store(database, clock)

    assert rebuilt
    assert (tmp_path / f"state.db.corrupt-{STAMP}").stat().st_size == size // 2
    assert store.summary(START).pending_count == 0
    store.close()


def test_damaged_page_moved_aside(tmp_path: Path) -> None:
    database = tmp_path / "state.db"
    fill(database, 2000)
    with database.open("r+b") as file:
        file.seek(4096 * 3)
        file.write(b"\xff" * 4096)

    store, rebuilt = open_store(database, clock)

    assert rebuilt
    assert (tmp_path / f"state.db.corrupt-{STAMP}").exists()
    store.close()


def test_second_corruption_gets_own_name(tmp_path: Path) -> None:
    database = tmp_path / "state.db"
    for _ in range(2):
        database.write_bytes(b"not a database at all" * 100)
        store, rebuilt = open_store(database, clock)
        assert rebuilt
        store.close()

    assert (tmp_path / f"state.db.corrupt-{STAMP}").exists()
    assert (tmp_path / f"state.db.corrupt-{STAMP}-1").exists()


def test_empty_file_counts_as_lost(tmp_path: Path) -> None:
    (tmp_path / "state.db").touch()

    store, rebuilt = open_store(tmp_path / "state.db", clock)

    assert rebuilt
    assert list(tmp_path.glob("*.corrupt-*")) == []
    assert store.check_integrity() == []
    store.close()


def test_open_store_unwritable_directory(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("a file, not a directory")

    with pytest.raises(StateStoreError, match="Cannot create the state store directory"):
        open_store(tmp_path / "file" / "state.db", clock)


# Full disk


def test_full_database_rolls_back(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.db", clock)
    store.enqueue("/logs/kept.log", "ros", identity(0), "key")
    conn = store._connection()
    pages = conn.execute("PRAGMA page_count").fetchone()[0]
    conn.execute(f"PRAGMA max_page_count = {pages}")

    with pytest.raises(StateStoreError, match="is full") as raised:
        for number in range(1, 1000):
            store.enqueue(f"/logs/{number}-{'x' * 500}.log", "ros", identity(number), "key")
    assert "rolled back" in str(raised.value)

    assert not conn.in_transaction
    assert store.check_integrity() == []
    written = store.summary(START).pending_count
    conn.execute(f"PRAGMA max_page_count = {pages * 100}")
    store.enqueue("/logs/after.log", "ros", identity(5000), "key")
    assert store.summary(START).pending_count == written + 1
    store.close()


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs, or a skip when this process may not mount one."""
    mountpoint = tmp_path / "small"
    mountpoint.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mountpoint)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield mountpoint
    finally:
        subprocess.run(["umount", "-l", str(mountpoint)], check=False)


def test_full_filesystem_rolls_back(small_filesystem: Path) -> None:
    database = small_filesystem / "state.db"
    store = StateStore(database, clock)
    store.enqueue("/logs/kept.log", "ros", identity(0), "key")
    filler = small_filesystem / "filler"
    with filler.open("wb", buffering=0) as file:
        try:
            while file.write(b"\0" * 4096):
                pass
        except OSError:
            pass

    with pytest.raises(StateStoreError, match="is full"):
        for number in range(1, 5000):
            store.enqueue(f"/logs/{number}-{'x' * 500}.log", "ros", identity(number), "key")

    assert store.object_key_for("/logs/kept.log") == "key"
    filler.unlink()
    store.enqueue("/logs/after.log", "ros", identity(9999), "key")
    written = store.summary(START).pending_count
    store.close()

    reopened, rebuilt = open_store(database, clock)
    assert not rebuilt
    assert reopened.check_integrity() == []
    assert reopened.summary(START).pending_count == written
    assert reopened.object_key_for("/logs/after.log") == "key"
    reopened.close()


# Status while the daemon runs

READER = """
import sys, time
from tvm_upload.state import StateStore
store = StateStore(sys.argv[1], read_only=True)
print(store.summary(time.time()).pending_count)
"""


def test_reader_process_during_write(tmp_path: Path) -> None:
    database = tmp_path / "state.db"
    fill(database, 2)
    writer = StateStore(database, clock)

    with writer.transaction("hold a write") as conn:
        conn.execute("DELETE FROM files")
        started = time.monotonic()
        output = subprocess.run(
            [sys.executable, "-c", READER, str(database)],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        )
        assert time.monotonic() - started < 5

    assert output.stdout.strip() == "2"
    assert writer.summary(START).pending_count == 0
    writer.close()


def test_read_only_store_never_writes(tmp_path: Path) -> None:
    database = tmp_path / "state.db"
    fill(database, 1)
    before = database.read_bytes()

    with StateStore(database, read_only=True) as reader:
        assert reader.summary(START).pending_count == 1
        with pytest.raises(StateStoreError, match="readonly"):
            reader.enqueue("/logs/new.log", "ros", identity(9), "key")

    assert database.read_bytes() == before


def test_read_only_store_missing_file(tmp_path: Path) -> None:
    with pytest.raises(StateStoreError, match="Cannot open the state store"):
        StateStore(tmp_path / "missing.db", read_only=True)

    assert not (tmp_path / "missing.db").exists()


def test_writer_waits_for_other_writer(tmp_path: Path) -> None:
    database = tmp_path / "state.db"
    fill(database, 1)
    other = sqlite3.connect(database, isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    store = StateStore(database, clock)
    results: list[EnqueueResult] = []

    writer = threading.Thread(
        target=lambda: results.append(store.enqueue("/logs/b.log", "ros", identity(2), "key"))
    )
    writer.start()
    writer.join(timeout=0.3)
    assert writer.is_alive()
    other.execute("COMMIT")
    writer.join(timeout=5)

    assert results == [EnqueueResult.QUEUED]
    assert read_rows(database) == 2
    other.close()
    store.close()
