"""Tests of config.yaml loading, validation, messages and defaults."""

from __future__ import annotations

import copy
import datetime as dt
import logging
import os
import pwd
import zoneinfo
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from tvm_upload.config import (
    DEFAULT_EXCLUDES,
    Config,
    LogDirectory,
    load_config,
    parse_config,
    system_zone,
)
from tvm_upload.errors import ConfigError, ExitCode

REPOSITORY = Path(__file__).resolve().parents[1]
ENVIRON = {"HOME": "/home/autoware", "USER": "autoware"}


def minimal(tmp_path: Path) -> dict[str, Any]:
    return {
        "vehicle_id": "vehicle-CN-001",
        "log_directories": [
            {"path": str(tmp_path / "ros"), "source": "ros"},
            {"path": str(tmp_path / "bags"), "source": "bags"},
        ],
        "s3": {"bucket": "t01logs", "region": "cn-north-1"},
    }


def with_value(data: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """Return a copy of ``data`` with ``value`` at a key path like ``upload.retry.x``."""
    result = copy.deepcopy(data)
    node: Any = result
    parts = [int(part) if part.isdigit() else part for part in dotted.split(".")]
    for part in parts[:-1]:
        if isinstance(part, str) and part not in node:
            node[part] = {}
        node = node[part]
    node[parts[-1]] = value
    return result


def problems_of(data: Any, environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, environ=ENVIRON if environ is None else environ)
    assert caught.value.exit_code == ExitCode.CONFIG
    assert int(caught.value.exit_code) == 78
    return caught.value.problems


def problem_at(problems: list[str], key_path: str) -> str:
    """Return the one message about ``key_path``."""
    found = [p for p in problems if p.startswith(f"{key_path}: ")]
    assert len(found) == 1, f"expected one message for {key_path} in {problems}"
    return found[0]


def write(tmp_path: Path, text: str, name: str = "config.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# Defaults and convenience properties.


def test_minimal_config_fills_every_default(tmp_path: Path) -> None:
    config = parse_config(minimal(tmp_path), environ=ENVIRON)

    assert config.timezone is None
    assert config.state_file == Path("/var/lib/tvm-upload/state.db")
    directory = config.log_directories[0]
    assert directory.pattern == ["*"]
    assert directory.exclude == DEFAULT_EXCLUDES
    assert directory.recursive is True
    assert directory.allow_deletion is True
    assert config.s3.profile is None
    assert config.s3.credentials_path is None
    assert config.s3.endpoint_url is None
    assert config.s3.addressing_style == "auto"
    assert config.s3.storage_class == "STANDARD"
    assert config.s3.server_side_encryption is None
    assert config.s3.checksum_algorithm == "CRC32C"


def test_upload_defaults(tmp_path: Path) -> None:
    upload = parse_config(minimal(tmp_path), environ=ENVIRON).upload

    assert upload.schedule.mode == "interval"
    assert upload.schedule.daily_time == dt.time(15, 0)
    assert upload.schedule.interval_seconds == 2 * 3600
    assert upload.file_stable_seconds == 60
    assert upload.operational_hours.enabled is False
    assert upload.batch_upload.enabled is True
    assert upload.upload_on_start is True
    assert upload.scan_existing_files.enabled is True
    assert upload.scan_existing_files.max_age_days == 3
    assert upload.queue_file == Path("/var/lib/tvm-upload/queue.json")
    assert upload.processed_files_registry.registry_file == Path(
        "/var/lib/tvm-upload/processed_files.json"
    )
    assert upload.processed_files_registry.retention_days == 30
    assert upload.max_concurrency == 4
    assert upload.max_attempts == 10
    assert upload.multipart_threshold_mb == 64
    assert upload.multipart_threshold_bytes == 64 * 1024 * 1024
    assert upload.reconcile_interval_seconds == 300
    assert upload.retry.initial_delay_seconds == 1
    assert upload.retry.max_delay_seconds == 600


def test_retention_and_monitoring_defaults(tmp_path: Path) -> None:
    config = parse_config(minimal(tmp_path), environ=ENVIRON)

    assert config.deletion.after_upload.enabled is True
    assert config.deletion.after_upload.keep_days == 14
    assert config.deletion.age_based.enabled is False
    assert config.deletion.age_based.max_age_days == 7
    assert config.deletion.age_based.schedule_time == dt.time(2, 0)
    assert config.deletion.age_based.include_not_uploaded is False
    assert config.deletion.emergency.enabled is True
    assert config.disk.reserved_gb == 70
    assert config.disk.reserved_bytes == 70 * 1024**3
    assert config.disk.warning_threshold == 0.90
    assert config.disk.critical_threshold == 0.95
    assert config.monitoring.cloudwatch_enabled is False
    assert config.monitoring.publish_interval_seconds == 300
    assert config.monitoring.namespace == "TVM/Upload"
    assert config.monitoring.prometheus.enabled is False
    assert config.monitoring.prometheus.port == 9798
    assert config.monitoring.prometheus.textfile_path is None
    assert config.s3_lifecycle.retention_days == 14


def test_config_is_frozen(tmp_path: Path) -> None:
    config = parse_config(minimal(tmp_path), environ=ENVIRON)

    with pytest.raises(ValidationError):
        config.vehicle_id = "other"
    with pytest.raises(ValidationError):
        config.upload.max_attempts = 3


@pytest.mark.parametrize(
    ("start", "end", "inside", "outside"),
    [
        ("09:00", "18:00", ["09:00", "12:30", "17:59"], ["08:59", "18:00", "23:00"]),
        ("22:00", "06:00", ["22:00", "23:59", "00:00", "05:59"], ["06:00", "12:00", "21:59"]),
    ],
)
def test_operational_hours_window(
    tmp_path: Path, start: str, end: str, inside: list[str], outside: list[str]
) -> None:
    window = {"enabled": True, "start": start, "end": end}
    data = with_value(minimal(tmp_path), "upload.operational_hours", window)
    hours = parse_config(data, environ=ENVIRON).upload.operational_hours

    for text in inside:
        assert hours.permits(dt.time.fromisoformat(text)), text
    for text in outside:
        assert not hours.permits(dt.time.fromisoformat(text)), text


def test_disabled_operational_hours_permit_any_time(tmp_path: Path) -> None:
    hours = parse_config(minimal(tmp_path), environ=ENVIRON).upload.operational_hours

    assert hours.permits(dt.time(3, 0))


def test_none_words_and_case_are_normalised(tmp_path: Path) -> None:
    s3 = {
        "bucket": "t01logs",
        "region": "cn-north-1",
        "server_side_encryption": "none",
        "checksum_algorithm": "crc32c",
        "addressing_style": "PATH",
        "storage_class": "standard_ia",
    }
    config = parse_config(with_value(minimal(tmp_path), "s3", s3), environ=ENVIRON)

    assert config.s3.server_side_encryption is None
    assert config.s3.checksum_algorithm == "CRC32C"
    assert config.s3.addressing_style == "path"
    assert config.s3.storage_class == "STANDARD_IA"


@pytest.mark.parametrize("value", [None, "none", "None"])
def test_checksum_can_be_turned_off(tmp_path: Path, value: str | None) -> None:
    data = with_value(minimal(tmp_path), "s3.checksum_algorithm", value)

    assert parse_config(data, environ=ENVIRON).s3.checksum_algorithm == "none"


def test_other_store_accepts_any_region_name(tmp_path: Path) -> None:
    s3 = {"bucket": "logs", "region": "garage", "endpoint_url": "http://127.0.0.1:8333"}
    config = parse_config(with_value(minimal(tmp_path), "s3", s3), environ=ENVIRON)

    assert config.s3.region == "garage"
    assert config.s3.endpoint_url == "http://127.0.0.1:8333"


# Invalid values: every message names the key path, the value and a hint.

INVALID = [
    ("vehicle_id", "vehicle 01", "vehicle_id", '"vehicle 01"', "letters, digits"),
    ("vehicle_id", 12345, "vehicle_id", "12345", "text string"),
    ("vehicle_id", "..", "vehicle_id", '".."', "only of dots"),
    ("timezone", "Asia/Shangai", "timezone", '"Asia/Shangai"', 'did you mean "Asia/Shanghai"'),
    ("log_directories", [], "log_directories", "[]", "at least 1 item"),
    ("log_directories", "/var/log", "log_directories", '"/var/log"', "must be a list"),
    ("log_directories.0.source", "ros-1", "log_directories[0].source", '"ros-1"', "letters"),
    ("log_directories.0.path", "logs/ros", "log_directories[0].path", '"logs/ros"', "relative"),
    ("log_directories.0.path", "/", "log_directories[0].path", '"/"', "root directory"),
    ("log_directories.0.pattern", "", "log_directories[0].pattern", '""', "empty glob"),
    ("log_directories.0.pattern", "a/*.log", "log_directories[0].pattern", "a/*.log", "base name"),
    ("log_directories.0.recursive", "maybe", "log_directories[0].recursive", "maybe", "true or"),
    ("s3.bucket", "Bad_Bucket", "s3.bucket", '"Bad_Bucket"', "lowercase letters"),
    ("s3.bucket", "ab", "s3.bucket", '"ab"', "3 to 63"),
    ("s3.bucket", "192.168.1.10", "s3.bucket", '"192.168.1.10"', "IP address"),
    ("s3.bucket", "logs-", "s3.bucket", '"logs-"', "begin and end"),
    ("s3.region", "invalid-region-name-123", "s3.region", "invalid-region-name-123", "AWS region"),
    ("s3.endpoint_url", "ftp://host", "s3.endpoint_url", '"ftp://host"', "http://"),
    ("s3.addressing_style", "dns", "s3.addressing_style", '"dns"', "virtual"),
    ("s3.storage_class", "COLD", "s3.storage_class", '"COLD"', "storage class"),
    ("s3.server_side_encryption", "kms", "s3.server_side_encryption", '"kms"', "aws:kms"),
    ("s3.checksum_algorithm", "MD5", "s3.checksum_algorithm", '"MD5"', "'CRC32C' or 'none'"),
    ("s3.credentials_path", ".aws", "s3.credentials_path", '".aws"', "relative"),
    ("upload.schedule.mode", "weekly", "upload.schedule.mode", '"weekly"', "'daily'"),
    ("upload.schedule.interval_hours", 25, "upload.schedule.interval_hours", "25", "24"),
    ("upload.schedule", "25:00", "upload.schedule", '"25:00"', "HH:MM"),
    ("upload.schedule.daily_time", "3pm", "upload.schedule.daily_time", '"3pm"', "HH:MM"),
    ("upload.file_stable_seconds", 0, "upload.file_stable_seconds", "0", "1 to 3600"),
    ("upload.file_stable_seconds", 3601, "upload.file_stable_seconds", "3601", "1 to 3600"),
    ("upload.file_stable_seconds", "sixty", "upload.file_stable_seconds", '"sixty"', "number"),
    (
        "upload.scan_existing_files.max_age_days",
        -1,
        "upload.scan_existing_files.max_age_days",
        "-1",
        "0 means no limit",
    ),
    (
        "upload.processed_files_registry.retention_days",
        0,
        "upload.processed_files_registry.retention_days",
        "0",
        "above 0",
    ),
    ("upload.max_concurrency", 0, "upload.max_concurrency", "0", "1 to 64"),
    ("upload.max_concurrency", 65, "upload.max_concurrency", "65", "1 to 64"),
    ("upload.max_concurrency", 2.5, "upload.max_concurrency", "2.5", "whole number"),
    ("upload.max_attempts", 0, "upload.max_attempts", "0", "1 or more"),
    ("upload.multipart_threshold_mb", 4, "upload.multipart_threshold_mb", "4", "5 to 5120"),
    ("upload.reconcile_interval_seconds", 1, "upload.reconcile_interval_seconds", "1", "10"),
    ("upload.retry.initial_delay_seconds", 0, "upload.retry.initial_delay_seconds", "0", "above 0"),
    ("upload.queue_file", "queue.json", "upload.queue_file", '"queue.json"', "absolute"),
    ("state_file", "state.db", "state_file", '"state.db"', "absolute"),
    ("deletion.after_upload.keep_days", -5, "deletion.after_upload.keep_days", "-5", "0 or more"),
    ("deletion.age_based.max_age_days", 0, "deletion.age_based.max_age_days", "0", "above 0"),
    (
        "deletion.age_based.schedule_time",
        "2am",
        "deletion.age_based.schedule_time",
        '"2am"',
        "HH:MM",
    ),
    (
        "deletion.emergency.enabled",
        "sometimes",
        "deletion.emergency.enabled",
        '"sometimes"',
        "true or false",
    ),
    ("disk.warning_threshold", 1.5, "disk.warning_threshold", "1.5", "at most 1"),
    ("disk.warning_threshold", -0.1, "disk.warning_threshold", "-0.1", "above 0"),
    ("disk.reserved_gb", -1, "disk.reserved_gb", "-1", "0 or more"),
    (
        "monitoring.publish_interval_seconds",
        10,
        "monitoring.publish_interval_seconds",
        "10",
        "60 to 86400",
    ),
    ("monitoring.namespace", "AWS/S3", "monitoring.namespace", '"AWS/S3"', "reserves"),
    ("monitoring.prometheus.port", 70000, "monitoring.prometheus.port", "70000", "1 to 65535"),
    (
        "monitoring.prometheus.textfile_path",
        "/var/lib/metrics.txt",
        "monitoring.prometheus.textfile_path",
        '"/var/lib/metrics.txt"',
        ".prom",
    ),
    ("s3_lifecycle.retention_days", -1, "s3_lifecycle.retention_days", "-1", "0 or more"),
    ("upload", 5, "upload", "5", "mapping"),
]


@pytest.mark.parametrize(("key", "value", "key_path", "shown", "hint"), INVALID)
def test_invalid_value_message(
    tmp_path: Path, key: str, value: Any, key_path: str, shown: str, hint: str
) -> None:
    problems = problems_of(with_value(minimal(tmp_path), key, value))

    message = problem_at(problems, key_path)
    assert shown in message
    assert hint in message
    assert "Allowed: " in message
    assert "Example: " in message


@pytest.mark.parametrize(
    ("key_path", "extra", "hint"),
    [
        (
            "upload.schedule.interval_minutes",
            {"mode": "interval", "interval_hours": 0, "interval_minutes": 2},
            "between 5 minutes and 24 hours",
        ),
        (
            "upload.schedule.interval_hours",
            {"mode": "interval", "interval_hours": 24, "interval_minutes": 30},
            "1470 minutes",
        ),
    ],
)
def test_interval_total_out_of_range(
    tmp_path: Path, key_path: str, extra: dict[str, Any], hint: str
) -> None:
    problems = problems_of(with_value(minimal(tmp_path), "upload.schedule", extra))

    assert hint in problem_at(problems, key_path)


def test_daily_mode_ignores_interval_range(tmp_path: Path) -> None:
    schedule = {"mode": "daily", "interval_hours": 0, "interval_minutes": 0}
    config = parse_config(with_value(minimal(tmp_path), "upload.schedule", schedule), ENVIRON)

    assert config.upload.schedule.mode == "daily"


def test_operational_hours_start_equal_to_end(tmp_path: Path) -> None:
    window = {"enabled": True, "start": "09:00", "end": "09:00"}
    problems = problems_of(with_value(minimal(tmp_path), "upload.operational_hours", window))

    message = problem_at(problems, "upload.operational_hours.end")
    assert '"09:00"' in message
    assert "equals start" in message


def test_enabled_operational_hours_need_start_and_end(tmp_path: Path) -> None:
    window = {"enabled": True}
    problems = problems_of(with_value(minimal(tmp_path), "upload.operational_hours", window))

    assert "missing" in problem_at(problems, "upload.operational_hours.start")
    assert "missing" in problem_at(problems, "upload.operational_hours.end")


def test_critical_threshold_must_exceed_warning(tmp_path: Path) -> None:
    disk = {"warning_threshold": 0.95, "critical_threshold": 0.85}
    problems = problems_of(with_value(minimal(tmp_path), "disk", disk))

    message = problem_at(problems, "disk.critical_threshold")
    assert "0.85" in message
    assert "above warning_threshold (0.95)" in message


def test_retry_cap_below_initial_delay(tmp_path: Path) -> None:
    retry = {"initial_delay_seconds": 30, "max_delay_seconds": 10}
    problems = problems_of(with_value(minimal(tmp_path), "upload.retry", retry))

    assert "initial_delay_seconds (30)" in problem_at(problems, "upload.retry.max_delay_seconds")


def test_missing_required_keys(tmp_path: Path) -> None:
    problems = problems_of({"s3": {}})

    assert "required" in problem_at(problems, "vehicle_id")
    assert "required" in problem_at(problems, "log_directories")
    assert "Example: bucket: t01logs" in problem_at(problems, "s3.bucket")
    assert "Example: region: cn-north-1" in problem_at(problems, "s3.region")


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    data = minimal(tmp_path)
    data = with_value(data, "vehicle_id", "bad id")
    data = with_value(data, "s3.bucket", "Bad")
    data = with_value(data, "upload.max_attempts", 0)
    data = with_value(data, "deletion.after_upload.keep_days", -1)
    data = with_value(data, "monitoring.prometheus.port", 0)

    problems = problems_of(data)

    assert len(problems) == 5


def test_credentials_in_endpoint_url_are_not_shown(tmp_path: Path) -> None:
    url = "https://AKIDEXAMPLE:s3cr3t@minio.local:9000"
    problems = problems_of(with_value(minimal(tmp_path), "s3.endpoint_url", url))

    message = problem_at(problems, "s3.endpoint_url")
    assert "credentials" in message
    assert "s3cr3t" not in message
    assert "AKIDEXAMPLE" not in message


def test_existing_file_is_not_a_directory(tmp_path: Path) -> None:
    (tmp_path / "ros").write_text("not a directory")
    problems = problems_of(minimal(tmp_path))

    assert "not a directory" in problem_at(problems, "log_directories[0].path")


# Unknown and ignored keys.


@pytest.mark.parametrize(
    ("key", "key_path", "suggestion"),
    [
        ("vehicle_idd", "vehicle_idd", "vehicle_id"),
        ("s3.bucekt", "s3.bucekt", "bucket"),
        ("upload.shedule", "upload.shedule", "schedule"),
        ("upload.schedule.intervl_hours", "upload.schedule.intervl_hours", "interval_hours"),
        ("log_directories.0.sorce", "log_directories[0].sorce", "source"),
        ("deletion.after_upload.keepdays", "deletion.after_upload.keepdays", "keep_days"),
        ("monitoring.prometheus.prot", "monitoring.prometheus.prot", "port"),
    ],
)
def test_unknown_key_suggests_known_one(
    tmp_path: Path, key: str, key_path: str, suggestion: str
) -> None:
    problems = problems_of(with_value(minimal(tmp_path), key, 1))

    message = problem_at(problems, key_path)
    assert "unknown key" in message
    assert f'did you mean "{suggestion}"?' in message
    assert f"Example: {suggestion}: " in message


def test_unknown_key_without_close_match_lists_keys(tmp_path: Path) -> None:
    problems = problems_of(with_value(minimal(tmp_path), "disk.zzz", 1))

    message = problem_at(problems, "disk.zzz")
    assert "check its spelling" in message
    assert "reserved_gb, warning_threshold, critical_threshold" in message


def test_non_text_key(tmp_path: Path) -> None:
    base = yaml.safe_dump(minimal(tmp_path), sort_keys=False)
    path = write(tmp_path, base + "disk:\n  on: 1\n")

    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=ENVIRON)

    message = problem_at(caught.value.problems, "disk")
    assert "invalid key true" in message
    assert "Quote it" in message


@pytest.mark.parametrize(
    "key",
    [
        "disk.cleanup_threshold",
        "deletion.emergency.threshold",
        "monitoring.local_log_path",
        "upload.processed_files_registry.enabled",
    ],
)
def test_compatibility_key_is_ignored_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, key: str
) -> None:
    data = with_value(minimal(tmp_path), key, 0.9)

    with caplog.at_level(logging.WARNING, logger="tvm_upload.config"):
        config = parse_config(data, environ=ENVIRON)

    assert config == parse_config(minimal(tmp_path), environ=ENVIRON)
    assert f"{key} is ignored" in caplog.text


