"""End-to-end: ``tvm-upload upload-now`` against a real daemon process and SeaweedFS."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from daemon_process import bucket_keys, wait_for
from trigger_support import TestDaemon, run_cli, upload_settings, write_files

HOUR_SECONDS = 3600


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    root = tmp_path / "logs"
    root.mkdir()
    return root


def test_startup_backlog_waits_for_upload_now(tmp_path, seaweed, bucket, s3, logs):
    # Given log files from before the start, some old and some just written,
    # and a daemon with upload_on_start off, no window and a 5-minute interval
    old = write_files(logs, [f"old-{number}.log" for number in range(3)], size=200_000)
    for name in old:
        an_hour_ago = time.time() - HOUR_SECONDS
        os.utime(logs / name, (an_hour_ago, an_hour_ago))
    recent = write_files(logs, [f"recent-{number}.log" for number in range(3)], size=300_000)
    directories = [{"path": logs, "source": "logs"}]
    daemon = TestDaemon(
        tmp_path, seaweed.endpoint_url, bucket, directories=directories, upload=upload_settings()
    )

    with daemon.start_and_wait():
        # When the startup scan has queued every file
        wait_for(lambda: daemon.queued_count() == 6, 15, "startup backlog queued")
        time.sleep(1.5)

        # Then nothing is uploaded before upload-now
        assert bucket_keys(s3, bucket) == set()
        assert daemon.uploaded_lines() == []

        result = run_cli(daemon.config, "upload-now", "--wait", "--timeout", "30")
        assert daemon.stop() == 0

    assert result.returncode == 0, result.stderr
    assert "Queue drained: 6 files" in result.stderr
    assert "0 files, 0.0 MB left, 0 failed" in result.stdout
    assert len(bucket_keys(s3, bucket)) == 6
    assert daemon.uploads_by_name() == {name: 1 for name in [*old, *recent]}


def test_upload_now_without_wait_returns_at_once(tmp_path, seaweed, bucket, s3, logs):
    directories = [{"path": logs, "source": "logs"}]
    daemon = TestDaemon(
        tmp_path, seaweed.endpoint_url, bucket, directories=directories, upload=upload_settings()
    )
    write_files(logs, ["a.log", "b.log"])

    with daemon.start_and_wait():
        wait_for(lambda: daemon.queued_count() == 2, 15, "files queued")
        result = run_cli(daemon.config, "upload-now")
        wait_for(lambda: len(bucket_keys(s3, bucket)) == 2, 15, "files uploaded")

    assert result.returncode == 0, result.stderr
    assert "Upload requested" in result.stderr


def test_upload_now_without_daemon_exits_69(tmp_path, seaweed, bucket, logs):
    daemon = TestDaemon(
        tmp_path, seaweed.endpoint_url, bucket, directories=[{"path": logs, "source": "logs"}]
    )

    result = run_cli(daemon.config, "upload-now", "--wait")

    assert result.returncode == 69
    assert "no tvm-upload daemon is listening" in result.stderr
    assert "control.sock" in result.stderr
    assert "Traceback" not in result.stderr


def test_upload_now_after_daemon_was_killed_exits_69(tmp_path, seaweed, bucket, logs):
    daemon = TestDaemon(
        tmp_path, seaweed.endpoint_url, bucket, directories=[{"path": logs, "source": "logs"}]
    )
    daemon.start_and_wait().kill()

    result = run_cli(daemon.config, "upload-now")

    assert result.returncode == 69
    assert "no tvm-upload daemon is listening" in result.stderr
    assert "Traceback" not in result.stderr
