"""Configuration: the schema of ``config.yaml``, its validation and its defaults.

``load_config`` reads a YAML file and ``parse_config`` validates data that is
already parsed. Both return a frozen ``Config`` or raise ``ConfigError`` with
every problem found, each naming the key path, the value given, what is
allowed and an example.

Files written for the older uploader load unchanged: a bare path in
``log_directories``, a bare ``"HH:MM"`` in ``upload.schedule`` and the key
``upload.schedule.time`` are converted, and the keys in ``IGNORED_KEYS`` are
accepted and ignored with a warning.

Every string value may use ``${VAR}`` or ``$VAR`` (``$$`` is a literal ``$``),
and every path may start with ``~``. The value types live in
``tvm_upload.configvalues``; reading, expansion and messages in
``tvm_upload.configload``.
"""

from __future__ import annotations

import datetime as dt
import fnmatch
import functools
import logging
import os
import re
import zoneinfo
from collections.abc import Mapping
from pathlib import Path, PurePosixPath
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BeforeValidator,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tvm_upload.configload import (
    IGNORED_KEYS,
    ErrorMessages,
    prepare,
    read_yaml,
    render_yaml,
    top_level_problem,
)
from tvm_upload.configvalues import (
    AWS_REGION,
    CLOUDWATCH_NAMESPACE,
    MISSING,
    OTHER_REGION,
    SOURCE_CHARACTERS,
    STORAGE_CLASSES,
    AbsolutePath,
    Globs,
    Problem,
    Section,
    StorageClass,
    TimeOfDay,
    canonical,
    check_bucket,
    check_characters,
    check_endpoint_url,
    check_not_blank,
    check_textfile,
    check_vehicle_id,
    check_zone,
    glob_list,
    invalid,
    problems_error,
    setting,
    system_zone,
    time_from_text,
    unquoted_time,
)
from tvm_upload.errors import ConfigError

__all__ = [
    "DEFAULT_EXCLUDES",
    "IGNORED_KEYS",
    "PROMETHEUS_BIND_ADDRESS",
    "Config",
    "LogDirectory",
    "load_config",
    "parse_config",
    "system_zone",
]

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
GiB = 1024 * MiB

DEFAULT_EXCLUDES = [".*", "*.tmp", "*.part", "*.swp", "*.active"]
DEFAULT_STATE_FILE = Path("/var/lib/tvm-upload/state.db")
DEFAULT_QUEUE_FILE = Path("/var/lib/tvm-upload/queue.json")
DEFAULT_REGISTRY_FILE = Path("/var/lib/tvm-upload/processed_files.json")
PROMETHEUS_BIND_ADDRESS = "127.0.0.1"


# The sections of config.yaml, innermost first.


class LogDirectory(Section):
    """One watched directory and the rules for which of its files are log files."""

    path: AbsolutePath = setting(
        allowed="an absolute directory path; it may not exist yet",
        example="/var/log/autoware/bags",
    )
    source: Annotated[
        str, AfterValidator(check_characters(SOURCE_CHARACTERS, "letters, digits and '_'"))
    ] = setting(
        allowed="a name of letters, digits and '_', unique among directories", example="ros"
    )
    pattern: Annotated[Globs, BeforeValidator(glob_list(["*"]))] = setting(
        default_factory=lambda: ["*"],
        min_length=1,
        allowed="a glob or a list of globs matched against the file's base name",
        example='"*.mcap"',
    )
    exclude: Annotated[Globs, BeforeValidator(glob_list(DEFAULT_EXCLUDES))] = setting(
        default_factory=lambda: list(DEFAULT_EXCLUDES),
        allowed="a glob or a list of globs on the base name that are never uploaded",
        example='[".*", "*.tmp"]',
    )
    recursive: bool = setting(True, allowed="true or false", example="true")
    allow_deletion: bool = setting(True, allowed="true or false", example="false")

    @field_validator("path")
    @classmethod
    def _check_directory(cls, path: Path) -> Path:
        if path == Path("/") or os.path.realpath(path) == "/":
            raise invalid("is the root directory; name the directory that contains the logs")
        if ".." in path.parts:
            raise invalid("contains '..'; write the directory without it")
        if os.path.exists(path) and not os.path.isdir(path):
            raise invalid("exists but is not a directory")
        return path

    def accepts(self, relative: PurePosixPath) -> bool:
        """Tell whether a path relative to this directory is one of its log files."""
        if not self.recursive and len(relative.parts) != 1:
            return False
        return self.accepts_name(relative.name)

    def accepts_name(self, name: str) -> bool:
        """Tell whether a file name passes ``pattern`` and ``exclude``, wherever the file lies.

        One compiled expression per directory settings: a scan calls this for
        every file it lists.
        """
        return _name_expression(tuple(self.pattern), tuple(self.exclude)).match(name) is not None


