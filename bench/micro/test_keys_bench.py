"""Object key building, escaping and Content-Type lookup."""

from __future__ import annotations

import datetime as dt
from pathlib import PurePosixPath
from zoneinfo import ZoneInfo

import pytest

from tvm_upload.keys import build_key, content_type, escape_key_segment, unescape_key

pytestmark = pytest.mark.microbench

ZONE = ZoneInfo("Asia/Shanghai")
NOW = dt.datetime(2026, 12, 4, 9, 0, tzinfo=dt.timezone.utc)
MTIME_NS = 1_796_374_800_000_000_000
RELATIVE = PurePosixPath("ros/2026-12-04-09-00-00-123456-host-42/planning_container-12-stdout.log")
ODD_NAME = "ros/run 7/50%\tdone\nnode.log"


def test_build_key_typical_path(benchmark) -> None:  # type: ignore[no-untyped-def]
    object_key = benchmark(build_key, "vehicle-001", "ros", RELATIVE, MTIME_NS, ZONE, NOW)

    assert object_key.key.startswith("vehicle-001/2026-12-04/ros/ros/")
    assert object_key.date_reason is None


def test_escape_name_with_control_characters(benchmark) -> None:  # type: ignore[no-untyped-def]
    escaped = benchmark(escape_key_segment, ODD_NAME)

    assert escaped == "ros/run 7/50%25%09done%0Anode.log"


def test_unescape_escaped_name(benchmark) -> None:  # type: ignore[no-untyped-def]
    escaped = escape_key_segment(ODD_NAME)

    assert benchmark(unescape_key, escaped) == ODD_NAME


def test_content_type_of_log_file(benchmark) -> None:  # type: ignore[no-untyped-def]
    assert benchmark(content_type, "launch.log") == "text/plain"
