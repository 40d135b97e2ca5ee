"""Markdown report of a benchmark run.

Every transfer figure is printed with two ratios: to s5cmd and to the best
tool on the same dataset in the same run. A ratio is always this tool's
value divided by the reference value, so for wall time, CPU and memory a
ratio above 1 is worse, and for MB/s and files/s a ratio below 1 is worse.
"""

from __future__ import annotations

import platform
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from daemon_runner import ScanProbe
from results import MB, BenchResults, MiB, ToolSummary, summarize

REFERENCE_TOOL = "s5cmd"


@dataclass(frozen=True)
class Metric:
    """One column of the transfer tables."""

    header: str
    value: Callable[[ToolSummary], float]
    higher_is_better: bool
    digits: int


TRANSFER_METRICS = (
    Metric("Wall s (median)", lambda s: s.wall_median, False, 2),
    Metric("MB/s", lambda s: s.megabytes_per_second, True, 1),
    Metric("files/s", lambda s: s.files_per_second, True, 1),
    Metric("CPU s/GB", lambda s: s.cpu_seconds_per_gb, False, 2),
    Metric("CPU ms/file", lambda s: s.cpu_ms_per_file, False, 2),
    Metric("Peak RSS MiB", lambda s: s.max_rss_mib, False, 0),
    Metric("Server CPU s/GB", lambda s: s.server_cpu_seconds_per_gb, False, 2),
)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def one_line(text: str) -> str:
    """Fit free text (a log tail) into one Markdown table cell or list item."""
    return " / ".join(line.strip() for line in text.splitlines() if line.strip()).replace(
        "|", "\\|"
    )


def ratio_text(value: float, reference: float | None) -> str:
    if reference is None or reference == 0:
        return "-"
    return f"{value / reference:.2f}"


def metric_cell(metric: Metric, summary: ToolSummary, summaries: list[ToolSummary]) -> str:
    """Format ``value (ratio to s5cmd, ratio to the best tool)`` for one metric."""
    value = metric.value(summary)
    values = [metric.value(other) for other in summaries]
    best = max(values) if metric.higher_is_better else min(values)
    reference = next(
        (metric.value(other) for other in summaries if other.tool == REFERENCE_TOOL), None
    )
    return f"{value:,.{metric.digits}f} ({ratio_text(value, reference)}, {ratio_text(value, best)})"


def transfer_table(summaries: list[ToolSummary], failures: dict[str, str]) -> str:
    """Table of one dataset: one row per tool, each cell with its two ratios."""
    metric_headers = [metric.header for metric in TRANSFER_METRICS]
    headers = ["Tool", "Runs", metric_headers[0], "Wall min-max s", *metric_headers[1:]]
    rows = []
    for summary in summaries:
        runs = f"{summary.runs}" + (f" ({summary.failed} failed)" if summary.failed else "")
        spread = f"{summary.wall_min:.2f}-{summary.wall_max:.2f}"
        cells = [metric_cell(metric, summary, summaries) for metric in TRANSFER_METRICS]
        rows.append([summary.tool, runs, cells[0], spread, *cells[1:]])

    for tool, reason in failures.items():
        rows.append(
            [tool, "0", f"no successful run: {one_line(reason)}"] + [""] * len(TRANSFER_METRICS)
        )
    return markdown_table(headers, rows)


def machine_description() -> list[str]:
    """Describe the CPU, core count, memory and kernel, read from /proc."""
    model = "unknown CPU"
    cores = 0
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            cores += 1

    memory_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory_kib = int(line.split()[1])

    return [
        f"CPU: {cores} x {model}",
        f"Memory: {memory_kib / 1024 / 1024:.1f} GiB",
        f"Kernel: {platform.release()}",
        f"Python: {platform.python_version()}",
    ]


def bullet_list(items: Sequence[str]) -> str:
    return "\n".join(f"- {item}" for item in items)


def megabytes(byte_count: int) -> str:
    return f"{byte_count / MB:,.1f} MB"


def write_report(results: BenchResults, path: Path) -> str:
    """Write the Markdown report of ``results`` to ``path`` and return its text."""
    sections = [
        _header(results),
        _tools_section(results),
        _datasets_section(results),
        _transfers_section(results),
        _daemon_io_section(results),
        _scan_section(results),
        _state_section(results),
    ]
    text = "\n\n".join(section for section in sections if section) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text


def _header(results: BenchResults) -> str:
    options = results.options
    mode = "quick" if options.quick else "full"
    cache = "kept warm" if options.warm_cache else "dropped before each run (cold reads)"
    lines = [
        f"# tvm-upload benchmark ({mode}), {results.started_at}",
        "",
        (
            f"Command: `{options.command}`; {options.reps} repetition(s), runs interleaved;"
            f" page cache of the datasets {cache}; total time {results.elapsed_seconds:.0f} s."
        ),
        (
            "S3 server: SeaweedFS (`weed server`) on 127.0.0.1 on the same machine, a fresh bucket"
            " per run."
        ),
        f"Tool logs: `{results.logs_dir}`. Load average (1 min) at the start: {results.load_at_start}.",
        "",
        "## Machine",
        "",
        bullet_list(machine_description()),
    ]
    return "\n".join(lines)