@functools.lru_cache(maxsize=64)
def _name_expression(patterns: tuple[str, ...], excludes: tuple[str, ...]) -> re.Pattern[str]:
    """Compile the globs into one expression with ``fnmatch.fnmatchcase``'s meaning.

    ``fnmatchcase`` matches with ``re.match(fnmatch.translate(glob))``, and each
    translation ends in ``\\Z``. The lookahead rejects a name that an exclude glob
    matches in full, and the alternatives accept one that a pattern matches.
    """
    accepted = "|".join(fnmatch.translate(glob) for glob in patterns) or "(?!)"
    if not excludes:
        return re.compile(accepted)
    rejected = "|".join(fnmatch.translate(glob) for glob in excludes)
    return re.compile(f"(?!{rejected})(?:{accepted})")


class S3Settings(Section):
    """Object store settings: the bucket, how boto3 reaches it and how objects are stored."""

    bucket: Annotated[str, AfterValidator(check_bucket)] = setting(
        allowed="an S3 bucket name: 3-63 lowercase letters, digits, '.' and '-'",
        example="t01logs",
    )
    endpoint_url: Annotated[str, AfterValidator(check_endpoint_url)] | None = setting(
        None, allowed="an http:// or https:// URL, or null for AWS", example="http://127.0.0.1:8333"
    )
    region: str = setting(
        allowed="an AWS region name, or any name the store at s3.endpoint_url accepts",
        example="cn-north-1",
    )
    profile: Annotated[str, AfterValidator(check_not_blank)] | None = setting(
        None, allowed="a profile name from the AWS config files, or null", example="china"
    )
    credentials_path: AbsolutePath | None = setting(
        None,
        allowed="a directory that contains the AWS 'credentials' and 'config' files, or null",
        example="/home/autoware/.aws",
    )
    addressing_style: Annotated[
        Literal["auto", "path", "virtual"], BeforeValidator(canonical("auto", "path", "virtual"))
    ] = setting("auto", allowed="auto, path or virtual", example="path")
    storage_class: Annotated[StorageClass, BeforeValidator(canonical(*STORAGE_CLASSES))] = setting(
        "STANDARD", allowed="an S3 storage class as boto3 names it", example="STANDARD_IA"
    )
    server_side_encryption: Annotated[
        Literal["AES256", "aws:kms"] | None, BeforeValidator(canonical("AES256", "aws:kms"))
    ] = setting(None, allowed="AES256, aws:kms or none", example="AES256")
    checksum_algorithm: Annotated[
        Literal["SHA256", "CRC32C", "none"],
        BeforeValidator(canonical("SHA256", "CRC32C", none="none")),
    ] = setting("CRC32C", allowed="CRC32C, SHA256 or none", example="SHA256")

    @field_validator("region")
    @classmethod
    def _check_region(cls, region: str, info: ValidationInfo) -> str:
        """Require an AWS region name unless ``endpoint_url`` names another store."""
        if not OTHER_REGION.fullmatch(region):
            raise invalid("must be a name of letters, digits, '-', '_' and '.'")
        if info.data.get("endpoint_url", MISSING) is None and not AWS_REGION.fullmatch(region):
            raise invalid("is not an AWS region name; set s3.endpoint_url for another store")
        return region


