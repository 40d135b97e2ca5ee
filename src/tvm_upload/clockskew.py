"""Clock skew between the vehicle and the S3 store, measured from response ``Date`` headers.

A SigV4 signature carries the local time, and S3 rejects a request signed more than
15 minutes away from its own clock (``RequestTimeTooSkewed``). botocore (checked
with 1.44) signs with the local clock and never corrects it. ``ClockSkewMonitor.attach``
therefore makes one client sign with the local time corrected by the skew measured
from response ``Date`` headers, once that skew reaches ``SKEW_WARNING_SECONDS``. A
request rejected with a 403 whose ``Date`` changed that correction is signed and sent
once more at once, so the first request after a clock jump does not fail.
"""

from __future__ import annotations

import datetime
import logging
import math
import threading
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime
from typing import Any

import botocore.auth
from botocore.handlers import set_operation_specific_signer

logger = logging.getLogger(__name__)

SKEW_WARNING_SECONDS = 60.0
"""Skew that gets a warning. A synchronised clock is within a second or two of S3's,
and the ``Date`` header has whole seconds."""

SKEW_LIMIT_SECONDS = 15 * 60.0
"""Skew above which S3 rejects signed requests with ``RequestTimeTooSkewed``."""

WARNING_INTERVAL_SECONDS = 3600.0

CORRECTED_SIGNATURE_VERSION = "tvm-upload-s3v4-corrected"
"""Name under which ``CorrectedS3SigV4Auth`` is registered in botocore's signer table."""

SIGNING_OFFSET_KEY = "tvm_upload_signing_offset_seconds"
"""Request context key: seconds added to the local time when signing this attempt."""

SKEW_RETRIED_KEY = "tvm_upload_skew_retried"
"""Request context key: the request was already sent again with a corrected signing time."""


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
        limit = "beyond" if abs(skew) >= SKEW_LIMIT_SECONDS else "below"
        logger.warning(
            "Clock skew: %s, %s the %.0f minutes after which S3 rejects a request as "
            "RequestTimeTooSkewed. Requests are signed with the store's time meanwhile. "
            "Check time synchronisation (chrony or systemd-timesyncd)",
            describe_skew(skew),
            limit,
            SKEW_LIMIT_SECONDS / 60,
        )

    def signing_offset_seconds(self) -> float:
        """Return the seconds to add to the local time when signing a request.

        That is minus the last measured skew once it reaches ``warning_seconds``, and 0
        below, because a ``Date`` header has whole seconds and a second of skew is harmless.
        """
        with self._lock:
            skew = self.last_skew_seconds
        if skew is None or abs(skew) < self._warning_seconds:
            return 0.0
        return -skew

    def attach(self, client: Any) -> None:
        """Make ``client`` observe every response and sign with the corrected time.

        Every attempt's ``Date`` header is observed, errors and botocore's retries
        included. Only this client's signer changes: other clients of the process
        still sign with the local clock.
        """
        botocore.auth.AUTH_TYPE_MAPS.setdefault(CORRECTED_SIGNATURE_VERSION, CorrectedS3SigV4Auth)
        events = client.meta.events
        events.register_last("choose-signer.s3", self._choose_signer)
        events.register_first("needs-retry.s3", self._on_attempt)

    def _choose_signer(
        self, context: dict[str, Any], signing_name: str, signature_version: str, **kwargs: Any
    ) -> str | None:
        """Pick the corrected signer where botocore would pick plain ``s3v4``.

        It runs after the other ``choose-signer.s3`` handlers but before botocore's
        generic ``choose-signer`` handler, so it calls that handler itself. Any other
        signer (presigning, S3 Express, unsigned requests) is left to botocore and
        signs with the local clock.
        """
        chosen = set_operation_specific_signer(context=context, signing_name=signing_name)
        if (chosen or signature_version) != "s3v4":
            return None

        context[SIGNING_OFFSET_KEY] = self.signing_offset_seconds()
        return CORRECTED_SIGNATURE_VERSION

    def _on_attempt(
        self, response: Any = None, request_dict: Any = None, **kwargs: Any
    ) -> float | None:
        """Observe one attempt's response; return 0 (retry now) when a new skew explains a 403.

        botocore's own retry handler still decides every other case.
        """
        if response is None:
            return None

        http_response = response[0]
        self.observe(http_response.headers.get("Date"))
        if http_response.status_code != 403 or request_dict is None:
            return None

        context = request_dict["context"]
        signed_offset = context.get(SIGNING_OFFSET_KEY)
        offset = self.signing_offset_seconds()
        if signed_offset is None or context.get(SKEW_RETRIED_KEY):
            return None
        if abs(offset - signed_offset) < self._warning_seconds:
            return None

        context[SKEW_RETRIED_KEY] = True
        logger.info(
            "S3 rejected a request signed %+.0f s off the system clock; "
            "signing it again %+.0f s off and sending it once more",
            signed_offset,
            offset,
        )
        return 0.0


class CorrectedS3SigV4Auth(botocore.auth.S3SigV4Auth):  # type: ignore[misc]  # no stubs
    """botocore's S3 SigV4 signer, signing with the local time plus a measured offset.

    The offset is the request context's ``SIGNING_OFFSET_KEY``, which
    ``ClockSkewMonitor`` sets before each attempt is signed.
    """

    def _modify_request_before_signing(self, request: Any) -> None:
        # botocore 1.44's SigV4Auth.add_auth stores the local time in
        # context["timestamp"] and calls this method before anything reads it, so
        # replacing it here changes X-Amz-Date and the signature together.
        offset = request.context.get(SIGNING_OFFSET_KEY)
        if offset:
            signing_time = datetime.datetime.fromtimestamp(
                time.time() + offset, datetime.timezone.utc
            )
            request.context["timestamp"] = signing_time.strftime(botocore.auth.SIGV4_TIMESTAMP)
        super()._modify_request_before_signing(request)


CLOCK_SKEW = ClockSkewMonitor()
"""The monitor of this process, shared by every S3 client so its warnings are not repeated."""
