"""Finding log files: inotify watches on the configured directories, and directory scans.

``Watcher`` reports paths that may be new or changed log files. It does not
decide whether they are ready (``stability`` does) or queued (``state``
does), so reporting a path twice is harmless. ``scan`` walks the configured
directories for the startup and reconciliation scans.

Both never follow a symlink inside a watched tree: a symlink to a file is
never reported and a symlink to a directory is never descended into. A
configured root that is itself a symlink to a directory is used, because the
operator named it; its files are reported under the configured path.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from watchdog.events import (
    EVENT_TYPE_CLOSED,
    EVENT_TYPE_CREATED,
    EVENT_TYPE_MODIFIED,
    EVENT_TYPE_MOVED,
    DirCreatedEvent,
    DirMovedEvent,
    EventsLostEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.inotify import InotifyObserver

from tvm_upload.config import LogDirectory
from tvm_upload.scan import unreadable_warnings, walk

logger = logging.getLogger(__name__)

OnEvent = Callable[[Path, LogDirectory], None]
ObserverFactory = Callable[[], BaseObserver]

WATCH_RETRY_SECONDS = 600.0

# watchdog 7.1 reports an inotify queue overflow as an event of this type.
_EVENT_TYPE_EVENTS_LOST = "events_lost"
_FILE_EVENT_TYPES = frozenset({EVENT_TYPE_CREATED, EVENT_TYPE_MODIFIED, EVENT_TYPE_CLOSED})
_WATCHDOG_INOTIFY_LOGGER = "watchdog.observers.inotify"
_WATCHED_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileClosedEvent,
    FileMovedEvent,
    DirCreatedEvent,
    DirMovedEvent,
    EventsLostEvent,
]
"""Events the handler uses. watchdog subscribes inotify to these only, so the daemon's own
reads of the files it uploads (open, read, close without writing) cost no events."""

# Errors of inotify_init / inotify_add_watch that mean a kernel limit is
# reached, with the sysctl that raises it and a value to suggest.
_LIMIT_SYSCTLS = {
    errno.ENOSPC: ("fs.inotify.max_user_watches", 524288),
    errno.EMFILE: ("fs.inotify.max_user_instances", 1024),
}
_QUEUE_SYSCTL = ("fs.inotify.max_queued_events", 65536)


class _RootState(enum.Enum):
    MISSING = "missing"
    WATCHED = "watched"
    SCANNED = "scanned"


@dataclass
class _Root:
    """One configured directory and how it is followed now."""

    directory: LogDirectory
    state: _RootState = _RootState.MISSING
    watch: ObservedWatch | None = None
    identity: tuple[int, int] | None = None
    snapshot: dict[Path, tuple[int, int, int, int]] = field(default_factory=dict)
    next_scan_at: float = 0.0
    retry_watch_at: float = 0.0


class Watcher:
    """Report new and changed log files of the configured directories.

    ``on_event(path, directory)`` is called from watchdog's threads for
    inotify events, and from the thread calling ``poll`` for files found by
    scanning. It must be cheap and thread-safe: the daemon only puts the
    pair on a queue. An exception it raises is logged and the watcher goes
    on. The same path may be reported many times (once per write event).

    ``start``, ``stop``, ``update``, ``poll`` and ``overflowed`` are meant
    to be called from one thread, the daemon's main loop, with ``poll``
    about every second. A directory that cannot be watched because an
    inotify limit is reached is scanned every ``fallback_scan_seconds`` of
    ``clock`` instead, and watching it is retried every 10 minutes.
    """

    def __init__(
        self,
        directories: Sequence[LogDirectory],
        on_event: OnEvent,
        *,
        observer_factory: ObserverFactory = InotifyObserver,
        clock: Callable[[], float] = time.monotonic,
        fallback_scan_seconds: float = 30.0,
        stop_timeout_seconds: float = 5.0,
    ) -> None:
        self._on_event = on_event
        self._observer_factory = observer_factory
        self._clock = clock
        self._fallback_scan_seconds = fallback_scan_seconds
        self._stop_timeout_seconds = stop_timeout_seconds
        self._roots = {directory.path: _Root(directory) for directory in directories}
        self._observer: BaseObserver | None = None
        self._lock = threading.Lock()
        self._events_lost = False
        self._warned_sysctls: set[str] = set()
        self._unwatched_paths: list[tuple[str, int]] = []
        self._limit_filter = _WatchLimitFilter(self._note_unwatched_path)

    def start(self) -> None:
        """Start the inotify observer and watch every root that exists.

        Files already present are not reported: the daemon's startup scan
        finds them. Roots that do not exist yet are watched by ``poll`` once
        they appear.
        """
        if self._observer is not None:
            raise RuntimeError("Watcher.start() was called twice")

        self._observer = self._observer_factory()
        self._observer.start()
        logging.getLogger(_WATCHDOG_INOTIFY_LOGGER).addFilter(self._limit_filter)

        for root in self._roots.values():
            self._start_root(root, report_existing=False)

    def stop(self) -> None:
        """Stop watching and join watchdog's threads, waiting at most ``stop_timeout_seconds``."""
        observer = self._observer
        if observer is None:
            return

        self._observer = None
        logging.getLogger(_WATCHDOG_INOTIFY_LOGGER).removeFilter(self._limit_filter)
        for root in self._roots.values():
            self._forget_watch(root)

        deadline = time.monotonic() + self._stop_timeout_seconds
        stopper = threading.Thread(target=observer.stop, name="watcher-stop", daemon=True)
        stopper.start()
        stopper.join(self._stop_timeout_seconds)
        if observer.is_alive():
            observer.join(max(0.0, deadline - time.monotonic()))

        if stopper.is_alive() or observer.is_alive():
            logger.warning(
                "The inotify observer did not stop within %.1f s; its threads are left behind",
                self._stop_timeout_seconds,
            )

    def update(self, directories: Sequence[LogDirectory]) -> None:
        """Replace the configured directories, as after a configuration reload.

        Removed roots stop being watched. Added roots, and roots whose
        settings changed, are (re)started like in ``start``: their present
        files are not reported, so the daemon should scan them.
        """
        configured = {directory.path: directory for directory in directories}
        for path, root in list(self._roots.items()):
            if configured.get(path) != root.directory:
                self._unschedule(root)
                del self._roots[path]
                logger.info("Stopped watching %s", path)

        for path, directory in configured.items():
            if path in self._roots:
                continue

            root = _Root(directory)
            self._roots[path] = root
            if self._observer is not None:
                self._start_root(root, report_existing=False)

    def poll(self) -> None:
        """Follow roots that appeared, disappeared or fell back to scanning.

        A root that appears is watched and its files are reported. A root
        that disappears (or is replaced by another directory) is watched
        again once it is back. A root that hit an inotify limit is scanned,
        reporting files that are new or changed since its previous scan.
        """
        if self._observer is None:
            return

        self._handle_unwatched_paths()
        now = self._clock()
        for root in list(self._roots.values()):
            if root.state is _RootState.WATCHED:
                self._check_watched(root)
            if root.state is _RootState.MISSING:
                self._start_root(root, report_existing=True)
            elif root.state is _RootState.SCANNED:
                self._poll_scanned(root, now)

    def overflowed(self) -> bool:
        """Return whether events may have been lost since the last call, and clear the flag.

        True after an inotify queue overflow, or after a subdirectory could
        not be watched: the daemon should run a reconciliation scan.
        """
        with self._lock:
            events_lost = self._events_lost
            self._events_lost = False
        return events_lost

    def _report(self, path: Path, directory: LogDirectory) -> None:
        """Call ``on_event``, logging (not raising) what it raises."""
        try:
            self._on_event(path, directory)
        except Exception:
            logger.exception("Reporting log file %s failed", path)

    def _note_events_lost(self) -> None:
        """Record an inotify queue overflow (called from watchdog's threads)."""
        name, suggested = _QUEUE_SYSCTL
        with self._lock:
            self._events_lost = True
            if name in self._warned_sysctls:
                return
            self._warned_sysctls.add(name)

        logger.warning(
            "The inotify event queue overflowed and events were lost; a reconciliation scan "
            "finds the missed log files. If this repeats, raise %s (now %s): "
            "'sysctl -w %s=%d', and persist it in /etc/sysctl.d/",
            name,
            _read_sysctl(name),
            name,
            suggested,
        )

    def _start_root(self, root: _Root, *, report_existing: bool) -> None:
        """Watch ``root`` if it exists; ``report_existing`` also reports the files it holds."""
        identity = _directory_identity(root.directory.path)
        if identity is None:
            root.state = _RootState.MISSING
            if not report_existing:
                logger.info(
                    "Log directory %s does not exist yet; it is watched once it appears",
                    root.directory.path,
                )
            return

        try:
            self._schedule(root)
        except OSError as error:
            self._handle_schedule_error(root, error, report_existing=report_existing)
            return

        root.identity = identity
        if not report_existing:
            logger.info(
                "Watching %s (source %s) with inotify", root.directory.path, root.directory.source
            )
            return

        found = 0
        for found_file in walk(root.directory, (), None):
            self._report(found_file.path, root.directory)
            found += 1
        logger.info(
            "Log directory %s appeared; watching it with inotify and reported its %d log files",
            root.directory.path,
            found,
        )

    def _handle_schedule_error(self, root: _Root, error: OSError, *, report_existing: bool) -> None:
        if error.errno in _LIMIT_SYSCTLS:
            self._fall_back(root, error.errno, report_existing=report_existing)
            return

        root.state = _RootState.MISSING
        unreadable_warnings.warn(
            os.fspath(root.directory.path),
            "Cannot watch log directory %s: %s. Retrying at the next poll.",
            root.directory.path,
            error,
        )

    def _schedule(self, root: _Root) -> None:
        """Add the inotify watch of ``root``; raises OSError if the kernel refuses it."""
        if self._observer is None:
            raise RuntimeError("the watcher is not started")

        path = root.directory.path
        watch_path = os.path.realpath(path) if os.path.islink(path) else os.fspath(path)
        handler = _RootHandler(self, root.directory, watch_path)
        root.watch = self._observer.schedule(
            handler, watch_path, recursive=root.directory.recursive, event_filter=_WATCHED_EVENTS
        )
        root.state = _RootState.WATCHED
        root.snapshot = {}

    def _fall_back(self, root: _Root, error_number: int, *, report_existing: bool) -> None:
        """Scan ``root`` periodically instead of watching it."""
        self._unschedule(root)
        self._warn_limit(root.directory.path, error_number)

        root.state = _RootState.SCANNED
        root.snapshot = {}
        changed = self._rescan(root)
        if report_existing:
            for path in changed:
                self._report(path, root.directory)

        now = self._clock()
        root.next_scan_at = now + self._fallback_scan_seconds
        root.retry_watch_at = now + WATCH_RETRY_SECONDS

    def _warn_limit(self, path: Path, error_number: int) -> None:
        name, suggested = _LIMIT_SYSCTLS[error_number]
        with self._lock:
            already_warned = name in self._warned_sysctls
            self._warned_sysctls.add(name)

        if already_warned:
            logger.info("Scanning %s instead of watching it: %s is reached", path, name)
            return

        logger.warning(
            "Cannot watch %s with inotify: the kernel limit %s (now %s) is reached. "
            "It is scanned every %.0f s instead and watching is retried every %.0f min. "
            "Raise the limit with 'sysctl -w %s=%d' and persist it in /etc/sysctl.d/",
            path,
            name,
            _read_sysctl(name),
            self._fallback_scan_seconds,
            WATCH_RETRY_SECONDS / 60,
            name,
            suggested,
        )

    def _check_watched(self, root: _Root) -> None:
        """Move a watched root whose directory vanished or was replaced to MISSING."""
        identity = _directory_identity(root.directory.path)
        if identity is not None and identity == root.identity and self._emitter_alive(root):
            return

        self._unschedule(root)
        root.state = _RootState.MISSING
        logger.info(
            "Log directory %s disappeared or was replaced; it is watched again once it exists",
            root.directory.path,
        )

    def _emitter_alive(self, root: _Root) -> bool:
        # watchdog stops the emitter of a watch whose directory was deleted.
        observer = self._observer
        if observer is None:
            return False
        return any(e.watch == root.watch and e.is_alive() for e in list(observer.emitters))

    def _poll_scanned(self, root: _Root, now: float) -> None:
        if _directory_identity(root.directory.path) is None:
            root.state = _RootState.MISSING
            root.snapshot = {}
            logger.info("Log directory %s disappeared", root.directory.path)
            return

        if now >= root.retry_watch_at and self._retry_watch(root):
            return

        if now >= root.next_scan_at:
            for path in self._rescan(root):
                self._report(path, root.directory)
            root.next_scan_at = now + self._fallback_scan_seconds

    def _retry_watch(self, root: _Root) -> bool:
        snapshot = root.snapshot
        try:
            self._schedule(root)
        except OSError as error:
            logger.debug("Watching %s still fails: %s", root.directory.path, error)
            root.state = _RootState.SCANNED
            root.retry_watch_at = self._clock() + WATCH_RETRY_SECONDS
            return False

        # Report what changed between the last scan and the new watch.
        root.identity = _directory_identity(root.directory.path)
        root.snapshot = snapshot
        for path in self._rescan(root):
            self._report(path, root.directory)
        root.snapshot = {}
        logger.info("Watching %s with inotify again", root.directory.path)
        return True

    @staticmethod
    def _rescan(root: _Root) -> list[Path]:
        """Scan ``root``, store the result and return the files new or changed since last time."""
        previous = root.snapshot
        snapshot: dict[Path, tuple[int, int, int, int]] = {}
        changed: list[Path] = []
        for found in walk(root.directory, (), None):
            st = found.stat
            signature = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
            snapshot[found.path] = signature
            if previous.get(found.path) != signature:
                changed.append(found.path)
        root.snapshot = snapshot
        return changed

    def _unschedule(self, root: _Root) -> None:
        watch = root.watch
        self._forget_watch(root)
        if watch is None or self._observer is None:
            return

        try:
            self._observer.unschedule(watch)
        except (KeyError, OSError) as error:
            logger.debug("Unscheduling %s: %s", watch.path, error)

    @staticmethod
    def _forget_watch(root: _Root) -> None:
        root.watch = None
        root.identity = None
        root.state = _RootState.MISSING

    def _note_unwatched_path(self, path: str, error_number: int) -> None:
        with self._lock:
            self._unwatched_paths.append((path, error_number))

    def _handle_unwatched_paths(self) -> None:
        """Switch roots with a subdirectory that watchdog could not watch to scanning."""
        with self._lock:
            unwatched, self._unwatched_paths = self._unwatched_paths, []

        for path, error_number in unwatched:
            root = self._root_containing(path)
            if root is None or root.state is not _RootState.WATCHED:
                continue

            self._fall_back(root, error_number, report_existing=False)
            with self._lock:
                self._events_lost = True

    def _root_containing(self, path: str) -> _Root | None:
        for root in self._roots.values():
            top = os.fspath(root.watch.path) if root.watch else os.fspath(root.directory.path)
            if path == top or path.startswith(top.rstrip("/") + "/"):
                return root
        return None


