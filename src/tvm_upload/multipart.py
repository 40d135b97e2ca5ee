"""Multipart upload of one log file with the low-level S3 API, resumable part by part.

The upload id and each completed part can be recorded in a ``PartsJournal`` (the
state store provides one) as they happen. When the journal returns an open upload,
the parts are reconciled with ListParts and the upload continues with the first
part that is missing or does not match the file. A part already on the store is
kept only when it is proven to hold the same bytes: its ETag and checksum match the
journal's record and the file's digest, or its ETag equals the MD5 of the file's
part.

Parts are streamed from the file, several at a time when a ``PartPipeline`` has an
executor, so that one large file uses several connections. The checksum in each
UploadPart request comes from the first read pass (``read_digests``), the one that
also computed the SHA-256 for the object metadata, so the store's verification proves
that the bytes sent are the bytes hashed. A part whose bytes differ between the two
reads means the file changed: FileChangedError, and the upload is aborted. The
journal, ``progress`` and the file's identity check run on the calling thread, in the
order in which parts complete.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Executor, Future, wait
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from botocore.exceptions import BotoCoreError, ClientError

from tvm_upload.checksums import ChecksumKind, StoreConfirmations, encode
from tvm_upload.errors import FileChangedError, FileVanishedError, UploadError
from tvm_upload.logfile import (
    ContentDigests,
    LogFile,
    PartReader,
    UploadStoppedError,
    part_spans,
)
from tvm_upload.s3client import S3Client, classify_error

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
GiB = 1024 * MiB
MAX_PARTS = 10_000
MIN_PART_SIZE_BYTES = 5 * MiB
MAX_PART_SIZE_BYTES = 5 * GiB
_LIST_PARTS_PAGE = 1000
_MD5_HEX = re.compile(r"[0-9a-f]{32}")


def part_size_for(size: int, min_part_size: int) -> int:
    """Return the part size for a file of ``size`` bytes: whole MiB, at most 10,000 parts.

    The result is at least ``min_part_size``. A 100 GiB file gets 11 MiB parts
    (9,310 parts). Raises UploadError (not retryable) when even 5 GiB parts would
    exceed 10,000 parts.
    """
    needed = -(-size // MAX_PARTS)
    part_size = max(min_part_size, needed)
    part_size = -(-part_size // MiB) * MiB
    if part_size > MAX_PART_SIZE_BYTES:
        raise UploadError(
            f"file of {size} bytes is too large for S3: it would need parts over 5 GiB",
            retryable=False,
        )
    return part_size


class UploadedPart(NamedTuple):
    """One part that the store confirmed; ``checksum`` is base64 as S3 reports it."""

    part_number: int
    etag: str
    checksum: str | None
    size: int


class OpenUpload(NamedTuple):
    """A multipart upload that was started and not yet completed or aborted."""

    upload_id: str
    part_size: int
    parts: Sequence[UploadedPart]


class PartsJournal(Protocol):
    """Durable record of one file's multipart upload, written as the upload goes.

    ``existing`` returns what ``start`` and ``part_done`` recorded, as an
    ``OpenUpload`` or a plain ``(upload_id, part_size, parts)`` tuple, or None.
    ``finished`` is called once the upload id is closed, whether it was completed
    or aborted; the journal then deletes its record. Calls come from the upload thread of the file.
    """

    def existing(self) -> tuple[str, int, Sequence[Sequence[Any]]] | None: ...

    def start(self, upload_id: str, part_size: int) -> None: ...

    def part_done(self, part_number: int, etag: str, checksum: str | None, size: int) -> None: ...

    def finished(self) -> None: ...


@dataclass(frozen=True)
class ObjectTarget:
    """Destination of an object: the shared client, the bucket and the object key."""

    client: S3Client
    bucket: str
    key: str


@dataclass(frozen=True)
class PartPipeline:
    """How the parts of one file are sent.

    ``executor`` runs up to ``in_flight`` UploadPart requests of the file at once;
    None sends them one after another on the calling thread. ``confirmations``
    decides whether part bodies are digested as they are sent.
    """

    executor: Executor | None = None
    in_flight: int = 1
    confirmations: StoreConfirmations = field(default_factory=StoreConfirmations)


def abort_upload(target: ObjectTarget, upload_id: str) -> bool:
    """Abort a multipart upload; True when it is gone, False when the abort failed.

    A failed abort is logged, because the open upload keeps its parts billed until
    ``Uploader.abort_stale_uploads`` removes it.
    """
    try:
        target.client.abort_multipart_upload(
            Bucket=target.bucket, Key=target.key, UploadId=upload_id
        )
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "NoSuchUpload":
            return True
        logger.warning("Could not abort upload %s of %s: %s", upload_id, target.key, exc)
        return False
    except BotoCoreError as exc:
        logger.warning("Could not abort upload %s of %s: %s", upload_id, target.key, exc)
        return False

    logger.info("Aborted multipart upload %s of %s", upload_id, target.key)
    return True


def list_parts(target: ObjectTarget, upload_id: str) -> dict[int, Mapping[str, Any]]:
    """Return the parts the store holds for an upload, by part number."""
    parts: dict[int, Mapping[str, Any]] = {}
    marker = 0
    while True:
        page = target.client.list_parts(
            Bucket=target.bucket,
            Key=target.key,
            UploadId=upload_id,
            MaxParts=_LIST_PARTS_PAGE,
            PartNumberMarker=marker,
        )
        for part in page.get("Parts", []):
            parts[part["PartNumber"]] = part
        if not page.get("IsTruncated"):
            return parts
        marker = int(page["NextPartNumberMarker"])


def _as_open_upload(value: Sequence[Any]) -> OpenUpload:
    upload_id, part_size, parts = value
    return OpenUpload(str(upload_id), int(part_size), [UploadedPart(*part) for part in parts])


class MultipartTransfer:
    """One multipart upload of one log file, from resume to completion.

    Use in this order: ``resume()``, ``md5_parts()`` for ``read_digests``, then
    either ``discard()`` (the object is already in the bucket) or ``send()``.
    """

    def __init__(
        self,
        target: ObjectTarget,
        log_file: LogFile,
        kind: ChecksumKind,
        *,
        min_part_size: int,
        journal: PartsJournal | None = None,
        should_stop: Callable[[], bool] | None = None,
        progress: Callable[[int], None] | None = None,
        pipeline: PartPipeline | None = None,
    ) -> None:
        self.target = target
        self.log_file = log_file
        self.kind = kind
        self.journal = journal
        self.should_stop = should_stop
        self.progress = progress
        self.pipeline = pipeline or PartPipeline()
        self.part_size = part_size_for(log_file.size, min_part_size)
        self.upload_id: str | None = None
        self._sent_bytes = 0
        self._server_parts: dict[int, Mapping[str, Any]] = {}
        self._journal_parts: dict[int, UploadedPart] = {}

    def resume(self) -> None:
        """Adopt the journal's open upload if the store still has it and it fits the file."""
        existing = self.journal.existing() if self.journal is not None else None
        if existing is None:
            return

        upload = _as_open_upload(existing)
        if not self._fits(upload.part_size):
            logger.info(
                "Restarting upload of %s: part size %d bytes of upload %s does not fit",
                self.target.key,
                upload.part_size,
                upload.upload_id,
            )
            self._close_upload(upload.upload_id)
            return

        try:
            self._server_parts = list_parts(self.target, upload.upload_id)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") != "NoSuchUpload":
                raise
            logger.info(
                "Restarting upload of %s: upload %s is gone", self.target.key, upload.upload_id
            )
            self._finish_journal()
            return

        self.upload_id = upload.upload_id
        self.part_size = upload.part_size
        self._journal_parts = {part.part_number: part for part in upload.parts}
        logger.info(
            "Resuming upload %s of %s: %d parts are already on the store",
            self.upload_id,
            self.target.key,
            len(self._server_parts),
        )

    def _fits(self, part_size: int) -> bool:
        size = self.log_file.size
        return MIN_PART_SIZE_BYTES <= part_size <= MAX_PART_SIZE_BYTES and (
            -(-size // part_size) <= MAX_PARTS
        )

    def md5_parts(self) -> set[int]:
        """Return the parts on the store that only their ETag (an MD5) can vouch for."""
        needed = set()
        for number, part in self._server_parts.items():
            recorded = self._journal_parts.get(number)
            if recorded is None or recorded.etag != part["ETag"]:
                needed.add(number)
        return needed

    def discard(self) -> None:
        """Abort the open upload, if any, because the object needs no upload."""
        if self.upload_id is not None:
            self._close_upload(self.upload_id)
            self.upload_id = None
            self._server_parts = {}
            self._journal_parts = {}

    def send(self, object_arguments: Mapping[str, Any], digests: ContentDigests) -> None:
        """Send the missing parts and complete the upload.

        An open upload holding a part that differs from the file was started for
        older content, so its metadata is stale: it is aborted and a new one started.
        On failure the upload is aborted unless a journal can resume it and the error
        is retryable; a changed or vanished file always aborts it.
        """
        kept = self._verified_parts(digests)
        if self.upload_id is None:
            self._create(object_arguments)

        try:
            parts = self._send_parts(digests, kept)
            self.log_file.check_unchanged()
            self._complete(parts)
        except Exception as exc:
            self._after_failure(exc)
            raise

    def _create(self, object_arguments: Mapping[str, Any]) -> None:
        arguments = dict(object_arguments)
        if self.kind.algorithm is not None:
            arguments["ChecksumAlgorithm"] = self.kind.algorithm

        response = self.target.client.create_multipart_upload(
            Bucket=self.target.bucket, Key=self.target.key, **arguments
        )
        self.upload_id = response["UploadId"]
        if self.journal is not None:
            self.journal.start(response["UploadId"], self.part_size)
        logger.debug("Started upload %s of %s", self.upload_id, self.target.key)

    def _send_parts(
        self, digests: ContentDigests, kept: Mapping[int, UploadedPart]
    ) -> list[UploadedPart]:
        parts = dict(kept)
        self._sent_bytes = sum(part.size for part in kept.values())
        if kept and self.progress is not None:
            self.progress(self._sent_bytes)

        missing = [
            (number, offset, length, digests.part_digests[number - 1])
            for number, (offset, length) in enumerate(self._spans(), start=1)
            if number not in kept
        ]
        if self.pipeline.executor is None or self.pipeline.in_flight <= 1:
            for number, offset, length, expected in missing:
                self._check_stop(number)
                self._part_done(parts, self._send_part(number, offset, length, expected))
        else:
            self._send_concurrently(missing, parts, self.pipeline.executor)
        return [parts[number] for number in sorted(parts)]

    def _send_concurrently(
        self,
        missing: list[tuple[int, int, int, bytes]],
        parts: dict[int, UploadedPart],
        executor: Executor,
    ) -> None:
        """Keep up to ``in_flight`` parts sending; record each one as it completes.

        On a failure or a stop, parts not yet started are cancelled and the ones
        running are waited for, and those that completed are still recorded in the
        journal, so that a resume need not send them again.
        """
        running: set[Future[UploadedPart]] = set()
        try:
            for number, offset, length, expected in missing:
                while len(running) >= self.pipeline.in_flight:
                    running = self._collect(running, parts)
                self._check_stop(number)
                running.add(executor.submit(self._send_part, number, offset, length, expected))
            while running:
                running = self._collect(running, parts)
        except BaseException:
            self._settle(running, parts)
            raise

    def _collect(
        self, running: set[Future[UploadedPart]], parts: dict[int, UploadedPart]
    ) -> set[Future[UploadedPart]]:
        done, still_running = wait(running, return_when=FIRST_COMPLETED)
        for future in sorted(done, key=lambda item: item.exception() is not None):
            self._part_done(parts, future.result())
        return still_running

    def _settle(self, running: set[Future[UploadedPart]], parts: dict[int, UploadedPart]) -> None:
        for future in running:
            future.cancel()
        for future in wait(running).done:
            if future.cancelled() or future.exception() is not None:
                continue
            part = future.result()
            if part.part_number not in parts:
                self._record(part)

    def _check_stop(self, number: int) -> None:
        if self.should_stop is not None and self.should_stop():
            raise UploadStoppedError(f"upload of {self.log_file.path} stopped before part {number}")

    def _part_done(self, parts: dict[int, UploadedPart], part: UploadedPart) -> None:
        parts[part.part_number] = part
        self._record(part)
        self._sent_bytes += part.size
        if self.progress is not None:
            self.progress(self._sent_bytes)
        self.log_file.check_unchanged()

    def _record(self, part: UploadedPart) -> None:
        if self.journal is not None:
            self.journal.part_done(part.part_number, part.etag, part.checksum, part.size)

    def _spans(self) -> list[tuple[int, int]]:
        return part_spans(self.log_file.size, self.part_size)

    def _verified_parts(self, digests: ContentDigests) -> dict[int, UploadedPart]:
        """Return the parts on the store that hold the file's bytes.

        Restarts the upload when a part is proven to differ from the file, or
        when the journal shows that the upload used another checksum algorithm
        (the setting changed since), because S3 takes every part of one upload
        with the algorithm it was created with.
        """
        if self._other_checksum_algorithm(digests):
            logger.info(
                "Restarting upload of %s: upload %s was started with another checksum algorithm",
                self.target.key,
                self.upload_id,
            )
            self.discard()
            return {}

        kept = {}
        for number, (_, length) in enumerate(self._spans(), start=1):
            server = self._server_parts.get(number)
            if server is None:
                continue

            checksum = encode(digests.part_digests[number - 1])
            same = self._same_bytes(number, server, length, checksum, digests)
            if same is False:
                logger.info(
                    "Restarting upload of %s: part %d of upload %s differs from the file",
                    self.target.key,
                    number,
                    self.upload_id,
                )
                self.discard()
                return {}
            if same:
                kept[number] = UploadedPart(number, server["ETag"], checksum, length)

        if self._server_parts:
            logger.info(
                "Upload %s of %s: kept %d of %d parts already on the store",
                self.upload_id,
                self.target.key,
                len(kept),
                len(self._server_parts),
            )
        return kept

    def _other_checksum_algorithm(self, digests: ContentDigests) -> bool:
        """Tell whether a recorded part checksum has another length than this upload's."""
        if not digests.part_digests:
            return False

        length = len(encode(digests.part_digests[0]))
        return any(
            part.checksum and len(part.checksum) != length for part in self._journal_parts.values()
        )

    def _same_bytes(
        self,
        number: int,
        server: Mapping[str, Any],
        length: int,
        checksum: str,
        digests: ContentDigests,
    ) -> bool | None:
        """Compare a stored part with the file's part; None when no ETag or checksum can."""
        if server["Size"] != length:
            return False

        recorded = self._journal_parts.get(number)
        if recorded is not None and recorded.etag == server["ETag"] and recorded.checksum:
            return recorded.checksum == checksum

        etag = str(server["ETag"]).strip('"')
        if _MD5_HEX.fullmatch(etag) and number in digests.part_md5:
            return etag == digests.part_md5[number]
        return None

    def _send_part(self, number: int, offset: int, length: int, expected: bytes) -> UploadedPart:
        """Send one part; runs on a pipeline thread, so it touches neither journal nor progress."""
        confirmations = self.pipeline.confirmations
        body = PartReader(
            self.log_file, offset, length, self.kind, verify=confirmations.verify_locally
        )
        response = body.send(
            lambda reader: self.target.client.upload_part(
                Bucket=self.target.bucket,
                Key=self.target.key,
                UploadId=self.upload_id,
                PartNumber=number,
                Body=reader,
                ContentLength=length,
                **self.kind.request_arguments(expected),
            ),
            expected,
            f"part {number}",
        )
        confirmations.record(body.confirmed)
        return UploadedPart(number, response["ETag"], encode(expected), length)

    def _complete(self, parts: list[UploadedPart]) -> None:
        listed = []
        for part in parts:
            entry: dict[str, Any] = {"PartNumber": part.part_number, "ETag": part.etag}
            if self.kind.field is not None:
                entry[self.kind.field] = part.checksum
            listed.append(entry)

        self.target.client.complete_multipart_upload(
            Bucket=self.target.bucket,
            Key=self.target.key,
            UploadId=self.upload_id,
            MultipartUpload={"Parts": listed},
        )
        logger.debug("Completed upload %s of %s", self.upload_id, self.target.key)
        self._finish_journal()

    def _after_failure(self, exc: Exception) -> None:
        if self.upload_id is None:
            return

        error = classify_error(exc)
        changed = isinstance(error, (FileChangedError, FileVanishedError))
        resumable = self.journal is not None and error.retryable and not changed
        if resumable:
            logger.debug("Keeping upload %s of %s to resume it", self.upload_id, self.target.key)
            return
        self._close_upload(self.upload_id)

    def _close_upload(self, upload_id: str) -> None:
        abort_upload(self.target, upload_id)
        self._finish_journal()

    def _finish_journal(self) -> None:
        if self.journal is not None:
            self.journal.finished()
