"""Retention: which local log files are deleted, and when.

Three rules ask for deletions, and each deletion passes ``SafeDeleter``,
which applies every safety rule (see ``tvm_upload.safety``):

- after upload: an uploaded file is deleted once its row's ``delete_after``
  (upload time plus ``keep_days``, stored in the state store) has passed
  and the file still has the uploaded identity. A file that changed since
  its upload is handed back for a new upload instead.
- age: once a day at ``schedule_time``, files whose mtime is older than
  ``max_age_days`` are deleted if uploaded, and files never uploaded only
  with ``include_not_uploaded``.
- emergency: per filesystem holding a log directory, above
  ``warning_threshold`` uploaded files are deleted oldest first until usage
  is below it and ``reserved_gb`` is free. Above ``critical_threshold``,
  files not uploaded yet are deleted too, oldest first, until usage is no
  longer above it.

A file being uploaded is never deleted by any rule. Deleting a file never
uploaded is logged at ERROR and counted as data loss. ``Retention`` runs on
the daemon's main loop; ``cleanup_command`` serves ``tvm-upload cleanup``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import TextIO

from tvm_upload.config import Config
from tvm_upload.diskusage import (
    DiskPressure,
    DiskUsageFunction,
    Filesystem,
    Usage,
    disk_usage,
    group_by_filesystem,
)
from tvm_upload.errors import ExitCode, StateStoreError
from tvm_upload.files import FileIdentity
from tvm_upload.safety import (
    PROTECTED_DIRECTORIES,
    DeletionOutcome,
    DeletionRule,
    DeletionStatus,
    Rejection,
    SafeDeleter,
    warn_if_protected,
)
from tvm_upload.scan import scan
from tvm_upload.state import FileRecord, FileState, StateStore

logger = logging.getLogger(__name__)

SECONDS_PER_DAY = 86400.0
GiB = 1024**3
REGISTRY_PRUNE_INTERVAL_SECONDS = 3600.0
AGE_RUN_DAY_COUNTER = "age_based_last_run_day"

_ROW_STATES = (FileState.UPLOADED, FileState.PENDING, FileState.FAILED, FileState.UPLOADING)

InFlight = Callable[[], Collection[Path]]


def _nothing_in_flight() -> Collection[Path]:
    return ()


@dataclass(frozen=True)
class PlannedDeletion:
    """A deletion a dry run found allowed: the file, the rule, why, and its size in bytes."""

    path: Path
    rule: DeletionRule
    reason: str
    bytes: int
    data_loss: bool = False


@dataclass
class RetentionReport:
    """Outcomes of one retention pass.

    ``requeue`` contains uploaded rows whose file changed since the upload.
    The daemon hands each to the stability tracker, so the new content is
    uploaded once it is ready. A row is reported once per new identity.
    ``stopped`` lists the rules that a state store or filesystem error ended.
    """

    outcomes: list[DeletionOutcome] = field(default_factory=list)
    requeue: list[FileRecord] = field(default_factory=list)
    stopped: list[DeletionRule] = field(default_factory=list)

    @property
    def deleted(self) -> list[DeletionOutcome]:
        """Files deleted, or in a dry run the files that would be."""
        return [outcome for outcome in self.outcomes if outcome.deleted]

    @property
    def deleted_bytes(self) -> int:
        return sum(outcome.size for outcome in self.deleted)

    @property
    def failed(self) -> list[DeletionOutcome]:
        return [o for o in self.outcomes if o.status is DeletionStatus.FAILED]

    def planned(self) -> list[PlannedDeletion]:
        """Return the deletions as ``PlannedDeletion`` values, in the order they were decided."""
        return [
            PlannedDeletion(o.path, o.rule, o.reason, o.size, o.data_loss) for o in self.deleted
        ]


@dataclass(frozen=True)
class _Candidate:
    """A log file found by a scan, with its state store row if it has one."""

    path: Path
    stat: os.stat_result
    record: FileRecord | None
    uploaded: bool

    def sort_key(self) -> tuple[int, str]:
        return self.stat.st_mtime_ns, str(self.path)


@dataclass
class _Pass:
    """One run over some rules: its time, mode and what it deleted so far."""

    now: float
    dry_run: bool
    in_flight: frozenset[Path]
    report: RetentionReport = field(default_factory=RetentionReport)
    done: set[Path] = field(default_factory=set)
    planned_bytes: dict[int, int] = field(default_factory=dict)


class Retention:
    """Applies the retention rules of ``config`` to the files in ``store``.

    Every time is wall-clock seconds passed in as ``now``. ``in_flight``
    returns the paths being uploaded in this process. Rows in state
    ``uploading`` count as being uploaded too, which covers a daemon that
    runs beside ``tvm-upload cleanup``. ``disk_usage`` measures a
    filesystem. Not thread-safe: call it from the main loop only.
    """

    def __init__(
        self,
        config: Config,
        store: StateStore,
        *,
        in_flight: InFlight = _nothing_in_flight,
        disk_usage: DiskUsageFunction = disk_usage,
        protected: Collection[PurePosixPath] = PROTECTED_DIRECTORIES,
    ) -> None:
        self.store = store
        self._in_flight = in_flight
        self._disk_usage = disk_usage
        self._protected = tuple(protected)
        self._requeued: dict[int, FileIdentity] = {}
        self._age_run_day: int | None = None
        self._last_prune: float | None = None
        self.apply_config(config)

    def apply_config(self, config: Config) -> None:
        """Use a reloaded configuration from the next pass on."""
        self.config = config
        self.deleter = SafeDeleter(config.log_directories, self.store, self._protected)
        self.pressure = DiskPressure(config.disk, self._disk_usage)
        for directory in config.log_directories:
            warn_if_protected(directory, self._protected)

    def run_due(self, now: float) -> RetentionReport:
        """Run every enabled rule that is due: call it about every 30 s and after each upload batch.

        After-upload and emergency run at each call, age-based once a day at
        its scheduled time, and the registry is pruned at most once an hour.
        """
        rules = [rule for rule in DeletionRule if self.enabled(rule)]
        if DeletionRule.AGE in rules and not self.age_based_due(now):
            rules.remove(DeletionRule.AGE)

        report = self.execute(rules, now, dry_run=False)
        if DeletionRule.AGE in rules and DeletionRule.AGE not in report.stopped:
            self._record_age_run(now)
        self._prune_if_due(now)
        return report

    def enabled(self, rule: DeletionRule) -> bool:
        """Tell whether the configuration enables ``rule``."""
        deletion = self.config.deletion
        if rule is DeletionRule.AFTER_UPLOAD:
            return deletion.after_upload.enabled
        if rule is DeletionRule.AGE:
            return deletion.age_based.enabled
        return deletion.emergency.enabled

    def plan(self, policy: str | None, now: float) -> list[PlannedDeletion]:
        """List what ``policy`` (every enabled rule if None) would delete now, deleting nothing.

        The age rule is planned whatever its schedule. Emergency planning
        subtracts the files planned before it from the measured usage.
        Raises ``ValueError`` for an unknown policy name.
        """
        return self.execute(self._rules(policy), now, dry_run=True).planned()

    def run(self, policy: str | None, now: float) -> RetentionReport:
        """Apply ``policy`` (every enabled rule if None) now, the age rule whatever its schedule."""
        return self.execute(self._rules(policy), now, dry_run=False)

    def _rules(self, policy: str | None) -> list[DeletionRule]:
        chosen = list(DeletionRule) if policy is None else [DeletionRule.from_policy(policy)]
        return [rule for rule in chosen if self.enabled(rule)]

    def execute(self, rules: list[DeletionRule], now: float, *, dry_run: bool) -> RetentionReport:
        """Apply ``rules`` in order, enabled or not, as one pass; the age rule whatever its schedule.

        A state store or filesystem error ends the rule it happened in,
        logged at ERROR, and the next rule still runs.
        """
        run = _Pass(now, dry_run, self._paths_in_flight())
        for rule in rules:
            try:
                self._apply(rule, run)
            except (StateStoreError, OSError) as error:
                logger.error("Retention rule %s stopped early: %s", rule.value, error)
                run.report.stopped.append(rule)
        return run.report

    def _apply(self, rule: DeletionRule, run: _Pass) -> None:
        if rule is DeletionRule.AFTER_UPLOAD:
            self._after_upload(run)
        elif rule is DeletionRule.AGE:
            self._by_age(run)
        else:
            self._emergency(run)

    def _paths_in_flight(self) -> frozenset[Path]:
        uploading = {record.path for record in self.store.files_in_state(FileState.UPLOADING)}
        return frozenset(uploading.union(self._in_flight()))

    # After upload.

    def _after_upload(self, run: _Pass) -> None:
        for record in self.store.due_deletions(run.now):
            if record.path in run.done:
                continue

            reason = _after_upload_reason(record, run.now)
            outcome = self._delete(run, record.path, DeletionRule.AFTER_UPLOAD, reason, record)
            if outcome.rejection is Rejection.CHANGED and outcome.identity is not None:
                self._requeue(run, record, outcome.identity)

    def _requeue(self, run: _Pass, record: FileRecord, identity: FileIdentity) -> None:
        if run.dry_run or self._requeued.get(record.id) == identity:
            return

        self._requeued[record.id] = identity
        run.report.requeue.append(record)
        logger.info(
            "Kept %s: it changed since its upload, so it is uploaded again once it is ready",
            record.path,
        )

    # Age.

    def age_based_due(self, now: float) -> bool:
        """Tell whether the daily age-based run is due at ``now``.

        It is due from ``schedule_time`` in the configured time zone until
        it has run on that calendar day. The day of the last run is kept in
        the state store, so a restart does not run it twice in a day, and a
        daemon started after ``schedule_time`` runs it at once.
        """
        local = datetime.fromtimestamp(now, self.config.zone())
        if local.time() < self.config.deletion.age_based.schedule_time:
            return False
        return self._last_age_run_day() != local.date().toordinal()

    def _last_age_run_day(self) -> int | None:
        if self._age_run_day is None:
            self._age_run_day = self.store.counters().get(AGE_RUN_DAY_COUNTER)
        return self._age_run_day

    def _record_age_run(self, now: float) -> None:
        day = datetime.fromtimestamp(now, self.config.zone()).date().toordinal()
        stored = self.store.counters().get(AGE_RUN_DAY_COUNTER, 0)
        self._age_run_day = day
        try:
            self.store.increment(AGE_RUN_DAY_COUNTER, day - stored)
        except StateStoreError as error:
            logger.warning("Cannot store the day of the age-based run: %s", error)

    def _by_age(self, run: _Pass) -> None:
        settings = self.config.deletion.age_based
        cutoff_ns = int((run.now - settings.max_age_days * SECONDS_PER_DAY) * 1e9)
        candidates = sorted(self._candidates(run), key=_Candidate.sort_key)
        for candidate in candidates:
            if candidate.stat.st_mtime_ns >= cutoff_ns:
                continue
            if not (candidate.uploaded or settings.include_not_uploaded):
                continue

            age_days = (run.now - candidate.stat.st_mtime) / SECONDS_PER_DAY
            reason = f"modified {age_days:.1f} days ago, max_age_days is {settings.max_age_days:g}"
            if not candidate.uploaded:
                reason += ", and include_not_uploaded is true"
            self._delete_candidate(run, candidate, DeletionRule.AGE, reason)

    # Emergency.

    def _emergency(self, run: _Pass) -> None:
        deletable = [d for d in self.config.log_directories if d.allow_deletion]
        for filesystem in group_by_filesystem(deletable):
            self._relieve(run, filesystem)

    def filesystem_usage(self) -> dict[Path, Usage]:
        """Measure each filesystem holding an existing log directory, keyed by its first one."""
        filesystems = group_by_filesystem(self.config.log_directories)
        return {filesystem.path: self._disk_usage(filesystem.path) for filesystem in filesystems}

    def _relieve(self, run: _Pass, filesystem: Filesystem) -> None:
        planned = run.planned_bytes.get(filesystem.device, 0)
        usage = self._disk_usage(filesystem.path).minus(planned)
        if not self.pressure.exceeded(usage):
            if not run.dry_run:
                self.pressure.settle(filesystem, usage)
            return

        candidates = sorted(self._candidates(run, filesystem.device), key=_Candidate.sort_key)

        def delete(candidate: _Candidate, reason: str) -> int | None:
            outcome = self._delete_candidate(run, candidate, DeletionRule.EMERGENCY, reason)
            return outcome.freed_bytes if outcome.deleted else None

        self.pressure.relieve(filesystem, usage, candidates, delete, quiet=run.dry_run)

    # Shared by the rules.

    def _candidates(self, run: _Pass, device: int | None = None) -> Iterator[_Candidate]:
        """Yield the log files in directories that allow deletion, on ``device`` if given."""
        rows = {
            record.path: record
            for state in _ROW_STATES
            for record in self.store.files_in_state(state)
        }
        deletable = [d for d in self.config.log_directories if d.allow_deletion]
        for found in scan(deletable):
            if found.path in run.done or (device is not None and found.stat.st_dev != device):
                continue

            record = rows.get(found.path)
            identity = FileIdentity.from_stat(found.stat)
            uploaded = (
                record is not None
                and record.state is FileState.UPLOADED
                and record.identity == identity
            )
            yield _Candidate(found.path, found.stat, record, uploaded)

    def _delete_candidate(
        self, run: _Pass, candidate: _Candidate, rule: DeletionRule, reason: str
    ) -> DeletionOutcome:
        expected = FileIdentity.from_stat(candidate.stat)
        return self._delete(
            run, candidate.path, rule, reason, candidate.record, expected, not candidate.uploaded
        )

    def _delete(
        self,
        run: _Pass,
        path: Path,
        rule: DeletionRule,
        reason: str,
        record: FileRecord | None,
        expected: FileIdentity | None = None,
        data_loss: bool = False,
    ) -> DeletionOutcome:
        """Delete through ``SafeDeleter`` and update the state store row and the pass."""
        if expected is None and record is not None:
            expected = record.identity
        outcome = self.deleter.delete(
            path,
            rule,
            reason=reason,
            in_flight=run.in_flight,
            expected=expected,
            data_loss=data_loss,
            dry_run=run.dry_run,
        )
        run.report.outcomes.append(outcome)

        if outcome.deleted:
            run.done.add(path)
            if run.dry_run and outcome.identity is not None:
                device = outcome.identity.device
                run.planned_bytes[device] = run.planned_bytes.get(device, 0) + outcome.freed_bytes
        if record is not None and not run.dry_run:
            self._forget(record, outcome, run.now)
        return outcome

    def _forget(self, record: FileRecord, outcome: DeletionOutcome, now: float) -> None:
        """Record in the state store that the file of ``record`` is gone."""
        if not (outcome.deleted or outcome.status is DeletionStatus.VANISHED):
            return

        uploaded = record.state is FileState.UPLOADED
        try:
            if uploaded:
                self.store.mark_deleted(record.id, now)
            else:
                self.store.remove(record.id)
        except StateStoreError as error:
            logger.warning("Cannot record the deletion of %s: %s", record.path, error)
            return

        if outcome.status is not DeletionStatus.VANISHED:
            return
        if uploaded:
            logger.info("Marked %s deleted in the registry: the file was already gone", record.path)
        else:
            logger.info("Removed %s from the queue: the file was already gone", record.path)

    # Registry.

    def prune_registry(self, now: float) -> int:
        """Forget uploaded files gone locally for more than ``retention_days``; return how many."""
        days = self.config.upload.processed_files_registry.retention_days
        pruned = self.store.prune_registry(now - days * SECONDS_PER_DAY)
        if pruned:
            logger.info(
                "Pruned %d registry rows of log files gone locally for more than %g days",
                pruned,
                days,
            )
        return pruned

    def _prune_if_due(self, now: float) -> None:
        last = self._last_prune
        if last is not None and 0 <= now - last < REGISTRY_PRUNE_INTERVAL_SECONDS:
            return

        self._last_prune = now
        try:
            self.prune_registry(now)
        except StateStoreError as error:
            logger.warning("Cannot prune the registry: %s", error)


def _after_upload_reason(record: FileRecord, now: float) -> str:
    uploaded_at = record.uploaded_at if record.uploaded_at is not None else now
    delete_after = record.delete_after if record.delete_after is not None else now
    uploaded_days = (now - uploaded_at) / SECONDS_PER_DAY
    keep_days = (delete_after - uploaded_at) / SECONDS_PER_DAY
    return f"uploaded {uploaded_days:.1f} days ago with keep_days {keep_days:g}"


def cleanup_command(
    config: Config,
    store: StateStore,
    policy: str | None,
    dry_run: bool,
    out: TextIO,
    *,
    now: float | None = None,
    disk_usage: DiskUsageFunction = disk_usage,
) -> int:
    """Run ``tvm-upload cleanup [--dry-run] [--policy NAME]`` and return its exit code.

    Prints one line per deletion (path, bytes, rule and reason), then the
    total and, when the after-upload rule ran, the uploaded files it keeps
    with the earliest delete time. ``policy`` is ``after-upload``, ``age``,
    ``emergency`` or None for every enabled rule; a disabled rule is
    reported and skipped. The age rule runs whatever its schedule. Returns
    ``ExitCode.FAILURE`` if a deletion failed, ``ExitCode.USAGE`` for an
    unknown policy.
    """
    retention = Retention(config, store, disk_usage=disk_usage)
    try:
        requested = list(DeletionRule) if policy is None else [DeletionRule.from_policy(policy)]
    except ValueError as error:
        print(error, file=out)
        return ExitCode.USAGE

    for rule in requested:
        if not retention.enabled(rule):
            print(f"Skipped rule {rule.policy}: it is disabled in the configuration", file=out)

    rules = [rule for rule in requested if retention.enabled(rule)]
    if DeletionRule.EMERGENCY in rules:
        _print_usage(retention, out)
    moment = time.time() if now is None else now
    report = retention.execute(rules, moment, dry_run=dry_run)
    _print_report(report, dry_run, out)
    if DeletionRule.AFTER_UPLOAD in rules:
        deleted = {outcome.path for outcome in report.deleted}
        _print_kept(config, store, moment, deleted, out)
    return ExitCode.FAILURE if report.failed else ExitCode.OK


def _print_usage(retention: Retention, out: TextIO) -> None:
    disk = retention.config.disk
    for path, usage in retention.filesystem_usage().items():
        print(
            f"Filesystem holding {path}: {usage.fraction:.1%} used,"
            f" {usage.free / GiB:.1f} GiB free"
            f" (warning_threshold {disk.warning_threshold:.0%},"
            f" critical_threshold {disk.critical_threshold:.0%})",
            file=out,
        )


def _print_report(report: RetentionReport, dry_run: bool, out: TextIO) -> None:
    verb = "Would delete" if dry_run else "Deleted"
    for outcome in report.deleted:
        loss = " (never uploaded: data loss)" if outcome.data_loss else ""
        print(
            f"{verb} {outcome.path} ({outcome.size} bytes) by rule {outcome.rule.policy}:"
            f" {outcome.reason}{loss}",
            file=out,
        )
    for outcome in report.failed:
        print(f"Cannot delete {outcome.path}: {outcome.detail}", file=out)

    files = len(report.deleted)
    total = report.deleted_bytes
    summary = "Would free" if dry_run else "Freed"
    print(f"{summary} {total} bytes ({total / 1024**2:.1f} MiB) in {files} files", file=out)


def _print_kept(
    config: Config, store: StateStore, now: float, deleted: Collection[Path], out: TextIO
) -> None:
    """Print how many uploaded files, other than ``deleted``, stay, and the earliest delete time."""
    delete_times = [
        record.delete_after
        for record in store.files_in_state(FileState.UPLOADED)
        if record.path not in deleted
    ]
    waiting = [moment for moment in delete_times if moment is not None and moment > now]
    undated = delete_times.count(None)

    if waiting:
        earliest = min(waiting)
        when = datetime.fromtimestamp(earliest, config.zone()).strftime("%Y-%m-%d %H:%M %Z")
        days = (earliest - now) / SECONDS_PER_DAY
        print(
            f"Kept {len(waiting)} uploaded files until their delete time; the earliest is"
            f" {when} (in {days:.1f} days)",
            file=out,
        )
    if undated:
        print(
            f"Kept {undated} uploaded files that have no delete time: they were uploaded or"
            " imported while deletion.after_upload was disabled, so that rule never deletes them",
            file=out,
        )
    if waiting or undated:
        print(
            "Delete times are fixed at upload time, so a change of keep_days applies only to"
            " files uploaded after it",
            file=out,
        )
