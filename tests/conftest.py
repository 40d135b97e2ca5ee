"""Shared fixtures: a real SeaweedFS S3 server on 127.0.0.1 for the whole session."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tvm_upload.localserver import SeaweedServer, create_bucket, s3_client

SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"

_bucket_numbers = itertools.count(1)


@pytest.fixture(scope="session")
def seaweed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedServer]:
    """Start one SeaweedFS server for the test session and stop it by its PID."""
    server = SeaweedServer(data_dir=tmp_path_factory.mktemp("seaweed"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def bucket(seaweed: SeaweedServer) -> str:
    """Create a fresh, empty bucket for one test."""
    name = f"test-{os.getpid()}-{next(_bucket_numbers)}"
    create_bucket(seaweed.endpoint_url, name)
    return name


@pytest.fixture
def s3(seaweed: SeaweedServer):  # type: ignore[no-untyped-def]
    """A plain boto3 client for checking what reached the bucket."""
    return s3_client(seaweed.endpoint_url)


@pytest.fixture(autouse=True)
def aws_test_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Give botocore throwaway credentials and keep it away from ~/.aws and metadata hosts."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "local")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "local-secret")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared sample data and vehicle simulator; tests that need it skip without it."""
    if not (SHARED_DIR / "tools" / "vehicle_sim.py").exists():
        pytest.skip("../shared (sample data and vehicle_sim.py) is not present")
    return SHARED_DIR
