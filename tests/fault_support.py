"""Helpers for the fault tests: a daemon child behind the fault proxy, and what it left behind."""

from __future__ import annotations

import os
import re
import sqlite3
from collections import Counter
from collections.abc import Mapping
from contextlib import closing
from pathlib import Path
from typing import Any

from daemon_process import DaemonProcess, write_config
from faultproxy import FaultProxy

MiB = 1024 * 1024

FAST_RETRY = {"initial_delay_seconds": 0.2, "max_delay_seconds": 2}


def start_daemon(
    tmp_path: Path,
    endpoint_url: str,
    bucket: str,
    logs: Path,
    **overrides: Any,
) -> DaemonProcess:
    """Start ``tvm-upload run`` against ``endpoint_url`` (a fault proxy), watching ``logs``.

    Uploads go straight on (batch upload, no window) with retry delays of 0.2 to 2 s.
    ``overrides`` are merged into the top-level sections of the test configuration.
    """
    upload = {"retry": FAST_RETRY, **overrides.pop("upload", {})}
    config = write_config(
        tmp_path,
        endpoint_url,
        bucket,
        [{"path": logs, "source": "logs"}],
        upload=upload,
        **overrides,
    )
    return DaemonProcess(config, tmp_path / "daemon.log").start()


def write_file(path: Path, size: int) -> bytes:
    """Write ``size`` random bytes to ``path`` and return them."""
    data = os.urandom(size)
    path.write_bytes(data)
    return data


def put_only(method: str, path: str, headers: Mapping[str, str]) -> bool:
    """Fault matcher for PUT requests: PutObject and UploadPart, never HEAD or listings."""
    return method == "PUT"


def rows(state_file: Path) -> dict[str, dict[str, Any]]:
    """Return the ``files`` rows of a state store by base name, read without changing it."""
    uri = f"{state_file.absolute().as_uri()}?mode=ro"
    # sqlite3's context manager only commits; an open connection would keep the
    # daemon's WAL file from being removed at its close.
    with closing(sqlite3.connect(uri, uri=True, timeout=10)) as conn:
        conn.row_factory = sqlite3.Row
        found = conn.execute("SELECT path, state, attempts, sha256 FROM files").fetchall()
    return {Path(row["path"]).name: dict(row) for row in found}


def all_uploaded(state_file: Path, names: set[str]) -> bool:
    """Tell whether every named file has an ``uploaded`` row.

    False while the store is missing, being created, or not yet moved aside after damage.
    """
    try:
        found = rows(state_file)
    except sqlite3.Error:
        return False
    return all(found.get(name, {}).get("state") == "uploaded" for name in names)


def log_lines(log: str, level: str, text: str = "") -> list[str]:
    """Return the log lines at ``level`` (``ERROR``, ``WARNING``...) that contain ``text``."""
    return [line for line in log.splitlines() if f" {level} " in line and text in line]


def uploaded_names(log: str) -> Counter[str]:
    """Count the ``Uploaded <path> to <key>`` lines per file base name."""
    names = re.findall(r" Uploaded (\S+) to ", log)
    return Counter(Path(name).name for name in names)


def completed_writes(proxy: FaultProxy, bucket: str) -> Counter[str]:
    """Count the writes the store confirmed per object key.

    A write is a PutObject or a CompleteMultipartUpload that got status 200; a part
    upload or a request cut short is no write.
    """
    writes: Counter[str] = Counter()
    prefix = f"/{bucket}/"
    for record in proxy.records:
        if record.status != 200 or not record.path.startswith(prefix):
            continue
        put_object = record.method == "PUT" and not record.is_upload_part
        complete_upload = record.method == "POST" and "uploadId=" in record.query
        if put_object or complete_upload:
            writes[record.path[len(prefix) :]] += 1
    return writes


def data_requests(proxy: FaultProxy) -> list[tuple[str, str, str]]:
    """Return every request that sends object data or starts or ends a multipart upload."""
    return [
        (method, path, query) for method, path, query in proxy.requests if method in ("PUT", "POST")
    ]
