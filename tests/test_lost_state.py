"""A state store lost between runs: the daemon rebuilds it without sending any file twice.

The first run uploads most files and leaves one queued; then the test deletes,
empties, truncates or overwrites the state store. The second run must rebuild the
queue from a scan, recognise every object already in the bucket by a HEAD of its
key, and send only the file that never reached it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_process import bucket_contents, wait_for
from fault_support import (
    MiB,
    all_uploaded,
    completed_writes,
    data_requests,
    log_lines,
    rows,
    start_daemon,
    write_file,
)
from faultproxy import FaultProxy

from tvm_upload.localserver import SeaweedServer

SECONDS_PER_DAY = 86400


@pytest.fixture
def proxy(seaweed: SeaweedServer) -> Iterator[FaultProxy]:
    with FaultProxy(seaweed.endpoint_url) as running:
        yield running


def delete(state_file: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        state_file.with_name(state_file.name + suffix).unlink(missing_ok=True)


def empty(state_file: Path) -> None:
    os.truncate(state_file, 0)


def truncate(state_file: Path) -> None:
    os.truncate(state_file, state_file.stat().st_size // 2)


def overwrite(state_file: Path) -> None:
    state_file.write_bytes(os.urandom(state_file.stat().st_size))


DAMAGE: dict[str, Callable[[Path], None]] = {
    "delete": delete,
    "empty": empty,
    "truncate": truncate,
    "overwrite": overwrite,
}


def first_run(tmp_path: Path, proxy: FaultProxy, bucket: str, logs: Path) -> dict[str, bytes]:
    """Upload every file but ``queued.log``, which the store rejects; return all files.

    ``old.log`` is ten days old, so the first run lifts the startup scan's age limit.
    """
    files = {f"f{n}.log": write_file(logs / f"f{n}.log", 40_000) for n in range(3)}
    files["big.bag"] = write_file(logs / "big.bag", 6 * MiB)
    files["old.log"] = write_file(logs / "old.log", 20_000)
    files["queued.log"] = write_file(logs / "queued.log", 30_000)
    ten_days_ago = time.time() - 10 * SECONDS_PER_DAY
    for name in ("old.log", "queued.log"):
        os.utime(logs / name, (ten_days_ago, ten_days_ago))

    def queued_put(method: str, path: str, headers: Any) -> bool:
        return method == "PUT" and path.endswith("/queued.log")

    proxy.respond_error(500, "InternalError", times=10_000, match=queued_put)
    upload = {"multipart_threshold_mb": 5, "scan_existing_files": {"max_age_days": 0}}
    state_file = tmp_path / "state" / "state.db"
    with start_daemon(tmp_path, proxy.endpoint_url, bucket, logs, upload=upload) as daemon:
        uploaded = set(files) - {"queued.log"}
        wait_for(lambda: all_uploaded(state_file, uploaded), 30, "first uploads")
        assert daemon.stop() == 0

    assert rows(state_file)["queued.log"]["state"] == "pending"
    proxy.clear_faults()
    return files


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_lost_state_rebuilds_without_resending(
    tmp_path: Path, proxy: FaultProxy, bucket: str, s3: Any, damage: str
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    files = first_run(tmp_path, proxy, bucket, logs)
    state_file = tmp_path / "state" / "state.db"
    wal = state_file.with_name("state.db-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    DAMAGE[damage](state_file)
    (tmp_path / "daemon.log").rename(tmp_path / "first-run.log")
    proxy.reset_counters()

    upload = {"multipart_threshold_mb": 5, "scan_existing_files": {"max_age_days": 3}}
    with start_daemon(tmp_path, proxy.endpoint_url, bucket, logs, upload=upload) as daemon:
        wait_for(lambda: "Started:" in daemon.log, 20, "daemon started")
        wait_for(lambda: all_uploaded(state_file, set(files)), 30, "rebuilt store")
        assert daemon.stop() == 0

    sent = data_requests(proxy)
    assert [path.rsplit("/", 1)[-1] for _, path, _ in sent] == ["queued.log"]
    assert sum(completed_writes(proxy, bucket).values()) == 1
    assert proxy.method_counts["HEAD"] >= len(files)
    assert len(log_lines(daemon.log, "INFO", "already has this content")) == len(files) - 1
    assert log_lines(daemon.log, "ERROR", "Rebuilding the state store")
    assert {row["attempts"] for row in rows(state_file).values()} == {0}
    contents = bucket_contents(s3, bucket)
    assert {key.rsplit("/", 1)[-1]: body for key, body in contents.items()} == files


@pytest.mark.parametrize("damage", ["truncate", "overwrite"])
def test_damaged_store_is_moved_aside(
    tmp_path: Path, proxy: FaultProxy, bucket: str, damage: str
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    write_file(logs / "a.log", 1000)
    state_file = tmp_path / "state" / "state.db"
    with start_daemon(tmp_path, proxy.endpoint_url, bucket, logs) as daemon:
        wait_for(lambda: all_uploaded(state_file, {"a.log"}), 20, "first upload")
        assert daemon.stop() == 0
    DAMAGE[damage](state_file)
    damaged = state_file.read_bytes()
    (tmp_path / "daemon.log").rename(tmp_path / "first-run.log")

    with start_daemon(tmp_path, proxy.endpoint_url, bucket, logs) as daemon:
        wait_for(lambda: "Started:" in daemon.log, 20, "daemon started")
        wait_for(lambda: all_uploaded(state_file, {"a.log"}), 20, "rebuilt store")
        assert daemon.stop() == 0

    moved = list(state_file.parent.glob("state.db.corrupt-*"))
    assert len(moved) == 1
    assert moved[0].read_bytes() == damaged
    assert log_lines(daemon.log, "ERROR", f"Moved it to {moved[0]}")
