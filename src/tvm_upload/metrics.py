"""Metrics collection: counters kept in the state store, queue figures and disk usage.

The upload and retention paths record events with ``count_upload`` (or
``count_uploads`` for several), ``count_failed_attempt`` and ``count_deletion``. Each adds to a cumulative
counter in the state store, so the totals survive restarts. A
``MetricsCollector`` reads those totals together with the queue and the disk
usage into a ``MetricsSnapshot``. Publishers turn the snapshot into their own
form: ``tvm_upload.cloudwatch`` sends per-period deltas computed with a
``CounterBaseline``, and ``tvm_upload.prometheus`` exposes the totals.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from tvm_upload.config import Config
from tvm_upload.state import StatusSummary

logger = logging.getLogger(__name__)

BYTES_UPLOADED = "bytes_uploaded"
FILES_UPLOADED = "files_uploaded"
UPLOAD_FAILURES = "upload_failures"
DATA_LOSS_FILES = "data_loss_files"

DELETION_POLICIES = ("after_upload", "age", "emergency")
"""Retention rules that delete local log files, as the ``Policy`` dimension names them."""


def files_deleted_counter(policy: str) -> str:
    """Return the counter name of files deleted by a retention ``policy``."""
    if policy not in DELETION_POLICIES:
        raise ValueError(f"unknown deletion policy {policy!r}; use one of {DELETION_POLICIES}")
    return f"files_deleted_{policy}"


COUNTERS = (
    BYTES_UPLOADED,
    FILES_UPLOADED,
    UPLOAD_FAILURES,
    DATA_LOSS_FILES,
    *(files_deleted_counter(policy) for policy in DELETION_POLICIES),
)
"""Every cumulative counter that the metrics read."""


class CounterStore(Protocol):
    """The part of ``StateStore`` that keeps counters."""

    def increment(self, name: str, by: int = 1) -> int: ...

    def increment_many(self, amounts: dict[str, int]) -> None: ...

    def counters(self) -> dict[str, int]: ...


class SummaryStore(CounterStore, Protocol):
    """The part of ``StateStore`` that a ``MetricsCollector`` reads."""

    def summary(self, now: float, *, failed_limit: int = ...) -> StatusSummary: ...


def count_upload(store: CounterStore, size_bytes: int) -> None:
    """Count one log file sent to S3 and confirmed, with its size in bytes.

    Call it only when bytes were sent: a file found already uploaded by a
    HEAD of its key is not counted.
    """
    count_uploads(store, [size_bytes])


def count_uploads(store: CounterStore, sizes_bytes: list[int]) -> None:
    """Count log files sent to S3 and confirmed, one size per file, in one store write."""
    if sizes_bytes:
        store.increment_many({FILES_UPLOADED: len(sizes_bytes), BYTES_UPLOADED: sum(sizes_bytes)})


def count_failed_attempt(store: CounterStore) -> None:
    """Count one failed upload attempt that was charged to its file.

    Pauses of the whole queue (endpoint unreachable, no credentials) are not
    attempts of a file and are not counted, because a vehicle that drives
    out of network coverage is not failing.
    """
    store.increment(UPLOAD_FAILURES)


def count_deletion(store: CounterStore, policy: str, *, data_loss: bool = False) -> None:
    """Count one local log file deleted by retention ``policy``.

    ``data_loss`` marks a file deleted before it was uploaded (the emergency
    tier above the critical threshold); it is counted in ``data_loss_files`` too.
    """
    store.increment(files_deleted_counter(policy))
    if data_loss:
        store.increment(DATA_LOSS_FILES)


@dataclass(frozen=True)
class DiskUsage:
    """Space on one filesystem that contains a watched directory, as ``df`` reports it.

    ``used_fraction`` is used / (used + available to unprivileged users), so
    blocks reserved for root count as unavailable, as in ``df``'s Use%.
    """

    mount_point: str
    total_bytes: int
    free_bytes: int
    used_fraction: float

    @property
    def used_percent(self) -> float:
        return self.used_fraction * 100.0


def disk_usage(path: Path) -> DiskUsage:
    """Measure the filesystem holding ``path``, or its nearest existing parent directory."""
    existing = _existing_ancestor(path)
    stats = os.statvfs(existing)
    used = (stats.f_blocks - stats.f_bfree) * stats.f_frsize
    available = stats.f_bavail * stats.f_frsize
    fraction = used / (used + available) if used + available > 0 else 0.0
    return DiskUsage(
        mount_point=str(mount_point(existing)),
        total_bytes=stats.f_blocks * stats.f_frsize,
        free_bytes=available,
        used_fraction=fraction,
    )


def watched_disks(paths: Iterable[Path]) -> list[DiskUsage]:
    """Measure each filesystem that contains one of ``paths`` once, ordered by mount point.

    A path that cannot be measured (permission denied) is logged and skipped.
    """
    found: dict[str, DiskUsage] = {}
    for path in paths:
        try:
            usage = disk_usage(path)
        except OSError as error:
            logger.warning("Cannot measure the disk usage of %s: %s", path, error)
            continue
        found[usage.mount_point] = usage
    return [found[mount] for mount in sorted(found)]


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def mount_point(path: Path) -> Path:
    """Return the mount point of the filesystem that contains the existing ``path``."""
    path = Path(os.path.realpath(path))
    device = path.stat().st_dev
    while path != path.parent and path.parent.stat().st_dev == device:
        path = path.parent
    return path


@dataclass(frozen=True)
class MetricsSnapshot:
    """Counters, queue and disk usage read at one moment.

    ``measured_at`` is wall-clock seconds. ``totals`` maps every name of
    ``COUNTERS`` to its cumulative value since the state store was created.
    Queue figures count rows in states pending, uploading and failed.
    ``disks`` lists each filesystem holding a watched directory.
    """

    measured_at: float
    totals: Mapping[str, int]
    queue_files: int
    queue_bytes: int
    failed_files: int
    oldest_pending_age_seconds: float
    disks: tuple[DiskUsage, ...] = field(default_factory=tuple)

    @property
    def disk_usage_percent(self) -> float:
        """The highest used percentage of the watched filesystems, 0.0 when none was measured."""
        return max((disk.used_percent for disk in self.disks), default=0.0)


class MetricsCollector:
    """Reads a ``MetricsSnapshot`` from the state store and the watched filesystems.

    Reading has no side effect, so any number of publishers may share one
    collector. Thread-safe as far as the store is.
    """

    def __init__(self, config: Config, store: SummaryStore) -> None:
        self._store = store
        self._paths = [directory.path for directory in config.log_directories]

    def collect(self, now: float) -> MetricsSnapshot:
        """Read every figure as of wall-clock ``now``."""
        stored = self._store.counters()
        totals = {name: stored.get(name, 0) for name in COUNTERS}
        summary = self._store.summary(now, failed_limit=0)
        return MetricsSnapshot(
            measured_at=now,
            totals=totals,
            queue_files=summary.queue_count,
            queue_bytes=summary.queue_bytes,
            failed_files=summary.failed_count,
            oldest_pending_age_seconds=summary.oldest_pending_age_seconds,
            disks=tuple(watched_disks(self._paths)),
        )


class CounterBaseline:
    """The counter values already reported by one publisher, kept in the state store.

    Each counter ``name`` has a baseline counter ``{prefix}{name}`` in the
    same table, so per-period deltas continue across restarts without
    counting anything twice. ``start`` must run once before the first
    period. Counts recorded before it are not reported, so a publisher
    enabled on an old store does not report years of uploads as one period.
    """

    def __init__(self, store: CounterStore, prefix: str) -> None:
        self._store = store
        self._prefix = prefix

    def start(self) -> None:
        """Create the baseline of every counter that has none, at the counter's current value."""
        stored = self._store.counters()
        for name in COUNTERS:
            baseline = self._prefix + name
            if baseline not in stored:
                self._store.increment(baseline, stored.get(name, 0))

    def deltas(self, totals: Mapping[str, int]) -> dict[str, int]:
        """Return how much each counter grew since the baseline; never negative."""
        stored = self._store.counters()
        return {
            name: max(0, totals.get(name, 0) - stored.get(self._prefix + name, 0))
            for name in COUNTERS
        }

    def commit(self, totals: Mapping[str, int]) -> None:
        """Move every baseline to ``totals``, after the deltas were stored for sending."""
        stored = self._store.counters()
        for name in COUNTERS:
            baseline = self._prefix + name
            change = totals.get(name, 0) - stored.get(baseline, 0)
            if change:
                self._store.increment(baseline, change)


class WarningLimiter:
    """Logs a repeated failure at WARNING once per kind and ``repeat_seconds``, the rest at DEBUG.

    The next WARNING of a kind states how many repeats were logged at DEBUG
    since the last one. ``clock`` is monotonic seconds. Not thread-safe.
    """

    def __init__(
        self,
        log: logging.Logger,
        repeat_seconds: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self._repeat_seconds = repeat_seconds
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warn(self, kind: str, message: str, *args: object) -> None:
        """Log at WARNING unless ``kind`` had a WARNING within the repeat time, else at DEBUG."""
        now = self._clock()
        last = self._last.get(kind)
        if last is not None and now - last < self._repeat_seconds:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            self._log.debug(message, *args, stacklevel=2)
            return

        suppressed = self._suppressed.pop(kind, 0)
        if suppressed:
            message += " (%d similar messages since the last warning)"
            args = (*args, suppressed)
        self._log.warning(message, *args, stacklevel=2)
        self._last[kind] = now

    def reset(self) -> None:
        """Forget every kind, after the failures ended, so the next one warns at once."""
        self._last.clear()
        self._suppressed.clear()
