"""Retention rules on real files under tmp_path, with an injected clock and disk usage."""

from __future__ import annotations

import io
import logging
import os
import subprocess
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from tvm_upload.config import Config, parse_config
from tvm_upload.diskusage import Usage, disk_usage
from tvm_upload.errors import ExitCode
from tvm_upload.files import FileIdentity
from tvm_upload.retention import Retention, cleanup_command
from tvm_upload.safety import DeletionRule
from tvm_upload.state import FileState, StateStore

DAY = 86400.0
NOW = datetime(2026, 12, 4, 12, 0, tzinfo=timezone.utc).timestamp()
SIZE = 1000
KiB = 1024


class FakeDisk:
    """A filesystem of ``total`` bytes: ``offset`` plus the sizes of the files under ``root``.

    Deleting a file under ``root`` lowers the usage it reports, as on a
    real disk. ``calls`` counts the measurements.
    """

    def __init__(self, root: Path, total: int, offset: int = 0) -> None:
        self.root = root
        self.total = total
        self.offset = offset
        self.calls = 0

    def __call__(self, path: Path) -> Usage:
        self.calls += 1
        used = self.offset + self.file_bytes()
        return Usage(total=self.total, used=used, free=self.total - used)

    def file_bytes(self) -> int:
        total = 0
        for directory, _, names in os.walk(self.root):
            for name in names:
                total += os.lstat(os.path.join(directory, name)).st_size
        return total


