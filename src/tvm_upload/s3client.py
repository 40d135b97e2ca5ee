"""S3 client construction, uploader settings and the classification of S3 errors.

Retries happen in two layers:

- botocore retries one request (a PutObject, one UploadPart, a HEAD) in its
  ``standard`` mode, at most ``max_request_attempts`` times in all (the first try
  included), with its own short jittered delays. That absorbs a dropped connection,
  a read timeout or a single 503 without restarting the file.
- Everything longer is the daemon's job. It receives an ``UploadError`` from
  ``classify_error`` and either retries the file with ``backoff_seconds`` (scope
  ``"file"``) or pauses the whole queue (scope ``"queue"``).

Every client reports the ``Date`` header of its responses to ``clockskew.CLOCK_SKEW``,
which warns when the system clock is off, and signs its requests with the system
clock corrected by the measured skew. A 403 that reveals a new skew is sent once more
at once with the corrected time, on top of ``max_request_attempts``.

``TEST_READ_TIMEOUT_VARIABLE`` (``TVM_UPLOAD_TEST_READ_TIMEOUT_SECONDS``) is for tests
only: it shortens the read timeout of a daemon child process so that a stalled server
is detected in a second instead of a minute. The configuration file has no such key.

botocore computes no checksum of its own (``request_checksum_calculation`` and
``response_checksum_validation`` are ``when_required``), because several
S3-compatible stores reject the CRC trailers that botocore sends by default since
1.36. The uploader sends explicit ``x-amz-checksum-*`` headers instead.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import botocore.session
from boto3.exceptions import S3UploadFailedError
from botocore.config import Config as BotocoreConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    CredentialRetrievalError,
    NoAuthTokenError,
    NoCredentialsError,
    PartialCredentialsError,
    ProfileNotFound,
    TokenRetrievalError,
    UnauthorizedSSOTokenError,
)
from botocore.exceptions import ConnectionError as BotocoreConnectionError
from s3transfer.exceptions import S3UploadFailedError as TransferUploadFailedError

from tvm_upload.checksums import CHECKSUM_ALGORITHMS, crc32c_available
from tvm_upload.clockskew import CLOCK_SKEW, SKEW_WARNING_SECONDS, describe_skew, skew_from_date
from tvm_upload.errors import ConfigError, FileVanishedError, UploadError

logger = logging.getLogger(__name__)

MiB = 1024 * 1024

S3Client = Any
"""A botocore S3 client; botocore ships no type stubs."""

ADDRESSING_STYLES = ("auto", "path", "virtual")
MIN_PART_SIZE_BYTES = 5 * MiB
"""S3 rejects every part but the last when it is smaller than 5 MiB."""

TEST_READ_TIMEOUT_VARIABLE = "TVM_UPLOAD_TEST_READ_TIMEOUT_SECONDS"


@dataclass(frozen=True)
class UploaderSettings:
    """Settings of the uploader, taken from the configuration; sizes in bytes, times in seconds.

    ``storage_class`` None or ``"STANDARD"`` sends no storage class header, which is
    the same as STANDARD on AWS and avoids rejections from stores without storage
    classes. ``checksum_algorithm`` is ``"SHA256"``, ``"CRC32C"`` (needs the
    ``crc32c`` or ``awscrt`` package) or ``"none"``. ``credentials_path`` is a
    directory holding the ``credentials`` and ``config`` files used in place of
    ``~/.aws``.
    """

    bucket: str
    region: str
    profile: str | None = None
    credentials_path: Path | None = None
    endpoint_url: str | None = None
    addressing_style: str = "auto"
    storage_class: str | None = None
    server_side_encryption: str | None = None
    checksum_algorithm: str = "SHA256"
    multipart_threshold_bytes: int = 64 * MiB
    min_part_size_bytes: int = 8 * MiB
    max_concurrency: int = 4
    connect_timeout_seconds: float = 10.0
    read_timeout_seconds: float = 60.0
    max_request_attempts: int = 3

    def __post_init__(self) -> None:
        problems = self._problems()
        if problems:
            raise ValueError("invalid uploader settings: " + "; ".join(problems))

    def _problems(self) -> list[str]:
        problems = []
        if not self.bucket:
            problems.append("bucket is empty")
        if not self.region:
            problems.append("region is empty")
        if self.addressing_style not in ADDRESSING_STYLES:
            problems.append(
                f"addressing_style is {self.addressing_style!r}; use one of {ADDRESSING_STYLES}"
            )
        if self.checksum_algorithm not in CHECKSUM_ALGORITHMS:
            problems.append(
                f"checksum_algorithm is {self.checksum_algorithm!r}; "
                f"use one of {sorted(CHECKSUM_ALGORITHMS)}"
            )
        if self.min_part_size_bytes < MIN_PART_SIZE_BYTES:
            problems.append(
                f"min_part_size_bytes is {self.min_part_size_bytes}; "
                f"S3 needs at least {MIN_PART_SIZE_BYTES}"
            )
        if self.multipart_threshold_bytes < self.min_part_size_bytes:
            problems.append(
                f"multipart_threshold_bytes ({self.multipart_threshold_bytes}) is below "
                f"min_part_size_bytes ({self.min_part_size_bytes})"
            )
        if self.max_concurrency < 1 or self.max_request_attempts < 1:
            problems.append("max_concurrency and max_request_attempts must be 1 or more")
        return problems

    @classmethod
    def from_objects(cls, *sources: object) -> UploaderSettings:
        """Build settings from objects that have some of the fields as attributes.

        For each field the first source that has the attribute, with a value other
        than None, wins; ``config.s3`` and ``config.upload`` fit. A source's
        ``multipart_threshold_mb`` (MiB) is read when no ``multipart_threshold_bytes``
        is found.
        """
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            value = _first_attribute(sources, field.name)
            if value is not None:
                values[field.name] = value

        threshold_mb = _first_attribute(sources, "multipart_threshold_mb")
        if "multipart_threshold_bytes" not in values and threshold_mb is not None:
            values["multipart_threshold_bytes"] = int(threshold_mb * MiB)
        if values.get("credentials_path") is not None:
            values["credentials_path"] = Path(values["credentials_path"]).expanduser()
        test_read_timeout = os.environ.get(TEST_READ_TIMEOUT_VARIABLE)
        if test_read_timeout:
            values["read_timeout_seconds"] = float(test_read_timeout)
        threshold = values.get("multipart_threshold_bytes", cls.multipart_threshold_bytes)
        if "min_part_size_bytes" not in values and threshold < cls.min_part_size_bytes:
            # A threshold between 5 and 8 MiB is valid in the configuration:
            # parts then shrink to it, never below S3's 5 MiB minimum.
            values["min_part_size_bytes"] = max(threshold, MIN_PART_SIZE_BYTES)
        return cls(**values)

    def extra_put_arguments(self) -> dict[str, str]:
        """Return the StorageClass and ServerSideEncryption arguments for a new object."""
        arguments = {}
        if self.storage_class and self.storage_class != "STANDARD":
            arguments["StorageClass"] = self.storage_class
        if self.server_side_encryption:
            arguments["ServerSideEncryption"] = self.server_side_encryption
        return arguments


def _first_attribute(sources: tuple[object, ...], name: str) -> Any:
    for source in sources:
        value = getattr(source, name, None)
        if value is not None:
            return value
    return None


def botocore_config(settings: UploaderSettings) -> BotocoreConfig:
    """Return the botocore client configuration for these settings.

    botocore's ``max_attempts`` counts retries after the first try, so it would send
    one request more than ``max_request_attempts``; ``total_max_attempts`` counts
    every try. Parameter validation is off: the uploader builds every request itself,
    and the check cost about 4 % of the client's CPU per small file.
    """
    return BotocoreConfig(
        region_name=settings.region,
        signature_version="s3v4",
        s3={"addressing_style": settings.addressing_style},
        retries={"mode": "standard", "total_max_attempts": settings.max_request_attempts},
        connect_timeout=settings.connect_timeout_seconds,
        read_timeout=settings.read_timeout_seconds,
        max_pool_connections=max(10, settings.max_concurrency * 2),
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        tcp_keepalive=True,
        parameter_validation=False,
    )


def build_session(settings: UploaderSettings) -> boto3.Session:
    """Build a boto3 session for the profile and credentials directory of ``settings``.

    The credentials directory applies to this session only; ``os.environ`` is not
    changed. A named profile turns off the ``AWS_ACCESS_KEY_ID`` environment variables,
    as in botocore. Raises ConfigError when the profile does not exist.
    """
    core = botocore.session.Session(profile=settings.profile)
    if settings.credentials_path is not None:
        core.set_config_variable("credentials_file", str(settings.credentials_path / "credentials"))
        core.set_config_variable("config_file", str(settings.credentials_path / "config"))

    try:
        return boto3.Session(botocore_session=core, region_name=settings.region)
    except ProfileNotFound as exc:
        raise _profile_error(settings) from exc


def build_client(settings: UploaderSettings) -> S3Client:
    """Create the S3 client: China regions resolve to ``amazonaws.com.cn`` endpoints.

    ``endpoint_url`` overrides the resolved endpoint. The client is thread-safe and
    meant to be shared by every upload thread. Its responses feed ``CLOCK_SKEW``, and it
    signs with the time corrected by the skew measured there.
    """
    if settings.checksum_algorithm == "CRC32C" and not crc32c_available():
        raise ConfigError(
            [
                (
                    "checksum_algorithm: CRC32C needs the 'crc32c' or 'awscrt' package; "
                    "install one (pip install crc32c) or use SHA256"
                )
            ]
        )

    session = build_session(settings)
    try:
        client = session.client(
            "s3", endpoint_url=settings.endpoint_url, config=botocore_config(settings)
        )
    except ProfileNotFound as exc:
        raise _profile_error(settings) from exc
    CLOCK_SKEW.attach(client)
    return client


def _profile_error(settings: UploaderSettings) -> ConfigError:
    where = settings.credentials_path or "~/.aws"
    message = (
        f"s3.profile: profile {settings.profile!r} not found in {where}/config or "
        f"{where}/credentials; add a [profile {settings.profile}] section or fix the name"
    )
    return ConfigError([message])


class ClientHolder:
    """The shared S3 client, replaceable when credentials must be read again."""

    def __init__(self, settings: UploaderSettings, client: S3Client | None = None) -> None:
        self._settings = settings
        self._lock = threading.Lock()
        self._client = client if client is not None else build_client(settings)

    @property
    def client(self) -> S3Client:
        return self._client

    def rebuild(self) -> None:
        """Create a new client, so rotated or refreshed credentials are read again.

        Requests already running finish on the old client. When the new client
        cannot be built (the profile vanished, say), the error is logged and the old
        client stays, so the caller's next try reports the credentials problem.
        """
        try:
            client = build_client(self._settings)
        except (ConfigError, BotoCoreError) as error:
            logger.error("Cannot create a new S3 client to read credentials again: %s", error)
            return

        with self._lock:
            self._client = client
        logger.info("Created a new S3 client to read credentials again.")

    def close(self) -> None:
        """Close the client's connection pool."""
        with self._lock:
            self._client.close()


