"""Helpers for end-to-end tests of triggers, reload and upload-now against a real daemon."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import zoneinfo
from collections import Counter
from pathlib import Path
from typing import Any

from daemon_process import DaemonProcess, wait_for, write_config

ZONE = "Asia/Shanghai"
INTERVAL_5_MIN = {"mode": "interval", "interval_hours": 0, "interval_minutes": 5}
"""The shortest interval the configuration allows, so no scheduled run happens during a test."""

CLI_TIMEOUT_SECONDS = 60.0


def window_around_now(*, open_now: bool, zone: str = ZONE) -> dict[str, Any]:
    """Return an operational window that is open (or closed) for the next hour of the real clock.

    An open window runs from one hour ago to one hour ahead. A closed one runs
    from two to three hours ahead. Both are wall times in ``zone``.
    """
    now = dt.datetime.now(zoneinfo.ZoneInfo(zone))
    offsets = (-1, 1) if open_now else (2, 3)
    start, end = (now + dt.timedelta(hours=hours) for hours in offsets)
    return {"enabled": True, "start": start.strftime("%H:%M"), "end": end.strftime("%H:%M")}


def upload_settings(**changes: Any) -> dict[str, Any]:
    """Return the ``upload`` section the trigger tests share, with ``changes`` on top."""
    settings: dict[str, Any] = {
        "file_stable_seconds": 1,
        "max_concurrency": 4,
        "reconcile_interval_seconds": 30,
        "retry": {"initial_delay_seconds": 0.2, "max_delay_seconds": 2},
        "schedule": INTERVAL_5_MIN,
        "upload_on_start": False,
    }
    settings.update(changes)
    return settings


class TestDaemon(DaemonProcess):
    """A daemon child with helpers to rewrite its configuration and reload it."""

    __test__ = False

    def __init__(self, tmp_path: Path, endpoint_url: str, bucket: str, **config: Any) -> None:
        self.tmp_path = tmp_path
        self.endpoint_url = endpoint_url
        path = self.write(bucket, **config)
        super().__init__(path, tmp_path / "daemon.log")

    def write(self, bucket: str, *, directories: list[dict[str, Any]], **overrides: Any) -> Path:
        """Write the configuration file; the daemon reads it at start and on SIGHUP."""
        return write_config(self.tmp_path, self.endpoint_url, bucket, directories, **overrides)

    def start_and_wait(self) -> TestDaemon:
        """Start the child and wait until its startup scan is done and signals are handled."""
        self.start()
        wait_for(lambda: "Started:" in self.log or self.exited(), 30, "daemon started")
        assert not self.exited(), self.log
        return self

    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def reload(self, bucket: str, **config: Any) -> str:
        """Rewrite the configuration, send SIGHUP and return the log lines the reload wrote."""
        self.write(bucket, **config)
        return self.send_reload()

    def send_reload(self) -> str:
        """Send SIGHUP and return the log lines written until the reload's outcome."""
        before = len(self.log.splitlines())
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

        def reload_logged() -> bool:
            return any(_is_reload_outcome(line) for line in self.log.splitlines()[before:])

        wait_for(reload_logged, 15, "reload logged")
        return "\n".join(self.log.splitlines()[before:])

    def uploads_by_name(self) -> Counter[str]:
        """Count the 'Uploaded' log lines per file name."""
        names: Counter[str] = Counter()
        for line in self.uploaded_lines():
            path = line.split(" Uploaded ", 1)[1].split(" to ", 1)[0]
            names[Path(path).name] += 1
        return names

    def queued_count(self) -> int:
        return sum(" Queued " in line for line in self.log.splitlines())


def _is_reload_outcome(line: str) -> bool:
    return "Reloaded the configuration" in line or "Kept the running configuration" in line


def write_files(directory: Path, names: list[str], size: int = 1000) -> dict[str, bytes]:
    """Write each file with random content and return the contents by name."""
    directory.mkdir(parents=True, exist_ok=True)
    contents = {}
    for name in names:
        data = os.urandom(size)
        (directory / name).write_bytes(data)
        contents[name] = data
    return contents


def run_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``tvm-upload COMMAND --config CONFIG [ARGS]`` and capture its output."""
    command, *rest = args
    return subprocess.run(
        [sys.executable, "-m", "tvm_upload", command, "--config", str(config), *rest],
        capture_output=True,
        check=False,
        text=True,
        timeout=CLI_TIMEOUT_SECONDS,
        env={**os.environ, "COLUMNS": "120"},
    )


def status_json(config: Path) -> dict[str, Any]:
    result = run_cli(config, "status", "--json")
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report
