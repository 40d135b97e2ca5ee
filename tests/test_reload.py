"""Configuration reload (SIGHUP): the trigger across a reload, and a real daemon process."""

from __future__ import annotations

import datetime as dt
import os
import time
import zoneinfo
from pathlib import Path
from typing import Any

import pytest
from daemon_process import bucket_keys, wait_for
from trigger_support import TestDaemon, status_json, upload_settings, write_files

from tvm_upload.clock import SYSTEM_CLOCK
from tvm_upload.config import Config, parse_config
from tvm_upload.files import FileIdentity
from tvm_upload.intake import Intake
from tvm_upload.localserver import create_bucket
from tvm_upload.reload import changed_keys, rescope_files
from tvm_upload.schedule import build_trigger
from tvm_upload.state import StateStore

SHANGHAI = zoneinfo.ZoneInfo("Asia/Shanghai")
START = dt.datetime(2026, 12, 1, 10, 0, tzinfo=SHANGHAI)
MINUTE = 60.0


def make_config(**upload: Any) -> Config:
    data = {
        "vehicle_id": "vehicle-CN-001",
        "timezone": "Asia/Shanghai",
        "log_directories": [{"path": "/data/logs/ros", "source": "ros"}],
        "s3": {"bucket": "t01logs", "region": "cn-north-1"},
        "upload": upload,
    }
    return parse_config(data, environ={})


def test_window_change_keeps_interval_grid():
    interval = {"mode": "interval", "interval_hours": 0, "interval_minutes": 30}
    trigger = build_trigger(make_config(schedule=interval))
    assert trigger.next_run(1000.0, START) == START + dt.timedelta(minutes=30)

    window = {"enabled": True, "start": "20:00", "end": "07:00"}
    later = START + dt.timedelta(minutes=20)
    reloaded = build_trigger(
        make_config(schedule=interval, operational_hours=window), previous=trigger
    )

    assert reloaded.next_run(1000.0 + 20 * MINUTE, later) == START + dt.timedelta(minutes=30)
    assert reloaded.window_open(later) is False


def test_interval_change_starts_new_grid():
    trigger = build_trigger(make_config(schedule={"interval_hours": 0, "interval_minutes": 30}))
    trigger.next_run(1000.0, START)

    later = START + dt.timedelta(minutes=20)
    reloaded = build_trigger(
        make_config(schedule={"interval_hours": 1, "interval_minutes": 0}), previous=trigger
    )

    assert reloaded.next_run(1000.0 + 20 * MINUTE, later) == later + dt.timedelta(hours=1)


def test_daily_time_change_moves_run():
    trigger = build_trigger(make_config(schedule={"mode": "daily", "daily_time": "15:00"}))
    trigger.next_run(1000.0, START)

    reloaded = build_trigger(
        make_config(schedule={"mode": "daily", "daily_time": "11:00"}), previous=trigger
    )

    assert reloaded.next_run(1001.0, START) == START.replace(hour=11)


def test_changed_keys_names_leaves():
    old = {"upload": {"max_concurrency": 1, "retry": {"initial_delay_seconds": 1}}, "a": 1}
    new = {"upload": {"max_concurrency": 2, "retry": {"initial_delay_seconds": 1}}, "a": 1}

    assert changed_keys(old, new) == ["upload.max_concurrency"]