def _tools_section(results: BenchResults) -> str:
    rows = [
        [tool, results.versions.get(tool, "?"), settings]
        for tool, settings in results.tool_settings.items()
    ]
    return "## Tools\n\n" + markdown_table(["Tool", "Version", "Settings"], rows)


def _datasets_section(results: BenchResults) -> str:
    rows = [
        [
            name,
            dataset.spec.description,
            f"{dataset.file_count:,}",
            megabytes(dataset.total_bytes),
            dataset.content_source,
        ]
        for name, dataset in results.datasets.items()
    ]
    table = markdown_table(["Dataset", "Shape", "Files", "Size", "Content"], rows)
    return "## Datasets\n\n" + table


def _transfers_section(results: BenchResults) -> str:
    parts = [
        "## Uploads",
        "",
        (
            "Each cell: value (ratio to s5cmd, ratio to the best tool on that dataset). A ratio is"
            " this tool's value divided by the reference, so above 1 is worse for time, CPU and"
            " memory and better for MB/s and files/s. MB = 10^6 bytes. CPU is user plus system time"
            " of the tool's process tree (`wait4`); server CPU is the SeaweedFS process during the"
            " run. tvm-upload is timed from process start until its state store marks every file"
            " uploaded (read every 0.1 s); the bucket is listed afterwards to check the delivery."
        ),
    ]
    if results.daemon_skipped:
        parts += ["", f"tvm-upload skipped: {one_line(results.daemon_skipped)}"]

    for name, dataset in results.datasets.items():
        records = [record for record in results.records if record.dataset == name]
        if not records:
            continue
        tools = list(dict.fromkeys(record.tool for record in records))
        summaries = []
        failures = {}
        for tool in tools:
            summary = summarize(records, tool, dataset.file_count, dataset.total_bytes)
            if summary is None:
                notes = [record.note for record in records if record.tool == tool]
                failures[tool] = notes[0] if notes else "no run"
            else:
                summaries.append(summary)
        title = f"### Dataset {name}: {dataset.spec.description}, {megabytes(dataset.total_bytes)}"
        parts += ["", title, "", transfer_table(summaries, failures)]

    failed = [record for record in results.records if not record.ok]
    if failed:
        parts += ["", "Failed runs:", ""]
        parts += [
            f"- rep {r.rep}, {r.tool}, dataset {r.dataset}: {one_line(r.note)}" for r in failed
        ]
    return "\n".join(parts)


def _daemon_io_section(results: BenchResults) -> str:
    rows = []
    for name, dataset in results.datasets.items():
        runs = [r for r in results.records_for("tvm-upload", name) if r.ok and r.io]
        if not runs:
            continue
        rchar = statistics.median(r.io.get("rchar", 0) for r in runs) / dataset.total_bytes
        disk = statistics.median(r.io.get("read_bytes", 0) for r in runs) / dataset.total_bytes
        rows.append([name, str(len(runs)), f"{rchar:.3f}", f"{disk:.3f}"])
    if not rows:
        return ""

    headers = ["Dataset", "Runs", "rchar / byte uploaded", "read_bytes / byte uploaded"]
    return (
        "## tvm-upload reads per byte uploaded\n\n"
        "From `/proc/<pid>/io` just before SIGTERM, median over runs. `rchar` counts every"
        " byte returned by read calls (state store and Python imports included); `read_bytes`"
        " counts bytes fetched from the block device.\n\n"
        + markdown_table(headers, rows)
        + _daemon_startup_table(results)
    )


