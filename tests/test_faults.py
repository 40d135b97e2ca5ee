"""Error handling under faults: the real daemon child uploads through the fault proxy.

Each test starts ``tvm-upload run`` with its endpoint at a ``FaultProxy`` in front of
the SeaweedFS fixture, injects one kind of fault, and checks the log, the state store
and what reached the bucket.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from daemon_process import bucket_contents, sha256_of, wait_for
from fault_support import (
    MiB,
    all_uploaded,
    completed_writes,
    log_lines,
    put_only,
    rows,
    start_daemon,
    uploaded_names,
    write_file,
)
from faultproxy import FaultProxy

from tvm_upload.localserver import SeaweedServer
from tvm_upload.s3client import TEST_READ_TIMEOUT_VARIABLE, S3RequestError, UploaderSettings
from tvm_upload.uploader import Uploader


@pytest.fixture
def proxy(seaweed: SeaweedServer) -> Iterator[FaultProxy]:
    with FaultProxy(seaweed.endpoint_url) as running:
        yield running


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    root = tmp_path / "logs"
    root.mkdir()
    return root


def write_files(logs: Path, count: int, size: int = 50_000) -> dict[str, bytes]:
    return {f"f{n}.log": write_file(logs / f"f{n}.log", size) for n in range(count)}


def contents_by_name(s3: Any, bucket: str) -> dict[str, bytes]:
    return {key.rsplit("/", 1)[-1]: body for key, body in bucket_contents(s3, bucket).items()}


QUEUE_ERRORS = [
    (403, "AccessDenied"),
    (404, "NoSuchBucket"),
    (403, "InvalidAccessKeyId"),
    (403, "SignatureDoesNotMatch"),
    (403, "RequestTimeTooSkewed"),
]


@pytest.mark.parametrize(("status", "code"), QUEUE_ERRORS)
def test_queue_error_pauses_without_charging(
    tmp_path: Path, proxy: FaultProxy, bucket: str, s3: Any, logs: Path, status: int, code: str
) -> None:
    """Given every PUT rejected with a queue-wide error, no file is charged, and uploads
    resume once the store accepts them again."""
    files = write_files(logs, 3)
    proxy.respond_error(status, code, times=10_000, match=put_only)

    with start_daemon(tmp_path, proxy.endpoint_url, bucket, logs) as daemon:
        wait_for(lambda: len(log_lines(daemon.log, "WARNING", "still paused")) >= 2, 20, "pauses")
        state = rows(tmp_path / "state" / "state.db")
        proxy.clear_faults()
        wait_for(lambda: len(bucket_contents(s3, bucket)) == 3, 20, "uploads resumed")
        wait_for(lambda: all_uploaded(tmp_path / "state" / "state.db", set(files)), 10, "rows")
        assert daemon.stop() == 0

    errors = log_lines(daemon.log, "ERROR")
    assert len(errors) == 1, errors
    assert "Paused all uploads" in errors[0]
    assert code in errors[0]
    assert "Next try in" in errors[0]
    assert all(code in line for line in log_lines(daemon.log, "WARNING", "still paused"))
    assert [row["attempts"] for row in state.values()] == [0, 0, 0]
    assert {row["state"] for row in state.values()} <= {"pending", "uploading"}
    assert [row["attempts"] for row in rows(tmp_path / "state" / "state.db").values()] == [0] * 3
    assert contents_by_name(s3, bucket) == files


def test_bare_403_on_head_pauses_with_advice(
    tmp_path: Path, proxy: FaultProxy, bucket: str, s3: Any, logs: Path
) -> None:
    """A HEAD gets a 403 without an error code, as from S3, so the advice covers every cause.

    The files are queued by a first daemon that never reaches the store, so the
    second one checks for an existing object with a HEAD before sending.
    """
    files = write_files(logs, 2)
    proxy.cut(refuse_connections=True)
    with start_daemon(tmp_path, proxy.endpoint_url, bucket, logs) as first:
        wait_for(lambda: log_lines(first.log, "ERROR", "Paused all uploads"), 20, "first pause")
        assert first.stop() == 0
    proxy.restore()
    (tmp_path / "daemon.log").rename(tmp_path / "first-daemon.log")
    proxy.respond_error(403, "InvalidAccessKeyId", times=10_000)

    with start_daemon(tmp_path, proxy.endpoint_url, bucket, logs) as daemon:
        wait_for(lambda: log_lines(daemon.log, "ERROR", "Paused all uploads"), 20, "pause")
        proxy.clear_faults()
        wait_for(lambda: len(bucket_contents(s3, bucket)) == 2, 20, "uploads resumed")

    error = log_lines(daemon.log, "ERROR")[0]
    assert "HeadObject failed with 403" in error
    assert "credentials" in error
    assert "system clock" in error
    assert contents_by_name(s3, bucket) == files


def test_unreachable_endpoint_pauses_then_resumes(
    tmp_path: Path, proxy: FaultProxy, bucket: str, s3: Any, logs: Path
) -> None:
    files = write_files(logs, 3)
    proxy.cut(refuse_connections=True)

    with start_daemon(tmp_path, proxy.endpoint_url, bucket, logs) as daemon:
        wait_for(lambda: len(log_lines(daemon.log, "WARNING", "still paused")) >= 2, 20, "pauses")
        proxy.restore()
        wait_for(lambda: all_uploaded(tmp_path / "state" / "state.db", set(files)), 20, "uploads")

    errors = log_lines(daemon.log, "ERROR")
    assert len(errors) == 1, errors
    assert "S3 endpoint unreachable" in errors[0]
    assert "Next try in" in errors[0]
    assert [row["attempts"] for row in rows(tmp_path / "state" / "state.db").values()] == [0] * 3
    assert contents_by_name(s3, bucket) == files


def test_slow_down_storm_slows_instead_of_failing(
    tmp_path: Path, proxy: FaultProxy, bucket: str, s3: Any, logs: Path
) -> None:
    files = write_files(logs, 6)
    proxy.respond_error(503, "SlowDown", times=20)

    with start_daemon(
        tmp_path, proxy.endpoint_url, bucket, logs, upload={"max_attempts": 2}
    ) as daemon:
        wait_for(lambda: all_uploaded(tmp_path / "state" / "state.db", set(files)), 20, "uploads")

    throttled = [record for record in proxy.records if record.status == 503]
    assert len(throttled) == 20
    assert log_lines(daemon.log, "ERROR") == []
    assert log_lines(daemon.log, "WARNING", "SlowDown")
    assert [row["attempts"] for row in rows(tmp_path / "state" / "state.db").values()] == [0] * 6
    assert contents_by_name(s3, bucket) == files


def test_connection_resets_upload_each_file_once(
    tmp_path: Path, proxy: FaultProxy, bucket: str, s3: Any, logs: Path
) -> None:
    files = write_files(logs, 3, size=300_000)
    files["big.bag"] = write_file(logs / "big.bag", 6 * MiB)
    proxy.close_mid_body(after_bytes=100_000, times=6, match=put_only)

    overrides = {"upload": {"multipart_threshold_mb": 5}}
    with start_daemon(tmp_path, proxy.endpoint_url, bucket, logs, **overrides) as daemon:
        wait_for(lambda: all_uploaded(tmp_path / "state" / "state.db", set(files)), 30, "uploads")

    cut = [record for record in proxy.records if record.fault == "close_mid_body"]
    assert len(cut) == 6
    assert sorted(completed_writes(proxy, bucket).values()) == [1, 1, 1, 1]
    assert uploaded_names(daemon.log) == {name: 1 for name in files}
    assert contents_by_name(s3, bucket) == files


def test_stalled_server_times_out_and_retries(
    tmp_path: Path,
    proxy: FaultProxy,
    bucket: str,
    s3: Any,
    logs: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(TEST_READ_TIMEOUT_VARIABLE, "1")
    files = write_files(logs, 2)
    proxy.stall(4, times=3, match=put_only)

    with start_daemon(tmp_path, proxy.endpoint_url, bucket, logs) as daemon:
        wait_for(lambda: all_uploaded(tmp_path / "state" / "state.db", set(files)), 20, "uploads")

    stalled = [record for record in proxy.records if record.fault == "stall"]
    assert len(stalled) == 3
    assert sorted(completed_writes(proxy, bucket).values()) == [1, 1]
    assert uploaded_names(daemon.log) == {name: 1 for name in files}
    assert contents_by_name(s3, bucket) == files


@pytest.mark.parametrize("attempts", [1, 3])
def test_botocore_sends_max_request_attempts(proxy: FaultProxy, bucket: str, attempts: int) -> None:
    settings = UploaderSettings(
        bucket=bucket,
        region="us-east-1",
        endpoint_url=proxy.endpoint_url,
        addressing_style="path",
        max_request_attempts=attempts,
    )
    proxy.respond_error(500, "InternalError", times=10)

    with pytest.raises(S3RequestError):
        Uploader(settings).head_sha256("any/key.log")

    assert len(proxy.records) == attempts


def change_after_first_part(path: Path, change: str, big: bytes) -> tuple[Any, bytes]:
    """Return a fault matcher that changes ``path`` when its first part arrives, and the
    file's final content.

    The matcher never selects a fault. It runs in the proxy thread before the first
    UploadPart is forwarded, so the uploader is then between parts.
    """
    final = {
        "truncate": big[: 3 * MiB],
        "append": big + b"appended line\n",
        "replace": os.urandom(len(big)),
        "overwrite": big[: 11 * MiB] + os.urandom(len(big) - 11 * MiB),
    }[change]
    changed = threading.Event()

    def apply_change() -> None:
        if change == "truncate":
            os.truncate(path, len(final))
        elif change == "append":
            with path.open("ab") as handle:
                handle.write(final[len(big) :])
        elif change == "replace":
            replacement = path.with_name(path.name + ".new")
            replacement.write_bytes(final)
            os.replace(replacement, path)
        else:
            with path.open("r+b") as handle:
                handle.seek(11 * MiB)
                handle.write(final[11 * MiB :])

    def matcher(method: str, request_path: str, headers: Mapping[str, str]) -> bool:
        if method == "PUT" and request_path.endswith(path.name) and not changed.is_set():
            changed.set()
            apply_change()
        return False

    return matcher, final


@pytest.mark.parametrize("change", ["truncate", "append", "replace", "overwrite"])
def test_file_changed_during_upload(
    tmp_path: Path, proxy: FaultProxy, bucket: str, s3: Any, logs: Path, change: str
) -> None:
    """Given a 12 MiB file sent in 5 MiB parts that changes after its first part, only its
    final content is recorded as uploaded, once, and the bucket ends with it."""
    path = logs / "drive.bag"
    big = write_file(path, 12 * MiB + 1000)
    matcher, final = change_after_first_part(path, change, big)
    proxy.respond_error(500, "NeverSent", match=matcher)

    overrides = {"upload": {"multipart_threshold_mb": 5}}
    with start_daemon(tmp_path, proxy.endpoint_url, bucket, logs, **overrides) as daemon:
        wait_for(lambda: all_uploaded(tmp_path / "state" / "state.db", {path.name}), 30, "upload")
        assert daemon.stop() == 0

    row = rows(tmp_path / "state" / "state.db")[path.name]
    assert row["sha256"] == sha256_of(final)
    assert uploaded_names(daemon.log) == {path.name: 1}
    assert sum(completed_writes(proxy, bucket).values()) == 1
    assert log_lines(daemon.log, "INFO", "changed during upload")
    assert contents_by_name(s3, bucket) == {path.name: final}


def test_clock_skew_warns_and_uploads(
    tmp_path: Path, proxy: FaultProxy, bucket: str, s3: Any, logs: Path
) -> None:
    """Given the store's Date 20 minutes behind, uploads succeed and one WARNING names it."""
    files = write_files(logs, 3)
    proxy.wrong_date(-1200, times=10_000)

    with start_daemon(tmp_path, proxy.endpoint_url, bucket, logs) as daemon:
        wait_for(lambda: all_uploaded(tmp_path / "state" / "state.db", set(files)), 20, "uploads")

    warnings = log_lines(daemon.log, "WARNING", "Clock skew")
    assert len(warnings) == 1, warnings
    assert re.search(r"the system clock is 120[01] s \(20\.0 min\) ahead of", warnings[0])
    assert "RequestTimeTooSkewed" in warnings[0]
    assert contents_by_name(s3, bucket) == files


