"""Run ``tvm-upload run`` as a child: timed uploads, the startup scan, idle cost.

The daemon keeps running after it has uploaded everything, so an upload
run is timed from the start of the process until its state store marks
every file uploaded, which it does only after S3 confirmed the upload.
The state store is read every ``POLL_SECONDS``, because listing the bucket
that often would add load to the S3 server that shares the machine. The
caller then lists the bucket to check the delivery. The daemon gets
SIGTERM; its CPU time and peak RSS come from ``os.wait4`` after it exits,
so they also cover start-up and shutdown.
"""

from __future__ import annotations

import re
import sqlite3
import sys
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from dataset_builder import Dataset
from measure import (
    ChildResult,
    is_running,
    process_cpu_seconds,
    process_io,
    process_status_bytes,
    spawn,
    stop_child,
)

TVM_UPLOAD = Path(sys.executable).with_name("tvm-upload")
VEHICLE_ID = "bench-vehicle"
SOURCE = "bench"
MAX_CONCURRENCY = 8
POLL_SECONDS = 0.1
LOG_POLL_SECONDS = 0.02
IDLE_SETTLE_SECONDS = 2.0

# NOTE: this matches the INFO line the daemon logs once start-up is over,
# right after its startup scan; the scan timing depends on its wording.
STARTED = re.compile(r"\bStarted: ")
QUEUED_AT_START = re.compile(r"(\d+) files queued")
LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


@dataclass
class DaemonUpload:
    """One timed daemon upload; ``delivered_seconds`` is None if it never delivered.

    ``startup_seconds`` and ``startup_cpu_seconds`` are measured when the log line
    that ends start-up appears; None if it never did.
    """

    child: ChildResult
    delivered_seconds: float | None
    server_cpu_seconds: float
    io: dict[str, int]
    note: str
    startup_seconds: float | None = None
    startup_cpu_seconds: float | None = None


@dataclass
class ScanProbe:
    """The daemon started on a tree whose every file is in the registry.

    ``scan_seconds`` runs from the process start to the log line that ends
    start-up (right after the startup scan), ``scan_cpu_seconds`` is the
    CPU used until then. ``logged_scan_seconds`` runs from the first log
    line to that line, by the log's own timestamps, so it leaves out
    interpreter start-up and imports; None if the timestamps cannot be read.
    ``files_queued`` is the queue length the daemon logged at that point.
    ``idle_cpu_seconds`` is the CPU used over ``idle_seconds``, measured from
    ``IDLE_SETTLE_SECONDS`` after that line.
    """

    ok: bool
    note: str
    files_queued: int = 0
    scan_seconds: float = 0.0
    logged_scan_seconds: float | None = None
    scan_cpu_seconds: float = 0.0
    idle_seconds: float = 0.0
    idle_cpu_seconds: float = 0.0
    rss_bytes: int = 0
    peak_rss_bytes: int = 0


def write_config(
    path: Path,
    *,
    root: Path,
    bucket: str,
    endpoint_url: str,
    state_file: Path,
    checksum_algorithm: str | None = None,
) -> Path:
    """Write a daemon config.yaml that uploads ``root`` at once and never deletes anything.

    ``checksum_algorithm`` sets ``s3.checksum_algorithm``; None keeps the default.
    """
    config: dict[str, Any] = {
        "vehicle_id": VEHICLE_ID,
        "timezone": "UTC",
        "log_directories": [{"path": str(root), "source": SOURCE}],
        "s3": {"bucket": bucket, "region": "us-east-1", "endpoint_url": endpoint_url},
        "upload": {
            "file_stable_seconds": 1,
            "max_concurrency": MAX_CONCURRENCY,
            "upload_on_start": True,
            "scan_existing_files": {"enabled": True, "max_age_days": 0},
        },
        "state_file": str(state_file),
        "monitoring": {"cloudwatch_enabled": False},
        "deletion": {
            "after_upload": {"enabled": False},
            "age_based": {"enabled": False},
            "emergency": {"enabled": False},
        },
    }
    if checksum_algorithm is not None:
        config["s3"]["checksum_algorithm"] = checksum_algorithm
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def daemon_key_to_path(key: str) -> str:
    """Map ``vehicle/date/source/relative`` back to the relative path.

    Dataset file names are plain ASCII, which the key layout leaves as it is.
    """
    parts = key.split("/", 3)
    return parts[3] if len(parts) == 4 else key


def daemon_argv(config: Path) -> list[str]:
    return [str(TVM_UPLOAD), "run", "--config", str(config), "--log-level", "INFO"]


