"""The clocks the daemon reads, injectable so tests control time."""

from __future__ import annotations

import time
from datetime import datetime, tzinfo


class Clock:
    """Wall-clock and monotonic time of the real system.

    Tests pass a subclass whose methods return controlled values. Intervals
    and readiness are measured on ``monotonic()``, which never jumps; dates,
    schedules and registry timestamps use ``time()``, which may step when
    NTP corrects a vehicle whose RTC battery is dead.
    """

    def time(self) -> float:
        """Return wall-clock seconds since the epoch."""
        return time.time()

    def monotonic(self) -> float:
        """Return seconds on a clock that never goes backwards."""
        return time.monotonic()

    def now(self, zone: tzinfo) -> datetime:
        """Return the current wall-clock time as an aware datetime in ``zone``."""
        return datetime.fromtimestamp(self.time(), zone)


SYSTEM_CLOCK = Clock()
