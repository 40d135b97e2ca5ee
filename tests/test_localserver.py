"""``python -m tvm_upload.localserver`` as a real process: start, print, serve, stop on SIGTERM."""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tvm_upload.config import parse_config
from tvm_upload.localserver import s3_client

STARTUP_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 15.0
ENDPOINT_LINE = re.compile(r"^SeaweedFS S3 endpoint: (http://127\.0\.0\.1:\d+) \(PID (\d+)\)$")


class RunningServer:
    """The module run as a subprocess, with its stdout lines collected by a reader thread.

    Its stderr goes to ``stderr_path``, so a chatty server cannot fill a pipe.
    """

    def __init__(self, stderr_path: Path, *args: str) -> None:
        self.stderr_path = stderr_path
        with stderr_path.open("w") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tvm_upload.localserver", *args],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
            )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def read_until(self, pattern: str, timeout_seconds: float) -> list[str]:
        """Return the lines up to and including the first one containing ``pattern``."""
        deadline = time.monotonic() + timeout_seconds
        start = len(self.seen)
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            if pattern in line:
                return self.seen[start:]
        stderr = self.stderr_path.read_text()
        raise AssertionError(f"no line with {pattern!r}; stdout {self.seen}, stderr {stderr!r}")

    def weed_pid(self) -> int | None:
        for line in self.seen:
            found = ENDPOINT_LINE.match(line)
            if found is not None:
                return int(found.group(2))
        return None

    def stop(self) -> None:
        """Stop the module by SIGTERM; if it hangs, kill it and the server by their PIDs."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_SECONDS)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

        weed_pid = self.weed_pid()
        if weed_pid is not None and process_exists(weed_pid):
            os.kill(weed_pid, signal.SIGKILL)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    running = RunningServer(
        tmp_path / "stderr.txt",
        "--data",
        str(tmp_path / "data"),
        "--bucket",
        "logs-a",
        "--bucket",
        "logs-b",
    )
    yield running
    running.stop()


def process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def endpoint_answers(endpoint: str) -> bool:
    try:
        with urllib.request.urlopen(endpoint + "/", timeout=2):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def test_main_serves_until_sigterm(server: RunningServer, tmp_path: Path) -> None:
    # Given the module started with two buckets.
    printed = server.read_until("to stop the server", STARTUP_TIMEOUT_SECONDS)
    found = ENDPOINT_LINE.match(printed[0])
    assert found is not None, printed
    endpoint, weed_pid = found.group(1), int(found.group(2))

    # When an object is uploaded with boto3.
    client = s3_client(endpoint)
    client.put_object(Bucket="logs-b", Key="vehicle/a.log", Body=b"line\n")

    # Then both buckets exist and the object is there.
    assert client.head_bucket(Bucket="logs-a")["ResponseMetadata"]["HTTPStatusCode"] == 200
    assert client.get_object(Bucket="logs-b", Key="vehicle/a.log")["Body"].read() == b"line\n"

    # When SIGTERM arrives, then the module exits 0 and the server is gone.
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(STOP_TIMEOUT_SECONDS) == 0
    assert server.read_until("Stopped SeaweedFS", 1.0)[-1] == f"Stopped SeaweedFS (PID {weed_pid})."
    assert not process_exists(weed_pid)
    assert not endpoint_answers(endpoint)


def test_main_prints_valid_config_snippet(server: RunningServer, tmp_path: Path) -> None:
    printed = "\n".join(server.read_until("to stop the server", STARTUP_TIMEOUT_SECONDS))
    endpoint = printed.split("SeaweedFS S3 endpoint: ", 1)[1].split(" ", 1)[0]
    snippet = printed[printed.index("\ns3:\n") : printed.index("\n\nPress")]

    data = yaml.safe_load(snippet)
    data["vehicle_id"] = "vehicle-1"
    data["log_directories"] = [{"path": str(tmp_path / "logs"), "source": "ros"}]
    config = parse_config(data, environ={})

    assert config.s3.bucket == "logs-a"
    assert config.s3.endpoint_url == endpoint
    assert "export AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local" in printed


def run_module(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tvm_upload.localserver", *args],
        capture_output=True,
        text=True,
        timeout=STARTUP_TIMEOUT_SECONDS,
        check=False,
    )


def test_main_rejects_invalid_bucket(tmp_path: Path) -> None:
    result = run_module("--data", str(tmp_path / "data"), "--bucket", "Not_A_Bucket")

    assert result.returncode == 2
    assert "invalid bucket name 'Not_A_Bucket'" in result.stderr
    assert not (tmp_path / "data").exists()


def test_main_rejects_taken_port(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]

        result = run_module("--data", str(tmp_path / "data"), "--port", str(port))

    assert result.returncode == 1
    assert f"port {port} or its gRPC port" in result.stderr
    assert "Stopped SeaweedFS" not in result.stdout
