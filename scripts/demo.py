"""Run tvm-upload for a minute against a local S3 server and a live vehicle log tree.

Everything lives under .demo/ in the repository and every process this
script starts is stopped again by its PID. The S3 server is SeaweedFS on
127.0.0.1 with telemetry off. The log tree comes from the vehicle
simulator in ../shared/tools when it is present, and otherwise from a small
built-in writer that appends to a few logs and closes them one by one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import boto3  # noqa: F401  (fail early with a clear ImportError when not installed)

from tvm_upload.localserver import (
    SeaweedServer,
    create_bucket,
    local_credentials_environment,
    s3_client,
)

REPO = Path(__file__).resolve().parents[1]
SIMULATOR = REPO.parent / "shared" / "tools" / "vehicle_sim.py"
BUCKET = "tvm-demo"
VEHICLE_ID = "demo-vehicle-001"

CONFIG_TEMPLATE = """\
vehicle_id: {vehicle_id}
timezone: Asia/Shanghai
log_directories:
  - path: {tree}/ros/log
    source: ros
  - path: {tree}/bags
    source: bags
  - path: {tree}/terminal
    source: terminal
  - path: {tree}/syslog
    source: syslog
s3:
  bucket: {bucket}
  region: cn-north-1
  endpoint_url: {endpoint}
upload:
  file_stable_seconds: 5
  max_concurrency: 4
state_file: {work}/state.db
deletion:
  after_upload:
    enabled: false
  emergency:
    enabled: false
"""


def write_config(work: Path, tree: Path, endpoint: str) -> Path:
    text = CONFIG_TEMPLATE.format(
        vehicle_id=VEHICLE_ID, tree=tree, bucket=BUCKET, endpoint=endpoint, work=work
    )
    path = work / "config.yaml"
    path.write_text(text)
    return path


def start_log_tree(tree: Path, seconds: float) -> subprocess.Popen[bytes] | threading.Thread:
    if SIMULATOR.exists():
        print(f"Animating a vehicle log tree with {SIMULATOR}")
        return subprocess.Popen(
            [
                sys.executable,
                str(SIMULATOR),
                "--root",
                str(tree),
                "--duration",
                str(int(seconds * 10)),
                "--speed",
                "10",
                "--session-seconds",
                "120",
                "--quiet",
                "--manifest",
                str(tree.parent / "manifest.json"),
            ]
        )

    print("../shared is absent: writing a small built-in sample log tree")
    thread = threading.Thread(target=write_sample_tree, args=(tree, seconds), daemon=True)
    thread.start()
    return thread


def write_sample_tree(tree: Path, seconds: float) -> None:
    """Append lines to a few logs for ``seconds``, starting a new file every 10 s."""
    for name in ("ros/log", "bags", "terminal", "syslog"):
        (tree / name).mkdir(parents=True, exist_ok=True)

    deadline = time.monotonic() + seconds
    session = 0
    while time.monotonic() < deadline:
        session += 1
        session_dir = tree / "ros/log" / f"2026-12-04-09-00-{session:02d}-000000-demo-4242"
        session_dir.mkdir(parents=True, exist_ok=True)
        files = [
            session_dir / "launch.log",
            tree / "terminal" / f"terminal_20261204_0900{session:02d}.log",
            tree / "bags" / f"sample_{session}.bin",
        ]
        end = min(deadline, time.monotonic() + 10)
        line = 0
        while time.monotonic() < end:
            line += 1
            for path in files[:2]:
                with path.open("a") as handle:
                    handle.write(f"[INFO] [{time.time():.3f}] [demo_node]: line {line}\n")
            with files[2].open("ab") as handle:
                handle.write(os.urandom(4096))
            time.sleep(0.2)


def run_daemon(config: Path, seconds: float) -> None:
    tvm = shutil.which("tvm-upload", path=str(Path(sys.executable).parent)) or "tvm-upload"
    daemon = subprocess.Popen(
        [tvm, "run", "--config", str(config)], env=local_credentials_environment()
    )
    print(f"tvm-upload is running (PID {daemon.pid}) for {seconds:.0f} s ...")
    try:
        daemon.wait(timeout=seconds)
    except subprocess.TimeoutExpired:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
    print(f"tvm-upload exited with code {daemon.returncode}")


def show_results(config: Path, endpoint: str) -> None:
    tvm = shutil.which("tvm-upload", path=str(Path(sys.executable).parent)) or "tvm-upload"
    print("\n$ tvm-upload status --config", config)
    subprocess.run(
        [tvm, "status", "--config", str(config)], check=False, env=local_credentials_environment()
    )

    print(f"\nObjects in s3://{BUCKET}:")
    client = s3_client(endpoint)
    total = 0
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for item in page.get("Contents", []):
            total += 1
            print(f"  {item['Size']:>10}  {item['Key']}")
    print(f"{total} objects")


def stop_log_tree(writer: subprocess.Popen[bytes] | threading.Thread) -> None:
    if isinstance(writer, subprocess.Popen):
        if writer.poll() is None:
            writer.send_signal(signal.SIGTERM)
        writer.wait(timeout=30)
    else:
        writer.join(timeout=15)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the daemon runs")
    args = parser.parse_args()

    work = REPO / ".demo"
    shutil.rmtree(work, ignore_errors=True)
    tree = work / "vehicle"
    tree.mkdir(parents=True)

    server = SeaweedServer(data_dir=work / "seaweed")
    print("Starting SeaweedFS on 127.0.0.1 ...")
    server.start()
    writer = None
    try:
        create_bucket(server.endpoint_url, BUCKET)
        config = write_config(work, tree, server.endpoint_url)
        writer = start_log_tree(tree, args.seconds)
        run_daemon(config, args.seconds)
        show_results(config, server.endpoint_url)
    finally:
        if writer is not None:
            stop_log_tree(writer)
        server.stop()
        print("Stopped SeaweedFS and the log writer.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
