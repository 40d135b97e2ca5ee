"""End-to-end: operational window, batch upload and status in a real daemon process.

Windows are computed from the real clock in the configured zone, an hour or
more away from their edges, so a test never runs across one.
"""

from __future__ import annotations

import datetime as dt
import time
import zoneinfo
from pathlib import Path

import pytest
import yaml
from daemon_process import bucket_keys, wait_for
from trigger_support import (
    ZONE,
    TestDaemon,
    run_cli,
    status_json,
    upload_settings,
    window_around_now,
    write_files,
)

from tvm_upload.config import Config, parse_config
from tvm_upload.schedule import DrainScope, build_trigger

ONE_SECOND = dt.timedelta(seconds=1)
SCHEDULING_DOC = Path(__file__).resolve().parents[1] / "docs" / "scheduling.md"


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    root = tmp_path / "logs"
    root.mkdir()
    return root


def uploaded_names(s3, bucket: str) -> set[str]:
    return {key.rsplit("/", 1)[1] for key in bucket_keys(s3, bucket)}


def test_closed_window_queues_until_upload_now(tmp_path, seaweed, bucket, s3, logs):
    # Given a daemon whose operational window is closed now, with batch upload on
    settings = upload_settings(operational_hours=window_around_now(open_now=False))
    directories = [{"path": logs, "source": "logs"}]
    daemon = TestDaemon(
        tmp_path, seaweed.endpoint_url, bucket, directories=directories, upload=settings
    )

    with daemon.start_and_wait():
        # When a new file becomes ready
        write_files(logs, ["late.log"], size=5000)
        wait_for(lambda: daemon.queued_count() == 1, 15, "file queued")
        time.sleep(1.5)

        # Then it waits in the queue, and status shows the closed window
        assert bucket_keys(s3, bucket) == set()
        report = status_json(daemon.config)
        assert report["pending"] == {"count": 1, "bytes": 5000}
        assert report["daemon"]["running"] is True
        assert report["daemon"]["schedule"]["window_open"] is False

        # And upload-now drains it
        result = run_cli(daemon.config, "upload-now", "--wait", "--timeout", "20")
        assert result.returncode == 0, result.stderr
        assert uploaded_names(s3, bucket) == {"late.log"}
        assert status_json(daemon.config)["pending"]["count"] == 0


def test_batch_scope_follows_reload(tmp_path, seaweed, bucket, s3, logs):
    # Given a file queued while the window was closed
    closed = window_around_now(open_now=False)
    directories = [{"path": logs, "source": "logs"}]
    daemon = TestDaemon(
        tmp_path,
        seaweed.endpoint_url,
        bucket,
        directories=directories,
        upload=upload_settings(operational_hours=closed, batch_upload={"enabled": False}),
    )
    with daemon.start_and_wait():
        write_files(logs, ["queued-first.log"])
        wait_for(lambda: daemon.queued_count() == 1, 15, "first file queued")
        next_run_before = status_json(daemon.config)["daemon"]["schedule"]["next_run"]

        # When a reload opens the window with batch upload off
        time.sleep(2)
        daemon.reload(
            bucket,
            directories=directories,
            upload=upload_settings(
                operational_hours=window_around_now(open_now=True),
                batch_upload={"enabled": False},
            ),
        )
        write_files(logs, ["ready-alone.log"])

        # Then only the file that became ready is uploaded
        wait_for(lambda: uploaded_names(s3, bucket) == {"ready-alone.log"}, 15, "file uploaded")
        time.sleep(1.5)
        assert uploaded_names(s3, bucket) == {"ready-alone.log"}
        report = status_json(daemon.config)
        assert report["pending"]["count"] == 1
        assert report["daemon"]["schedule"]["window_open"] is True
        # A window change keeps the interval grid, so the next run did not move 2 s later
        next_run = dt.datetime.fromisoformat(report["daemon"]["schedule"]["next_run"])
        assert abs(next_run - dt.datetime.fromisoformat(next_run_before)) <= ONE_SECOND

        # When batch upload is switched on, the next ready file takes the queue along
        daemon.reload(
            bucket,
            directories=directories,
            upload=upload_settings(operational_hours=window_around_now(open_now=True)),
        )
        write_files(logs, ["takes-queue.log"])
        wait_for(lambda: len(daemon.uploaded_lines()) == 3, 15, "queue drained")
        assert daemon.stop() == 0

    assert daemon.uploads_by_name() == {
        "queued-first.log": 1,
        "ready-alone.log": 1,
        "takes-queue.log": 1,
    }


