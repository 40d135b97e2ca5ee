"""The queue: log files waiting for upload, claimed by upload threads, retried or failed."""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import replace
from pathlib import Path

from tvm_upload.files import FileIdentity
from tvm_upload.redaction import redact
from tvm_upload.state.database import Database, PathLike
from tvm_upload.state.journal import detach_upload
from tvm_upload.state.records import (
    QUEUE_STATES,
    REGISTRY_STATES,
    ConfirmedUpload,
    EnqueueResult,
    FileRecord,
    FileState,
    ReadyEntry,
)
from tvm_upload.state.schema import FILE_COLUMNS, identity_params, record_from_row, state_marks

logger = logging.getLogger(__name__)

MAX_ERROR_CHARS = 2000


def _error_text(error: str) -> str:
    """Return the error as stored and shown by ``status``: secrets masked, length capped."""
    error = redact(error)
    return error if len(error) <= MAX_ERROR_CHARS else error[: MAX_ERROR_CHARS - 3] + "..."


def select_file(
    conn: sqlite3.Connection, where: str, params: tuple[object, ...]
) -> FileRecord | None:
    """Return the first ``files`` row matching the SQL condition ``where``, or None."""
    row = conn.execute(f"SELECT {FILE_COLUMNS} FROM files WHERE {where}", params).fetchone()
    return None if row is None else record_from_row(row)


def insert_file(
    conn: sqlite3.Connection,
    path: str,
    source: str,
    identity: FileIdentity,
    object_key: str,
    now: float,
    *,
    state: FileState = FileState.PENDING,
    uploaded_at: float | None = None,
    delete_after: float | None = None,
) -> None:
    """Insert a ``files`` row queued (and updated) at ``now``."""
    conn.execute(
        "INSERT INTO files (path, source, device, inode, size, mtime_ns, object_key, state,"
        " queued_at, uploaded_at, delete_after, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (path, source, *identity_params(identity), object_key, state.value)
        + (now, uploaded_at, delete_after, now),
    )


