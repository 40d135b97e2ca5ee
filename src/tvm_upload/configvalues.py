"""Value types and checks shared by the models of ``tvm_upload.config``.

A check that rejects a value raises ``problems_error``: a pydantic error that
carries ``Problem`` records, so that ``tvm_upload.configload`` can turn each
into a message naming the key path, the value, what is allowed and an example.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import difflib
import ipaddress
import json
import os
import pwd
import re
import zoneinfo
from collections.abc import Callable, Mapping
from pathlib import Path, PurePath
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationInfo,
)
from pydantic_core import PydanticCustomError, PydanticUndefined
from typing_extensions import Self

NAME_CHARACTERS = re.compile(r"[A-Za-z0-9_.-]+")
SOURCE_CHARACTERS = re.compile(r"[A-Za-z0-9_]+")
AWS_REGION = re.compile(r"[a-z]{2,4}(-[a-z]+)+-\d{1,2}")
OTHER_REGION = re.compile(r"[A-Za-z0-9_.-]+")
CLOUDWATCH_NAMESPACE = re.compile(r"[A-Za-z0-9 ._/#:-]+")
TIME_OF_DAY = re.compile(r"(\d{1,2}):(\d{2})")

StorageClass = Literal[
    "STANDARD",
    "REDUCED_REDUNDANCY",
    "STANDARD_IA",
    "ONEZONE_IA",
    "INTELLIGENT_TIERING",
    "GLACIER",
    "DEEP_ARCHIVE",
    "GLACIER_IR",
    "OUTPOSTS",
    "SNOW",
    "EXPRESS_ONEZONE",
]
"""Storage classes of S3 PutObject as boto3 names them."""

STORAGE_CLASSES: tuple[str, ...] = get_args(StorageClass)


# Problems and the errors that carry them through pydantic.

FROM_INPUT: Any = object()
"""Marks a ``Problem`` whose value is the input of the validator that found it."""

MISSING: Any = object()
"""Marks a ``Problem`` about a key that was not given."""


@dataclasses.dataclass(frozen=True)
class Problem:
    """One invalid value, located relative to the key whose validator found it."""

    reason: str
    at: tuple[str | int, ...] = ()
    value: Any = FROM_INPUT
    example: str | None = None


def problems_error(problems: list[Problem]) -> PydanticCustomError:
    """Wrap problems in the pydantic error that validators raise; its type is config_problems."""
    summary = "; ".join(problem.reason for problem in problems)
    return PydanticCustomError(
        "config_problems", "{summary}", {"summary": summary, "problems": problems}
    )


def invalid(reason: str, example: str | None = None) -> PydanticCustomError:
    """Return the error for the value being validated; ``example`` replaces the field's."""
    return problems_error([Problem(reason, example=example)])


def setting(default: Any = PydanticUndefined, *, allowed: str, example: str, **kwargs: Any) -> Any:
    """Declare a field with the help text that error messages quote."""
    return Field(default, description=allowed, examples=[example], **kwargs)


# Value types shared by several keys.


class Sexagesimal(int):
    """An integer that YAML 1.1 read from an unquoted ``H:MM`` text such as ``15:00``."""

    yaml_text: str

    def __new__(cls, value: int, yaml_text: str) -> Self:
        number = super().__new__(cls, value)
        number.yaml_text = yaml_text
        return number


def parse_time_of_day(value: Any) -> Any:
    """Turn an ``"HH:MM"`` string into ``datetime.time``; explain an unquoted YAML time."""
    if isinstance(value, dt.time):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        raise unquoted_time(value)
    if not isinstance(value, str):
        raise invalid('must be a quoted 24-hour time "HH:MM"')

    time_of_day = time_from_text(value.strip())
    if time_of_day is None:
        raise invalid('is not a 24-hour time "HH:MM" with hours 00-23 and minutes 00-59')
    return time_of_day


def time_from_text(text: str) -> dt.time | None:
    match = TIME_OF_DAY.fullmatch(text)
    if match is None:
        return None
    hours, minutes = int(match.group(1)), int(match.group(2))
    if hours > 23 or minutes > 59:
        return None
    return dt.time(hours, minutes)


def unquoted_time(number: int) -> PydanticCustomError:
    """Explain that YAML 1.1 reads an unquoted ``15:00`` as 15 * 60 + 0 = 900."""
    text = getattr(number, "yaml_text", None)
    if text is None and 0 <= number < 24 * 60:
        text = f"{number // 60}:{number % 60:02d}"
    time_of_day = time_from_text(text) if text else None
    if time_of_day is None:
        return invalid('is a number, but a time of day must be a quoted string "HH:MM"')

    quoted = f'"{format_time(time_of_day)}"'
    reason = (
        f"YAML read the unquoted time {text} as the number {int(number)} "
        f"(YAML 1.1 reads H:MM as a base-60 number), so write it in quotes as {quoted}"
    )
    return invalid(reason, example=quoted)


def format_time(value: dt.time) -> str:
    return value.strftime("%H:%M")


def expand_path(value: Any, info: ValidationInfo) -> Any:
    """Expand a leading ``~`` and require an absolute path."""
    if isinstance(value, PurePath):
        value = str(value)
    if not isinstance(value, str):
        return value

    environ = (info.context or {}).get("environ", os.environ)
    text = expand_user(value.strip(), environ)
    if not text:
        raise invalid("is empty")
    if not os.path.isabs(text):
        raise invalid("is a relative path, which would depend on the working directory")
    return Path(text)


