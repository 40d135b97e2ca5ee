"""Resumable uploads: the parts journal in the state store, the sweep, and expired credentials.

The dispatcher and uploader run in this process against the real SeaweedFS server,
mostly through the fault proxy. The restart test runs the real daemon process.
"""

from __future__ import annotations

import base64
import collections
import hashlib
import itertools
import logging
import os
import random
import time
import urllib.parse
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import crc32c
import pytest
from daemon_process import DaemonProcess, wait_for, write_config
from faultproxy import FaultProxy, RequestRecord
from upload_support import (
    MiB,
    file_sha256,
    make_uploader,
    object_sha256,
    open_uploads,
    write_log,
)

from tvm_upload.clock import SYSTEM_CLOCK
from tvm_upload.config import Config, parse_config
from tvm_upload.dispatcher import Dispatcher
from tvm_upload.files import FileIdentity
from tvm_upload.localserver import SeaweedServer, create_bucket, s3_client
from tvm_upload.multipart import UploadedPart
from tvm_upload.resume import StoreJournal
from tvm_upload.state import FileState, StateStore
from tvm_upload.uploader import Uploader

PART_SIZE = 5 * MiB
STEP_SECONDS = 0.02
OUTAGE_SECONDS = 3.5

_vehicle_numbers = itertools.count(1)


@pytest.fixture(scope="module")
def bucket(seaweed: SeaweedServer) -> str:
    """One bucket for the module; each test uses a vehicle id, and so a key prefix, of its own."""
    name = f"resume-{os.getpid()}"
    create_bucket(seaweed.endpoint_url, name)
    # SeaweedFS allocates the bucket's volumes at its first write, which can take
    # seconds: longer than the read timeouts that the outage tests rely on.
    s3_client(seaweed.endpoint_url).put_object(Bucket=name, Key="warm-up", Body=b"warm-up")
    return name


@pytest.fixture
def vehicle() -> str:
    return f"vehicle-{next(_vehicle_numbers)}"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    with StateStore(tmp_path / "state.db") as opened:
        yield opened


@pytest.fixture
def proxy(seaweed: SeaweedServer) -> Iterator[FaultProxy]:
    with FaultProxy(seaweed.endpoint_url) as running:
        yield running


def make_config(tmp_path: Path, vehicle: str, bucket: str, endpoint_url: str) -> Config:
    """A configuration with 5 MiB parts, short retry delays and room for many attempts."""
    data = {
        "vehicle_id": vehicle,
        "log_directories": [{"path": str(tmp_path / "bags"), "source": "bags"}],
        "s3": {"bucket": bucket, "region": "us-east-1", "endpoint_url": endpoint_url},
        "state_file": str(tmp_path / "state.db"),
        "upload": {
            "multipart_threshold_mb": 5,
            "max_attempts": 50,
            "retry": {"initial_delay_seconds": 0.2, "max_delay_seconds": 1},
        },
    }
    return parse_config(data, environ={"HOME": str(tmp_path)})


def proxy_uploader(endpoint_url: str, bucket: str, **overrides: Any) -> Uploader:
    """An uploader with short timeouts, so an outage of a few seconds fails several attempts."""
    settings = {
        "connect_timeout_seconds": 1.0,
        "read_timeout_seconds": 2.0,
        "max_request_attempts": 1,
        **overrides,
    }
    return make_uploader(endpoint_url, bucket, **settings)


class Harness:
    """A dispatcher and uploader on one state store, with the loop a test drives by hand."""

    def __init__(self, config: Config, store: StateStore, uploader: Uploader) -> None:
        self.store = store
        self.uploader = uploader
        self.dispatcher = Dispatcher(config, store, uploader, SYSTEM_CLOCK, rng=random.Random(7))

    def run_until(
        self,
        condition: Callable[[], bool],
        timeout: float,
        message: str,
    ) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out after {timeout} s: {message}"
            self.dispatcher.step()
            time.sleep(STEP_SECONDS)

    def upload_all(self, timeout: float = 30.0) -> None:
        self.dispatcher.request_drain()
        self.run_until(
            lambda: self.dispatcher.drains_finished == self.dispatcher.drain_requests,
            timeout,
            "queue drained",
        )

    def close(self) -> None:
        self.dispatcher.stop(grace_seconds=5.0)
        self.uploader.close()


