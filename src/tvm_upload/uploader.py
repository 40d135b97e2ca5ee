"""Upload of one log file to S3: every S3 call of tvm-upload goes through ``Uploader``.

The SHA-256 of the whole content goes into the object metadata, and a HEAD whose
``sha256`` matches counts as already uploaded, so the hash must be known before any
request header is sent. Files are therefore read like this:

- up to ``SINGLE_READ_MAX_BYTES`` (4 MiB): one read into memory. The SHA-256, the
  request checksum and the PutObject body all come from the same bytes.
- larger files: two reads. The first reads the file once in 1 MiB chunks and computes
  the SHA-256 and the checksum of each part (a PutObject up to
  ``multipart_threshold_bytes`` is one part). The second streams each part from the
  file with that checksum in its request, up to ``parts_in_flight`` parts of one file
  at a time. The store verifies the checksum, which proves that the bytes sent are
  the bytes hashed.

Memory per upload thread is one 1 MiB buffer plus socket buffers, whatever the file
and part size. The second read usually comes from the page cache, so storage is read
about once. A body that carries a checksum header is signed without hashing it
(``UNSIGNED-PAYLOAD``), also over plain HTTP, because the signed checksum header
already protects it. botocore does the same over HTTPS by default.

Before sending, the uploader checks whether the object is already there: a HEAD of
the object key whose ``sha256`` metadata and size match the file counts as uploaded.
``PrefixListings`` skips that HEAD when a recent listing shows the key absent, and
``UploadRequest.check_existing`` False skips the check. After sending, a response
that echoes the checksum sent proves the single PUT; otherwise, and for every
multipart upload, a HEAD checks the size, the checksum (when the store returns one)
and the ``sha256`` metadata.

Retries: botocore retries single requests (see ``s3client``); this module raises an
``UploadError`` from ``classify_error`` and leaves longer retries to the caller.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from botocore.awsrequest import AWSRequest
from botocore.config import Config as BotocoreConfig
from botocore.exceptions import ClientError

from tvm_upload.checksums import ChecksumKind, StoreConfirmations, encode
from tvm_upload.errors import FileChangedError, UploadError
from tvm_upload.files import FileIdentity
from tvm_upload.keys import content_type
from tvm_upload.listing import PrefixListings
from tvm_upload.logfile import (
    LogFile,
    PartReader,
    UploadStoppedError,
    read_digests,
)
from tvm_upload.multipart import (
    MultipartTransfer,
    ObjectTarget,
    PartPipeline,
    PartsJournal,
    abort_upload,
)
from tvm_upload.s3client import (
    ClientHolder,
    S3Client,
    S3RequestError,
    UploaderSettings,
    classify_error,
    is_unexpected,
)

__all__ = [
    "PartsJournal",
    "S3RequestError",
    "UploadRequest",
    "UploadResult",
    "UploadStoppedError",
    "Uploader",
    "UploaderSettings",
    "classify_error",
]

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
SINGLE_READ_MAX_BYTES = 4 * MiB
DEFAULT_PARTS_IN_FLIGHT = 4
"""UploadPart requests of one file sent at the same time, and threads for them."""
DIGEST_THREADS = 2
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
_CHECKSUM_HEADERS = ("Content-MD5", "x-amz-checksum-sha256", "x-amz-checksum-crc32c")
_SIGNED_BODY_OPERATIONS = ("PutObject", "UploadPart")


@dataclass(frozen=True)
class UploadRequest:
    """One log file to upload: its path, object key and the identity it was queued with.

    ``check_existing`` False skips the check for an object that already contains the
    content. Set it only when no earlier attempt, process or lost state store can
    have uploaded the file to this key.
    """

    path: str | os.PathLike[str]
    object_key: str
    identity: FileIdentity
    source: str
    vehicle_id: str
    check_existing: bool = True


@dataclass(frozen=True)
class UploadResult:
    """A confirmed upload: the object has ``size`` bytes with this SHA-256 (hex).

    ``skipped_existing`` is True when the object already had this content and
    nothing was sent. ``identity`` is the file identity that was uploaded.
    """

    object_key: str
    size: int
    sha256: str
    seconds: float
    skipped_existing: bool = False
    identity: FileIdentity | None = None


def format_mtime(mtime_ns: int) -> str:
    """Format an mtime as ISO 8601 UTC with nanoseconds: ``2026-12-04T09:00:00.123456789Z``."""
    seconds, nanoseconds = divmod(mtime_ns, 1_000_000_000)
    moment = dt.datetime(1970, 1, 1) + dt.timedelta(seconds=seconds)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{nanoseconds:09d}Z"


def _comparable(stored: str | None, expected: str | None) -> bool:
    """Tell whether a checksum from HEAD can be compared with the one computed here.

    A multipart checksum ends in ``-N``. A store that reports a full-object checksum
    for a multipart object uses a scheme this module does not compute, so that value
    is skipped rather than failing every upload.
    """
    if stored is None or expected is None:
        return False
    return ("-" in stored) == ("-" in expected)


class Uploader:
    """Client of one bucket that uploads log files; thread-safe, one per process.

    Every upload thread shares one botocore client, and the parts of large files
    share a pool of ``parts_in_flight`` threads (1 sends parts on the upload thread).
    ``upload`` raises only ``UploadError`` and its subclasses.
    """

    def __init__(
        self,
        settings: UploaderSettings,
        *,
        client: S3Client | None = None,
        clock: Callable[[], float] = time.monotonic,
        parts_in_flight: int = DEFAULT_PARTS_IN_FLIGHT,
    ) -> None:
        self.settings = settings
        self._clients = ClientHolder(settings, client)
        self._unsigned_client: S3Client | None = None
        self._kind = ChecksumKind(settings.checksum_algorithm)
        self._clock = clock
        self._confirmations = StoreConfirmations()
        self._listings = PrefixListings(lambda: self.client, settings.bucket)
        self._digest_threads = ThreadPoolExecutor(DIGEST_THREADS, "upload-digest")
        self._pipeline = PartPipeline(
            executor=ThreadPoolExecutor(parts_in_flight, "upload-part")
            if parts_in_flight > 1
            else None,
            in_flight=parts_in_flight,
            confirmations=self._confirmations,
        )

    @classmethod
    def from_config(cls, config: Any) -> Uploader:
        """Build an uploader from a loaded configuration (its ``s3`` and ``upload`` sections)."""
        return cls(UploaderSettings.from_objects(config.s3, config.upload))

    @property
    def client(self) -> S3Client:
        client = self._clients.client
        if client is not self._unsigned_client:
            _sign_checksummed_bodies_unhashed(client)
            self._unsigned_client = client
        return client

    def upload(
        self,
        request: UploadRequest,
        *,
        should_stop: Callable[[], bool] | None = None,
        progress: Callable[[int], None] | None = None,
        parts_journal: PartsJournal | None = None,
    ) -> UploadResult:
        """Upload one log file and return once the store confirmed it.

        The file's identity is checked when it is opened and again before success.
        ``should_stop`` is polled between parts; True raises UploadStoppedError.
        ``progress`` receives the bytes sent so far. ``parts_journal`` records a
        multipart upload so that a later call can resume it.

        Raises FileVanishedError, FileChangedError, UploadStoppedError, or an
        UploadError from ``classify_error``.
        """
        started = self._clock()
        path = Path(request.path)
        try:
            with LogFile.open(path, request.identity) as log_file:
                sha256, skipped = self._upload_file(
                    log_file, request, should_stop, progress, parts_journal
                )
                log_file.check_unchanged()
        except UploadError:
            raise
        except Exception as exc:
            raise classify_error(exc) from exc

        return UploadResult(
            object_key=request.object_key,
            size=request.identity.size,
            sha256=sha256,
            seconds=self._clock() - started,
            skipped_existing=skipped,
            identity=request.identity,
        )

    def _upload_file(
        self,
        log_file: LogFile,
        request: UploadRequest,
        should_stop: Callable[[], bool] | None,
        progress: Callable[[int], None] | None,
        journal: PartsJournal | None,
    ) -> tuple[str, bool]:
        try:
            if log_file.size > self.settings.multipart_threshold_bytes:
                return self._upload_multipart(log_file, request, should_stop, progress, journal)

            self._drop_open_upload(request.object_key, journal)
            if log_file.size <= SINGLE_READ_MAX_BYTES:
                return self._put_in_memory(log_file, request, progress)
            return self._put_streamed(log_file, request, should_stop, progress)
        except Exception as exc:
            raise self._explain(log_file, exc) from exc

    def _explain(self, log_file: LogFile, exc: Exception) -> UploadError:
        """Classify a failure, reporting a changed file rather than the request it broke."""
        if is_unexpected(exc):
            logger.error("Unexpected error while uploading %s", log_file.path, exc_info=exc)
        error = classify_error(exc)
        if error.scope == "file" and not isinstance(error, (FileChangedError, UploadStoppedError)):
            try:
                log_file.check_unchanged()
            except UploadError as changed:
                return changed
        return error

    def _put_in_memory(
        self,
        log_file: LogFile,
        request: UploadRequest,
        progress: Callable[[int], None] | None,
    ) -> tuple[str, bool]:
        data = log_file.read(0, log_file.size)
        log_file.check_unchanged()
        whole = hashlib.sha256(data)
        sha256 = whole.hexdigest()
        if self._kind.name == "SHA256":
            digest = whole.digest()
        else:
            checksum = self._kind.new()
            checksum.update(data)
            digest = checksum.digest()
        if self._already_uploaded(request, sha256, log_file.size):
            return sha256, True

        response = self.client.put_object(
            Bucket=self.settings.bucket,
            Key=request.object_key,
            Body=data,
            **self._object_arguments(request, sha256),
            **self._kind.request_arguments(digest),
        )
        if progress is not None:
            progress(log_file.size)

        if not self._kind.confirms(response, digest):
            self._verify(request.object_key, log_file.size, sha256, self._checksum(digest))
        return sha256, False

    def _put_streamed(
        self,
        log_file: LogFile,
        request: UploadRequest,
        should_stop: Callable[[], bool] | None,
        progress: Callable[[int], None] | None,
    ) -> tuple[str, bool]:
        digests = read_digests(
            log_file,
            part_size=log_file.size,
            kind=self._kind,
            should_stop=should_stop,
            helper=self._digest_threads,
        )
        if self._already_uploaded(request, digests.sha256, log_file.size):
            return digests.sha256, True

        if should_stop is not None and should_stop():
            raise UploadStoppedError(f"upload of {log_file.path} stopped before sending it")

        expected = digests.part_digests[0]
        body = PartReader(
            log_file, 0, log_file.size, self._kind, verify=self._confirmations.verify_locally
        )
        body.send(
            lambda reader: self.client.put_object(
                Bucket=self.settings.bucket,
                Key=request.object_key,
                Body=reader,
                ContentLength=log_file.size,
                **self._object_arguments(request, digests.sha256),
                **self._kind.request_arguments(expected),
            ),
            expected,
            "the content",
        )
        self._confirmations.record(body.confirmed)
        if progress is not None:
            progress(log_file.size)

        if not body.confirmed:
            self._verify(
                request.object_key, log_file.size, digests.sha256, self._checksum(expected)
            )
        return digests.sha256, False

    def _upload_multipart(
        self,
        log_file: LogFile,
        request: UploadRequest,
        should_stop: Callable[[], bool] | None,
        progress: Callable[[int], None] | None,
        journal: PartsJournal | None,
    ) -> tuple[str, bool]:
        transfer = MultipartTransfer(
            self._target(request.object_key),
            log_file,
            self._kind,
            min_part_size=self.settings.min_part_size_bytes,
            journal=journal,
            should_stop=should_stop,
            progress=progress,
            pipeline=self._pipeline,
        )
        transfer.resume()
        digests = read_digests(
            log_file,
            part_size=transfer.part_size,
            kind=self._kind,
            md5_parts=transfer.md5_parts(),
            should_stop=should_stop,
            helper=self._digest_threads,
        )
        if self._already_uploaded(request, digests.sha256, log_file.size):
            transfer.discard()
            return digests.sha256, True

        transfer.send(self._object_arguments(request, digests.sha256), digests)
        expected = self._kind.composite(digests.part_digests)
        self._verify(request.object_key, log_file.size, digests.sha256, expected)
        return digests.sha256, False

    def _drop_open_upload(self, key: str, journal: PartsJournal | None) -> None:
        """Abort a journal's multipart upload left from when the file was above the threshold."""
        existing = journal.existing() if journal is not None else None
        if journal is None or existing is None:
            return
        abort_upload(self._target(key), str(existing[0]))
        journal.finished()

    def _target(self, key: str) -> ObjectTarget:
        return ObjectTarget(self.client, self.settings.bucket, key)

    def _checksum(self, digest: bytes) -> str | None:
        return encode(digest) if self._kind.field is not None else None

    def _object_arguments(self, request: UploadRequest, sha256: str) -> dict[str, Any]:
        metadata = {
            "sha256": sha256,
            "mtime": format_mtime(request.identity.mtime_ns),
            "source": request.source,
            "vehicle-id": request.vehicle_id,
        }
        return {
            "Metadata": metadata,
            "ContentType": content_type(Path(request.path).name),
            **self.settings.extra_put_arguments(),
        }

    def _head(self, key: str) -> Mapping[str, Any] | None:
        arguments: dict[str, str] = {"Bucket": self.settings.bucket, "Key": key}
        if self._kind.field is not None:
            arguments["ChecksumMode"] = "ENABLED"
        try:
            return self.client.head_object(**arguments)  # type: ignore[no-any-return]
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in _NOT_FOUND_CODES:
                return None
            raise

    def _already_uploaded(self, request: UploadRequest, sha256: str, size: int) -> bool:
        """Tell whether the object already has this content. If not, mark its key as being written."""
        key = request.object_key
        found = (
            request.check_existing
            and self._listings.may_exist(key, size)
            and self._matches_existing(key, sha256, size)
        )
        if not found:
            self._listings.forget(key)
        return found

    def _matches_existing(self, key: str, sha256: str, size: int) -> bool:
        head = self._head(key)
        if head is None:
            return False
        return (
            head.get("ContentLength") == size and head.get("Metadata", {}).get("sha256") == sha256
        )

    def _verify(self, key: str, size: int, sha256: str, checksum: str | None) -> None:
        """HEAD the new object and raise UploadError unless it is what was sent."""
        head = self._head(key)
        if head is None:
            raise UploadError(f"object {key} not found right after its upload")

        problems = []
        if head.get("ContentLength") != size:
            problems.append(f"size {head.get('ContentLength')} bytes, expected {size}")
        stored_sha256 = head.get("Metadata", {}).get("sha256")
        if stored_sha256 != sha256:
            problems.append(f"sha256 metadata {stored_sha256}, expected {sha256}")
        stored_checksum = head.get(self._kind.field) if self._kind.field else None
        if _comparable(stored_checksum, checksum) and stored_checksum != checksum:
            problems.append(f"{self._kind.field} {stored_checksum}, expected {checksum}")

        if problems:
            raise UploadError(f"object {key} does not match after upload: " + "; ".join(problems))

    def head_sha256(self, key: str) -> str | None:
        """Return the ``sha256`` metadata of an object, None when the object does not exist.

        Raises an UploadError from ``classify_error`` when the HEAD fails.
        """
        try:
            head = self._head(key)
        except Exception as exc:
            raise classify_error(exc) from exc
        if head is None:
            return None
        return head.get("Metadata", {}).get("sha256")  # type: ignore[no-any-return]

    def abort_stale_uploads(self, prefix: str, keep: set[str]) -> int:
        """Abort every open multipart upload under ``prefix`` whose upload id is not in ``keep``.

        Pass the vehicle's own prefix (``vehicle_id + "/"``) so that other vehicles
        sharing the bucket are left alone, and put every upload id still recorded in
        the state store, or running, into ``keep``. Returns how many were aborted. Raises an UploadError from ``classify_error``
        when the listing fails; a single failed abort is logged and skipped.
        """
        aborted = 0
        try:
            paginator = self.client.get_paginator("list_multipart_uploads")
            pages = paginator.paginate(Bucket=self.settings.bucket, Prefix=prefix)
            for page in pages:
                for upload in page.get("Uploads", []):
                    if upload["UploadId"] in keep:
                        continue
                    target = self._target(upload["Key"])
                    aborted += abort_upload(target, upload["UploadId"])
        except Exception as exc:
            raise classify_error(exc) from exc
        return aborted

    def reload_credentials(self) -> None:
        """Create a new client so that changed credential files are read again."""
        self._clients.rebuild()

    def close(self) -> None:
        """Close the connection pool and the part threads; the uploader must not be used afterwards."""
        if self._pipeline.executor is not None:
            self._pipeline.executor.shutdown(wait=False, cancel_futures=True)
        self._digest_threads.shutdown(wait=False, cancel_futures=True)
        self._clients.close()


