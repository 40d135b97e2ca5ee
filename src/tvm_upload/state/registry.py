"""The registry: uploaded log files, their local deletion, and the status summary."""

from __future__ import annotations

import functools
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from tvm_upload.files import FileIdentity
from tvm_upload.state.database import PathLike
from tvm_upload.state.queue import QueueStore
from tvm_upload.state.records import (
    QUEUE_STATES,
    REGISTRY_STATES,
    FailedFile,
    FileRecord,
    FileState,
    StatusSummary,
)
from tvm_upload.state.schema import FILE_COLUMNS, record_from_row, state_marks, to_sqlite_int

PAGE_ROWS = 500
FAILED_FILES_SHOWN = 100
_STATE_AFTER_ID = "state = ? AND id > ? ORDER BY id LIMIT ?"
"""One page of rows in a state, by id, read from the index ``files_by_state_id``."""
LOOKUP_FILES = 128
"""Files per query of ``unknown_paths``. Each takes 5 parameters, and SQLite before 3.32
allows at most 999 per statement."""

FileVersion = tuple[str, int, int, int, int]
"""Path text, device, inode, size and mtime in ns of one version of a file."""


def file_version(path: str, st: os.stat_result) -> FileVersion:
    """Return the version of the file at ``path`` that its ``lstat`` result ``st`` describes."""
    return (path, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class RegistryStore(QueueStore):
    """Methods on rows in states ``uploaded`` and ``deleted``, and reports over all rows."""

    def is_registered(self, path: PathLike, identity: FileIdentity) -> bool:
        """Return True if this version of the file was uploaded (state uploaded or deleted)."""
        return self._has_identity(path, identity, REGISTRY_STATES)

    def unknown_paths(self, versions: Sequence[FileVersion]) -> list[str]:
        """Return the paths of ``versions`` that have no row, in any state, with that identity.

        These are the files for which ``is_known`` returns False, in input
        order. It takes one read transaction and one query per ``LOOKUP_FILES``
        versions. SQLite compares the identities and returns only the unknown
        paths, so memory grows with ``versions``, not with the table.
        """
        unknown: list[str] = []
        for begin in range(0, len(versions), LOOKUP_FILES):
            unknown += self._unknown_paths(versions[begin : begin + LOOKUP_FILES])
        return unknown

    def _unknown_paths(self, versions: Sequence[FileVersion]) -> list[str]:
        rows = _padded_row_count(len(versions))
        values: list[str | int | None] = []
        for path, device, inode, size, mtime_ns in versions:
            values += (path, to_sqlite_int(device), to_sqlite_int(inode), size, mtime_ns)
        values += [None] * (5 * (rows - len(versions)))

        with self.transaction(f"look up {len(versions)} scanned files", write=False) as conn:
            cursor = conn.execute(_select_unknown_sql(rows), values)
            return [row[0] for row in cursor]

    def files_in_state(self, state: FileState) -> Iterator[FileRecord]:
        """Yield every row in ``state`` by id, reading ``PAGE_ROWS`` rows per transaction.

        The lock is free between pages, so other threads may change rows
        while the caller iterates. Pages follow increasing ids, so no row is
        yielded twice.
        """
        last_id = 0
        while True:
            with self.transaction(f"list {state.value} files", write=False) as conn:
                rows = conn.execute(
                    f"SELECT {FILE_COLUMNS} FROM files WHERE {_STATE_AFTER_ID}",
                    (state.value, last_id, PAGE_ROWS),
                ).fetchall()
            if not rows:
                return
            for row in rows:
                yield record_from_row(row)
            last_id = rows[-1]["id"]

    def due_deletions(self, now: float) -> list[FileRecord]:
        """Return uploaded rows whose ``delete_after`` is <= ``now``, earliest first."""
        with self.transaction("list files due for deletion", write=False) as conn:
            rows = conn.execute(
                f"SELECT {FILE_COLUMNS} FROM files WHERE state = ?"
                " AND delete_after IS NOT NULL AND delete_after <= ? ORDER BY delete_after, id",
                (FileState.UPLOADED.value, now),
            ).fetchall()
        return [record_from_row(row) for row in rows]

    def mark_deleted(self, file_id: int, now: float) -> bool:
        """Record that retention deleted the uploaded file; return False if the row is not uploaded.

        Only ``uploaded`` rows change. A file deleted before its upload (the
        emergency tier's data loss) leaves the queue with ``remove`` instead.
        """
        with self.transaction(f"mark file id {file_id} deleted") as conn:
            cursor = conn.execute(
                "UPDATE files SET state = ?, delete_after = NULL, updated_at = ?"
                " WHERE id = ? AND state = ?",
                (FileState.DELETED.value, now, file_id, FileState.UPLOADED.value),
            )
            return cursor.rowcount == 1

    def prune_registry(
        self, older_than: float, *, exists: Callable[[str], bool] = os.path.lexists
    ) -> int:
        """Forget uploaded files that are gone locally since before ``older_than``; return how many.

        First every ``uploaded`` row whose file no longer exists (checked with
        ``exists``, outside the lock) becomes ``deleted`` as of now, so the
        registry remembers it for the full retention from the moment it was
        found gone. Then ``deleted`` rows last updated before ``older_than``
        are removed.
        """
        vanished = [(file_id,) for file_id, path in self._uploaded_paths() if not exists(path)]

        with self.transaction("prune the registry") as conn:
            now = self._clock()
            conn.executemany(
                "UPDATE files SET state = ?, delete_after = NULL, updated_at = ?"
                " WHERE id = ? AND state = ?",
                [
                    (FileState.DELETED.value, now, *row, FileState.UPLOADED.value)
                    for row in vanished
                ],
            )
            cursor = conn.execute(
                "DELETE FROM files WHERE state = ? AND updated_at < ?",
                (FileState.DELETED.value, older_than),
            )
            return cursor.rowcount

    def _uploaded_paths(self) -> Iterator[tuple[int, str]]:
        """Yield the id and path of every ``uploaded`` row, ``PAGE_ROWS`` rows per transaction.

        Memory stays bounded with a registry of millions of rows.
        """
        last_id = 0
        while True:
            with self.transaction("list uploaded files", write=False) as conn:
                rows = conn.execute(
                    f"SELECT id, path FROM files WHERE {_STATE_AFTER_ID}",
                    (FileState.UPLOADED.value, last_id, PAGE_ROWS),
                ).fetchall()
            if not rows:
                return
            for row in rows:
                yield row["id"], row["path"]
            last_id = rows[-1]["id"]

    def queue_length(self) -> int:
        """Return the number of rows in the queue: pending, uploading or failed."""
        marks, values = state_marks(QUEUE_STATES)
        with self.transaction("count queued files", write=False) as conn:
            row = conn.execute(f"SELECT COUNT(*) FROM files WHERE state IN ({marks})", values)
            return int(row.fetchone()[0])

    def summary(self, now: float, *, failed_limit: int = FAILED_FILES_SHOWN) -> StatusSummary:
        """Return counts and bytes per state, failed rows and the queue's age, as of ``now``.

        All figures come from one snapshot of the database. ``failed_files``
        contains at most ``failed_limit`` rows; ``failed_count`` counts them all.
        """
        with self.transaction("summarize the state store", write=False) as conn:
            totals = _state_totals(conn)
            sources = _source_counts(conn)
            oldest = _oldest_queued_at(conn)
            failed_files = _failed_files(conn, failed_limit)

        def files(state: FileState) -> int:
            return totals.get(state.value, (0, 0))[0]

        def size(state: FileState) -> int:
            return totals.get(state.value, (0, 0))[1]

        return StatusSummary(
            pending_count=files(FileState.PENDING),
            pending_bytes=size(FileState.PENDING),
            uploading_count=files(FileState.UPLOADING),
            uploading_bytes=size(FileState.UPLOADING),
            failed_count=files(FileState.FAILED),
            failed_bytes=size(FileState.FAILED),
            uploaded_count=files(FileState.UPLOADED),
            uploaded_bytes=size(FileState.UPLOADED),
            deleted_count=files(FileState.DELETED),
            oldest_pending_age_seconds=0.0 if oldest is None else max(0.0, now - oldest),
            failed_files=failed_files,
            sources=sources,
        )


def _padded_row_count(versions: int) -> int:
    """Round up to a power of two, so that a few statements serve every batch size."""
    return max(8, 1 << (versions - 1).bit_length())


@functools.lru_cache(maxsize=16)
def _select_unknown_sql(rows: int) -> str:
    """Return the query of ``_unknown_paths`` for ``rows`` versions. Rows of NULLs pad a batch."""
    marks = ", ".join(["(?, ?, ?, ?, ?)"] * rows)
    return (
        f"WITH scanned (path, device, inode, size, mtime_ns) AS (VALUES {marks})"
        " SELECT scanned.path FROM scanned WHERE scanned.path IS NOT NULL AND NOT EXISTS"
        " (SELECT 1 FROM files WHERE files.path = scanned.path AND files.device = scanned.device"
        " AND files.inode = scanned.inode AND files.size = scanned.size"
        " AND files.mtime_ns = scanned.mtime_ns)"
    )


def _state_totals(conn: sqlite3.Connection) -> dict[str, tuple[int, int]]:
    rows = conn.execute(
        "SELECT state, COUNT(*) AS files, COALESCE(SUM(size), 0) AS bytes FROM files GROUP BY state"
    )
    return {row["state"]: (row["files"], row["bytes"]) for row in rows}


def _source_counts(conn: sqlite3.Connection) -> dict[str, dict[str, int]]:
    sources: dict[str, dict[str, int]] = {}
    rows = conn.execute("SELECT source, state, COUNT(*) AS files FROM files GROUP BY source, state")
    for row in rows:
        sources.setdefault(row["source"], {})[row["state"]] = row["files"]
    return sources


def _oldest_queued_at(conn: sqlite3.Connection) -> float | None:
    marks, values = state_marks(QUEUE_STATES)
    row = conn.execute(f"SELECT MIN(queued_at) FROM files WHERE state IN ({marks})", values)
    oldest: float | None = row.fetchone()[0]
    return oldest


def _failed_files(conn: sqlite3.Connection, limit: int) -> list[FailedFile]:
    rows = conn.execute(
        "SELECT path, source, attempts, last_error, updated_at FROM files"
        " WHERE state = ? ORDER BY updated_at, id LIMIT ?",
        (FileState.FAILED.value, limit),
    )
    return [
        FailedFile(
            path=Path(row["path"]),
            source=row["source"],
            attempts=row["attempts"],
            last_error=row["last_error"],
            updated_at=row["updated_at"],
        )
        for row in rows
    ]
