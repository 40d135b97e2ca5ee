"""Multipart uploads: part sizes, resume from a parts journal, and aborting stale uploads."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
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

from tvm_upload.errors import UploadError
from tvm_upload.localserver import SeaweedServer
from tvm_upload.multipart import MAX_PARTS, UploadedPart, part_size_for
from tvm_upload.uploader import Uploader, UploadStoppedError

GiB = 1024 * MiB
FILE_SIZE = 12 * MiB + 5


class MemoryJournal:
    """A parts journal kept in memory, recording every call."""

    def __init__(self) -> None:
        self.upload_id: str | None = None
        self.part_size = 0
        self.parts: dict[int, UploadedPart] = {}
        self.calls: list[str] = []

    def existing(self) -> tuple[str, int, Sequence[UploadedPart]] | None:
        if self.upload_id is None:
            return None
        return (self.upload_id, self.part_size, list(self.parts.values()))

    def start(self, upload_id: str, part_size: int) -> None:
        self.calls.append("start")
        self.upload_id = upload_id
        self.part_size = part_size
        self.parts = {}

    def part_done(self, part_number: int, etag: str, checksum: str | None, size: int) -> None:
        self.calls.append(f"part {part_number}")
        self.parts[part_number] = UploadedPart(part_number, etag, checksum, size)

    def finished(self) -> None:
        self.calls.append("finished")
        self.upload_id = None
        self.parts = {}


@pytest.fixture(scope="module")
def bucket(seaweed: SeaweedServer) -> str:
    return module_bucket(seaweed.endpoint_url, "multipart")


@pytest.fixture
def prefix() -> str:
    return unique_prefix()


def record_sent_parts(uploader: Uploader) -> list[int]:
    """Return a list that fills with the part number of every UploadPart request.

    Parts of one file go out from several threads, so the list is in sending order,
    which may differ from the part order.
    """
    sent: list[int] = []

    def remember(params: dict[str, Any], **_: Any) -> None:
        sent.append(params["PartNumber"])

    uploader.client.meta.events.register("before-parameter-build.s3.UploadPart", remember)
    return sent


def stop_after_first_part(uploader: Uploader, path: Path, key: str, journal: MemoryJournal) -> None:
    progress: list[int] = []
    with pytest.raises(UploadStoppedError):
        uploader.upload(
            request_for(path, key),
            parts_journal=journal,
            progress=progress.append,
            should_stop=lambda: bool(progress),
        )


@pytest.mark.parametrize(
    ("size", "part_size"),
    [
        (0, 8 * MiB),
        (64 * MiB, 8 * MiB),
        (80 * GiB, 9 * MiB),
        (100 * GiB, 11 * MiB),
        (100 * 10**9, 10 * MiB),
    ],
)
def test_part_size_table(size: int, part_size: int) -> None:
    assert part_size_for(size, 8 * MiB) == part_size
    assert -(-size // part_size) <= MAX_PARTS


@pytest.mark.parametrize("size", [1, 5 * GiB, 100 * GiB, 4 * 1024 * GiB, 48 * 1024 * GiB])
def test_part_size_limits(size: int) -> None:
    part_size = part_size_for(size, 5 * MiB)

    assert part_size % MiB == 0
    assert 5 * MiB <= part_size <= 5 * GiB
    assert -(-size // part_size) <= MAX_PARTS


def test_part_size_for_too_large_file() -> None:
    with pytest.raises(UploadError, match="too large") as raised:
        part_size_for(49 * 1024 * GiB, 8 * MiB)

    assert raised.value.retryable is False


def test_resume_sends_only_missing_parts(
    prefix: str, seaweed: SeaweedServer, bucket: str, s3: Any, tmp_path: Path
) -> None:
    path = write_log(tmp_path, "drive.mcap", FILE_SIZE)
    key = f"{prefix}drive.mcap"
    journal = MemoryJournal()
    stop_after_first_part(
        make_uploader(seaweed.endpoint_url, bucket, parts_in_flight=1), path, key, journal
    )
    assert journal.calls == ["start", "part 1"]
    assert len(open_uploads(s3, bucket, prefix)) == 1

    uploader = make_uploader(seaweed.endpoint_url, bucket)
    sent = record_sent_parts(uploader)
    result = uploader.upload(request_for(path, key), parts_journal=journal)

    assert sorted(sent) == [2, 3]
    assert sorted(journal.calls[-3:-1]) == ["part 2", "part 3"]
    assert journal.calls[-1] == "finished"
    assert result.sha256 == file_sha256(path)
    assert object_sha256(s3, bucket, key) == result.sha256
    assert open_uploads(s3, bucket, prefix) == []


def test_resume_checks_unrecorded_part_by_md5(
    prefix: str, seaweed: SeaweedServer, bucket: str, s3: Any, tmp_path: Path
) -> None:
    """Given a crash after a part was sent but before the journal recorded it,
    the part is kept because its ETag equals the MD5 of the file's part."""
    path = write_log(tmp_path, "drive.mcap", FILE_SIZE)
    key = f"{prefix}drive.mcap"
    journal = MemoryJournal()
    stop_after_first_part(
        make_uploader(seaweed.endpoint_url, bucket, parts_in_flight=1), path, key, journal
    )
    journal.parts.clear()

    uploader = make_uploader(seaweed.endpoint_url, bucket)
    sent = record_sent_parts(uploader)
    uploader.upload(request_for(path, key), parts_journal=journal)

    assert sorted(sent) == [2, 3]
    assert object_sha256(s3, bucket, key) == file_sha256(path)


