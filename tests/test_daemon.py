"""End-to-end: the real daemon process, real inotify, real SeaweedFS."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from daemon_process import (
    DaemonProcess,
    bucket_contents,
    bucket_keys,
    sha256_of,
    wait_for,
    write_config,
)

from tvm_upload.keys import unescape_key


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    root = tmp_path / "logs"
    root.mkdir()
    return root


def start_daemon(tmp_path: Path, seaweed, bucket: str, directories, **overrides) -> DaemonProcess:
    config = write_config(tmp_path, seaweed.endpoint_url, bucket, directories, **overrides)
    return DaemonProcess(config, tmp_path / "daemon.log").start()


def key_for(relative: str, source: str = "logs") -> str:
    """Return the object key suffix after the date segment."""
    return f"{source}/{relative}"


def objects_by_suffix(s3, bucket: str) -> dict[str, bytes]:
    """Map 'source/relative path' (key without vehicle and date) to object bytes."""
    return {
        unescape_key(key.split("/", 2)[2]): body
        for key, body in bucket_contents(s3, bucket).items()
    }


def test_files_written_over_time_land_once(tmp_path, seaweed, bucket, s3, logs):
    files = {}
    with start_daemon(tmp_path, seaweed, bucket, [{"path": logs, "source": "logs"}]) as daemon:
        for number in range(6):
            path = logs / f"node_{number}.log"
            data = os.urandom(1000 + number * 3000)
            path.write_bytes(data)
            files[key_for(path.name)] = data
            time.sleep(0.3)

        wait_for(lambda: len(bucket_keys(s3, bucket)) == len(files), 30, "all files uploaded")
        assert daemon.stop() == 0

    objects = objects_by_suffix(s3, bucket)
    assert set(objects) == set(files)
    for name, data in files.items():
        assert sha256_of(objects[name]) == sha256_of(data), name
    assert len(daemon.uploaded_lines()) == len(files)


def test_object_key_layout(tmp_path, seaweed, bucket, s3, logs):
    path = logs / "launch.log"
    path.write_text("hello\n")
    os.utime(path, (1764806400, 1764806400))  # 2025-12-04 00:00 UTC = 08:00 in Shanghai

    overrides = {"upload": {"scan_existing_files": {"enabled": True, "max_age_days": 0}}}
    with start_daemon(tmp_path, seaweed, bucket, [{"path": logs, "source": "logs"}], **overrides):
        wait_for(lambda: bucket_keys(s3, bucket), 30, "file uploaded")

    assert bucket_keys(s3, bucket) == {"test-vehicle/2025-12-04/logs/launch.log"}
    head = s3.head_object(Bucket=bucket, Key="test-vehicle/2025-12-04/logs/launch.log")
    assert head["Metadata"]["sha256"] == sha256_of(b"hello\n")
    assert head["Metadata"]["source"] == "logs"


def test_growing_file_waits_until_stable(tmp_path, seaweed, bucket, s3, logs):
    path = logs / "growing.log"
    stop_writing = threading.Event()

    def append() -> None:
        while not stop_writing.is_set():
            with path.open("a") as handle:
                handle.write("line\n")
            stop_writing.wait(0.2)

    writer = threading.Thread(target=append)
    overrides = {"upload": {"file_stable_seconds": 2}}
    with start_daemon(tmp_path, seaweed, bucket, [{"path": logs, "source": "logs"}], **overrides):
        writer.start()
        time.sleep(4)
        assert bucket_keys(s3, bucket) == set()

        stop_writing.set()
        writer.join()
        final = path.read_bytes()
        wait_for(lambda: bucket_keys(s3, bucket), 30, "stable file uploaded")

    assert list(objects_by_suffix(s3, bucket).values()) == [final]


def test_patterns_excludes_recursion_moves_and_new_dirs(tmp_path, seaweed, bucket, s3, logs):
    flat = tmp_path / "flat"
    flat.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    directories = [
        {"path": logs, "source": "logs", "pattern": ["*.log", "*.mcap"]},
        {"path": flat, "source": "flat", "recursive": False},
    ]
    with start_daemon(tmp_path, seaweed, bucket, directories) as daemon:
        (logs / "a.log").write_text("a")
        (logs / "b.txt").write_text("not matched")
        (logs / ".hidden.log").write_text("excluded")
        (logs / "c.log.tmp").write_text("excluded")
        (flat / "top.log").write_text("top")
        (flat / "sub").mkdir()
        (flat / "sub" / "deep.log").write_text("not recursive")
        (outside / "moved.log").write_text("moved in")
        os.rename(outside / "moved.log", logs / "moved.log")
        (logs / "later" / "nested").mkdir(parents=True)
        (logs / "later" / "nested" / "n.mcap").write_bytes(b"bag")
        (outside / "link-target.log").write_text("outside")
        os.symlink(outside / "link-target.log", logs / "link.log")

        expected = {"logs/a.log", "logs/moved.log", "logs/later/nested/n.mcap", "flat/top.log"}
        wait_for(
            lambda: len(bucket_keys(s3, bucket)) >= len(expected), 30, "matching files uploaded"
        )
        time.sleep(2)
        daemon.stop()

    assert set(objects_by_suffix(s3, bucket)) == expected


def test_directory_created_after_start(tmp_path, seaweed, bucket, s3):
    later = tmp_path / "not-yet"
    with start_daemon(tmp_path, seaweed, bucket, [{"path": later, "source": "later"}]):
        time.sleep(1)
        (later / "session").mkdir(parents=True)
        (later / "session" / "launch.log").write_text("appeared")
        wait_for(lambda: bucket_keys(s3, bucket), 30, "file in late directory uploaded")

    assert set(objects_by_suffix(s3, bucket)) == {"later/session/launch.log"}


ODD_NAMES = [
    "with space.log",
    "unicode-日志-é.log",
    "plus+sign.log",
    "per%cent.log",
    "new\nline.log",
    "tab\there.log",
]


def test_odd_names_round_trip(tmp_path, seaweed, bucket, s3, logs):
    nested = logs / "2026-12-04-09-00-00-123456-host-42"
    nested.mkdir()
    for name in ODD_NAMES:
        (nested / name).write_bytes(name.encode())

    with start_daemon(tmp_path, seaweed, bucket, [{"path": logs, "source": "ros"}]):
        wait_for(lambda: len(bucket_keys(s3, bucket)) == len(ODD_NAMES), 30, "odd names uploaded")

    objects = objects_by_suffix(s3, bucket)
    for name in ODD_NAMES:
        relative = f"ros/{nested.name}/{name}"
        assert objects[relative] == name.encode(), relative


def test_zero_byte_and_multipart_files(tmp_path, seaweed, bucket, s3, logs):
    big = os.urandom(11 * 1024 * 1024 + 123)
    (logs / "empty.log").write_bytes(b"")
    (logs / "big.mcap").write_bytes(big)

    overrides = {"upload": {"file_stable_seconds": 1, "multipart_threshold_mb": 5}}
    with start_daemon(tmp_path, seaweed, bucket, [{"path": logs, "source": "logs"}], **overrides):
        wait_for(lambda: len(bucket_keys(s3, bucket)) == 2, 60, "both files uploaded")

    objects = objects_by_suffix(s3, bucket)
    assert objects["logs/empty.log"] == b""
    assert sha256_of(objects["logs/big.mcap"]) == sha256_of(big)


def test_restart_uploads_files_from_downtime_once(tmp_path, seaweed, bucket, s3, logs):
    directories = [{"path": logs, "source": "logs"}]
    (logs / "first.log").write_text("first")
    with start_daemon(tmp_path, seaweed, bucket, directories) as daemon:
        wait_for(lambda: len(bucket_keys(s3, bucket)) == 1, 30, "first file uploaded")
        assert daemon.stop() == 0

    (logs / "while-stopped.log").write_text("arrived while stopped")
    with start_daemon(tmp_path, seaweed, bucket, directories) as daemon:
        wait_for(lambda: len(bucket_keys(s3, bucket)) == 2, 30, "second file uploaded")
        time.sleep(2)
        assert daemon.stop() == 0

    uploads = [line for line in daemon.uploaded_lines()]
    assert sum("first.log" in line for line in uploads) == 1
    assert sum("while-stopped.log" in line for line in uploads) == 1


def test_kill_during_uploads_loses_nothing(tmp_path, seaweed, bucket, s3, logs):
    directories = [{"path": logs, "source": "logs"}]
    overrides = {
        "upload": {"file_stable_seconds": 1, "multipart_threshold_mb": 5, "max_concurrency": 2}
    }
    files = {}
    for number in range(30):
        data = os.urandom(200_000 if number % 10 else 6 * 1024 * 1024)
        (logs / f"f{number:02d}.bin").write_bytes(data)
        files[f"logs/f{number:02d}.bin"] = data

    daemon = start_daemon(tmp_path, seaweed, bucket, directories, **overrides)
    wait_for(lambda: len(daemon.uploaded_lines()) >= 3, 60, "some uploads done")
    daemon.kill()

    with start_daemon(tmp_path, seaweed, bucket, directories, **overrides) as daemon:
        wait_for(lambda: len(bucket_keys(s3, bucket)) == len(files), 90, "every file uploaded")
        daemon.stop()

    objects = objects_by_suffix(s3, bucket)
    assert set(objects) == set(files)
    for name, data in files.items():
        assert sha256_of(objects[name]) == sha256_of(data), name


def test_sigterm_stops_within_ten_seconds(tmp_path, seaweed, bucket, logs):
    with start_daemon(tmp_path, seaweed, bucket, [{"path": logs, "source": "logs"}]) as daemon:
        wait_for(lambda: "Started" in daemon.log, 30, "daemon started")
        started = time.monotonic()
        assert daemon.stop(signal.SIGTERM, timeout=10) == 0
        assert time.monotonic() - started < 10
    assert "Stopped" in daemon.log


def test_status_reports_uploaded_files(tmp_path, seaweed, bucket, s3, logs):
    (logs / "one.log").write_text("12345")
    with start_daemon(tmp_path, seaweed, bucket, [{"path": logs, "source": "logs"}]) as daemon:
        wait_for(lambda: bucket_keys(s3, bucket), 30, "file uploaded")
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "tvm_upload",
                "status",
                "--config",
                str(daemon.config),
                "--json",
            ],
            capture_output=True,
            text=True,
            check=True,
        )

    report = json.loads(result.stdout)
    assert report["uploaded"]["count"] == 1
    assert report["uploaded"]["bytes"] == 5
    assert report["pending"]["count"] == 0
