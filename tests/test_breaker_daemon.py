"""Adversarial tests: two daemons, a hostile control socket client, damaged state, clock steps."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import stat
import time
from pathlib import Path

import pytest
from breaker_support import Daemon, FakeClock, held_upload_settings, make_config, run_cli
from daemon_process import bucket_keys, wait_for
from upload_support import make_uploader

from tvm_upload.dispatcher import Dispatcher
from tvm_upload.errors import ExitCode
from tvm_upload.files import FileIdentity
from tvm_upload.state import StateStore

DAY_SECONDS = 86400.0


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    root = tmp_path / "logs"
    root.mkdir()
    return root


def test_second_daemon_on_same_state_store_exits(
    tmp_path: Path, logs: Path, seaweed, bucket: str
) -> None:
    # Given a running daemon
    first = Daemon(tmp_path, seaweed.endpoint_url, bucket, [{"path": logs, "source": "logs"}])
    second = Daemon(
        tmp_path,
        seaweed.endpoint_url,
        bucket,
        [{"path": logs, "source": "logs"}],
        log_name="second.log",
    )
    with first.start_and_wait():
        try:
            # When a second one starts with the same configuration, as after a unit copied
            # under another name or a manual start beside the service
            second.start()
            wait_for(lambda: second.exited() or "Started:" in second.log, 20, "second settled")
            time.sleep(1)
            second_exited = second.exited()
        finally:
            second.kill()

        # Then the second exits with an error naming the state store, and the first one
        # still responds on its control socket
        reply = run_cli(first.config, "upload-now")

    assert second_exited, second.log
    assert second.process is not None and second.process.returncode != 0
    assert str(first.state_file) in second.log
    assert reply.returncode == ExitCode.OK, reply.stderr


def control_exchange(path: Path, payload: bytes) -> bytes:
    """Send ``payload``, close the sending side and return the reply line."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.connect(str(path))
        try:
            client.sendall(payload)
            client.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the daemon stops reading after its line limit
        return client.makefile("rb").readline()


HOSTILE_REQUESTS = [
    b"garbage\n",
    b"\xff\xfe\xfd\n",
    b"[1, 2]\n",
    b'{"command": 5}\n',
    b"{}\n",
    b"",
    b"[" * 5000 + b"\n",
    b"x" * 1_000_000,
    b'{"command": "upload-now", "pad": "' + b"a" * 8000 + b'"}\n',
]


def test_control_socket_survives_hostile_clients(
    tmp_path: Path, logs: Path, seaweed, bucket: str, s3
) -> None:
    daemon = Daemon(
        tmp_path,
        seaweed.endpoint_url,
        bucket,
        [{"path": logs, "source": "logs"}],
        upload=held_upload_settings(),
    )
    with daemon.start_and_wait():
        control = daemon.state_file.parent / "control.sock"

        # Given the control socket, only its owner may connect
        assert stat.S_IMODE(os.stat(control).st_mode) == 0o600

        # When a client sends garbage, invalid UTF-8, deep nesting and oversized lines
        for payload in HOSTILE_REQUESTS:
            reply = json.loads(control_exchange(control, payload))
            assert reply["ok"] is False, payload[:40]

        # And twenty clients connect and send nothing
        silent = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(20)]
        for client in silent:
            client.connect(str(control))
        try:
            # Then an upload request still works
            (logs / "a.log").write_bytes(b"a\n")
            wait_for(lambda: daemon.summary().pending_count == 1, 15, "a.log queued")
            result = run_cli(daemon.config, "upload-now", "--wait", "--timeout", "20")
            assert result.returncode == ExitCode.OK, result.stderr

            # And a stop is not held up by the silent clients
            started = time.monotonic()
            assert daemon.stop(signal.SIGTERM, timeout=15) == 0
            assert time.monotonic() - started < 5
        finally:
            for client in silent:
                client.close()

    assert len(bucket_keys(s3, bucket)) == 1


def damage(state_file: Path, kind: str) -> None:
    state_file.parent.mkdir(parents=True, exist_ok=True)
    if kind == "random bytes":
        state_file.write_bytes(os.urandom(8192))
    elif kind == "sqlite header only":
        state_file.write_bytes(b"SQLite format 3\x00" + b"\x00" * 50)
    elif kind == "empty file":
        state_file.write_bytes(b"")
    elif kind == "directory":
        state_file.mkdir()
    elif kind == "newer schema":
        with sqlite3.connect(state_file) as conn:
            conn.execute("PRAGMA user_version = 99")
            conn.execute("CREATE TABLE future (x)")


@pytest.mark.parametrize(
    "kind", ["random bytes", "sqlite header only", "empty file", "directory", "newer schema"]
)
def test_status_on_damaged_state_store_fails_cleanly(tmp_path: Path, logs: Path, kind: str) -> None:
    # Given a state store file that is damaged in some way
    daemon = Daemon(
        tmp_path, "http://127.0.0.1:9", "unused-bucket", [{"path": logs, "source": "logs"}]
    )
    damage(daemon.state_file, kind)
    before = sorted(p.name for p in daemon.state_file.parent.iterdir())

    # When the operator runs status
    result = run_cli(daemon.config, "status", "--json")

    # Then it fails with one line naming the store, leaves the files alone, and shows no traceback
    assert result.returncode == ExitCode.CANT_CREATE, result.stdout + result.stderr
    assert str(daemon.state_file) in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in daemon.state_file.parent.iterdir()) == before


def test_backward_clock_step_does_not_stall_retries(
    tmp_path: Path, logs: Path, seaweed, bucket: str, s3
) -> None:
    # Given a queued file whose first attempt failed, due again in 1 s (max delay 2 s)
    path = logs / "a.log"
    path.write_bytes(b"retry me\n")
    config = make_config(
        tmp_path,
        [{"path": logs, "source": "logs"}],
        upload={"retry": {"initial_delay_seconds": 1, "max_delay_seconds": 2}},
    )
    config.state_file.parent.mkdir()
    clock = FakeClock()
    uploader = make_uploader(seaweed.endpoint_url, bucket)
    with StateStore(config.state_file, clock.time) as store:
        store.enqueue(path, "logs", FileIdentity.of(path), "test-vehicle/2026-12-04/logs/a.log")
        (record,) = store.claim(clock.time(), 1)
        store.mark_retry(record.id, "connection reset", next_attempt_at=clock.time() + 1)

        # When NTP steps the wall clock back by one day, then 10 s pass
        clock.wall -= DAY_SECONDS
        dispatcher = Dispatcher(config, store, uploader, clock)
        dispatcher.request_drain(include_failed=True)
        for _ in range(100):
            dispatcher.step()
            clock.advance(0.1)
            time.sleep(0.02)
        dispatcher.stop(5)
        uploaded = store.summary(clock.time()).uploaded_count
    uploader.close()

    # Then the file was retried and uploaded: no delay exceeds max_delay_seconds
    assert uploaded == 1
    assert bucket_keys(s3, bucket) == {"test-vehicle/2026-12-04/logs/a.log"}
