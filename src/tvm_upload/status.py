"""The ``tvm-upload status`` report: the queue and registry, and the daemon's schedule.

The queue and registry come from the state store, opened read-only, so the
report works beside a running daemon and never creates or changes the
database. The next scheduled run and the operational window come from the
status file that the running daemon rewrites (``tvm_upload.daemonstatus``).
"""

from __future__ import annotations

import io
import time
from datetime import datetime
from typing import Any

from rich.console import Console
from rich.table import Table

from tvm_upload.config import Config
from tvm_upload.daemonstatus import process_exists, read_daemon_status
from tvm_upload.state import StateStore, StatusSummary

STATES = ("pending", "uploading", "failed", "uploaded")
STALE_AFTER_SECONDS = 60.0
"""Age of the daemon's status file after which the daemon counts as not running; it rewrites
the file every 10 s."""


def collect_status(config: Config, now: float | None = None) -> dict[str, Any]:
    """Return the status report as JSON-ready data."""
    now = time.time() if now is None else now
    report: dict[str, Any] = {
        "vehicle_id": config.vehicle_id,
        "state_file": str(config.state_file),
        "state_file_exists": config.state_file.exists(),
    }
    if not config.state_file.exists():
        report.update({state: {"count": 0, "bytes": 0} for state in STATES})
        report.update(failed_files=[], sources={}, oldest_pending_age_seconds=0.0, daemon=None)
        return report

    with StateStore(config.state_file, read_only=True) as store:
        summary = store.summary(now)
    report.update(_summary_fields(summary))
    report["daemon"] = _daemon_fields(read_daemon_status(config.state_file), now)
    return report


def _daemon_fields(daemon: dict[str, Any] | None, now: float) -> dict[str, Any] | None:
    """Return the daemon's own status with ``running`` added, or None when it wrote none.

    The daemon counts as running while its PID exists and its status is at
    most ``STALE_AFTER_SECONDS`` old, so a file left by a stopped or hung
    daemon is not shown as the current schedule.
    """
    if daemon is None:
        return None
    updated_at = daemon.get("updated_at")
    fresh = isinstance(updated_at, (int, float)) and now - updated_at <= STALE_AFTER_SECONDS
    running = fresh and not daemon.get("stopped") and process_exists(daemon.get("pid"))
    return {**daemon, "running": running}


def _summary_fields(summary: StatusSummary) -> dict[str, Any]:
    data = summary.to_dict()
    fields: dict[str, Any] = {
        state: {"count": data[f"{state}_count"], "bytes": data[f"{state}_bytes"]}
        for state in STATES
    }
    fields["deleted"] = {"count": summary.deleted_count}
    fields["oldest_pending_age_seconds"] = summary.oldest_pending_age_seconds
    fields["failed_files"] = data["failed_files"]
    fields["sources"] = summary.sources
    return fields


def render_status(report: dict[str, Any]) -> str:
    """Return the report as tables for a terminal."""
    console = Console(record=True, width=120, file=io.StringIO())
    if not report["state_file_exists"]:
        console.print(f"No state store at {report['state_file']} yet: the daemon has not run.")

    table = Table(title=f"tvm-upload status for {report['vehicle_id']}")
    table.add_column("state")
    table.add_column("files", justify="right")
    table.add_column("bytes", justify="right")
    for state in STATES:
        table.add_row(state, str(report[state]["count"]), _human_bytes(report[state]["bytes"]))
    console.print(table)
    console.print(f"Oldest pending file: {_human_age(report['oldest_pending_age_seconds'])}")
    _print_daemon(console, report["daemon"])

    _print_sources(console, report["sources"])
    _print_failed(console, report["failed_files"])
    return console.export_text().rstrip("\n")


def _print_daemon(console: Console, daemon: dict[str, Any] | None) -> None:
    if not daemon:
        console.print("Daemon: no status written yet (not running, or just started)")
        return
    if not daemon.get("running"):
        updated_at = daemon.get("updated_at")
        when = _local_time(updated_at) if isinstance(updated_at, (int, float)) else "unknown"
        console.print(f"Daemon: not running (last status from PID {daemon.get('pid')} at {when})")
        return

    schedule = daemon.get("schedule", {})
    console.print(
        f"Daemon PID {daemon.get('pid')}: {daemon.get('in_flight', 0)} uploads in flight,"
        f" {daemon.get('uploaded_since_start', 0)} files uploaded since start"
    )
    console.print(
        f"Schedule: {schedule.get('mode')}, next run {schedule.get('next_run') or 'none'}"
    )
    console.print(f"Operational window: {_window_state(schedule)}")
    waiting = daemon.get("waiting_to_be_stable", 0)
    if waiting:
        console.print(f"Waiting to be stable before they are queued: {waiting} files")
    paused = daemon.get("paused")
    if paused:
        console.print(
            f"ALL UPLOADS PAUSED for {paused.get('seconds_left')} s more: {paused.get('reason')}"
        )


def _window_state(schedule: dict[str, Any]) -> str:
    state = "open" if schedule.get("window_open") else "closed"
    window = schedule.get("window")
    if window is None:
        return f"disabled, so always {state}"
    return f"{window}, {state} now"


def _local_time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds).astimezone().isoformat(timespec="seconds")


def _print_sources(console: Console, sources: dict[str, dict[str, int]]) -> None:
    if not sources:
        return
    table = Table(title="per source")
    table.add_column("source")
    columns = sorted({name for counts in sources.values() for name in counts})
    for name in columns:
        table.add_column(name, justify="right")
    for source, counts in sorted(sources.items()):
        table.add_row(source, *(str(counts.get(name, 0)) for name in columns))
    console.print(table)


def _print_failed(console: Console, failed: list[dict[str, Any]]) -> None:
    if not failed:
        return
    table = Table(title="failed files")
    table.add_column("path")
    table.add_column("attempts", justify="right")
    table.add_column("last error")
    for row in failed:
        table.add_row(row["path"], str(row["attempts"]), row["last_error"] or "")
    console.print(table)


def _human_bytes(size: int) -> str:
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def _human_age(seconds: float) -> str:
    if seconds <= 0:
        return "none pending"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
