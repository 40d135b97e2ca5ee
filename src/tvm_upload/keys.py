"""Object key layout: where a log file goes in the bucket and with which Content-Type.

An object key is ``{vehicle_id}/{YYYY-MM-DD}/{source}/{relative path}``. The date is the
calendar date of the file's mtime in the configured time zone. An implausible mtime
(before 2020-01-01, or more than one day ahead of the clock, as after a dead RTC
battery) is replaced by the date of first detection.

Keys are UTF-8. Every character of the relative path is kept as given (spaces, ``+``,
non-ASCII letters) except these, which are percent-encoded as ``%XX`` with upper-case
hex digits, so that each key maps back to exactly one path:

- control characters U+0000 to U+001F and DEL (U+007F), e.g. newline as ``%0A``;
- ``%`` itself, as ``%25``;
- bytes of a file name that are not valid UTF-8. Python decodes such names with the
  ``surrogateescape`` error handler (``os.fsdecode``), and each escaped byte 0xNN
  becomes ``%NN``.

``unescape_key`` inverts the mapping. docs/object-keys.md shows examples.
"""

from __future__ import annotations

import datetime as dt
import mimetypes
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

MAX_KEY_BYTES = 1024
"""S3 rejects object keys longer than 1024 bytes of UTF-8 (KeyTooLongError)."""

EARLIEST_PLAUSIBLE_DATE = dt.date(2020, 1, 1)
MAX_FUTURE_SKEW = dt.timedelta(days=1)

_SURROGATE_ESCAPE_FIRST = 0xDC80
_SURROGATE_ESCAPE_LAST = 0xDCFF
_PERCENT_TRIPLET = re.compile(r"%([0-9A-Fa-f]{2})")

DEFAULT_CONTENT_TYPE = "application/octet-stream"

# Suffixes missing from the standard library's table, or mapped there to a type that does
# not suit a log bucket. A compressed file keeps the type of its container (application/gzip
# for "x.log.gz"), never the type of what it contains.
_EXTRA_CONTENT_TYPES = {
    ".mcap": "application/octet-stream",
    ".bag": "application/octet-stream",
    ".db3": "application/vnd.sqlite3",
    ".sqlite": "application/vnd.sqlite3",
    ".sqlite3": "application/vnd.sqlite3",
    ".log": "text/plain",
    ".txt": "text/plain",
    ".out": "text/plain",
    ".err": "text/plain",
    ".gz": "application/gzip",
    ".tgz": "application/gzip",
    ".bz2": "application/x-bzip2",
    ".xz": "application/x-xz",
    ".zst": "application/zstd",
    ".lz4": "application/x-lz4",
    ".zip": "application/zip",
    ".tar": "application/x-tar",
    ".json": "application/json",
    ".yaml": "application/yaml",
    ".yml": "application/yaml",
    ".csv": "text/csv",
}

# Built from the standard library's own table only, so the result does not depend on
# /etc/mime.types of the machine.
_MIME_TYPES = mimetypes.MimeTypes(filenames=())


class ObjectKeyError(ValueError):
    """A log file path cannot be turned into a valid object key."""


@dataclass(frozen=True)
class ObjectKey:
    """An object key and the calendar date in it.

    ``date_reason`` is None when the date is the file's mtime. Otherwise it is a
    sentence saying why the mtime was not used, for the caller to log as a WARNING.
    """

    key: str
    date: dt.date
    date_reason: str | None = None


def build_key(
    vehicle_id: str,
    source: str,
    relative_path: PurePosixPath,
    mtime_ns: int,
    zone: dt.tzinfo,
    now: dt.datetime,
) -> ObjectKey:
    """Build the object key of a log file.

    ``relative_path`` is the path below the watched directory, subdirectories
    included. ``now`` must be timezone-aware and should be the time the file was
    first detected, so that a retry builds the same key. Raises ObjectKeyError for an
    empty, absolute or ``..`` path, and for a key longer than 1024 bytes.
    """
    _check_relative_path(relative_path)
    date, reason = key_date(mtime_ns, zone, now)
    escaped = escape_key_segment(relative_path.as_posix())
    key = f"{vehicle_id}/{date.isoformat()}/{source}/{escaped}"

    size = len(key.encode("utf-8"))
    if size > MAX_KEY_BYTES:
        raise ObjectKeyError(
            f"object key for {relative_path} is {size} bytes of UTF-8; S3 allows at most "
            f"{MAX_KEY_BYTES}. Shorten the file name or its directory path."
        )
    return ObjectKey(key=key, date=date, date_reason=reason)


