"""Uploads against the real SeaweedFS server: content, metadata, checks and failures."""

from __future__ import annotations

import datetime as dt
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
from upload_support import (
    MiB,
    file_sha256,
    make_uploader,
    module_bucket,
    object_keys,
    object_sha256,
    open_uploads,
    request_for,
    unique_prefix,
    write_log,
)

from tvm_upload.checksums import crc32c_available
from tvm_upload.errors import FileChangedError, FileVanishedError, UploadError
from tvm_upload.keys import build_key, unescape_key
from tvm_upload.localserver import SeaweedServer
from tvm_upload.uploader import UploadStoppedError, format_mtime


@pytest.fixture(scope="module")
def bucket(seaweed: SeaweedServer) -> str:
    return module_bucket(seaweed.endpoint_url, "uploader")


@pytest.fixture
def prefix() -> str:
    return unique_prefix()


ALGORITHMS = [
    "SHA256",
    pytest.param(
        "CRC32C",
        marks=pytest.mark.skipif(not crc32c_available(), reason="no crc32c package"),
    ),
    "none",
]


def test_small_file_content_and_metadata(
    prefix: str, seaweed: SeaweedServer, bucket: str, s3: Any, tmp_path: Path
) -> None:
    path = write_log(tmp_path, "launch.log", 300_000)
    request = request_for(path, f"{prefix}vehicle-001/2026-12-04/ros/launch.log")

    result = make_uploader(seaweed.endpoint_url, bucket).upload(request)

    head = s3.head_object(Bucket=bucket, Key=request.object_key)
    assert result.sha256 == file_sha256(path)
    assert result.size == 300_000
    assert result.skipped_existing is False
    assert result.identity == request.identity
    assert result.seconds >= 0.0
    assert object_sha256(s3, bucket, request.object_key) == result.sha256
    assert head["ContentType"] == "text/plain"
    assert head["Metadata"] == {
        "sha256": result.sha256,
        "mtime": format_mtime(request.identity.mtime_ns),
        "source": "ros",
        "vehicle-id": "vehicle-001",
    }


def test_zero_byte_file(
    prefix: str, seaweed: SeaweedServer, bucket: str, s3: Any, tmp_path: Path
) -> None:
    path = write_log(tmp_path, "empty.mcap", 0)
    request = request_for(path, f"{prefix}v/2026-12-04/can/empty.mcap")

    result = make_uploader(seaweed.endpoint_url, bucket).upload(request)

    head = s3.head_object(Bucket=bucket, Key=request.object_key)
    assert result.sha256 == file_sha256(path)
    assert head["ContentLength"] == 0
    assert head["ContentType"] == "application/octet-stream"
    assert head["Metadata"]["sha256"] == result.sha256


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("size", [1234, 9 * MiB + 17, 12 * MiB + 5])
def test_upload_paths_and_checksums(
    prefix: str,
    seaweed: SeaweedServer,
    bucket: str,
    s3: Any,
    tmp_path: Path,
    algorithm: str,
    size: int,
) -> None:
    """In memory (1234 B), streamed (9 MiB, threshold 16 MiB) and multipart (12 MiB, 3 parts)."""
    path = write_log(tmp_path, "drive.mcap", size)
    request = request_for(path, f"{prefix}v/2026-12-04/can/drive.mcap")
    threshold = 16 * MiB if size < 10 * MiB else 5 * MiB
    uploader = make_uploader(
        seaweed.endpoint_url,
        bucket,
        checksum_algorithm=algorithm,
        multipart_threshold_bytes=threshold,
    )
    sent: list[int] = []

    result = uploader.upload(request, progress=sent.append)

    head = s3.head_object(Bucket=bucket, Key=request.object_key, ChecksumMode="ENABLED")
    assert object_sha256(s3, bucket, request.object_key) == file_sha256(path)
    assert head["Metadata"]["sha256"] == result.sha256
    assert head["ContentLength"] == size
    assert sent[-1] == size
    if algorithm != "none":
        assert f"Checksum{algorithm}" in head
    if size > threshold:
        assert head["ETag"].endswith('-3"')
        assert len(sent) == 3
        assert sent == sorted(sent)


