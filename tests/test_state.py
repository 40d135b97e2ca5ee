"""State store: queue, registry, retention queries, parts, counters and metric buffer."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tvm_upload.errors import StateStoreError
from tvm_upload.files import FileIdentity
from tvm_upload.state import (
    SCHEMA_VERSION,
    ConfirmedUpload,
    EnqueueResult,
    FileState,
    MetricDatum,
    PartRecord,
    ReadyEntry,
    StateStore,
    database,
    registry,
    schema,
)

START = 1_800_000_000.0


class FakeClock:
    """Wall clock that moves only when a test advances it."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


def identity(number: int, size: int = 100) -> FileIdentity:
    return FileIdentity(device=1, inode=number, size=size, mtime_ns=number * 1_000)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path, clock: FakeClock) -> Iterator[StateStore]:
    with StateStore(tmp_path / "state.db", clock) as opened:
        yield opened


def queue(store: StateStore, number: int, *, size: int = 100, source: str = "ros") -> int:
    """Queue /logs/file-<number>.log and return its row id."""
    path = f"/logs/file-{number}.log"
    result = store.enqueue(path, source, identity(number, size), f"v1/2026-01-01/{source}/{number}")
    assert result is EnqueueResult.QUEUED
    record = store.get(_id_of(store, path))
    assert record is not None
    return record.id


def _id_of(store: StateStore, path: str) -> int:
    for state in FileState:
        for record in store.files_in_state(state):
            if str(record.path) == path:
                return record.id
    raise AssertionError(f"{path} is not in the store")


def upload(
    store: StateStore, file_id: int, clock: FakeClock, delete_after: float | None = None
) -> None:
    """Record a confirmed upload of the row's current content."""
    record = store.get(file_id)
    assert record is not None
    state = store.mark_uploaded(file_id, "ab" * 32, clock(), delete_after, record.identity)
    assert state is FileState.UPLOADED


# Schema and connection


