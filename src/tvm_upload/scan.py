"""Directory scans for log files: the startup scan, reconciliation scans and fallback scans.

A scan lists each directory once with ``os.scandir`` and stats each
accepted file once, without following symlinks: a symlink to a file is
never reported and a symlink to a directory is never descended into.
``scan_batches`` and ``walk_batches`` yield the files of each directory in
batches of at most ``BATCH_FILES``, so that a caller can look up a whole
batch in the state store with one query.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tvm_upload.config import LogDirectory

logger = logging.getLogger(__name__)

UNREADABLE_WARNING_INTERVAL_SECONDS = 600.0
EARLIEST_PLAUSIBLE_MTIME = 1577836800.0
"""2020-01-01 UTC. An older mtime comes from a clock that was wrong (a dead RTC
battery), not from an old file, so the age limit of a scan does not apply to it."""
BATCH_FILES = 256

NameFilter = Callable[[str], bool]


@dataclass(frozen=True)
class FoundFile:
    """A log file found by a scan, with the ``lstat`` result taken while scanning."""

    path: Path
    directory: LogDirectory
    stat: os.stat_result


@dataclass(frozen=True)
class FoundBatch:
    """Log files of one directory found by a scan, as path text with the ``lstat`` result.

    The path text is what ``str(Path(...))`` returns for the file's path.
    """

    directory: LogDirectory
    files: list[tuple[str, os.stat_result]]

    def found_files(self) -> Iterator[FoundFile]:
        """Yield the files of this batch as ``FoundFile``."""
        for path, st in self.files:
            yield FoundFile(path=Path(path), directory=self.directory, stat=st)


def scan(
    directories: Iterable[LogDirectory], *, min_mtime: float | None = None
) -> Iterator[FoundFile]:
    """Yield the log files of ``directories``, one ``lstat`` per accepted file.

    Honours ``recursive`` and ``LogDirectory.accepts``, skips symlinks and
    anything that is not a regular file, and skips files whose mtime (wall
    clock seconds) is before ``min_mtime``, except mtimes before 2020, which
    a wrong clock wrote. A missing root yields nothing.
    An unreadable directory is logged (at most once per path every 10
    minutes) and skipped, and the scan goes on.
    """
    for batch in scan_batches(directories, min_mtime=min_mtime):
        yield from batch.found_files()


def scan_batches(
    directories: Iterable[LogDirectory], *, min_mtime: float | None = None
) -> Iterator[FoundBatch]:
    """Yield the files that ``scan`` yields, in batches of one directory's files each."""
    for directory in directories:
        yield from walk_batches(directory, (), min_mtime)


def walk(
    directory: LogDirectory, start: tuple[str, ...], min_mtime: float | None
) -> Iterator[FoundFile]:
    """Yield the log files at and below ``start``, given as parts relative to the root."""
    for batch in walk_batches(directory, start, min_mtime):
        yield from batch.found_files()


def walk_batches(
    directory: LogDirectory, start: tuple[str, ...], min_mtime: float | None
) -> Iterator[FoundBatch]:
    """Yield the files that ``walk`` yields, in batches of one directory's files each."""
    if start and not directory.recursive:
        # ``accepts`` rejects every file in a subdirectory of a non-recursive root.
        return

    accepts_name = name_filter(directory)
    pending = [os.path.join(os.fspath(directory.path), *start)]
    while pending:
        files, subdirectories = _list_directory(pending.pop(), accepts_name, min_mtime)
        if directory.recursive:
            pending.extend(subdirectories)

        for begin in range(0, len(files), BATCH_FILES):
            yield FoundBatch(directory, files[begin : begin + BATCH_FILES])


def name_filter(directory: LogDirectory) -> NameFilter:
    """Return the test of a file name that gives the result of ``directory.accepts``.

    It holds for every file a walk reaches: any file of a recursive root, and
    the files directly in a non-recursive one. It skips the ``PurePosixPath``
    that ``accepts`` takes, which costs about 6 µs per file.
    """
    return directory.accepts_name


def _list_directory(
    path: str, accepts_name: NameFilter, min_mtime: float | None
) -> tuple[list[tuple[str, os.stat_result]], list[str]]:
    """Return the accepted log files directly in ``path`` and the paths of its subdirectories.

    Files are stat'ed relative to a descriptor of the open directory, which
    spares the kernel a lookup of the whole path for each file.
    """
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as error:
        _log_unreadable(path, error)
        return [], []

    try:
        return _read_directory(descriptor, os.path.join(path, ""), accepts_name, min_mtime)
    except OSError as error:
        _log_unreadable(path, error)
        return [], []
    finally:
        os.close(descriptor)


def _read_directory(
    descriptor: int, prefix: str, accepts_name: NameFilter, min_mtime: float | None
) -> tuple[list[tuple[str, os.stat_result]], list[str]]:
    with os.scandir(descriptor) as listing:
        entries = list(listing)

    files: list[tuple[str, os.stat_result]] = []
    subdirectories: list[str] = []
    for entry in entries:
        try:
            if entry.is_dir(follow_symlinks=False):
                subdirectories.append(prefix + entry.name)
                continue

            st = _log_file_stat(entry, accepts_name, min_mtime)
        except OSError as error:
            logger.debug("Skipped %s%s: %s", prefix, entry.name, error)
            continue

        if st is not None:
            files.append((prefix + entry.name, st))
    return files, subdirectories


def _log_file_stat(
    entry: os.DirEntry[str], accepts_name: NameFilter, min_mtime: float | None
) -> os.stat_result | None:
    if not entry.is_file(follow_symlinks=False) or not accepts_name(entry.name):
        return None

    st = entry.stat(follow_symlinks=False)
    if not stat.S_ISREG(st.st_mode):
        return None

    if min_mtime is not None and EARLIEST_PLAUSIBLE_MTIME <= st.st_mtime < min_mtime:
        return None
    return st


def _log_unreadable(path: str, error: OSError) -> None:
    if isinstance(error, (FileNotFoundError, NotADirectoryError)):
        logger.debug("Skipped %s: %s", path, error)
        return

    unreadable_warnings.warn(
        path,
        "Cannot read directory %s: %s. Its log files are found once it is readable.",
        path,
        error,
    )


class RateLimitedWarnings:
    """Log a WARNING at most once per key every ``interval_seconds`` (thread-safe)."""

    def __init__(self, interval_seconds: float, clock: Callable[[], float] = time.monotonic):
        self._interval_seconds = interval_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._last_logged: dict[str, float] = {}

    def warn(self, key: str, message: str, *args: object) -> None:
        now = self._clock()
        with self._lock:
            last = self._last_logged.get(key)
            if last is not None and now - last < self._interval_seconds:
                return

            self._last_logged = {
                k: t for k, t in self._last_logged.items() if now - t < self._interval_seconds
            }
            self._last_logged[key] = now
        logger.warning(message, *args)


unreadable_warnings = RateLimitedWarnings(UNREADABLE_WARNING_INTERVAL_SECONDS)