def test_storage_class_is_sent(
    prefix: str, seaweed: SeaweedServer, bucket: str, s3: Any, tmp_path: Path
) -> None:
    path = write_log(tmp_path, "a.log", 10)
    request = request_for(path, f"{prefix}v/d/s/a.log")

    make_uploader(seaweed.endpoint_url, bucket, storage_class="STANDARD_IA").upload(request)

    head = s3.head_object(Bucket=bucket, Key=request.object_key)
    assert head["StorageClass"] == "STANDARD_IA"


ODD_NAMES = [
    "with space.log",
    "plus+sign.log",
    "100%done.log",
    "日志-Übersicht.log",
    "line\nbreak.log",
    "tab\there.log",
    "del\x7fchar.log",
    os.fsdecode(b"latin1-\xe9t\xe9.log"),
    "sub dir/nested+%/deep\tname.log",
]


def test_odd_names_round_trip(
    prefix: str, seaweed: SeaweedServer, bucket: str, s3: Any, tmp_path: Path
) -> None:
    uploader = make_uploader(seaweed.endpoint_url, bucket)
    now = dt.datetime(2026, 12, 4, 12, 0, tzinfo=dt.timezone.utc)
    expected = {}
    for number, name in enumerate(ODD_NAMES):
        path = write_log(tmp_path, name, 100 + number)
        relative = PurePosixPath(path.relative_to(tmp_path).as_posix())
        built = build_key("v", "ros", relative, path.lstat().st_mtime_ns, dt.timezone.utc, now)
        key = prefix + built.key
        uploader.upload(request_for(path, key))
        expected[key] = (relative, file_sha256(path))

    listed = object_keys(s3, bucket, prefix)
    assert sorted(listed) == sorted(expected)
    for key in listed:
        relative, sha256 = expected[key]
        assert unescape_key(key.split("/", 4)[4]) == relative.as_posix()
        assert object_sha256(s3, bucket, key) == sha256


def test_head_match_skips_upload(
    prefix: str, seaweed: SeaweedServer, bucket: str, s3: Any, tmp_path: Path
) -> None:
    path = write_log(tmp_path, "big.mcap", 6 * MiB)
    request = request_for(path, f"{prefix}v/d/s/big.mcap")
    uploader = make_uploader(seaweed.endpoint_url, bucket)
    uploader.upload(request)
    first_etag = s3.head_object(Bucket=bucket, Key=request.object_key)["ETag"]

    again = uploader.upload(request)

    assert again.skipped_existing is True
    assert again.sha256 == file_sha256(path)
    assert s3.head_object(Bucket=bucket, Key=request.object_key)["ETag"] == first_etag
    assert open_uploads(s3, bucket, prefix) == []


def test_changed_content_is_uploaded_again(
    prefix: str, seaweed: SeaweedServer, bucket: str, s3: Any, tmp_path: Path
) -> None:
    path = write_log(tmp_path, "a.log", 1000)
    uploader = make_uploader(seaweed.endpoint_url, bucket)
    uploader.upload(request_for(path, f"{prefix}v/d/s/a.log"))
    write_log(tmp_path, "a.log", 1000, seed=1)

    result = uploader.upload(request_for(path, f"{prefix}v/d/s/a.log"))

    assert result.skipped_existing is False
    assert object_sha256(s3, bucket, f"{prefix}v/d/s/a.log") == file_sha256(path)


def test_other_object_at_key_is_replaced(
    prefix: str, seaweed: SeaweedServer, bucket: str, s3: Any, tmp_path: Path
) -> None:
    s3.put_object(
        Bucket=bucket, Key=f"{prefix}v/d/s/a.log", Body=b"x" * 1000, Metadata={"sha256": "0"}
    )
    path = write_log(tmp_path, "a.log", 1000)

    result = make_uploader(seaweed.endpoint_url, bucket).upload(
        request_for(path, f"{prefix}v/d/s/a.log")
    )

    assert result.skipped_existing is False
    assert object_sha256(s3, bucket, f"{prefix}v/d/s/a.log") == file_sha256(path)