def queue_file(store: StateStore, path: Path, vehicle: str) -> tuple[int, str]:
    """Queue a log file of source ``bags``; return its row id and object key."""
    key = f"{vehicle}/2026-12-04/bags/{path.name}"
    store.enqueue(path, "bags", FileIdentity.of(path), key)
    claimed = store.claim(time.time(), 1000)
    for record in claimed:
        store.release(record.id)
    return next(record.id for record in claimed if record.path == path), key


Matcher = Callable[[str, str, Mapping[str, str]], bool]


def part_put(path: Path, number: int) -> Matcher:
    """Return a proxy matcher for every UploadPart request that carries part ``number`` of ``path``.

    The part is recognised by its checksum header, CRC32C or SHA-256, so retries of
    other parts never count.
    """
    with path.open("rb") as handle:
        handle.seek((number - 1) * PART_SIZE)
        data = handle.read(PART_SIZE)
    checksums = {
        "x-amz-checksum-crc32c": base64.b64encode(crc32c.crc32c(data).to_bytes(4, "big")).decode(),
        "x-amz-checksum-sha256": base64.b64encode(hashlib.sha256(data).digest()).decode(),
    }

    def match(method: str, request_path: str, headers: Mapping[str, str]) -> bool:
        return method == "PUT" and any(
            headers.get(name) == value for name, value in checksums.items()
        )

    return match


