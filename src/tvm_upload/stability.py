"""Readiness: a log file is ready once its size and mtime stop changing.

The quiet period is measured on the monotonic clock, so a wall-clock step
(NTP, a dead RTC battery) neither makes a growing file ready nor holds a
finished one back. Two shortcuts exist. A file whose mtime was already
older than the quiet period when it was first observed (an old, unchanged
file) is ready at the first poll. A ``.mcap`` file that ends with the MCAP
footer and end magic (its writer closed it) is ready at the first poll that
finds it unchanged. Both still require the file to be unchanged since it
was last looked at.
"""

from __future__ import annotations

import logging
import os
import stat
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tvm_upload.config import LogDirectory
from tvm_upload.files import FileIdentity

logger = logging.getLogger(__name__)

MCAP_MAGIC = b"\x89MCAP0\r\n"

# Every MCAP file ends with a Footer record (opcode 0x02, 20 bytes of content:
# summary start, summary offset start, summary CRC) followed by the magic.
_MCAP_FOOTER_OPCODE = 0x02
_MCAP_FOOTER_CONTENT_LENGTH = 20
_MCAP_FOOTER_RECORD = struct.Struct("<BQ")
_MCAP_TAIL_LENGTH = _MCAP_FOOTER_RECORD.size + _MCAP_FOOTER_CONTENT_LENGTH + len(MCAP_MAGIC)
_MCAP_MIN_SIZE = len(MCAP_MAGIC) + _MCAP_TAIL_LENGTH


@dataclass(frozen=True)
class ReadyFile:
    """A log file whose size and mtime stayed unchanged for the quiet period."""

    path: Path
    directory: LogDirectory
    identity: FileIdentity


@dataclass
class _TrackedFile:
    directory: LogDirectory
    identity: FileIdentity
    changed_at: float
    was_old: bool


class StabilityTracker:
    """Decide when observed log files are ready.

    ``stable_seconds`` is the quiet period in seconds of ``clock`` (monotonic
    by default). ``wall_clock`` is compared with file mtimes only, to spot
    files that were already old when first observed.

    Not thread-safe: call every method from one thread (the daemon's main
    loop). Each ``poll`` costs one ``lstat`` per tracked file, plus one read
    of the last 37 bytes of each unchanged ``.mcap`` file.
    """

    def __init__(
        self,
        stable_seconds: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.stable_seconds = stable_seconds
        self._clock = clock
        self._wall_clock = wall_clock
        self._files: dict[Path, _TrackedFile] = {}

    @property
    def stable_seconds(self) -> float:
        """Quiet period in seconds; a new value applies to tracked files at the next poll."""
        return self._stable_seconds

    @stable_seconds.setter
    def stable_seconds(self, value: float) -> None:
        if value < 0:
            raise ValueError(f"stable_seconds must be >= 0, got {value!r}")
        self._stable_seconds = value

    def __len__(self) -> int:
        return len(self._files)

    def tracked(self) -> list[Path]:
        """Return the paths of the files tracked now, in the order they were first observed."""
        return list(self._files)

    def forget(self, path: Path) -> None:
        """Stop tracking ``path``; unknown paths are ignored."""
        self._files.pop(path, None)

    def observe(self, path: Path, directory: LogDirectory) -> None:
        """Start tracking ``path``, or restart its quiet period if it changed.

        A path that is missing, a symlink or not a regular file is not
        tracked. Observing a tracked, unchanged file changes nothing, so
        repeated events for one file are cheap and harmless.
        """
        identity = _regular_file_identity(path)
        if identity is None:
            self._files.pop(path, None)
            return

        tracked = self._files.get(path)
        if tracked is None:
            self._files[path] = _TrackedFile(
                directory=directory,
                identity=identity,
                changed_at=self._clock(),
                was_old=self._is_old(identity),
            )
            return

        tracked.directory = directory
        if tracked.identity != identity:
            self._restart(tracked, identity, self._clock())

    def poll(self) -> list[ReadyFile]:
        """Re-check every tracked file and return those that are ready.

        Ready files are no longer tracked. Files that vanished or stopped
        being regular files are dropped silently. A file that changed since
        it was last looked at starts its quiet period again.
        """
        now = self._clock()
        ready: list[ReadyFile] = []
        for path, tracked in list(self._files.items()):
            identity = _regular_file_identity(path)
            if identity is None:
                del self._files[path]
                continue

            if identity != tracked.identity:
                self._restart(tracked, identity, now)
                continue

            if self._is_ready(path, tracked, now):
                del self._files[path]
                ready.append(ReadyFile(path=path, directory=tracked.directory, identity=identity))
        return ready

    def _is_ready(self, path: Path, tracked: _TrackedFile, now: float) -> bool:
        if tracked.was_old:
            return True

        if now - tracked.changed_at >= self._stable_seconds:
            return True

        return path.suffix.lower() == ".mcap" and _has_mcap_end(path, tracked.identity)

    def _is_old(self, identity: FileIdentity) -> bool:
        age_seconds = self._wall_clock() - identity.mtime_ns / 1e9
        return age_seconds >= self._stable_seconds

    @staticmethod
    def _restart(tracked: _TrackedFile, identity: FileIdentity, now: float) -> None:
        tracked.identity = identity
        tracked.changed_at = now
        tracked.was_old = False


def _regular_file_identity(path: Path) -> FileIdentity | None:
    """Return the identity of ``path`` if it is a regular file (not following symlinks)."""
    try:
        st = os.lstat(path)
    except OSError as error:
        logger.debug("Stopped tracking %s: %s", path, error)
        return None

    if not stat.S_ISREG(st.st_mode):
        logger.debug("Stopped tracking %s: not a regular file", path)
        return None
    return FileIdentity.from_stat(st)


def _has_mcap_end(path: Path, identity: FileIdentity) -> bool:
    """Tell whether the file ends with an MCAP footer record and the end magic.

    Only the last bytes are read. The footer is checked as well as the
    magic because the magic also opens every MCAP file, so a writer that has
    written just its first 8 bytes must not look finished.
    """
    if identity.size < _MCAP_MIN_SIZE:
        return False

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        logger.debug("Cannot read the end of %s: %s", path, error)
        return False

    try:
        if os.fstat(fd).st_ino != identity.inode:
            return False
        tail = os.pread(fd, _MCAP_TAIL_LENGTH, identity.size - _MCAP_TAIL_LENGTH)
    except OSError as error:
        logger.debug("Cannot read the end of %s: %s", path, error)
        return False
    finally:
        os.close(fd)

    if len(tail) != _MCAP_TAIL_LENGTH or not tail.endswith(MCAP_MAGIC):
        return False

    opcode, length = _MCAP_FOOTER_RECORD.unpack_from(tail)
    return bool(opcode == _MCAP_FOOTER_OPCODE and length == _MCAP_FOOTER_CONTENT_LENGTH)