def test_top_level_retry_section_is_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = {**minimal(tmp_path), "retry": {"max_attempts": 3}}

    with caplog.at_level(logging.WARNING, logger="tvm_upload.config"):
        config = parse_config(data, environ=ENVIRON)

    assert config.upload.max_attempts == 10
    assert "retry is ignored" in caplog.text


# Variable and ~ expansion.


def test_variables_expand_in_every_string(tmp_path: Path) -> None:
    data = minimal(tmp_path)
    data["vehicle_id"] = "vehicle-${FLEET}-$NUMBER"
    data["log_directories"][0] = {
        "path": "${LOGS}/ros",
        "source": "ros",
        "pattern": ["${EXT}", "plain$$"],
    }
    data["s3"]["bucket"] = "${BUCKET}"
    data["upload"] = {"schedule": {"interval_minutes": "${MINUTES}", "interval_hours": 0}}
    environ = {
        **ENVIRON,
        "FLEET": "CN",
        "NUMBER": "007",
        "LOGS": str(tmp_path),
        "EXT": "*.mcap",
        "BUCKET": "fleet-logs",
        "MINUTES": "45",
    }

    config = parse_config(data, environ=environ)

    assert config.vehicle_id == "vehicle-CN-007"
    assert config.log_directories[0].path == tmp_path / "ros"
    assert config.log_directories[0].pattern == ["*.mcap", "plain$"]
    assert config.s3.bucket == "fleet-logs"
    assert config.upload.schedule.interval_seconds == 45 * 60


