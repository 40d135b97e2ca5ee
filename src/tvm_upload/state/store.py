"""``StateStore``, the one object the daemon uses, and ``open_store`` with its recovery."""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path

from typing_extensions import Self

from tvm_upload.errors import StateStoreError
from tvm_upload.state import legacy
from tvm_upload.state.database import Clock, CorruptStateStoreError, PathLike
from tvm_upload.state.journal import PartJournal
from tvm_upload.state.metricsbuffer import MetricsBuffer
from tvm_upload.state.registry import RegistryStore

logger = logging.getLogger(__name__)

SIDE_FILE_SUFFIXES = ("", "-wal", "-shm", "-journal")


class StateStore(RegistryStore, PartJournal, MetricsBuffer):
    """The queue and registry of log files in one SQLite database.

    ``StateStore(path, clock=time.time)`` creates the file if needed and
    upgrades its schema; ``StateStore(path, read_only=True)`` only reads,
    for ``tvm-upload status`` beside a running daemon. Every method is
    thread-safe and one transaction; see ``Database`` for locking, errors
    and durability, and the base classes for the methods of each table.
    """

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def import_legacy(
        self,
        queue_file: Path | None,
        registry_file: Path | None,
        resolve: legacy.Resolver,
        *,
        delete_after_seconds: float | None = None,
    ) -> int:
        """Import the older uploader's queue and registry files once; return the rows created.

        ``resolve`` maps a legacy path to ``(source, object_key)`` or None
        for a path outside every configured log directory. Each imported
        file is renamed to ``<name>.imported``; see ``tvm_upload.state.legacy``.
        """
        return legacy.import_legacy(
            self,
            queue_file,
            registry_file,
            resolve,
            delete_after_seconds=delete_after_seconds,
        )


def open_store(path: PathLike, clock: Clock = time.time) -> tuple[StateStore, bool]:
    """Open the state store at ``path`` for the daemon; return it and whether it was rebuilt.

    A file that is not a SQLite database or fails ``PRAGMA quick_check`` is
    moved aside, with any ``-wal`` and ``-shm`` file left beside it, to
    ``<name>.corrupt-<UTC time>``, logged at ERROR, and replaced by an empty
    store. An existing file with no content at all counts as lost. In both
    cases ``rebuilt`` is True and the caller rebuilds the queue from a scan.
    The damaged file never stops a start, so a restart cannot loop on it.
    Raises ``StateStoreError`` when the damaged file cannot be moved aside or
    an empty store cannot be created.
    """
    path = Path(path)
    _create_directory(path.parent)
    lost = _is_empty(path)

    problems, store = _open_checked(path, clock)
    if store is not None:
        if lost:
            logger.warning("The state store %s was empty; rebuilding it from a scan", path)
        return store, lost

    moved = _move_aside(path, clock())
    logger.error(
        "The state store %s is damaged (%s). Moved it to %s and started an empty store;"
        " the queue is rebuilt from a scan of the log directories",
        path,
        "; ".join(problems[:3]),
        moved,
    )
    return StateStore(path, clock), True


def _open_checked(path: Path, clock: Clock) -> tuple[list[str], StateStore | None]:
    """Return the store if it passes ``quick_check``, otherwise its problems and None."""
    try:
        store = StateStore(path, clock)
    except CorruptStateStoreError as error:
        return [str(error.__cause__ or error)], None

    try:
        problems = store.check_integrity(quick=True)
    except CorruptStateStoreError as error:
        problems = [str(error.__cause__ or error)]
    if not problems:
        return [], store

    store.close()
    return problems, None


def _create_directory(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise StateStoreError(
            f"Cannot create the state store directory {directory}: {error}. Create it and"
            " give tvm-upload's user write access, or set state_file to a writable path."
        ) from error


def _is_empty(path: Path) -> bool:
    try:
        if path.stat().st_size > 0:
            return False
    except FileNotFoundError:
        return False

    wal = path.with_name(path.name + "-wal")
    return not wal.exists() or wal.stat().st_size == 0


def _move_aside(path: Path, now: float) -> Path:
    """Rename the database and its side files to ``<name>.corrupt-<UTC time>``; return the new name."""
    stamp = datetime.fromtimestamp(now, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.corrupt-{stamp}")
    number = 1
    while any(_side_file(target, suffix).exists() for suffix in SIDE_FILE_SUFFIXES):
        target = path.with_name(f"{path.name}.corrupt-{stamp}-{number}")
        number += 1

    for suffix in SIDE_FILE_SUFFIXES:
        source = _side_file(path, suffix)
        if not source.exists():
            continue
        try:
            os.rename(source, _side_file(target, suffix))
        except OSError as error:
            raise StateStoreError(
                f"Cannot move the damaged state store file {source} aside: {error}."
                " Move or delete it by hand; tvm-upload then starts with an empty store."
            ) from error
    return target


def _side_file(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)
