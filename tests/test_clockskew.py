"""Clock skew measured from response Date headers, and signing with the corrected time.

The unit tests inject a clock. The HTTP tests put a fault proxy in front of SeaweedFS
that acts as a store whose clock is 20 minutes off and that rejects requests signed
more than 15 minutes away from it, as S3 does.
"""

from __future__ import annotations

import email.utils
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from daemon_process import bucket_contents, wait_for
from fault_support import all_uploaded, log_lines, start_daemon, write_file
from faultproxy import FaultProxy

from tvm_upload.clockskew import ClockSkewMonitor, describe_skew, skew_from_date
from tvm_upload.localserver import SeaweedServer, s3_client

STORE_OFFSETS_SECONDS = [1200.0, -1200.0]

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
    assert "beyond the 15 minutes" in warnings[0].getMessage()
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
    assert "below the 15 minutes" in caplog.records[0].getMessage()


def test_signing_offset_follows_skew() -> None:
    monitor = monitor_with(FakeClock())
    assert monitor.signing_offset_seconds() == 0

    monitor.observe(date_header(NOW + 1200))
    assert monitor.signing_offset_seconds() == 1200

    monitor.observe(date_header(NOW - 30))
    assert monitor.signing_offset_seconds() == 0


@pytest.fixture
def proxy(seaweed: SeaweedServer) -> Iterator[FaultProxy]:
    with FaultProxy(seaweed.endpoint_url) as running:
        yield running


@pytest.mark.parametrize("store_offset", STORE_OFFSETS_SECONDS)
def test_client_signs_with_store_time(
    proxy: FaultProxy, bucket: str, store_offset: float, caplog: pytest.LogCaptureFixture
) -> None:
    """Given a store 20 minutes off, the first PUT is rejected and sent once more, signed
    with the store's time. Later requests, a HEAD included, are accepted the first time."""
    proxy.shift_clock(store_offset)
    client = s3_client(proxy.endpoint_url)
    ClockSkewMonitor().attach(client)

    client.put_object(Bucket=bucket, Key="a.log", Body=b"first")
    client.put_object(Bucket=bucket, Key="b.log", Body=b"second")
    head = client.head_object(Bucket=bucket, Key="a.log")

    statuses = [(record.method, record.status) for record in proxy.records]
    assert statuses == [("PUT", 403), ("PUT", 200), ("PUT", 200), ("HEAD", 200)]
    assert head["ContentLength"] == 5
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert re.search(r"the system clock is 1(199|200|201) s \(20\.0 min\)", warnings[0])


def test_rejected_head_is_sent_again(proxy: FaultProxy, bucket: str) -> None:
    """S3 sends a bare 403 to a HEAD signed too far off; its Date alone shows the skew."""
    proxy.shift_clock(-1200)
    client = s3_client(proxy.endpoint_url)
    ClockSkewMonitor().attach(client)

    with pytest.raises(client.exceptions.ClientError) as raised:
        client.head_object(Bucket=bucket, Key="missing.log")

    assert raised.value.response["Error"]["Code"] == "404"
    assert [record.status for record in proxy.records] == [403, 404]


def test_access_denied_is_not_sent_again(proxy: FaultProxy, bucket: str) -> None:
    """A 403 from a store whose clock agrees is no reason to send the request again."""
    proxy.respond_error(403, "AccessDenied")
    client = s3_client(proxy.endpoint_url)
    ClockSkewMonitor().attach(client)

    with pytest.raises(client.exceptions.ClientError):
        client.put_object(Bucket=bucket, Key="a.log", Body=b"data")

    assert len(proxy.records) == 1


@pytest.mark.parametrize("store_offset", STORE_OFFSETS_SECONDS)
def test_daemon_uploads_with_store_20_minutes_off(
    tmp_path: Path, proxy: FaultProxy, bucket: str, s3: Any, store_offset: float
) -> None:
    """Given the daemon's clock 20 minutes off the store's, every file is uploaded and one
    WARNING states the skew."""
    logs = tmp_path / "logs"
    logs.mkdir()
    files = {f"f{n}.log": write_file(logs / f"f{n}.log", 50_000) for n in range(3)}
    proxy.shift_clock(store_offset)

    with start_daemon(tmp_path, proxy.endpoint_url, bucket, logs) as daemon:
        wait_for(lambda: all_uploaded(tmp_path / "state" / "state.db", set(files)), 20, "uploads")
        assert daemon.stop() == 0

    direction = "behind" if store_offset > 0 else "ahead of"
    warnings = log_lines(daemon.log, "WARNING", "Clock skew")
    assert len(warnings) == 1, warnings
    assert re.search(
        rf"the system clock is 1(199|200|201) s \(20\.0 min\) {direction}", warnings[0]
    )
    assert log_lines(daemon.log, "ERROR") == []
    stored = {key.rsplit("/", 1)[-1]: body for key, body in bucket_contents(s3, bucket).items()}
    assert stored == files