def run_upload(
    dataset: Dataset,
    bucket: str,
    endpoint_url: str,
    env: dict[str, str],
    work_dir: Path,
    timeout_seconds: float,
    server_pid: int | None,
    checksum_algorithm: str | None = None,
) -> DaemonUpload:
    """Run the daemon on ``dataset`` until it has uploaded every file, then stop it."""
    config = write_config(
        work_dir / "config.yaml",
        root=dataset.root,
        bucket=bucket,
        endpoint_url=endpoint_url,
        state_file=work_dir / "state.db",
        checksum_algorithm=checksum_algorithm,
    )
    log_path = work_dir / "daemon.log"
    server_cpu_start = _cpu_or_zero(server_pid)
    child = spawn(daemon_argv(config), env, log_path)

    startup = StartupWatch(child.pid, log_path, child.started)
    delivered_seconds, note = _wait_for_uploaded_rows(
        child.pid,
        work_dir / "state.db",
        dataset.file_count,
        child.started,
        timeout_seconds,
        on_poll=startup.poll,
    )
    server_cpu = _cpu_or_zero(server_pid) - server_cpu_start
    io = _io_or_empty(child.pid)
    result = stop_child(child)
    return DaemonUpload(
        result, delivered_seconds, server_cpu, io, note, startup.seconds, startup.cpu_seconds
    )


class StartupWatch:
    """Notes the wall time and CPU of a daemon when its log shows that start-up ended.

    Polled between state store reads, so both figures are late by up to
    ``POLL_SECONDS`` plus the time of one read.
    """

    def __init__(self, pid: int, log_path: Path, started: float) -> None:
        self.pid = pid
        self.started = started
        self.reader = LogFollower(log_path)
        self.seconds: float | None = None
        self.cpu_seconds: float | None = None

    def poll(self) -> None:
        if self.seconds is not None:
            return
        self.reader.read_new_lines()
        while self.reader.checked < len(self.reader.lines):
            line = self.reader.lines[self.reader.checked]
            self.reader.checked += 1
            if STARTED.search(line):
                self.seconds = time.monotonic() - self.started
                self.cpu_seconds = _cpu_or_zero(self.pid)
                return


def _wait_for_uploaded_rows(
    pid: int,
    state_file: Path,
    expected: int,
    started: float,
    timeout: float,
    on_poll: Callable[[], None] | None = None,
) -> tuple[float | None, str]:
    """Poll the state store until ``expected`` rows are uploaded; return (seconds, failure note)."""
    deadline = started + timeout
    uploaded = 0
    while time.monotonic() < deadline:
        if not is_running(pid):
            return None, "tvm-upload exited before it had uploaded every file"
        if on_poll is not None:
            on_poll()
        uploaded = count_uploaded_rows(state_file)
        if uploaded >= expected:
            return time.monotonic() - started, ""
        time.sleep(POLL_SECONDS)

    return None, f"timed out after {timeout:.0f} s with {uploaded}/{expected} files uploaded"


def count_uploaded_rows(state_file: Path) -> int:
    """Count rows in state ``uploaded``, reading the store without writing; 0 before it exists."""
    if not state_file.exists():
        return 0
    try:
        with closing(sqlite3.connect(f"{state_file.as_uri()}?mode=ro", uri=True)) as conn:
            row = conn.execute("SELECT count(*) FROM files WHERE state = 'uploaded'").fetchone()
    except sqlite3.OperationalError:
        # The daemon has created the file but not yet its tables, or holds a lock.
        return 0
    return int(row[0])


def run_scan_probe(
    dataset: Dataset,
    bucket: str,
    endpoint_url: str,
    state_file: Path,
    env: dict[str, str],
    work_dir: Path,
    idle_seconds: float,
    timeout_seconds: float,
) -> ScanProbe:
    """Start the daemon on ``dataset`` with every file registered; time its scan and idling."""
    config = write_config(
        work_dir / "config.yaml",
        root=dataset.root,
        bucket=bucket,
        endpoint_url=endpoint_url,
        state_file=state_file,
    )
    child = spawn(daemon_argv(config), env, work_dir / "daemon.log")
    try:
        probe = _observe_scan_and_idle(
            child.pid, child.log_path, child.started, idle_seconds, timeout_seconds
        )
    finally:
        result = stop_child(child)

    probe.peak_rss_bytes = max(probe.peak_rss_bytes, result.max_rss_bytes)
    if probe.ok and result.exit_code != 0:
        probe.note = f"tvm-upload exited with {result.exit_code} after SIGTERM"
    return probe


