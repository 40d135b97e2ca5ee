"""Log handler setup for the command line: text or JSON lines on stderr.

Only the CLI calls ``configure_logging``; library modules just create their
loggers. Every record passes a redaction filter so that an access key or
secret that reaches a message (for example inside a botocore error text)
is masked before it is written.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from tvm_upload.redaction import redact

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RedactingFilter(logging.Filter):
    """Replace each record's message with its redacted, fully formatted text."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg = cleaned
            record.args = None
        return True


class RepeatFilter(logging.Filter):
    """Let an identical WARNING or ERROR line through at most ``burst`` times per window.

    A vehicle offline for a day must not fill the journal with the same line.
    The first line after a window with suppressed repeats says how many were
    dropped. INFO and DEBUG lines pass untouched: each upload has its own line.
    """

    def __init__(self, burst: int = 5, window_seconds: float = 60.0) -> None:
        super().__init__()
        self.burst = burst
        self.window_seconds = window_seconds
        self._seen: dict[tuple[str, int, str], list[float]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True

        key = (record.name, record.levelno, record.getMessage())
        window_start, count, suppressed = self._seen.get(key, [record.created, 0, 0])
        if record.created - window_start >= self.window_seconds:
            window_start, count = record.created, 0
        count += 1
        if count > self.burst:
            self._seen[key] = [window_start, count, suppressed + 1]
            return False

        self._seen[key] = [window_start, count, 0]
        if suppressed:
            record.msg = f"{record.getMessage()} ({suppressed} identical lines suppressed before)"
            record.args = None
        if len(self._seen) > 10_000:
            self._seen.clear()
        return True


class TextFormatter(logging.Formatter):
    """The journald-friendly text format, with tracebacks redacted like messages."""

    def formatException(self, ei: Any) -> str:
        return redact(super().formatException(ei))


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for fleet log shipping."""

    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            document["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(document, ensure_ascii=False)


def configure_logging(level: str = "INFO", log_format: str = "text") -> None:
    """Send log records at ``level`` and above to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RedactingFilter())
    handler.addFilter(RepeatFilter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter(TEXT_FORMAT))

    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("botocore", "boto3", "s3transfer", "urllib3", "watchdog"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
