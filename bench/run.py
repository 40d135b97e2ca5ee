"""Benchmark tvm-upload against s5cmd, rclone, aws-cli and boto3 on a local SeaweedFS.

Usage: ``.venv/bin/python bench/run.py [--quick] [--reps N] [--tools ...]``.

Every tool uploads every dataset into a fresh bucket. The runs are
interleaved (repetition 1 of every tool, then repetition 2, ...), and each
repetition starts with a different tool. After each run the bucket is
listed: a run that did not deliver every file with its size is marked
failed and not timed. The dataset's pages are dropped from the page cache
before each run, so every tool reads from disk. Then the daemon's startup
scan, idle cost and state store are measured. The Markdown report goes to
``.bench/results-<timestamp>.md`` and to stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bucket_check import BucketPool, identity_key
from daemon_runner import (
    MAX_CONCURRENCY,
    DaemonUpload,
    daemon_key_to_path,
    register_tree,
    run_scan_probe,
    run_upload,
)
from dataset_builder import Dataset, build_dataset, evict_from_page_cache, standard_specs
from measure import CpuMeter, run_child
from report import write_report
from results import BenchOptions, BenchResults, RunRecord
from tool_runners import CliTool, ToolsVenv, cli_tools, tool_environment

from tvm_upload.localserver import SeaweedServer

logger = logging.getLogger("bench")

REPO = Path(__file__).resolve().parents[1]
DAEMON = "tvm-upload"
ALL_TOOLS = ("s5cmd", "rclone", "aws-cli", "boto3", DAEMON)
TRANSFER_DATASETS = ("A", "B", "C")
PAUSE_BETWEEN_RUNS_SECONDS = 1.0
DEFAULT_SAMPLE_LOGS = REPO.parent / "shared" / "data" / "loghub"


def parse_args(argv: list[str] | None) -> BenchOptions:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small datasets, 1 repetition, 10 s idle: a few minutes in all",
    )
    parser.add_argument(
        "--reps", type=int, help="repetitions per tool and dataset (default 3, 1 with --quick)"
    )
    parser.add_argument(
        "--tools",
        default=",".join(ALL_TOOLS),
        help="comma-separated tools to compare (default: all)",
    )
    parser.add_argument(
        "--datasets",
        default=",".join(TRANSFER_DATASETS),
        help="comma-separated upload datasets among A, B, C (default: all)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=REPO / ".bench",
        help="datasets, tools, server data, logs and reports (default .bench)",
    )
    parser.add_argument(
        "--sample-logs",
        type=Path,
        default=DEFAULT_SAMPLE_LOGS,
        help="directory of *.log files whose lines fill dataset A and D"
        " (default: generated lines if the directory does not exist)",
    )
    parser.add_argument(
        "--warm-cache",
        action="store_true",
        help="keep dataset pages in the page cache instead of dropping them per run",
    )
    parser.add_argument(
        "--skip-scan", action="store_true", help="skip the dataset D scan and idle tests"
    )
    parser.add_argument("--skip-state", action="store_true", help="skip the state store timings")
    parser.add_argument(
        "--daemon-checksum",
        choices=("SHA256", "CRC32C", "none"),
        help="s3.checksum_algorithm for tvm-upload (default: the daemon's default, CRC32C)",
    )
    args = parser.parse_args(argv)

    tools = [tool.strip() for tool in args.tools.split(",") if tool.strip()]
    datasets = [name.strip().upper() for name in args.datasets.split(",") if name.strip()]
    unknown = [tool for tool in tools if tool not in ALL_TOOLS]
    unknown += [name for name in datasets if name not in TRANSFER_DATASETS]
    if unknown or not tools:
        parser.error(
            f"invalid --tools or --datasets value {', '.join(unknown) or '(empty)'}: tools are"
            f" {', '.join(ALL_TOOLS)}, datasets {', '.join(TRANSFER_DATASETS)},"
            " e.g. --tools s5cmd,tvm-upload --datasets A"
        )

    reps = args.reps or (1 if args.quick else 3)
    return BenchOptions(
        quick=args.quick,
        reps=reps,
        tools=tools,
        datasets=datasets,
        work_dir=args.work_dir.resolve(),
        sample_logs=args.sample_logs,
        warm_cache=args.warm_cache,
        idle_seconds=10.0 if args.quick else 60.0,
        state_rows=100_000 if args.quick else 1_000_000,
        state_operations=5_000 if args.quick else 10_000,
        skip_scan=args.skip_scan,
        skip_state=args.skip_state,
        daemon_checksum=args.daemon_checksum,
        command=" ".join([*command_prefix(), *(sys.argv[1:] if argv is None else argv)]),
    )


def command_prefix() -> list[str]:
    """Return the interpreter and script as typed from the repository root."""
    paths = [Path(sys.executable), Path(sys.argv[0]).resolve()]
    return [
        str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path) for path in paths
    ]


class Bench:
    """One benchmark invocation: the server, the tools and the measurements."""

    def __init__(self, options: BenchOptions) -> None:
        self.options = options
        self.work_dir = options.work_dir
        self.run_dir = self.work_dir / "runs" / time.strftime("%Y%m%d-%H%M%S")
        self.venv = ToolsVenv(self.work_dir / "tools-venv")
        self.server = SeaweedServer(data_dir=self.work_dir / "seaweed")
        self.pool: BucketPool
        self.env: dict[str, str]
        self.results: BenchResults

    def prepare(self) -> None:
        """Install the tools, build the datasets and record versions."""
        self.venv.ensure_installed()
        specs = standard_specs(self.options.quick)
        names = [name for name in self.options.datasets if name in TRANSFER_DATASETS]
        if not self.options.skip_scan:
            names.append("D")

        data_dir = self.work_dir / "data"
        data_dir.mkdir(parents=True, exist_ok=True)
        datasets = {
            name: build_dataset(data_dir, specs[name], self.options.sample_logs) for name in names
        }

        versions = self.venv.versions()
        versions[DAEMON] = _daemon_version()
        tools = [tool for tool in cli_tools(self.venv) if tool.name in self.options.tools]
        settings = {tool.name: tool.settings for tool in tools}
        if DAEMON in self.options.tools:
            settings[DAEMON] = (
                f"`tvm-upload run`, `upload.max_concurrency: {MAX_CONCURRENCY}`,"
                " `file_stable_seconds: 1`"
            )
            if self.options.daemon_checksum:
                settings[DAEMON] += f", `s3.checksum_algorithm: {self.options.daemon_checksum}`"
        self.cli_tools = tools
        self.results = BenchResults(
            options=self.options,
            started_at=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            versions=versions,
            tool_settings=settings,
            datasets=datasets,
            load_at_start=f"{os.getloadavg()[0]:.2f}",
        )

    def start_server(self) -> None:
        shutil.rmtree(self.server.data_dir, ignore_errors=True)
        self.server.start()
        logger.info(
            "SeaweedFS is up at %s (data in %s)", self.server.endpoint_url, self.server.data_dir
        )
        self.pool = BucketPool(self.server.endpoint_url)
        self.env = tool_environment(self.work_dir, self.server.endpoint_url)
        self.pool.warm_up()

    @property
    def server_pid(self) -> int | None:
        return self.server.process.pid if self.server.process else None

    def run_transfers(self) -> None:
        """Run every tool on every upload dataset, interleaved by repetition."""
        names = [name for name in self.options.datasets if name in self.results.datasets]
        runners = [tool.name for tool in self.cli_tools]
        if DAEMON in self.options.tools:
            runners.append(DAEMON)

        for rep in range(1, self.options.reps + 1):
            shift = (rep - 1) % len(runners)
            order = runners[shift:] + runners[:shift]
            for name in names:
                for tool in order:
                    if tool == DAEMON and self.results.daemon_skipped:
                        continue
                    self._run_one(tool, self.results.datasets[name], rep)

    def _run_one(self, tool: str, dataset: Dataset, rep: int) -> None:
        bucket = self.pool.fresh(f"{tool}-{dataset.spec.name}")
        if not self.options.warm_cache:
            evict_from_page_cache(dataset)
        time.sleep(PAUSE_BETWEEN_RUNS_SECONDS)

        if tool == DAEMON:
            record = self._run_daemon(dataset, bucket, rep)
        else:
            record = self._run_cli(tool, dataset, bucket, rep)

        self.pool.delete(bucket)
        self.results.records.append(record)
        status = "ok" if record.ok else f"FAILED: {record.note}"
        logger.info(
            "rep %d  %-10s dataset %s  %7.2f s  cpu %6.2f s  rss %4.0f MiB  %s",
            rep,
            tool,
            dataset.spec.name,
            record.wall_seconds,
            record.cpu_seconds,
            record.max_rss_bytes / 2**20,
            status,
        )

    def _timeout(self, dataset: Dataset) -> float:
        """Deadline of one run: generous, only there to stop a hung tool."""
        return 120.0 + dataset.total_bytes / 2e6 + dataset.file_count / 10

    def _run_cli(self, name: str, dataset: Dataset, bucket: str, rep: int) -> RunRecord:
        tool: CliTool = next(tool for tool in self.cli_tools if tool.name == name)
        log_path = self.run_dir / f"rep{rep}-{dataset.spec.name}-{name}.log"
        meter = CpuMeter(self.server_pid)
        meter.start()
        child = run_child(
            tool.argv(dataset.root, bucket, self.server.endpoint_url),
            self.env,
            log_path,
            self._timeout(dataset),
        )
        server_cpu = meter.stop()

        note = ""
        if child.timed_out:
            note = f"timed out after {self._timeout(dataset):.0f} s"
        elif child.exit_code != 0:
            note = f"exit code {child.exit_code}: {child.log_tail(3)}"
        delivery = self.pool.check_delivery(bucket, dataset.files, identity_key)
        if not note and not delivery.complete:
            note = "incomplete delivery: " + delivery.describe()

        return RunRecord(
            tool=name,
            dataset=dataset.spec.name,
            rep=rep,
            ok=not note,
            note=note,
            wall_seconds=child.wall_seconds,
            cpu_seconds=child.cpu_seconds,
            max_rss_bytes=child.max_rss_bytes,
            server_cpu_seconds=server_cpu,
        )

    def _run_daemon(self, dataset: Dataset, bucket: str, rep: int) -> RunRecord:
        work_dir = self.run_dir / f"rep{rep}-{dataset.spec.name}-{DAEMON}"
        upload: DaemonUpload = run_upload(
            dataset,
            bucket,
            self.server.endpoint_url,
            self.env,
            work_dir,
            self._timeout(dataset),
            self.server_pid,
            checksum_algorithm=self.options.daemon_checksum,
        )
        note = upload.note
        if not note and upload.child.exit_code != 0:
            note = f"exit code {upload.child.exit_code} after SIGTERM: {upload.child.log_tail(3)}"
        delivery = self.pool.check_delivery(bucket, dataset.files, daemon_key_to_path)
        if not note and not delivery.complete:
            note = "incomplete delivery: " + delivery.describe()

        if upload.delivered_seconds is None and not self.results.records_for(DAEMON):
            self.results.daemon_skipped = (
                f"`tvm-upload run` did not deliver dataset {dataset.spec.name}: {note}."
                f" Log: {upload.child.log_tail(3)}"
            )
            logger.warning("Skipping the daemon from now on: %s", self.results.daemon_skipped)

        return RunRecord(
            tool=DAEMON,
            dataset=dataset.spec.name,
            rep=rep,
            ok=not note,
            note=note,
            wall_seconds=upload.delivered_seconds or upload.child.wall_seconds,
            cpu_seconds=upload.child.cpu_seconds,
            max_rss_bytes=upload.child.max_rss_bytes,
            server_cpu_seconds=upload.server_cpu_seconds,
            io=upload.io,
            startup_seconds=upload.startup_seconds,
            startup_cpu_seconds=upload.startup_cpu_seconds,
        )

    def run_scan(self) -> None:
        """Time ``find`` and the daemon's startup scan on dataset D, then the daemon's idle cost."""
        dataset = self.results.datasets.get("D")
        if dataset is None:
            return

        find_argv = ["find", str(dataset.root), "-printf", "%s %T@\\n"]
        run_child(find_argv, self.env, self.run_dir / "find-warmup.log", 300.0)
        for rep in range(self.options.reps):
            child = run_child(find_argv, self.env, self.run_dir / f"find-{rep + 1}.log", 300.0)
            self.results.find_runs.append((child.wall_seconds, child.cpu_seconds))

        if self.results.daemon_skipped or DAEMON not in self.options.tools:
            return

        work_dir = self.run_dir / f"scan-{DAEMON}"
        state_file = work_dir / "state.db"
        work_dir.mkdir(parents=True, exist_ok=True)
        register_tree(dataset, state_file, "bench-vehicle/registered/bench")
        bucket = self.pool.fresh("scan")
        self.results.scan_probe = run_scan_probe(
            dataset,
            bucket,
            self.server.endpoint_url,
            state_file,
            self.env,
            work_dir,
            self.options.idle_seconds,
            timeout_seconds=60.0 + dataset.file_count / 200,
        )
        self.pool.delete(bucket)

    def run_state_store(self) -> None:
        """Time state store calls on a registry of ``state_rows`` rows, in a child process."""
        db = self.run_dir / "state-probe" / "state.db"
        db.parent.mkdir(parents=True, exist_ok=True)
        argv = [
            sys.executable,
            str(Path(__file__).with_name("state_probe.py")),
            "--rows",
            str(self.options.state_rows),
            "--operations",
            str(self.options.state_operations),
            str(db),
        ]
        completed = subprocess.run(argv, capture_output=True, text=True, check=False)
        if completed.returncode != 0:
            self.results.state_note = "state probe failed: " + completed.stderr.strip()[-600:]
            logger.warning("%s", self.results.state_note)
            return
        self.results.state_timings = json.loads(completed.stdout)
        shutil.rmtree(db.parent, ignore_errors=True)


def _daemon_version() -> str:
    command = [str(Path(sys.executable).with_name("tvm-upload")), "--version"]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    return (completed.stdout or completed.stderr).strip() or "unknown"


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("tvm_upload").setLevel(logging.WARNING)
    options = parse_args(argv)
    started = time.monotonic()
    bench = Bench(options)
    bench.prepare()

    bench.start_server()
    try:
        bench.run_transfers()
        if not options.skip_scan:
            bench.run_scan()
    finally:
        bench.server.stop()

    if not options.skip_state:
        bench.run_state_store()

    bench.results.elapsed_seconds = time.monotonic() - started
    bench.results.logs_dir = str(bench.run_dir)
    report_path = options.work_dir / f"results-{bench.run_dir.name}.md"
    text = write_report(bench.results, report_path)
    print(text)
    logger.info("Report written to %s", report_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