def _daemon_startup_table(results: BenchResults) -> str:
    """Split the daemon's wall time and CPU into start-up and the rest of the run."""
    rows = []
    for name, dataset in results.datasets.items():
        runs = [
            r
            for r in results.records_for("tvm-upload", name)
            if r.ok and r.startup_seconds is not None and r.startup_cpu_seconds is not None
        ]
        if not runs:
            continue
        startup = statistics.median(r.startup_seconds or 0.0 for r in runs)
        startup_cpu = statistics.median(r.startup_cpu_seconds or 0.0 for r in runs)
        upload_wall = statistics.median(r.wall_seconds - (r.startup_seconds or 0.0) for r in runs)
        rest_cpu = statistics.median(r.cpu_seconds - (r.startup_cpu_seconds or 0.0) for r in runs)
        rows.append(
            [
                name,
                str(len(runs)),
                f"{startup:.2f}",
                f"{startup_cpu:.2f}",
                f"{dataset.total_bytes / 1e6 / upload_wall:.1f}" if upload_wall > 0 else "-",
                f"{dataset.file_count / upload_wall:.1f}" if upload_wall > 0 else "-",
                f"{rest_cpu / (dataset.total_bytes / 1e9):.2f}",
                f"{1000 * rest_cpu / dataset.file_count:.2f}",
            ]
        )
    if not rows:
        return ""

    headers = [
        "Dataset",
        "Runs",
        "Start-up s",
        "Start-up CPU s",
        "MB/s after start-up",
        "files/s after start-up",
        "CPU s/GB after start-up",
        "CPU ms/file after start-up",
    ]
    return (
        "\n\n### tvm-upload start-up and the rest of the run\n\n"
        "Start-up ends at the daemon's `Started:` log line, after the startup scan. The rest"
        " of the run includes the `file_stable_seconds` wait (1 s), the uploads and the"
        " shutdown CPU. Medians over runs.\n\n" + markdown_table(headers, rows)
    )


def _scan_section(results: BenchResults) -> str:
    dataset = results.datasets.get("D")
    if dataset is None or not results.find_runs:
        return ""

    find_wall = statistics.median(wall for wall, _ in results.find_runs)
    find_cpu = statistics.median(cpu for _, cpu in results.find_runs)
    rows = [
        ["`find DIR -printf '%s %T@\\n'`", f"{find_wall:.2f}", f"{find_cpu:.2f}", "1.00", "1.00"]
    ]
    probe = results.scan_probe
    if probe is not None and probe.ok:
        rows.append(
            [
                f"tvm-upload, process start to the end of start-up ({probe.files_queued} queued)",
                f"{probe.scan_seconds:.2f}",
                f"{probe.scan_cpu_seconds:.2f}",
                ratio_text(probe.scan_seconds, find_wall),
                ratio_text(probe.scan_cpu_seconds, find_cpu),
            ]
        )
    if probe is not None and probe.ok and probe.logged_scan_seconds is not None:
        rows.append(
            [
                "tvm-upload, first log line to the end of start-up",
                f"{probe.logged_scan_seconds:.2f}",
                "",
                ratio_text(probe.logged_scan_seconds, find_wall),
                "",
            ]
        )

    parts = [
        f"## Startup scan of dataset D ({dataset.file_count:,} files, all in the registry)",
        "",
        (
            "Directory entries and inodes are cached (a warm-up `find` runs first). The first"
            " tvm-upload row includes interpreter start-up and imports; the second starts at the"
            " daemon's first log line and still includes opening the state store and adding the"
            " inotify watches."
        ),
        "",
        markdown_table(["Method", "Wall s", "CPU s", "Wall vs find", "CPU vs find"], rows),
    ]
    if probe is not None and not probe.ok:
        parts += ["", f"tvm-upload scan probe failed: {probe.note}"]
    if probe is not None and probe.ok:
        parts += ["", _idle_table(probe, dataset.file_count)]
    return "\n".join(parts)


def _idle_table(probe: ScanProbe, file_count: int) -> str:
    percent = 100 * probe.idle_cpu_seconds / probe.idle_seconds if probe.idle_seconds else 0.0
    row = [
        f"{probe.idle_seconds:.0f}",
        f"{probe.idle_cpu_seconds:.3f}",
        f"{percent:.2f}",
        f"{probe.rss_bytes / MiB:.0f}",
        f"{probe.peak_rss_bytes / MiB:.0f}",
    ]
    headers = ["Idle s", "CPU s", "CPU % of a core", "RSS MiB", "Peak RSS MiB"]
    return (
        f"### tvm-upload idle with dataset D watched ({file_count:,} files)\n\n"
        + markdown_table(headers, [row])
    )


def _state_section(results: BenchResults) -> str:
    if results.state_timings is None:
        if results.state_note:
            return "## State store\n\n" + results.state_note
        return ""

    timings = results.state_timings
    rows = []
    for name, value in timings.items():
        if not isinstance(value, dict):
            continue
        calls, seconds = value["calls"], value["seconds"]
        rows.append(
            [
                name,
                f"{calls:,}",
                f"{seconds:.3f}",
                f"{seconds / calls * 1e6:,.0f}",
                f"{calls / seconds:,.0f}",
            ]
        )
    headers = ["Operation", "Calls", "Total s", "µs per call", "Calls/s"]
    return (
        f"## State store with {timings['rows']:,} registry rows\n\n"
        f"Filled in {timings['fill_seconds']:.1f} s with one SQL transaction; database"
        f" {timings['db_bytes'] / MiB:.0f} MiB. Each call is one transaction through"
        " `StateStore`; `enqueue` and `mark_uploaded` sync the WAL to disk.\n\n"
        + markdown_table(headers, rows)
    )