class Outage:
    """A network outage that begins when the proxy picks one request and lasts some seconds.

    ``begin_with`` wraps a matcher: the request it accepts starts the outage. ``active``
    is a matcher for ``FaultProxy.stall`` that keeps every request unanswered during
    the outage. The client gets read timeouts, as on a link that lost its carrier.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.began: float | None = None

    def begin_with(self, matcher: Matcher) -> Matcher:
        def match(method: str, path: str, headers: Mapping[str, str]) -> bool:
            if not matcher(method, path, headers):
                return False
            self.began = time.monotonic()
            return True

        return match

    def active(self, method: str, path: str, headers: Mapping[str, str]) -> bool:
        return self.began is not None and time.monotonic() < self.began + self.seconds

    @property
    def over(self) -> bool:
        return self.began is not None and not self.active("", "", {})


def part_number(record: RequestRecord) -> int:
    return int(urllib.parse.parse_qs(record.query)["partNumber"][0])


def confirmed_parts(proxy: FaultProxy) -> collections.Counter[int]:
    """Count the UploadPart requests that the server confirmed, by part number."""
    return collections.Counter(
        part_number(r) for r in proxy.records if r.is_upload_part and r.status == 200
    )


def created_uploads(proxy: FaultProxy) -> int:
    """Count the CreateMultipartUpload requests."""
    return sum(1 for r in proxy.records if r.method == "POST" and r.query == "uploads")


def log_messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_journal_round_trip(store: StateStore, tmp_path: Path) -> None:
    path = write_log(tmp_path, "a.mcap", 100)
    file_id, _ = queue_file(store, path, "vehicle")
    identity = FileIdentity.of(path)
    journal = StoreJournal(store, file_id, identity)

    assert journal.existing() is None
    journal.start("upload-1", PART_SIZE)
    journal.part_done(1, '"etag-1"', "checksum-1", PART_SIZE)
    journal.part_done(2, '"etag-2"', None, 7)
    resumed = StoreJournal(store, file_id, identity)

    assert resumed.existing() == (
        "upload-1",
        PART_SIZE,
        [
            UploadedPart(1, '"etag-1"', "checksum-1", PART_SIZE),
            UploadedPart(2, '"etag-2"', None, 7),
        ],
    )
    assert store.open_upload_ids() == {"upload-1"}
    resumed.finished()
    assert store.get(file_id).upload_id is None  # type: ignore[union-attr]
    assert store.parts_for(file_id, "upload-1") == []
    assert store.open_upload_ids() == set()


def test_journal_of_row_claimed_without_upload_reads_nothing(
    store: StateStore, tmp_path: Path
) -> None:
    """Given a row that had no multipart upload when it was claimed, its journal returns
    no upload without a state store query, and it still records a new upload."""
    path = write_log(tmp_path, "a.mcap", 100)
    file_id, _ = queue_file(store, path, "vehicle")
    journal = StoreJournal(store, file_id, FileIdentity.of(path), may_have_upload=False)
    statements: list[str] = []
    store._connection().set_trace_callback(statements.append)

    assert journal.existing() is None
    assert statements == []

    journal.start("upload-1", PART_SIZE)
    assert store.open_upload_ids() == {"upload-1"}


def test_journal_finish_keeps_newer_upload(store: StateStore, tmp_path: Path) -> None:
    path = write_log(tmp_path, "a.mcap", 100)
    file_id, _ = queue_file(store, path, "vehicle")
    older = StoreJournal(store, file_id, FileIdentity.of(path))
    newer = StoreJournal(store, file_id, FileIdentity.of(path))
    older.start("upload-1", PART_SIZE)
    newer.start("upload-2", PART_SIZE)

    older.finished()

    assert store.get(file_id).upload_id == "upload-2"  # type: ignore[union-attr]


def test_journal_ignores_upload_of_older_content(store: StateStore, tmp_path: Path) -> None:
    path = write_log(tmp_path, "a.mcap", 100)
    file_id, key = queue_file(store, path, "vehicle")
    old_identity = FileIdentity.of(path)
    StoreJournal(store, file_id, old_identity).start("upload-1", PART_SIZE)
    stale = StoreJournal(store, file_id, old_identity)

    write_log(tmp_path, "a.mcap", 200)
    store.enqueue(path, "bags", FileIdentity.of(path), key)
    stale.start("upload-2", PART_SIZE)
    stale.part_done(1, '"etag-1"', None, PART_SIZE)

    assert store.get(file_id).upload_id is None  # type: ignore[union-attr]
    assert StoreJournal(store, file_id, old_identity).existing() is None
    assert StoreJournal(store, file_id, FileIdentity.of(path)).existing() is None


def test_network_cut_resumes_at_next_part(
    tmp_path: Path,
    bucket: str,
    vehicle: str,
    store: StateStore,
    proxy: FaultProxy,
    s3: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A network cut in the middle of a multipart upload costs only the parts in flight.

    Given a 22 MiB file sent in five 5 MiB parts, several at a time, through the proxy,
    when the connection drops in the middle of part 3 and every request is held
    for 3.5 s after that,
    then the state store contains the upload id and the parts that completed,
    and after the outage the same upload continues: no recorded part is sent again.

    Outages in the field last 30 s and longer. With read timeouts of 2 s and retry
    delays of at most 1 s, a 3.5 s outage already fails attempts in the same way,
    so the journal and the resume are proven alike.
    """
    caplog.set_level(logging.INFO)
    path = write_log(tmp_path / "bags", "drive.mcap", 22 * MiB)
    file_id, key = queue_file(store, path, vehicle)
    outage = Outage(OUTAGE_SECONDS)
    proxy.close_mid_body(MiB, match=outage.begin_with(part_put(path, 3)))
    proxy.stall(60, times=100_000, match=outage.active)
    harness = Harness(
        make_config(tmp_path, vehicle, bucket, proxy.endpoint_url),
        store,
        proxy_uploader(proxy.endpoint_url, bucket),
    )

    try:
        harness.dispatcher.request_drain()
        harness.run_until(lambda: outage.over, 40, "outage over")
        journal = StoreJournal(store, file_id, FileIdentity.of(path)).existing()
        harness.upload_all()
    finally:
        harness.close()

    assert journal is not None
    upload_id, part_size, parts = journal
    recorded = {p.part_number for p in parts}
    assert part_size == PART_SIZE
    assert recorded
    assert 3 not in recorded
    assert all(p.checksum for p in parts)
    assert all(p.size == PART_SIZE for p in parts)
    assert [part_number(r) for r in proxy.records if r.fault == "close_mid_body"] == [3]
    assert any(r.fault == "stall" for r in proxy.records)
    requests = collections.Counter(part_number(r) for r in proxy.records if r.is_upload_part)
    assert all(requests[number] == 1 for number in recorded)
    assert set(confirmed_parts(proxy)) == {1, 2, 3, 4, 5}
    assert created_uploads(proxy) == 1
    assert log_messages(caplog, f"Resuming upload {upload_id}")
    assert log_messages(caplog, f"kept {len(recorded)} of {len(recorded)} parts")
    assert store.get(file_id).state is FileState.UPLOADED  # type: ignore[union-attr]
    assert object_sha256(s3, bucket, key) == file_sha256(path)
    assert open_uploads(s3, bucket, f"{vehicle}/") == []


