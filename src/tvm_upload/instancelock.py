"""One daemon per state store: an exclusive lock on a file beside it.

A second daemon on the same store would recover the first one's
``uploading`` rows as interrupted, upload them a second time and take over
the control socket. The kernel releases a ``flock`` when its process ends,
so a crash or ``kill -9`` never leaves a stale lock behind.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from tvm_upload.errors import AlreadyRunningError

LOCK_SUFFIX = ".lock"


class InstanceLock:
    """Holds the lock for as long as the object is open."""

    def __init__(self, state_file: Path) -> None:
        self.path = state_file.with_name(state_file.name + LOCK_SUFFIX)
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise AlreadyRunningError naming the holder's PID."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise AlreadyRunningError(
                f"another tvm-upload (PID {holder}) already uses the state store beside"
                f" {self.path}; stop it first, or give this one its own state_file"
            ) from None

        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd

    def release(self) -> None:
        """Release the lock; the file stays for the next start."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
