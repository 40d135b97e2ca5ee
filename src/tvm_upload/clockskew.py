"""Clock skew between the vehicle and the S3 store, measured from response ``Date`` headers.

A SigV4 signature carries the local time, and S3 rejects a request signed more than
15 minutes away from its own clock (``RequestTimeTooSkewed``). botocore (checked
with 1.44) signs with the local clock and never corrects it, so a vehicle whose clock
drifted that far stops uploading until time synchronisation fixes the clock.
Measuring the skew on every response lets the log name the problem, and its size,
before that happens.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import Any

logger = logging.getLogger(__name__)

SKEW_WARNING_SECONDS = 60.0
"""Skew that gets a warning. A synchronised clock is within a second or two of S3's,
and the ``Date`` header has whole seconds."""

SKEW_LIMIT_SECONDS = 15 * 60.0
"""Skew above which S3 rejects signed requests with ``RequestTimeTooSkewed``."""

WARNING_INTERVAL_SECONDS = 3600.0


def skew_from_date(date_header: str | None, local_time: float) -> float | None:
    """Return ``local_time`` minus the time of an HTTP ``Date`` header, in seconds.

    Positive means the local clock is ahead of the server's. Returns None when the
    header is missing or cannot be parsed.
    """
    if not date_header:
        return None
    try:
        server_time = parsedate_to_datetime(date_header).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return local_time - server_time


def describe_skew(skew_seconds: float) -> str:
    """Describe a skew for a log line: ``the system clock is 1200 s (20.0 min) ahead of ...``."""
    direction = "ahead of" if skew_seconds > 0 else "behind"
    size = abs(skew_seconds)
    return (
        f"the system clock is {size:.0f} s ({size / 60:.1f} min) {direction} "
        "the S3 store's clock (response Date header)"
    )


class ClockSkewMonitor:
    """Watches the skew shown by S3 responses and warns when the local clock is off.

    A WARNING names the skew when it reaches ``warning_seconds``, at most once per
    ``warning_interval_seconds`` while it lasts. An INFO line reports when the clock
    agrees again. Thread-safe: every upload thread's responses pass through it.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        warning_seconds: float = SKEW_WARNING_SECONDS,
        warning_interval_seconds: float = WARNING_INTERVAL_SECONDS,
    ) -> None:
        self._clock = clock
        self._monotonic = monotonic
        self._warning_seconds = warning_seconds
        self._warning_interval_seconds = warning_interval_seconds
        self._lock = threading.Lock()
        self._next_warning = -math.inf
        self._warned = False
        self.last_skew_seconds: float | None = None

    def observe(self, date_header: str | None) -> float | None:
        """Record the skew shown by one response's ``Date`` header and return it.

        Returns None, and records nothing, when the header is missing or invalid.
        """
        skew = skew_from_date(date_header, self._clock())
        if skew is None:
            return None

        with self._lock:
            self.last_skew_seconds = skew
            if abs(skew) >= self._warning_seconds:
                self._warn(skew)
            elif self._warned:
                self._warned = False
                self._next_warning = -math.inf
                logger.info("The system clock agrees with the S3 store's again (%+.0f s)", skew)
        return skew

    def _warn(self, skew: float) -> None:
        now = self._monotonic()
        if now < self._next_warning:
            return

        self._next_warning = now + self._warning_interval_seconds
        self._warned = True
        consequence = (
            "S3 rejects requests signed this far off (RequestTimeTooSkewed), so uploads wait"
            if abs(skew) >= SKEW_LIMIT_SECONDS
            else f"S3 rejects requests once it reaches {SKEW_LIMIT_SECONDS / 60:.0f} minutes"
        )
        logger.warning(
            "Clock skew: %s; %s. Check time synchronisation (chrony or systemd-timesyncd)",
            describe_skew(skew),
            consequence,
        )

    def attach(self, client: Any) -> None:
        """Observe the ``Date`` header of every response ``client`` receives, errors included."""
        client.meta.events.register("after-call.s3", self._on_response)

    def _on_response(self, http_response: Any = None, **kwargs: Any) -> None:
        if http_response is not None:
            self.observe(http_response.headers.get("Date"))


CLOCK_SKEW = ClockSkewMonitor()
"""The monitor of this process, shared by every S3 client so its warnings are not repeated."""
