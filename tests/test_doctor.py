"""``tvm-upload doctor`` against the real SeaweedFS server, with good and broken settings."""

from __future__ import annotations

import email.utils
import json
import logging
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Sequence
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
import yaml
from metrics_support import VEHICLE_ID, config_data, free_port, identity, with_value

from tvm_upload.doctor import (
    Check,
    Status,
    check_clock_skew,
    doctor_exit_code,
    render_checks,
    render_checks_json,
    run_doctor,
)
from tvm_upload.errors import ExitCode
from tvm_upload.localserver import SeaweedServer
from tvm_upload.state import StateStore

SECRET = "doctor-secret-Zq81nVv0"
NOW = 1_800_000_000.0
ACCESS_KEY = "AKIADOCTORTEST"


def active(args: Sequence[str]) -> tuple[int, str]:
    return 0, "active\n"


def inactive(args: Sequence[str]) -> tuple[int, str]:
    return 3, "inactive\n"


@pytest.fixture
def watches(tmp_path: Path) -> Path:
    path = tmp_path / "max_user_watches"
    path.write_text("524288\n")
    return path


def good_data(tmp_path: Path, endpoint: str, bucket: str) -> dict[str, Any]:
    """Settings that work against the local server, with thresholds no test disk reaches."""
    data = config_data(tmp_path)
    for directory in data["log_directories"]:
        Path(directory["path"]).mkdir(parents=True)
    data["s3"] = {"bucket": bucket, "region": "us-east-1", "endpoint_url": endpoint}
    data["disk"] = {"warning_threshold": 0.995, "critical_threshold": 0.999}
    return data


