"""Log file identity: what tells one version of a file from another."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class FileIdentity:
    """Device, inode, size and mtime of a log file, read with ``lstat``.

    Two identities are equal when the file was neither replaced (device and
    inode) nor written to (size and mtime in nanoseconds).
    """

    device: int
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def from_stat(cls, st: os.stat_result) -> FileIdentity:
        return cls(device=st.st_dev, inode=st.st_ino, size=st.st_size, mtime_ns=st.st_mtime_ns)

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> FileIdentity:
        """Read the identity of ``path`` without following a symlink."""
        return cls.from_stat(os.lstat(path))
