"""State store calls as the daemon makes them, on a registry of 10,000 uploaded rows."""

from __future__ import annotations

import itertools
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tvm_upload.files import FileIdentity
from tvm_upload.state import EnqueueResult, StateStore

pytestmark = pytest.mark.microbench

REGISTRY_ROWS = 10_000
SOURCE = "bench"


def row_path(number: int) -> str:
    return f"/logs/session-{number // 100:04d}/file-{number:06d}.log"


def row_identity(number: int) -> FileIdentity:
    return FileIdentity(device=2049, inode=10_000 + number, size=4096, mtime_ns=number)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    """A state store with ``REGISTRY_ROWS`` uploaded rows in its registry.

    The rows are inserted with one SQL transaction, which is much faster
    than one durable ``enqueue`` and ``mark_uploaded`` per row.
    """
    db = tmp_path / "state.db"
    StateStore(db).close()
    rows = [
        (
            row_path(n),
            SOURCE,
            2049,
            10_000 + n,
            4096,
            n,
            f"v/2026-12-04/{SOURCE}/{n}.log",
            "uploaded",
            "0" * 64,
            1.0,
            1.0,
            1.0,
        )
        for n in range(REGISTRY_ROWS)
    ]
    with sqlite3.connect(db) as conn:
        conn.executemany(
            "INSERT INTO files (path, source, device, inode, size, mtime_ns, object_key, state,"
            " sha256, queued_at, uploaded_at, updated_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows,
        )
    with StateStore(db) as opened:
        yield opened


def test_is_known_registered_file(benchmark, store: StateStore) -> None:  # type: ignore[no-untyped-def]
    """The lookup a scan makes for each file it finds."""
    number = REGISTRY_ROWS // 2

    assert benchmark(store.is_known, row_path(number), row_identity(number)) is True


def test_object_key_for_registered_file(benchmark, store: StateStore) -> None:  # type: ignore[no-untyped-def]
    assert benchmark(store.object_key_for, row_path(7)) is not None


def test_enqueue_new_file(benchmark, store: StateStore) -> None:  # type: ignore[no-untyped-def]
    """One durable enqueue (the WAL is synced to disk) of a file not seen before."""
    numbers = itertools.count(REGISTRY_ROWS)

    def enqueue() -> EnqueueResult:
        number = next(numbers)
        return store.enqueue(row_path(number), SOURCE, row_identity(number), f"key-{number}")

    assert benchmark(enqueue) is EnqueueResult.QUEUED


def test_claim_and_mark_uploaded(benchmark, store: StateStore) -> None:  # type: ignore[no-untyped-def]
    """Claim one queued file and record its upload, the per-file cost of a drain."""
    numbers = itertools.count(REGISTRY_ROWS)

    def setup() -> tuple[tuple[()], dict[str, object]]:
        number = next(numbers)
        store.enqueue(row_path(number), SOURCE, row_identity(number), f"key-{number}")
        return (), {}

    def claim_and_mark() -> None:
        (record,) = store.claim(time.time(), 1)
        store.mark_uploaded(record.id, "0" * 64, time.time(), None, record.identity)

    benchmark.pedantic(claim_and_mark, setup=setup, rounds=200)

    assert store.summary(time.time()).pending_count == 0


def test_summary_of_registry(benchmark, store: StateStore) -> None:  # type: ignore[no-untyped-def]
    """``tvm-upload status`` and the metrics read this once per interval."""
    summary = benchmark(store.summary, time.time())

    assert summary.uploaded_count == REGISTRY_ROWS