def write_old_file(path: Path) -> Path:
    """Write a file modified an hour ago, so the stability tracker finds it ready at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(path.name)
    an_hour_ago = time.time() - 3600
    os.utime(path, (an_hour_ago, an_hour_ago))
    return path


def directories_config(tmp_path: Path, directories: list[dict[str, Any]]) -> Config:
    data = {
        "vehicle_id": "vehicle-CN-001",
        "timezone": "Asia/Shanghai",
        "log_directories": directories,
        "s3": {"bucket": "t01logs", "region": "cn-north-1"},
        "state_file": str(tmp_path / "state.db"),
    }
    return parse_config(data, environ={})


def test_rescope_drops_files_outside_directories(tmp_path):
    # Given queued, tracked and reported files in two directories
    kept, removed = tmp_path / "kept", tmp_path / "removed"
    before = directories_config(
        tmp_path, [{"path": str(kept), "source": "kept"}, {"path": str(removed), "source": "gone"}]
    )
    after = directories_config(tmp_path, [{"path": str(kept), "source": "renamed"}])
    kept_dir, removed_dir = before.log_directories
    store = StateStore(before.state_file)
    intake = Intake(before, store, SYSTEM_CLOCK)
    for directory in (kept_dir, removed_dir):
        queued = write_old_file(directory.path / "queued.log")
        store.enqueue(queued, directory.source, FileIdentity.of(queued), f"key/{queued}")
        intake.stability.observe(write_old_file(directory.path / "waiting.log"), directory)
        intake.on_event(write_old_file(directory.path / "reported.log"), directory)

    # When the reload keeps one directory under a new source name
    dropped = rescope_files(after, intake, store)
    intake.apply_config(after)
    ready = intake.step()

    # Then the other directory's files leave the queue and the tracker,
    # and the kept ones are queued under the new source
    assert dropped == [removed / "queued.log"]
    assert sorted(ready) == [kept / "reported.log", kept / "waiting.log"]
    assert store.pending_paths() == {
        kept / "queued.log",
        kept / "reported.log",
        kept / "waiting.log",
    }
    assert store.object_key_for(kept / "waiting.log").split("/")[2] == "renamed"
    assert store.object_key_for(kept / "reported.log").split("/")[2] == "renamed"
    store.close()


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    root = tmp_path / "logs"
    root.mkdir()
    return root


def reload_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "Reloaded the configuration" in line]


def error_lines_with(text: str, log: str) -> list[str]:
    """Return the ERROR lines that keep the running configuration and contain ``text``."""
    return [
        line
        for line in log.splitlines()
        if " ERROR " in line and "Kept the running configuration" in line and text in line
    ]


def test_reload_during_uploads_loses_nothing(tmp_path, seaweed, bucket, s3, logs):
    # Given many queued files and one upload at a time
    names = [f"bag-{number:02d}.log" for number in range(50)]
    write_files(logs, names, size=1024 * 1024)
    directories = [{"path": logs, "source": "logs"}]
    settings = upload_settings(upload_on_start=True, max_concurrency=1)
    daemon = TestDaemon(
        tmp_path, seaweed.endpoint_url, bucket, directories=directories, upload=settings
    )

    with daemon.start_and_wait():
        wait_for(lambda: len(daemon.uploaded_lines()) >= 2, 20, "uploads running")

        # When a valid reload arrives while they run
        reload_log = daemon.reload(
            bucket,
            directories=directories,
            upload=upload_settings(upload_on_start=True, max_concurrency=2, file_stable_seconds=2),
        )
        uploaded_at_reload = len(daemon.uploaded_lines())
        wait_for(lambda: len(daemon.uploaded_lines()) == len(names), 30, "every file uploaded")
        assert daemon.stop() == 0

    # Then every file reached S3 exactly once, and one line lists what changed
    assert uploaded_at_reload < len(names)
    assert len(bucket_keys(s3, bucket)) == len(names)
    assert daemon.uploads_by_name() == {name: 1 for name in names}
    assert " ERROR " not in daemon.log
    assert " Skipped " not in daemon.log
    lines = reload_lines(daemon.log)
    assert len(lines) == 1
    assert " INFO " in lines[0]
    assert "changed upload.file_stable_seconds, upload.max_concurrency" in lines[0]
    assert lines[0] in reload_log


def test_invalid_reload_keeps_running_configuration(tmp_path, seaweed, bucket, s3, logs):
    other_bucket = f"{bucket}-other"
    create_bucket(seaweed.endpoint_url, other_bucket)
    directories = [{"path": logs, "source": "logs"}]
    daemon = TestDaemon(
        tmp_path, seaweed.endpoint_url, bucket, directories=directories, upload=upload_settings()
    )
    bad_value = upload_settings(max_concurrency=0)
    bad_profile: dict[str, Any] = {
        "bucket": other_bucket,
        "region": "cn-north-1",
        "endpoint_url": seaweed.endpoint_url,
        "profile": "no-such-profile",
    }

    with daemon.start_and_wait():
        # When three invalid files are reloaded in turn
        value_log = daemon.reload(other_bucket, directories=directories, upload=bad_value)
        daemon.config.write_text("vehicle_id: [unclosed\n")
        yaml_log = daemon.send_reload()
        profile_log = daemon.reload(
            other_bucket, directories=directories, upload=upload_settings(), s3=bad_profile
        )

        # Then each is rejected with an ERROR line naming the problem
        assert error_lines_with("upload.max_concurrency: invalid value 0", value_log)
        assert error_lines_with("YAML syntax error at line 2", yaml_log)
        assert error_lines_with("s3.profile: profile 'no-such-profile' not found", profile_log)
        assert reload_lines(daemon.log) == []

        # And the daemon goes on uploading with the configuration it started with
        write_files(logs, ["after.log"])
        wait_for(lambda: len(bucket_keys(s3, bucket)) == 1, 15, "file uploaded")
        assert not daemon.exited()
        assert daemon.stop() == 0

    assert bucket_keys(s3, other_bucket) == set()


def test_reload_swaps_watched_directories(tmp_path, seaweed, bucket, s3):
    # Given a daemon on one directory, with a backlog file queued in it,
    # and a second directory that already contains a file
    removed = tmp_path / "removed"
    added = tmp_path / "added"
    write_files(removed, ["backlog.log"])
    write_files(added, ["existing.log"])
    settings = upload_settings(batch_upload={"enabled": False})
    daemon = TestDaemon(
        tmp_path,
        seaweed.endpoint_url,
        bucket,
        directories=[{"path": removed, "source": "removed"}],
        upload=settings,
    )

    with daemon.start_and_wait():
        write_files(removed, ["before.log"])
        wait_for(lambda: len(daemon.uploaded_lines()) == 1, 15, "first file uploaded")
        assert status_json(daemon.config)["pending"]["count"] == 1

        # When a reload swaps the directories
        reload_log = daemon.reload(
            bucket, directories=[{"path": added, "source": "added"}], upload=settings
        )
        write_files(removed, ["after-removal.log"])
        write_files(added, ["new.log"])

        # Then the added directory's files go up, old and new, and the removed one is left
        wait_for(lambda: len(daemon.uploaded_lines()) == 3, 15, "added files uploaded")
        time.sleep(1.5)
        assert daemon.stop() == 0

    assert "no longer watching" in reload_log
    assert "Removed 1 files from the queue" in daemon.log
    assert daemon.uploads_by_name() == {"before.log": 1, "existing.log": 1, "new.log": 1}
    assert {key.split("/", 2)[2] for key in bucket_keys(s3, bucket)} == {
        "removed/before.log",
        "added/existing.log",
        "added/new.log",
    }
    assert status_json(daemon.config)["pending"]["count"] == 0


def test_reload_changes_bucket(tmp_path, seaweed, bucket, s3, logs):
    new_bucket = f"{bucket}-new"
    create_bucket(seaweed.endpoint_url, new_bucket)
    directories = [{"path": logs, "source": "logs"}]
    daemon = TestDaemon(
        tmp_path, seaweed.endpoint_url, bucket, directories=directories, upload=upload_settings()
    )

    with daemon.start_and_wait():
        write_files(logs, ["first.log"])
        wait_for(lambda: len(daemon.uploaded_lines()) == 1, 15, "first file uploaded")

        reload_log = daemon.reload(new_bucket, directories=directories, upload=upload_settings())
        write_files(logs, ["second.log"])
        wait_for(lambda: len(daemon.uploaded_lines()) == 2, 15, "second file uploaded")
        assert daemon.stop() == 0

    assert "changed s3.bucket" in reload_log
    assert [key.rsplit("/", 1)[1] for key in bucket_keys(s3, bucket)] == ["first.log"]
    assert [key.rsplit("/", 1)[1] for key in bucket_keys(s3, new_bucket)] == ["second.log"]
