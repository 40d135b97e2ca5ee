"""Fast checks of the benchmark's own helpers: measurement, delivery check, datasets, report.

Run with ``.venv/bin/python -m pytest bench/tests -q``; the default test run
(``tests/``) does not collect them.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest
from bucket_check import compare_listing, identity_key
from daemon_runner import LogFollower, daemon_key_to_path
from dataset_builder import (
    DatasetSpec,
    build_dataset,
    generate_log_lines,
    plan_files,
)
from measure import run_child
from report import TRANSFER_METRICS, metric_cell, one_line, ratio_text
from results import RunRecord, summarize

EXPECTED = (("a/one.log", 10), ("a/two.log", 20), ("b/three.log", 30))
ENV = {"PATH": "/usr/bin:/bin"}


def test_delivery_complete() -> None:
    found = {"a/one.log": 10, "a/two.log": 20, "b/three.log": 30}

    delivery = compare_listing(found, EXPECTED, identity_key)

    assert delivery.complete
    assert delivery.found_objects == 3


def test_delivery_missing_and_wrong_size() -> None:
    found = {"a/one.log": 10, "a/two.log": 19}

    delivery = compare_listing(found, EXPECTED, identity_key)

    assert not delivery.complete
    assert delivery.missing == 1
    assert delivery.wrong_size == 1
    assert delivery.unexpected == 0


def test_delivery_counts_duplicate_keys() -> None:
    found = {
        "v/2026-12-03/bench/a/one.log": 10,
        "v/2026-12-04/bench/a/one.log": 10,
        "v/2026-12-04/bench/a/two.log": 20,
        "v/2026-12-04/bench/b/three.log": 30,
    }

    delivery = compare_listing(found, EXPECTED, daemon_key_to_path)

    assert delivery.unexpected == 1
    assert not delivery.complete


def test_daemon_key_to_path_keeps_subfolders() -> None:
    assert daemon_key_to_path("vehicle/2026-12-04/bench/node-001/x.log") == "node-001/x.log"


def test_run_child_measures_own_rss(tmp_path: Path) -> None:
    """The child's peak RSS is its own, not this test process's (which is far larger)."""
    ballast = bytearray(300 * 1024 * 1024)
    ballast[::4096] = b"\x01" * len(ballast[::4096])

    result = run_child(["/bin/true"], ENV, tmp_path / "true.log", timeout_seconds=10)

    assert result.exit_code == 0
    assert result.max_rss_bytes < 50 * 1024 * 1024
    assert not result.timed_out


def test_run_child_counts_cpu_and_exit_code(tmp_path: Path) -> None:
    busy = "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; exit 3"

    result = run_child(["/bin/sh", "-c", busy], ENV, tmp_path / "busy.log", timeout_seconds=30)

    assert result.exit_code == 3
    assert result.cpu_seconds > 0.05


def test_run_child_kills_at_deadline(tmp_path: Path) -> None:
    result = run_child(["/bin/sleep", "30"], ENV, tmp_path / "sleep.log", timeout_seconds=0.3)

    assert result.timed_out
    assert result.wall_seconds < 5


def test_log_follower_finds_line_written_later(tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    log.write_text("starting\nStartup scan fo")
    follower = LogFollower(log)
    follower.read_new_lines()
    with log.open("a") as handle:
        handle.write("und 12 files not yet uploaded\nStarted: vehicle v\n")
    deadline = time.monotonic() + 2

    scan = follower.wait_for(re.compile(r"Startup scan found (\d+)"), os.getpid(), deadline)
    started = follower.wait_for(re.compile(r"Started: "), os.getpid(), deadline)

    assert scan is not None
    assert scan.group(1) == "12"
    assert started is not None


def test_plan_files_is_deterministic() -> None:
    spec = DatasetSpec("T", "test", 100, 7, 100, 200, "log")

    first = plan_files(spec)

    assert first == plan_files(spec)
    assert len({path.split("/")[0] for path, _ in first}) == 7
    assert all(100 <= size <= 200 for _, size in first)


def test_build_dataset_exact_sizes_and_cache(tmp_path: Path) -> None:
    spec = DatasetSpec("T", "test", 20, 4, 1000, 5000, "log", depth=2)

    built = build_dataset(tmp_path, spec, sample_dir=None)
    cached = build_dataset(tmp_path, spec, sample_dir=None)

    for relative, size in built.files:
        assert (built.root / relative).stat().st_size == size
    assert cached.files == built.files
    assert built.content_source == "generated log lines"


def test_generated_lines_end_with_newline() -> None:
    lines = generate_log_lines(50)

    assert len(lines) == 50
    assert all(line.endswith(b"\n") for line in lines)


def record(tool: str, wall: float, ok: bool = True) -> RunRecord:
    return RunRecord(tool, "A", 1, ok, "" if ok else "failed", wall, wall / 2, 10 << 20, 1.0)


def test_summarize_skips_failed_runs() -> None:
    records = [record("s5cmd", 2.0), record("s5cmd", 4.0), record("s5cmd", 1.0, ok=False)]

    summary = summarize(records, "s5cmd", file_count=100, total_bytes=10**9)

    assert summary is not None
    assert summary.runs == 2
    assert summary.failed == 1
    assert summary.wall_median == pytest.approx(3.0)
    assert summary.megabytes_per_second == pytest.approx(1000 / 3.0)


def test_metric_cell_ratios_to_reference_and_best() -> None:
    records = [record("s5cmd", 2.0), record("rclone", 1.0), record("boto3", 4.0)]
    summaries = [summarize(records, tool, 100, 10**9) for tool in ("s5cmd", "rclone", "boto3")]
    wall = TRANSFER_METRICS[0]

    cell = metric_cell(wall, summaries[2], summaries)

    assert cell == "4.00 (2.00, 4.00)"


def test_ratio_text_without_reference() -> None:
    assert ratio_text(3.0, None) == "-"


def test_one_line_keeps_table_intact() -> None:
    assert one_line("exit 1:\n  Traceback\n  a | b\n") == "exit 1: / Traceback / a \\| b"
