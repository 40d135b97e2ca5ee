"""Values the state store takes and returns: row states, rows, summaries, metric data."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tvm_upload.files import FileIdentity


class FileState(str, enum.Enum):
    """State of a log file: queued, being uploaded, uploaded, given up on, or deleted locally."""

    PENDING = "pending"
    UPLOADING = "uploading"
    UPLOADED = "uploaded"
    FAILED = "failed"
    DELETED = "deleted"


QUEUE_STATES = (FileState.PENDING, FileState.UPLOADING, FileState.FAILED)
REGISTRY_STATES = (FileState.UPLOADED, FileState.DELETED)


class EnqueueResult(str, enum.Enum):
    """Outcome of ``StateStore.enqueue``."""

    QUEUED = "queued"
    ALREADY_QUEUED = "already_queued"
    ALREADY_UPLOADED = "already_uploaded"
    REQUEUED_CHANGED = "requeued_changed"


@dataclass(frozen=True)
class ConfirmedUpload:
    """An upload that S3 confirmed, as ``StateStore.mark_uploaded_many`` records it.

    ``identity`` is the identity of the content sent. With ``delete_after`` None the
    after-upload rule never deletes the file.
    """

    file_id: int
    sha256: str
    uploaded_at: float
    delete_after: float | None
    identity: FileIdentity


@dataclass(frozen=True)
class ReadyEntry:
    """A ready log file for ``StateStore.enqueue_many``, with the object key built for it."""

    path: Path
    source: str
    identity: FileIdentity
    object_key: str


@dataclass(frozen=True)
class FileRecord:
    """One row of the ``files`` table. Times are wall-clock seconds since the epoch.

    ``attempts`` counts failed attempts; ``part_size`` is the part size in
    bytes of the open multipart upload ``upload_id``.
    """

    id: int
    path: Path
    source: str
    identity: FileIdentity
    object_key: str
    state: FileState
    attempts: int
    next_attempt_at: float | None
    last_error: str | None
    sha256: str | None
    upload_id: str | None
    part_size: int | None
    queued_at: float
    uploaded_at: float | None
    delete_after: float | None
    updated_at: float


@dataclass(frozen=True)
class PartRecord:
    """A completed part of a multipart upload; ``checksum`` is the value S3 verified."""

    part_number: int
    size: int
    etag: str
    checksum: str | None


@dataclass(frozen=True)
class FailedFile:
    """A queue row in state ``failed``, as ``tvm-upload status`` shows it."""

    path: Path
    source: str
    attempts: int
    last_error: str | None
    updated_at: float


@dataclass(frozen=True)
class StatusSummary:
    """Counts and bytes per state, failed rows and queue age at one moment.

    ``oldest_pending_age_seconds`` is the age of the oldest row in the queue
    (pending, uploading or failed) and 0.0 when the queue is empty.
    ``sources`` maps each source to its number of rows per state name.
    ``failed_files`` lists failed rows, least recently changed first.
    """

    pending_count: int
    pending_bytes: int
    uploading_count: int
    uploading_bytes: int
    failed_count: int
    failed_bytes: int
    uploaded_count: int
    uploaded_bytes: int
    deleted_count: int
    oldest_pending_age_seconds: float
    failed_files: list[FailedFile] = field(default_factory=list)
    sources: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def queue_count(self) -> int:
        """Rows not uploaded yet: pending, uploading and failed."""
        return self.pending_count + self.uploading_count + self.failed_count

    @property
    def queue_bytes(self) -> int:
        """Bytes of the rows that ``queue_count`` counts."""
        return self.pending_bytes + self.uploading_bytes + self.failed_bytes

    def to_dict(self) -> dict[str, Any]:
        """Return JSON-ready data with paths as strings."""
        data = {key: value for key, value in vars(self).items() if key != "failed_files"}
        data["queue_count"] = self.queue_count
        data["queue_bytes"] = self.queue_bytes
        data["failed_files"] = [
            {**vars(failed), "path": str(failed.path)} for failed in self.failed_files
        ]
        return data


@dataclass(frozen=True)
class MetricDatum:
    """A metric value waiting to be sent; ``timestamp`` is wall-clock seconds."""

    name: str
    value: float
    unit: str
    timestamp: float
    dimensions: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class BufferedMetric:
    """A ``MetricDatum`` stored in ``metrics_buffer``; a lower ``id`` was buffered earlier."""

    id: int
    datum: MetricDatum
