"""Detection side of the daemon: watcher events and scans become queue rows.

Watcher threads only append to ``events``; everything else here runs on
the main loop, so the stability tracker and the state store are touched by
one thread.
"""

from __future__ import annotations

import logging
import os
import queue
import stat
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from tvm_upload.clock import Clock
from tvm_upload.config import Config, LogDirectory
from tvm_upload.daemonstatus import daemon_status_path
from tvm_upload.errors import StateStoreError
from tvm_upload.keys import ObjectKeyError, build_key
from tvm_upload.scan import scan_batches
from tvm_upload.stability import ReadyFile, StabilityTracker
from tvm_upload.state import EnqueueResult, FileState, ReadyEntry, StateStore
from tvm_upload.state.registry import file_version

logger = logging.getLogger(__name__)

SECONDS_PER_DAY = 86400.0
MAX_QUEUED_PER_STEP = 256
"""Maximum ready files queued per main-loop step. A larger backlog is queued over several steps."""


class Intake:
    """Feeds detected files through the stability check into the queue."""

    def __init__(self, config: Config, store: StateStore, clock: Clock) -> None:
        self.config = config
        self.store = store
        self.clock = clock
        self.events: queue.SimpleQueue[tuple[Path, LogDirectory]] = queue.SimpleQueue()
        self.stability = StabilityTracker(
            config.upload.file_stable_seconds, clock=clock.monotonic, wall_clock=clock.time
        )
        self._unqueued: list[ReadyFile] = []
        self._queued_unreported: list[Path] = []

    def on_event(self, path: Path, directory: LogDirectory) -> None:
        """Take a watcher event; called from watchdog threads, so it only enqueues."""
        self.events.put((path, directory))

    def apply_config(self, config: Config) -> None:
        """Use a reloaded configuration for files detected from now on."""
        self.config = config
        self.stability.stable_seconds = config.upload.file_stable_seconds

    def scan(self, min_mtime: float | None) -> int:
        """Observe every log file under the roots that is not known with its current identity.

        A file is known when its path has a row in any state with the same
        identity (``StateStore.is_known``). Each batch of one directory's files
        is looked up with one query. Returns the number of files handed to the
        stability tracker.
        """
        observed = 0
        for batch in scan_batches(self.config.log_directories, min_mtime=min_mtime):
            versions = [
                file_version(path, st)
                for path, st in batch.files
                if path.isascii() or storable(Path(path))
            ]
            for path in self.store.unknown_paths(versions):
                self.stability.observe(Path(path), batch.directory)
                observed += 1
        return observed

    def rebuild_scan(self) -> int:
        """Observe every log file under the roots, whatever its age, after the store was lost.

        The lost store knew which files were queued, so ``scan_existing_files``
        (its age limit, and ``enabled: false``) is ignored once: skipping an old
        queued file would lose it. The uploader hashes each file and sends it only
        when a HEAD of its object key shows no object with the same ``sha256``
        metadata, so a file already in the bucket is read but not sent again.
        Returns the number of files handed to the stability tracker.
        """
        observed = self.scan(None)
        logger.info(
            "Rebuild scan found %d log files; each is checked against its S3 object first",
            observed,
        )
        return observed

    def step(self) -> list[Path]:
        """Take pending events, then queue files that became ready; return their paths.

        At most ``MAX_QUEUED_PER_STEP`` files are queued per call, in one state
        store commit, so uploads start while a large backlog is still being
        queued. ``has_unqueued`` is True while more are ready. When the state store
        cannot be written, the StateStoreError propagates. The ready files not
        queued yet and the paths queued before the failure are kept for the next
        call, so a full disk never makes a ready file wait for a scan.
        """
        while True:
            try:
                path, directory = self.events.get_nowait()
            except queue.Empty:
                break
            self.stability.observe(path, directory)

        ready = self._unqueued + self.stability.poll()
        batch, self._unqueued = ready[:MAX_QUEUED_PER_STEP], ready[MAX_QUEUED_PER_STEP:]
        queued, self._queued_unreported = self._queued_unreported, []
        try:
            queued.extend(self._enqueue(batch))
        except StateStoreError:
            self._unqueued = batch + self._unqueued
            self._queued_unreported = queued
            raise
        return queued

    @property
    def has_unqueued(self) -> bool:
        """True when files are ready but wait for the next ``step`` to be queued."""
        return bool(self._unqueued)

    def unqueued_paths(self) -> list[Path]:
        """Return the paths of files that are ready but not queued yet."""
        return [ready.path for ready in self._unqueued]

    def release_unqueued(self) -> None:
        """Hand the files that are ready but not queued yet back to the stability tracker.

        A reload calls it before it fits the tracked files to the new log
        directories, so these files get their new directory or are dropped too.
        """
        for ready in self._unqueued:
            self.stability.observe(ready.path, ready.directory)
        self._unqueued = []

    def _enqueue(self, batch: list[ReadyFile]) -> list[Path]:
        """Queue the files of ``batch`` that need an upload; return the paths queued."""
        entries: list[tuple[ReadyFile, ReadyEntry]] = []
        for ready in batch:
            entry = self._entry(ready)
            if entry is not None:
                entries.append((ready, entry))

        results = self.store.enqueue_many([entry for _, entry in entries], now=self.clock.time())
        queued = []
        for (ready, entry), result in zip(entries, results):
            if result in (EnqueueResult.QUEUED, EnqueueResult.REQUEUED_CHANGED):
                self._log_queued(entry, result)
                queued.append(ready.path)
        return queued

    def _entry(self, ready: ReadyFile) -> ReadyEntry | None:
        if not storable(ready.path) or not below_root_without_symlinks(ready.path, ready.directory):
            return None
        try:
            key = self._object_key(ready)
        except ObjectKeyError as error:
            logger.error("Skipped %s: it has no valid object key: %s", ready.path, error)
            return None
        return ReadyEntry(ready.path, ready.directory.source, ready.identity, key)

    @staticmethod
    def _log_queued(entry: ReadyEntry, result: EnqueueResult) -> None:
        logger.info(
            "Queued %s (%d bytes) as %s%s",
            entry.path,
            entry.identity.size,
            entry.object_key,
            "; content changed since its upload"
            if result is EnqueueResult.REQUEUED_CHANGED
            else "",
        )

    def _object_key(self, ready: ReadyFile) -> str:
        """Return the path's first object key, or a new one for a new file at a deleted path.

        A new file at a path whose file retention deleted must not replace the
        deleted file's object, which is then its only copy: when the new key
        equals the old one, ``~<mtime in ns>`` is appended.
        """
        record = self.store.record_for(ready.path)
        if record is not None and record.state is not FileState.DELETED:
            return record.object_key

        key = self._build_key(ready)
        if record is not None and key == record.object_key:
            key = f"{key}~{ready.identity.mtime_ns}"
        return key

    def _build_key(self, ready: ReadyFile) -> str:
        relative = PurePosixPath(ready.path.relative_to(ready.directory.path).as_posix())
        now = datetime.fromtimestamp(self.clock.time(), timezone.utc)
        object_key = build_key(
            self.config.vehicle_id,
            ready.directory.source,
            relative,
            ready.identity.mtime_ns,
            self.config.zone(),
            now,
        )
        if object_key.date_reason:
            logger.warning(
                "Dated object key %s by detection time: %s", object_key.key, object_key.date_reason
            )
        return object_key.key


