"""Intake on real files: a large backlog is queued over several loop steps."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tvm_upload.clock import SYSTEM_CLOCK
from tvm_upload.config import Config, parse_config
from tvm_upload.intake import MAX_QUEUED_PER_STEP, Intake
from tvm_upload.reload import rescope_files
from tvm_upload.state import FileState, StateStore

HOUR = 3600


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    with StateStore(tmp_path / "state.db") as opened:
        yield opened


def old_files(root: Path, count: int) -> list[Path]:
    """Write ``count`` log files last modified an hour ago, so each is ready at once."""
    root.mkdir()
    an_hour_ago = time.time() - HOUR
    paths = []
    for number in range(count):
        path = root / f"file-{number:04d}.log"
        path.write_text(f"line {number}\n")
        os.utime(path, (an_hour_ago, an_hour_ago))
        paths.append(path)
    return paths


def intake_config(tmp_path: Path, directories: list[dict[str, object]]) -> Config:
    data = {
        "vehicle_id": "vehicle-1",
        "log_directories": directories,
        "s3": {"bucket": "bucket", "region": "us-east-1"},
        "state_file": str(tmp_path / "state.db"),
    }
    return parse_config(data, environ={"HOME": str(tmp_path)})


def test_reload_drops_ready_files_of_removed_directory(tmp_path: Path, store: StateStore) -> None:
    """Given more ready files than one step queues, when a reload removes their directory,
    then the files not queued yet are not queued after it either."""
    logs, other = tmp_path / "logs", tmp_path / "other"
    other.mkdir()
    old_files(logs, MAX_QUEUED_PER_STEP + 100)
    after = intake_config(tmp_path, [{"path": str(other), "source": "other"}])
    intake = Intake(
        intake_config(tmp_path, [{"path": str(logs), "source": "logs"}]), store, SYSTEM_CLOCK
    )
    intake.scan(None)
    intake.step()

    intake.apply_config(after)
    dropped = rescope_files(after, intake, store)

    assert len(dropped) == MAX_QUEUED_PER_STEP
    assert intake.step() == []
    assert not intake.has_unqueued


def test_reload_gives_ready_files_new_source(tmp_path: Path, store: StateStore) -> None:
    """Given more ready files than one step queues, when a reload renames their source,
    then the files queued after it get object keys with the new source."""
    logs = tmp_path / "logs"
    old_files(logs, MAX_QUEUED_PER_STEP + 10)
    after = intake_config(tmp_path, [{"path": str(logs), "source": "renamed"}])
    intake = Intake(
        intake_config(tmp_path, [{"path": str(logs), "source": "old"}]), store, SYSTEM_CLOCK
    )
    intake.scan(None)
    intake.step()

    intake.apply_config(after)
    rescope_files(after, intake, store)
    queued = intake.step()

    assert len(queued) == 10
    keys = [store.object_key_for(path) or "" for path in queued]
    assert all("/renamed/" in key for key in keys), keys


def test_backlog_is_queued_in_bounded_steps(tmp_path: Path, store: StateStore) -> None:
    """Given more ready files than one step queues, each step queues at most
    ``MAX_QUEUED_PER_STEP`` of them and ``has_unqueued`` is True while more are ready, until every file is queued
    exactly once."""
    count = 2 * MAX_QUEUED_PER_STEP + 7
    paths = old_files(tmp_path / "logs", count)
    data = {
        "vehicle_id": "vehicle-1",
        "log_directories": [{"path": str(tmp_path / "logs"), "source": "logs"}],
        "s3": {"bucket": "bucket", "region": "us-east-1"},
        "state_file": str(tmp_path / "state.db"),
    }
    intake = Intake(parse_config(data, environ={"HOME": str(tmp_path)}), store, SYSTEM_CLOCK)
    assert intake.scan(None) == count

    steps = []
    while True:
        queued = intake.step()
        steps.append(len(queued))
        if not intake.has_unqueued:
            break

    assert steps == [MAX_QUEUED_PER_STEP, MAX_QUEUED_PER_STEP, 7]
    pending = {record.path for record in store.files_in_state(FileState.PENDING)}
    assert pending == set(paths)
    assert intake.unqueued_paths() == []