def test_undefined_variable_names_variable_and_key(tmp_path: Path) -> None:
    data = with_value(minimal(tmp_path), "s3.credentials_path", "${AWS_HOME}/.aws")

    problems = problems_of(data, environ={"HOME": "/root"})

    assert len(problems) == 1
    message = problem_at(problems, "s3.credentials_path")
    assert "${AWS_HOME}" in message
    assert "AWS_HOME is not set" in message
    assert '"${AWS_HOME}/.aws"' in message


def test_undefined_bare_variable_in_list(tmp_path: Path) -> None:
    data = with_value(minimal(tmp_path), "log_directories.1.exclude", ["*.tmp", "$SKIP"])

    problems = problems_of(data, environ={})

    assert "SKIP is not set" in problem_at(problems, "log_directories[1].exclude[1]")


def test_unclosed_variable_is_an_error(tmp_path: Path) -> None:
    problems = problems_of(with_value(minimal(tmp_path), "s3.profile", "${PROFILE"))

    assert 'without a closing "}"' in problem_at(problems, "s3.profile")


def test_tilde_expands_in_paths(tmp_path: Path) -> None:
    data = minimal(tmp_path)
    data["log_directories"][0]["path"] = "~/.ros/log"
    data["s3"]["credentials_path"] = "~/.aws"
    data["state_file"] = "~root/state.db"

    config = parse_config(data, environ={"HOME": "/home/autoware"})

    assert config.log_directories[0].path == Path("/home/autoware/.ros/log")
    assert config.s3.credentials_path == Path("/home/autoware/.aws")
    assert config.state_file == Path(pwd.getpwnam("root").pw_dir) / "state.db"


