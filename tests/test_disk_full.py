"""A state store that cannot be written: the daemon pauses uploads, keeps running and resumes.

The end-to-end test puts the state store on a 1 MiB tmpfs and fills it; it needs
root to mount one and is skipped otherwise. The in-process tests inject
``StateStoreError`` into single store methods of a running ``Daemon``.
"""

from __future__ import annotations

import errno
import logging
import os
import sqlite3
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from daemon_process import bucket_contents, wait_for, write_config
from fault_support import FAST_RETRY, all_uploaded, log_lines, start_daemon, write_file
from faultproxy import FaultProxy

from tvm_upload.config import RetrySettings, load_config
from tvm_upload.daemon import Daemon
from tvm_upload.errors import StateStoreError, TvmUploadError
from tvm_upload.localserver import SeaweedServer
from tvm_upload.state import CorruptStateStoreError
from tvm_upload.storeoutage import StoreOutage

FULL = StateStoreError("Cannot queue a file: the filesystem holding the state store is full")


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    root = tmp_path / "logs"
    root.mkdir()
    return root


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs at ``tmp_path/state``, where the test daemon keeps its state store."""
    mount_point = tmp_path / "state"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def fill(directory: Path) -> Path:
    """Write a file into ``directory`` until its filesystem has no block left; return it."""
    filler = directory / "filler"
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for chunk_bytes in (256 * 1024, 4096, 1):
            chunk = b"\0" * chunk_bytes
            try:
                while True:
                    os.write(descriptor, chunk)
            except OSError as error:
                if error.errno != errno.ENOSPC:
                    raise
    finally:
        os.close(descriptor)
    return filler


def integrity(state_file: Path) -> str:
    with closing(sqlite3.connect(state_file)) as conn:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])


def test_full_disk_pauses_and_resumes(
    tmp_path: Path, seaweed: SeaweedServer, bucket: str, s3: Any, logs: Path, small_tmpfs: Path
) -> None:
    """Given the state store's filesystem full, files that become ready are not lost: the
    daemon keeps running with uploads paused, and uploads them once space returns."""
    state_file = small_tmpfs / "state.db"
    write_file(logs / "before.log", 10_000)
    with start_daemon(tmp_path, seaweed.endpoint_url, bucket, logs) as daemon:
        wait_for(lambda: all_uploaded(state_file, {"before.log"}), 20, "first upload")
        filler = fill(small_tmpfs)
        for name in ("a.log", "b.log"):
            write_file(logs / name, 20_000)

        wait_for(lambda: log_lines(daemon.log, "WARNING", "still cannot be written"), 20, "retry")
        assert daemon.process is not None
        assert daemon.process.poll() is None
        assert len(bucket_contents(s3, bucket)) == 1

        filler.unlink()
        wait_for(lambda: all_uploaded(state_file, {"a.log", "b.log"}), 20, "uploads resumed")
        wait_for(lambda: log_lines(daemon.log, "INFO", "accepts writes again"), 10, "outage end")
        assert daemon.stop() == 0

    errors = log_lines(daemon.log, "ERROR")
    assert len(errors) == 1, errors
    assert "Paused uploads, because the state store cannot be written" in errors[0]
    assert "is full" in errors[0]
    assert integrity(state_file) == "ok"
    assert len(bucket_contents(s3, bucket)) == 3


class InProcessDaemon:
    """A ``Daemon`` running in a thread of the test process, so its store can be patched."""

    def __init__(self, tmp_path: Path, endpoint_url: str, bucket: str, logs: Path) -> None:
        config_path = write_config(
            tmp_path,
            endpoint_url,
            bucket,
            [{"path": logs, "source": "logs"}],
            upload={"file_stable_seconds": 1, "retry": FAST_RETRY},
        )
        self.daemon = Daemon(load_config(config_path), config_path=config_path)
        self.thread = threading.Thread(target=self._run, name="test-daemon")
        self.state_file = tmp_path / "state" / "state.db"
        self.error: TvmUploadError | None = None

    def _run(self) -> None:
        try:
            self.daemon.run()
        except TvmUploadError as error:
            self.error = error

    def __enter__(self) -> Daemon:
        self.thread.start()
        wait_for(lambda: hasattr(self.daemon, "dispatcher"), 20, "daemon started")
        return self.daemon

    def __exit__(self, *exc_info: object) -> None:
        self.daemon.request_stop()
        self.thread.join(20)
        assert not self.thread.is_alive()


def fail_while(condition: Callable[[], bool], method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a store method so it raises ``FULL`` while ``condition()`` is true."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if condition():
            raise FULL
        return method(*args, **kwargs)

    return wrapper


@pytest.fixture
def proxy(seaweed: SeaweedServer) -> Iterator[FaultProxy]:
    with FaultProxy(seaweed.endpoint_url) as running:
        yield running


def test_failed_enqueue_keeps_file_for_later(
    tmp_path: Path,
    proxy: FaultProxy,
    bucket: str,
    logs: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    full = threading.Event()
    full.set()
    running = InProcessDaemon(tmp_path, proxy.endpoint_url, bucket, logs)

    with running as daemon:
        store = daemon.store
        monkeypatch.setattr(store, "enqueue_many", fail_while(full.is_set, store.enqueue_many))
        write_file(logs / "a.log", 5000)
        wait_for(lambda: "still cannot be written" in caplog.text, 20, "retries")
        assert running.thread.is_alive()
        assert proxy.method_counts["PUT"] == 0

        full.clear()
        wait_for(lambda: all_uploaded(running.state_file, {"a.log"}), 20, "upload resumed")

    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "is full" in errors[0].getMessage()
    assert proxy.method_counts["PUT"] == 1


def test_lost_outcome_is_queued_again(
    tmp_path: Path,
    proxy: FaultProxy,
    bucket: str,
    logs: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Given an upload whose success could not be recorded, the row is queued again once the
    store recovers, and the next upload finds the object without sending it again."""
    caplog.set_level(logging.INFO)
    failures = iter([True])
    running = InProcessDaemon(tmp_path, proxy.endpoint_url, bucket, logs)

    with running as daemon:
        store = daemon.store
        failing = fail_while(lambda: next(failures, False), store.mark_uploaded_many)
        monkeypatch.setattr(store, "mark_uploaded_many", failing)
        write_file(logs / "a.log", 5000)
        wait_for(lambda: all_uploaded(running.state_file, {"a.log"}), 20, "upload recorded")

    assert "Queued 1 files again whose upload outcome was lost" in caplog.text
    assert "already has this content" in caplog.text
    assert proxy.method_counts["PUT"] == 1