def test_status_shows_next_run_and_window(tmp_path, seaweed, bucket, logs):
    # Given a daily run two hours from now and a window that is open now
    zone = zoneinfo.ZoneInfo(ZONE)
    run_at = (dt.datetime.now(zone) + dt.timedelta(hours=2)).replace(second=0, microsecond=0)
    window = window_around_now(open_now=True)
    settings = upload_settings(
        schedule={"mode": "daily", "daily_time": run_at.strftime("%H:%M")},
        operational_hours=window,
    )
    daemon = TestDaemon(
        tmp_path,
        seaweed.endpoint_url,
        bucket,
        directories=[{"path": logs, "source": "logs"}],
        upload=settings,
    )

    with daemon.start_and_wait():
        wait_for(lambda: (tmp_path / "state" / "daemon-status.json").exists(), 10, "status")
        report = status_json(daemon.config)
        text = run_cli(daemon.config, "status")

    schedule = report["daemon"]["schedule"]
    assert report["daemon"]["running"] is True
    assert schedule["mode"] == "daily"
    assert dt.datetime.fromisoformat(schedule["next_run"]) == run_at
    assert schedule["window_open"] is True
    assert schedule["window"] == f"{window['start']}-{window['end']}"
    assert text.returncode == 0, text.stderr
    assert f"Schedule: daily, next run {run_at.isoformat()}" in text.stdout
    assert f"Operational window: {window['start']}-{window['end']}, open now" in text.stdout


def test_status_after_daemon_stopped(tmp_path, seaweed, bucket, logs):
    daemon = TestDaemon(
        tmp_path,
        seaweed.endpoint_url,
        bucket,
        directories=[{"path": logs, "source": "logs"}],
        upload=upload_settings(),
    )
    with daemon.start_and_wait():
        wait_for(lambda: (tmp_path / "state" / "daemon-status.json").exists(), 10, "status")
        assert daemon.stop() == 0

    report = status_json(daemon.config)
    text = run_cli(daemon.config, "status")

    assert report["daemon"]["running"] is False
    assert "Daemon: not running" in text.stdout


def documented_setups() -> dict[str, Config]:
    """Parse each config snippet under "Three typical setups" in docs/scheduling.md, by title."""
    text = SCHEDULING_DOC.read_text()
    section = text.split("## Three typical setups", 1)[1].split("\n## ", 1)[0]
    setups = {}
    for part in section.split("\n### ")[1:]:
        title = part.splitlines()[0]
        snippet = part.split("```yaml\n", 1)[1].split("```", 1)[0]
        data = yaml.safe_load(snippet)
        data["vehicle_id"] = "vehicle-CN-001"
        data["log_directories"] = [{"path": "/data/logs/ros", "source": "ros"}]
        data["s3"] = {"bucket": "t01logs", "region": "cn-north-1"}
        setups[title] = parse_config(data, environ={})
    return setups


def test_documented_setups_behave_as_described():
    setups = documented_setups()
    shanghai = zoneinfo.ZoneInfo("Asia/Shanghai")
    berlin = zoneinfo.ZoneInfo("Europe/Berlin")
    noon = dt.datetime(2026, 12, 1, 12, 0, tzinfo=shanghai)
    assert len(setups) == 3

    in_service = build_trigger(setups["In service: upload at once"])
    assert in_service.on_start() is True
    assert in_service.on_ready(noon) is DrainScope.QUEUE
    assert in_service.next_run(0.0, noon) == noon + dt.timedelta(hours=2)

    metered = build_trigger(setups["Interval batches on a metered link"])
    assert metered.on_ready(noon) is DrainScope.NONE
    assert metered.on_ready(noon.replace(hour=21)) is DrainScope.QUEUE
    assert metered.on_ready(noon.replace(hour=6, minute=59)) is DrainScope.QUEUE
    assert metered.next_run(0.0, noon) == noon + dt.timedelta(hours=4)

    depot = build_trigger(setups["Depot: once a day"])
    berlin_noon = dt.datetime(2026, 12, 1, 12, 0, tzinfo=berlin)
    assert depot.on_start() is False
    assert depot.on_ready(berlin_noon) is DrainScope.NONE
    assert depot.on_ready(berlin_noon.replace(hour=3)) is DrainScope.QUEUE
    assert depot.next_run(0.0, berlin_noon) == dt.datetime(2026, 12, 2, 2, 30, tzinfo=berlin)