def test_tilde_of_unknown_user(tmp_path: Path) -> None:
    data = with_value(minimal(tmp_path), "upload.queue_file", "~no_such_user_42/queue.json")

    problems = problems_of(data)

    assert "no user named no_such_user_42" in problem_at(problems, "upload.queue_file")


# Times of day written without quotes.


@pytest.mark.parametrize(
    ("yaml_text", "key_path", "number", "quoted"),
    [
        (
            "upload:\n  schedule:\n    mode: daily\n    daily_time: 15:00\n",
            "upload.schedule.daily_time",
            "900",
            '"15:00"',
        ),
        ("upload:\n  schedule: 15:30\n", "upload.schedule", "930", '"15:30"'),
        (
            'upload:\n  operational_hours: {enabled: true, start: 9:30, end: "18:00"}\n',
            "upload.operational_hours.start",
            "570",
            '"09:30"',
        ),
        (
            'upload:\n  operational_hours: {enabled: true, start: "06:00", end: 22:00}\n',
            "upload.operational_hours.end",
            "1320",
            '"22:00"',
        ),
        (
            "deletion:\n  age_based:\n    schedule_time: 23:45\n",
            "deletion.age_based.schedule_time",
            "1425",
            '"23:45"',
        ),
    ],
)
def test_unquoted_time_explains_quoting(
    tmp_path: Path, yaml_text: str, key_path: str, number: str, quoted: str
) -> None:
    base = yaml.safe_dump(minimal(tmp_path), sort_keys=False)
    path = write(tmp_path, base + yaml_text)

    with pytest.raises(ConfigError) as caught:
        load_config(path, environ=ENVIRON)

    message = problem_at(caught.value.problems, key_path)
    assert f"invalid value {number}" in message
    assert "unquoted time" in message
    assert f"write it in quotes as {quoted}" in message
    assert caught.value.exit_code == 78


