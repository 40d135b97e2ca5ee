"""Metrics collection: counters in the state store, baselines, queue figures and disk usage."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from metrics_support import START, identity, make_config

from tvm_upload.metrics import (
    BYTES_UPLOADED,
    COUNTERS,
    DATA_LOSS_FILES,
    FILES_UPLOADED,
    UPLOAD_FAILURES,
    CounterBaseline,
    MetricsCollector,
    WarningLimiter,
    count_deletion,
    count_failed_attempt,
    count_upload,
    disk_usage,
    files_deleted_counter,
    mount_point,
    watched_disks,
)
from tvm_upload.state import StateStore


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    with StateStore(tmp_path / "state.db", lambda: START) as opened:
        yield opened


def test_count_upload_adds_files_and_bytes(store: StateStore) -> None:
    count_upload(store, 1500)
    count_upload(store, 500)

    counters = store.counters()
    assert counters[FILES_UPLOADED] == 2
    assert counters[BYTES_UPLOADED] == 2000


def test_count_failed_attempt(store: StateStore) -> None:
    count_failed_attempt(store)
    count_failed_attempt(store)

    assert store.counters()[UPLOAD_FAILURES] == 2


def test_count_deletion_by_policy(store: StateStore) -> None:
    count_deletion(store, "after_upload")
    count_deletion(store, "age")
    count_deletion(store, "emergency", data_loss=True)
    count_deletion(store, "emergency")

    counters = store.counters()
    assert counters["files_deleted_after_upload"] == 1
    assert counters["files_deleted_age"] == 1
    assert counters["files_deleted_emergency"] == 2
    assert counters[DATA_LOSS_FILES] == 1


def test_unknown_deletion_policy_rejected(store: StateStore) -> None:
    with pytest.raises(ValueError, match="unknown deletion policy 'manual'"):
        count_deletion(store, "manual")
    assert store.counters() == {}


def test_baseline_hides_counts_before_start(store: StateStore) -> None:
    count_upload(store, 10_000)
    baseline = CounterBaseline(store, "test.")

    baseline.start()

    deltas = baseline.deltas({**store.counters()})
    assert set(deltas) == set(COUNTERS)
    assert all(value == 0 for value in deltas.values())


def test_baseline_deltas_per_period(store: StateStore) -> None:
    baseline = CounterBaseline(store, "test.")
    baseline.start()

    count_upload(store, 300)
    count_failed_attempt(store)
    first = baseline.deltas(store.counters())
    baseline.commit(store.counters())
    count_upload(store, 200)
    second = baseline.deltas(store.counters())

    assert first[BYTES_UPLOADED] == 300
    assert first[FILES_UPLOADED] == 1
    assert first[UPLOAD_FAILURES] == 1
    assert second[BYTES_UPLOADED] == 200
    assert second[UPLOAD_FAILURES] == 0


def test_baseline_survives_restart(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    with StateStore(path) as store:
        baseline = CounterBaseline(store, "test.")
        baseline.start()
        count_upload(store, 700)
        baseline.commit(store.counters())
        count_upload(store, 50)

    with StateStore(path) as reopened:
        baseline = CounterBaseline(reopened, "test.")
        baseline.start()
        deltas = baseline.deltas(reopened.counters())

    assert deltas[BYTES_UPLOADED] == 50
    assert deltas[FILES_UPLOADED] == 1


def test_baseline_never_negative_and_resyncs(store: StateStore) -> None:
    baseline = CounterBaseline(store, "test.")
    baseline.start()
    count_upload(store, 900)
    baseline.commit(store.counters())

    shrunk = {name: 0 for name in COUNTERS}
    assert baseline.deltas(shrunk)[BYTES_UPLOADED] == 0
    baseline.commit(shrunk)
    assert baseline.deltas({**shrunk, BYTES_UPLOADED: 40})[BYTES_UPLOADED] == 40


def test_baselines_of_prefixes_independent(store: StateStore) -> None:
    first = CounterBaseline(store, "one.")
    second = CounterBaseline(store, "two.")
    first.start()
    second.start()
    count_upload(store, 100)

    first.commit(store.counters())

    assert first.deltas(store.counters())[BYTES_UPLOADED] == 0
    assert second.deltas(store.counters())[BYTES_UPLOADED] == 100


def test_collect_reads_queue_and_totals(tmp_path: Path, store: StateStore) -> None:
    config = make_config(tmp_path)
    store.enqueue("/logs/a.log", "ros", identity(1, size=1000), "k/a", now=START - 600)
    store.enqueue("/logs/b.log", "ros", identity(2, size=500), "k/b", now=START - 60)
    [claimed, _] = store.claim(START, 2)
    store.mark_failed(claimed.id, "HTTP 500")
    count_upload(store, 4096)

    snapshot = MetricsCollector(config, store).collect(START)

    assert snapshot.measured_at == START
    assert snapshot.queue_files == 2
    assert snapshot.queue_bytes == 1500
    assert snapshot.failed_files == 1
    assert snapshot.oldest_pending_age_seconds == 600
    assert snapshot.totals[BYTES_UPLOADED] == 4096
    assert snapshot.totals[files_deleted_counter("age")] == 0
    assert set(snapshot.totals) == set(COUNTERS)


def test_collect_measures_watched_filesystem(tmp_path: Path, store: StateStore) -> None:
    config = make_config(tmp_path)

    snapshot = MetricsCollector(config, store).collect(START)

    [disk] = snapshot.disks
    stats = os.statvfs(tmp_path)
    assert disk.mount_point == str(mount_point(tmp_path))
    assert disk.total_bytes == stats.f_blocks * stats.f_frsize
    assert 0.0 <= disk.used_fraction <= 1.0
    assert snapshot.disk_usage_percent == pytest.approx(disk.used_fraction * 100)


def test_disk_usage_of_missing_directory(tmp_path: Path) -> None:
    usage = disk_usage(tmp_path / "not" / "created" / "yet")

    assert usage.mount_point == str(mount_point(tmp_path))
    assert usage.free_bytes > 0


def test_disk_usage_matches_statvfs(tmp_path: Path) -> None:
    stats = os.statvfs(tmp_path)
    used = (stats.f_blocks - stats.f_bfree) * stats.f_frsize
    available = stats.f_bavail * stats.f_frsize

    usage = disk_usage(tmp_path)

    assert usage.free_bytes == pytest.approx(available, rel=0.01)
    assert usage.used_fraction == pytest.approx(used / (used + available), abs=0.01)


def test_watched_disks_one_per_filesystem(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()

    disks = watched_disks([tmp_path / "a", tmp_path / "b", tmp_path / "c"])

    assert len(disks) == 1


def test_mount_point_of_root_filesystem() -> None:
    assert mount_point(Path("/")) == Path("/")


def test_snapshot_without_disks_reports_zero(tmp_path: Path, store: StateStore) -> None:
    config = make_config(tmp_path)
    snapshot = MetricsCollector(config, store).collect(START)

    empty = type(snapshot)(
        measured_at=START,
        totals=snapshot.totals,
        queue_files=0,
        queue_bytes=0,
        failed_files=0,
        oldest_pending_age_seconds=0.0,
    )

    assert empty.disk_usage_percent == 0.0


class SteppedClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_warning_limiter_rate_limits(caplog: pytest.LogCaptureFixture) -> None:
    clock = SteppedClock()
    log = logging.getLogger("test.limiter")
    limiter = WarningLimiter(log, repeat_seconds=60.0, clock=clock)

    with caplog.at_level(logging.DEBUG, logger="test.limiter"):
        limiter.warn("offline", "Cannot send: %s", "refused")
        clock.now = 10.0
        limiter.warn("offline", "Cannot send: %s", "refused")
        limiter.warn("offline", "Cannot send: %s", "refused")
        limiter.warn("throttled", "Throttled: %s", "rate")
        clock.now = 70.0
        limiter.warn("offline", "Cannot send: %s", "refused")

    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    debug = [r for r in caplog.records if r.levelno == logging.DEBUG]
    assert warnings == [
        "Cannot send: refused",
        "Throttled: rate",
        "Cannot send: refused (2 similar messages since the last warning)",
    ]
    assert len(debug) == 2


def test_warning_limiter_reset_warns_again(caplog: pytest.LogCaptureFixture) -> None:
    log = logging.getLogger("test.limiter")
    limiter = WarningLimiter(log, repeat_seconds=60.0, clock=SteppedClock())

    with caplog.at_level(logging.WARNING, logger="test.limiter"):
        limiter.warn("offline", "Cannot send")
        limiter.reset()
        limiter.warn("offline", "Cannot send")

    assert len(caplog.records) == 2