def test_restart_resumes_at_next_part(
    tmp_path: Path, seaweed: SeaweedServer, bucket: str, vehicle: str, proxy: FaultProxy, s3: Any
) -> None:
    """A daemon killed in the middle of a multipart upload continues it after restart.

    Given the real daemon uploading a 17 MiB file in four parts through the proxy,
    when the proxy delays part 3 and the daemon is killed with SIGKILL after the other
    parts were recorded,
    then the restarted daemon resumes the same upload and sends only part 3.
    """
    logs = tmp_path / "logs"
    path = write_log(logs, "drive.mcap", 17 * MiB)
    config = write_config(
        tmp_path,
        proxy.endpoint_url,
        bucket,
        [{"path": logs, "source": "logs"}],
        vehicle_id=vehicle,
        upload={"multipart_threshold_mb": 5, "file_stable_seconds": 1},
    )
    proxy.stall(60, match=part_put(path, 3))

    with DaemonProcess(config, tmp_path / "first.log") as first:
        wait_for(lambda: "Started:" in first.log, 30, "first daemon started")
        with StateStore(tmp_path / "state" / "state.db", read_only=True) as state:
            wait_for(lambda: recorded_parts(state) == {1, 2, 4}, 60, "parts 1, 2 and 4 recorded")
            [upload_id] = state.open_upload_ids()
        first.kill()

    with DaemonProcess(config, tmp_path / "second.log") as second:
        wait_for(lambda: len(list_keys(s3, bucket, vehicle)) == 1, 60, "file uploaded")
        assert second.stop() == 0

    assert confirmed_parts(proxy) == {1: 1, 2: 1, 3: 1, 4: 1}
    assert [part_number(r) for r in proxy.records if r.fault == "stall"] == [3]
    assert created_uploads(proxy) == 1
    assert f"Resuming upload {upload_id}" in second.log
    assert "kept 3 of 3 parts" in second.log
    [key] = list_keys(s3, bucket, vehicle)
    assert object_sha256(s3, bucket, key) == file_sha256(path)
    assert open_uploads(s3, bucket, f"{vehicle}/") == []


def recorded_parts(state: StateStore) -> set[int]:
    """Return the part numbers that the state store records for its one open upload."""
    for upload_id in state.open_upload_ids():
        with state.transaction("read parts", write=False) as conn:
            rows = conn.execute("SELECT part_number FROM parts WHERE upload_id = ?", (upload_id,))
            return {row["part_number"] for row in rows}
    return set()


