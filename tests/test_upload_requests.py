"""Which S3 requests an upload sends: existence checks, verification, signing, parallel parts."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from upload_support import (
    MiB,
    file_sha256,
    make_uploader,
    module_bucket,
    object_sha256,
    open_uploads,
    request_for,
    unique_prefix,
    write_log,
)

from tvm_upload.checksums import ChecksumKind, encode
from tvm_upload.files import FileIdentity
from tvm_upload.listing import CHECKS_BEFORE_LISTING, PrefixListings
from tvm_upload.localserver import SeaweedServer
from tvm_upload.logfile import LogFile, PartReader, read_digests
from tvm_upload.multipart import UploadedPart
from tvm_upload.s3client import S3RequestError
from tvm_upload.uploader import Uploader, UploadRequest, UploadStoppedError


@pytest.fixture(scope="module")
def bucket(seaweed: SeaweedServer) -> str:
    return module_bucket(seaweed.endpoint_url, "requests")


@pytest.fixture
def prefix() -> str:
    return unique_prefix()


class RequestLog:
    """Counts the S3 operations an uploader's client sends and keeps their headers."""

    def __init__(self, uploader: Uploader) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.headers: dict[str, list[dict[str, str]]] = collections.defaultdict(list)
        self._lock = threading.Lock()
        uploader.client.meta.events.register("before-send.s3", self._remember)

    def _remember(self, request: Any, event_name: str, **_: Any) -> None:
        operation = event_name.rsplit(".", 1)[-1]
        with self._lock:
            self.counts[operation] += 1
            self.headers[operation].append({k: _text(v) for k, v in request.headers.items()})


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class MemoryJournal:
    """A parts journal kept in memory."""

    def __init__(self) -> None:
        self.upload_id: str | None = None
        self.part_size = 0
        self.parts: dict[int, UploadedPart] = {}

    def existing(self) -> tuple[str, int, Sequence[UploadedPart]] | None:
        if self.upload_id is None:
            return None
        return (self.upload_id, self.part_size, list(self.parts.values()))

    def start(self, upload_id: str, part_size: int) -> None:
        self.upload_id, self.part_size, self.parts = upload_id, part_size, {}

    def part_done(self, part_number: int, etag: str, checksum: str | None, size: int) -> None:
        self.parts[part_number] = UploadedPart(part_number, etag, checksum, size)

    def finished(self) -> None:
        self.upload_id, self.parts = None, {}


def fresh_request(path: Path, key: str) -> UploadRequest:
    request = request_for(path, key)
    return UploadRequest(
        path=request.path,
        object_key=request.object_key,
        identity=request.identity,
        source=request.source,
        vehicle_id=request.vehicle_id,
        check_existing=False,
    )


@pytest.mark.parametrize("algorithm", ["SHA256", "none"])
def test_confirmed_put_needs_no_head(
    prefix: str, seaweed: SeaweedServer, bucket: str, s3: Any, tmp_path: Path, algorithm: str
) -> None:
    path = write_log(tmp_path, "a.log", 5000)
    uploader = make_uploader(seaweed.endpoint_url, bucket, checksum_algorithm=algorithm)
    log = RequestLog(uploader)

    result = uploader.upload(fresh_request(path, f"{prefix}v/d/s/a.log"))

    assert result.sha256 == file_sha256(path)
    assert object_sha256(s3, bucket, f"{prefix}v/d/s/a.log") == result.sha256
    assert log.counts == {"PutObject": 1}


def test_streamed_put_is_confirmed_too(
    prefix: str, seaweed: SeaweedServer, bucket: str, s3: Any, tmp_path: Path
) -> None:
    path = write_log(tmp_path, "big.mcap", 6 * MiB + 3)
    uploader = make_uploader(seaweed.endpoint_url, bucket, multipart_threshold_bytes=16 * MiB)
    log = RequestLog(uploader)

    uploader.upload(fresh_request(path, f"{prefix}v/d/s/big.mcap"))

    assert log.counts == {"PutObject": 1}
    assert object_sha256(s3, bucket, f"{prefix}v/d/s/big.mcap") == file_sha256(path)


def test_multipart_is_verified_with_head(
    prefix: str, seaweed: SeaweedServer, bucket: str, tmp_path: Path
) -> None:
    path = write_log(tmp_path, "big.mcap", 12 * MiB)
    uploader = make_uploader(seaweed.endpoint_url, bucket)
    log = RequestLog(uploader)

    uploader.upload(fresh_request(path, f"{prefix}v/d/s/big.mcap"))

    assert log.counts["UploadPart"] == 3
    assert log.counts["HeadObject"] == 1


