"""Fixtures of the hot-path micro-benchmarks (run with ``make microbench``)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tvm_upload.config import LogDirectory

OLD_MTIME_NS = 1_796_000_000_000_000_000


@pytest.fixture
def log_tree(tmp_path: Path) -> tuple[LogDirectory, list[Path]]:
    """A watched directory with 1,000 small log files in 10 folders, mtimes in the past."""
    root = tmp_path / "logs"
    paths = []
    for number in range(1000):
        path = root / f"node-{number % 10}" / f"file-{number:04d}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"[INFO] [1796000000.000000] [planner]: cycle done\n" * 20)
        os.utime(path, ns=(OLD_MTIME_NS, OLD_MTIME_NS))
        paths.append(path)
    return LogDirectory(path=root, source="bench"), paths