def test_new_store_uses_wal_and_current_schema(store: StateStore, tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "state.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    conn.close()


def test_store_rejects_newer_schema(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "state.db")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()

    with pytest.raises(StateStoreError, match="schema version"):
        StateStore(tmp_path / "state.db")


def test_migration_adds_later_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with StateStore(tmp_path / "state.db") as store:
        store.enqueue("/logs/a.log", "ros", identity(1), "key-a")

    def add_column(conn: sqlite3.Connection) -> None:
        conn.execute("ALTER TABLE files ADD COLUMN note TEXT")

    monkeypatch.setattr(database, "MIGRATIONS", (*schema.MIGRATIONS, add_column))
    monkeypatch.setattr(database, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with StateStore(tmp_path / "state.db") as store:
        assert store.object_key_for("/logs/a.log") == "key-a"

    conn = sqlite3.connect(tmp_path / "state.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    columns = [row[1] for row in conn.execute("PRAGMA table_info(files)")]
    assert "note" in columns
    conn.close()


def test_version_1_store_gains_state_page_index(tmp_path: Path) -> None:
    """Given a store of schema version 1, opening it adds the index that reads a state page
    by page, and the schema version stays 1, so the older release still opens the store."""
    conn = sqlite3.connect(tmp_path / "state.db")
    schema.MIGRATIONS[0](conn)
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()

    with StateStore(tmp_path / "state.db") as store:
        store.enqueue("/logs/a.log", "ros", identity(1), "key-a")
        plan = store._connection().execute(
            "EXPLAIN QUERY PLAN SELECT id FROM files WHERE state = ? AND id > ? ORDER BY id"
            " LIMIT 10",
            ("uploaded", 0),
        )
        details = " ".join(row["detail"] for row in plan)

    assert "files_by_state_id" in details
    assert "TEMP B-TREE" not in details
    conn = sqlite3.connect(tmp_path / "state.db")
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    conn.close()


def test_closed_store_raises(store: StateStore) -> None:
    store.close()
    store.close()

    with pytest.raises(StateStoreError, match="closed"):
        store.has_pending()


def test_durable_writes_sync_at_commit(store: StateStore, clock: FakeClock) -> None:
    statements: list[str] = []
    store._connection().set_trace_callback(statements.append)

    file_id = queue(store, 1)
    enqueue_statements = statements[: statements.index("COMMIT") + 2]
    assert enqueue_statements[0] == "PRAGMA synchronous = FULL"
    assert enqueue_statements[1] == "BEGIN IMMEDIATE"
    assert enqueue_statements[-1] == "PRAGMA synchronous = NORMAL"

    statements.clear()
    upload(store, file_id, clock)
    assert "PRAGMA synchronous = FULL" in statements

    statements.clear()
    store.claim(clock(), 1)
    assert "PRAGMA synchronous = FULL" not in statements


def test_large_device_and_inode_round_trip(store: StateStore) -> None:
    big = FileIdentity(device=2**64 - 1, inode=2**63, size=5, mtime_ns=-1)
    store.enqueue("/logs/big.log", "ros", big, "key")

    assert store.is_known("/logs/big.log", big)
    (record,) = store.files_in_state(FileState.PENDING)
    assert record.identity == big


# Enqueue


def test_enqueue_inserts_pending_row(store: StateStore, clock: FakeClock) -> None:
    result = store.enqueue(Path("/logs/a.log"), "ros", identity(1), "v1/2026-01-01/ros/a.log")

    assert result is EnqueueResult.QUEUED
    (record,) = store.files_in_state(FileState.PENDING)
    assert record.path == Path("/logs/a.log")
    assert record.source == "ros"
    assert record.identity == identity(1)
    assert record.object_key == "v1/2026-01-01/ros/a.log"
    assert record.attempts == 0
    assert record.next_attempt_at is None
    assert record.queued_at == START
    assert record.updated_at == START


def test_enqueue_uses_given_now(store: StateStore) -> None:
    store.enqueue("/logs/a.log", "ros", identity(1), "key", now=START - 50)

    (record,) = store.files_in_state(FileState.PENDING)
    assert record.queued_at == START - 50


def test_enqueue_same_identity_twice(store: StateStore) -> None:
    queue(store, 1)

    result = store.enqueue("/logs/file-1.log", "ros", identity(1), "other-key")

    assert result is EnqueueResult.ALREADY_QUEUED
    assert store.object_key_for("/logs/file-1.log") == "v1/2026-01-01/ros/1"


def test_enqueue_after_upload_same_identity(store: StateStore, clock: FakeClock) -> None:
    file_id = queue(store, 1)
    upload(store, file_id, clock)

    result = store.enqueue("/logs/file-1.log", "ros", identity(1), "other-key")

    assert result is EnqueueResult.ALREADY_UPLOADED
    record = store.get(file_id)
    assert record is not None
    assert record.state is FileState.UPLOADED


def test_enqueue_changed_after_upload(store: StateStore, clock: FakeClock) -> None:
    file_id = queue(store, 1)
    store.claim(clock(), 1)
    store.mark_retry(file_id, "timeout", clock())
    upload(store, file_id, clock, delete_after=START + 100)
    clock.advance(10)

    result = store.enqueue("/logs/file-1.log", "ros", identity(1, size=200), "new-key")

    assert result is EnqueueResult.REQUEUED_CHANGED
    record = store.get(file_id)
    assert record is not None
    assert record.state is FileState.PENDING
    assert record.identity == identity(1, size=200)
    assert record.object_key == "v1/2026-01-01/ros/1"
    assert record.attempts == 0
    assert record.delete_after is None
    assert record.queued_at == START + 10
    assert store.due_deletions(START + 1000) == []


def test_enqueue_changed_failed_row(store: StateStore, clock: FakeClock) -> None:
    file_id = queue(store, 1)
    store.claim(clock(), 1)
    store.mark_failed(file_id, "AccessDenied")

    result = store.enqueue("/logs/file-1.log", "ros", identity(1, size=5), "key")

    assert result is EnqueueResult.REQUEUED_CHANGED
    record = store.get(file_id)
    assert record is not None
    assert record.state is FileState.PENDING
    assert record.attempts == 0
    assert record.last_error is None


def test_enqueue_changed_drops_multipart_upload(store: StateStore, clock: FakeClock) -> None:
    file_id = queue(store, 1)
    store.set_upload(file_id, "upload-1", 8 * 1024 * 1024)
    store.record_part(file_id, "upload-1", 1, 8 * 1024 * 1024, "etag-1")

    store.enqueue("/logs/file-1.log", "ros", identity(1, size=7), "key")

    record = store.get(file_id)
    assert record is not None
    assert record.upload_id is None
    assert record.part_size is None
    assert store.parts_for(file_id, "upload-1") == []
    assert not store.record_part(file_id, "upload-1", 2, 10, "etag-2")


def test_enqueue_changed_during_upload(store: StateStore, clock: FakeClock) -> None:
    file_id = queue(store, 1)
    (claimed,) = store.claim(clock(), 1)

    result = store.enqueue("/logs/file-1.log", "ros", identity(1, size=300), "key")
    state = store.mark_uploaded(file_id, "ab" * 32, clock(), None, claimed.identity)

    assert result is EnqueueResult.REQUEUED_CHANGED
    assert state is FileState.PENDING
    record = store.get(file_id)
    assert record is not None
    assert record.state is FileState.PENDING
    assert record.identity == identity(1, size=300)
    assert [row.id for row in store.claim(clock(), 5)] == [file_id]


def test_enqueue_new_file_at_deleted_path(store: StateStore, clock: FakeClock) -> None:
    file_id = queue(store, 1)
    upload(store, file_id, clock)
    assert store.mark_deleted(file_id, clock())
    assert store.object_key_for("/logs/file-1.log") is None

    result = store.enqueue("/logs/file-1.log", "ros", identity(2), "v1/2026-01-02/ros/1")

    assert result is EnqueueResult.QUEUED
    (record,) = store.files_in_state(FileState.PENDING)
    assert record.object_key == "v1/2026-01-02/ros/1"
    assert list(store.files_in_state(FileState.DELETED)) == []


def test_is_registered_and_is_known(store: StateStore, clock: FakeClock) -> None:
    file_id = queue(store, 1)
    assert store.is_known("/logs/file-1.log", identity(1))
    assert not store.is_registered("/logs/file-1.log", identity(1))

    upload(store, file_id, clock)
    assert store.is_registered("/logs/file-1.log", identity(1))
    assert not store.is_registered("/logs/file-1.log", identity(1, size=1))
    assert not store.is_known("/logs/file-1.log", identity(1, size=1))
    assert not store.is_registered("/logs/other.log", identity(1))

    store.mark_deleted(file_id, clock())
    assert store.is_registered("/logs/file-1.log", identity(1))


def test_object_key_for_unknown_path(store: StateStore) -> None:
    assert store.object_key_for("/logs/never.log") is None


# Claim and outcomes


def test_claim_returns_due_rows_oldest_first(store: StateStore, clock: FakeClock) -> None:
    first = queue(store, 1)
    clock.advance(1)
    second = queue(store, 2)
    clock.advance(1)
    third = queue(store, 3)
    store.claim(clock(), 1)
    store.mark_retry(first, "timeout", clock() + 60)

    claimed = store.claim(clock(), 10)

    assert [record.id for record in claimed] == [second, third]
    assert all(record.state is FileState.UPLOADING for record in claimed)
    assert store.claim(clock(), 10) == []
    assert [record.id for record in store.claim(clock() + 60, 10)] == [first]


def test_claim_respects_limit(store: StateStore, clock: FakeClock) -> None:
    ids = [queue(store, number) for number in range(5)]

    assert store.claim(clock(), 0) == []
    assert [record.id for record in store.claim(clock(), 2)] == ids[:2]
    assert [record.id for record in store.claim(clock(), 2)] == ids[2:4]


def test_claim_includes_failed_when_asked(store: StateStore, clock: FakeClock) -> None:
    file_id = queue(store, 1)
    store.claim(clock(), 1)
    store.mark_failed(file_id, "NoSuchKey")

    assert store.claim(clock(), 10) == []
    (claimed,) = store.claim(clock(), 10, include_failed=True)
    assert claimed.id == file_id
    assert claimed.attempts == 1


def test_concurrent_claims_never_share_rows(store: StateStore, clock: FakeClock) -> None:
    ids = {queue(store, number) for number in range(300)}
    other = StateStore(store.path, clock)
    claimed: list[int] = []
    lock = threading.Lock()

    def claim_all(claimer: StateStore) -> None:
        while rows := claimer.claim(clock(), 3):
            with lock:
                claimed.extend(row.id for row in rows)

    threads = [threading.Thread(target=claim_all, args=(s,)) for s in [store, other] * 4]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=10)
    other.close()

    assert len(claimed) == len(set(claimed))
    assert set(claimed) == ids


def test_has_pending(store: StateStore, clock: FakeClock) -> None:
    assert not store.has_pending()

    file_id = queue(store, 1)
    assert store.has_pending()
    assert store.has_pending(clock())

    store.claim(clock(), 1)
    store.mark_retry(file_id, "timeout", clock() + 30)
    assert store.has_pending()
    assert not store.has_pending(clock())
    assert store.has_pending(clock() + 30)


def test_mark_uploaded_records_upload(store: StateStore, clock: FakeClock) -> None:
    file_id = queue(store, 1)
    store.set_upload(file_id, "upload-1", 8 * 1024 * 1024)
    store.record_part(file_id, "upload-1", 1, 100, "etag")
    store.claim(clock(), 1)
    store.mark_retry(file_id, "timeout", clock())
    store.claim(clock(), 1)
    clock.advance(5)

    state = store.mark_uploaded(file_id, "cd" * 32, START + 4, START + 90, identity(1))

    assert state is FileState.UPLOADED
    record = store.get(file_id)
    assert record is not None
    assert record.state is FileState.UPLOADED
    assert record.sha256 == "cd" * 32
    assert record.uploaded_at == START + 4
    assert record.delete_after == START + 90
    assert record.updated_at == START + 5
    assert record.last_error is None
    assert record.upload_id is None
    assert store.parts_for(file_id, "upload-1") == []


def test_mark_uploaded_after_remove(store: StateStore, clock: FakeClock) -> None:
    file_id = queue(store, 1)
    store.remove(file_id)

    assert store.mark_uploaded(file_id, "ab" * 32, clock(), None, identity(1)) is None


def test_enqueue_many_queues_each_in_one_durable_commit(
    store: StateStore, clock: FakeClock
) -> None:
    """Given one uploaded file and two new ones, one call queues the new files with one
    disk sync and reports the uploaded one as already uploaded, in order."""
    upload(store, queue(store, 1), clock)
    statements: list[str] = []
    store._connection().set_trace_callback(statements.append)

    entries = [
        ReadyEntry(Path(f"/logs/file-{n}.log"), "ros", identity(n), f"v1/2026-01-01/ros/{n}")
        for n in (2, 1, 3)
    ]
    results = store.enqueue_many(entries)

    assert results == [
        EnqueueResult.QUEUED,
        EnqueueResult.ALREADY_UPLOADED,
        EnqueueResult.QUEUED,
    ]
    assert statements.count("COMMIT") == 1
    assert statements.count("PRAGMA synchronous = FULL") == 1
    assert store.pending_paths() == {Path("/logs/file-2.log"), Path("/logs/file-3.log")}


def test_enqueue_many_failure_queues_nothing(store: StateStore) -> None:
    """Given a batch whose second entry cannot be stored, no entry of it is queued."""
    entries = [
        ReadyEntry(Path("/logs/a.log"), "ros", identity(1), "v1/2026-01-01/ros/a"),
        ReadyEntry(Path("/logs/b.log"), "ros", identity(2), None),  # type: ignore[arg-type]
    ]

    with pytest.raises(StateStoreError):
        store.enqueue_many(entries)

    assert store.pending_paths() == set()
    assert store.enqueue_many([]) == []


def test_mark_uploaded_many_records_each(store: StateStore, clock: FakeClock) -> None:
    """Given three claimed rows, one of them changed since its claim and one removed,
    one call marks the unchanged row uploaded, queues the changed one again and
    reports the removed one as None, with one disk sync."""
    unchanged, changed, removed = queue(store, 1), queue(store, 2), queue(store, 3)
    store.claim(clock(), 3)
    store.enqueue("/logs/file-2.log", "ros", identity(20), "ignored")
    store.remove(removed)
    statements: list[str] = []
    store._connection().set_trace_callback(statements.append)

    states = store.mark_uploaded_many(
        [
            ConfirmedUpload(unchanged, "ab" * 32, clock(), None, identity(1)),
            ConfirmedUpload(changed, "cd" * 32, clock(), None, identity(2)),
            ConfirmedUpload(removed, "ef" * 32, clock(), None, identity(3)),
        ]
    )

    assert states == [FileState.UPLOADED, FileState.PENDING, None]
    assert statements.count("COMMIT") == 1
    assert statements.count("PRAGMA synchronous = FULL") == 1
    unchanged_record = store.get(unchanged)
    changed_record = store.get(changed)
    assert unchanged_record is not None
    assert unchanged_record.sha256 == "ab" * 32
    assert changed_record is not None
    assert changed_record.state is FileState.PENDING
    assert store.mark_uploaded_many([]) == []


def test_increment_many_adds_in_one_commit(store: StateStore) -> None:
    store.increment("files", 2)
    statements: list[str] = []
    store._connection().set_trace_callback(statements.append)

    store.increment_many({"files": 3, "bytes": 500})

    assert statements.count("COMMIT") == 1
    assert store.counters() == {"files": 5, "bytes": 500}


def test_queue_length_counts_queue_states(store: StateStore, clock: FakeClock) -> None:
    """Pending, uploading and failed rows count; uploaded and deleted rows do not."""
    pending, _uploading, failed, uploaded = (queue(store, n) for n in range(1, 5))
    store.claim(clock(), 3)
    store.release(pending)
    store.mark_failed(failed, "denied")
    upload(store, uploaded, clock)

    assert store.queue_length() == 3
    assert store.summary(clock()).queue_count == 3


def test_mark_retry_charges_attempt(store: StateStore, clock: FakeClock) -> None:
    file_id = queue(store, 1)
    store.claim(clock(), 1)

    store.mark_retry(file_id, "connection reset", START + 2)

    record = store.get(file_id)
    assert record is not None
    assert record.state is FileState.PENDING
    assert record.attempts == 1
    assert record.last_error == "connection reset"
    assert record.next_attempt_at == START + 2


def test_mark_failed_charges_attempt(store: StateStore, clock: FakeClock) -> None:
    file_id = queue(store, 1)
    store.claim(clock(), 1)
    store.mark_retry(file_id, "timeout", clock())
    store.claim(clock(), 1)

    store.mark_failed(file_id, "x" * 5000)

    record = store.get(file_id)
    assert record is not None
    assert record.state is FileState.FAILED
    assert record.attempts == 2
    assert record.next_attempt_at is None
    assert record.last_error is not None
    assert len(record.last_error) == 2000
    assert record.last_error.endswith("...")


def test_release_charges_nothing(store: StateStore, clock: FakeClock) -> None:
    file_id = queue(store, 1)
    store.claim(clock(), 1)

    store.release(file_id)

    record = store.get(file_id)
    assert record is not None
    assert record.state is FileState.PENDING
    assert record.attempts == 0


def test_release_leaves_other_states(store: StateStore, clock: FakeClock) -> None:
    file_id = queue(store, 1)
    upload(store, file_id, clock)

    store.release(file_id)

    record = store.get(file_id)
    assert record is not None
    assert record.state is FileState.UPLOADED


def test_remove_deletes_row_and_parts(store: StateStore, tmp_path: Path) -> None:
    file_id = queue(store, 1)
    store.set_upload(file_id, "upload-1", 100)
    store.record_part(file_id, "upload-1", 1, 100, "etag")

    store.remove(file_id)

    assert store.get(file_id) is None
    conn = sqlite3.connect(tmp_path / "state.db")
    assert conn.execute("SELECT COUNT(*) FROM parts").fetchone()[0] == 0
    conn.close()


def test_recover_interrupted(store: StateStore, clock: FakeClock) -> None:
    ids = [queue(store, number) for number in range(4)]
    store.claim(clock(), 3)
    upload(store, ids[0], clock)

    assert store.recover_interrupted() == 2
    assert store.recover_interrupted() == 0
    assert list(store.files_in_state(FileState.UPLOADING)) == []
    assert store.summary(clock()).pending_count == 3


def test_pending_paths(store: StateStore, clock: FakeClock) -> None:
    ids = [queue(store, number) for number in range(4)]
    upload(store, ids[0], clock)
    store.claim(clock(), 1)
    store.mark_failed(ids[1], "AccessDenied")
    store.claim(clock(), 1)

    assert store.pending_paths() == {Path(f"/logs/file-{n}.log") for n in (1, 2, 3)}


# Registry and retention


def test_files_in_state_pages(store: StateStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "PAGE_ROWS", 2)
    ids = [queue(store, number) for number in range(5)]

    assert [record.id for record in store.files_in_state(FileState.PENDING)] == ids
    assert list(store.files_in_state(FileState.FAILED)) == []


def test_due_deletions(store: StateStore, clock: FakeClock) -> None:
    late, early, never = (queue(store, number) for number in range(3))
    upload(store, late, clock, delete_after=START + 200)
    upload(store, early, clock, delete_after=START + 100)
    upload(store, never, clock, delete_after=None)

    assert store.due_deletions(START + 99) == []
    assert [record.id for record in store.due_deletions(START + 100)] == [early]
    assert [record.id for record in store.due_deletions(START + 500)] == [early, late]


def test_mark_deleted_only_uploaded(store: StateStore, clock: FakeClock) -> None:
    uploaded, pending = queue(store, 1), queue(store, 2)
    upload(store, uploaded, clock, delete_after=START)

    assert store.mark_deleted(uploaded, START + 7)
    assert not store.mark_deleted(pending, START + 7)
    record = store.get(uploaded)
    assert record is not None
    assert record.state is FileState.DELETED
    assert record.updated_at == START + 7
    assert store.due_deletions(START + 100) == []


def test_prune_registry(store: StateStore, clock: FakeClock, tmp_path: Path) -> None:
    present = tmp_path / "present.log"
    present.write_text("kept")
    rows: dict[str, int] = {}
    for name in ("present", "vanished", "deleted"):
        path = tmp_path / f"{name}.log"
        store.enqueue(path, "ros", identity(len(rows)), name)
        rows[name] = _id_of(store, str(path))
        upload(store, rows[name], clock)
    store.mark_deleted(rows["deleted"], START)
    clock.advance(100)

    assert store.prune_registry(START + 1) == 1
    assert store.get(rows["deleted"]) is None
    vanished = store.get(rows["vanished"])
    assert vanished is not None
    assert vanished.state is FileState.DELETED
    assert vanished.updated_at == START + 100
    present_record = store.get(rows["present"])
    assert present_record is not None
    assert present_record.state is FileState.UPLOADED

    assert store.prune_registry(START + 100) == 0
    assert store.prune_registry(START + 101) == 1
    assert store.get(rows["vanished"]) is None


def test_prune_registry_reads_uploaded_rows_in_pages(
    store: StateStore, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given more uploaded rows than one page holds, every row is checked once and
    the rows of missing files, on every page, become deleted."""
    monkeypatch.setattr(registry, "PAGE_ROWS", 3)
    ids = [queue(store, number) for number in range(1, 11)]
    for file_id in ids:
        upload(store, file_id, clock)
    checked: list[str] = []

    def exists(path: str) -> bool:
        checked.append(path)
        return not path.endswith(("-2.log", "-9.log"))

    assert store.prune_registry(START, exists=exists) == 0

    assert sorted(checked) == sorted(f"/logs/file-{number}.log" for number in range(1, 11))
    deleted = {record.path for record in store.files_in_state(FileState.DELETED)}
    assert deleted == {Path("/logs/file-2.log"), Path("/logs/file-9.log")}


def test_summary_figures(store: StateStore, clock: FakeClock) -> None:
    pending = queue(store, 1, size=10)
    clock.advance(50)
    uploading = queue(store, 2, size=20, source="syslog")
    failed = queue(store, 3, size=40)
    uploaded = queue(store, 4, size=80, source="syslog")
    deleted = queue(store, 5, size=160)
    upload(store, uploaded, clock)
    upload(store, deleted, clock)
    store.mark_deleted(deleted, clock())
    store.claim(clock(), 3)
    store.release(pending)
    store.mark_failed(failed, "AccessDenied: no s3:PutObject")
    clock.advance(25)

    summary = store.summary(clock())

    assert (summary.pending_count, summary.pending_bytes) == (1, 10)
    assert (summary.uploading_count, summary.uploading_bytes) == (1, 20)
    assert (summary.failed_count, summary.failed_bytes) == (1, 40)
    assert (summary.uploaded_count, summary.uploaded_bytes) == (1, 80)
    assert summary.deleted_count == 1
    assert summary.queue_count == 3
    assert summary.queue_bytes == 70
    assert summary.oldest_pending_age_seconds == 75.0
    assert summary.sources == {
        "ros": {"pending": 1, "failed": 1, "deleted": 1},
        "syslog": {"uploading": 1, "uploaded": 1},
    }
    (failed_file,) = summary.failed_files
    assert failed_file.path == Path("/logs/file-3.log")
    assert failed_file.attempts == 1
    assert failed_file.last_error == "AccessDenied: no s3:PutObject"
    assert uploading in [record.id for record in store.files_in_state(FileState.UPLOADING)]


def test_summary_of_empty_store(store: StateStore, clock: FakeClock) -> None:
    summary = store.summary(clock())

    assert summary.queue_count == 0
    assert summary.oldest_pending_age_seconds == 0.0
    assert summary.failed_files == []
    assert json.loads(json.dumps(summary.to_dict()))["pending_count"] == 0


def test_summary_to_dict_is_json(store: StateStore, clock: FakeClock) -> None:
    file_id = queue(store, 1)
    store.claim(clock(), 1)
    store.mark_failed(file_id, "boom")

    data = json.loads(json.dumps(store.summary(clock()).to_dict()))

    assert data["failed_count"] == 1
    assert data["queue_count"] == 1
    assert data["failed_files"][0]["path"] == "/logs/file-1.log"


# Multipart parts


def test_parts_recorded_in_order(store: StateStore) -> None:
    file_id = queue(store, 1)
    store.set_upload(file_id, "upload-1", 16)

    assert store.record_part(file_id, "upload-1", 2, 16, "etag-2", "crc-2")
    assert store.record_part(file_id, "upload-1", 1, 16, "etag-1")
    assert store.record_part(file_id, "upload-1", 2, 16, "etag-2b", "crc-2b")

    record = store.get(file_id)
    assert record is not None
    assert record.upload_id == "upload-1"
    assert record.part_size == 16
    assert store.parts_for(file_id, "upload-1") == [
        PartRecord(part_number=1, size=16, etag="etag-1", checksum=None),
        PartRecord(part_number=2, size=16, etag="etag-2b", checksum="crc-2b"),
    ]


def test_record_part_of_other_upload_ignored(store: StateStore) -> None:
    file_id = queue(store, 1)

    assert not store.record_part(file_id, "upload-1", 1, 16, "etag-1")
    store.set_upload(file_id, "upload-1", 16)
    assert not store.record_part(file_id, "upload-0", 1, 16, "etag-1")
    assert not store.record_part(file_id + 1, "upload-1", 1, 16, "etag-1")
    assert store.parts_for(file_id, "upload-1") == []


def test_new_upload_drops_old_parts(store: StateStore) -> None:
    file_id = queue(store, 1)
    store.set_upload(file_id, "upload-1", 16)
    store.record_part(file_id, "upload-1", 1, 16, "etag-1")

    store.set_upload(file_id, "upload-2", 32)

    assert store.parts_for(file_id, "upload-1") == []
    record = store.get(file_id)
    assert record is not None
    assert record.part_size == 32


def test_clear_upload(store: StateStore) -> None:
    file_id = queue(store, 1)
    store.set_upload(file_id, "upload-1", 16)
    store.record_part(file_id, "upload-1", 1, 16, "etag-1")

    store.clear_upload(file_id)

    record = store.get(file_id)
    assert record is not None
    assert record.upload_id is None
    assert store.parts_for(file_id, "upload-1") == []


# Counters and metric buffer


def test_counters(store: StateStore) -> None:
    assert store.counters() == {}

    assert store.increment("files_deleted") == 1
    assert store.increment("files_deleted", 4) == 5
    assert store.increment("data_loss_files", 0) == 0

    assert store.counters() == {"files_deleted": 5, "data_loss_files": 0}


def test_metric_buffer_keeps_newest(store: StateStore) -> None:
    data = [
        MetricDatum("QueueDepth", float(n), "Count", START + n, {"VehicleId": "v1"})
        for n in range(5)
    ]

    assert store.buffer_metrics(data[:3], max_rows=4) == 0
    assert store.buffer_metrics(data[3:], max_rows=4) == 1

    buffered = store.peek_metrics(10)
    assert [item.datum for item in buffered] == data[1:]
    assert [item.datum.value for item in store.peek_metrics(2)] == [1.0, 2.0]


def test_drop_metrics(store: StateStore) -> None:
    data = [MetricDatum("FileCount", float(n), "Count", START) for n in range(3)]
    store.buffer_metrics(data, max_rows=10)
    first, second, third = store.peek_metrics(10)

    store.drop_metrics([first.id, third.id])

    assert store.peek_metrics(10) == [second]
    assert second.datum.dimensions == {}


def test_nested_call_keeps_outer_transaction(store: StateStore) -> None:
    with store.transaction("outer write") as conn:
        store.enqueue_in(conn, "/logs/a.log", "ros", identity(1), "key", START)
        with pytest.raises(StateStoreError, match="already open"):
            store.has_pending()

    assert store.object_key_for("/logs/a.log") == "key"