class ScheduleSettings(Section):
    """Times of the scheduled runs, which drain the whole queue whatever the operational hours."""

    mode: Literal["interval", "daily"] = setting(
        "interval", allowed="interval or daily", example="daily"
    )
    daily_time: TimeOfDay = setting(
        dt.time(15, 0), allowed='a quoted 24-hour time "HH:MM"', example='"15:00"'
    )
    interval_hours: float = setting(
        2.0, ge=0, le=24, allowed="hours from 0 to 24, decimals allowed", example="2"
    )
    interval_minutes: float = setting(
        0.0, ge=0, le=1440, allowed="minutes from 0 to 1440, decimals allowed", example="30"
    )
    legacy_time: TimeOfDay | None = setting(
        None,
        validation_alias="time",
        exclude=True,
        repr=False,
        allowed='the older name of daily_time: a quoted 24-hour time "HH:MM"',
        example='"15:00"',
    )

    @model_validator(mode="before")
    @classmethod
    def _infer_mode(cls, data: Any) -> Any:
        """Without ``mode``, a schedule that gives only a daily time is daily, as before."""
        if not isinstance(data, dict) or "mode" in data:
            return data
        gives_time = "daily_time" in data or "time" in data
        gives_interval = "interval_hours" in data or "interval_minutes" in data
        if gives_time and not gives_interval:
            return {**data, "mode": "daily"}
        return data

    @model_validator(mode="after")
    def _check_schedule(self, info: ValidationInfo) -> ScheduleSettings:
        schedule = self._with_legacy_time(info)
        if schedule.mode == "interval" and not 300 <= schedule.interval_seconds <= 86400:
            raise problems_error([schedule._interval_problem()])
        return schedule

    def _with_legacy_time(self, info: ValidationInfo) -> ScheduleSettings:
        if self.legacy_time is None:
            return self
        if "daily_time" in self.model_fields_set:
            reason = "repeats daily_time under its older name; keep only daily_time"
            raise problems_error([Problem(reason, at=("time",), value=self.legacy_time)])

        _notices(info).append(
            "upload.schedule.time is the older name of upload.schedule.daily_time"
        )
        return self.model_copy(update={"daily_time": self.legacy_time, "legacy_time": None})

    def _interval_problem(self) -> Problem:
        at = "interval_hours" if self.interval_hours > 0 else "interval_minutes"
        value = self.interval_hours if self.interval_hours > 0 else self.interval_minutes
        minutes = self.interval_seconds / 60
        reason = (
            f"interval_hours and interval_minutes add up to {minutes:g} minutes, "
            "but the interval must be between 5 minutes and 24 hours"
        )
        return Problem(reason, at=(at,), value=value)

    @property
    def interval_seconds(self) -> float:
        """Time between scheduled runs in interval mode, in seconds."""
        return self.interval_hours * 3600 + self.interval_minutes * 60