def test_request_time_too_skewed_names_skew_then_resumes(
    tmp_path: Path, proxy: FaultProxy, bucket: str, s3: Any, logs: Path
) -> None:
    """Given a store that rejects PUTs as too skewed and dates responses 20 minutes ahead,
    the ERROR names the measured skew. Once the clocks agree, uploads resume."""
    files = write_files(logs, 2)
    proxy.wrong_date(1200, times=10_000)
    proxy.respond_error(403, "RequestTimeTooSkewed", times=10_000, match=put_only)

    with start_daemon(tmp_path, proxy.endpoint_url, bucket, logs) as daemon:
        wait_for(lambda: log_lines(daemon.log, "ERROR", "Paused all uploads"), 20, "pause")
        proxy.clear_faults()
        wait_for(lambda: all_uploaded(tmp_path / "state" / "state.db", set(files)), 20, "uploads")
        wait_for(lambda: log_lines(daemon.log, "INFO", "agrees with"), 10, "clock agrees again")

    error = log_lines(daemon.log, "ERROR")[0]
    assert "RequestTimeTooSkewed" in error
    assert re.search(r"; the system clock is 1(199|200) s \(20\.0 min\) behind", error)
    assert len(log_lines(daemon.log, "WARNING", "Clock skew")) == 1
    assert [row["attempts"] for row in rows(tmp_path / "state" / "state.db").values()] == [0] * 2
    assert contents_by_name(s3, bucket) == files
