"""Records of the requests that the fault proxy read, and its byte counters."""

from __future__ import annotations

import dataclasses
import threading
import urllib.parse
from dataclasses import dataclass


@dataclass
class RequestRecord:
    """One request that the proxy read from a client, and what became of it.

    ``path`` is percent-decoded and ``query`` is the raw query string. ``body_bytes``
    counts the object data that the client sent, without chunked or aws-chunked framing,
    and grows while the body streams through. ``status`` is the status code sent back,
    or None when no response was sent. ``fault`` names the injected fault, if any.
    """

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body_bytes: int = 0
    status: int | None = None
    fault: str | None = None

    @property
    def is_upload_part(self) -> bool:
        """True for an S3 UploadPart request (a PUT with ``partNumber`` and ``uploadId``)."""
        params = urllib.parse.parse_qs(self.query, keep_blank_values=True)
        return self.method == "PUT" and "partNumber" in params and "uploadId" in params


class Traffic:
    """Request records and byte counters, shared by all connection threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._records: list[RequestRecord] = []
            self.bytes_from_client = 0
            self.bytes_to_client = 0
            self.connections = 0
            self.rejected_connections = 0

    def add_request(self, record: RequestRecord) -> None:
        with self._lock:
            self._records.append(record)

    def add_body_bytes(self, record: RequestRecord, count: int) -> None:
        with self._lock:
            record.body_bytes += count

    def mark(
        self, record: RequestRecord, *, status: int | None = None, fault: str | None = None
    ) -> None:
        """Set the status and fault of a request record, keeping the values not given."""
        with self._lock:
            record.status = status or record.status
            record.fault = fault or record.fault

    def count_from_client(self, count: int) -> None:
        with self._lock:
            self.bytes_from_client += count

    def count_to_client(self, count: int) -> None:
        with self._lock:
            self.bytes_to_client += count

    def count_connection(self, *, rejected: bool) -> None:
        with self._lock:
            self.connections += 1
            self.rejected_connections += int(rejected)

    def snapshot(self) -> list[RequestRecord]:
        with self._lock:
            return [dataclasses.replace(r, headers=dict(r.headers)) for r in self._records]