def test_plain_integer_time_is_reconstructed(tmp_path: Path) -> None:
    data = with_value(minimal(tmp_path), "upload.schedule.daily_time", 900)

    message = problem_at(problems_of(data), "upload.schedule.daily_time")

    assert 'write it in quotes as "15:00"' in message


def test_zero_padded_unquoted_time_is_a_string(tmp_path: Path) -> None:
    base = yaml.safe_dump(minimal(tmp_path), sort_keys=False)
    path = write(tmp_path, base + "deletion:\n  age_based:\n    schedule_time: 02:30\n")

    config = load_config(path, environ=ENVIRON)

    assert config.deletion.age_based.schedule_time == dt.time(2, 30)


# Legacy forms of the older uploader.


def test_bare_schedule_string_means_daily(tmp_path: Path) -> None:
    data = with_value(minimal(tmp_path), "upload.schedule", "15:00")

    schedule = parse_config(data, environ=ENVIRON).upload.schedule

    assert schedule.mode == "daily"
    assert schedule.daily_time == dt.time(15, 0)


def test_schedule_time_is_older_name_of_daily_time(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = with_value(minimal(tmp_path), "upload.schedule", {"mode": "daily", "time": "04:30"})

    with caplog.at_level(logging.WARNING, logger="tvm_upload.config"):
        schedule = parse_config(data, environ=ENVIRON).upload.schedule

    assert schedule.daily_time == dt.time(4, 30)
    assert "older name of upload.schedule.daily_time" in caplog.text


def test_schedule_time_and_daily_time_together(tmp_path: Path) -> None:
    schedule = {"mode": "daily", "time": "04:30", "daily_time": "05:00"}
    problems = problems_of(with_value(minimal(tmp_path), "upload.schedule", schedule))

    assert "keep only daily_time" in problem_at(problems, "upload.schedule.time")


def test_schedule_mode_inferred_from_daily_time(tmp_path: Path) -> None:
    data = with_value(minimal(tmp_path), "upload.schedule", {"daily_time": "03:00"})

    schedule = parse_config(data, environ=ENVIRON).upload.schedule

    assert schedule.mode == "daily"
    assert schedule.daily_time == dt.time(3, 0)


def test_bare_directory_path_guesses_source(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = minimal(tmp_path)
    data["log_directories"] = ["/data/camera-front.v2", "~/bags"]

    with caplog.at_level(logging.WARNING, logger="tvm_upload.config"):
        config = parse_config(data, environ=ENVIRON)

    assert [d.source for d in config.log_directories] == ["camera_front_v2", "bags"]
    assert config.log_directories[1].path == Path("/home/autoware/bags")
    assert "log_directories[0] is a bare path, a deprecated form" in caplog.text


def test_bare_paths_keep_older_uploader_sources(tmp_path: Path) -> None:
    data = minimal(tmp_path)
    data["log_directories"] = [
        "/home/autoware/.parcel/log/terminal",
        "~/.ros/log",
        "/var/log",
        "/home/autoware/ros2_ws/log",
    ]

    config = parse_config(data, environ=ENVIRON)

    assert [d.source for d in config.log_directories] == ["terminal", "ros", "syslog", "ros2"]


def test_colliding_guess_uses_last_component(tmp_path: Path) -> None:
    data = minimal(tmp_path)
    data["log_directories"] = ["/var/log/autoware/bags", "/var/log/autoware/system"]

    config = parse_config(data, environ=ENVIRON)

    assert [d.source for d in config.log_directories] == ["bags", "system"]


def test_bare_directories_with_same_last_component(tmp_path: Path) -> None:
    data = minimal(tmp_path)
    data["log_directories"] = ["/data/a/log", "/data/b/log"]

    problems = problems_of(data)

    message = problem_at(problems, "log_directories[1].source")
    assert '"log"' in message
    assert "repeats the source of log_directories[0]" in message


# Directory rules.


def test_duplicate_sources(tmp_path: Path) -> None:
    data = with_value(minimal(tmp_path), "log_directories.1.source", "ros")

    message = problem_at(problems_of(data), "log_directories[1].source")

    assert "unique" in message


@pytest.mark.parametrize(
    ("first", "second", "hint"),
    [
        ("logs", "logs/ros", "is inside log_directories[0].path"),
        ("logs/ros", "logs", "contains log_directories[0].path"),
        ("logs", "logs/", "is the same directory"),
    ],
)
def test_overlapping_roots(tmp_path: Path, first: str, second: str, hint: str) -> None:
    data = minimal(tmp_path)
    data["log_directories"][0]["path"] = f"{tmp_path}/{first}"
    data["log_directories"][1]["path"] = f"{tmp_path}/{second}"

    message = problem_at(problems_of(data), "log_directories[1].path")

    assert hint in message


def test_overlap_through_symlink_is_found(tmp_path: Path) -> None:
    (tmp_path / "real" / "ros").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    data = minimal(tmp_path)
    data["log_directories"][0]["path"] = str(tmp_path / "real")
    data["log_directories"][1]["path"] = str(tmp_path / "link" / "ros")

    message = problem_at(problems_of(data), "log_directories[1].path")

    assert "is inside log_directories[0].path" in message


def test_log_directory_built_directly(tmp_path: Path) -> None:
    directory = LogDirectory.model_validate(
        {"path": tmp_path, "source": "bags", "pattern": "*.mcap"}
    )

    assert directory.pattern == ["*.mcap"]
    assert directory.accepts(PurePosixPath("run/a.mcap"))
    assert not directory.accepts(PurePosixPath("run/.a.mcap"))
    assert not directory.accepts(PurePosixPath("a.log"))


def test_non_recursive_directory_accepts_top_level_only(tmp_path: Path) -> None:
    directory = LogDirectory(path=tmp_path, source="syslog", recursive=False)

    assert directory.accepts(PurePosixPath("syslog.1"))
    assert not directory.accepts(PurePosixPath("apt/history.log"))
    assert not directory.accepts(PurePosixPath("syslog.tmp"))


# Effective YAML.


def test_effective_yaml_round_trip(tmp_path: Path) -> None:
    data = minimal(tmp_path)
    data["timezone"] = "Asia/Shanghai"
    data["log_directories"][0]["path"] = str(tmp_path / "cost$$dir")
    data["log_directories"][1].update(pattern="*.mcap", exclude=[], recursive=False)
    data["s3"].update(profile="china", credentials_path="~/.aws", server_side_encryption="AES256")
    data["upload"] = {
        "schedule": {"mode": "daily", "daily_time": "04:30"},
        "file_stable_seconds": 2.5,
        "operational_hours": {"enabled": True, "start": "22:00", "end": "06:00"},
    }
    data["monitoring"] = {"prometheus": {"textfile_path": "/var/lib/node/tvm.prom"}}
    config = parse_config(data, environ=ENVIRON)

    text = config.effective_yaml()
    reloaded = parse_config(yaml.safe_load(text), environ={})

    assert reloaded == config
    assert reloaded.log_directories[0].path.name == "cost$dir"
    assert 'daily_time: "04:30"' in text
    assert "file_stable_seconds: 2.5" in text
    assert "max_attempts: 10" in text


def test_effective_yaml_of_defaults_loads_back(tmp_path: Path) -> None:
    config = parse_config(minimal(tmp_path), environ=ENVIRON)
    path = write(tmp_path, config.effective_yaml(), "effective.yaml")

    assert load_config(path, environ={}) == config


# Files.


def test_example_file_loads() -> None:
    config = load_config(REPOSITORY / "config" / "config.yaml.example", environ=ENVIRON)

    assert config.vehicle_id == "vehicle-CN-001"
    assert config.timezone is None
    assert [d.source for d in config.log_directories] == ["ros", "terminal"]


def test_example_file_sets_only_defaults() -> None:
    """Apart from the required keys, every value in the example is the default."""
    example = load_config(REPOSITORY / "config" / "config.yaml.example", environ=ENVIRON)
    required_only = {
        "vehicle_id": example.vehicle_id,
        "log_directories": [
            {"path": str(d.path), "source": d.source} for d in example.log_directories
        ],
        "s3": {"bucket": example.s3.bucket, "region": example.s3.region},
    }

    defaults = parse_config(required_only, environ=ENVIRON)

    assert example.effective_yaml() == defaults.effective_yaml()


def test_example_file_documents_every_key(tmp_path: Path) -> None:
    """Every key of the effective configuration appears in the example."""
    text = (REPOSITORY / "config" / "config.yaml.example").read_text()
    config = parse_config(minimal(tmp_path), environ=ENVIRON)

    for key in _all_keys(yaml.safe_load(config.effective_yaml())):
        assert f"{key}:" in text, key


def _all_keys(data: Any) -> set[str]:
    keys: set[str] = set()
    if isinstance(data, dict):
        for key, value in data.items():
            keys.add(key)
            keys |= _all_keys(value)
    elif isinstance(data, list):
        for item in data:
            keys |= _all_keys(item)
    return keys


OLDER_UPLOADER_CONFIG = """\
vehicle_id: "vehicle-CN-001"

log_directories:
  - path: /home/autoware/.parcel/log/terminal
    source: terminal
  - path: /home/autoware/.ros/log
    source: ros
  - path: /var/log
    source: syslog
    pattern: "syslog*"
    recursive: false
    allow_deletion: false
  - path: ${HOME}/ros2_ws/log
    source: ros2

s3:
  bucket: t01logs
  region: cn-north-1
  credentials_path: /home/autoware/.aws
  profile: china

upload:
  schedule:
    mode: "interval"
    daily_time: "15:00"
    interval_hours: 2
    interval_minutes: 0
  file_stable_seconds: 60
  operational_hours:
    enabled: true
    start: "09:00"
    end: "18:00"
  batch_upload:
    enabled: true
  upload_on_start: true
  queue_file: /var/lib/tvm-upload/queue.json
  scan_existing_files:
    enabled: true
    max_age_days: 3
  processed_files_registry:
    registry_file: /var/lib/tvm-upload/processed_files.json
    retention_days: 30

deletion:
  after_upload:
    enabled: true
    keep_days: 14
  age_based:
    enabled: true
    max_age_days: 7
    schedule_time: "02:00"
  emergency:
    enabled: true
    threshold: 0.95

disk:
  reserved_gb: 70
  warning_threshold: 0.90
  critical_threshold: 0.95

monitoring:
  cloudwatch_enabled: false
  publish_interval_seconds: 3600
  low_upload_threshold_mb: 100
  alarm_evaluation_periods: 3

s3_lifecycle:
  retention_days: 14
"""


def test_older_uploader_config_loads_unchanged(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, OLDER_UPLOADER_CONFIG), environ=ENVIRON)

    assert [d.source for d in config.log_directories] == ["terminal", "ros", "syslog", "ros2"]
    assert config.log_directories[3].path == Path("/home/autoware/ros2_ws/log")
    assert config.log_directories[2].pattern == ["syslog*"]
    assert config.log_directories[2].allow_deletion is False
    assert config.s3.profile == "china"
    assert config.s3.credentials_path == Path("/home/autoware/.aws")
    assert config.upload.schedule.interval_seconds == 7200
    assert config.upload.operational_hours.end == dt.time(18, 0)
    assert config.deletion.age_based.enabled is True
    assert config.monitoring.publish_interval_seconds == 3600
    assert config.monitoring.low_upload_threshold_mb == 100
    assert config.monitoring.alarm_evaluation_periods == 3


EARLY_UPLOADER_CONFIG = """\
vehicle_id: "vehicle-001"

log_directories:
  - /var/log/autoware/bags
  - /var/log/autoware/system

s3:
  bucket: tvm-logs-test
  region: cn-north-1
  credentials_path: /tmp/aws-credentials

upload:
  schedule: "15:00"
  file_stable_seconds: 60
  operational_hours:
    enabled: true
    start: "09:00"
    end: "16:00"
  queue_file: /var/lib/tvm-upload/queue.json

disk:
  reserved_gb: 70
  cleanup_threshold: 0.90
  critical_threshold: 0.95

monitoring:
  cloudwatch_enabled: true
  publish_interval_seconds: 3600
  local_log_path: /tmp/tvm-uploader.log

retry:
  max_attempts: 10
"""


def test_early_uploader_config_loads_unchanged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="tvm_upload.config"):
        config = load_config(write(tmp_path, EARLY_UPLOADER_CONFIG), environ=ENVIRON)

    assert [d.source for d in config.log_directories] == ["bags", "system"]
    assert config.upload.schedule.mode == "daily"
    assert config.upload.schedule.daily_time == dt.time(15, 0)
    assert config.disk.warning_threshold == 0.90
    assert "disk.cleanup_threshold is ignored" in caplog.text
    assert "monitoring.local_log_path is ignored" in caplog.text


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "absent.yaml")

    assert "not found" in caught.value.problems[0]
    assert caught.value.path == str(tmp_path / "absent.yaml")
    assert caught.value.exit_code == 78


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)

    assert "is a directory" in caught.value.problems[0]


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_file(tmp_path: Path) -> None:
    path = write(tmp_path, "vehicle_id: v\n")
    path.chmod(0)

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert "permission denied" in caught.value.problems[0]