class S3RequestError(UploadError):
    """An S3 request, or the connection to the endpoint, failed.

    ``code`` is the S3 error code (``"SlowDown"``, ``"AccessDenied"``) or, for a
    failure without a response, the botocore exception name. ``status`` is the HTTP
    status when a response arrived. ``throttled`` means the store asked for fewer
    requests; ``credentials_expired`` means the caller should call
    ``Uploader.reload_credentials`` before the next try.
    """

    def __init__(
        self,
        message: str,
        *,
        scope: str,
        retryable: bool,
        code: str,
        status: int | None = None,
        throttled: bool = False,
        credentials_expired: bool = False,
    ) -> None:
        super().__init__(message, scope=scope, retryable=retryable)
        self.code = code
        self.status = status
        self.throttled = throttled
        self.credentials_expired = credentials_expired


_CHECK_CREDENTIALS = "check the credentials of s3.profile and s3.credentials_path"
_CHECK_REGION = "the bucket is in another region than s3.region or needs another endpoint"

_FORBIDDEN_ADVICE = "check the credentials, the IAM policy and that the bucket exists"

# Codes that every upload would receive alike: pause the queue instead of charging files.
QUEUE_ERROR_ADVICE = {
    "AccessDenied": "check the IAM policy (s3:PutObject and friends) and that the bucket exists",
    "403": (
        "S3 sends no error code for a rejected HEAD request: check the credentials, the IAM"
        " policy (s3:GetObject, s3:PutObject), that the bucket exists, and the system clock"
    ),
    "Forbidden": "check the IAM policy (s3:PutObject and friends) and that the bucket exists",
    "AllAccessDisabled": "access to the bucket is disabled by its owner",
    "AccountProblem": "the AWS account has a problem that blocks requests",
    "NoSuchBucket": "check s3.bucket and s3.region",
    "InvalidBucketName": "check s3.bucket",
    "InvalidAccessKeyId": _CHECK_CREDENTIALS,
    "SignatureDoesNotMatch": _CHECK_CREDENTIALS,
    "InvalidToken": _CHECK_CREDENTIALS,
    "ExpiredToken": "the session token expired; read the credentials again",
    "ExpiredTokenException": "the session token expired; read the credentials again",
    "TokenRefreshRequired": "the session token expired; read the credentials again",
    "RequestTimeTooSkewed": (
        "the system clock differs from the store's by more than 15 minutes; "
        "check time synchronisation (chrony or systemd-timesyncd)"
    ),
    "PermanentRedirect": _CHECK_REGION,
    "301": _CHECK_REGION,
    "AuthorizationHeaderMalformed": _CHECK_REGION,
    "IllegalLocationConstraintException": _CHECK_REGION,
    "InvalidStorageClass": "check s3.storage_class",
    "InvalidEncryptionAlgorithmError": "check s3.server_side_encryption",
    "KMS.DisabledException": "check s3.server_side_encryption and the KMS key",
    "NotImplemented": "the store does not support a header this uploader sends",
}