def key_date(mtime_ns: int, zone: dt.tzinfo, now: dt.datetime) -> tuple[dt.date, str | None]:
    """Return the key date of a file and, when its mtime was not used, the reason."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")

    today = now.astimezone(zone).date()
    try:
        mtime = _datetime_from_ns(mtime_ns)
    except (OverflowError, ValueError, OSError):
        return today, f"mtime of {mtime_ns} ns since the epoch is out of range"

    if mtime > now + MAX_FUTURE_SKEW:
        return today, (
            f"mtime {mtime.isoformat()} is more than one day ahead of the clock "
            f"({now.isoformat()}); the system clock or the file's timestamp is wrong"
        )

    date = mtime.astimezone(zone).date()
    if date < EARLIEST_PLAUSIBLE_DATE:
        return today, (
            f"mtime {mtime.isoformat()} is before {EARLIEST_PLAUSIBLE_DATE.isoformat()}, "
            "as after a reset of the real-time clock"
        )
    return date, None


def _datetime_from_ns(mtime_ns: int) -> dt.datetime:
    seconds, nanoseconds = divmod(mtime_ns, 1_000_000_000)
    epoch = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
    return epoch + dt.timedelta(seconds=seconds, microseconds=nanoseconds // 1000)


def _check_relative_path(relative_path: PurePosixPath) -> None:
    if relative_path.is_absolute():
        raise ObjectKeyError(f"path {relative_path} must be relative to its watched directory")
    if not relative_path.parts:
        raise ObjectKeyError("path is empty; an object key needs a file name")
    if ".." in relative_path.parts:
        raise ObjectKeyError(f"path {relative_path} leaves its watched directory with '..'")


def escape_key_segment(text: str) -> str:
    """Percent-encode control characters, DEL, ``%`` and undecodable bytes of ``text``.

    ``/`` and every other character are kept. Raises ObjectKeyError for a lone
    surrogate that does not come from ``os.fsdecode``, because no UTF-8 byte sequence
    represents it.
    """
    return "".join(_escape_char(char) for char in text)


def _escape_char(char: str) -> str:
    code = ord(char)
    if code < 0x20 or code == 0x7F or char == "%":
        return f"%{code:02X}"

    if _SURROGATE_ESCAPE_FIRST <= code <= _SURROGATE_ESCAPE_LAST:
        return f"%{code - 0xDC00:02X}"

    if 0xD800 <= code <= 0xDFFF:
        raise ObjectKeyError(f"text contains the lone surrogate U+{code:04X}, not valid UTF-8")
    return char


def unescape_key(key: str) -> str:
    """Invert ``escape_key_segment`` on a key or any part of one.

    Bytes that are not valid UTF-8 come back as ``surrogateescape`` characters, as
    ``os.fsdecode`` would return them. Raises ObjectKeyError for a ``%`` that is not
    followed by two hex digits.
    """
    raw = bytearray()
    position = 0
    while position < len(key):
        char = key[position]
        if char != "%":
            raw += char.encode("utf-8")
            position += 1
            continue

        match = _PERCENT_TRIPLET.match(key, position)
        if match is None:
            raise ObjectKeyError(f"'%' at offset {position} of {key!r} is not followed by hex")
        raw.append(int(match.group(1), 16))
        position = match.end()

    return raw.decode("utf-8", errors="surrogateescape")


def content_type(name: str) -> str:
    """Return the Content-Type for a file name, ``application/octet-stream`` when unknown."""
    suffix = PurePosixPath(name).suffix.lower()
    if suffix in _EXTRA_CONTENT_TYPES:
        return _EXTRA_CONTENT_TYPES[suffix]

    guessed, encoding = _MIME_TYPES.guess_type(name, strict=False)
    if guessed is None or encoding is not None:
        return DEFAULT_CONTENT_TYPE
    return guessed
