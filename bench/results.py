"""Benchmark results: one record per run, and the per-tool summary of a dataset's runs."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daemon_runner import ScanProbe
from dataset_builder import Dataset

MB = 1_000_000
GB = 1_000_000_000
MiB = 1024 * 1024


@dataclass
class RunRecord:
    """One tool uploading one dataset once.

    A run that did not deliver every file with its size has ``ok`` False and
    a ``note`` saying why. Its figures are kept for the log but never timed.
    ``server_cpu_seconds`` is the CPU the S3 server used during the run.
    For tvm-upload, ``startup_seconds`` and ``startup_cpu_seconds`` are the wall
    time and CPU from process start to the log line that ends start-up (None
    when the line was not seen), so that the upload itself can be measured apart.
    """

    tool: str
    dataset: str
    rep: int
    ok: bool
    note: str
    wall_seconds: float
    cpu_seconds: float
    max_rss_bytes: int
    server_cpu_seconds: float
    io: dict[str, int] = field(default_factory=dict)
    startup_seconds: float | None = None
    startup_cpu_seconds: float | None = None


@dataclass
class ToolSummary:
    """Figures of one tool on one dataset over its successful runs."""

    tool: str
    runs: int
    failed: int
    file_count: int
    total_bytes: int
    wall_median: float
    wall_min: float
    wall_max: float
    cpu_median: float
    max_rss_bytes: int
    server_cpu_median: float

    @property
    def megabytes_per_second(self) -> float:
        return self.total_bytes / MB / self.wall_median

    @property
    def files_per_second(self) -> float:
        return self.file_count / self.wall_median

    @property
    def cpu_seconds_per_gb(self) -> float:
        return self.cpu_median / (self.total_bytes / GB)

    @property
    def cpu_ms_per_file(self) -> float:
        return self.cpu_median * 1000 / self.file_count

    @property
    def max_rss_mib(self) -> float:
        return self.max_rss_bytes / MiB

    @property
    def server_cpu_seconds_per_gb(self) -> float:
        return self.server_cpu_median / (self.total_bytes / GB)


def summarize(
    records: list[RunRecord], tool: str, file_count: int, total_bytes: int
) -> ToolSummary | None:
    """Summarize ``tool``'s records of one dataset; None if no run succeeded."""
    good = [record for record in records if record.tool == tool and record.ok]
    failed = sum(1 for record in records if record.tool == tool and not record.ok)
    if not good:
        return None

    walls = [record.wall_seconds for record in good]
    return ToolSummary(
        tool=tool,
        runs=len(good),
        failed=failed,
        file_count=file_count,
        total_bytes=total_bytes,
        wall_median=statistics.median(walls),
        wall_min=min(walls),
        wall_max=max(walls),
        cpu_median=statistics.median(record.cpu_seconds for record in good),
        max_rss_bytes=max(record.max_rss_bytes for record in good),
        server_cpu_median=statistics.median(record.server_cpu_seconds for record in good),
    )


@dataclass
class BenchOptions:
    """Settings of one benchmark invocation, from the command line."""

    quick: bool
    reps: int
    tools: list[str]
    datasets: list[str]
    work_dir: Path
    sample_logs: Path | None
    warm_cache: bool
    idle_seconds: float
    state_rows: int
    state_operations: int
    skip_scan: bool
    skip_state: bool
    command: str
    daemon_checksum: str | None = None


@dataclass
class BenchResults:
    """Everything one invocation measured, for the report."""

    options: BenchOptions
    started_at: str
    versions: dict[str, str]
    tool_settings: dict[str, str]
    datasets: dict[str, Dataset]
    records: list[RunRecord] = field(default_factory=list)
    daemon_skipped: str = ""
    find_runs: list[tuple[float, float]] = field(default_factory=list)
    scan_probe: ScanProbe | None = None
    state_timings: dict[str, Any] | None = None
    state_note: str = ""
    elapsed_seconds: float = 0.0
    logs_dir: str = ""
    load_at_start: str = ""

    def records_for(self, tool: str, dataset: str | None = None) -> list[RunRecord]:
        return [
            record
            for record in self.records
            if record.tool == tool and (dataset is None or record.dataset == dataset)
        ]