EXPIRED_CREDENTIAL_CODES = frozenset(
    {"ExpiredToken", "ExpiredTokenException", "TokenRefreshRequired"}
)

THROTTLING_CODES = frozenset(
    {
        "SlowDown",
        "503",
        "ServiceUnavailable",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequests",
        "TooManyRequestsException",
        "429",
        "BandwidthLimitExceeded",
    }
)

# Codes that no retry fixes for this file.
PERMANENT_FILE_CODES = frozenset(
    {"KeyTooLongError", "EntityTooLarge", "InvalidObjectName", "MetadataTooLarge"}
)

_CONNECTION_ADVICE = "check the network and s3.endpoint_url"

_MISSING_CREDENTIALS = (
    NoCredentialsError,
    PartialCredentialsError,
    CredentialRetrievalError,
    NoAuthTokenError,
    TokenRetrievalError,
    UnauthorizedSSOTokenError,
    ProfileNotFound,
)


def classify_error(exc: BaseException) -> UploadError:
    """Turn an exception raised by boto3, botocore or file reading into an UploadError.

    Queue scope (pause every upload, charge no attempt): the endpoint cannot be
    reached (DNS, connection refused, connect timeout, TLS), missing, invalid or
    expired credentials, access denied, no such bucket, clock skew, and settings
    the store rejects for every object. Throttling (SlowDown, 503, 429) is queue
    scope too, with ``throttled=True``. Because the store is overloaded rather
    than the file at fault, every upload slows down, and no file is charged an
    attempt or marked failed for it. Everything else is file scope and retryable,
    except codes such as ``KeyTooLongError`` that no retry can fix. An exception that comes from
    neither S3 nor the file (a bug) becomes a plain retryable UploadError. An ``UploadError`` is
    returned unchanged; ``S3UploadFailedError`` is unwrapped to the ClientError it
    replaced.
    """
    if isinstance(exc, UploadError):
        return exc

    inner = _unwrap(exc)
    if isinstance(inner, ClientError):
        return _classify_client_error(inner)
    if isinstance(inner, BotocoreConnectionError):
        return _connection_error(inner)
    if isinstance(inner, _MISSING_CREDENTIALS):
        return S3RequestError(
            f"S3 credentials are missing or unusable: {inner}; {_CHECK_CREDENTIALS}",
            scope="queue",
            retryable=True,
            code=type(inner).__name__,
            credentials_expired=True,
        )
    if isinstance(inner, FileNotFoundError):
        return FileVanishedError(f"log file {inner.filename} vanished: {inner.strerror}")
    if isinstance(inner, OSError) and inner.filename is not None:
        return UploadError(f"cannot read log file {inner.filename}: {inner.strerror}")
    if isinstance(inner, BotoCoreError):
        return S3RequestError(
            f"S3 request failed: {inner}", scope="file", retryable=True, code=type(inner).__name__
        )

    return UploadError(f"upload failed unexpectedly: {type(inner).__name__}: {inner}")


