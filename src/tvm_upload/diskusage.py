"""Disk usage of the filesystems that hold the log directories, and the emergency tier.

Emergency retention reads usage through a ``DiskUsageFunction`` so tests can
inject a fake; the default reads ``os.statvfs``. ``DiskPressure``
decides, per filesystem, how far the emergency tier deletes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

from tvm_upload.config import DiskSettings, LogDirectory

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Usage:
    """Size, used bytes and free bytes of one filesystem.

    ``free`` is what an unprivileged writer may still use, so ``used + free``
    is less than ``total`` on filesystems that keep blocks for root (ext4
    keeps 5% by default).
    """

    total: int
    used: int
    free: int

    @property
    def fraction(self) -> float:
        """Used share of the space writers can use, as ``df`` computes its ``Use%``."""
        usable = self.used + self.free
        return self.used / usable if usable > 0 else 0.0

    def minus(self, freed_bytes: int) -> Usage:
        """Return the usage expected after ``freed_bytes`` more bytes are free."""
        freed = min(max(freed_bytes, 0), self.used)
        return Usage(total=self.total, used=self.used - freed, free=self.free + freed)


DiskUsageFunction = Callable[[Path], Usage]


def disk_usage(path: Path) -> Usage:
    """Measure the filesystem that contains ``path`` with ``os.statvfs``."""
    st = os.statvfs(path)
    return Usage(
        total=st.f_blocks * st.f_frsize,
        used=(st.f_blocks - st.f_bfree) * st.f_frsize,
        free=st.f_bavail * st.f_frsize,
    )


def remeasure(measure: DiskUsageFunction, path: Path, before: Usage, freed_bytes: int) -> Usage:
    """Measure again after a deletion, never believing less was freed than ``freed_bytes``.

    Some filesystems (btrfs, and any file still held open by another
    process) release blocks later than the unlink. Taking the lower of the
    measured and the expected usage keeps a cleanup from deleting more files
    to free space that is already on its way.
    """
    expected = before.minus(freed_bytes)
    measured = measure(path)
    return Usage(
        total=measured.total,
        used=min(measured.used, expected.used),
        free=max(measured.free, expected.free),
    )


@dataclass(frozen=True)
class Filesystem:
    """The log directories that share one filesystem, identified by ``st_dev``."""

    device: int
    directories: tuple[LogDirectory, ...]

    @property
    def path(self) -> Path:
        """A directory on this filesystem to measure it by."""
        return self.directories[0].path


def group_by_filesystem(directories: Iterable[LogDirectory]) -> list[Filesystem]:
    """Group the existing log directories by the filesystem that holds them, in config order.

    A root that is a symlink counts for the filesystem it points to. Roots
    that do not exist yet, or cannot be read, hold no files and are left out.
    """
    groups: dict[int, list[LogDirectory]] = {}
    for directory in directories:
        try:
            device = os.stat(directory.path).st_dev
        except OSError as error:
            logger.debug("Skipped log directory %s for disk usage: %s", directory.path, error)
            continue
        groups.setdefault(device, []).append(directory)
    return [Filesystem(device, tuple(members)) for device, members in groups.items()]


class PressureCandidate(Protocol):
    """A file the emergency tier may delete; ``uploaded`` selects the tier that may delete it."""

    @property
    def uploaded(self) -> bool: ...


Candidate = TypeVar("Candidate", bound=PressureCandidate)

# Deletes a candidate for the given reason; returns the bytes freed, or None if not deleted.
DeleteFunction = Callable[[Candidate, str], int | None]


@dataclass
class DiskPressure:
    """The emergency tier's thresholds and its deletion order on one filesystem at a time.

    Above ``warning_threshold``, uploaded files go first until usage is
    below that threshold and ``reserved_bytes`` are free. Only while usage
    is still above ``critical_threshold`` do files not uploaded yet follow,
    and only until usage is no longer above it: data loss stops as soon as
    the disk is out of the critical range.

    While a filesystem stays above the warning threshold, its state is
    logged when it starts, when it turns critical and when nothing is left
    to delete, not at every check.
    """

    disk: DiskSettings
    measure: DiskUsageFunction = disk_usage
    _levels: dict[int, int] = field(default_factory=dict, init=False, repr=False)
    _exhausted: set[int] = field(default_factory=set, init=False, repr=False)
    _warned_reserved: set[int] = field(default_factory=set, init=False, repr=False)

    def exceeded(self, usage: Usage) -> bool:
        """Tell whether ``usage`` is above the warning threshold."""
        return usage.fraction > self.disk.warning_threshold

    def relieved(self, usage: Usage) -> bool:
        """Tell whether ``usage`` is below the warning threshold with ``reserved_gb`` free."""
        disk = self.disk
        return usage.fraction < disk.warning_threshold and usage.free >= disk.reserved_bytes

    def below_critical(self, usage: Usage) -> bool:
        return usage.fraction <= self.disk.critical_threshold

    def settle(self, filesystem: Filesystem, usage: Usage) -> None:
        """Note that ``usage`` is not above the warning threshold; log the end of a pressure."""
        self._exhausted.discard(filesystem.device)
        if self._levels.pop(filesystem.device, None) is None:
            return
        logger.info(
            "Disk usage of the filesystem holding %s is down to %.1f%%, not above"
            " warning_threshold %.0f%%",
            filesystem.path,
            usage.fraction * 100,
            self.disk.warning_threshold * 100,
        )

    def relieve(
        self,
        filesystem: Filesystem,
        usage: Usage,
        candidates: Sequence[Candidate],
        delete: DeleteFunction[Candidate],
        *,
        quiet: bool = False,
    ) -> Usage:
        """Delete ``candidates`` (oldest first) through ``delete`` as the tiers allow.

        Returns the usage reached. ``quiet`` (a dry run) leaves out the log
        lines about the disk.
        """
        if not quiet:
            self._log_pressure(filesystem, usage)
        start = usage
        uploaded = [candidate for candidate in candidates if candidate.uploaded]
        usage = self._delete_until(filesystem, usage, uploaded, delete, self.relieved)

        if not self.below_critical(usage):
            not_uploaded = [candidate for candidate in candidates if not candidate.uploaded]
            usage = self._delete_until(filesystem, usage, not_uploaded, delete, self.below_critical)

        if not quiet:
            self._log_exhausted(filesystem, usage, deleted=usage != start)
        return usage

    def _delete_until(
        self,
        filesystem: Filesystem,
        usage: Usage,
        candidates: list[Candidate],
        delete: DeleteFunction[Candidate],
        enough: Callable[[Usage], bool],
    ) -> Usage:
        for candidate in candidates:
            if enough(usage):
                break

            freed = delete(candidate, self._reason(filesystem, usage, candidate.uploaded))
            if freed is not None:
                usage = remeasure(self.measure, filesystem.path, usage, freed)
        return usage

    def _reason(self, filesystem: Filesystem, usage: Usage, uploaded: bool) -> str:
        name, threshold = ("warning_threshold", self.disk.warning_threshold)
        if not uploaded:
            name, threshold = ("critical_threshold", self.disk.critical_threshold)
        return (
            f"disk usage {usage.fraction:.1%} of the filesystem holding {filesystem.path}"
            f" is above {name} {threshold:.0%}"
        )

    def _log_pressure(self, filesystem: Filesystem, usage: Usage) -> None:
        disk = self.disk
        critical = not self.below_critical(usage)
        level = logging.ERROR if critical else logging.WARNING
        if self._levels.get(filesystem.device, logging.NOTSET) >= level:
            return

        self._levels[filesystem.device] = level
        logger.log(
            level,
            "Disk usage of the filesystem holding %s is %.1f%% (%d bytes free), above %s %.0f%%:"
            " deleting uploaded log files%s, oldest first",
            filesystem.path,
            usage.fraction * 100,
            usage.free,
            "critical_threshold" if critical else "warning_threshold",
            (disk.critical_threshold if critical else disk.warning_threshold) * 100,
            ", then log files not uploaded yet" if critical else "",
        )

        usable = usage.used + usage.free
        if disk.reserved_bytes > usable and filesystem.device not in self._warned_reserved:
            self._warned_reserved.add(filesystem.device)
            logger.warning(
                "disk.reserved_gb (%g GiB) is more than the filesystem holding %s can hold"
                " (%d bytes): emergency cleanup deletes every uploaded file there",
                disk.reserved_gb,
                filesystem.path,
                usable,
            )

    def _log_exhausted(self, filesystem: Filesystem, usage: Usage, *, deleted: bool) -> None:
        if deleted:
            self._exhausted.discard(filesystem.device)
        if self.relieved(usage) or filesystem.device in self._exhausted:
            return

        self._exhausted.add(filesystem.device)
        logger.warning(
            "Disk usage of the filesystem holding %s is still %.1f%% (%d bytes free)"
            " after emergency cleanup: nothing left that retention may delete",
            filesystem.path,
            usage.fraction * 100,
            usage.free,
        )