def test_damaged_store_at_runtime_ends_run(
    tmp_path: Path, proxy: FaultProxy, bucket: str, logs: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store damaged while the daemon runs ends the run with its error, so the restart
    moves it aside, instead of a loop that retries a write that cannot succeed."""
    damaged = CorruptStateStoreError("Cannot claim queued files: the state store is damaged")
    running = InProcessDaemon(tmp_path, proxy.endpoint_url, bucket, logs)

    with running as daemon:
        store = daemon.store
        monkeypatch.setattr(store, "claim", fail_with(damaged))
        daemon.request_upload_now()
        running.thread.join(20)

    assert running.error is damaged


def fail_with(error: Exception) -> Callable[..., Any]:
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        raise error

    return wrapper


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def monotonic(self) -> float:
        return self.now


def test_outage_backoff_and_end(caplog: pytest.LogCaptureFixture) -> None:
    """A step that goes through right after a failure does not end the outage: it ends
    only when no failure came for one more retry delay."""
    caplog.set_level(logging.INFO)
    clock = FakeClock()
    outage = StoreOutage(clock)  # type: ignore[arg-type]
    retry = RetrySettings(initial_delay_seconds=1, max_delay_seconds=600)

    delays = [outage.failed(FULL, retry) for _ in range(8)]
    clock.now += 64
    waiting_after_delay = outage.waiting()
    outage.succeeded()
    failures_after_first_success = outage.failures
    clock.now += 60
    outage.succeeded()

    assert delays == [1, 2, 4, 8, 16, 32, 60, 60]
    assert outage.requeue_stuck is True
    assert waiting_after_delay is False
    assert failures_after_first_success == 8
    assert outage.failures == 0
    assert [record.levelname for record in caplog.records] == ["ERROR"] + ["WARNING"] * 7 + ["INFO"]