class QueueStore(Database):
    """Methods that move rows through ``pending``, ``uploading`` and ``failed``."""

    def enqueue(
        self,
        path: PathLike,
        source: str,
        identity: FileIdentity,
        object_key: str,
        *,
        now: float | None = None,
    ) -> EnqueueResult:
        """Queue a ready log file unless this version of it is queued or uploaded already.

        A new path is inserted as ``pending`` (``QUEUED``). A row with the
        same identity is left alone (``ALREADY_QUEUED`` in the queue,
        ``ALREADY_UPLOADED`` in the registry). A changed identity means new
        content (``REQUEUED_CHANGED``): the row takes the new identity, goes
        back to ``pending`` with attempts reset to 0, keeps its first object
        key, and drops its open multipart upload, whose parts hold the old
        content. A row in state ``uploading`` stays so, and its
        ``mark_uploaded`` then queues it again. A ``deleted`` row with a new
        identity is a new file at a reused path: it takes the given
        ``object_key`` so that its upload does not replace the deleted file's
        only copy (``QUEUED``). Committed with ``synchronous=FULL``.
        """
        with self.transaction(f"queue {path}", durable=True) as conn:
            return self.enqueue_in(conn, str(path), source, identity, object_key, self._now(now))

    def enqueue_many(
        self, entries: list[ReadyEntry], *, now: float | None = None
    ) -> list[EnqueueResult]:
        """Queue several ready files as ``enqueue`` does, in one transaction with one disk sync.

        Returns one result per entry, in order. If the transaction fails, no
        entry is queued.
        """
        if not entries:
            return []

        now = self._now(now)
        with self.transaction(f"queue {len(entries)} files", durable=True) as conn:
            return [
                self.enqueue_in(
                    conn, str(entry.path), entry.source, entry.identity, entry.object_key, now
                )
                for entry in entries
            ]

    def enqueue_in(
        self,
        conn: sqlite3.Connection,
        path: str,
        source: str,
        identity: FileIdentity,
        object_key: str,
        now: float,
    ) -> EnqueueResult:
        """Do the work of ``enqueue`` inside the caller's transaction ``conn``."""
        record = select_file(conn, "path = ?", (path,))
        if record is None:
            insert_file(conn, path, source, identity, object_key, now)
            return EnqueueResult.QUEUED

        if record.identity == identity:
            if record.state in REGISTRY_STATES:
                return EnqueueResult.ALREADY_UPLOADED
            return EnqueueResult.ALREADY_QUEUED

        if record.state is FileState.DELETED:
            conn.execute("DELETE FROM files WHERE id = ?", (record.id,))
            insert_file(conn, path, source, identity, object_key, now)
            return EnqueueResult.QUEUED

        self._change_identity(conn, record, identity, now)
        return EnqueueResult.REQUEUED_CHANGED

    def _change_identity(
        self, conn: sqlite3.Connection, record: FileRecord, identity: FileIdentity, now: float
    ) -> None:
        state = FileState.UPLOADING if record.state is FileState.UPLOADING else FileState.PENDING
        conn.execute(
            "UPDATE files SET device = ?, inode = ?, size = ?, mtime_ns = ?, state = ?,"
            " attempts = 0, next_attempt_at = NULL, last_error = NULL, delete_after = NULL,"
            " queued_at = ?, updated_at = ? WHERE id = ?",
            (*identity_params(identity), state.value, now, now, record.id),
        )

        upload_id = detach_upload(conn, record.id)
        if upload_id is not None:
            logger.info(
                "Dropped multipart upload %s of %s from the state store because the file changed",
                upload_id,
                record.path,
            )

    def is_known(self, path: PathLike, identity: FileIdentity) -> bool:
        """Return True if this version of the file has a row in any state.

        A scan skips such files: only a new path or a changed identity needs
        the stability check.
        """
        return self._has_identity(path, identity, tuple(FileState))

    def _has_identity(
        self, path: PathLike, identity: FileIdentity, states: tuple[FileState, ...]
    ) -> bool:
        marks, values = state_marks(states)
        with self.transaction(f"look up {path}", write=False) as conn:
            row = conn.execute(
                "SELECT 1 FROM files WHERE path = ? AND device = ? AND inode = ? AND size = ?"
                f" AND mtime_ns = ? AND state IN ({marks})",
                (str(path), *identity_params(identity), *values),
            ).fetchone()
        return row is not None

    def record_for(self, path: PathLike) -> FileRecord | None:
        """Return the row of ``path`` in any state, or None."""
        with self.transaction(f"look up {path}", write=False) as conn:
            return select_file(conn, "path = ?", (str(path),))

    def object_key_for(self, path: PathLike) -> str | None:
        """Return the object key fixed at the path's first registration, or None.

        None also for a ``deleted`` row: a new file at that path gets a new key.
        """
        with self.transaction(f"look up {path}", write=False) as conn:
            record = select_file(conn, "path = ?", (str(path),))
        if record is None or record.state is FileState.DELETED:
            return None
        return record.object_key

    def get(self, file_id: int) -> FileRecord | None:
        """Return the row with this id, or None if there is none."""
        with self.transaction(f"read file id {file_id}", write=False) as conn:
            return select_file(conn, "id = ?", (file_id,))

    def claim(
        self,
        now: float,
        limit: int,
        *,
        include_failed: bool = False,
        max_delay_seconds: float | None = None,
    ) -> list[FileRecord]:
        """Mark up to ``limit`` due queue rows ``uploading`` and return them, oldest queued first.

        A pending row is due when ``next_attempt_at`` is NULL or <= ``now``.
        ``include_failed`` claims failed rows too, for scheduled runs. The
        select and the update are one ``BEGIN IMMEDIATE`` transaction, so no
        two threads or processes ever claim the same row.

        Retry times are wall-clock times. With ``max_delay_seconds``, a row
        due more than that far in the future counts as due now: no delay is
        that long, so the wall clock was stepped back after it was set.
        """
        if limit <= 0:
            return []

        stepped_after = now + max_delay_seconds if max_delay_seconds is not None else None
        with self.transaction("claim queued files") as conn:
            rows = conn.execute(
                f"SELECT {FILE_COLUMNS} FROM files"
                " WHERE (state = ? AND (next_attempt_at IS NULL OR next_attempt_at <= ?"
                " OR (? IS NOT NULL AND next_attempt_at > ?)))"
                " OR (state = ? AND ?) ORDER BY queued_at, id LIMIT ?",
                (
                    FileState.PENDING.value,
                    now,
                    stepped_after,
                    stepped_after,
                    FileState.FAILED.value,
                    include_failed,
                    limit,
                ),
            ).fetchall()
            updated_at = self._clock()
            conn.executemany(
                "UPDATE files SET state = ?, updated_at = ? WHERE id = ?",
                [(FileState.UPLOADING.value, updated_at, row["id"]) for row in rows],
            )

        return [
            replace(record_from_row(row), state=FileState.UPLOADING, updated_at=updated_at)
            for row in rows
        ]

    def retry_failed(self) -> int:
        """Put every ``failed`` row back to ``pending``, due now; return how many.

        Attempts are kept, so each such file gets one more attempt before it
        is ``failed`` again: this is how a scheduled run retries failed files.
        """
        with self.transaction("queue failed files again") as conn:
            cursor = conn.execute(
                "UPDATE files SET state = ?, next_attempt_at = NULL, updated_at = ? WHERE state = ?",
                (FileState.PENDING.value, self._clock(), FileState.FAILED.value),
            )
        return cursor.rowcount

    def make_due(self) -> int:
        """Make every ``pending`` row that waits for a retry time due now; return how many."""
        with self.transaction("make queued files due") as conn:
            cursor = conn.execute(
                "UPDATE files SET next_attempt_at = NULL, updated_at = ?"
                " WHERE state = ? AND next_attempt_at IS NOT NULL",
                (self._clock(), FileState.PENDING.value),
            )
        return cursor.rowcount

    def claim_paths(self, paths: list[Path], now: float) -> list[FileRecord]:
        """Mark the due ``pending`` rows of ``paths`` ``uploading`` and return them.

        Used when batch upload is off: a file that just became ready is
        uploaded alone, and the rest of the queue waits for a scheduled run.
        """
        if not paths:
            return []

        marks = ",".join("?" for _ in paths)
        with self.transaction("claim ready files") as conn:
            rows = conn.execute(
                f"SELECT {FILE_COLUMNS} FROM files WHERE path IN ({marks}) AND state = ?"
                " AND (next_attempt_at IS NULL OR next_attempt_at <= ?)",
                (*[str(path) for path in paths], FileState.PENDING.value, now),
            ).fetchall()
            updated_at = self._clock()
            conn.executemany(
                "UPDATE files SET state = ?, updated_at = ? WHERE id = ?",
                [(FileState.UPLOADING.value, updated_at, row["id"]) for row in rows],
            )

        return [
            replace(record_from_row(row), state=FileState.UPLOADING, updated_at=updated_at)
            for row in rows
        ]

    def has_pending(self, now: float | None = None) -> bool:
        """Return True if a pending row exists; with ``now``, only a row due by then counts."""
        due = now is not None
        with self.transaction("look up queued files", write=False) as conn:
            row = conn.execute(
                "SELECT 1 FROM files WHERE state = ?"
                " AND (? OR next_attempt_at IS NULL OR next_attempt_at <= ?) LIMIT 1",
                (FileState.PENDING.value, not due, now),
            ).fetchone()
        return row is not None

    def mark_uploaded(
        self,
        file_id: int,
        sha256: str,
        uploaded_at: float,
        delete_after: float | None,
        identity: FileIdentity,
    ) -> FileState | None:
        """Record that S3 confirmed the upload of the content with ``identity``.

        The row becomes ``uploaded`` with ``sha256`` (hex), ``uploaded_at``
        and ``delete_after`` (None: never deleted after upload), its
        multipart upload and parts cleared, and the method returns
        ``FileState.UPLOADED``. If the row's identity differs from
        ``identity``, the file changed and was queued again during the
        upload: the row goes back to ``pending`` with its newer identity and
        the method returns ``FileState.PENDING``. It returns None, with a
        warning, when the row is gone. Committed with ``synchronous=FULL``.
        """
        confirmed = ConfirmedUpload(file_id, sha256, uploaded_at, delete_after, identity)
        return self.mark_uploaded_many([confirmed])[0]

    def mark_uploaded_many(self, uploads: list[ConfirmedUpload]) -> list[FileState | None]:
        """Record several confirmed uploads as ``mark_uploaded`` does, with one disk sync.

        Returns one state per upload, in order. If the transaction fails, none
        is recorded and every row stays as it was.
        """
        if not uploads:
            return []

        action = f"record the upload of file id {uploads[0].file_id}"
        if len(uploads) > 1:
            action = f"record the uploads of {len(uploads)} files"
        with self.transaction(action, durable=True) as conn:
            return [self._mark_uploaded_in(conn, upload) for upload in uploads]

    def _mark_uploaded_in(
        self, conn: sqlite3.Connection, upload: ConfirmedUpload
    ) -> FileState | None:
        record = select_file(conn, "id = ?", (upload.file_id,))
        if record is None:
            logger.warning(
                "Upload of file id %d finished after its row was removed", upload.file_id
            )
            return None

        detach_upload(conn, upload.file_id)
        if record.identity != upload.identity:
            self._back_to_pending(conn, upload.file_id)
            logger.info("Queued %s again because it changed during its upload", record.path)
            return FileState.PENDING

        conn.execute(
            "UPDATE files SET state = ?, sha256 = ?, uploaded_at = ?, delete_after = ?,"
            " next_attempt_at = NULL, last_error = NULL, updated_at = ? WHERE id = ?",
            (FileState.UPLOADED.value, upload.sha256, upload.uploaded_at, upload.delete_after)
            + (self._clock(), upload.file_id),
        )
        return FileState.UPLOADED

    def _back_to_pending(self, conn: sqlite3.Connection, file_id: int) -> None:
        conn.execute(
            "UPDATE files SET state = ?, next_attempt_at = NULL, updated_at = ? WHERE id = ?",
            (FileState.PENDING.value, self._clock(), file_id),
        )

    def mark_retry(self, file_id: int, error: str, next_attempt_at: float) -> None:
        """Charge an attempt, store ``error`` and make the row ``pending`` again from then on."""
        with self.transaction(f"schedule a retry of file id {file_id}") as conn:
            conn.execute(
                "UPDATE files SET state = ?, attempts = attempts + 1, last_error = ?,"
                " next_attempt_at = ?, updated_at = ? WHERE id = ?",
                (FileState.PENDING.value, _error_text(error), next_attempt_at)
                + (self._clock(), file_id),
            )

    def mark_failed(self, file_id: int, error: str) -> None:
        """Charge an attempt, store ``error`` and mark the row ``failed``.

        Failed rows stay in the queue; ``claim(include_failed=True)`` takes
        them again at the next scheduled run.
        """
        with self.transaction(f"mark file id {file_id} failed") as conn:
            conn.execute(
                "UPDATE files SET state = ?, attempts = attempts + 1, last_error = ?,"
                " next_attempt_at = NULL, updated_at = ? WHERE id = ?",
                (FileState.FAILED.value, _error_text(error), self._clock(), file_id),
            )

    def release(self, file_id: int, *, next_attempt_at: float | None = None) -> None:
        """Put an ``uploading`` row back to ``pending`` without charging an attempt.

        With ``next_attempt_at`` the row is not due before that wall-clock time,
        for example while a file that changed during its upload settles again.
        """
        with self.transaction(f"release file id {file_id}") as conn:
            conn.execute(
                "UPDATE files SET state = ?, next_attempt_at = ?, updated_at = ?"
                " WHERE id = ? AND state = ?",
                (
                    FileState.PENDING.value,
                    next_attempt_at,
                    self._clock(),
                    file_id,
                    FileState.UPLOADING.value,
                ),
            )

    def remove(self, file_id: int) -> None:
        """Delete the row and its parts, for a log file that vanished before its upload."""
        with self.transaction(f"remove file id {file_id}") as conn:
            conn.execute("DELETE FROM files WHERE id = ?", (file_id,))

    def recover_interrupted(self) -> int:
        """Put every ``uploading`` row back to ``pending``; return how many there were.

        Call it once at startup before any upload starts: such rows were
        being uploaded when the previous process stopped.
        """
        with self.transaction("recover interrupted uploads") as conn:
            cursor = conn.execute(
                "UPDATE files SET state = ?, updated_at = ? WHERE state = ?",
                (FileState.PENDING.value, self._clock(), FileState.UPLOADING.value),
            )
            return cursor.rowcount

    def pending_paths(self) -> set[Path]:
        """Return the paths of every queue row (pending, uploading or failed).

        After a rebuild, the startup scan uses it to leave queued files alone.
        """
        marks, values = state_marks(QUEUE_STATES)
        with self.transaction("list queued files", write=False) as conn:
            rows = conn.execute(f"SELECT path FROM files WHERE state IN ({marks})", values)
            return {Path(row["path"]) for row in rows}