def _sign_checksummed_bodies_unhashed(client: S3Client) -> None:
    """Make ``client`` send PutObject and UploadPart bodies with a checksum header cheaply.

    botocore hashes every body it signs over plain HTTP, one more read and SHA-256 of
    each byte. The checksum header, which is signed and which the store verifies,
    protects the body as well, so such requests are signed as ``UNSIGNED-PAYLOAD``,
    as botocore does over HTTPS. The client's ``s3`` option ``payload_signing_enabled``
    is turned off for these requests only, through botocore's ``before-sign`` event.

    A body read into memory is also sent without ``Expect: 100-continue``, which costs
    a round trip per request and only pays off for bodies too large to send in vain.
    """
    config = client.meta.config
    s3_options = {**(config.s3 or {}), "payload_signing_enabled": False}
    unsigned = config.merge(BotocoreConfig(s3=s3_options))

    def adjust_request(request: AWSRequest, **_: Any) -> None:
        if any(header in request.headers for header in _CHECKSUM_HEADERS):
            request.context["client_config"] = unsigned
        if not isinstance(request.body, PartReader) and "Expect" in request.headers:
            del request.headers["Expect"]

    for operation in _SIGNED_BODY_OPERATIONS:
        client.meta.events.register(
            f"before-sign.s3.{operation}",
            adjust_request,
            unique_id=f"tvm-upload-adjust-request-{operation}",
        )
