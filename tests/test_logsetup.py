"""Log redaction and repeat limiting."""

from __future__ import annotations

import logging

from tvm_upload.logsetup import RepeatFilter


def record(message: str, created: float, level: int = logging.WARNING) -> logging.LogRecord:
    item = logging.LogRecord("tvm_upload.test", level, __file__, 1, message, None, None)
    item.created = created
    return item


def test_repeats_beyond_burst_are_dropped() -> None:
    repeat = RepeatFilter(burst=2, window_seconds=60)

    passed = [repeat.filter(record("endpoint unreachable", 100.0 + i)) for i in range(5)]

    assert passed == [True, True, False, False, False]


def test_next_window_reports_suppressed_count() -> None:
    repeat = RepeatFilter(burst=1, window_seconds=60)
    for second in range(3):
        repeat.filter(record("endpoint unreachable", 100.0 + second))

    later = record("endpoint unreachable", 200.0)

    assert repeat.filter(later)
    assert "2 identical lines suppressed" in later.getMessage()


def test_info_lines_are_never_dropped() -> None:
    repeat = RepeatFilter(burst=1, window_seconds=60)

    passed = [repeat.filter(record("Uploaded x", 100.0, logging.INFO)) for _ in range(5)]

    assert all(passed)


def test_different_messages_are_counted_apart() -> None:
    repeat = RepeatFilter(burst=1, window_seconds=60)

    assert repeat.filter(record("first", 100.0))
    assert repeat.filter(record("second", 100.0))
