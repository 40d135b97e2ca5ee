"""``tvm-upload doctor``: checks of the configuration and of everything the daemon relies on.

Each check returns a ``Check`` with status OK, WARN, FAIL or SKIP, a
one-line detail and, when something is wrong, a hint with the next step.
SKIP marks a check that could not run because an earlier one failed (no
credentials, bucket unreachable), so every check has a line in the output.
No check prints a secret: credentials are described by where botocore
found them. The bucket check writes one small probe object under
``{vehicle_id}/.doctor/`` and deletes it again.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import json
import os
import shutil
import sqlite3
import stat
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from botocore.config import Config as BotocoreConfig
from botocore.exceptions import BotoCoreError, ClientError

from tvm_upload.cloudwatch import build_cloudwatch_client
from tvm_upload.config import Config, load_config
from tvm_upload.daemonstatus import process_exists, read_daemon_status
from tvm_upload.errors import ConfigError, ExitCode
from tvm_upload.metrics import watched_disks
from tvm_upload.s3client import (
    QUEUE_ERROR_ADVICE,
    UploaderSettings,
    botocore_config,
    build_session,
)
from tvm_upload.state import QUEUE_STATES, SCHEMA_VERSION, FileState

# A synchronised clock is within a second of S3's, and the Date header has whole
# seconds. S3 rejects requests signed more than 15 minutes off (RequestTimeTooSkewed).
CLOCK_SKEW_WARN_SECONDS = 60.0
CLOCK_SKEW_FAIL_SECONDS = 15 * 60.0
# The daemon rewrites its status file every 10 s, so an older file means no daemon runs.
DAEMON_STATUS_FRESH_SECONDS = 60.0

INOTIFY_WATCHES_PATH = Path("/proc/sys/fs/inotify/max_user_watches")
SERVICE_NAME = "tvm-upload"
COMMAND_TIMEOUT_SECONDS = 5.0
STATE_STORE_TIMEOUT_SECONDS = 5.0
CONNECT_TIMEOUT_SECONDS = 5.0
READ_TIMEOUT_SECONDS = 10.0
PROBE_BODY = b"tvm-upload doctor probe; safe to delete\n"
GiB = 1024**3
# Checks that need a response from S3, in the order they run.
BUCKET_CHECKS = ("bucket", "clock", "bucket write")

CommandRunner = Callable[[Sequence[str]], tuple[int, str]]
"""Runs a command and returns its exit code and its output (stdout and stderr)."""

_TIME_SYNC_HINT = "run time synchronisation (chrony or systemd-timesyncd) and check its status"
_SYSCTL_HINT = (
    "raise the limit: sudo sysctl fs.inotify.max_user_watches=524288, and keep it with a"
    " file in /etc/sysctl.d/"
)


class Status(str, enum.Enum):
    OK = "OK"
    WARN = "WARN"
    FAIL = "FAIL"
    SKIP = "SKIP"


@dataclass(frozen=True)
class Check:
    """The outcome of one check: ``detail`` is one line, and ``hint`` is the next step, if any."""

    name: str
    status: Status
    detail: str
    hint: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "status": self.status.value,
            "detail": self.detail,
            "hint": self.hint,
        }


def run_doctor(
    config_path: Path | str,
    *,
    environ: Mapping[str, str] | None = None,
    clock: Callable[[], float] = time.time,
    run_command: CommandRunner | None = None,
    inotify_watches_path: Path = INOTIFY_WATCHES_PATH,
) -> list[Check]:
    """Run every check and return them in order.

    ``clock`` is wall-clock seconds, compared with the S3 ``Date`` header
    and the daemon's status file. ``run_command`` runs ``systemctl``
    (default: ``subprocess``). When the configuration is invalid, only the
    checks that need no configuration follow.
    """
    service = check_service(run_command or _run_command)
    try:
        config = load_config(config_path, environ)
    except ConfigError as error:
        failed = Check(
            "config",
            Status.FAIL,
            "; ".join(error.problems) or str(error),
            f"fix {config_path} and run 'tvm-upload check-config'",
        )
        return [failed, service]

    checks = [_config_valid(config_path, config), check_log_directories(config)]
    credentials = check_credentials(config)
    checks.append(credentials)
    if credentials.status is Status.FAIL:
        checks += _skipped(BUCKET_CHECKS, "the credentials check failed")
    else:
        checks += check_bucket(config, clock)
    checks.append(check_state_store(config))
    checks.append(check_inotify(config, inotify_watches_path))
    checks += check_disks(config)
    checks.append(check_cloudwatch(config))
    checks.append(check_running_daemon(config, service, clock()))
    return checks


def _skipped(names: Sequence[str], reason: str) -> list[Check]:
    return [Check(name, Status.SKIP, f"not checked: {reason}") for name in names]


def _config_valid(config_path: Path | str, config: Config) -> Check:
    detail = (
        f"{config_path} is valid: vehicle {config.vehicle_id},"
        f" {len(config.log_directories)} log directories, bucket {config.s3.bucket}"
        f" in {config.s3.region}"
    )
    return Check("config", Status.OK, detail)


def check_log_directories(config: Config) -> Check:
    """Check that every watched directory is readable, and writable where retention deletes."""
    missing, unreadable, undeletable = [], [], []
    for directory in config.log_directories:
        path = directory.path
        if not path.exists():
            missing.append(str(path))
        elif not os.access(path, os.R_OK | os.X_OK):
            unreadable.append(str(path))
        elif directory.allow_deletion and not os.access(path, os.W_OK):
            undeletable.append(str(path))

    if unreadable:
        detail = f"cannot read {', '.join(unreadable)}"
        return Check("log directories", Status.FAIL, detail, "give tvm-upload's user read access")
    if missing or undeletable:
        parts = [f"{', '.join(missing)} not found yet (watched once created)"] if missing else []
        if undeletable:
            parts.append(f"retention cannot delete in {', '.join(undeletable)} (not writable)")
        hint = "check the paths, or set allow_deletion: false where deletion is not wanted"
        return Check("log directories", Status.WARN, "; ".join(parts), hint)
    count = len(config.log_directories)
    return Check("log directories", Status.OK, f"all {count} directories are readable")


def _settings(config: Config) -> UploaderSettings:
    return UploaderSettings.from_objects(config.s3, config.upload)


def check_credentials(config: Config) -> Check:
    """Check that botocore finds credentials; report where, never the keys themselves."""
    settings = _settings(config)
    try:
        credentials = build_session(settings).get_credentials()
    except ConfigError as error:
        return Check("credentials", Status.FAIL, "; ".join(error.problems))
    except BotoCoreError as error:
        hint = "check s3.profile and the files in s3.credentials_path"
        return Check("credentials", Status.FAIL, f"cannot load credentials: {error}", hint)

    if credentials is None:
        hint = (
            "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the environment (for the"
            " service, with Environment= in a drop-in), or s3.profile and"
            " s3.credentials_path (docs/credentials.md), or give the vehicle an instance role"
        )
        return Check("credentials", Status.FAIL, "no credentials found", hint)

    where = f" (profile {settings.profile})" if settings.profile else ""
    detail = f"found by botocore's {credentials.method} provider{where}"
    exposed = _exposed_credentials_file(settings.credentials_path)
    if exposed is not None:
        hint = f"chmod 600 {exposed}"
        return Check(
            "credentials",
            Status.WARN,
            f"{detail}; {exposed} is open to other accounts (mode not 600)",
            hint,
        )
    return Check("credentials", Status.OK, detail)


def _exposed_credentials_file(directory: Path | None) -> Path | None:
    if directory is None:
        return None
    path = directory / "credentials"
    try:
        mode = path.stat().st_mode
    except OSError:
        return None
    return path if mode & (stat.S_IRWXG | stat.S_IRWXO) else None


def check_bucket(config: Config, clock: Callable[[], float]) -> list[Check]:
    """Check that the bucket responds, the clock agrees with S3's and a probe object is written."""
    settings = dataclasses.replace(
        _settings(config),
        connect_timeout_seconds=CONNECT_TIMEOUT_SECONDS,
        read_timeout_seconds=READ_TIMEOUT_SECONDS,
    )
    try:
        client = _single_attempt_client(settings)
    except ConfigError as error:
        failed = Check("bucket", Status.FAIL, "; ".join(error.problems))
        return [failed, *_skipped(BUCKET_CHECKS[1:], "no S3 client could be built")]

    endpoint = client.meta.endpoint_url
    sent_at = clock()
    try:
        response = client.head_bucket(Bucket=settings.bucket)
    except ClientError as error:
        response = error.response
        reachable = _bucket_error(settings.bucket, error)
    except BotoCoreError as error:
        detail = f"cannot reach {endpoint}: {error}"
        failed = Check("bucket", Status.FAIL, detail, "check the network and s3.endpoint_url")
        return [failed, *_skipped(BUCKET_CHECKS[1:], "S3 did not respond")]
    else:
        reachable = Check("bucket", Status.OK, f"s3://{settings.bucket} is reachable at {endpoint}")

    local_time = (sent_at + clock()) / 2
    headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    checks = [reachable, check_clock_skew(headers.get("date"), local_time)]
    if reachable.status is Status.OK:
        checks.append(_probe_write(client, config, settings, clock()))
    else:
        checks += _skipped(BUCKET_CHECKS[2:], "the bucket check failed")
    return checks


