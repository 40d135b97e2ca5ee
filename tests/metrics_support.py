"""Helpers shared by the metrics, CloudWatch, Prometheus and doctor tests."""

from __future__ import annotations

import copy
import socket
from pathlib import Path
from typing import Any

from tvm_upload.clock import Clock
from tvm_upload.config import Config, parse_config
from tvm_upload.files import FileIdentity

START = 1_800_000_000.0
VEHICLE_ID = "vehicle-CN-001"


class FakeClock(Clock):
    """Wall-clock and monotonic time that move only when a test advances them."""

    def __init__(self, wall: float = START, monotonic: float = 1000.0) -> None:
        self.wall = wall
        self.mono = monotonic

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def config_data(tmp_path: Path) -> dict[str, Any]:
    """Return a valid configuration with two log directories under ``tmp_path``."""
    return {
        "vehicle_id": VEHICLE_ID,
        "log_directories": [
            {"path": str(tmp_path / "logs" / "ros"), "source": "ros"},
            {"path": str(tmp_path / "logs" / "bags"), "source": "bags"},
        ],
        "s3": {"bucket": "t01logs", "region": "cn-north-1"},
        "state_file": str(tmp_path / "state" / "state.db"),
    }


def with_value(data: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """Return a copy of ``data`` with ``value`` at a key path like ``monitoring.namespace``."""
    result = copy.deepcopy(data)
    node = result
    parts = dotted.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return result


def make_config(tmp_path: Path, **values: Any) -> Config:
    """Build a config; keyword names use ``__`` for dots (``monitoring__namespace``)."""
    data = config_data(tmp_path)
    for key, value in values.items():
        data = with_value(data, key.replace("__", "."), value)
    return parse_config(data, environ={"HOME": str(tmp_path)})


def identity(number: int, size: int = 100) -> FileIdentity:
    return FileIdentity(device=1, inode=number, size=size, mtime_ns=number * 1_000)


def free_port() -> int:
    """Return a loopback TCP port that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
