"""Backoff delays: capped doubling with full jitter, drawn from a seeded random source."""

from __future__ import annotations

import random

import pytest

from tvm_upload.backoff import backoff_ceiling_seconds, backoff_seconds


@pytest.mark.parametrize(
    ("attempt", "ceiling"),
    [(1, 1.0), (2, 2.0), (3, 4.0), (10, 512.0), (11, 600.0), (50, 600.0)],
)
def test_ceiling_doubles_up_to_cap(attempt: int, ceiling: float) -> None:
    assert backoff_ceiling_seconds(attempt) == ceiling


def test_ceiling_uses_custom_initial_and_cap() -> None:
    assert backoff_ceiling_seconds(3, initial_seconds=0.5, cap_seconds=100.0) == 2.0
    assert backoff_ceiling_seconds(9, initial_seconds=0.5, cap_seconds=100.0) == 100.0


def test_huge_attempt_stays_at_cap() -> None:
    assert backoff_ceiling_seconds(100_000) == 600.0
    assert 0.0 <= backoff_seconds(100_000, rng=random.Random(1)) <= 600.0


def test_delays_stay_within_ceiling() -> None:
    rng = random.Random(20261204)
    for attempt in range(1, 15):
        ceiling = backoff_ceiling_seconds(attempt)
        for _ in range(200):
            delay = backoff_seconds(attempt, rng=rng)
            assert 0.0 <= delay <= ceiling


def test_delays_use_full_jitter_range() -> None:
    rng = random.Random(5)
    delays = [backoff_seconds(4, rng=rng) for _ in range(2000)]

    assert min(delays) < 0.1
    assert max(delays) > 7.9
    assert 3.8 < sum(delays) / len(delays) < 4.2


def test_same_seed_gives_same_delays() -> None:
    first = [backoff_seconds(n, rng=random.Random(99)) for n in range(1, 8)]
    second = [backoff_seconds(n, rng=random.Random(99)) for n in range(1, 8)]

    assert first == second


def test_seeded_delay_is_uniform_draw() -> None:
    delay = backoff_seconds(3, initial_seconds=2.0, cap_seconds=600.0, rng=random.Random(3))

    assert delay == random.Random(3).uniform(0.0, 8.0)


@pytest.mark.parametrize("attempt", [0, -1])
def test_attempt_below_one_is_rejected(attempt: int) -> None:
    with pytest.raises(ValueError, match="attempt must be 1 or more"):
        backoff_seconds(attempt, rng=random.Random(0))


def test_negative_times_are_rejected() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        backoff_seconds(1, initial_seconds=-1.0, rng=random.Random(0))