def import_legacy_state(config: Config, store: StateStore, clock: Clock) -> int:
    """Import the older uploader's JSON queue and registry once, if they exist.

    A legacy path is imported only when it lies in a configured log
    directory and matches its rules; its object key is built as for a newly
    detected file. Returns the number of rows created.
    """
    queue_file = config.upload.queue_file
    registry_file = config.upload.processed_files_registry.registry_file
    if not queue_file.exists() and not registry_file.exists():
        return 0

    def resolve(path: Path) -> tuple[str, str] | None:
        directory = directory_of(config, path)
        if directory is None or not storable(path):
            return None
        if not below_root_without_symlinks(path, directory) or path.is_symlink():
            logger.warning("Skipped legacy entry %s: it is reached through a symlink", path)
            return None
        try:
            mtime_ns = path.lstat().st_mtime_ns
        except OSError:
            mtime_ns = int(clock.time() * 1e9)
        relative = PurePosixPath(path.relative_to(directory.path).as_posix())
        now = datetime.fromtimestamp(clock.time(), timezone.utc)
        try:
            key = build_key(
                config.vehicle_id, directory.source, relative, mtime_ns, config.zone(), now
            )
        except ObjectKeyError as error:
            logger.error("Skipped legacy entry %s: it has no valid object key: %s", path, error)
            return None
        return directory.source, key.key

    # The older registry records a file as uploaded but nothing here verified
    # the object, so imported rows get no deletion time: the after-upload rule
    # never deletes them (age-based and emergency rules still may).
    imported = store.import_legacy(queue_file, registry_file, resolve, delete_after_seconds=None)
    logger.info(
        "Imported %d files from the older uploader's %s and %s", imported, queue_file, registry_file
    )
    return imported


def directory_of(config: Config, path: Path) -> LogDirectory | None:
    """Return the configured log directory whose rules accept ``path``, or None."""
    for directory in config.log_directories:
        try:
            relative = path.relative_to(directory.path)
        except ValueError:
            continue
        if directory.accepts(PurePosixPath(relative.as_posix())):
            return directory
    return None


def state_store_lost(state_file: Path) -> bool:
    """Tell whether the state store is missing although a daemon used it before.

    The daemon status file beside the store outlives it, so its presence shows
    that the store was deleted rather than never created. Logs an ERROR when so.
    """
    status_file = daemon_status_path(state_file)
    if state_file.exists() or not status_file.exists():
        return False

    logger.error(
        "The state store %s is missing, but %s shows that a daemon used it before",
        state_file,
        status_file,
    )
    return True


_unstorable_logged: set[str] = set()


def storable(path: Path) -> bool:
    """Tell whether the state store can hold ``path``; log each path that it cannot, once.

    Paths are stored as UTF-8 text, so a file name that is not valid UTF-8
    (Python keeps such bytes as surrogate escapes) cannot be queued.
    """
    text = str(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        if text not in _unstorable_logged:
            _unstorable_logged.add(text)
            logger.error(
                "Skipped %r: its name is not valid UTF-8, which the state store cannot hold;"
                " rename the file to upload it",
                text,
            )
        return False
    return True


def below_root_without_symlinks(path: Path, directory: LogDirectory) -> bool:
    """Tell whether every directory between the root and ``path`` is a real directory.

    A directory swapped for a symlink after the file was detected would
    otherwise lead the upload outside the watched tree.
    """
    try:
        relative = path.relative_to(directory.path)
    except ValueError:
        return False

    current = directory.path
    for part in relative.parts[:-1]:
        current = current / part
        try:
            if not stat.S_ISDIR(os.lstat(current).st_mode):
                logger.warning(
                    "Skipped %s: %s is no longer a directory inside the tree", path, current
                )
                return False
        except OSError:
            return False
    return True
