"""Exception tree and process exit codes.

Every error this package raises on purpose derives from ``TvmUploadError``.
Exit codes follow ``sysexits.h`` where one fits, so systemd units can name
them (``RestartPreventExitStatus=78`` stops restart loops on a bad config).
"""

from __future__ import annotations

import enum


class ExitCode(enum.IntEnum):
    """Named process exit codes of the ``tvm-upload`` command."""

    OK = 0
    FAILURE = 1
    USAGE = 2
    UNAVAILABLE = 69
    SOFTWARE = 70
    CANT_CREATE = 73
    TEMPFAIL = 75
    CONFIG = 78


class TvmUploadError(Exception):
    """Root of every error raised on purpose by tvm-upload."""

    exit_code: ExitCode = ExitCode.FAILURE


class ConfigError(TvmUploadError):
    """The configuration file is missing, unreadable or invalid.

    ``problems`` contains one message per invalid key; each names the key path,
    the value, what is allowed and an example.
    """

    exit_code = ExitCode.CONFIG

    def __init__(self, problems: list[str], path: str | None = None) -> None:
        self.problems = list(problems)
        self.path = path
        where = f" in {path}" if path else ""
        lines = [f"Invalid configuration{where}:"]
        lines += [f"  - {problem}" for problem in self.problems]
        super().__init__("\n".join(lines))


class StateStoreError(TvmUploadError):
    """The state store cannot be opened or written."""

    exit_code = ExitCode.CANT_CREATE


class AlreadyRunningError(TvmUploadError):
    """Another tvm-upload process already uses this state store."""

    exit_code = ExitCode.TEMPFAIL


class UploadError(TvmUploadError):
    """An upload attempt failed.

    ``scope`` is ``"file"`` when only this file is affected (retry it with
    backoff and charge an attempt) or ``"queue"`` when every upload would
    fail the same way (pause the whole queue, charge nothing).
    ``retryable`` is False for errors that a retry cannot fix for this file.
    """

    def __init__(self, message: str, *, scope: str = "file", retryable: bool = True) -> None:
        super().__init__(message)
        self.scope = scope
        self.retryable = retryable


class FileVanishedError(UploadError):
    """The log file was deleted or renamed away before its upload finished."""

    def __init__(self, message: str) -> None:
        super().__init__(message, scope="file", retryable=False)


class FileChangedError(UploadError):
    """The log file changed while it was being uploaded; it must be queued again."""

    def __init__(self, message: str) -> None:
        super().__init__(message, scope="file", retryable=True)
