"""Bookkeeping of a state store outage: failed writes, the retry backoff and its log lines.

The daemon's main loop skips its steps while the state store cannot be written
(a full disk, most often), so no upload starts whose outcome could not be
recorded. ``StoreOutage`` decides when the next step is tried and logs the
outage once at ERROR, its repeats at WARNING and its end at INFO.

A step that goes through does not prove that the disk has space again: it may
have had nothing to write. So the outage ends only after steps went through for
one more retry delay; a failure before then continues it with a longer delay.
"""

from __future__ import annotations

import logging

from tvm_upload.backoff import backoff_ceiling_seconds
from tvm_upload.clock import Clock
from tvm_upload.config import RetrySettings
from tvm_upload.errors import StateStoreError

logger = logging.getLogger(__name__)

STORE_RETRY_MAX_SECONDS = 60.0
"""Maximum wait between tries, so uploads resume within a minute once space returns."""


class StoreOutage:
    """Failed state store writes since the last loop step that went through.

    ``requeue_stuck`` stays True from the first failure until the daemon has put
    back to pending the rows whose upload outcome could not be written. Used by
    the main loop only, so it is not thread-safe.
    """

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.failures = 0
        self.retry_at_monotonic = 0.0
        self.ends_at_monotonic = 0.0
        self.requeue_stuck = False

    def waiting(self) -> bool:
        """Return True while an outage lasts and its next try is not due yet."""
        return self.failures > 0 and self.clock.monotonic() < self.retry_at_monotonic

    def failed(self, error: StateStoreError, retry: RetrySettings) -> float:
        """Count a failed step and return the seconds until the next try.

        The delay doubles from ``retry.initial_delay_seconds`` up to
        ``retry.max_delay_seconds``, and never exceeds ``STORE_RETRY_MAX_SECONDS``.
        """
        self.failures += 1
        self.requeue_stuck = True
        delay = backoff_ceiling_seconds(
            self.failures,
            initial_seconds=retry.initial_delay_seconds,
            cap_seconds=min(retry.max_delay_seconds, STORE_RETRY_MAX_SECONDS),
        )
        self.retry_at_monotonic = self.clock.monotonic() + delay
        self.ends_at_monotonic = self.retry_at_monotonic + delay

        if self.failures == 1:
            logger.error(
                "Paused uploads, because the state store cannot be written: %s Next try in %.1f s",
                error,
                delay,
            )
        else:
            logger.warning(
                "The state store still cannot be written (try %d); next try in %.1f s: %s",
                self.failures,
                delay,
                error,
            )
        return delay

    def succeeded(self) -> None:
        """Note a step that went through; end the outage once no step failed for a delay."""
        if not self.failures or self.clock.monotonic() < self.ends_at_monotonic:
            return

        logger.info(
            "The state store accepts writes again after %d failed tries; uploads resume",
            self.failures,
        )
        self.failures = 0