def _observe_scan_and_idle(
    pid: int, log_path: Path, started: float, idle_seconds: float, timeout_seconds: float
) -> ScanProbe:
    reader = LogFollower(log_path)
    deadline = started + timeout_seconds

    started_match = reader.wait_for(STARTED, pid, deadline)
    if started_match is None:
        return ScanProbe(False, "no start-up line in the log: " + reader.tail())
    scan_seconds = time.monotonic() - started
    scan_cpu = process_cpu_seconds(pid)
    queued = QUEUED_AT_START.search(started_match.string)

    time.sleep(IDLE_SETTLE_SECONDS)
    idle_start_cpu = process_cpu_seconds(pid)
    time.sleep(idle_seconds)
    idle_cpu = process_cpu_seconds(pid) - idle_start_cpu
    return ScanProbe(
        ok=True,
        note="",
        files_queued=int(queued.group(1)) if queued else 0,
        scan_seconds=scan_seconds,
        logged_scan_seconds=_seconds_between(reader.lines[0], started_match.string),
        scan_cpu_seconds=scan_cpu,
        idle_seconds=idle_seconds,
        idle_cpu_seconds=idle_cpu,
        rss_bytes=process_status_bytes(pid, "VmRSS"),
        peak_rss_bytes=process_status_bytes(pid, "VmHWM"),
    )


class LogFollower:
    """Reads a growing log file and finds lines matching a pattern, each line once."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial_line = ""
        self.lines: list[str] = []
        self.checked = 0

    def read_new_lines(self) -> None:
        """Append the complete lines written since the last read to ``lines``."""
        try:
            with self.path.open("r", errors="replace") as handle:
                handle.seek(self.offset)
                chunk = handle.read()
                self.offset = handle.tell()
        except FileNotFoundError:
            return

        text = self.partial_line + chunk
        complete, _, self.partial_line = text.rpartition("\n")
        if complete:
            self.lines.extend(complete.splitlines())

    def wait_for(self, pattern: re.Pattern[str], pid: int, deadline: float) -> re.Match[str] | None:
        """Return the first line after the last match that matches ``pattern``.

        Returns None at ``deadline`` or when the process ``pid`` has exited.
        """
        while time.monotonic() < deadline:
            self.read_new_lines()
            while self.checked < len(self.lines):
                match = pattern.search(self.lines[self.checked])
                self.checked += 1
                if match:
                    return match
            if not is_running(pid):
                return None
            time.sleep(LOG_POLL_SECONDS)
        return None

    def tail(self, count: int = 5) -> str:
        self.read_new_lines()
        return " | ".join(self.lines[-count:]) or "(empty log)"


def register_tree(dataset: Dataset, state_file: Path, object_key_prefix: str) -> None:
    """Fill a new state store with every file of ``dataset`` as uploaded, in one transaction.

    ``StateStore`` itself creates the store with its schema and version.
    The rows are inserted with plain SQL, because one durable call per file
    would take minutes for 100,000 files.
    """
    from tvm_upload.files import FileIdentity
    from tvm_upload.state import StateStore

    state_file.unlink(missing_ok=True)
    StateStore(state_file).close()

    now = time.time()
    rows = []
    for relative, _ in dataset.files:
        path = dataset.root / relative
        identity = FileIdentity.of(path)
        rows.append(
            (
                str(path),
                SOURCE,
                identity.device,
                identity.inode,
                identity.size,
                identity.mtime_ns,
                f"{object_key_prefix}/{relative}",
                "uploaded",
                "0" * 64,
                now,
                now,
                now,
            )
        )

    with sqlite3.connect(state_file) as conn:
        conn.executemany(
            "INSERT INTO files (path, source, device, inode, size, mtime_ns, object_key, state,"
            " sha256, queued_at, uploaded_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
            " ?, ?)",
            rows,
        )


def _seconds_between(first_line: str, last_line: str) -> float | None:
    """Return the time between two log lines by their ``asctime`` stamps (millisecond precision)."""
    first_stamp = LOG_TIME.match(first_line)
    last_stamp = LOG_TIME.match(last_line)
    if first_stamp is None or last_stamp is None:
        return None

    stamp_format = "%Y-%m-%d %H:%M:%S,%f"
    first = datetime.strptime(first_stamp.group(1), stamp_format)
    last = datetime.strptime(last_stamp.group(1), stamp_format)
    return (last - first).total_seconds()


def _cpu_or_zero(pid: int | None) -> float:
    if pid is None:
        return 0.0
    try:
        return process_cpu_seconds(pid)
    except FileNotFoundError:
        return 0.0


def _io_or_empty(pid: int) -> dict[str, int]:
    try:
        return process_io(pid)
    except (FileNotFoundError, PermissionError):
        return {}