def test_resume_restarts_when_part_differs(
    prefix: str, seaweed: SeaweedServer, bucket: str, s3: Any, tmp_path: Path
) -> None:
    """Given part 1 on the store and the file rewritten in place with the same
    size and mtime, the stale upload is aborted and a new one sends every part."""
    path = write_log(tmp_path, "drive.mcap", FILE_SIZE)
    key = f"{prefix}drive.mcap"
    journal = MemoryJournal()
    stop_after_first_part(
        make_uploader(seaweed.endpoint_url, bucket, parts_in_flight=1), path, key, journal
    )
    stale_upload = journal.upload_id
    status = path.stat()
    with open(path, "r+b") as handle:
        handle.write(b"rewritten")
    os.utime(path, ns=(status.st_atime_ns, status.st_mtime_ns))

    uploader = make_uploader(seaweed.endpoint_url, bucket)
    sent = record_sent_parts(uploader)
    result = uploader.upload(request_for(path, key), parts_journal=journal)

    assert sorted(sent) == [1, 2, 3]
    assert journal.calls[2:4] == ["finished", "start"]
    assert stale_upload not in [u["UploadId"] for u in open_uploads(s3, bucket, prefix)]
    assert s3.head_object(Bucket=bucket, Key=key)["Metadata"]["sha256"] == result.sha256
    assert object_sha256(s3, bucket, key) == file_sha256(path)


def test_resume_of_vanished_upload_starts_over(
    prefix: str, seaweed: SeaweedServer, bucket: str, s3: Any, tmp_path: Path
) -> None:
    path = write_log(tmp_path, "drive.mcap", FILE_SIZE)
    key = f"{prefix}drive.mcap"
    journal = MemoryJournal()
    stop_after_first_part(
        make_uploader(seaweed.endpoint_url, bucket, parts_in_flight=1), path, key, journal
    )
    assert journal.upload_id is not None
    s3.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=journal.upload_id)

    uploader = make_uploader(seaweed.endpoint_url, bucket)
    sent = record_sent_parts(uploader)
    uploader.upload(request_for(path, key), parts_journal=journal)

    assert sorted(sent) == [1, 2, 3]
    assert journal.calls[2:4] == ["finished", "start"]
    assert object_sha256(s3, bucket, key) == file_sha256(path)


