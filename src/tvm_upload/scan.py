"""Directory scans for log files: the startup scan, reconciliation scans and fallback scans.

A scan lists each directory once with ``os.scandir`` and stats each
accepted file once, without following symlinks: a symlink to a file is
never reported and a symlink to a directory is never descended into.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tvm_upload.config import LogDirectory

logger = logging.getLogger(__name__)

UNREADABLE_WARNING_INTERVAL_SECONDS = 600.0
EARLIEST_PLAUSIBLE_MTIME = 1577836800.0
"""2020-01-01 UTC. An older mtime comes from a clock that was wrong (a dead RTC
battery), not from an old file, so the age limit of a scan does not apply to it."""


@dataclass(frozen=True)
class FoundFile:
    """A log file found by a scan, with the ``lstat`` result taken while scanning."""

    path: Path
    directory: LogDirectory
    stat: os.stat_result


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
    for directory in directories:
        yield from walk(directory, (), min_mtime)


def walk(
    directory: LogDirectory, start: tuple[str, ...], min_mtime: float | None
) -> Iterator[FoundFile]:
    """Yield the log files at and below ``start``, given as parts relative to the root."""
    root = os.fspath(directory.path)
    pending = [start]
    while pending:
        parts = pending.pop()
        for entry in _list_directory(os.path.join(root, *parts)):
            try:
                if entry.is_dir(follow_symlinks=False):
                    if directory.recursive:
                        pending.append((*parts, entry.name))
                    continue

                found = _found_file(directory, entry, parts, min_mtime)
            except OSError as error:
                logger.debug("Skipped %s: %s", entry.path, error)
                continue

            if found is not None:
                yield found


def _found_file(
    directory: LogDirectory,
    entry: os.DirEntry[str],
    parts: tuple[str, ...],
    min_mtime: float | None,
) -> FoundFile | None:
    if not entry.is_file(follow_symlinks=False):
        return None

    if not directory.accepts(PurePosixPath(*parts, entry.name)):
        return None

    st = entry.stat(follow_symlinks=False)
    if not stat.S_ISREG(st.st_mode):
        return None

    if min_mtime is not None and EARLIEST_PLAUSIBLE_MTIME <= st.st_mtime < min_mtime:
        return None
    return FoundFile(path=Path(entry.path), directory=directory, stat=st)


def _list_directory(path: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as entries:
            return list(entries)
    except (FileNotFoundError, NotADirectoryError) as error:
        logger.debug("Skipped %s: %s", path, error)
    except OSError as error:
        unreadable_warnings.warn(
            path,
            "Cannot read directory %s: %s. Its log files are found once it is readable.",
            path,
            error,
        )
    return []


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
