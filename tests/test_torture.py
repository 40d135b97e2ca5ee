"""Crash torture: the real daemon killed with SIGKILL again and again while it uploads.

Every run is reproducible from ``SEED``: the file sizes, when each file appears and
when each kill comes. The daemon sends through the fault proxy, which records every
request, so the test can tell what reached the store and how often.
"""

from __future__ import annotations

import collections
import hashlib
import os
import random
import re
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from daemon_process import DaemonProcess, bucket_contents, wait_for, write_config
from faultproxy import FaultProxy, RequestRecord

from tvm_upload.keys import unescape_key
from tvm_upload.localserver import SeaweedServer
from tvm_upload.state import StateStore

MiB = 1024 * 1024
PART_SIZE = 5 * MiB
SEED = 20261204
KILLS = 50
LARGE_FILES = 10
SMALL_FILES = 40
STARTUP_KILL_SHARE = 0.2
"""Share of kills that come during startup, before the daemon logs that it started."""
UPLOAD_KILL_SHARE = 0.4
"""Share of kills that come while an UploadPart request is in flight, if one comes soon."""
PART_WAIT_SECONDS = 2.0
MAX_WASTED_BYTES = 4 * PART_SIZE
"""Confirmed UploadPart bytes beyond the files' sizes that the test tolerates.

A part that S3 confirmed while the daemon was being killed is found by ListParts
and kept, so the expected waste is zero. With the parts journal turned off, each
interrupted upload starts over, and two runs of this plan wasted 93 and 156 MiB.
"""

_KEPT = re.compile(r"kept (\d+) of (\d+) parts already on the store")


@dataclass
class LogFileSpec:
    """A log file that appears in the watched directory before a given run."""

    name: str
    size: int
    run: int


@dataclass
class Torture:
    """The files, the runs of the daemon and what the fault proxy saw."""

    logs: Path
    config: Path
    runs_dir: Path
    rng: random.Random
    written: dict[str, str] = field(default_factory=dict)
    runs: list[DaemonProcess] = field(default_factory=list)
    kills_with_open_upload: int = 0

    def write(self, spec: LogFileSpec) -> None:
        """Write a log file atomically: the daemon detects it only when it is complete."""
        data = self.rng.randbytes(spec.size)
        temporary = self.logs / f".{spec.name}.tmp"
        temporary.write_bytes(data)
        os.rename(temporary, self.logs / spec.name)
        self.written[spec.name] = hashlib.sha256(data).hexdigest()

    def start(self) -> DaemonProcess:
        daemon = DaemonProcess(self.config, self.runs_dir / f"run-{len(self.runs):02d}.log")
        self.runs.append(daemon.start())
        return daemon

    def kill_at_random(self, proxy: FaultProxy) -> None:
        """Start the daemon and kill it at a moment drawn from ``rng``.

        The moment is during startup, a random 0.2 to 1.5 s after startup, or up to
        0.15 s after an UploadPart request began (or after PART_WAIT_SECONDS
        without one). Uploads on the loopback are fast, so the last kind makes sure
        that many kills interrupt a multipart upload.
        """
        seen = len(proxy.records)
        daemon = self.start()
        kind = self.rng.random()
        if kind < STARTUP_KILL_SHARE:
            time.sleep(self.rng.uniform(0.0, 1.0))
        elif kind < STARTUP_KILL_SHARE + UPLOAD_KILL_SHARE:
            self._wait_for_part(proxy, seen)
            time.sleep(self.rng.uniform(0.0, 0.15))
        else:
            wait_for(lambda: "Started:" in daemon.log, 30, "daemon started")
            time.sleep(self.rng.uniform(0.2, 1.5))
        daemon.kill()

    @staticmethod
    def _wait_for_part(proxy: FaultProxy, seen: int) -> None:
        deadline = time.monotonic() + PART_WAIT_SECONDS
        while time.monotonic() < deadline:
            if any(r.is_upload_part for r in proxy.records[seen:]):
                return
            time.sleep(0.01)

    @property
    def log(self) -> str:
        return "".join(run.log for run in self.runs)