def _legacy_schedule(value: Any) -> Any:
    """Read the older uploader's bare ``"HH:MM"`` schedule as daily at that time."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return value
    if isinstance(value, int):
        raise unquoted_time(value)

    time_of_day = time_from_text(value.strip())
    if time_of_day is None:
        reason = 'is not a 24-hour time "HH:MM" with hours 00-23 and minutes 00-59'
        raise invalid(reason, example='"15:00"')
    return {"mode": "daily", "daily_time": time_of_day}


class OperationalHours(Section):
    """The daily window in which a file that becomes ready is uploaded at once."""

    enabled: bool = setting(False, allowed="true or false", example="true")
    start: TimeOfDay | None = setting(
        None, allowed='a quoted 24-hour time "HH:MM"', example='"09:00"'
    )
    end: TimeOfDay | None = setting(
        None,
        allowed='a quoted 24-hour time "HH:MM", before start to wrap midnight',
        example='"18:00"',
    )

    @model_validator(mode="after")
    def _check_window(self) -> OperationalHours:
        if not self.enabled:
            return self

        required = "required when upload.operational_hours.enabled is true"
        problems = [
            Problem(required, at=(key,), value=MISSING)
            for key in ("start", "end")
            if getattr(self, key) is None
        ]
        if not problems and self.start == self.end:
            reason = "equals start, which leaves an empty window; set enabled: false for none"
            problems.append(Problem(reason, at=("end",), value=self.end))
        if problems:
            raise problems_error(problems)
        return self

    def permits(self, moment: dt.time) -> bool:
        """Tell whether ``moment`` is inside the window, which is always true when it is disabled.

        The window includes ``start`` and excludes ``end``. When ``end`` is
        earlier than ``start`` the window wraps midnight (22:00 to 06:00).
        """
        if not self.enabled or self.start is None or self.end is None:
            return True
        if self.start < self.end:
            return self.start <= moment < self.end
        return moment >= self.start or moment < self.end


class BatchUpload(Section):
    enabled: bool = setting(True, allowed="true or false", example="true")


class ScanExistingFiles(Section):
    enabled: bool = setting(True, allowed="true or false", example="true")
    max_age_days: float = setting(
        3.0, ge=0, allowed="days of 0 or more; 0 means no limit", example="3"
    )


class ProcessedFilesRegistry(Section):
    registry_file: AbsolutePath = setting(
        DEFAULT_REGISTRY_FILE,
        allowed="an absolute path of the older uploader's JSON registry",
        example="/var/lib/tvm-upload/processed_files.json",
    )
    retention_days: float = setting(30.0, gt=0, allowed="days above 0", example="30")


class RetrySettings(Section):
    """Backoff between attempts of one file: doubling from the initial delay up to the cap."""

    initial_delay_seconds: float = setting(
        1.0, gt=0, le=3600, allowed="seconds above 0, at most 3600", example="1"
    )
    max_delay_seconds: float = setting(
        600.0, gt=0, le=86400, allowed="seconds above 0, at most 86400", example="600"
    )

    @field_validator("max_delay_seconds")
    @classmethod
    def _check_order(cls, cap: float, info: ValidationInfo) -> float:
        initial = info.data.get("initial_delay_seconds")
        if initial is not None and cap < initial:
            raise invalid(f"is below initial_delay_seconds ({initial:g})")
        return cap


class UploadSettings(Section):
    """Upload settings: readiness, triggers, the older state files, concurrency and retries."""

    schedule: Annotated[ScheduleSettings, BeforeValidator(_legacy_schedule)] = setting(
        default_factory=ScheduleSettings,
        allowed='a mapping of mode, daily_time, interval_hours, interval_minutes, or a "HH:MM"',
        example="{mode: interval, interval_hours: 2, interval_minutes: 0}",
    )
    file_stable_seconds: float = setting(
        60.0, ge=1, le=3600, allowed="seconds from 1 to 3600, decimals allowed", example="60"
    )
    operational_hours: OperationalHours = setting(
        default_factory=OperationalHours,
        allowed="a mapping of enabled, start and end",
        example='{enabled: true, start: "09:00", end: "18:00"}',
    )
    batch_upload: BatchUpload = setting(
        default_factory=BatchUpload, allowed="a mapping with enabled", example="{enabled: true}"
    )
    upload_on_start: bool = setting(True, allowed="true or false", example="true")
    scan_existing_files: ScanExistingFiles = setting(
        default_factory=ScanExistingFiles,
        allowed="a mapping of enabled and max_age_days",
        example="{enabled: true, max_age_days: 3}",
    )
    queue_file: AbsolutePath = setting(
        DEFAULT_QUEUE_FILE,
        allowed="an absolute path of the older uploader's JSON queue",
        example="/var/lib/tvm-upload/queue.json",
    )
    processed_files_registry: ProcessedFilesRegistry = setting(
        default_factory=ProcessedFilesRegistry,
        allowed="a mapping of registry_file and retention_days",
        example="{retention_days: 30}",
    )
    max_concurrency: int = setting(
        4, ge=1, le=64, allowed="a whole number from 1 to 64", example="4"
    )
    max_attempts: int = setting(10, ge=1, allowed="a whole number of 1 or more", example="10")
    multipart_threshold_mb: int = setting(
        64, ge=5, le=5120, allowed="MiB from 5 to 5120, a whole number", example="64"
    )
    reconcile_interval_seconds: float = setting(
        300.0, ge=10, le=86400, allowed="seconds from 10 to 86400", example="300"
    )
    retry: RetrySettings = setting(
        default_factory=RetrySettings,
        allowed="a mapping of initial_delay_seconds and max_delay_seconds",
        example="{initial_delay_seconds: 1, max_delay_seconds: 600}",
    )

    @property
    def multipart_threshold_bytes(self) -> int:
        """Size above which a file is sent as a multipart upload, in bytes."""
        return self.multipart_threshold_mb * MiB


class AfterUploadDeletion(Section):
    enabled: bool = setting(True, allowed="true or false", example="true")
    keep_days: float = setting(
        14.0, ge=0, allowed="days of 0 or more; 0 deletes right after the upload", example="14"
    )


class AgeBasedDeletion(Section):
    enabled: bool = setting(False, allowed="true or false", example="true")
    max_age_days: float = setting(7.0, gt=0, allowed="days above 0", example="7")
    schedule_time: TimeOfDay = setting(
        dt.time(2, 0), allowed='a quoted 24-hour time "HH:MM"', example='"02:00"'
    )
    include_not_uploaded: bool = setting(False, allowed="true or false", example="false")


class EmergencyDeletion(Section):
    enabled: bool = setting(True, allowed="true or false", example="true")


class DeletionSettings(Section):
    """Retention settings: which local log files may be deleted and when."""

    after_upload: AfterUploadDeletion = setting(
        default_factory=AfterUploadDeletion,
        allowed="a mapping of enabled and keep_days",
        example="{enabled: true, keep_days: 14}",
    )
    age_based: AgeBasedDeletion = setting(
        default_factory=AgeBasedDeletion,
        allowed="a mapping of enabled, max_age_days, schedule_time, include_not_uploaded",
        example='{enabled: true, max_age_days: 7, schedule_time: "02:00"}',
    )
    emergency: EmergencyDeletion = setting(
        default_factory=EmergencyDeletion,
        allowed="a mapping with enabled",
        example="{enabled: true}",
    )


class DiskSettings(Section):
    """Disk usage levels that start emergency cleanup."""

    reserved_gb: float = setting(
        70.0, ge=0, allowed="GiB of 0 or more, decimals allowed", example="70"
    )
    warning_threshold: float = setting(
        0.90,
        gt=0,
        le=1,
        allowed="a used fraction above 0, at most 1, below critical_threshold",
        example="0.90",
    )
    critical_threshold: float = setting(
        0.95,
        gt=0,
        le=1,
        allowed="a used fraction above warning_threshold, at most 1",
        example="0.95",
    )

    @field_validator("critical_threshold")
    @classmethod
    def _check_order(cls, critical: float, info: ValidationInfo) -> float:
        warning = info.data.get("warning_threshold")
        if warning is not None and critical <= warning:
            raise invalid(f"must be above warning_threshold ({warning:g})")
        return critical

    @property
    def reserved_bytes(self) -> int:
        """Free space that emergency cleanup restores, in bytes."""
        return int(self.reserved_gb * GiB)


class PrometheusSettings(Section):
    """Prometheus metrics: an HTTP endpoint on 127.0.0.1, a textfile, or both."""

    enabled: bool = setting(False, allowed="true or false", example="true")
    port: int = setting(9798, ge=1, le=65535, allowed="a TCP port from 1 to 65535", example="9798")
    textfile_path: Annotated[AbsolutePath, AfterValidator(check_textfile)] | None = setting(
        None,
        allowed="an absolute path ending in .prom, or null",
        example="/var/lib/node_exporter/textfile/tvm_upload.prom",
    )


class MonitoringSettings(Section):
    cloudwatch_enabled: bool = setting(False, allowed="true or false", example="true")
    publish_interval_seconds: float = setting(
        300.0, ge=60, le=86400, allowed="seconds from 60 to 86400", example="300"
    )
    namespace: Annotated[
        str,
        AfterValidator(check_characters(CLOUDWATCH_NAMESPACE, "letters, digits and ' ._/#:-'")),
    ] = setting(
        "TVM/Upload",
        max_length=255,
        allowed="a CloudWatch namespace of up to 255 characters",
        example="TVM/Upload",
    )
    low_upload_threshold_mb: float = setting(100.0, ge=0, allowed="MiB of 0 or more", example="100")
    alarm_evaluation_periods: int = setting(
        3, ge=1, allowed="a whole number of 1 or more", example="3"
    )
    prometheus: PrometheusSettings = setting(
        default_factory=PrometheusSettings,
        allowed="a mapping of enabled, port and textfile_path",
        example="{enabled: true, port: 9798}",
    )

    @field_validator("namespace")
    @classmethod
    def _check_reserved_namespace(cls, namespace: str) -> str:
        if namespace.startswith("AWS/"):
            raise invalid('begins with "AWS/", which CloudWatch reserves for AWS services')
        return namespace


class S3LifecycleSettings(Section):
    retention_days: float = setting(
        14.0, ge=0, allowed="days of 0 or more (documentation only)", example="14"
    )


class Config(Section):
    """The whole validated configuration. It is frozen, so a reload can swap it as one object."""

    vehicle_id: Annotated[str, AfterValidator(check_vehicle_id)] = setting(
        allowed="letters, digits, '-', '_' and '.'", example="vehicle-CN-001"
    )
    timezone: Annotated[str, AfterValidator(check_zone)] | None = setting(
        None, allowed="an IANA time zone name, or null for the system zone", example="Asia/Shanghai"
    )
    log_directories: list[LogDirectory] = setting(
        min_length=1,
        allowed="a list of directories, each a mapping with path and source",
        example="[{path: /var/log/autoware/bags, source: bags}]",
    )
    s3: S3Settings = setting(
        allowed="a mapping with bucket and region",
        example="{bucket: t01logs, region: cn-north-1}",
    )
    upload: UploadSettings = setting(
        default_factory=UploadSettings,
        allowed="a mapping of upload settings",
        example="{file_stable_seconds: 60}",
    )
    state_file: AbsolutePath = setting(
        DEFAULT_STATE_FILE, allowed="an absolute file path", example="/var/lib/tvm-upload/state.db"
    )
    deletion: DeletionSettings = setting(
        default_factory=DeletionSettings,
        allowed="a mapping of after_upload, age_based and emergency",
        example="{after_upload: {keep_days: 14}}",
    )
    disk: DiskSettings = setting(
        default_factory=DiskSettings,
        allowed="a mapping of reserved_gb, warning_threshold and critical_threshold",
        example="{reserved_gb: 70}",
    )
    monitoring: MonitoringSettings = setting(
        default_factory=MonitoringSettings,
        allowed="a mapping of monitoring settings",
        example="{cloudwatch_enabled: true}",
    )
    s3_lifecycle: S3LifecycleSettings = setting(
        default_factory=S3LifecycleSettings,
        allowed="a mapping with retention_days",
        example="{retention_days: 14}",
    )

    @model_validator(mode="after")
    def _check_state_file_outside_logs(self) -> Config:
        state_dir = os.path.realpath(self.state_file.parent)
        for index, directory in enumerate(self.log_directories):
            root = os.path.realpath(directory.path)
            if state_dir == root or state_dir.startswith(root.rstrip("/") + "/"):
                reason = (
                    f"is inside log_directories[{index}] ({directory.path}),"
                    " so the daemon would upload, and could delete, its own state store;"
                    " use a path outside every log directory"
                )
                problem = Problem(
                    reason,
                    at=("state_file",),
                    value=str(self.state_file),
                    example="/var/lib/tvm-upload/state.db",
                )
                raise problems_error([problem])
        return self

    @field_validator("log_directories")
    @classmethod
    def _check_directories(cls, directories: list[LogDirectory]) -> list[LogDirectory]:
        problems = _duplicate_sources(directories) + _overlapping_roots(directories)
        if problems:
            raise problems_error(problems)
        return directories

    def zone(self) -> dt.tzinfo:
        """Return the time zone of object key dates and schedules (``timezone`` or the system's)."""
        if self.timezone is not None:
            return zoneinfo.ZoneInfo(self.timezone)
        return system_zone()

    def effective_yaml(self) -> str:
        """Render every key with its value, defaults filled in, as YAML that loads back equal.

        ``$`` is written as ``$$`` so that variable expansion on reload gives
        the same text. The configuration contains no secret: ``s3.credentials_path``
        is only the directory of the AWS files.
        """
        header = (
            "# Effective tvm-upload configuration, every default filled in.\n"
            "# timezone: null means the system time zone.\n"
        )
        return header + render_yaml(self.model_dump(mode="json"))


def _duplicate_sources(directories: list[LogDirectory]) -> list[Problem]:
    first_index: dict[str, int] = {}
    problems = []
    for index, directory in enumerate(directories):
        if directory.source in first_index:
            other = first_index[directory.source]
            reason = f"repeats the source of log_directories[{other}]; each source must be unique"
            problems.append(Problem(reason, at=(index, "source"), value=directory.source))
        else:
            first_index[directory.source] = index
    return problems


def _overlapping_roots(directories: list[LogDirectory]) -> list[Problem]:
    """Find roots that are equal to or inside another root, comparing resolved paths."""
    resolved = [Path(os.path.realpath(directory.path)) for directory in directories]
    problems = []
    for index, root in enumerate(resolved):
        for other in range(index):
            reason = _overlap_reason(root, resolved[other], other)
            if reason is not None:
                value = str(directories[index].path)
                problems.append(Problem(reason, at=(index, "path"), value=value))
                break
    return problems


def _overlap_reason(root: Path, other_root: Path, other: int) -> str | None:
    name = f"log_directories[{other}].path"
    if root == other_root:
        return f"is the same directory as {name} ({other_root})"
    if other_root in root.parents:
        return f"is inside {name} ({other_root}); watched directories must not nest"
    if root in other_root.parents:
        return f"contains {name} ({other_root}); watched directories must not nest"
    return None


def _notices(info: ValidationInfo) -> list[str]:
    """Return the list that collects warnings of this validation (a throwaway one if none)."""
    context = info.context if isinstance(info.context, dict) else {}
    notices = context.get("notices")
    return notices if isinstance(notices, list) else []


def load_config(path: Path | str, environ: Mapping[str, str] | None = None) -> Config:
    """Read, expand and validate a ``config.yaml``.

    ``environ`` supplies ``${VAR}`` values and ``HOME`` (default ``os.environ``).
    Raises ``ConfigError`` when the file is missing, unreadable, not valid YAML
    or invalid. Warnings (legacy forms, ignored keys, duplicate keys) are logged.
    """
    path = Path(path)
    return parse_config(read_yaml(path), environ, source=str(path))


def parse_config(
    data: Any, environ: Mapping[str, str] | None = None, source: str | None = None
) -> Config:
    """Validate parsed YAML data and return the frozen ``Config``.

    Expands ``${VAR}``, ``$VAR`` and a leading ``~``, converts legacy forms,
    drops ``IGNORED_KEYS`` and collects every problem before raising one
    ``ConfigError``. ``source`` names the file in messages and log lines.
    """
    environ = os.environ if environ is None else environ
    if not isinstance(data, Mapping):
        raise ConfigError([top_level_problem(data)], source)

    prepared = prepare(data, environ)
    writer = ErrorMessages(Config)
    messages = [writer.of_problem(problem) for problem in prepared.problems]
    context = {"environ": environ, "notices": prepared.notices}
    config: Config | None = None
    try:
        config = Config.model_validate(prepared.data, context=context)
    except ValidationError as error:
        skip = [problem.at for problem in prepared.problems]
        messages += writer.of_validation(error, skip)

    for notice in prepared.notices:
        logger.warning("%s: %s", source or "configuration", notice)
    if messages or config is None:
        raise ConfigError(messages, source)
    return config