def is_unexpected(exc: BaseException) -> bool:
    """Tell whether an exception comes from neither an S3 request nor a file read."""
    expected = (UploadError, ClientError, BotoCoreError, OSError, S3UploadFailedError)
    return not isinstance(_unwrap(exc), expected)


def _unwrap(exc: BaseException) -> BaseException:
    """Return the ClientError behind boto3's S3UploadFailedError, if there is one."""
    wrapped = isinstance(exc, (S3UploadFailedError, TransferUploadFailedError))
    for linked in (exc.__cause__, exc.__context__):
        if wrapped and isinstance(linked, (ClientError, BotoCoreError)):
            found: BaseException = linked
            return found
    return exc


def _connection_error(exc: BotocoreConnectionError) -> S3RequestError:
    return S3RequestError(
        f"S3 endpoint unreachable: {exc}; {_CONNECTION_ADVICE}",
        scope="queue",
        retryable=True,
        code=type(exc).__name__,
    )


def _classify_client_error(exc: ClientError) -> S3RequestError:
    error = exc.response.get("Error", {})
    code = str(error.get("Code") or "Unknown")
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    text = error.get("Message") or "no message"
    summary = f"S3 {exc.operation_name} failed with {code} (HTTP {status}): {text}"

    if code in ("RequestTimeTooSkewed", "403", "Forbidden"):
        summary += _measured_skew(exc)
    if code in QUEUE_ERROR_ADVICE or (code not in THROTTLING_CODES and status == 403):
        advice = QUEUE_ERROR_ADVICE.get(code, _FORBIDDEN_ADVICE)
        return S3RequestError(
            f"{summary}; {advice}",
            scope="queue",
            retryable=True,
            code=code,
            status=status,
            credentials_expired=code in EXPIRED_CREDENTIAL_CODES,
        )

    if code in THROTTLING_CODES or status in (429, 503):
        return S3RequestError(
            f"{summary}; the store throttles requests, so uploads slow down",
            scope="queue",
            retryable=True,
            code=code,
            status=status,
            throttled=True,
        )

    retryable = code not in PERMANENT_FILE_CODES
    return S3RequestError(summary, scope="file", retryable=retryable, code=code, status=status)


def _measured_skew(exc: ClientError) -> str:
    """Return ``"; the system clock is ..."`` from the error's Date header, or ``""``."""
    headers = exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    skew = skew_from_date(headers.get("date"), time.time())
    if skew is None or abs(skew) < SKEW_WARNING_SECONDS:
        return ""
    return f"; {describe_skew(skew)}"