def test_file_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"vehicle_id: \xff\xfe\n")

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert "not UTF-8" in caught.value.problems[0]


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "vehicle_id: v1\ns3:\n  bucket: [t01logs\n  region: cn-north-1\n")

    with pytest.raises(ConfigError) as caught:
        load_config(path)

    message = caught.value.problems[0]
    assert message.startswith("YAML syntax error at line 4")
    assert "indentation and quoting" in message
    assert caught.value.exit_code == 78


@pytest.mark.parametrize(("text", "hint"), [("", "empty"), ("- a\n- b\n", "top level is a list")])
def test_file_without_mapping(tmp_path: Path, text: str, hint: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))

    assert hint in caught.value.problems[0]


def test_duplicate_key_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    text = yaml.safe_dump(minimal(tmp_path), sort_keys=False) + "vehicle_id: second\n"

    with caplog.at_level(logging.WARNING, logger="tvm_upload.config"):
        config = load_config(write(tmp_path, text), environ=ENVIRON)

    assert config.vehicle_id == "second"
    assert 'duplicate key "vehicle_id"' in caplog.text


# Time zones.


def test_zone_from_configured_name(tmp_path: Path) -> None:
    data = {**minimal(tmp_path), "timezone": "Asia/Shanghai"}

    zone = parse_config(data, environ=ENVIRON).zone()

    assert zone == zoneinfo.ZoneInfo("Asia/Shanghai")