class _RootHandler(FileSystemEventHandler):
    """Turn watchdog events of one root into reports; runs on watchdog's dispatcher thread."""

    def __init__(self, watcher: Watcher, directory: LogDirectory, watch_path: str) -> None:
        super().__init__()
        self._watcher = watcher
        self._directory = directory
        self._prefix = watch_path.rstrip("/") + "/"

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            self._handle(event)
        except Exception:
            logger.exception("Handling %r failed", event)

    def _handle(self, event: FileSystemEvent) -> None:
        if event.event_type == _EVENT_TYPE_EVENTS_LOST:
            self._watcher._note_events_lost()
            return

        # watchdog lists the content of a directory moved in as synthetic
        # events; the scan of that directory below reports the same files.
        if getattr(event, "is_synthetic", False):
            return

        if event.event_type == EVENT_TYPE_MOVED:
            changed_path = event.dest_path
        elif event.event_type in _FILE_EVENT_TYPES:
            changed_path = event.src_path
        else:
            return

        relative = self._relative(os.fsdecode(changed_path))
        if relative is None:
            return

        if not event.is_directory:
            self._report_file(relative)
        elif event.event_type in (EVENT_TYPE_CREATED, EVENT_TYPE_MOVED):
            self._report_tree(relative)

    def _relative(self, path: str) -> PurePosixPath | None:
        if not path.startswith(self._prefix) or len(path) == len(self._prefix):
            return None
        return PurePosixPath(path[len(self._prefix) :])

    def _report_file(self, relative: PurePosixPath) -> None:
        if not self._directory.accepts(relative):
            return

        if _is_below_root(self._directory.path, relative, stat.S_ISREG):
            self._watcher._report(self._directory.path / relative, self._directory)

    def _report_tree(self, relative: PurePosixPath) -> None:
        """Report the log files of a directory created or moved into the tree."""
        if not self._directory.recursive:
            return

        if not _is_below_root(self._directory.path, relative, stat.S_ISDIR):
            return

        for found in walk(self._directory, relative.parts, None):
            self._watcher._report(found.path, self._directory)