def _single_attempt_client(settings: UploaderSettings) -> Any:
    """Create the uploader's S3 client, but with one attempt per request, so doctor ends quickly."""
    single = BotocoreConfig(retries={"mode": "standard", "total_max_attempts": 1})
    return build_session(settings).client(
        "s3", endpoint_url=settings.endpoint_url, config=botocore_config(settings).merge(single)
    )


def _bucket_error(bucket: str, error: ClientError) -> Check:
    code = str(error.response.get("Error", {}).get("Code") or "Unknown")
    if code in ("404", "NoSuchBucket"):
        return Check("bucket", Status.FAIL, f"s3://{bucket} does not exist", "check s3.bucket")
    hint = QUEUE_ERROR_ADVICE.get(code, "see the error code in the S3 documentation")
    return Check("bucket", Status.FAIL, f"HEAD of s3://{bucket} failed with {code}", hint)


def check_clock_skew(date_header: str | None, local_time: float) -> Check:
    """Compare wall-clock ``local_time`` with an HTTP ``Date`` header from S3."""
    if not date_header:
        return Check("clock", Status.WARN, "the S3 response had no Date header to compare with")
    try:
        server_time = parsedate_to_datetime(date_header).timestamp()
    except (TypeError, ValueError):
        return Check("clock", Status.WARN, f"cannot parse the S3 Date header {date_header!r}")

    skew = local_time - server_time
    detail = f"local clock is {skew:+.0f} s from S3's Date header"
    if abs(skew) >= CLOCK_SKEW_FAIL_SECONDS:
        reason = "; S3 rejects requests signed 15 minutes off (RequestTimeTooSkewed)"
        return Check("clock", Status.FAIL, detail + reason, _TIME_SYNC_HINT)
    if abs(skew) >= CLOCK_SKEW_WARN_SECONDS:
        return Check("clock", Status.WARN, detail, _TIME_SYNC_HINT)
    return Check("clock", Status.OK, detail)


