"""The SQLite connection under the state store: opening, migration and transactions.

Durability: the database runs in WAL mode with ``synchronous=NORMAL``, so
every commit survives a crash or ``kill -9`` of the process. After a power
cut, WAL mode with NORMAL may lose the last commits, so the writes whose
loss could drop a queued file or forget an upload (``enqueue``,
``mark_uploaded``, ``import_legacy``) run with ``synchronous=FULL`` and sync
the WAL before they return. Losing any other write leaves a row in an
earlier state that is still safe. A lost claim leaves the row pending, and
a lost retry or failure mark only retries sooner. A lost part record sends
that part again. A lost removal or deletion mark is repeated when the file
is found gone again, and counters lose their last increments.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tvm_upload.errors import StateStoreError
from tvm_upload.state.schema import ADDED_INDEXES, MIGRATIONS, SCHEMA_VERSION

logger = logging.getLogger(__name__)

BUSY_TIMEOUT_SECONDS = 10.0

Clock = Callable[[], float]
PathLike = str | os.PathLike[str]

_SQLITE_CORRUPT = 11
_SQLITE_FULL = 13
_SQLITE_NOTADB = 26


class CorruptStateStoreError(StateStoreError):
    """SQLite reports that the state store file is not a database or is damaged."""


def _primary_code(error: sqlite3.Error) -> int | None:
    code = getattr(error, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def is_disk_full(error: sqlite3.Error) -> bool:
    """Return True for SQLITE_FULL: the disk is full or ``max_page_count`` was reached."""
    return _primary_code(error) == _SQLITE_FULL or "database or disk is full" in str(error)


def is_corrupt(error: sqlite3.Error) -> bool:
    """Return True for SQLITE_CORRUPT and SQLITE_NOTADB."""
    if _primary_code(error) in (_SQLITE_CORRUPT, _SQLITE_NOTADB):
        return True
    text = str(error)
    return "file is not a database" in text or "malformed" in text


class Database:
    """One SQLite connection shared by every thread, one transaction per call.

    A lock makes each transaction run alone on the connection. Writes take
    the database lock at once (``BEGIN IMMEDIATE``), so a writer in another
    process waits up to ``BUSY_TIMEOUT_SECONDS`` instead of failing halfway.
    Every SQLite error surfaces as ``StateStoreError`` (``CorruptStateStoreError``
    when the file is damaged) after the open transaction was rolled back.
    With ``read_only=True`` the file is never created, migrated or changed,
    and any write raises ``StateStoreError``.
    """

    def __init__(self, path: PathLike, clock: Clock = time.time, *, read_only: bool = False):
        self.path = Path(path)
        self.read_only = read_only
        self._clock = clock
        self._lock = threading.RLock()
        self._conn: sqlite3.Connection | None = self._connect()
        try:
            self._prepare()
        except BaseException:
            self.close()
            raise

    def _connect(self) -> sqlite3.Connection:
        target = f"{self.path.absolute().as_uri()}?mode=ro" if self.read_only else str(self.path)
        try:
            conn = sqlite3.connect(
                target,
                uri=self.read_only,
                timeout=BUSY_TIMEOUT_SECONDS,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as error:
            raise StateStoreError(
                f"Cannot open the state store {self.path}: {error}. Check that its directory"
                " exists and that tvm-upload's user may read and write there."
            ) from error
        conn.row_factory = sqlite3.Row
        return conn

    def _prepare(self) -> None:
        try:
            version = int(self._pragma("user_version"))
            self._check_version(version)
            if not self.read_only:
                self._enable_wal()
                self._pragma("synchronous = NORMAL")
                self._pragma("foreign_keys = ON")
        except sqlite3.Error as error:
            raise self._store_error(error, "open the state store") from error

        if not self.read_only:
            self._migrate(version)
            self._add_indexes()

    def _pragma(self, statement: str) -> Any:
        row = self._connection().execute(f"PRAGMA {statement}").fetchone()
        return None if row is None else row[0]

    def _check_version(self, version: int) -> None:
        if version <= SCHEMA_VERSION:
            return
        raise StateStoreError(
            f"The state store {self.path} has schema version {version}, but this tvm-upload"
            f" reads versions up to {SCHEMA_VERSION}. Install the newer tvm-upload that wrote"
            " it, or move the file away to start with an empty store."
        )

    def _enable_wal(self) -> None:
        mode = str(self._pragma("journal_mode = WAL")).lower()
        if mode != "wal":
            logger.warning(
                "The state store %s uses journal mode %s because its filesystem does not"
                " support WAL; tvm-upload status may wait for the daemon's writes",
                self.path,
                mode,
            )

    def _migrate(self, version: int) -> None:
        created = version == 0
        while version < SCHEMA_VERSION:
            with self.transaction(f"upgrade the schema to version {version + 1}") as conn:
                MIGRATIONS[version](conn)
                # PRAGMA takes no parameters; the value is an integer of ours.
                conn.execute(f"PRAGMA user_version = {int(version + 1)}")
            if not created:
                logger.info(
                    "Upgraded the state store %s to schema version %d", self.path, version + 1
                )
            version += 1

        if created:
            logger.info("Created the state store %s (schema version %d)", self.path, version)

    def _add_indexes(self) -> None:
        with self.transaction("list indexes", write=False) as conn:
            rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'").fetchall()
        missing = set(ADDED_INDEXES) - {row["name"] for row in rows}
        if not missing:
            return

        with self.transaction("add indexes") as conn:
            for name in sorted(missing):
                conn.execute(ADDED_INDEXES[name])

    def close(self) -> None:
        """Close the connection; later calls raise ``StateStoreError``. Safe to call twice."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise StateStoreError(f"The state store {self.path} is closed")
        return self._conn

    def _now(self, now: float | None) -> float:
        return self._clock() if now is None else now

    @contextmanager
    def transaction(
        self, action: str, *, write: bool = True, durable: bool = False
    ) -> Iterator[sqlite3.Connection]:
        """Run the body as one transaction under the lock and translate SQLite errors.

        ``action`` completes the error message "Cannot ...". ``write`` takes
        the write lock at BEGIN; a read gets one consistent snapshot.
        ``durable`` syncs the WAL at this commit (``synchronous=FULL``).
        """
        with self._lock:
            conn = self._connection()
            if conn.in_transaction:
                # Only this thread can hold the lock, so it called a store method
                # inside its own transaction; a rollback here would undo that one.
                raise StateStoreError(
                    f"Cannot {action}: a state store transaction is already open in this"
                    " thread. Do the work with the open connection instead."
                )
            if durable:
                self._set_synchronous(conn, "FULL")
            try:
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                yield conn
                conn.execute("COMMIT")
            except sqlite3.Error as error:
                self._rollback(conn)
                raise self._store_error(error, action) from error
            except BaseException:
                self._rollback(conn)
                raise
            finally:
                if durable:
                    self._set_synchronous(conn, "NORMAL")

    @staticmethod
    def _set_synchronous(conn: sqlite3.Connection, level: str) -> None:
        try:
            conn.execute(f"PRAGMA synchronous = {level}")
        except sqlite3.Error as error:
            logger.warning("Cannot set synchronous = %s on the state store: %s", level, error)

    @staticmethod
    def _rollback(conn: sqlite3.Connection) -> None:
        # SQLite ends the transaction by itself after some errors, a full disk among them.
        if not conn.in_transaction:
            return
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error as error:
            logger.warning("Rollback of a state store transaction failed: %s", error)

    def _store_error(self, error: sqlite3.Error, action: str) -> StateStoreError:
        if is_disk_full(error):
            return StateStoreError(
                f"Cannot {action}: the filesystem holding the state store {self.path} is full"
                f" ({error}). The change was rolled back; free space there and try again."
            )
        if is_corrupt(error):
            return CorruptStateStoreError(
                f"Cannot {action}: the state store {self.path} is damaged ({error}). Restart"
                " tvm-upload: it moves the damaged file aside and rebuilds the store."
            )
        return StateStoreError(f"Cannot {action} in the state store {self.path}: {error}")

    def check_integrity(self, *, quick: bool = False) -> list[str]:
        """Run SQLite's ``integrity_check`` (``quick_check`` if ``quick``); return its problems.

        An empty list means the database is sound. ``quick`` skips the check
        that indexes match their tables and runs in about linear time.
        """
        pragma = "quick_check" if quick else "integrity_check"
        with self.transaction("check the state store", write=False) as conn:
            rows = conn.execute(f"PRAGMA {pragma}").fetchall()
        problems = [str(row[0]) for row in rows]
        return [] if problems == ["ok"] else problems
