"""Run the daemon against a live vehicle log tree and check the bucket afterwards.

The vehicle simulator (../shared/tools/vehicle_sim.py) animates a log tree
for the given time while the daemon uploads it to a local SeaweedFS. Then
the simulator closes its files, the daemon drains the queue and stops, and
the bucket is compared with the simulator's manifest:

- every finished file is in the bucket exactly once, with matching SHA-256;
- every object's bytes match its ``sha256`` metadata (nothing partial);
- ``tvm-upload status`` counts as many uploaded files and bytes as the bucket holds.

Exit code 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tvm_upload.keys import unescape_key
from tvm_upload.localserver import (
    SeaweedServer,
    create_bucket,
    local_credentials_environment,
    s3_client,
)

REPO = Path(__file__).resolve().parents[1]
SIMULATOR = REPO.parent / "shared" / "tools" / "vehicle_sim.py"
BUCKET = "soak"
SOURCES = {"ros": "ros/log", "bags": "bags", "terminal": "terminal", "syslog": "syslog"}

CONFIG = """\
vehicle_id: soak-vehicle
timezone: UTC
log_directories:
{directories}
s3:
  bucket: {bucket}
  region: cn-north-1
  endpoint_url: {endpoint}
upload:
  file_stable_seconds: 3
  max_concurrency: 4
  reconcile_interval_seconds: 60
state_file: {work}/state.db
deletion:
  after_upload:
    enabled: false
  emergency:
    enabled: false
"""


@dataclass
class SoakReport:
    """Result of one soak run: counts and every problem found."""

    finished_files: int = 0
    objects: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _write_config(work: Path, tree: Path, endpoint: str) -> Path:
    directories = "\n".join(
        f"  - path: {tree / relative}\n    source: {source}" for source, relative in SOURCES.items()
    )
    path = work / "config.yaml"
    path.write_text(
        CONFIG.format(directories=directories, bucket=BUCKET, endpoint=endpoint, work=work)
    )
    return path


def _status(config: Path) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-m", "tvm_upload", "status", "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    return dict(json.loads(result.stdout))


def _wait_for_drain(config: Path, timeout_seconds: float) -> None:
    deadline = time.monotonic() + timeout_seconds
    quiet_since: float | None = None
    while time.monotonic() < deadline:
        report = _status(config)
        idle = report["pending"]["count"] == 0 and report["uploading"]["count"] == 0
        if idle and quiet_since is None:
            quiet_since = time.monotonic()
        elif not idle:
            quiet_since = None
        if quiet_since is not None and time.monotonic() - quiet_since > 10:
            return
        time.sleep(1)


def _bucket_objects(endpoint: str) -> dict[str, tuple[bytes, dict[str, str]]]:
    client = s3_client(endpoint)
    objects = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
        for item in page.get("Contents", []):
            response = client.get_object(Bucket=BUCKET, Key=item["Key"])
            objects[item["Key"]] = (response["Body"].read(), response.get("Metadata", {}))
    return objects


def _tree_relative(key: str) -> str:
    """Map an object key back to the path relative to the simulator's root."""
    _, _, source, rest = key.split("/", 3)
    return f"{SOURCES[source]}/{unescape_key(rest)}"


def check(
    manifest: dict[str, Any],
    objects: dict[str, tuple[bytes, dict[str, str]]],
    status: dict[str, Any],
) -> SoakReport:
    """Compare the simulator's manifest and the daemon's status with the bucket."""
    report = SoakReport(objects=len(objects))
    by_path: dict[str, list[str]] = {}
    for key, (body, metadata) in objects.items():
        by_path.setdefault(_tree_relative(key), []).append(key)
        if hashlib.sha256(body).hexdigest() != metadata.get("sha256"):
            report.problems.append(f"object {key} does not match its sha256 metadata")

    for entry in manifest["finished"]:
        if not any(entry["path"].startswith(relative + "/") for relative in SOURCES.values()):
            continue
        report.finished_files += 1
        keys = by_path.get(entry["path"], [])
        if len(keys) != 1:
            report.problems.append(f"{entry['path']} is in the bucket {len(keys)} times")
            continue
        body, _ = objects[keys[0]]
        if hashlib.sha256(body).hexdigest() != entry["sha256"]:
            report.problems.append(f"{entry['path']} differs from its object {keys[0]}")

    bucket_bytes = sum(len(body) for body, _ in objects.values())
    if status["uploaded"]["count"] != len(objects):
        report.problems.append(
            f"status counts {status['uploaded']['count']} uploaded files, the bucket holds {len(objects)}"
        )
    if status["uploaded"]["bytes"] != bucket_bytes:
        report.problems.append(
            f"status counts {status['uploaded']['bytes']} uploaded bytes, the bucket holds {bucket_bytes}"
        )
    return report


def run_soak(minutes: float, work: Path, speed: float = 1.0) -> SoakReport:
    """Run simulator and daemon for ``minutes``, drain, and check the bucket."""
    shutil.rmtree(work, ignore_errors=True)
    tree = work / "vehicle"
    tree.mkdir(parents=True)
    server = SeaweedServer(data_dir=work / "seaweed")
    server.start()
    try:
        create_bucket(server.endpoint_url, BUCKET)
        config = _write_config(work, tree, server.endpoint_url)
        log = (work / "daemon.log").open("wb")
        daemon = subprocess.Popen(
            [sys.executable, "-m", "tvm_upload", "run", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=local_credentials_environment(),
        )
        manifest_path = work / "manifest.json"
        subprocess.run(
            [
                sys.executable,
                str(SIMULATOR),
                "--root",
                str(tree),
                "--duration",
                str(minutes * 60 * speed),
                "--speed",
                str(speed),
                "--finalize",
                "--quiet",
                "--manifest",
                str(manifest_path),
            ],
            check=True,
        )
        _wait_for_drain(config, timeout_seconds=300)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(timeout=30)
        log.close()

        manifest = json.loads(manifest_path.read_text())
        return check(manifest, _bucket_objects(server.endpoint_url), _status(config))
    finally:
        server.stop()


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Soak-test tvm-upload against a live vehicle log tree."
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the simulator writes")
    parser.add_argument(
        "--speed", type=float, default=1.0, help="simulated seconds per wall-clock second"
    )
    parser.add_argument(
        "--work", type=Path, default=REPO / ".soak", help="work directory (erased first)"
    )
    args = parser.parse_args()
    if not SIMULATOR.exists():
        print(f"{SIMULATOR} not found: the soak test needs ../shared", file=sys.stderr)
        return 2

    report = run_soak(args.minutes, args.work, args.speed)
    print(f"{report.finished_files} finished files checked, {report.objects} objects in the bucket")
    for problem in report.problems:
        print(f"PROBLEM: {problem}")
    print("soak passed" if report.ok else "soak FAILED")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
