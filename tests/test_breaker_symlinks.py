"""Adversarial tests: symlinks must never lead reads, uploads or deletions out of a watched tree."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from breaker_support import Daemon, FakeClock, make_config
from daemon_process import bucket_contents, wait_for
from upload_support import make_uploader

from tvm_upload.intake import Intake
from tvm_upload.state import StateStore
from tvm_upload.uploader import UploadRequest

SECRET = b"private data outside every log directory\n"


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    root = tmp_path / "logs"
    root.mkdir()
    return root


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    directory = tmp_path / "outside"
    directory.mkdir()
    (directory / "a.log").write_bytes(SECRET)
    (directory / "secret.log").write_bytes(SECRET)
    return directory


def upload_every_queued_file(store: StateStore, endpoint_url: str, bucket: str, clock) -> None:
    """Upload every due queue row with the real uploader, as the dispatcher would."""
    uploader = make_uploader(endpoint_url, bucket)
    try:
        for record in store.claim(clock.time(), 100):
            request = UploadRequest(
                path=record.path,
                object_key=record.object_key,
                identity=record.identity,
                source=record.source,
                vehicle_id="test-vehicle",
            )
            uploader.upload(request)
    finally:
        uploader.close()


def test_parent_swapped_for_symlink_not_followed(
    tmp_path: Path, logs: Path, outside: Path, seaweed, bucket: str, s3
) -> None:
    # Given a log file that the stability check is tracking
    (logs / "sub").mkdir()
    (logs / "sub" / "a.log").write_bytes(b"inside\n")
    config = make_config(tmp_path, [{"path": logs, "source": "logs"}])
    clock = FakeClock()
    config.state_file.parent.mkdir()
    with StateStore(config.state_file, clock.time) as store:
        intake = Intake(config, store, clock)
        assert intake.scan(None) == 1

        # When its directory is renamed and a symlink to another directory takes its name
        os.rename(logs / "sub", logs / "sub.real")
        os.symlink(outside, logs / "sub")
        for _ in range(3):
            intake.step()
            clock.advance(2)
        upload_every_queued_file(store, seaweed.endpoint_url, bucket, clock)

    # Then no byte of the other directory reaches the bucket
    assert SECRET not in bucket_contents(s3, bucket).values()


def test_legacy_queue_entry_through_symlink_not_uploaded(
    tmp_path: Path, logs: Path, outside: Path, seaweed, bucket: str, s3
) -> None:
    # Given a symlink inside the watched tree, like ROS's ``latest`` link, and an old
    # queue file that lists a path through it, as the older uploader (which followed
    # symlinks) wrote
    (logs / "latest").symlink_to(outside)
    (logs / "run.log").write_bytes(b"inside\n")
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    queue_entries = [
        {"filepath": str(logs / "latest" / "secret.log"), "size": len(SECRET), "attempts": 0},
        {"filepath": str(logs / "run.log"), "size": 7, "attempts": 0},
    ]
    (legacy / "queue.json").write_text(json.dumps(queue_entries))
    upload = {
        "file_stable_seconds": 1,
        "queue_file": str(legacy / "queue.json"),
        "processed_files_registry": {"registry_file": str(legacy / "registry.json")},
    }

    # When the daemon starts, imports the queue and drains it
    daemon = Daemon(
        tmp_path, seaweed.endpoint_url, bucket, [{"path": logs, "source": "logs"}], upload=upload
    )
    with daemon.start_and_wait():
        wait_for(lambda: daemon.uploaded_lines(), 20, "run.log uploaded")
        wait_for(lambda: daemon.summary().queue_count == 0, 20, "queue drained")

    # Then the file reached only through the symlink is neither uploaded nor queued
    contents = bucket_contents(s3, bucket)
    assert b"inside\n" in contents.values()
    assert SECRET not in contents.values()


def test_symlinks_in_tree_are_never_followed(
    tmp_path: Path, logs: Path, outside: Path, seaweed, bucket: str, s3
) -> None:
    # Given symlinks to a file and to a directory outside, present at start,
    # and a second source whose configured root is itself a symlink
    (logs / "link.log").symlink_to(outside / "secret.log")
    (logs / "linkdir").symlink_to(outside)
    (logs / "real.log").write_bytes(b"real\n")
    real_root = tmp_path / "real-root"
    (real_root / "run").mkdir(parents=True)
    (real_root / "run" / "node.log").write_bytes(b"node\n")
    (tmp_path / "root-link").symlink_to(real_root)
    directories = [
        {"path": logs, "source": "logs"},
        {"path": tmp_path / "root-link", "source": "linked"},
    ]

    daemon = Daemon(tmp_path, seaweed.endpoint_url, bucket, directories)
    with daemon.start_and_wait():
        # When more symlinks appear while the daemon runs, then real files beside them
        (logs / "late.log").symlink_to(outside / "a.log")
        (logs / "latedir").symlink_to(outside)
        (logs / "sub").mkdir()
        (logs / "sub" / "inner").symlink_to(outside, target_is_directory=True)
        (logs / "sub" / "after.log").write_bytes(b"after\n")
        wait_for(lambda: len(daemon.uploaded_lines()) >= 3, 20, "three real files uploaded")
        time.sleep(1.5)

    # Then only the real files are in the bucket, the symlinked root under its configured name
    suffixes = {key.split("/", 2)[2]: body for key, body in bucket_contents(s3, bucket).items()}
    assert suffixes == {
        "logs/real.log": b"real\n",
        "logs/sub/after.log": b"after\n",
        "linked/run/node.log": b"node\n",
    }