def expand_user(text: str, environ: Mapping[str, str]) -> str:
    if not text.startswith("~"):
        return text

    user, separator, rest = text[1:].partition("/")
    if user:
        try:
            home = pwd.getpwnam(user).pw_dir
        except KeyError:
            raise invalid(f"starts with ~{user}, but there is no user named {user}") from None
    else:
        home = environ.get("HOME") or pwd.getpwuid(os.getuid()).pw_dir
    return home.rstrip("/") + "/" + rest if separator else home


def glob_list(default: list[str]) -> Callable[[Any], Any]:
    """Accept one glob or a list of globs; ``null`` means ``default``."""

    def to_list(value: Any) -> Any:
        if value is None:
            return list(default)
        if isinstance(value, str):
            return [value]
        return value

    return to_list


def check_globs(globs: list[str]) -> list[str]:
    for glob in globs:
        if not glob:
            raise invalid("contains an empty glob, which matches no file")
        if "/" in glob:
            raise invalid(f'glob "{glob}" contains "/", but globs match the base name only')
    return globs


def canonical(*choices: str, none: str | None = None) -> Callable[[Any], Any]:
    """Match a text to one of ``choices`` ignoring case; ``none`` or null becomes ``none``."""

    def pick(value: Any) -> Any:
        if value is None:
            return none
        if not isinstance(value, str):
            return value
        if value.strip().lower() == "none":
            return none
        for choice in choices:
            if value.strip().lower() == choice.lower():
                return choice
        return value

    return pick


def check_characters(pattern: re.Pattern[str], allowed: str) -> Callable[[str], str]:
    def check(value: str) -> str:
        if pattern.fullmatch(value):
            return value
        if not value:
            raise invalid("is empty")
        bad = "".join(sorted({c for c in value if not pattern.fullmatch(c)}))
        raise invalid(f"contains {json.dumps(bad)}, but only {allowed} are allowed")

    return check


def check_vehicle_id(value: str) -> str:
    check_characters(NAME_CHARACTERS, "letters, digits, '-', '_' and '.'")(value)
    if set(value) == {"."}:
        raise invalid("consists only of dots, which object keys cannot use as a segment")
    return value


def check_not_blank(value: str) -> str:
    if not value.strip():
        raise invalid("is empty")
    return value


def check_bucket(name: str) -> str:
    reason = bucket_problem(name)
    if reason is not None:
        raise invalid(reason)
    return name


def bucket_problem(name: str) -> str | None:
    """Return why ``name`` breaks the S3 User Guide's general purpose bucket naming rules.

    NOTE: the rules apply whatever the store, so a name outside them is rejected
    even where an S3-compatible store or an older bucket uses it.
    """
    if not 3 <= len(name) <= 63:
        return "must be 3 to 63 characters long"
    if not re.fullmatch(r"[a-z0-9.-]+", name):
        return "may contain only lowercase letters, digits, '.' and '-'"
    if not (name[0].isalnum() and name[-1].isalnum()):
        return "must begin and end with a letter or digit"
    if ".." in name:
        return "must not contain two periods in a row"
    if _is_ip_address(name):
        return "must not be formatted as an IP address"
    for prefix in ("xn--", "sthree-", "amzn-s3-demo-"):
        if name.startswith(prefix):
            return f'must not begin with "{prefix}"'
    for suffix in ("-s3alias", "--ol-s3", ".mrap", "--x-s3", "--table-s3"):
        if name.endswith(suffix):
            return f'must not end with "{suffix}"'
    return None


def _is_ip_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def check_endpoint_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise invalid("must be an http:// or https:// URL with a host name")
    if parts.username or parts.password:
        redacted = parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()
        reason = "must not contain credentials; use s3.profile or the credential chain"
        raise problems_error([Problem(reason, value=redacted)])
    return url


def check_zone(name: str) -> str:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        close = difflib.get_close_matches(name, sorted(zoneinfo.available_timezones()), n=1)
        hint = f' (did you mean "{close[0]}"?)' if close else ""
        raise invalid(f"is not an IANA time zone name{hint}") from None
    return name


def check_textfile(path: Path) -> Path:
    if path.suffix != ".prom":
        raise invalid(
            "must end in .prom, the only files the node_exporter textfile collector reads"
        )
    return path


TimeOfDay = Annotated[
    dt.time,
    BeforeValidator(parse_time_of_day),
    PlainSerializer(format_time, return_type=str),
]
"""A time of day, written ``"HH:MM"`` (24-hour) in YAML."""

AbsolutePath = Annotated[Path, BeforeValidator(expand_path)]
"""An absolute path; a leading ``~`` is expanded."""

Globs = Annotated[list[str], AfterValidator(check_globs)]


class Section(BaseModel):
    """Base of every configuration model: unknown keys rejected, frozen, finite numbers only."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def system_zone(
    environ: Mapping[str, str] | None = None, localtime: Path = Path("/etc/localtime")
) -> dt.tzinfo:
    """Return the system time zone: from ``TZ``, the ``/etc/localtime`` link, its file, or UTC."""
    environ = os.environ if environ is None else environ
    tz = environ.get("TZ")
    if tz is not None and not tz.lstrip(":"):
        return dt.timezone.utc

    for name in (tz.lstrip(":") if tz else None, _linked_zone_name(localtime)):
        if name:
            try:
                return zoneinfo.ZoneInfo(name)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
                continue

    try:
        with localtime.open("rb") as handle:
            return zoneinfo.ZoneInfo.from_file(handle, key="localtime")
    except (OSError, ValueError):
        return dt.timezone.utc


def _linked_zone_name(localtime: Path) -> str | None:
    """Return ``Asia/Shanghai`` for a link to ``.../zoneinfo/Asia/Shanghai``."""
    if not localtime.is_symlink():
        return None
    target = os.path.realpath(localtime)
    _, found, name = target.rpartition("zoneinfo/")
    if not found:
        return None
    return name.removeprefix("posix/")
