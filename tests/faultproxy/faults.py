"""Pending faults of the fault proxy and the requests they apply to."""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

from .traffic import RequestRecord

# A request filter called as match(method, path, headers), with a percent-decoded path and
# lower-case header names. The proxy calls it while holding a lock, so it must be quick and
# must not call the proxy.
Matcher = Callable[[str, str, Mapping[str, str]], bool]


@dataclass
class Fault:
    remaining: int
    match: Matcher | None

    def matches(self, request: RequestRecord) -> bool:
        return self.match is None or self.match(request.method, request.path, request.headers)


@dataclass
class ErrorFault(Fault):
    status: int
    code: str
    message: str


@dataclass
class StallFault(Fault):
    seconds: float


@dataclass
class MidBodyFault(Fault):
    after_bytes: int


@dataclass
class DateFault(Fault):
    offset_seconds: float


FaultType = TypeVar("FaultType", bound=Fault)

SIGNING_TIME_LIMIT_SECONDS = 15 * 60.0
"""How far a request's signing time may be from the store's clock before S3 rejects it."""


class Faults:
    """Thread-safe list of pending faults, each used up after ``remaining`` requests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[Fault] = []
        self.clock_offset_seconds: float | None = None
        """Offset of the store's clock from the local one, or None when it is not simulated."""

    def add(self, fault: Fault) -> None:
        if fault.remaining < 1:
            raise ValueError(f"times must be at least 1, got {fault.remaining}")
        with self._lock:
            self._pending.append(fault)

    def clear(self) -> None:
        with self._lock:
            self._pending.clear()

    def take(self, kind: type[FaultType], request: RequestRecord) -> FaultType | None:
        """Use up one request of the oldest pending fault of ``kind`` that matches."""
        with self._lock:
            for fault in self._pending:
                if isinstance(fault, kind) and fault.matches(request):
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._pending.remove(fault)
                    return fault
        return None
