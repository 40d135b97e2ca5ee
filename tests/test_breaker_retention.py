"""Adversarial tests: no log is deleted before it is safely in S3, nor outside its directory."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path, PurePosixPath

import pytest
from breaker_support import FakeClock, make_config, run_cli
from daemon_process import DaemonProcess, bucket_contents, wait_for, write_config

from tvm_upload.clock import SYSTEM_CLOCK
from tvm_upload.config import LogDirectory
from tvm_upload.files import FileIdentity
from tvm_upload.intake import import_legacy_state
from tvm_upload.retention import Retention
from tvm_upload.safety import DeletionRule, DeletionStatus, Rejection, SafeDeleter
from tvm_upload.state import StateStore

DAY_SECONDS = 86400.0


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    root = tmp_path / "logs"
    root.mkdir()
    return root


def test_recreated_file_keeps_deleted_files_object(
    tmp_path: Path, logs: Path, seaweed, bucket: str, s3
) -> None:
    # Given a daemon that deletes uploaded files at once (keep_days: 0)
    deletion = {"after_upload": {"enabled": True, "keep_days": 0}, "emergency": {"enabled": False}}
    config = write_config(
        tmp_path,
        seaweed.endpoint_url,
        bucket,
        [{"path": logs, "source": "logs"}],
        deletion=deletion,
    )
    with DaemonProcess(config, tmp_path / "daemon.log") as daemon:
        wait_for(lambda: "Started:" in daemon.log, 30, "daemon started")

        # When a log file is uploaded and deleted by retention, and the recorder later
        # writes a new file with the same name on the same day
        (logs / "status.log").write_bytes(b"first run\n")
        wait_for(lambda: len(daemon.uploaded_lines()) == 1, 20, "first upload")
        cleanup = run_cli(config, "cleanup", "--policy", "after-upload")
        assert not (logs / "status.log").exists(), cleanup.stdout + cleanup.stderr
        (logs / "status.log").write_bytes(b"second run\n")
        wait_for(lambda: len(daemon.uploaded_lines()) == 2, 20, "second upload")

    # Then the bucket still contains the first file, whose only copy it is
    assert sorted(bucket_contents(s3, bucket).values()) == [b"first run\n", b"second run\n"]


def test_legacy_registry_file_kept_without_object(
    tmp_path: Path, logs: Path, seaweed, bucket: str, s3
) -> None:
    # Given the older uploader's registry listing a file as uploaded a month ago,
    # while the bucket has no object for it (a wrong bucket, a lost upload)
    path = logs / "drive.log"
    path.write_bytes(b"never verified\n")
    st = path.stat()
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    entry = {"filepath": str(path), "size": st.st_size, "mtime": st.st_mtime}
    entry["processed_at"] = time.time() - 30 * DAY_SECONDS
    registry = {"_metadata": {}, "files": {f"{path}::{st.st_size}::{st.st_mtime}": entry}}
    (legacy / "reg.json").write_text(json.dumps(registry))
    config = make_config(
        tmp_path,
        [{"path": logs, "source": "logs"}],
        s3={"bucket": bucket, "region": "cn-north-1", "endpoint_url": seaweed.endpoint_url},
    )
    config.state_file.parent.mkdir()

    # When the registry is imported and the after-upload rule runs
    with StateStore(config.state_file) as store:
        assert import_legacy_state(config, store, SYSTEM_CLOCK) == 1
        Retention(config, store).run("after-upload", time.time())

    # Then the file is kept: nothing in S3 proves it was uploaded
    assert bucket_contents(s3, bucket) == {}
    assert path.exists()


def test_age_rule_never_reaches_outside_the_tree(tmp_path: Path, logs: Path) -> None:
    # Given old files outside the tree, reached through a symlinked directory, a symlink
    # to a file and a hard link inside it, and an age rule that deletes even files never
    # uploaded
    outside = tmp_path / "outside"
    outside.mkdir()
    old = time.time() - 30 * DAY_SECONDS
    for name in ("linked.log", "hard.log", "target.log"):
        (outside / name).write_bytes(name.encode())
        os.utime(outside / name, (old, old))
    (logs / "dir-link").symlink_to(outside)
    (logs / "file-link.log").symlink_to(outside / "target.log")
    os.link(outside / "hard.log", logs / "hard.log")
    (logs / "own.log").write_bytes(b"own\n")
    os.utime(logs / "own.log", (old, old))
    config = make_config(
        tmp_path,
        [{"path": logs, "source": "logs"}],
        deletion={
            "after_upload": {"enabled": False},
            "age_based": {"enabled": True, "max_age_days": 1, "include_not_uploaded": True},
            "emergency": {"enabled": False},
        },
    )
    config.state_file.parent.mkdir()

    # When the age rule runs
    with StateStore(config.state_file) as store:
        report = Retention(config, store).run("age", time.time())

    # Then only the names inside the tree were removed; every file outside is intact
    deleted = {outcome.path.name for outcome in report.deleted}
    assert deleted == {"hard.log", "own.log"}
    assert sorted(p.name for p in outside.iterdir()) == ["hard.log", "linked.log", "target.log"]
    assert (outside / "hard.log").read_bytes() == b"hard.log"
    assert (logs / "dir-link").is_symlink()
    assert (logs / "file-link.log").is_symlink()


def test_protected_directory_behind_double_slash_rejected() -> None:
    # Given a log directory written with POSIX's special leading "//", which pathlib keeps
    configured = LogDirectory(path=Path("//var/log/tvm-breaker-absent"), source="logs")
    deleter = SafeDeleter([configured])

    # When a file there is to be deleted
    outcome = deleter.delete(
        Path("//var/log/tvm-breaker-absent/a.log"), DeletionRule.AGE, reason="test"
    )

    # Then the resolved path is recognised as under /var before anything is touched
    assert outcome.status is DeletionStatus.REJECTED
    assert outcome.rejection is Rejection.PROTECTED


def test_root_with_dot_dot_is_never_cleaned(tmp_path: Path, logs: Path) -> None:
    # Given a log directory written with a ".." component that resolves into a
    # directory the deleter treats as protected
    system = tmp_path / "system"
    (system / "logs").mkdir(parents=True)
    victim = system / "logs" / "a.log"
    victim.write_bytes(b"system log\n")
    dotted = logs / ".." / "system" / "logs"
    with pytest.raises(ValueError, match=r"contains '\.\.'"):
        LogDirectory(path=dotted, source="logs")
    # The configuration rejects it; the deleter must hold on its own too.
    configured = LogDirectory.model_construct(
        path=dotted, source="logs", pattern=["*"], exclude=[], recursive=True, allow_deletion=True
    )
    deleter = SafeDeleter([configured], protected=[PurePosixPath(system)])

    # When retention requests the deletion of a file there, by its configured or resolved name
    spelled = deleter.delete(configured.path / "a.log", DeletionRule.EMERGENCY, reason="test")
    resolved = deleter.delete(victim, DeletionRule.EMERGENCY, reason="test")

    # Then both are rejected before the file is looked at, and the file stays
    assert spelled.rejection is Rejection.NOT_NORMALIZED
    assert resolved.rejection is Rejection.PROTECTED
    assert victim.exists()


def test_rules_keep_file_being_uploaded(tmp_path: Path, logs: Path) -> None:
    # Given a file whose queue row is being uploaded by a daemon, old enough for every rule
    path = logs / "big.bag"
    path.write_bytes(b"x" * 1000)
    old = time.time() - 30 * DAY_SECONDS
    os.utime(path, (old, old))
    config = make_config(
        tmp_path,
        [{"path": logs, "source": "logs"}],
        deletion={
            "age_based": {"enabled": True, "max_age_days": 1, "include_not_uploaded": True},
        },
        disk={"warning_threshold": 0.01, "critical_threshold": 0.02},
    )
    config.state_file.parent.mkdir()
    clock = FakeClock()
    with StateStore(config.state_file, clock.time) as store:
        store.enqueue(path, "logs", FileIdentity.of(path), "test-vehicle/x/logs/big.bag")
        assert len(store.claim(clock.time(), 10)) == 1

        # When every rule runs, the emergency rule on a disk it measures as full
        report = Retention(config, store).run(None, clock.time())

    # Then the file is kept
    assert path.exists()
    assert report.deleted == []


def test_cleanup_dry_run_creates_no_state_store(tmp_path: Path, logs: Path) -> None:
    # Given an installed vehicle whose daemon has not run yet: the state directory exists
    # (the installer makes it, owned by the service user) but the store does not
    config = write_config(
        tmp_path, "http://127.0.0.1:9", "unused-bucket", [{"path": logs, "source": "logs"}]
    )
    state_directory = tmp_path / "state"
    state_directory.mkdir()

    # When an operator runs a dry run, typically with sudo
    result = run_cli(config, "cleanup", "--dry-run")

    # Then it reports and changes nothing, so the daemon later creates its own store
    assert result.returncode == 0, result.stderr
    assert list(state_directory.iterdir()) == []


@pytest.mark.xfail(
    reason="an uploaded file that was briefly unavailable (unmounted disk) is never cleaned again",
    strict=True,
)
def test_uploaded_file_back_from_unmounted_disk_is_cleaned(tmp_path: Path) -> None:
    # Given a verified upload on a data disk, due for deletion
    mount = tmp_path / "ssd"
    logs = mount / "bags"
    logs.mkdir(parents=True)
    path = logs / "drive.mcap"
    path.write_bytes(b"uploaded bag\n")
    config = make_config(
        tmp_path,
        [{"path": logs, "source": "bags"}],
        deletion={"after_upload": {"enabled": True, "keep_days": 0}},
    )
    config.state_file.parent.mkdir()
    clock = FakeClock()
    identity = FileIdentity.of(path)
    with StateStore(config.state_file, clock.time) as store:
        store.enqueue(path, "bags", identity, "test-vehicle/2026-12-04/bags/drive.mcap")
        (record,) = store.claim(clock.time(), 1)
        store.mark_uploaded(record.id, "0" * 64, clock.time(), clock.time(), identity)
        retention = Retention(config, store)

        # When the disk is away during one retention pass (unmounted, or its mount point
        # renamed) and then comes back with the same file
        os.rename(mount, tmp_path / "ssd-away")
        clock.advance(60)
        retention.run("after-upload", clock.time())
        os.rename(tmp_path / "ssd-away", mount)
        clock.advance(60)
        report = retention.run("after-upload", clock.time())

    # Then the next pass deletes it as an uploaded file, as it would have without the gap
    assert [outcome.path for outcome in report.deleted] == [path]
    assert not path.exists()
