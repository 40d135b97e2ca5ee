"""Object key layout, key escaping and Content-Type guessing."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import PurePosixPath
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tvm_upload.keys import (
    MAX_KEY_BYTES,
    ObjectKeyError,
    build_key,
    content_type,
    escape_key_segment,
    unescape_key,
)

UTC = dt.timezone.utc
SHANGHAI = ZoneInfo("Asia/Shanghai")
NOW = dt.datetime(2026, 12, 4, 12, 0, tzinfo=UTC)


def ns(moment: dt.datetime) -> int:
    return int(moment.timestamp()) * 1_000_000_000


def test_key_has_vehicle_date_source_and_path() -> None:
    relative = PurePosixPath("2026-12-04-09-00-00-123456-host-42/launch.log")
    mtime = ns(dt.datetime(2026, 12, 4, 9, 0, tzinfo=UTC))

    result = build_key("vehicle-001", "ros", relative, mtime, UTC, NOW)

    assert result.key == "vehicle-001/2026-12-04/ros/2026-12-04-09-00-00-123456-host-42/launch.log"
    assert result.date == dt.date(2026, 12, 4)
    assert result.date_reason is None


def test_date_is_mtime_date_in_zone() -> None:
    mtime = ns(dt.datetime(2026, 12, 4, 17, 30, tzinfo=UTC))

    result = build_key("v", "can", PurePosixPath("a.mcap"), mtime, SHANGHAI, NOW)

    assert result.date == dt.date(2026, 12, 5)
    assert result.key == "v/2026-12-05/can/a.mcap"


def test_mtime_before_2020_uses_detection_date() -> None:
    result = build_key("v", "can", PurePosixPath("a.log"), 0, UTC, NOW)

    assert result.date == dt.date(2026, 12, 4)
    assert result.date_reason is not None
    assert "before 2020-01-01" in result.date_reason


def test_mtime_far_ahead_uses_detection_date() -> None:
    mtime = ns(NOW + dt.timedelta(days=1, minutes=1))

    result = build_key("v", "can", PurePosixPath("a.log"), mtime, UTC, NOW)

    assert result.date == dt.date(2026, 12, 4)
    assert result.date_reason is not None
    assert "ahead of the clock" in result.date_reason


def test_mtime_slightly_ahead_is_kept() -> None:
    mtime = ns(NOW + dt.timedelta(hours=23))

    result = build_key("v", "can", PurePosixPath("a.log"), mtime, UTC, NOW)

    assert result.date == dt.date(2026, 12, 5)
    assert result.date_reason is None


def test_detection_date_is_in_zone() -> None:
    late_evening = dt.datetime(2026, 12, 4, 20, 0, tzinfo=UTC)

    result = build_key("v", "can", PurePosixPath("a.log"), 0, SHANGHAI, late_evening)

    assert result.date == dt.date(2026, 12, 5)


def test_out_of_range_mtime_uses_detection_date() -> None:
    result = build_key("v", "can", PurePosixPath("a.log"), 2**80, UTC, NOW)

    assert result.date == dt.date(2026, 12, 4)
    assert result.date_reason is not None


def test_naive_now_is_rejected() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        build_key("v", "s", PurePosixPath("a"), 0, UTC, dt.datetime(2026, 1, 1))


@pytest.mark.parametrize("relative", ["/etc/passwd", "../x.log", "a/../../x.log", "."])
def test_bad_relative_paths_are_rejected(relative: str) -> None:
    with pytest.raises(ObjectKeyError):
        build_key("v", "s", PurePosixPath(relative), 0, UTC, NOW)


def test_key_over_1024_bytes_is_rejected() -> None:
    long_name = PurePosixPath("é" * (MAX_KEY_BYTES // 2))

    with pytest.raises(ObjectKeyError, match="at most 1024"):
        build_key("v", "s", long_name, 0, UTC, NOW)


@pytest.mark.parametrize(
    ("name", "escaped"),
    [
        ("plain.log", "plain.log"),
        ("with space+plus.log", "with space+plus.log"),
        ("日志 Übersicht.mcap", "日志 Übersicht.mcap"),
        ("dir/sub/file.log", "dir/sub/file.log"),
        ("100%.log", "100%25.log"),
        ("%41", "%2541"),
        ("line\nbreak", "line%0Abreak"),
        ("tab\there", "tab%09here"),
        ("bell\x07\x1f", "bell%07%1F"),
        ("del\x7f", "del%7F"),
        ("nul\x00", "nul%00"),
        (os.fsdecode(b"bad\xff\xfe.log"), "bad%FF%FE.log"),
    ],
)
def test_escape_table(name: str, escaped: str) -> None:
    assert escape_key_segment(name) == escaped
    assert unescape_key(escaped) == name


def test_escaped_key_keeps_subdirectories() -> None:
    relative = PurePosixPath("day 1/new\nline.log")

    result = build_key("v", "s", relative, 0, UTC, NOW)

    assert result.key == "v/2026-12-04/s/day 1/new%0Aline.log"


def test_lone_surrogate_is_rejected() -> None:
    with pytest.raises(ObjectKeyError, match=r"U\+D800"):
        escape_key_segment("a\ud800")


@pytest.mark.parametrize("key", ["50%", "50%4", "50%zz", "%g0"])
def test_malformed_percent_is_rejected(key: str) -> None:
    with pytest.raises(ObjectKeyError, match="not followed by hex"):
        unescape_key(key)


def test_lowercase_hex_is_accepted() -> None:
    assert unescape_key("a%0ab%7f") == "a\nb\x7f"


@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",))))
def test_escape_round_trips_text(text: str) -> None:
    escaped = escape_key_segment(text)

    assert unescape_key(escaped) == text
    assert all(ord(char) >= 0x20 and char != "\x7f" for char in escaped)


@given(st.binary())
def test_escape_round_trips_file_name_bytes(raw: bytes) -> None:
    name = os.fsdecode(raw)

    escaped = escape_key_segment(name)

    assert unescape_key(escaped) == name
    assert os.fsencode(unescape_key(escaped)) == raw
    escaped.encode("utf-8")


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("drive.mcap", "application/octet-stream"),
        ("drive.bag", "application/octet-stream"),
        ("rosbag2_0.db3", "application/vnd.sqlite3"),
        ("launch.log", "text/plain"),
        ("LAUNCH.LOG", "text/plain"),
        ("notes.txt", "text/plain"),
        ("launch.log.gz", "application/gzip"),
        ("bundle.tar.gz", "application/gzip"),
        ("bundle.tar", "application/x-tar"),
        ("trace.zst", "application/zstd"),
        ("params.yaml", "application/yaml"),
        ("stats.json", "application/json"),
        ("frame.png", "image/png"),
        ("no_suffix", "application/octet-stream"),
        ("odd.qqq", "application/octet-stream"),
    ],
)
def test_content_type_table(name: str, expected: str) -> None:
    assert content_type(name) == expected
