"""Notifier against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tvm_upload.notify import Notifier

RECEIVE_TIMEOUT_SECONDS = 2.0


class FakeClock:
    """Monotonic seconds that only move when a test moves them."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[socket.socket]:
    """A datagram socket bound to a path under tmp_path, like systemd's notify socket."""
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(RECEIVE_TIMEOUT_SECONDS)
    sock.bind(str(path))
    yield sock
    sock.close()


@pytest.fixture
def notify_socket(listener: socket.socket, monkeypatch: pytest.MonkeyPatch) -> str:
    """Point NOTIFY_SOCKET at the listener, with no watchdog."""
    address = listener.getsockname()
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    return str(address)


def receive(listener: socket.socket) -> str:
    return listener.recv(65536).decode("utf-8")


def time_monotonic_usec() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def test_ready_sends_ready(notify_socket: str, listener: socket.socket) -> None:
    notifier = Notifier.from_environment()

    notifier.ready()

    assert notifier.enabled
    assert receive(listener) == "READY=1"


def test_status_sends_one_line(notify_socket: str, listener: socket.socket) -> None:
    notifier = Notifier.from_environment()

    notifier.status("Uploading 3 files")
    notifier.status("queue: 2 files\nfailed: 1 file")

    assert receive(listener) == "STATUS=Uploading 3 files"
    assert receive(listener) == "STATUS=queue: 2 files failed: 1 file"


def test_status_replaces_unencodable_text(notify_socket: str, listener: socket.socket) -> None:
    notifier = Notifier.from_environment()

    notifier.status("Uploading bag-\udcff.mcap")

    assert receive(listener) == "STATUS=Uploading bag-?.mcap"


def test_stopping_sends_stopping(notify_socket: str, listener: socket.socket) -> None:
    Notifier.from_environment().stopping()

    assert receive(listener) == "STOPPING=1"


def test_reloading_sends_monotonic_usec(listener: socket.socket) -> None:
    notifier = Notifier(
        socket_address=listener.getsockname(),
        monotonic_ns=lambda: 12_345_678_999,
    )

    notifier.reloading()
    notifier.ready()

    assert receive(listener) == "RELOADING=1\nMONOTONIC_USEC=12345678"
    assert receive(listener) == "READY=1"


def test_reloading_uses_clock_monotonic(listener: socket.socket) -> None:
    notifier = Notifier(socket_address=listener.getsockname())
    before_usec = time_monotonic_usec()

    notifier.reloading()

    after_usec = time_monotonic_usec()
    first_line, second_line = receive(listener).split("\n")
    sent_usec = int(second_line.removeprefix("MONOTONIC_USEC="))
    assert first_line == "RELOADING=1"
    assert before_usec <= sent_usec <= after_usec


def test_abstract_socket_receives(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"tvm-upload-test-{os.getpid()}-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as abstract_listener:
        abstract_listener.settimeout(RECEIVE_TIMEOUT_SECONDS)
        abstract_listener.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)

        notifier = Notifier.from_environment()
        notifier.ready()
        notifier.status("idle")

        assert receive(abstract_listener) == "READY=1"
        assert receive(abstract_listener) == "STATUS=idle"


def test_watchdog_interval_is_half_timeout(listener: socket.socket) -> None:
    environ = {"NOTIFY_SOCKET": listener.getsockname(), "WATCHDOG_USEC": "120000000"}

    notifier = Notifier.from_environment(environ)

    assert notifier.watchdog_interval_seconds == 60.0


def test_watchdog_pings_at_most_every_interval(listener: socket.socket) -> None:
    clock = FakeClock()
    environ = {"NOTIFY_SOCKET": listener.getsockname(), "WATCHDOG_USEC": "10000000"}
    notifier = Notifier.from_environment(environ, clock=clock)

    notifier.watchdog()
    clock.now += 4.9
    notifier.watchdog()
    notifier.status("after the skipped ping")
    clock.now += 0.1
    notifier.watchdog()

    assert receive(listener) == "WATCHDOG=1"
    assert receive(listener) == "STATUS=after the skipped ping"
    assert receive(listener) == "WATCHDOG=1"


def test_watchdog_off_without_watchdog_usec(notify_socket: str, listener: socket.socket) -> None:
    notifier = Notifier.from_environment()

    notifier.watchdog()
    notifier.ready()

    assert notifier.watchdog_interval_seconds is None
    assert receive(listener) == "READY=1"


@pytest.mark.parametrize(
    "extra",
    [
        {"WATCHDOG_USEC": "0"},
        {"WATCHDOG_USEC": "-5"},
        {"WATCHDOG_USEC": "soon"},
        {"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"},
    ],
)
def test_watchdog_off_for_unusable_values(listener: socket.socket, extra: dict[str, str]) -> None:
    environ = {"NOTIFY_SOCKET": listener.getsockname(), **extra}
    notifier = Notifier.from_environment(environ, pid=4242)

    notifier.watchdog()
    notifier.ready()

    assert notifier.watchdog_interval_seconds is None
    assert receive(listener) == "READY=1"


def test_watchdog_on_for_own_pid(listener: socket.socket) -> None:
    environ = {
        "NOTIFY_SOCKET": listener.getsockname(),
        "WATCHDOG_USEC": "10000000",
        "WATCHDOG_PID": "4242",
    }
    notifier = Notifier.from_environment(environ, pid=4242)

    notifier.watchdog()

    assert notifier.watchdog_interval_seconds == 5.0
    assert receive(listener) == "WATCHDOG=1"


def test_unset_socket_is_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "10000000")
    notifier = Notifier.from_environment()

    notifier.ready()
    notifier.status("idle")
    notifier.watchdog()
    notifier.reloading()
    notifier.stopping()

    assert not notifier.enabled
    assert notifier.watchdog_interval_seconds is None


@pytest.mark.parametrize("value", ["", "relative/notify.sock", "vsock:2:1234"])
def test_unusable_socket_value_is_noop(value: str) -> None:
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": value})

    notifier.ready()

    assert not notifier.enabled


def test_send_failure_is_logged_not_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    missing = tmp_path / "gone.sock"
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": str(missing)})
    caplog.set_level(logging.DEBUG, logger="tvm_upload.notify")

    notifier.ready()

    assert notifier.enabled
    assert "Sending READY=1 to the service manager failed" in caplog.text
    assert all(record.levelno == logging.DEBUG for record in caplog.records)
