"""One-time import of the older uploader's JSON queue and registry into the state store.

The older uploader kept two files, written by its ``src/queue_manager.py``
and ``src/file_monitor.py``:

- the queue, a JSON list of ``{"filepath", "size", "detected_at", "attempts"}``
  where ``detected_at`` is a local time in ISO 8601 without zone, next to a
  ``<name>.json.bak`` copy of the previous version;
- the registry of uploaded files, a JSON object whose ``"files"`` member (or
  the whole object, in its oldest form) maps ``"<path>::<size>::<mtime>"`` to
  ``{"processed_at", "size", "mtime", "filepath", "filename"}`` with times
  as float seconds since the epoch.

Registry entries whose file still has the recorded size and mtime become
``uploaded`` rows, so those files are not sent again. Queue entries whose
file still exists become ``pending`` rows with the file's current identity
and 0 attempts, so each file gets this uploader's full number of attempts.
Each file is imported in one transaction that commits before the file is
renamed to ``<name>.imported``. A run interrupted in between imports the file
again without creating duplicates, because rows that exist are left alone.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tvm_upload.files import FileIdentity
from tvm_upload.state.queue import insert_file
from tvm_upload.state.records import EnqueueResult, FileState

if TYPE_CHECKING:
    from tvm_upload.state.store import StateStore

logger = logging.getLogger(__name__)

IMPORTED_SUFFIX = ".imported"
MTIME_TOLERANCE_SECONDS = 1e-6

_INVALID = object()

Resolver = Callable[[Path], "tuple[str, str] | None"]


@dataclass(frozen=True)
class _RegistryEntry:
    """An entry of the old registry; times in seconds since the epoch."""

    path: Path
    size: int
    mtime: float
    processed_at: float | None


@dataclass(frozen=True)
class _QueueEntry:
    """An entry of the old queue; ``detected_at`` in seconds since the epoch."""

    path: Path
    detected_at: float | None


@dataclass(frozen=True)
class _Candidate:
    """A legacy entry whose file exists inside a configured log directory."""

    path: Path
    source: str
    object_key: str
    identity: FileIdentity
    at: float


def import_legacy(
    store: StateStore,
    queue_file: Path | None,
    registry_file: Path | None,
    resolve: Resolver,
    *,
    delete_after_seconds: float | None = None,
) -> int:
    """Import the older uploader's files if they exist; return the number of rows created.

    ``resolve`` maps a legacy path to ``(source, object_key)``, or None for
    a path outside every configured log directory (skipped with a warning).
    Imported registry rows may be deleted locally ``delete_after_seconds``
    after their recorded upload (None: never by the after-upload rule). The
    registry goes first, so a file listed in both is not queued again. A
    file that cannot be parsed is logged and left in place, not renamed.

    NOTE: rows keep the legacy path as written, and the older registry wrote
    resolved paths. Under a configured directory reached through a symlink,
    the scan finds the same files by another path and uploads them again.
    """
    imported = 0
    if registry_file is not None and registry_file.exists():
        imported += _import_registry(store, registry_file, resolve, delete_after_seconds)
    if queue_file is not None and queue_file.exists():
        imported += _import_queue(store, queue_file, resolve)
    return imported


def _import_registry(
    store: StateStore, registry_file: Path, resolve: Resolver, delete_after_seconds: float | None
) -> int:
    entries = _read_registry(registry_file)
    if entries is None:
        return 0

    candidates = [c for c in (_registry_candidate(e, resolve) for e in entries) if c is not None]
    imported = 0
    with store.transaction(f"import {registry_file}", durable=True) as conn:
        for candidate in candidates:
            if conn.execute(
                "SELECT 1 FROM files WHERE path = ?", (str(candidate.path),)
            ).fetchone():
                continue
            delete_after = None
            if delete_after_seconds is not None:
                delete_after = candidate.at + delete_after_seconds
            insert_file(
                conn,
                str(candidate.path),
                candidate.source,
                candidate.identity,
                candidate.object_key,
                candidate.at,
                state=FileState.UPLOADED,
                uploaded_at=candidate.at,
                delete_after=delete_after,
            )
            imported += 1

    logger.info(
        "Imported %d of %d entries of the old registry %s as uploaded files",
        imported,
        len(entries),
        registry_file,
    )
    _rename_imported(registry_file)
    return imported


def _import_queue(store: StateStore, queue_file: Path, resolve: Resolver) -> int:
    entries = _read_queue(queue_file)
    if entries is None:
        return 0

    candidates = [c for c in (_queue_candidate(e, resolve) for e in entries) if c is not None]
    imported = 0
    with store.transaction(f"import {queue_file}", durable=True) as conn:
        for candidate in candidates:
            result = store.enqueue_in(
                conn,
                str(candidate.path),
                candidate.source,
                candidate.identity,
                candidate.object_key,
                candidate.at,
            )
            if result in (EnqueueResult.QUEUED, EnqueueResult.REQUEUED_CHANGED):
                imported += 1

    logger.info(
        "Imported %d of %d entries of the old queue %s as queued files",
        imported,
        len(entries),
        queue_file,
    )
    _rename_imported(queue_file)
    return imported


def _registry_candidate(entry: _RegistryEntry, resolve: Resolver) -> _Candidate | None:
    path = entry.path
    found = _existing_file(path, resolve, "registry")
    if found is None:
        return None

    (source, object_key), st = found
    if st.st_size != entry.size or abs(st.st_mtime - entry.mtime) > MTIME_TOLERANCE_SECONDS:
        logger.info(
            "Not importing %s from the old registry: it changed after that upload, so it"
            " will be uploaded again",
            path,
        )
        return None

    at = entry.processed_at if entry.processed_at is not None else st.st_mtime
    return _Candidate(path, source, object_key, FileIdentity.from_stat(st), at)


def _queue_candidate(entry: _QueueEntry, resolve: Resolver) -> _Candidate | None:
    path = entry.path
    found = _existing_file(path, resolve, "queue")
    if found is None:
        return None

    (source, object_key), st = found
    at = entry.detected_at if entry.detected_at is not None else st.st_mtime
    return _Candidate(path, source, object_key, FileIdentity.from_stat(st), at)


def _existing_file(
    path: Path, resolve: Resolver, kind: str
) -> tuple[tuple[str, str], os.stat_result] | None:
    """Return the resolved source and key and the ``lstat`` of a regular file, or None."""
    target = resolve(path)
    if target is None:
        logger.warning(
            "Not importing %s from the old %s: it is outside every configured log directory",
            path,
            kind,
        )
        return None

    try:
        st = os.lstat(path)
    except FileNotFoundError:
        logger.info("Not importing %s from the old %s: the file no longer exists", path, kind)
        return None
    except OSError as error:
        logger.warning("Not importing %s from the old %s: %s", path, kind, error)
        return None

    if not stat.S_ISREG(st.st_mode):
        logger.warning("Not importing %s from the old %s: not a regular file", path, kind)
        return None
    return target, st


def _read_registry(registry_file: Path) -> list[_RegistryEntry] | None:
    data = _load_json(registry_file)
    if data is None:
        return None
    files = data.get("files", {}) if isinstance(data, dict) and "_metadata" in data else data
    if not isinstance(files, dict):
        logger.error(
            "Cannot import the old registry %s: invalid format, expected a JSON object of files",
            registry_file,
        )
        return None

    entries = [_registry_entry(key, meta) for key, meta in files.items()]
    for key, entry in zip(files, entries):
        if entry is None:
            logger.warning("Skipped an invalid entry %r of the old registry %s", key, registry_file)
    return [entry for entry in entries if entry is not None]


def _registry_entry(key: Any, meta: Any) -> _RegistryEntry | None:
    """Return one registry entry, or None if it lacks a path, size or mtime."""
    if not isinstance(key, str) or not isinstance(meta, dict):
        return None
    parts = key.rsplit("::", 2)
    from_key = parts if len(parts) == 3 else [key, None, None]
    path = meta.get("filepath") or from_key[0]
    size = _optional_float(meta.get("size", from_key[1]))
    mtime = _optional_float(meta.get("mtime", from_key[2]))
    if not path or size is None or mtime is None:
        return None
    return _RegistryEntry(Path(path), int(size), mtime, _optional_float(meta.get("processed_at")))


def _read_queue(queue_file: Path) -> list[_QueueEntry] | None:
    data = _load_json(queue_file)
    if data is None:
        return None
    if not isinstance(data, list):
        logger.error(
            "Cannot import the old queue %s: invalid format, expected a JSON list of files",
            queue_file,
        )
        return None

    entries = []
    for item in data:
        if not isinstance(item, dict) or not isinstance(item.get("filepath"), str):
            logger.warning("Skipped an invalid entry %r of the old queue %s", item, queue_file)
            continue
        entries.append(_QueueEntry(Path(item["filepath"]), _local_time(item.get("detected_at"))))
    return entries


def _load_json(path: Path) -> Any | None:
    """Parse ``path``, or its ``.json.bak`` copy if ``path`` is damaged; None if neither parses."""
    data = _parse_json(path)
    if data is not _INVALID:
        return data

    backup = path.with_suffix(".json.bak")
    if backup != path and backup.exists():
        data = _parse_json(backup)
        if data is not _INVALID:
            logger.warning("Importing the backup copy %s in place of %s", backup, path)
            return data

    logger.error(
        "Did not import %s because neither it nor a backup copy could be parsed. Fix or"
        " remove the file; tvm-upload tries again at the next start",
        path,
    )
    return None


def _parse_json(path: Path) -> Any:
    try:
        with path.open(encoding="utf-8") as file:
            return json.load(file)
    except (OSError, ValueError) as error:
        logger.warning("Cannot read the old uploader's file %s: %s", path, error)
        return _INVALID


def _local_time(text: Any) -> float | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


def _optional_float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _rename_imported(path: Path) -> None:
    target = path.with_name(path.name + IMPORTED_SUFFIX)
    try:
        os.replace(path, target)
    except OSError as error:
        logger.warning(
            "Imported %s but cannot rename it to %s: %s. It is imported again, without"
            " duplicates, at the next start",
            path,
            target,
            error,
        )
        return
    logger.info("Renamed the imported file %s to %s", path, target)