def test_head_sha256(prefix: str, seaweed: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    path = write_log(tmp_path, "a.log", 10)
    uploader = make_uploader(seaweed.endpoint_url, bucket)
    uploader.upload(request_for(path, f"{prefix}v/d/s/a.log"))

    assert uploader.head_sha256(f"{prefix}v/d/s/a.log") == file_sha256(path)
    assert uploader.head_sha256(f"{prefix}v/d/s/missing.log") is None


def test_changed_before_upload(
    prefix: str, seaweed: SeaweedServer, bucket: str, tmp_path: Path
) -> None:
    path = write_log(tmp_path, "a.log", 10)
    request = request_for(path, f"{prefix}v/d/s/a.log")
    with open(path, "ab") as handle:
        handle.write(b"more")

    with pytest.raises(FileChangedError, match="size 10 -> 14"):
        make_uploader(seaweed.endpoint_url, bucket).upload(request)


def test_replaced_file_is_changed(
    prefix: str, seaweed: SeaweedServer, bucket: str, tmp_path: Path
) -> None:
    path = write_log(tmp_path, "a.log", 10)
    request = request_for(path, f"{prefix}v/d/s/a.log")
    replacement = write_log(tmp_path, "b.log", 10)
    os.replace(replacement, path)

    with pytest.raises(FileChangedError, match="replaced"):
        make_uploader(seaweed.endpoint_url, bucket).upload(request)


def test_changed_after_put_is_detected(
    prefix: str, seaweed: SeaweedServer, bucket: str, tmp_path: Path
) -> None:
    path = write_log(tmp_path, "a.log", 1000)
    request = request_for(path, f"{prefix}v/d/s/a.log")

    def append(_: int) -> None:
        with open(path, "ab") as handle:
            handle.write(b"late line\n")

    with pytest.raises(FileChangedError):
        make_uploader(seaweed.endpoint_url, bucket).upload(request, progress=append)


def test_changed_during_multipart_aborts(
    prefix: str, seaweed: SeaweedServer, bucket: str, s3: Any, tmp_path: Path
) -> None:
    path = write_log(tmp_path, "drive.mcap", 12 * MiB)
    request = request_for(path, f"{prefix}v/d/s/drive.mcap")

    def append_after_first_part(sent: int) -> None:
        if path.stat().st_size == 12 * MiB:
            with open(path, "ab") as handle:
                handle.write(b"x")

    with pytest.raises(FileChangedError):
        make_uploader(seaweed.endpoint_url, bucket).upload(
            request, progress=append_after_first_part
        )

    assert open_uploads(s3, bucket, prefix) == []
    assert object_keys(s3, bucket, prefix) == []


def test_rewritten_in_place_during_multipart(
    prefix: str, seaweed: SeaweedServer, bucket: str, s3: Any, tmp_path: Path
) -> None:
    """Given a writer that rewrites a later part and restores size and mtime,
    when the part is read for sending, its digest differs from the first read."""
    path = write_log(tmp_path, "drive.mcap", 12 * MiB)
    request = request_for(path, f"{prefix}v/d/s/drive.mcap")
    mtime_ns = request.identity.mtime_ns

    def rewrite_last_part(sent: int) -> None:
        if sent == 5 * MiB:
            with open(path, "r+b") as handle:
                handle.seek(11 * MiB)
                handle.write(b"\0" * 100)
            os.utime(path, ns=(mtime_ns, mtime_ns))

    with pytest.raises(FileChangedError, match="part 3 differs"):
        make_uploader(seaweed.endpoint_url, bucket, parts_in_flight=1).upload(
            request, progress=rewrite_last_part
        )

    assert open_uploads(s3, bucket, prefix) == []


def test_vanished_before_upload(
    prefix: str, seaweed: SeaweedServer, bucket: str, tmp_path: Path
) -> None:
    path = write_log(tmp_path, "a.log", 10)
    request = request_for(path, f"{prefix}v/d/s/a.log")
    path.unlink()

    with pytest.raises(FileVanishedError, match="vanished"):
        make_uploader(seaweed.endpoint_url, bucket).upload(request)


def test_vanished_during_multipart_aborts(
    prefix: str, seaweed: SeaweedServer, bucket: str, s3: Any, tmp_path: Path
) -> None:
    path = write_log(tmp_path, "drive.mcap", 12 * MiB)
    request = request_for(path, f"{prefix}v/d/s/drive.mcap")

    def remove_after_first_part(sent: int) -> None:
        if sent == 5 * MiB:
            path.unlink()

    with pytest.raises(FileVanishedError) as raised:
        make_uploader(seaweed.endpoint_url, bucket, parts_in_flight=1).upload(
            request, progress=remove_after_first_part
        )

    assert raised.value.retryable is False
    assert open_uploads(s3, bucket, prefix) == []


def test_stop_without_journal_aborts(
    prefix: str, seaweed: SeaweedServer, bucket: str, s3: Any, tmp_path: Path
) -> None:
    path = write_log(tmp_path, "drive.mcap", 12 * MiB)
    request = request_for(path, f"{prefix}v/d/s/drive.mcap")
    sent: list[int] = []

    with pytest.raises(UploadStoppedError):
        make_uploader(seaweed.endpoint_url, bucket, parts_in_flight=1).upload(
            request, progress=sent.append, should_stop=lambda: bool(sent)
        )

    assert sent == [5 * MiB]
    assert open_uploads(s3, bucket, prefix) == []


def test_stop_before_reading(
    prefix: str, seaweed: SeaweedServer, bucket: str, tmp_path: Path
) -> None:
    path = write_log(tmp_path, "drive.mcap", 9 * MiB)
    request = request_for(path, f"{prefix}v/d/s/drive.mcap")
    uploader = make_uploader(seaweed.endpoint_url, bucket, multipart_threshold_bytes=16 * MiB)

    with pytest.raises(UploadStoppedError) as raised:
        uploader.upload(request, should_stop=lambda: True)

    assert raised.value.scope == "file"
    assert raised.value.retryable is True


def test_symlink_is_not_followed(
    prefix: str, seaweed: SeaweedServer, bucket: str, tmp_path: Path
) -> None:
    target = write_log(tmp_path, "target.log", 10)
    link = tmp_path / "link.log"
    link.symlink_to(target)
    request = request_for(link, f"{prefix}v/d/s/link.log")

    with pytest.raises(UploadError, match="symbolic link") as raised:
        make_uploader(seaweed.endpoint_url, bucket).upload(request)

    assert raised.value.retryable is False


def test_fifo_is_not_read(prefix: str, seaweed: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.log"
    os.mkfifo(fifo)
    request = request_for(fifo, f"{prefix}v/d/s/pipe.log")

    with pytest.raises(UploadError, match="not a regular file") as raised:
        make_uploader(seaweed.endpoint_url, bucket).upload(request)

    assert raised.value.retryable is False


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files without read permission")
def test_unreadable_file(prefix: str, seaweed: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    path = write_log(tmp_path, "secret.log", 10)
    path.chmod(0)
    request = request_for(path, f"{prefix}v/d/s/secret.log")

    with pytest.raises(UploadError, match="cannot read") as raised:
        make_uploader(seaweed.endpoint_url, bucket).upload(request)

    assert raised.value.scope == "file"
    assert raised.value.retryable is True


@pytest.mark.parametrize(
    ("mtime_ns", "text"),
    [
        (0, "1970-01-01T00:00:00.000000000Z"),
        (1_796_377_200_123_456_789, "2026-12-04T09:40:00.123456789Z"),
        (-1, "1969-12-31T23:59:59.999999999Z"),
    ],
)
def test_format_mtime(mtime_ns: int, text: str) -> None:
    assert format_mtime(mtime_ns) == text


def test_concurrent_uploads_share_one_uploader(
    prefix: str, seaweed: SeaweedServer, bucket: str, s3: Any, tmp_path: Path
) -> None:
    uploader = make_uploader(seaweed.endpoint_url, bucket, max_concurrency=4)
    sizes = [100, 4 * MiB + 1, 6 * MiB, 11 * MiB]
    paths = [write_log(tmp_path, f"f{n}.mcap", size) for n, size in enumerate(sizes)]

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(
            pool.map(lambda path: uploader.upload(request_for(path, prefix + path.name)), paths)
        )

    for path, result in zip(paths, results):
        assert result.sha256 == file_sha256(path)
        assert object_sha256(s3, bucket, prefix + path.name) == result.sha256
    uploader.close()