class _WatchLimitFilter(logging.Filter):
    """Spot watchdog's warning about a subdirectory it could not watch.

    When adding the watch of a new subdirectory fails, watchdog (checked
    with 7.1) logs ``Unable to watch <path>: <OSError>`` and leaves that
    subtree unwatched. This filter passes the path and errno to a callback
    so the root can fall back to scanning; it never drops a record.
    """

    def __init__(self, callback: Callable[[str, int], None]) -> None:
        super().__init__()
        self._callback = callback

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        errors = [a for a in args if isinstance(a, OSError) and a.errno in _LIMIT_SYSCTLS]
        paths = [a for a in args if isinstance(a, (bytes, str))]
        if errors and paths and errors[0].errno is not None:
            self._callback(os.fsdecode(paths[0]), errors[0].errno)
        return True


def _is_below_root(root: Path, relative: PurePosixPath, is_kind: Callable[[int], bool]) -> bool:
    """Tell whether ``root/relative`` is of the kind ``is_kind`` accepts, through real directories only.

    Every component below the root is checked with ``lstat``, so a path that
    passes through a symlink is rejected even when the symlink points back
    inside the tree.
    """
    current = root
    try:
        for part in relative.parts[:-1]:
            current = current / part
            if not stat.S_ISDIR(os.lstat(current).st_mode):
                return False

        return is_kind(os.lstat(root / relative).st_mode)
    except OSError as error:
        logger.debug("Skipped %s: %s", root / relative, error)
        return False


def _directory_identity(path: Path) -> tuple[int, int] | None:
    """Return (device, inode) of the directory at ``path``, following a symlinked root."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return None
    return (st.st_dev, st.st_ino)


def _read_sysctl(name: str) -> str:
    try:
        return Path("/proc/sys", *name.split(".")).read_text().strip()
    except OSError:
        return "unknown"
