"""Run the real ``tvm-upload`` daemon as a child process in tests."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from typing_extensions import Self

POLL_SECONDS = 0.1


def write_config(
    tmp_path: Path,
    endpoint_url: str,
    bucket: str,
    directories: list[dict[str, Any]],
    **overrides: Any,
) -> Path:
    """Write a config.yaml for a test daemon; ``overrides`` are merged at the top level."""
    config: dict[str, Any] = {
        "vehicle_id": "test-vehicle",
        "timezone": "Asia/Shanghai",
        "log_directories": [{**d, "path": str(d["path"])} for d in directories],
        "s3": {"bucket": bucket, "region": "cn-north-1", "endpoint_url": endpoint_url},
        "upload": {
            "file_stable_seconds": 1,
            "max_concurrency": 4,
            "reconcile_interval_seconds": 30,
            "retry": {"initial_delay_seconds": 0.2, "max_delay_seconds": 2},
        },
        "state_file": str(tmp_path / "state" / "state.db"),
        "deletion": {"after_upload": {"enabled": False}, "emergency": {"enabled": False}},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def wait_for(condition: Callable[[], bool], timeout: float, message: str) -> None:
    """Poll ``condition`` until it is true; fail with ``message`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(POLL_SECONDS)
    raise AssertionError(f"timed out after {timeout} s: {message}")


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def bucket_contents(s3: Any, bucket: str) -> dict[str, bytes]:
    """Return every object in the bucket with its bytes."""
    contents: dict[str, bytes] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        for item in page.get("Contents", []):
            contents[item["Key"]] = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
    return contents


def bucket_keys(s3: Any, bucket: str) -> set[str]:
    keys: set[str] = set()
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys.update(item["Key"] for item in page.get("Contents", []))
    return keys


class DaemonProcess:
    """One ``tvm-upload run`` child with its stderr captured to a file."""

    def __init__(self, config: Path, log_path: Path, extra_args: list[str] | None = None) -> None:
        self.config = config
        self.log_path = log_path
        self.extra_args = extra_args or []
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> DaemonProcess:
        env = dict(os.environ)
        env["PYTHONUNBUFFERED"] = "1"
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "tvm_upload",
                    "run",
                    "--config",
                    str(self.config),
                    "--log-level",
                    "DEBUG",
                    *self.extra_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
            )
        return self

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def uploaded_lines(self) -> list[str]:
        return [line for line in self.log.splitlines() if " Uploaded " in line]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        """Send ``sig`` and wait for the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def __enter__(self) -> Self:
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.kill()