def list_keys(s3: Any, bucket: str, vehicle: str) -> list[str]:
    response = s3.list_objects_v2(Bucket=bucket, Prefix=f"{vehicle}/")
    return [item["Key"] for item in response.get("Contents", [])]


def interrupt_at_part_2(
    config: Config, store: StateStore, proxy: FaultProxy, uploader: Uploader
) -> None:
    """Run a drain until the proxy holds the request of part 2, then close the dispatcher."""
    first = Harness(config, store, uploader)
    try:
        first.dispatcher.request_drain()
        first.run_until(lambda: any(r.fault == "stall" for r in proxy.records), 30, "part 2 held")
    finally:
        first.close()


def upload_all_with(config: Config, store: StateStore, uploader: Uploader) -> None:
    """Drain the queue with a new dispatcher and ``uploader``, as a restarted daemon does."""
    second = Harness(config, store, uploader)
    try:
        second.upload_all()
    finally:
        second.close()


def test_changed_file_restarts_upload(
    tmp_path: Path,
    bucket: str,
    vehicle: str,
    store: StateStore,
    proxy: FaultProxy,
    s3: Any,
) -> None:
    """A file that changed while its upload was interrupted is uploaded anew, from part 1.

    Given an upload that failed at part 2, with parts 1 and 3 in the state store,
    when the file is rewritten and queued again,
    then the next dispatcher aborts the old upload and uploads the new content.
    """
    path = write_log(tmp_path / "bags", "drive.mcap", 12 * MiB)
    file_id, key = queue_file(store, path, vehicle)
    proxy.stall(60, match=part_put(path, 2))
    config = make_config(tmp_path, vehicle, bucket, proxy.endpoint_url)
    interrupt_at_part_2(config, store, proxy, proxy_uploader(proxy.endpoint_url, bucket))
    old_upload = store.get(file_id).upload_id  # type: ignore[union-attr]

    write_log(tmp_path / "bags", "drive.mcap", 12 * MiB, seed=1)
    store.enqueue(path, "bags", FileIdentity.of(path), key)
    upload_all_with(config, store, proxy_uploader(proxy.endpoint_url, bucket))

    assert old_upload is not None
    assert confirmed_parts(proxy) == {1: 2, 2: 1, 3: 2}
    assert created_uploads(proxy) == 2
    assert object_sha256(s3, bucket, key) == file_sha256(path)
    assert open_uploads(s3, bucket, f"{vehicle}/") == []