def _probe_write(client: Any, config: Config, settings: UploaderSettings, now: float) -> Check:
    stamp = dt.datetime.fromtimestamp(now, dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    key = f"{config.vehicle_id}/.doctor/probe-{stamp}"
    try:
        client.put_object(
            Bucket=settings.bucket, Key=key, Body=PROBE_BODY, **settings.extra_put_arguments()
        )
    except (ClientError, BotoCoreError) as error:
        hint = "check s3:PutObject on the vehicle's prefix in the IAM policy"
        return Check(
            "bucket write", Status.FAIL, f"cannot write s3://{settings.bucket}/{key}: {error}", hint
        )

    try:
        client.delete_object(Bucket=settings.bucket, Key=key)
    except (ClientError, BotoCoreError) as error:
        detail = f"wrote s3://{settings.bucket}/{key} but cannot delete it: {error}"
        hint = f"allow s3:DeleteObject on {config.vehicle_id}/.doctor/*, or delete probes by hand"
        return Check("bucket write", Status.WARN, detail, hint)
    return Check("bucket write", Status.OK, f"wrote and deleted s3://{settings.bucket}/{key}")


def check_state_store(config: Config) -> Check:
    """Run ``PRAGMA quick_check`` on a read-only connection to the state store."""
    path = config.state_file
    if not path.exists():
        directory = _existing_ancestor(path.parent)
        if os.access(directory, os.W_OK):
            return Check("state store", Status.OK, f"{path} does not exist yet; created at start")
        hint = f"create {path.parent} and give tvm-upload's user write access"
        return Check("state store", Status.FAIL, f"cannot create {path}", hint)

    try:
        with closing(_read_only_connection(path)) as conn:
            problems = [str(row[0]) for row in conn.execute("PRAGMA quick_check")]
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
            counts = dict(conn.execute("SELECT state, COUNT(*) FROM files GROUP BY state"))
    except sqlite3.Error as error:
        hint = "restart tvm-upload: it moves a damaged store aside and rebuilds the queue"
        return Check("state store", Status.FAIL, f"cannot read {path}: {error}", hint)

    if problems != ["ok"]:
        detail = f"{path} is damaged: {'; '.join(problems[:3])}"
        hint = "restart tvm-upload: it moves the damaged store aside and rebuilds the queue"
        return Check("state store", Status.FAIL, detail, hint)
    if version > SCHEMA_VERSION:
        detail = (
            f"{path} has schema version {version}; this tvm-upload reads up to {SCHEMA_VERSION}"
        )
        return Check("state store", Status.FAIL, detail, "install the newer tvm-upload again")

    queued = sum(counts.get(state.value, 0) for state in QUEUE_STATES)
    failed = counts.get(FileState.FAILED.value, 0)
    detail = f"{path} passed quick_check: {queued} files queued ({failed} failed)"
    return Check("state store", Status.OK, detail)


def _read_only_connection(path: Path) -> sqlite3.Connection:
    """Open the state store read-only without creating its ``-wal`` and ``-shm`` files.

    Files created by doctor would belong to the user running it, often root,
    and the daemon could not open them. Without a ``-wal`` file no process
    has the database open, so it is read as immutable, which creates nothing.
    """
    # NOTE: a daemon that starts during this check may write while the file is read
    # as immutable; quick_check could then report damage that is not there.
    wal = path.with_name(path.name + "-wal")
    query = "mode=ro" if wal.exists() else "mode=ro&immutable=1"
    uri = f"{path.absolute().as_uri()}?{query}"
    return sqlite3.connect(uri, uri=True, timeout=STATE_STORE_TIMEOUT_SECONDS)


def _existing_ancestor(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_inotify(config: Config, watches_path: Path = INOTIFY_WATCHES_PATH) -> Check:
    """Compare the directories to watch with ``fs.inotify.max_user_watches``.

    Other programs of the same user share the limit, so more than half of it
    is a warning. Beyond the limit the daemon keeps working by scanning.
    """
    try:
        limit = int(watches_path.read_text().strip())
    except (OSError, ValueError) as error:
        return Check("inotify", Status.WARN, f"cannot read {watches_path}: {error}")

    needed = _count_watched_directories(config, stop_after=limit)
    detail = f"{needed} directories to watch, max_user_watches is {limit}"
    if needed > limit:
        detail += "; the rest is found by periodic scans only"
        return Check("inotify", Status.WARN, detail, _SYSCTL_HINT)
    if needed > limit // 2:
        return Check("inotify", Status.WARN, detail + "; other programs share it", _SYSCTL_HINT)
    return Check("inotify", Status.OK, detail)


def _count_watched_directories(config: Config, *, stop_after: int) -> int:
    count = 0
    for directory in config.log_directories:
        if not directory.path.is_dir():
            continue
        if not directory.recursive:
            count += 1
            continue
        for _ in os.walk(directory.path):
            count += 1
            if count > stop_after:
                return count
    return count


def check_disks(config: Config) -> list[Check]:
    """Check each filesystem holding a watched directory against the disk thresholds."""
    disk = config.disk
    checks = []
    for usage in watched_disks(directory.path for directory in config.log_directories):
        name = f"disk {usage.mount_point}"
        detail = (
            f"{usage.used_percent:.1f}% used, {usage.free_bytes / GiB:.1f} GiB free"
            f" (warning at {disk.warning_threshold:.0%}, critical at {disk.critical_threshold:.0%})"
        )
        if usage.used_fraction >= disk.critical_threshold:
            hint = "emergency cleanup deletes files not yet uploaded; upload or free space now"
            checks.append(Check(name, Status.FAIL, detail, hint))
        elif usage.used_fraction >= disk.warning_threshold:
            hint = "emergency cleanup deletes uploaded files; check that uploads keep up"
            checks.append(Check(name, Status.WARN, detail, hint))
        else:
            checks.append(Check(name, Status.OK, detail))
    return checks


def check_cloudwatch(config: Config) -> Check:
    """Report whether CloudWatch metrics are on and their endpoint, without sending a request."""
    monitoring = config.monitoring
    if not monitoring.cloudwatch_enabled:
        return Check("cloudwatch", Status.OK, "disabled (monitoring.cloudwatch_enabled: false)")
    try:
        endpoint = build_cloudwatch_client(config).meta.endpoint_url
    except (ConfigError, BotoCoreError) as error:
        return Check("cloudwatch", Status.FAIL, f"cannot create a CloudWatch client: {error}")
    detail = (
        f"namespace {monitoring.namespace} at {endpoint},"
        f" every {monitoring.publish_interval_seconds:g} s"
    )
    return Check("cloudwatch", Status.OK, detail)


def check_service(run_command: CommandRunner) -> Check:
    """Ask systemd whether the tvm-upload service is active."""
    if shutil.which("systemctl") is None and run_command is _run_command:
        return Check("service", Status.WARN, "unknown: systemctl not found")

    code, output = run_command(["systemctl", "is-active", SERVICE_NAME])
    lines = output.strip().splitlines()
    state = lines[0] if lines else "unknown"
    if code == 0 and state == "active":
        return Check("service", Status.OK, f"{SERVICE_NAME}.service is active")
    hint = f"sudo systemctl enable --now {SERVICE_NAME}; journalctl -u {SERVICE_NAME} -b"
    return Check("service", Status.WARN, f"{SERVICE_NAME}.service is not active: {state}", hint)


def check_running_daemon(config: Config, service: Check, now: float) -> Check:
    """Turn a ``service`` WARN into OK when a daemon with this configuration runs outside systemd.

    The daemon rewrites ``daemon-status.json`` beside the state store every
    10 s. A file updated within ``DAEMON_STATUS_FRESH_SECONDS`` of ``now``
    (wall-clock seconds) whose PID is alive means a daemon runs, for
    example ``tvm-upload run`` in a terminal.
    """
    if service.status is Status.OK:
        return service

    pid = _fresh_daemon_pid(config.state_file, now)
    if pid is None:
        return service
    detail = f"daemon running (PID {pid}), not as {SERVICE_NAME}.service"
    return Check("service", Status.OK, detail)


def _fresh_daemon_pid(state_file: Path, now: float) -> int | None:
    status = read_daemon_status(state_file)
    if status is None:
        return None

    pid, updated_at = status.get("pid"), status.get("updated_at")
    if not isinstance(pid, int) or not isinstance(updated_at, (int, float)):
        return None
    if abs(now - updated_at) >= DAEMON_STATUS_FRESH_SECONDS:
        return None
    return pid if process_exists(pid) else None


def _run_command(args: Sequence[str]) -> tuple[int, str]:
    try:
        done = subprocess.run(
            list(args), check=False, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        return -1, str(error)
    return done.returncode, done.stdout + done.stderr


def render_checks(checks: Sequence[Check]) -> str:
    """Render one line per check: status, name, detail and, unless OK, the hint."""
    lines = []
    for check in checks:
        line = f"{check.status.value:<4}  {check.name}: {check.detail}"
        if check.hint and check.status is not Status.OK:
            line += f" (hint: {check.hint})"
        lines.append(line)
    return "\n".join(lines)


def render_checks_json(checks: Sequence[Check]) -> str:
    """Render the checks as one JSON document with ``ok`` false when any check failed."""
    failed = any(check.status is Status.FAIL for check in checks)
    document = {"ok": not failed, "checks": [check.to_dict() for check in checks]}
    return json.dumps(document, indent=2)


def doctor_exit_code(checks: Sequence[Check]) -> ExitCode:
    """Return CONFIG when the configuration is invalid, FAILURE on any other FAIL, else OK."""
    if any(check.name == "config" and check.status is Status.FAIL for check in checks):
        return ExitCode.CONFIG
    if any(check.status is Status.FAIL for check in checks):
        return ExitCode.FAILURE
    return ExitCode.OK
