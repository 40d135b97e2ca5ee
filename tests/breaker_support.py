"""Helpers of the adversarial tests (``test_breaker_*``): daemons, clocks and CLI runs."""

from __future__ import annotations

import datetime as dt
import os
import socket
import subprocess
import sys
import time
import zoneinfo
from pathlib import Path
from typing import Any

from daemon_process import DaemonProcess, wait_for, write_config

from tvm_upload.config import Config, parse_config
from tvm_upload.state import StateStore, StatusSummary

ZONE = "Asia/Shanghai"
CLI_TIMEOUT_SECONDS = 60.0
SECRET_ACCESS_KEY = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYBREAKERKEY"
ACCESS_KEY_ID = "AKIAIOSFODNN7BREAKER"


class FakeClock:
    """A ``tvm_upload.clock.Clock`` whose wall clock and monotonic clock the test moves."""

    def __init__(self, wall: float | None = None) -> None:
        self.wall = time.time() if wall is None else wall
        self.mono = 1000.0

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def now(self, zone: dt.tzinfo) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.wall, zone)

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def make_config(tmp_path: Path, directories: list[dict[str, Any]], **overrides: Any) -> Config:
    """Return a validated configuration for in-process components, state under ``tmp_path``."""
    data: dict[str, Any] = {
        "vehicle_id": "test-vehicle",
        "timezone": ZONE,
        "log_directories": [{**d, "path": str(d["path"])} for d in directories],
        "s3": {"bucket": "unused-bucket", "region": "cn-north-1"},
        "state_file": str(tmp_path / "state" / "state.db"),
        "upload": {
            "file_stable_seconds": 1,
            "queue_file": str(tmp_path / "legacy" / "queue.json"),
            "processed_files_registry": {"registry_file": str(tmp_path / "legacy" / "reg.json")},
        },
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return parse_config(data, environ={"HOME": str(tmp_path)})


def window_closed_now() -> dict[str, Any]:
    """Return an operational window that stays closed for the next two hours."""
    now = dt.datetime.now(zoneinfo.ZoneInfo(ZONE))
    start, end = (now + dt.timedelta(hours=hours) for hours in (2, 3))
    return {"enabled": True, "start": start.strftime("%H:%M"), "end": end.strftime("%H:%M")}


def held_upload_settings(**changes: Any) -> dict[str, Any]:
    """Return ``upload`` settings that queue ready files but upload only on request."""
    settings: dict[str, Any] = {
        "file_stable_seconds": 1,
        "max_concurrency": 4,
        "reconcile_interval_seconds": 30,
        "retry": {"initial_delay_seconds": 0.2, "max_delay_seconds": 2},
        "schedule": {"mode": "interval", "interval_hours": 0, "interval_minutes": 5},
        "upload_on_start": False,
        "operational_hours": window_closed_now(),
    }
    settings.update(changes)
    return settings


class Daemon(DaemonProcess):
    """A daemon child with its state store path and a wait for its start."""

    __test__ = False

    def __init__(
        self,
        tmp_path: Path,
        endpoint_url: str,
        bucket: str,
        directories: list[dict[str, Any]],
        *,
        log_name: str = "daemon.log",
        **overrides: Any,
    ) -> None:
        config = write_config(tmp_path, endpoint_url, bucket, directories, **overrides)
        super().__init__(config, tmp_path / log_name)
        self.state_file = tmp_path / "state" / "state.db"

    def start_and_wait(self) -> Daemon:
        """Start the child and wait until its startup scan is done."""
        if self.process is None:
            self.start()
        wait_for(lambda: "Started:" in self.log or self.exited(), 30, "daemon started")
        assert not self.exited(), self.log
        return self

    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def summary(self) -> StatusSummary:
        with StateStore(self.state_file, read_only=True) as store:
            return store.summary(time.time())

    def queued_paths(self) -> set[str]:
        """Return the paths of the rows in state pending, uploading or failed."""
        with StateStore(self.state_file, read_only=True) as store:
            return {str(path) for path in store.pending_paths()}


def run_cli(
    config: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``tvm-upload COMMAND --config CONFIG [ARGS]`` and capture its output."""
    command, *rest = args
    return subprocess.run(
        [sys.executable, "-m", "tvm_upload", command, "--config", str(config), *rest],
        capture_output=True,
        check=False,
        text=True,
        timeout=CLI_TIMEOUT_SECONDS,
        env={**os.environ, "COLUMNS": "120", **(env or {})},
    )


def bind_socket_at(path: Path) -> socket.socket:
    """Create a listening Unix socket file at ``path``, even when the path is over 107 bytes."""
    short = Path(f"/tmp/tvm-breaker-{os.getpid()}-{time.monotonic_ns()}.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(short))
    os.rename(short, path)
    return server