def test_changed_checksum_setting_restarts_upload(
    tmp_path: Path,
    bucket: str,
    vehicle: str,
    store: StateStore,
    proxy: FaultProxy,
    s3: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An upload interrupted under one checksum algorithm restarts under another and logs why.

    Given an upload sent with SHA-256 part checksums that stopped at part 2,
    when the uploader now uses CRC32C (the setting changed, or a new release
    changed its default),
    then the upload starts anew, because S3 takes the parts of one upload with
    one algorithm only, and the log gives that reason instead of a changed file.
    """
    caplog.set_level(logging.INFO)
    path = write_log(tmp_path / "bags", "drive.mcap", 12 * MiB)
    file_id, key = queue_file(store, path, vehicle)
    proxy.stall(60, match=part_put(path, 2))
    config = make_config(tmp_path, vehicle, bucket, proxy.endpoint_url)
    sha256_uploader = proxy_uploader(proxy.endpoint_url, bucket, checksum_algorithm="SHA256")
    interrupt_at_part_2(config, store, proxy, sha256_uploader)
    assert store.get(file_id).upload_id is not None  # type: ignore[union-attr]

    crc32c_uploader = proxy_uploader(proxy.endpoint_url, bucket, checksum_algorithm="CRC32C")
    upload_all_with(config, store, crc32c_uploader)

    assert log_messages(caplog, "started with another checksum algorithm")
    assert not log_messages(caplog, "differs from the file")
    assert created_uploads(proxy) == 2
    assert object_sha256(s3, bucket, key) == file_sha256(path)
    assert open_uploads(s3, bucket, f"{vehicle}/") == []


def test_sweep_aborts_only_abandoned_uploads(
    tmp_path: Path,
    seaweed: SeaweedServer,
    bucket: str,
    vehicle: str,
    store: StateStore,
    s3: Any,
) -> None:
    path = write_log(tmp_path / "bags", "kept.mcap", 100)
    file_id, kept_key = queue_file(store, path, vehicle)
    kept = s3.create_multipart_upload(Bucket=bucket, Key=kept_key)["UploadId"]
    store.set_upload(file_id, kept, PART_SIZE)
    orphan_key = f"{vehicle}/2026-12-04/bags/orphan.mcap"
    s3.create_multipart_upload(Bucket=bucket, Key=orphan_key)
    other_key = f"other-{vehicle}/2026-12-04/bags/orphan.mcap"
    other = s3.create_multipart_upload(Bucket=bucket, Key=other_key)["UploadId"]
    harness = Harness(
        make_config(tmp_path, vehicle, bucket, seaweed.endpoint_url),
        store,
        make_uploader(seaweed.endpoint_url, bucket),
    )

    try:
        harness.run_until(
            lambda: len(open_uploads(s3, bucket, f"{vehicle}/")) == 1, 10, "orphan aborted"
        )
    finally:
        harness.close()
        s3.abort_multipart_upload(Bucket=bucket, Key=other_key, UploadId=other)

    assert [u["UploadId"] for u in open_uploads(s3, bucket, f"{vehicle}/")] == [kept]
    s3.abort_multipart_upload(Bucket=bucket, Key=kept_key, UploadId=kept)


def test_sweep_retried_after_offline_start(
    tmp_path: Path,
    bucket: str,
    vehicle: str,
    store: StateStore,
    proxy: FaultProxy,
    s3: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    orphan_key = f"{vehicle}/2026-12-04/bags/orphan.mcap"
    s3.create_multipart_upload(Bucket=bucket, Key=orphan_key)
    path = write_log(tmp_path / "bags", "small.log", 1000)
    queue_file(store, path, vehicle)
    harness = Harness(
        make_config(tmp_path, vehicle, bucket, proxy.endpoint_url),
        store,
        proxy_uploader(proxy.endpoint_url, bucket),
    )

    try:
        proxy.cut(refuse_connections=True)
        harness.run_until(
            lambda: bool(log_messages(caplog, "Cannot list the multipart uploads")),
            10,
            "sweep failed",
        )
        proxy.restore()
        harness.upload_all()
        harness.run_until(lambda: not open_uploads(s3, bucket, f"{vehicle}/"), 10, "swept")
    finally:
        harness.close()

    [warning] = [r for r in caplog.records if "Cannot list the multipart" in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert log_messages(caplog, "Aborted 1 multipart uploads")


def test_expired_credentials_reloaded_once(
    tmp_path: Path,
    bucket: str,
    vehicle: str,
    store: StateStore,
    proxy: FaultProxy,
    s3: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    paths = [write_log(tmp_path / "bags", f"{n}.log", 1000) for n in range(3)]
    keys = [queue_file(store, path, vehicle)[1] for path in paths]
    proxy.respond_error(
        400, "ExpiredToken", times=3, match=lambda method, path, headers: method == "PUT"
    )
    harness = Harness(
        make_config(tmp_path, vehicle, bucket, proxy.endpoint_url),
        store,
        proxy_uploader(proxy.endpoint_url, bucket),
    )
    first_client = harness.uploader.client

    try:
        harness.upload_all()
    finally:
        harness.close()

    assert sum(r.fault == "respond_error" for r in proxy.records) == 3
    assert harness.uploader.client is not first_client
    assert len(log_messages(caplog, "Created a new S3 client")) == 1
    for path, key in zip(paths, keys):
        assert object_sha256(s3, bucket, key) == file_sha256(path)