def settings(tmp_path: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    data: dict[str, Any] = {
        "vehicle_id": "vehicle-1",
        "timezone": "UTC",
        "log_directories": [{"path": str(tmp_path / "logs"), "source": "ros"}],
        "s3": {"bucket": "test-bucket", "region": "cn-north-1"},
        "state_file": str(tmp_path / "state.db"),
        "deletion": {"after_upload": {"keep_days": 0}},
        "disk": {"reserved_gb": 0, "warning_threshold": 0.5, "critical_threshold": 0.8},
    }
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return data


def make_config(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    return parse_config(settings(tmp_path, **sections), environ={})


def write(path: Path, *, age_days: float, size: int = SIZE) -> Path:
    """Create a log file of ``size`` bytes last modified ``age_days`` before NOW."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    mtime_ns = int((NOW - age_days * DAY) * 1e9)
    os.utime(path, ns=(mtime_ns, mtime_ns))
    return path


def enqueue(store: StateStore, path: Path, *, at: float = NOW) -> None:
    store.enqueue(path, "ros", FileIdentity.of(path), f"vehicle-1/{path.name}", now=at)


def claim(store: StateStore, path: Path, *, at: float = NOW) -> int:
    """Mark the queued row of ``path`` as being uploaded, leaving the others pending."""
    file_id = None
    for record in store.claim(at, 1000):
        if record.path == path:
            file_id = record.id
        else:
            store.release(record.id)
    assert file_id is not None
    return file_id


def upload(store: StateStore, path: Path, *, at: float = NOW, keep_days: float = 0.0) -> int:
    """Record ``path`` as uploaded at ``at``, due for deletion ``keep_days`` later."""
    enqueue(store, path, at=at)
    file_id = claim(store, path, at=at)
    store.mark_uploaded(file_id, "0" * 64, at, at + keep_days * DAY, FileIdentity.of(path))
    return file_id


def row_state(store: StateStore, file_id: int) -> FileState | None:
    record = store.get(file_id)
    return None if record is None else record.state


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "logs"
    path.mkdir()
    return path


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    with StateStore(tmp_path / "state.db", lambda: NOW) as opened:
        yield opened


@pytest.fixture
def quiet_disk(root: Path) -> FakeDisk:
    """A disk far below every threshold."""
    return FakeDisk(root, total=1000 * 1000 * 1000)


# After upload.


def test_keep_days_zero_deletes_at_once(
    tmp_path: Path, root: Path, store: StateStore, quiet_disk: FakeDisk
) -> None:
    path = write(root / "a.mcap", age_days=1)
    file_id = upload(store, path, keep_days=0)
    retention = Retention(make_config(tmp_path), store, disk_usage=quiet_disk)

    report = retention.run_due(NOW)

    assert not path.exists()
    assert [outcome.path for outcome in report.deleted] == [path]
    assert row_state(store, file_id) is FileState.DELETED
    assert store.counters()["files_deleted_after_upload"] == 1
    assert store.counters()["bytes_deleted_after_upload"] == SIZE


def test_keep_days_waits_across_restart(tmp_path: Path, root: Path, quiet_disk: FakeDisk) -> None:
    config = make_config(tmp_path, deletion={"after_upload": {"keep_days": 3}})
    path = write(root / "a.mcap", age_days=1)
    with StateStore(tmp_path / "state.db", lambda: NOW) as first:
        file_id = upload(first, path, keep_days=3)
        Retention(config, first, disk_usage=quiet_disk).run_due(NOW + 3 * DAY - 1)
    assert path.exists()

    with StateStore(tmp_path / "state.db", lambda: NOW) as second:
        Retention(config, second, disk_usage=quiet_disk).run_due(NOW + 3 * DAY)
        state = row_state(second, file_id)

    assert not path.exists()
    assert state is FileState.DELETED


def test_file_changed_after_upload_is_requeued(
    tmp_path: Path, root: Path, store: StateStore, quiet_disk: FakeDisk
) -> None:
    path = write(root / "a.log", age_days=1)
    file_id = upload(store, path)
    with path.open("ab") as stream:
        stream.write(b"appended after the upload")
    retention = Retention(make_config(tmp_path), store, disk_usage=quiet_disk)

    first = retention.run_due(NOW)
    second = retention.run_due(NOW + 60)

    assert path.exists()
    assert [record.path for record in first.requeue] == [path]
    assert second.requeue == []
    assert row_state(store, file_id) is FileState.UPLOADED
    assert "files_deleted_after_upload" not in store.counters()


def test_replaced_file_is_not_deleted(
    tmp_path: Path, root: Path, store: StateStore, quiet_disk: FakeDisk
) -> None:
    path = write(root / "a.log", age_days=1)
    upload(store, path)
    replacement = write(root / "a.log.new", age_days=1)
    os.replace(replacement, path)

    Retention(make_config(tmp_path), store, disk_usage=quiet_disk).run_due(NOW)

    assert path.exists()


def test_vanished_upload_marked_deleted(
    tmp_path: Path, root: Path, store: StateStore, quiet_disk: FakeDisk
) -> None:
    path = write(root / "a.log", age_days=1)
    file_id = upload(store, path)
    path.unlink()

    report = Retention(make_config(tmp_path), store, disk_usage=quiet_disk).run_due(NOW)

    assert report.deleted == []
    assert row_state(store, file_id) is FileState.DELETED
    assert "files_deleted_after_upload" not in store.counters()


def test_after_upload_removes_empty_subdirectories(
    tmp_path: Path, root: Path, store: StateStore, quiet_disk: FakeDisk
) -> None:
    path = write(root / "2026-12-04-session" / "bag_0.mcap", age_days=1)
    upload(store, path)

    Retention(make_config(tmp_path), store, disk_usage=quiet_disk).run_due(NOW)

    assert not (root / "2026-12-04-session").exists()
    assert root.is_dir()


def test_after_upload_respects_allow_deletion(
    tmp_path: Path, root: Path, store: StateStore, quiet_disk: FakeDisk
) -> None:
    data = settings(tmp_path)
    data["log_directories"][0]["allow_deletion"] = False
    path = write(root / "a.log", age_days=1)
    file_id = upload(store, path)

    Retention(parse_config(data, environ={}), store, disk_usage=quiet_disk).run_due(NOW)

    assert path.exists()
    assert row_state(store, file_id) is FileState.UPLOADED


def test_disabled_rules_delete_nothing(
    tmp_path: Path, root: Path, store: StateStore, quiet_disk: FakeDisk
) -> None:
    path = write(root / "a.log", age_days=30)
    upload(store, path)
    config = make_config(
        tmp_path,
        deletion={"after_upload": {"enabled": False}, "age_based": {"enabled": False}},
    )

    report = Retention(config, store, disk_usage=quiet_disk).run_due(NOW)

    assert report.outcomes == []
    assert path.exists()


def test_protected_root_warned_at_start(
    tmp_path: Path, store: StateStore, caplog: pytest.LogCaptureFixture
) -> None:
    data = settings(tmp_path)
    data["log_directories"].append({"path": "/var/log/tvm-test-nonexistent", "source": "var"})
    data["log_directories"].append(
        {"path": "/var/log/tvm-test-other", "source": "kept", "allow_deletion": False}
    )

    with caplog.at_level(logging.WARNING, logger="tvm_upload.safety"):
        Retention(parse_config(data, environ={}), store)

    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 1
    assert "/var/log/tvm-test-nonexistent" in messages[0]
    assert "protected system directory /var" in messages[0]


# Age.


def age_config(tmp_path: Path, *, include_not_uploaded: bool = False) -> Config:
    age_based = {
        "enabled": True,
        "max_age_days": 7,
        "schedule_time": "02:00",
        "include_not_uploaded": include_not_uploaded,
    }
    after_upload = {"enabled": False}
    return make_config(tmp_path, deletion={"after_upload": after_upload, "age_based": age_based})


def at_time(hour: int, minute: int, days: int = 0) -> float:
    day = datetime(2026, 12, 4, hour, minute, tzinfo=timezone.utc).timestamp()
    return day + days * DAY


def test_age_based_due_once_a_day_across_restart(
    tmp_path: Path, root: Path, quiet_disk: FakeDisk
) -> None:
    config = age_config(tmp_path)
    with StateStore(tmp_path / "state.db", lambda: NOW) as first:
        retention = Retention(config, first, disk_usage=quiet_disk)
        before = retention.age_based_due(at_time(1, 59))
        at_schedule = retention.age_based_due(at_time(2, 0))
        retention.run_due(at_time(2, 0))
        after_run = retention.age_based_due(at_time(3, 0))

    with StateStore(tmp_path / "state.db", lambda: NOW) as second:
        restarted = Retention(config, second, disk_usage=quiet_disk)
        after_restart = restarted.age_based_due(at_time(23, 0))
        next_night_early = restarted.age_based_due(at_time(1, 59, days=1))
        next_night = restarted.age_based_due(at_time(2, 0, days=1))

    assert not before
    assert at_schedule
    assert not after_run
    assert not after_restart
    assert not next_night_early
    assert next_night


def test_age_based_uses_configured_zone(tmp_path: Path, store: StateStore) -> None:
    data = settings(tmp_path, deletion={"age_based": {"enabled": True, "schedule_time": "02:00"}})
    data["timezone"] = "Asia/Shanghai"
    retention = Retention(parse_config(data, environ={}), store)

    assert not retention.age_based_due(at_time(17, 59))
    assert retention.age_based_due(at_time(18, 0))


def test_age_based_deletes_only_old_uploaded_files(
    tmp_path: Path, root: Path, store: StateStore, quiet_disk: FakeDisk
) -> None:
    old_uploaded = write(root / "old-uploaded.log", age_days=10)
    old_pending = write(root / "old-pending.log", age_days=10)
    old_unknown = write(root / "old-unknown.log", age_days=10)
    new_uploaded = write(root / "new-uploaded.log", age_days=1)
    upload(store, old_uploaded)
    upload(store, new_uploaded)
    enqueue(store, old_pending)
    retention = Retention(age_config(tmp_path), store, disk_usage=quiet_disk)

    early = retention.run_due(at_time(1, 0))
    report = retention.run_due(at_time(2, 0))

    assert early.outcomes == []
    assert [outcome.path for outcome in report.deleted] == [old_uploaded]
    assert old_pending.exists()
    assert old_unknown.exists()
    assert new_uploaded.exists()
    assert store.counters()["files_deleted_age"] == 1
    assert "data_loss_files" not in store.counters()


def test_age_based_include_not_uploaded_is_data_loss(
    tmp_path: Path,
    root: Path,
    store: StateStore,
    quiet_disk: FakeDisk,
    caplog: pytest.LogCaptureFixture,
) -> None:
    old_uploaded = write(root / "old-uploaded.log", age_days=9)
    old_pending = write(root / "old-pending.log", age_days=10)
    old_unknown = write(root / "old-unknown.log", age_days=11)
    new_unknown = write(root / "new-unknown.log", age_days=1)
    upload(store, old_uploaded)
    enqueue(store, old_pending)
    retention = Retention(
        age_config(tmp_path, include_not_uploaded=True), store, disk_usage=quiet_disk
    )

    with caplog.at_level(logging.INFO, logger="tvm_upload.safety"):
        report = retention.run_due(at_time(2, 0))

    assert [outcome.path for outcome in report.deleted] == [old_unknown, old_pending, old_uploaded]
    assert [outcome.data_loss for outcome in report.deleted] == [True, True, False]
    assert new_unknown.exists()
    assert store.pending_paths() == set()
    assert store.counters()["data_loss_files"] == 2
    assert store.counters()["files_deleted_age"] == 3
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert [str(old_unknown) in errors[0].getMessage(), len(errors)] == [True, 2]


def test_age_based_keeps_file_being_uploaded(
    tmp_path: Path, root: Path, store: StateStore, quiet_disk: FakeDisk
) -> None:
    uploading = write(root / "uploading.log", age_days=10)
    in_process = write(root / "in-process.log", age_days=10)
    enqueue(store, uploading)
    claim(store, uploading)
    retention = Retention(
        age_config(tmp_path, include_not_uploaded=True),
        store,
        disk_usage=quiet_disk,
        in_flight=lambda: {in_process},
    )

    report = retention.run_due(at_time(2, 0))

    assert report.deleted == []
    assert uploading.exists()
    assert in_process.exists()


# Emergency.


def emergency_config(tmp_path: Path, **disk: Any) -> Config:
    deletion = {"after_upload": {"enabled": False}}
    return make_config(tmp_path, deletion=deletion, disk=disk)


def test_emergency_below_warning_deletes_nothing(
    tmp_path: Path, root: Path, store: StateStore
) -> None:
    path = write(root / "a.log", age_days=3)
    upload(store, path)
    disk = FakeDisk(root, total=10 * SIZE, offset=4 * SIZE)

    report = Retention(emergency_config(tmp_path), store, disk_usage=disk).run_due(NOW)

    assert report.outcomes == []
    assert path.exists()


def test_emergency_warning_deletes_uploaded_oldest_first(
    tmp_path: Path, root: Path, store: StateStore
) -> None:
    # Given usage 60% with warning at 50%: two uploaded files must go.
    u1 = write(root / "u1.log", age_days=5)
    n1 = write(root / "n1.log", age_days=4)
    u2 = write(root / "sub" / "u2.log", age_days=3)
    u3 = write(root / "u3.log", age_days=2)
    n2 = write(root / "n2.log", age_days=1)
    for path in (u3, u1, u2):
        upload(store, path)
    enqueue(store, n1)
    disk = FakeDisk(root, total=10 * SIZE, offset=1 * SIZE)

    # When the emergency rule runs.
    report = Retention(emergency_config(tmp_path), store, disk_usage=disk).run_due(NOW)

    # Then the two oldest uploaded files are deleted, in that order, and nothing else.
    assert [outcome.path for outcome in report.deleted] == [u1, u2]
    assert [path.exists() for path in (u1, n1, u2, u3, n2)] == [False, True, False, True, True]
    assert store.counters()["files_deleted_emergency"] == 2
    assert "data_loss_files" not in store.counters()


def test_emergency_warning_frees_reserved_space(
    tmp_path: Path, root: Path, store: StateStore
) -> None:
    uploaded = [write(root / f"u{number}.log", age_days=10 - number) for number in range(4)]
    for path in uploaded:
        upload(store, path)
    disk = FakeDisk(root, total=10 * SIZE, offset=2 * SIZE)
    config = emergency_config(tmp_path, reserved_gb=6500 / 1024**3)

    report = Retention(config, store, disk_usage=disk).run_due(NOW)

    assert [outcome.path for outcome in report.deleted] == uploaded[:3]
    assert uploaded[3].exists()


def test_emergency_critical_deletes_not_uploaded_after_uploaded(
    tmp_path: Path, root: Path, store: StateStore, caplog: pytest.LogCaptureFixture
) -> None:
    # Given a full disk (critical at 80%) holding two uploaded and four other files.
    uploading = write(root / "uploading.log", age_days=9)
    u1 = write(root / "u1.log", age_days=8)
    n1 = write(root / "n1.log", age_days=7)
    u2 = write(root / "u2.log", age_days=6)
    n2 = write(root / "n2.log", age_days=5)
    n3 = write(root / "n3.log", age_days=4)
    upload(store, u1)
    upload(store, u2)
    enqueue(store, n1)
    enqueue(store, uploading)
    claim(store, uploading)
    disk = FakeDisk(root, total=12 * SIZE, offset=6 * SIZE)

    # When the emergency rule runs.
    with caplog.at_level(logging.INFO):
        report = Retention(emergency_config(tmp_path), store, disk_usage=disk).run_due(NOW)

    # Then both uploaded files go first, then the oldest file not uploaded
    # that is not being uploaded, and deletion stops below the critical level.
    assert [outcome.path for outcome in report.deleted] == [u1, u2, n1]
    assert [outcome.data_loss for outcome in report.deleted] == [False, False, True]
    assert uploading.exists()
    assert n2.exists()
    assert n3.exists()
    assert disk(root).fraction <= 0.8
    assert store.pending_paths() == {uploading}
    assert store.counters()["data_loss_files"] == 1
    assert store.counters()["files_deleted_emergency"] == 3
    data_loss = [r for r in caplog.records if "before it was uploaded" in r.getMessage()]
    assert [record.levelno for record in data_loss] == [logging.ERROR]


def test_emergency_never_deletes_file_being_uploaded(
    tmp_path: Path, root: Path, store: StateStore, caplog: pytest.LogCaptureFixture
) -> None:
    uploading = write(root / "uploading.log", age_days=9)
    enqueue(store, uploading)
    claim(store, uploading)
    disk = FakeDisk(root, total=2 * SIZE, offset=1 * SIZE)

    with caplog.at_level(logging.WARNING, logger="tvm_upload.diskusage"):
        report = Retention(emergency_config(tmp_path), store, disk_usage=disk).run_due(NOW)

    assert report.deleted == []
    assert uploading.exists()
    assert "nothing left that retention may delete" in caplog.records[-1].getMessage()


def test_emergency_logs_once_per_episode(
    tmp_path: Path, root: Path, store: StateStore, caplog: pytest.LogCaptureFixture
) -> None:
    uploading = write(root / "uploading.log", age_days=9)
    enqueue(store, uploading)
    claim(store, uploading)
    disk = FakeDisk(root, total=2 * SIZE, offset=1 * SIZE)
    retention = Retention(emergency_config(tmp_path), store, disk_usage=disk)

    with caplog.at_level(logging.INFO, logger="tvm_upload.diskusage"):
        retention.run_due(NOW)
        retention.run_due(NOW + 30)
        disk.total = 100 * SIZE
        retention.run_due(NOW + 60)

    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 3
    assert "above critical_threshold 80%" in messages[0]
    assert "nothing left that retention may delete" in messages[1]
    assert "down to 2.0%" in messages[2]


def test_emergency_skips_directories_without_deletion(
    tmp_path: Path, root: Path, store: StateStore
) -> None:
    data = settings(tmp_path, deletion={"after_upload": {"enabled": False}})
    data["log_directories"][0]["allow_deletion"] = False
    path = write(root / "a.log", age_days=3)
    upload(store, path)
    disk = FakeDisk(root, total=2 * SIZE, offset=1 * SIZE)

    report = Retention(parse_config(data, environ={}), store, disk_usage=disk).run_due(NOW)

    assert report.outcomes == []
    assert path.exists()


def test_emergency_on_real_tmpfs(tmp_path: Path, store: StateStore) -> None:
    # Given a 2 MiB tmpfs 75% full, and older uploaded files in a directory on another disk.
    mount_point = tmp_path / "fs"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
        capture_output=True,
        check=False,
    )
    if os.geteuid() != 0 or mounted.returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        root = mount_point / "logs"
        uploaded = [write(root / f"u{n}.log", age_days=10 - n, size=256 * KiB) for n in range(4)]
        others = [write(root / f"n{n}.log", age_days=5 - n, size=256 * KiB) for n in range(2)]
        elsewhere = write(tmp_path / "other" / "old.log", age_days=30)
        for path in [*uploaded, elsewhere]:
            upload(store, path)
        data = settings(tmp_path, deletion={"after_upload": {"enabled": False}})
        data["log_directories"] = [
            {"path": str(root), "source": "ros"},
            {"path": str(tmp_path / "other"), "source": "other"},
        ]
        tmpfs_device = root.stat().st_dev
        quiet = FakeDisk(tmp_path / "other", total=1000 * 1000 * 1000)

        def measure(path: Path) -> Usage:
            return disk_usage(path) if path.stat().st_dev == tmpfs_device else quiet(path)

        before = disk_usage(root)

        # When the emergency rule measures the real tmpfs.
        report = Retention(parse_config(data, environ={}), store, disk_usage=measure).run_due(NOW)

        # Then only tmpfs files go, oldest uploaded first, until usage is below 50%.
        assert before.fraction == pytest.approx(0.75, abs=0.02)
        assert [outcome.path for outcome in report.deleted] == uploaded[:3]
        assert [path.exists() for path in others] == [True, True]
        assert elsewhere.exists()
        assert disk_usage(root).fraction < 0.5
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


# Plans and the cleanup command.


def test_plan_lists_without_deleting(
    tmp_path: Path, root: Path, store: StateStore, quiet_disk: FakeDisk
) -> None:
    path = write(root / "a.log", age_days=1)
    file_id = upload(store, path)
    retention = Retention(make_config(tmp_path), store, disk_usage=quiet_disk)

    plan = retention.plan("after-upload", NOW)

    assert [(planned.path, planned.rule, planned.bytes) for planned in plan] == [
        (path, DeletionRule.AFTER_UPLOAD, SIZE)
    ]
    assert plan[0].reason == "uploaded 0.0 days ago with keep_days 0"
    assert path.exists()
    assert row_state(store, file_id) is FileState.UPLOADED


def test_plan_emergency_counts_earlier_rules(tmp_path: Path, root: Path, store: StateStore) -> None:
    # Given usage 60% with warning at 50%, and the oldest file due after upload.
    due = write(root / "due.log", age_days=5)
    upload(store, due, keep_days=0)
    for number, age in enumerate((4, 3)):
        upload(store, write(root / f"u{number}.log", age_days=age), keep_days=30)
    disk = FakeDisk(root, total=10 * SIZE, offset=3 * SIZE)
    retention = Retention(make_config(tmp_path), store, disk_usage=disk)

    # When every rule is planned together.
    plan = retention.plan(None, NOW)

    # Then the after-upload deletion already brings usage to 50%.
    assert [(planned.path, planned.rule) for planned in plan] == [(due, DeletionRule.AFTER_UPLOAD)]


def test_cleanup_dry_run_deletes_nothing(
    tmp_path: Path, root: Path, store: StateStore, quiet_disk: FakeDisk
) -> None:
    due = write(root / "due.log", age_days=1)
    old = write(root / "old.log", age_days=10)
    due_id = upload(store, due)
    old_id = upload(store, old, keep_days=30)
    config = make_config(tmp_path, deletion={"age_based": {"enabled": True, "max_age_days": 7}})
    out = io.StringIO()

    code = cleanup_command(config, store, None, True, out, now=NOW, disk_usage=quiet_disk)

    lines = out.getvalue().splitlines()
    assert code == ExitCode.OK
    assert due.exists()
    assert old.exists()
    assert row_state(store, due_id) is FileState.UPLOADED
    assert row_state(store, old_id) is FileState.UPLOADED
    assert store.counters() == {}
    assert lines[0].startswith(f"Filesystem holding {root}: 0.0% used, 0.9 GiB free ")
    assert lines[1].startswith(f"Would delete {due} ({SIZE} bytes) by rule after-upload: ")
    assert lines[2].startswith(f"Would delete {old} ({SIZE} bytes) by rule age: ")
    assert lines[3] == f"Would free {2 * SIZE} bytes (0.0 MiB) in 2 files"
    assert len(lines) == 4


def test_cleanup_nothing_due_shows_kept_files(
    tmp_path: Path, root: Path, store: StateStore, quiet_disk: FakeDisk
) -> None:
    # Given two files uploaded with keep_days 14 and 30, and one uploaded
    # while after_upload was disabled.
    upload(store, write(root / "a.log", age_days=1), keep_days=30)
    upload(store, write(root / "b.log", age_days=1), at=NOW - DAY, keep_days=14)
    undated = write(root / "c.log", age_days=1)
    enqueue(store, undated)
    store.mark_uploaded(claim(store, undated), "0" * 64, NOW, None, FileIdentity.of(undated))
    config = parse_config({**settings(tmp_path), "timezone": "Asia/Shanghai"}, environ={})
    out = io.StringIO()

    # When a dry run finds nothing due.
    code = cleanup_command(config, store, "after-upload", True, out, now=NOW, disk_usage=quiet_disk)

    # Then it names the kept files, the earliest delete time and why keep_days did not move it.
    assert code == ExitCode.OK
    assert out.getvalue().splitlines() == [
        "Would free 0 bytes (0.0 MiB) in 0 files",
        (
            "Kept 2 uploaded files until their delete time; the earliest is 2026-12-17 20:00 CST"
            " (in 13.0 days)"
        ),
        (
            "Kept 1 uploaded files that have no delete time: they were uploaded or imported"
            " while deletion.after_upload was disabled, so that rule never deletes them"
        ),
        (
            "Delete times are fixed at upload time, so a change of keep_days applies only to"
            " files uploaded after it"
        ),
    ]


def test_cleanup_without_uploads_prints_total_only(tmp_path: Path, store: StateStore) -> None:
    out = io.StringIO()

    cleanup_command(make_config(tmp_path), store, "after-upload", True, out, now=NOW)

    assert out.getvalue().splitlines() == ["Would free 0 bytes (0.0 MiB) in 0 files"]


def test_cleanup_runs_one_policy(
    tmp_path: Path, root: Path, store: StateStore, quiet_disk: FakeDisk
) -> None:
    due = write(root / "due.log", age_days=1)
    old = write(root / "old.log", age_days=10)
    upload(store, due)
    upload(store, old, keep_days=30)
    config = make_config(tmp_path, deletion={"age_based": {"enabled": True, "max_age_days": 7}})
    out = io.StringIO()

    code = cleanup_command(config, store, "age", False, out, now=NOW, disk_usage=quiet_disk)

    assert code == ExitCode.OK
    assert due.exists()
    assert not old.exists()
    assert out.getvalue().splitlines()[-1] == f"Freed {SIZE} bytes (0.0 MiB) in 1 files"


def test_cleanup_reports_disabled_rule(
    tmp_path: Path, store: StateStore, quiet_disk: FakeDisk
) -> None:
    out = io.StringIO()

    code = cleanup_command(
        make_config(tmp_path), store, "age", True, out, now=NOW, disk_usage=quiet_disk
    )

    assert code == ExitCode.OK
    assert out.getvalue().splitlines()[0] == (
        "Skipped rule age: it is disabled in the configuration"
    )


def test_cleanup_rejects_unknown_policy(tmp_path: Path, store: StateStore) -> None:
    out = io.StringIO()

    code = cleanup_command(make_config(tmp_path), store, "everything", True, out, now=NOW)

    assert code == ExitCode.USAGE
    assert "after-upload, age, emergency" in out.getvalue()


# Registry.


def test_registry_pruned_after_retention_days(
    tmp_path: Path, root: Path, store: StateStore, quiet_disk: FakeDisk
) -> None:
    path = write(root / "a.log", age_days=1)
    file_id = upload(store, path)
    retention = Retention(make_config(tmp_path), store, disk_usage=quiet_disk)
    retention.run_due(NOW)

    pruned_early = retention.prune_registry(NOW + 29 * DAY)
    pruned_late = retention.prune_registry(NOW + 31 * DAY)

    assert pruned_early == 0
    assert pruned_late == 1
    assert store.get(file_id) is None


def test_filesystem_usage_measures_each_root(tmp_path: Path, root: Path, store: StateStore) -> None:
    write(root / "a.log", age_days=1)
    disk = FakeDisk(root, total=10 * SIZE)
    retention = Retention(make_config(tmp_path), store, disk_usage=disk)

    usage = retention.filesystem_usage()

    assert usage == {root: Usage(total=10 * SIZE, used=SIZE, free=9 * SIZE)}