def test_bodies_are_signed_unhashed(
    prefix: str, seaweed: SeaweedServer, bucket: str, tmp_path: Path
) -> None:
    small = write_log(tmp_path, "a.log", 1000)
    large = write_log(tmp_path, "big.mcap", 12 * MiB)
    uploader = make_uploader(seaweed.endpoint_url, bucket)
    log = RequestLog(uploader)

    uploader.upload(fresh_request(small, f"{prefix}a.log"))
    uploader.upload(fresh_request(large, f"{prefix}big.mcap"))

    put, *_ = log.headers["PutObject"]
    parts = log.headers["UploadPart"]
    assert put["X-Amz-Content-SHA256"] == "UNSIGNED-PAYLOAD"
    assert "Expect" not in put
    assert all(part["X-Amz-Content-SHA256"] == "UNSIGNED-PAYLOAD" for part in parts)
    assert all(part["Expect"] == "100-continue" for part in parts)
    assert log.headers["CompleteMultipartUpload"][0]["X-Amz-Content-SHA256"] != ("UNSIGNED-PAYLOAD")


def test_check_existing_off_sends_no_head(
    prefix: str, seaweed: SeaweedServer, bucket: str, tmp_path: Path
) -> None:
    path = write_log(tmp_path, "a.log", 100)
    uploader = make_uploader(seaweed.endpoint_url, bucket)
    uploader.upload(request_for(path, f"{prefix}a.log"))
    log = RequestLog(uploader)

    result = uploader.upload(fresh_request(path, f"{prefix}a.log"))

    assert result.skipped_existing is False
    assert log.counts == {"PutObject": 1}


def test_busy_prefix_is_listed_once(
    prefix: str, seaweed: SeaweedServer, bucket: str, s3: Any, tmp_path: Path
) -> None:
    """Given an object already uploaded and many new files in the same prefix,
    when they are uploaded one after another, one listing replaces most HEADs
    and the file already in the bucket is still recognised."""
    count = CHECKS_BEFORE_LISTING + 6
    paths = [write_log(tmp_path, f"f{n:02d}.log", 100 + n) for n in range(count)]
    uploader = make_uploader(seaweed.endpoint_url, bucket)
    done_before = uploader.upload(request_for(paths[-1], f"{prefix}d/{paths[-1].name}"))
    log = RequestLog(uploader)

    results = [uploader.upload(request_for(path, f"{prefix}d/{path.name}")) for path in paths]

    assert log.counts["ListObjectsV2"] == 1
    assert log.counts["HeadObject"] == CHECKS_BEFORE_LISTING - 2 + 1
    assert log.counts["PutObject"] == count - 1
    assert results[-1].skipped_existing is True
    assert results[-1].sha256 == done_before.sha256
    assert all(result.skipped_existing is False for result in results[:-1])


def test_listing_forgets_keys_being_written(
    prefix: str, seaweed: SeaweedServer, bucket: str, tmp_path: Path
) -> None:
    """A key uploaded after its prefix was listed is checked with a HEAD again."""
    paths = [write_log(tmp_path, f"f{n}.log", 100) for n in range(CHECKS_BEFORE_LISTING)]
    uploader = make_uploader(seaweed.endpoint_url, bucket)
    for path in paths:
        uploader.upload(request_for(path, f"{prefix}d/{path.name}"))
    log = RequestLog(uploader)

    again = uploader.upload(request_for(paths[-1], f"{prefix}d/{paths[-1].name}"))

    assert again.skipped_existing is True
    assert log.counts == {"HeadObject": 1}


def test_listing_after_own_write_began_keeps_key_unknown(
    prefix: str, seaweed: SeaweedServer, bucket: str, s3: Any
) -> None:
    """Given a key that this process began to write before its prefix was first listed,
    when the listing misses the write that was still in flight, then the key still needs
    a HEAD afterwards instead of counting as absent."""
    listings = PrefixListings(lambda: s3, bucket)
    key = f"{prefix}p/a.log"
    assert listings.may_exist(key, 5) is True
    listings.forget(key)
    for name in ("b", "c", "d"):
        listings.may_exist(f"{prefix}p/{name}.log", 5)

    s3.put_object(Bucket=bucket, Key=key, Body=b"12345")

    assert listings.may_exist(key, 5) is True
    assert listings.may_exist(f"{prefix}p/b.log", 5) is False


def test_failed_listing_falls_back_to_head(
    prefix: str, seaweed: SeaweedServer, bucket: str, tmp_path: Path
) -> None:
    paths = [write_log(tmp_path, f"f{n}.log", 100) for n in range(CHECKS_BEFORE_LISTING + 2)]
    uploader = make_uploader(seaweed.endpoint_url, bucket)
    log = RequestLog(uploader)

    def deny(**_: Any) -> None:
        error = {"Error": {"Code": "AccessDenied", "Message": "no listing"}}
        raise ClientError(error, "ListObjectsV2")  # type: ignore[arg-type]

    uploader.client.meta.events.register("before-call.s3.ListObjectsV2", deny)

    for path in paths:
        uploader.upload(request_for(path, f"{prefix}d/{path.name}"))

    assert log.counts["HeadObject"] == len(paths)
    assert log.counts["PutObject"] == len(paths)


