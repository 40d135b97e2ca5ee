"""Adversarial tests: hostile configuration files, and secrets in logs, status and doctor output."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from breaker_support import (
    ACCESS_KEY_ID,
    SECRET_ACCESS_KEY,
    Daemon,
    run_cli,
)
from daemon_process import wait_for
from faultproxy import FaultProxy

from tvm_upload.config import parse_config
from tvm_upload.errors import ConfigError, ExitCode


def minimal(path: object) -> dict[str, object]:
    return {
        "vehicle_id": "vehicle-001",
        "log_directories": [{"path": str(path), "source": "logs"}],
        "s3": {"bucket": "fleet-logs", "region": "cn-north-1"},
    }


def root_spellings(tmp_path: Path) -> dict[str, str]:
    link = tmp_path / "root-link"
    link.symlink_to("/")
    return {"double slash": "//", "dot dot": "/tmp/..", "symlink to /": str(link)}


@pytest.mark.parametrize("spelling", ["double slash", "dot dot", "symlink to /"])
def test_root_directory_rejected_however_spelled(tmp_path: Path, spelling: str) -> None:
    # Given a log directory that is the root directory under another spelling,
    # which would upload, and let retention delete from, the whole system
    path = root_spellings(tmp_path)[spelling]

    # When the configuration is validated, then it is rejected naming the key
    with pytest.raises(ConfigError) as caught:
        parse_config(minimal(path))
    assert "log_directories[0].path" in str(caught.value)
    assert "root directory" in str(caught.value)


def test_root_directory_rejected_as_written() -> None:
    for path in ("/", "/.", "///", "/./"):
        with pytest.raises(ConfigError, match=r"log_directories\[0\]\.path"):
            parse_config(minimal(path))


def alias_bomb(levels: int) -> str:
    """Return a YAML document whose aliases expand to 10**levels strings under one key."""
    lines = ['a0: &a0 ["x", "x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    for level in range(1, levels + 1):
        aliases = ", ".join([f"*a{level - 1}"] * 10)
        lines.append(f"a{level}: &a{level} [{aliases}]")
    lines += [
        "vehicle_id: vehicle-001",
        "log_directories: [{path: /data/logs, source: logs}]",
        "s3: {bucket: fleet-logs, region: cn-north-1}",
    ]
    return "\n".join(lines) + "\n"


def test_yaml_alias_bomb_rejected_quickly(tmp_path: Path) -> None:
    # Given a 1 KB file whose aliases expand to 10**9 strings
    config = tmp_path / "config.yaml"
    config.write_text(alias_bomb(8))

    # When it is checked, then it is rejected within seconds as an invalid configuration
    try:
        result = run_cli_with_timeout(config, "check-config", timeout_seconds=5)
    except subprocess.TimeoutExpired:
        pytest.fail("check-config did not finish within 5 s")
    assert result.returncode == ExitCode.CONFIG, result.stderr


def run_cli_with_timeout(
    config: Path, command: str, *, timeout_seconds: float
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tvm_upload", command, "--config", str(config)],
        capture_output=True,
        check=False,
        text=True,
        timeout=timeout_seconds,
    )


RECURSIVE_DOCUMENTS = {
    "self alias": "a: &a [*a]\n",
    "deep list": "a: " + "[" * 20000 + "]" * 20000 + "\n",
    "deep mapping": "a: " + "{b: " * 3000 + "1" + "}" * 3000 + "\n",
}


@pytest.mark.parametrize("shape", list(RECURSIVE_DOCUMENTS))
def test_recursive_yaml_is_a_configuration_error(tmp_path: Path, shape: str) -> None:
    # Given an otherwise valid file with one self-referencing or very deeply nested value
    config = tmp_path / "config.yaml"
    config.write_text(alias_bomb(0).split("\n", 1)[1] + RECURSIVE_DOCUMENTS[shape])

    # When it is checked, then it is an invalid configuration (exit 78, so systemd does
    # not restart in a loop), reported without a traceback
    result = run_cli_with_timeout(config, "check-config", timeout_seconds=30)
    assert result.returncode == ExitCode.CONFIG, result.stderr[-500:]
    assert "Traceback" not in result.stderr


def test_state_file_inside_log_directory_rejected(tmp_path: Path) -> None:
    # Given a state store placed inside a watched directory that allows deletion, where
    # the daemon would upload its own database again and again and retention could delete it
    data = minimal(tmp_path / "logs")
    data["state_file"] = str(tmp_path / "logs" / "state" / "state.db")

    # When the configuration is validated, then it is rejected naming both keys
    with pytest.raises(ConfigError) as caught:
        parse_config(data)
    assert "state_file" in str(caught.value)
    assert "log_directories[0]" in str(caught.value)


@pytest.mark.xfail(
    reason="a configuration error shows the value expanded from ${VAR}, even a secret",
    strict=True,
)
def test_config_error_hides_secret_variable(tmp_path: Path) -> None:
    # Given a configuration that mistakenly takes a value from a secret variable
    config = tmp_path / "config.yaml"
    config.write_text(
        textwrap.dedent(
            f"""\
            vehicle_id: ${{FLEET_UPLOAD_TOKEN}}
            log_directories: [{{path: {tmp_path / "logs"}, source: logs}}]
            s3: {{bucket: fleet-logs, region: cn-north-1}}
            state_file: {tmp_path / "state" / "state.db"}
            """
        )
    )
    env = {"FLEET_UPLOAD_TOKEN": SECRET_ACCESS_KEY}

    # When it is checked, and when the daemon is started with it
    checked = run_cli(config, "check-config", env=env)
    started = run_cli(config, "run", env=env)

    # Then both reject it, naming the key, without printing the secret
    for result in (checked, started):
        output = result.stdout + result.stderr
        assert result.returncode == ExitCode.CONFIG, output
        assert "vehicle_id" in output
        assert SECRET_ACCESS_KEY not in output


def test_text_log_traceback_is_redacted() -> None:
    # Given the daemon's logging in text format, when an error with a secret is logged
    # with its traceback, as the dispatcher does for an unexpected upload failure
    program = textwrap.dedent(
        f"""\
        import logging
        from tvm_upload.logsetup import configure_logging

        configure_logging("INFO", "text")
        try:
            raise RuntimeError("rejected aws_secret_access_key={SECRET_ACCESS_KEY} {ACCESS_KEY_ID}")
        except RuntimeError:
            logging.getLogger("tvm_upload.dispatcher").exception("Upload failed unexpectedly")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, check=False, timeout=30
    )

    # Then neither the secret nor the access key id is written
    assert "Upload failed unexpectedly" in result.stderr
    assert SECRET_ACCESS_KEY not in result.stderr
    assert ACCESS_KEY_ID not in result.stderr