def test_completed_upload_counts_as_uploaded(
    prefix: str, seaweed: SeaweedServer, bucket: str, tmp_path: Path
) -> None:
    """Given a journal whose upload completed but was never marked finished
    (the reply was lost), the next call finds the object and sends nothing."""
    path = write_log(tmp_path, "drive.mcap", FILE_SIZE)
    key = f"{prefix}drive.mcap"
    uploader = make_uploader(seaweed.endpoint_url, bucket)
    uploader.upload(request_for(path, key))
    journal = MemoryJournal()
    journal.start("completed-upload-id", 5 * MiB)

    result = uploader.upload(request_for(path, key), parts_journal=journal)

    assert result.skipped_existing is True
    assert journal.upload_id is None


def test_resume_with_unfit_part_size_starts_over(
    prefix: str, seaweed: SeaweedServer, bucket: str, s3: Any, tmp_path: Path
) -> None:
    path = write_log(tmp_path, "drive.mcap", FILE_SIZE)
    key = f"{prefix}drive.mcap"
    stale = s3.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    journal = MemoryJournal()
    journal.start(stale, 1 * MiB)

    make_uploader(seaweed.endpoint_url, bucket).upload(
        request_for(path, key), parts_journal=journal
    )

    assert journal.calls[:3] == ["start", "finished", "start"]
    assert sorted(journal.calls[3:6]) == ["part 1", "part 2", "part 3"]
    assert journal.calls[6:] == ["finished"]
    assert open_uploads(s3, bucket, prefix) == []


def test_below_threshold_drops_open_upload(
    prefix: str, seaweed: SeaweedServer, bucket: str, s3: Any, tmp_path: Path
) -> None:
    path = write_log(tmp_path, "drive.mcap", FILE_SIZE)
    key = f"{prefix}drive.mcap"
    journal = MemoryJournal()
    stop_after_first_part(
        make_uploader(seaweed.endpoint_url, bucket, parts_in_flight=1), path, key, journal
    )
    uploader = make_uploader(seaweed.endpoint_url, bucket, multipart_threshold_bytes=64 * MiB)

    uploader.upload(request_for(path, key), parts_journal=journal)

    assert journal.upload_id is None
    assert open_uploads(s3, bucket, prefix) == []
    assert object_sha256(s3, bucket, key) == file_sha256(path)


def test_stop_with_journal_keeps_upload(
    prefix: str, seaweed: SeaweedServer, bucket: str, s3: Any, tmp_path: Path
) -> None:
    path = write_log(tmp_path, "drive.mcap", FILE_SIZE)
    key = f"{prefix}drive.mcap"
    journal = MemoryJournal()

    stop_after_first_part(
        make_uploader(seaweed.endpoint_url, bucket, parts_in_flight=1), path, key, journal
    )

    uploads = open_uploads(s3, bucket, prefix)
    assert [upload["UploadId"] for upload in uploads] == [journal.upload_id]
    assert list(journal.parts) == [1]
    assert journal.parts[1].size == 5 * MiB
    assert journal.part_size == 5 * MiB


def test_abort_stale_uploads_keeps_listed(
    prefix: str, seaweed: SeaweedServer, bucket: str, s3: Any
) -> None:
    ids = [
        s3.create_multipart_upload(Bucket=bucket, Key=f"{prefix}a/{n}.mcap")["UploadId"]
        for n in range(3)
    ]
    outside = s3.create_multipart_upload(Bucket=bucket, Key=f"other-{prefix}x.mcap")["UploadId"]

    aborted = make_uploader(seaweed.endpoint_url, bucket).abort_stale_uploads(prefix, keep={ids[1]})

    assert aborted == 2
    assert [upload["UploadId"] for upload in open_uploads(s3, bucket, prefix)] == [ids[1]]
    assert [u["UploadId"] for u in open_uploads(s3, bucket, f"other-{prefix}")] == [outside]