def test_parts_are_sent_concurrently(
    prefix: str, seaweed: SeaweedServer, bucket: str, s3: Any, tmp_path: Path
) -> None:
    path = write_log(tmp_path, "drive.mcap", 20 * MiB + 1)
    uploader = make_uploader(seaweed.endpoint_url, bucket, parts_in_flight=3)
    running = collections.Counter[str]()
    lock = threading.Lock()

    def start(**_: Any) -> None:
        with lock:
            running["now"] += 1
            running["max"] = max(running["max"], running["now"])
        time.sleep(0.1)

    def end(**_: Any) -> None:
        with lock:
            running["now"] -= 1

    uploader.client.meta.events.register("before-call.s3.UploadPart", start)
    uploader.client.meta.events.register("after-call.s3.UploadPart", end)
    sent: list[int] = []

    result = uploader.upload(request_for(path, f"{prefix}drive.mcap"), progress=sent.append)

    assert running["max"] == 3
    assert sent == sorted(sent)
    assert sent[-1] == 20 * MiB + 1
    assert object_sha256(s3, bucket, f"{prefix}drive.mcap") == result.sha256
    assert result.sha256 == file_sha256(path)


def test_failed_part_keeps_the_others_for_resume(
    prefix: str, seaweed: SeaweedServer, bucket: str, s3: Any, tmp_path: Path
) -> None:
    """Given parts sent three at a time and part 2 failing with a connection error,
    when the upload fails, the journal contains every other part that completed,
    and the next upload sends only the parts still missing."""
    path = write_log(tmp_path, "drive.mcap", 20 * MiB + 1)
    key = f"{prefix}drive.mcap"
    uploader = make_uploader(seaweed.endpoint_url, bucket, parts_in_flight=3)
    journal = MemoryJournal()

    def fail_part_2(params: dict[str, Any], **_: Any) -> None:
        if params["PartNumber"] == 2:
            raise EndpointConnectionError(endpoint_url=seaweed.endpoint_url)

    uploader.client.meta.events.register("before-parameter-build.s3.UploadPart", fail_part_2)

    with pytest.raises(S3RequestError):
        uploader.upload(request_for(path, key), parts_journal=journal)

    kept = set(journal.parts)
    assert journal.upload_id is not None
    assert 2 not in kept
    assert 1 in kept
    retry = make_uploader(seaweed.endpoint_url, bucket)
    log = RequestLog(retry)
    result = retry.upload(request_for(path, key), parts_journal=journal)
    assert log.counts["UploadPart"] == 5 - len(kept)
    assert object_sha256(s3, bucket, key) == result.sha256
    assert open_uploads(s3, bucket, prefix) == []


def test_stop_waits_for_parts_in_flight(
    prefix: str, seaweed: SeaweedServer, bucket: str, s3: Any, tmp_path: Path
) -> None:
    path = write_log(tmp_path, "drive.mcap", 20 * MiB + 1)
    uploader = make_uploader(seaweed.endpoint_url, bucket, parts_in_flight=2)
    journal = MemoryJournal()
    sent: list[int] = []

    with pytest.raises(UploadStoppedError):
        uploader.upload(
            request_for(path, f"{prefix}drive.mcap"),
            parts_journal=journal,
            progress=sent.append,
            should_stop=lambda: bool(sent),
        )

    assert journal.upload_id is not None
    assert len(journal.parts) >= 1
    assert len(journal.parts) == len(sent) or len(journal.parts) == len(sent) + 1
    assert len(open_uploads(s3, bucket, prefix)) == 1


def test_damaged_transfer_is_not_a_changed_file(
    prefix: str, seaweed: SeaweedServer, bucket: str, tmp_path: Path
) -> None:
    """A checksum rejection for a file that did not change is an S3 error, not a change."""
    path = write_log(tmp_path, "a.log", 10_000)
    kind = ChecksumKind("SHA256")
    uploader = make_uploader(seaweed.endpoint_url, bucket)
    wrong = encode(bytes(32))

    with LogFile.open(path, FileIdentity.of(path)) as log_file:
        expected = read_digests(log_file, part_size=log_file.size, kind=kind).part_digests[0]
        reader = PartReader(log_file, 0, log_file.size, kind, verify=False)
        with pytest.raises(ClientError, match="BadDigest"):
            reader.send(
                lambda body: uploader.client.put_object(
                    Bucket=bucket, Key=f"{prefix}a.log", Body=body, ChecksumSHA256=wrong
                ),
                expected,
                "the content",
            )


@pytest.mark.parametrize("algorithm", ["SHA256", "none"])
def test_read_digests_with_helper_thread(tmp_path: Path, algorithm: str) -> None:
    path = write_log(tmp_path, "drive.mcap", 3 * MiB + 7)
    kind = ChecksumKind(algorithm)
    uploader_pool = ThreadPoolExecutor(1)

    with LogFile.open(path, FileIdentity.of(path)) as log_file:
        alone = read_digests(log_file, part_size=MiB, kind=kind, md5_parts={2})
        helped = read_digests(
            log_file, part_size=MiB, kind=kind, md5_parts={2}, helper=uploader_pool
        )
        single = read_digests(log_file, part_size=log_file.size, kind=kind, helper=uploader_pool)
    uploader_pool.shutdown()

    assert helped == alone
    assert alone.sha256 == file_sha256(path)
    assert len(alone.part_digests) == 4
    assert set(alone.part_md5) == {2}
    if algorithm == "SHA256":
        assert single.part_digests == [bytes.fromhex(single.sha256)]