@pytest.fixture
def recognisable_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY)


def start_behind_proxy(tmp_path: Path, proxy: FaultProxy, bucket: str, **upload: object) -> Daemon:
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    settings = {
        "file_stable_seconds": 1,
        "max_attempts": 1,
        "retry": {"initial_delay_seconds": 0.2, "max_delay_seconds": 1},
        **upload,
    }
    textfile = tmp_path / "metrics" / "tvm_upload.prom"
    textfile.parent.mkdir(exist_ok=True)
    monitoring = {"prometheus": {"textfile_path": str(textfile)}}
    daemon = Daemon(
        tmp_path,
        proxy.endpoint_url,
        bucket,
        [{"path": logs, "source": "logs"}],
        upload=settings,
        monitoring=monitoring,
    )
    return daemon.start_and_wait()


def leaky_put_error(proxy: FaultProxy) -> None:
    """Make the next PUT fail with an S3 error whose text echoes the request's credentials."""
    message = (
        f"Request from {ACCESS_KEY_ID} rejected: X-Amz-Credential={ACCESS_KEY_ID}/20261204"
        f" aws_secret_access_key={SECRET_ACCESS_KEY}"
    )
    proxy.respond_error(
        400, "InvalidArgument", message=message, match=lambda method, path, headers: method == "PUT"
    )


def test_credentials_never_in_log_doctor_or_metrics(
    tmp_path: Path, seaweed, bucket: str, recognisable_credentials: None
) -> None:
    with FaultProxy(seaweed.endpoint_url) as proxy:
        daemon = start_behind_proxy(tmp_path, proxy, bucket)
        with daemon:
            # Given one upload that succeeds and one that fails with an error echoing credentials
            (tmp_path / "logs" / "fine.log").write_bytes(b"fine\n")
            wait_for(lambda: daemon.uploaded_lines(), 20, "fine.log uploaded")
            leaky_put_error(proxy)
            (tmp_path / "logs" / "leaky.log").write_bytes(b"leaky\n")
            wait_for(lambda: daemon.summary().failed_count == 1, 20, "leaky.log failed")

            # When the operator reads the log, doctor, check-config and the metrics textfile
            wait_for(lambda: (tmp_path / "metrics" / "tvm_upload.prom").exists(), 20, "metrics")
            outputs = {
                "log": daemon.log,
                "doctor": run_cli(daemon.config, "doctor", "--json").stdout,
                "check-config": run_cli(daemon.config, "check-config").stdout,
                "metrics": (tmp_path / "metrics" / "tvm_upload.prom").read_text(),
            }

    # Then none of them shows the access key id or the secret
    assert "failed" in outputs["log"]
    for name, text in outputs.items():
        assert ACCESS_KEY_ID not in text, name
        assert SECRET_ACCESS_KEY not in text, name


def test_credentials_never_in_status(
    tmp_path: Path, seaweed, bucket: str, recognisable_credentials: None
) -> None:
    with FaultProxy(seaweed.endpoint_url) as proxy:
        daemon = start_behind_proxy(tmp_path, proxy, bucket)
        with daemon:
            # Given an upload that failed with an S3 error echoing the credentials
            leaky_put_error(proxy)
            (tmp_path / "logs" / "leaky.log").write_bytes(b"leaky\n")
            wait_for(lambda: daemon.summary().failed_count == 1, 20, "leaky.log failed")

            # When the operator runs status, as text and as JSON
            texts = [run_cli(daemon.config, "status").stdout]
            report = run_cli(daemon.config, "status", "--json").stdout
            texts.append(report)

    # Then the failure is listed, without the access key id or the secret
    assert json.loads(report)["failed"]["count"] == 1
    for text in texts:
        assert ACCESS_KEY_ID not in text
        assert SECRET_ACCESS_KEY not in text


def test_reload_of_recursive_yaml_keeps_daemon_running(
    tmp_path: Path, seaweed, bucket: str, s3
) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    daemon = Daemon(tmp_path, seaweed.endpoint_url, bucket, [{"path": logs, "source": "logs"}])
    with daemon.start_and_wait():
        # Given a running daemon, when its file gains a self-referencing alias and SIGHUP comes
        with daemon.config.open("a") as handle:
            handle.write(RECURSIVE_DOCUMENTS["self alias"])
        assert daemon.process is not None
        daemon.process.send_signal(signal.SIGHUP)
        wait_for(
            lambda: daemon.exited() or "Kept the running configuration" in daemon.log,
            15,
            "reload handled",
        )

        # Then it keeps running on the old configuration and still uploads
        assert not daemon.exited(), daemon.log[-2000:]
        (logs / "after-reload.log").write_bytes(b"after\n")
        wait_for(lambda: daemon.uploaded_lines(), 20, "upload after the reload")