def test_system_zone_from_tz_variable(tmp_path: Path) -> None:
    zone = system_zone({"TZ": ":Europe/Berlin"}, localtime=tmp_path / "none")

    assert zone == zoneinfo.ZoneInfo("Europe/Berlin")


def test_system_zone_from_localtime_link(tmp_path: Path) -> None:
    link = tmp_path / "localtime"
    link.symlink_to("/usr/share/zoneinfo/Asia/Tokyo")

    assert system_zone({}, localtime=link) == zoneinfo.ZoneInfo("Asia/Tokyo")


def test_system_zone_from_localtime_file(tmp_path: Path) -> None:
    copy_of_zone = tmp_path / "localtime"
    copy_of_zone.write_bytes(Path("/usr/share/zoneinfo/Asia/Shanghai").read_bytes())

    zone = system_zone({}, localtime=copy_of_zone)

    assert zone.utcoffset(dt.datetime(2026, 1, 1)) == dt.timedelta(hours=8)


def test_system_zone_falls_back_to_utc(tmp_path: Path) -> None:
    assert system_zone({}, localtime=tmp_path / "none") == dt.timezone.utc
    assert system_zone({"TZ": ""}, localtime=tmp_path / "none") == dt.timezone.utc


def test_config_type_is_exported() -> None:
    assert Config.model_config["frozen"] is True