def write_config(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def with_profile(tmp_path: Path, data: dict[str, Any]) -> dict[str, Any]:
    """Use a profile from a credentials directory whose secret the tests look for."""
    directory = tmp_path / "aws"
    directory.mkdir()
    credentials = directory / "credentials"
    credentials.write_text(
        f"[vehicle]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET}\n"
    )
    credentials.chmod(0o600)
    (directory / "config").write_text("[profile vehicle]\nregion = us-east-1\n")
    data = with_value(data, "s3.profile", "vehicle")
    return with_value(data, "s3.credentials_path", str(directory))


def by_name(checks: list[Check]) -> dict[str, Check]:
    return {check.name: check for check in checks}


def doctor(path: Path, watches: Path, **options: Any) -> list[Check]:
    options.setdefault("run_command", active)
    return run_doctor(path, inotify_watches_path=watches, **options)


# Good settings.


def test_good_settings_all_ok(
    tmp_path: Path, seaweed: SeaweedServer, bucket: str, watches: Path, s3: Any
) -> None:
    path = write_config(tmp_path, good_data(tmp_path, seaweed.endpoint_url, bucket))

    checks = doctor(path, watches)

    found = by_name(checks)
    assert [check for check in checks if check.status is not Status.OK] == []
    assert list(found)[:6] == [
        "config",
        "log directories",
        "credentials",
        "bucket",
        "clock",
        "bucket write",
    ]
    assert {"state store", "inotify", "cloudwatch", "service"} <= set(found)
    assert any(name.startswith("disk /") for name in found)
    assert "found by botocore's env provider" in found["credentials"].detail
    assert f"{VEHICLE_ID}/.doctor/probe-" in found["bucket write"].detail
    assert s3.list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0
    assert doctor_exit_code(checks) == ExitCode.OK


def test_profile_credentials_described(
    tmp_path: Path, seaweed: SeaweedServer, bucket: str, watches: Path
) -> None:
    data = with_profile(tmp_path, good_data(tmp_path, seaweed.endpoint_url, bucket))

    found = by_name(doctor(write_config(tmp_path, data), watches))

    assert found["credentials"].status is Status.OK
    assert found["credentials"].detail == (
        "found by botocore's shared-credentials-file provider (profile vehicle)"
    )


def test_exposed_credentials_file_warns(
    tmp_path: Path, seaweed: SeaweedServer, bucket: str, watches: Path
) -> None:
    data = with_profile(tmp_path, good_data(tmp_path, seaweed.endpoint_url, bucket))
    (tmp_path / "aws" / "credentials").chmod(0o644)

    found = by_name(doctor(write_config(tmp_path, data), watches))

    assert found["credentials"].status is Status.WARN
    assert found["credentials"].hint == f"chmod 600 {tmp_path / 'aws' / 'credentials'}"


def test_state_store_checked(
    tmp_path: Path, seaweed: SeaweedServer, bucket: str, watches: Path
) -> None:
    data = good_data(tmp_path, seaweed.endpoint_url, bucket)
    state_file = Path(data["state_file"])
    state_file.parent.mkdir()
    with StateStore(state_file) as store:
        store.enqueue("/logs/a.log", "ros", identity(1), "k/a")

    found = by_name(doctor(write_config(tmp_path, data), watches))

    assert found["state store"].status is Status.OK
    assert "passed quick_check: 1 files queued (0 failed)" in found["state store"].detail
    assert sorted(path.name for path in state_file.parent.iterdir()) == ["state.db"]


def test_newer_state_store_fails(
    tmp_path: Path, seaweed: SeaweedServer, bucket: str, watches: Path
) -> None:
    data = good_data(tmp_path, seaweed.endpoint_url, bucket)
    state_file = Path(data["state_file"])
    state_file.parent.mkdir()
    StateStore(state_file).close()
    with closing(sqlite3.connect(state_file)) as conn:
        conn.execute("PRAGMA user_version = 99")

    check = by_name(doctor(write_config(tmp_path, data), watches))["state store"]

    assert check.status is Status.FAIL
    assert "schema version 99" in check.detail


def test_damaged_state_store_fails(
    tmp_path: Path, seaweed: SeaweedServer, bucket: str, watches: Path
) -> None:
    data = good_data(tmp_path, seaweed.endpoint_url, bucket)
    state_file = Path(data["state_file"])
    state_file.parent.mkdir()
    state_file.write_bytes(b"this is not a database" * 100)

    checks = doctor(write_config(tmp_path, data), watches)

    assert by_name(checks)["state store"].status is Status.FAIL
    assert doctor_exit_code(checks) == ExitCode.FAILURE


def test_missing_log_directory_warns(
    tmp_path: Path, seaweed: SeaweedServer, bucket: str, watches: Path
) -> None:
    data = good_data(tmp_path, seaweed.endpoint_url, bucket)
    data = with_value(data, "log_directories", [{"path": str(tmp_path / "later"), "source": "x"}])

    found = by_name(doctor(write_config(tmp_path, data), watches))

    assert found["log directories"].status is Status.WARN
    assert "not found yet" in found["log directories"].detail


def test_inotify_limit_too_low(
    tmp_path: Path, seaweed: SeaweedServer, bucket: str, watches: Path
) -> None:
    data = good_data(tmp_path, seaweed.endpoint_url, bucket)
    for number in range(5):
        (Path(data["log_directories"][0]["path"]) / f"run-{number}").mkdir()
    watches.write_text("4\n")

    check = by_name(doctor(write_config(tmp_path, data), watches))["inotify"]

    assert check.status is Status.WARN
    assert check.detail.startswith("5 directories to watch, max_user_watches is 4")
    assert check.hint is not None
    assert "fs.inotify.max_user_watches" in check.hint


def test_inotify_limit_unreadable(tmp_path: Path, seaweed: SeaweedServer, bucket: str) -> None:
    path = write_config(tmp_path, good_data(tmp_path, seaweed.endpoint_url, bucket))

    check = by_name(doctor(path, tmp_path / "no-such-file"))["inotify"]

    assert check.status is Status.WARN


def test_service_not_active_warns(
    tmp_path: Path, seaweed: SeaweedServer, bucket: str, watches: Path
) -> None:
    path = write_config(tmp_path, good_data(tmp_path, seaweed.endpoint_url, bucket))

    check = by_name(doctor(path, watches, run_command=inactive))["service"]

    assert check.status is Status.WARN
    assert check.detail == "tvm-upload.service is not active: inactive"


def write_daemon_status(state_file: Path, pid: int, updated_at: float) -> None:
    state_file.parent.mkdir(parents=True, exist_ok=True)
    status = {"pid": pid, "updated_at": updated_at, "in_flight": 0}
    (state_file.parent / "daemon-status.json").write_text(json.dumps(status))


def exited_pid() -> int:
    """Return the PID of a child process that has exited and been reaped."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_foreground_daemon_counts_as_running(
    tmp_path: Path, seaweed: SeaweedServer, bucket: str, watches: Path
) -> None:
    data = good_data(tmp_path, seaweed.endpoint_url, bucket)
    write_daemon_status(Path(data["state_file"]), os.getpid(), NOW - 5)

    checks = doctor(write_config(tmp_path, data), watches, run_command=inactive, clock=lambda: NOW)

    check = by_name(checks)["service"]
    assert check.status is Status.OK
    assert check.detail == f"daemon running (PID {os.getpid()}), not as tvm-upload.service"


@pytest.mark.parametrize(
    ("age_seconds", "live"),
    [(61.0, True), (-120.0, True), (5.0, False)],
    ids=["stale", "from the future", "dead process"],
)
def test_daemon_status_ignored_unless_fresh_and_alive(
    tmp_path: Path, watches: Path, age_seconds: float, live: bool
) -> None:
    data = with_value(config_data(tmp_path), "s3.endpoint_url", f"http://127.0.0.1:{free_port()}")
    pid = os.getpid() if live else exited_pid()
    write_daemon_status(Path(data["state_file"]), pid, NOW - age_seconds)

    checks = doctor(write_config(tmp_path, data), watches, run_command=inactive, clock=lambda: NOW)

    check = by_name(checks)["service"]
    assert check.status is Status.WARN
    assert check.detail == "tvm-upload.service is not active: inactive"


def test_cloudwatch_endpoint_reported(
    tmp_path: Path, seaweed: SeaweedServer, bucket: str, watches: Path
) -> None:
    data = good_data(tmp_path, seaweed.endpoint_url, bucket)
    data["monitoring"] = {"cloudwatch_enabled": True}

    check = by_name(doctor(write_config(tmp_path, data), watches))["cloudwatch"]

    assert check.status is Status.OK
    assert "https://monitoring.us-east-1.amazonaws.com" in check.detail


# Clock skew.


def test_clock_ahead_fails(
    tmp_path: Path, seaweed: SeaweedServer, bucket: str, watches: Path
) -> None:
    path = write_config(tmp_path, good_data(tmp_path, seaweed.endpoint_url, bucket))

    checks = doctor(path, watches, clock=lambda: time.time() + 1200)

    check = by_name(checks)["clock"]
    assert check.status is Status.FAIL
    assert "RequestTimeTooSkewed" in check.detail
    assert doctor_exit_code(checks) == ExitCode.FAILURE


@pytest.mark.parametrize(
    ("offset", "status"),
    [(0.0, Status.OK), (59.0, Status.OK), (-120.0, Status.WARN), (900.0, Status.FAIL)],
)
def test_clock_skew_thresholds(offset: float, status: Status) -> None:
    server_time = 1_800_000_000.0
    header = email.utils.formatdate(server_time, usegmt=True)

    check = check_clock_skew(header, server_time + offset)

    assert check.status is status
    assert f"{offset:+.0f} s" in check.detail


def test_clock_without_date_header_warns() -> None:
    assert check_clock_skew(None, 0.0).status is Status.WARN
    assert check_clock_skew("not a date", 0.0).status is Status.WARN


# Broken settings.


def test_missing_bucket_fails(tmp_path: Path, seaweed: SeaweedServer, watches: Path) -> None:
    data = good_data(tmp_path, seaweed.endpoint_url, "no-such-bucket-doctor")

    checks = doctor(write_config(tmp_path, data), watches)

    found = by_name(checks)
    assert found["bucket"].status is Status.FAIL
    assert found["bucket"].detail == "s3://no-such-bucket-doctor does not exist"
    assert found["clock"].status is Status.OK
    assert found["bucket write"].status is Status.SKIP
    assert found["bucket write"].detail == "not checked: the bucket check failed"
    assert doctor_exit_code(checks) == ExitCode.FAILURE


def test_closed_port_fails(tmp_path: Path, watches: Path) -> None:
    data = good_data(tmp_path, f"http://127.0.0.1:{free_port()}", "t01logs")

    checks = doctor(write_config(tmp_path, data), watches)

    found = by_name(checks)
    assert found["bucket"].status is Status.FAIL
    assert found["bucket"].detail.startswith("cannot reach http://127.0.0.1:")
    assert found["clock"].status is Status.SKIP
    assert found["clock"].detail == "not checked: S3 did not respond"
    assert found["bucket write"].status is Status.SKIP
    assert doctor_exit_code(checks) == ExitCode.FAILURE


def test_invalid_config_fails(tmp_path: Path, watches: Path) -> None:
    data = with_value(config_data(tmp_path), "s3.bucket", "Not_A_Bucket")

    checks = doctor(write_config(tmp_path, data), watches)

    assert [check.name for check in checks] == ["config", "service"]
    assert checks[0].status is Status.FAIL
    assert "s3.bucket" in checks[0].detail
    assert doctor_exit_code(checks) == ExitCode.CONFIG


def test_missing_config_file_fails(tmp_path: Path, watches: Path) -> None:
    checks = doctor(tmp_path / "absent.yaml", watches)

    assert checks[0].status is Status.FAIL
    assert doctor_exit_code(checks) == ExitCode.CONFIG


def test_no_credentials_fails(
    tmp_path: Path, seaweed: SeaweedServer, bucket: str, watches: Path, monkeypatch: Any
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    path = write_config(tmp_path, good_data(tmp_path, seaweed.endpoint_url, bucket))

    checks = doctor(path, watches)

    found = by_name(checks)
    assert found["credentials"].status is Status.FAIL
    assert found["credentials"].detail == "no credentials found"
    assert found["credentials"].hint is not None
    assert "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in found["credentials"].hint
    assert "s3.profile" in found["credentials"].hint
    assert [name for name in found if found[name].status is Status.SKIP] == [
        "bucket",
        "clock",
        "bucket write",
    ]
    assert found["bucket"].detail == "not checked: the credentials check failed"
    assert "SKIP  clock: not checked: the credentials check failed" in render_checks(checks)
    assert doctor_exit_code(checks) == ExitCode.FAILURE


def test_unknown_profile_fails(
    tmp_path: Path, seaweed: SeaweedServer, bucket: str, watches: Path
) -> None:
    data = good_data(tmp_path, seaweed.endpoint_url, bucket)
    data = with_profile(tmp_path, with_value(data, "s3.profile", "other"))
    data = with_value(data, "s3.profile", "missing")

    found = by_name(doctor(write_config(tmp_path, data), watches))

    assert found["credentials"].status is Status.FAIL
    assert "profile 'missing' not found" in found["credentials"].detail


# Output.


def test_secret_never_in_output(
    tmp_path: Path,
    seaweed: SeaweedServer,
    bucket: str,
    watches: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = with_profile(tmp_path, good_data(tmp_path, seaweed.endpoint_url, bucket))
    variants = [
        good,
        with_value(good, "s3.bucket", "no-such-bucket-doctor"),
        with_value(good, "s3.endpoint_url", f"http://127.0.0.1:{free_port()}"),
    ]

    outputs = []
    with caplog.at_level(logging.DEBUG):
        for data in variants:
            checks = doctor(write_config(tmp_path, data), watches)
            outputs += [render_checks(checks), render_checks_json(checks)]

    assert all(SECRET not in output for output in outputs)
    assert SECRET not in caplog.text
    assert all(ACCESS_KEY not in output for output in outputs)


def test_render_one_line_per_check() -> None:
    checks = [
        Check("config", Status.OK, "valid"),
        Check("bucket", Status.FAIL, "s3://x does not exist", "check s3.bucket"),
        Check("bucket write", Status.SKIP, "not checked: the bucket check failed"),
        Check("service", Status.WARN, "unknown"),
    ]

    text = render_checks(checks)

    assert text.splitlines() == [
        "OK    config: valid",
        "FAIL  bucket: s3://x does not exist (hint: check s3.bucket)",
        "SKIP  bucket write: not checked: the bucket check failed",
        "WARN  service: unknown",
    ]


def test_render_json() -> None:
    checks = [Check("config", Status.OK, "valid"), Check("service", Status.WARN, "unknown")]

    document = json.loads(render_checks_json(checks))

    assert document["ok"] is True
    assert document["checks"][1] == {
        "name": "service",
        "status": "WARN",
        "detail": "unknown",
        "hint": None,
    }


def test_service_unknown_without_systemctl(
    tmp_path: Path, watches: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tvm_upload.doctor.shutil.which", lambda name: None)
    path = write_config(tmp_path, with_value(config_data(tmp_path), "vehicle_id", "bad id"))

    checks = run_doctor(path, inotify_watches_path=watches)

    service = by_name(checks)["service"]
    assert service.status is Status.WARN
    assert service.detail == "unknown: systemctl not found"
