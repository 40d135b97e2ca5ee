"""Capped exponential backoff with full jitter.

The delay before retry ``attempt`` (counted from 1) is drawn uniformly from
``[0, min(cap, initial * 2 ** (attempt - 1))]``. Full jitter spreads the retries of
many vehicles that lost the same endpoint at the same moment, so they do not return
in step.
"""

from __future__ import annotations

import random

DEFAULT_INITIAL_SECONDS = 1.0
DEFAULT_CAP_SECONDS = 600.0

# 2**62 seconds is far above any cap, and keeping the exponent bounded stops
# float overflow for absurd attempt numbers.
_MAX_EXPONENT = 62


def backoff_ceiling_seconds(
    attempt: int,
    *,
    initial_seconds: float = DEFAULT_INITIAL_SECONDS,
    cap_seconds: float = DEFAULT_CAP_SECONDS,
) -> float:
    """Return the upper bound of the delay before retry ``attempt``: no jitter applied."""
    if attempt < 1:
        raise ValueError(f"attempt must be 1 or more, got {attempt}")
    if initial_seconds < 0 or cap_seconds < 0:
        raise ValueError(
            f"initial_seconds and cap_seconds must not be negative, "
            f"got {initial_seconds} and {cap_seconds}"
        )

    exponent = min(attempt - 1, _MAX_EXPONENT)
    return min(cap_seconds, initial_seconds * 2.0**exponent)


def backoff_seconds(
    attempt: int,
    *,
    initial_seconds: float = DEFAULT_INITIAL_SECONDS,
    cap_seconds: float = DEFAULT_CAP_SECONDS,
    rng: random.Random,
) -> float:
    """Return a random delay in seconds before retry ``attempt`` (1 for the first retry).

    The result lies in ``[0, backoff_ceiling_seconds(attempt, ...)]``. The function is
    pure apart from drawing one number from ``rng``, so a seeded ``random.Random``
    makes it reproducible.
    """
    ceiling = backoff_ceiling_seconds(
        attempt, initial_seconds=initial_seconds, cap_seconds=cap_seconds
    )
    return rng.uniform(0.0, ceiling)