def plan_files(rng: random.Random) -> list[LogFileSpec]:
    """Plan the log files: large ones above the multipart threshold, spread over the runs."""
    specs = [
        LogFileSpec(f"bag_{number:02d}.mcap", rng.randint(24 * MiB, 40 * MiB), run)
        for number, run in enumerate(sorted(rng.sample(range(KILLS - 5), LARGE_FILES)))
    ]
    specs += [
        LogFileSpec(f"node_{number:02d}.log", rng.randint(1, 300_000), rng.randrange(KILLS))
        for number in range(SMALL_FILES)
    ]
    return specs


def part_number(record: RequestRecord) -> int:
    return int(urllib.parse.parse_qs(record.query)["partNumber"][0])


def upload_id_of(record: RequestRecord) -> str:
    return urllib.parse.parse_qs(record.query)["uploadId"][0]


def stored_objects(records: list[RequestRecord]) -> collections.Counter[str]:
    """Count, per request path, the successful PutObject requests and completed upload ids.

    A CompleteMultipartUpload sent again for the same upload id sends no object data,
    so it counts once.
    """
    stored: collections.Counter[str] = collections.Counter()
    completed: set[tuple[str, str]] = set()
    for record in records:
        if record.status != 200:
            continue
        if record.method == "PUT" and not record.is_upload_part:
            stored[record.path] += 1
        elif record.method == "POST" and "uploadId=" in record.query:
            completed.add((record.path, upload_id_of(record)))
    stored.update(path for path, _ in completed)
    return stored


@pytest.mark.slow
def test_kill_torture(tmp_path: Path, seaweed: SeaweedServer, bucket: str, s3: Any) -> None:
    """Fifty kills at random moments lose nothing, store nothing twice and resume uploads.

    Given a stream of small and 24-40 MiB log files (5 MiB parts),
    when the daemon is killed with SIGKILL 50 times at random moments and restarted,
    then every file is in S3 once with its SHA-256 and no multipart upload is left open.
    Interrupted multipart uploads resumed instead of starting over.
    """
    rng = random.Random(SEED)
    logs = tmp_path / "logs"
    logs.mkdir()
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    specs = plan_files(rng)

    with FaultProxy(seaweed.endpoint_url) as proxy:
        config = write_config(
            tmp_path,
            proxy.endpoint_url,
            bucket,
            [{"path": logs, "source": "logs"}],
            upload={"multipart_threshold_mb": 5, "file_stable_seconds": 1},
        )
        torture = Torture(logs, config, runs_dir, rng)
        for run in range(KILLS):
            for spec in specs:
                if spec.run == run:
                    torture.write(spec)
            torture.kill_at_random(proxy)
            if s3.list_multipart_uploads(Bucket=bucket).get("Uploads"):
                torture.kills_with_open_upload += 1

        with torture.start() as final:
            wait_for(lambda: "Started:" in final.log, 30, "final daemon started")
            with StateStore(tmp_path / "state" / "state.db", read_only=True) as state:
                wait_for(
                    lambda: state.summary(time.time()).uploaded_count == len(specs),
                    90,
                    "every file recorded as uploaded",
                )
            assert final.stop() == 0
        records = proxy.records

    objects = {
        unescape_key(key.split("/", 3)[3]): hashlib.sha256(body).hexdigest()
        for key, body in bucket_contents(s3, bucket).items()
    }
    assert objects == torture.written
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    stored = stored_objects(records)
    assert len(stored) == len(specs)
    assert set(stored.values()) == {1}

    large_bytes = sum(spec.size for spec in specs if spec.size > PART_SIZE)
    confirmed = [r for r in records if r.is_upload_part and r.status == 200]
    created = sum(1 for r in records if r.method == "POST" and r.query == "uploads")
    kept_parts = [int(count) for count, _ in _KEPT.findall(torture.log)]
    assert torture.kills_with_open_upload >= 5
    assert sum(r.body_bytes for r in confirmed) - large_bytes <= MAX_WASTED_BYTES
    assert created <= LARGE_FILES + 2
    assert len([count for count in kept_parts if count > 0]) >= 3
