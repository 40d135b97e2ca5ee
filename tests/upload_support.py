"""Helpers shared by the uploader tests: settings for the SeaweedFS fixture and log files."""

from __future__ import annotations

import hashlib
import itertools
import os
import random
from pathlib import Path
from typing import Any

from tvm_upload.files import FileIdentity
from tvm_upload.localserver import create_bucket
from tvm_upload.s3client import UploaderSettings
from tvm_upload.uploader import Uploader, UploadRequest

MiB = 1024 * 1024


def settings_for(endpoint_url: str, bucket: str, **overrides: Any) -> UploaderSettings:
    """Settings for the local server: 5 MiB threshold and parts, so multipart tests stay fast."""
    values: dict[str, Any] = {
        "bucket": bucket,
        "region": "us-east-1",
        "endpoint_url": endpoint_url,
        "addressing_style": "path",
        "multipart_threshold_bytes": 5 * MiB,
        "min_part_size_bytes": 5 * MiB,
        "max_request_attempts": 1,
        "connect_timeout_seconds": 5.0,
        "read_timeout_seconds": 30.0,
    }
    values.update(overrides)
    return UploaderSettings(**values)


def make_uploader(
    endpoint_url: str, bucket: str, *, parts_in_flight: int | None = None, **overrides: Any
) -> Uploader:
    """An uploader for the local server; ``parts_in_flight=1`` sends parts one by one, in order."""
    settings = settings_for(endpoint_url, bucket, **overrides)
    if parts_in_flight is None:
        return Uploader(settings)
    return Uploader(settings, parts_in_flight=parts_in_flight)


def write_log(directory: Path, name: str, size: int, seed: int = 0) -> Path:
    """Write ``size`` bytes of reproducible pseudo-random content to ``directory/name``."""
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(random.Random(os.fsencode(name) + bytes([seed])).randbytes(size))
    return path


def request_for(path: Path, key: str, source: str = "ros") -> UploadRequest:
    return UploadRequest(
        path=path,
        object_key=key,
        identity=FileIdentity.of(path),
        source=source,
        vehicle_id="vehicle-001",
    )


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def object_sha256(s3: Any, bucket: str, key: str) -> str:
    body = s3.get_object(Bucket=bucket, Key=key)["Body"]
    digest = hashlib.sha256()
    for chunk in iter(lambda: body.read(MiB), b""):
        digest.update(chunk)
    return digest.hexdigest()


def open_uploads(s3: Any, bucket: str, prefix: str) -> list[dict[str, Any]]:
    response = s3.list_multipart_uploads(Bucket=bucket, Prefix=prefix)
    return response.get("Uploads", [])  # type: ignore[no-any-return]


def object_keys(s3: Any, bucket: str, prefix: str) -> list[str]:
    response = s3.list_objects_v2(Bucket=bucket, Prefix=prefix)
    return [item["Key"] for item in response.get("Contents", [])]


def touch_ahead(path: Path) -> None:
    """Change a file's mtime without changing its content."""
    status = os.stat(path)
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns + 1_000_000_000))


_prefix_numbers = itertools.count(1)


def unique_prefix() -> str:
    """A key prefix of its own for one test inside a bucket shared by a test module."""
    return f"t{os.getpid()}-{next(_prefix_numbers)}/"


def module_bucket(endpoint_url: str, module: str) -> str:
    """Create one bucket for a whole test module.

    Each SeaweedFS bucket is a collection that reserves several volumes, so a bucket
    per test would exhaust the session server's volume limit.
    """
    name = f"{module}-{os.getpid()}"
    create_bucket(endpoint_url, name)
    return name
