"""Clock skew measured from response Date headers, with an injected clock."""

from __future__ import annotations

import email.utils
import logging

import pytest

from tvm_upload.clockskew import ClockSkewMonitor, describe_skew, skew_from_date

NOW = 1_796_400_000.0


class FakeClock:
    def __init__(self) -> None:
        self.wall = NOW
        self.mono = 100.0

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono


def date_header(seconds: float) -> str:
    return email.utils.formatdate(seconds, usegmt=True)


def monitor_with(clock: FakeClock) -> ClockSkewMonitor:
    return ClockSkewMonitor(clock=clock.time, monotonic=clock.monotonic)


@pytest.mark.parametrize("header", [None, "", "not a date"])
def test_invalid_date_gives_no_skew(header: str | None) -> None:
    assert skew_from_date(header, NOW) is None


def test_skew_sign_and_description() -> None:
    assert skew_from_date(date_header(NOW - 1200), NOW) == 1200
    assert describe_skew(1200) == (
        "the system clock is 1200 s (20.0 min) ahead of the S3 store's clock (response Date header)"
    )
    assert "90 s (1.5 min) behind" in describe_skew(-90)


def test_warns_once_per_hour(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    monitor = monitor_with(clock)

    for _ in range(3):
        monitor.observe(date_header(NOW + 1200))
    clock.mono += 3599
    monitor.observe(date_header(NOW + 1200))
    clock.mono += 2
    monitor.observe(date_header(NOW + 1200))

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "1200 s (20.0 min) behind" in warnings[0].getMessage()
    assert "RequestTimeTooSkewed" in warnings[0].getMessage()
    assert monitor.last_skew_seconds == -1200


def test_small_skew_is_quiet(caplog: pytest.LogCaptureFixture) -> None:
    monitor = monitor_with(FakeClock())

    assert monitor.observe(date_header(NOW - 30)) == 30

    assert caplog.records == []


def test_info_when_clock_agrees_again(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    clock = FakeClock()
    monitor = monitor_with(clock)

    monitor.observe(date_header(NOW - 120))
    monitor.observe(date_header(NOW))
    monitor.observe(date_header(NOW - 120))

    levels = [record.levelno for record in caplog.records]
    assert levels == [logging.WARNING, logging.INFO, logging.WARNING]
    assert "once it reaches 15 minutes" in caplog.records[0].getMessage()
