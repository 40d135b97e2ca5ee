"""S3 client construction, settings and the classification of real S3 errors."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import (
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    ReadTimeoutError,
)
from upload_support import (
    MiB,
    make_uploader,
    module_bucket,
    request_for,
    settings_for,
    unique_prefix,
    write_log,
)

from tvm_upload import s3client
from tvm_upload.errors import ConfigError, FileVanishedError, UploadError
from tvm_upload.localserver import SeaweedServer, s3_client
from tvm_upload.s3client import (
    S3RequestError,
    UploaderSettings,
    botocore_config,
    build_client,
    build_session,
    classify_error,
)
from tvm_upload.uploader import Uploader


@pytest.fixture(scope="module")
def bucket(seaweed: SeaweedServer) -> str:
    return module_bucket(seaweed.endpoint_url, "s3client")


@pytest.mark.parametrize(
    ("region", "endpoint"),
    [
        ("cn-north-1", "https://s3.cn-north-1.amazonaws.com.cn"),
        ("cn-northwest-1", "https://s3.cn-northwest-1.amazonaws.com.cn"),
        ("eu-central-1", "https://s3.eu-central-1.amazonaws.com"),
    ],
)
def test_region_endpoints(region: str, endpoint: str) -> None:
    client = build_client(UploaderSettings(bucket="logs", region=region))

    assert client.meta.endpoint_url == endpoint
    assert client.meta.region_name == region


def test_china_endpoint_ends_with_cn() -> None:
    client = build_client(UploaderSettings(bucket="logs", region="cn-north-1"))

    assert client.meta.endpoint_url.endswith(".amazonaws.com.cn")


def test_endpoint_url_overrides_region() -> None:
    settings = UploaderSettings(
        bucket="logs", region="cn-north-1", endpoint_url="http://127.0.0.1:9"
    )

    assert build_client(settings).meta.endpoint_url == "http://127.0.0.1:9"


def test_botocore_config() -> None:
    settings = UploaderSettings(bucket="logs", region="us-east-1", max_concurrency=16)

    config = botocore_config(settings)

    assert config.retries == {"mode": "standard", "total_max_attempts": 3}
    assert config.request_checksum_calculation == "when_required"
    assert config.response_checksum_validation == "when_required"
    assert config.max_pool_connections >= 16
    assert config.connect_timeout == 10.0
    assert config.read_timeout == 60.0


def write_credentials(directory: Path) -> Path:
    directory.mkdir()
    (directory / "credentials").write_text(
        "[default]\naws_access_key_id = AKIADEFAULT\naws_secret_access_key = default-secret\n"
        "[fleet]\naws_access_key_id = AKIAFLEET\naws_secret_access_key = fleet-secret\n"
    )
    (directory / "config").write_text("[profile fleet]\nregion = cn-north-1\n")
    return directory


def test_credentials_path_and_profile(tmp_path: Path) -> None:
    directory = write_credentials(tmp_path / "aws")
    environment_before = dict(os.environ)
    settings = UploaderSettings(
        bucket="logs", region="cn-north-1", profile="fleet", credentials_path=directory
    )

    credentials = build_session(settings).get_credentials()

    assert credentials.access_key == "AKIAFLEET"
    assert dict(os.environ) == environment_before


def test_credentials_path_default_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = write_credentials(tmp_path / "aws")
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    settings = UploaderSettings(bucket="logs", region="us-east-1", credentials_path=directory)

    assert build_session(settings).get_credentials().access_key == "AKIADEFAULT"


def test_environment_credentials_without_profile(tmp_path: Path) -> None:
    directory = write_credentials(tmp_path / "aws")
    settings = UploaderSettings(bucket="logs", region="us-east-1", credentials_path=directory)

    assert build_session(settings).get_credentials().access_key == "local"


def test_unknown_profile_is_config_error(tmp_path: Path) -> None:
    directory = write_credentials(tmp_path / "aws")
    settings = UploaderSettings(
        bucket="logs", region="us-east-1", profile="nobody", credentials_path=directory
    )

    with pytest.raises(ConfigError, match="profile 'nobody' not found"):
        build_client(settings)


def test_crc32c_without_package_is_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s3client, "crc32c_available", lambda: False)
    settings = UploaderSettings(bucket="logs", region="us-east-1", checksum_algorithm="CRC32C")

    with pytest.raises(ConfigError, match="pip install crc32c"):
        build_client(settings)


def test_settings_from_config_sections() -> None:
    s3_section = SimpleNamespace(
        bucket="logs",
        region="cn-northwest-1",
        profile=None,
        credentials_path="~/aws",
        storage_class="STANDARD",
    )
    upload_section = SimpleNamespace(max_concurrency=8, multipart_threshold_mb=64)

    settings = UploaderSettings.from_objects(s3_section, upload_section)

    assert settings.bucket == "logs"
    assert settings.region == "cn-northwest-1"
    assert settings.profile is None
    assert settings.credentials_path == Path("~/aws").expanduser()
    assert settings.max_concurrency == 8
    assert settings.multipart_threshold_bytes == 64 * MiB
    assert settings.checksum_algorithm == "SHA256"


def test_uploader_from_config() -> None:
    config = SimpleNamespace(
        s3=SimpleNamespace(bucket="logs", region="cn-north-1"),
        upload=SimpleNamespace(max_concurrency=2, multipart_threshold_mb=128),
    )

    uploader = Uploader.from_config(config)

    assert uploader.settings.multipart_threshold_bytes == 128 * MiB
    assert uploader.client.meta.endpoint_url.endswith(".amazonaws.com.cn")
    uploader.close()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"bucket": ""}, "bucket is empty"),
        ({"addressing_style": "sideways"}, "addressing_style"),
        ({"checksum_algorithm": "MD5"}, "checksum_algorithm"),
        ({"min_part_size_bytes": 1024}, "at least 5242880"),
        ({"multipart_threshold_bytes": MiB}, "below min_part_size_bytes"),
        ({"max_concurrency": 0}, "1 or more"),
    ],
)
def test_invalid_settings(overrides: dict[str, Any], message: str) -> None:
    values: dict[str, Any] = {"bucket": "logs", "region": "us-east-1", **overrides}

    with pytest.raises(ValueError, match=message):
        UploaderSettings(**values)


def test_extra_put_arguments() -> None:
    standard = UploaderSettings(bucket="b", region="r", storage_class="STANDARD")
    archived = UploaderSettings(
        bucket="b", region="r", storage_class="GLACIER_IR", server_side_encryption="aws:kms"
    )

    assert standard.extra_put_arguments() == {}
    assert archived.extra_put_arguments() == {
        "StorageClass": "GLACIER_IR",
        "ServerSideEncryption": "aws:kms",
    }


def client_error(code: str, status: int, operation: str = "PutObject") -> ClientError:
    response: Any = {
        "Error": {"Code": code, "Message": f"{code} happened"},
        "ResponseMetadata": {"HTTPStatusCode": status},
    }
    return ClientError(response, operation)


@pytest.mark.parametrize(
    ("code", "status", "scope", "retryable", "throttled"),
    [
        ("AccessDenied", 403, "queue", True, False),
        ("403", 403, "queue", True, False),
        ("NoSuchBucket", 404, "queue", True, False),
        ("InvalidAccessKeyId", 403, "queue", True, False),
        ("SignatureDoesNotMatch", 403, "queue", True, False),
        ("RequestTimeTooSkewed", 403, "queue", True, False),
        ("ExpiredToken", 400, "queue", True, False),
        ("PermanentRedirect", 301, "queue", True, False),
        ("AuthorizationHeaderMalformed", 400, "queue", True, False),
        ("InvalidStorageClass", 400, "queue", True, False),
        ("SomethingForbidden", 403, "queue", True, False),
        ("SlowDown", 503, "queue", True, True),
        ("503", 503, "queue", True, True),
        ("ServiceUnavailable", 503, "queue", True, True),
        ("Throttling", 400, "queue", True, True),
        ("TooManyRequests", 429, "queue", True, True),
        ("InternalError", 500, "file", True, False),
        ("BadDigest", 400, "file", True, False),
        ("NoSuchUpload", 404, "file", True, False),
        ("RequestTimeout", 400, "file", True, False),
        ("KeyTooLongError", 400, "file", False, False),
        ("EntityTooLarge", 400, "file", False, False),
    ],
)
def test_classify_client_error_table(
    code: str, status: int, scope: str, retryable: bool, throttled: bool
) -> None:
    error = classify_error(client_error(code, status))

    assert isinstance(error, S3RequestError)
    assert error.code == code
    assert error.status == status
    assert error.scope == scope
    assert error.retryable is retryable
    assert error.throttled is throttled
    assert code in str(error)


def test_expired_token_asks_for_reload() -> None:
    error = classify_error(client_error("ExpiredToken", 400))

    assert isinstance(error, S3RequestError)
    assert error.credentials_expired is True


def test_clock_skew_message_gives_advice() -> None:
    error = classify_error(client_error("RequestTimeTooSkewed", 403))

    assert "time synchronisation" in str(error)


@pytest.mark.parametrize(
    ("exc", "scope"),
    [
        (EndpointConnectionError(endpoint_url="https://s3.example.invalid"), "queue"),
        (ConnectTimeoutError(endpoint_url="https://s3.example.invalid"), "queue"),
        (NoCredentialsError(), "queue"),
        (ReadTimeoutError(endpoint_url="https://s3.example.invalid"), "file"),
    ],
)
def test_classify_botocore_exceptions(exc: Exception, scope: str) -> None:
    error = classify_error(exc)

    assert error.scope == scope
    assert error.retryable is True


def test_classify_file_errors(tmp_path: Path) -> None:
    missing = tmp_path / "gone.log"
    with pytest.raises(FileNotFoundError) as vanished:
        missing.read_bytes()
    with pytest.raises(IsADirectoryError) as unreadable:
        tmp_path.read_bytes()

    assert isinstance(classify_error(vanished.value), FileVanishedError)
    assert classify_error(unreadable.value).scope == "file"
    assert "cannot read" in str(classify_error(unreadable.value))


def test_classify_keeps_upload_errors() -> None:
    original = UploadError("already classified", scope="queue")

    assert classify_error(original) is original


def test_classify_unexpected_exception() -> None:
    error = classify_error(KeyError("PartNumber"))

    assert type(error) is UploadError
    assert error.scope == "file"
    assert "KeyError" in str(error)


def capture(call: Any) -> BaseException:
    with pytest.raises(Exception) as raised:
        call()
    return raised.value


def test_real_no_such_bucket(seaweed: SeaweedServer) -> None:
    uploader = make_uploader(seaweed.endpoint_url, "no-such-bucket-here")

    with pytest.raises(S3RequestError) as raised:
        uploader.abort_stale_uploads("", keep=set())

    assert raised.value.code == "NoSuchBucket"
    assert raised.value.scope == "queue"


def test_real_put_to_missing_bucket(seaweed: SeaweedServer, tmp_path: Path) -> None:
    """SeaweedFS rejects a PutObject to a missing bucket with AccessDenied, AWS with NoSuchBucket."""
    path = write_log(tmp_path, "a.log", 10)
    uploader = make_uploader(seaweed.endpoint_url, "no-such-bucket-here")

    with pytest.raises(S3RequestError) as raised:
        uploader.upload(request_for(path, "v/d/s/a.log"))

    assert raised.value.code in ("AccessDenied", "NoSuchBucket")
    assert raised.value.scope == "queue"


def test_real_s3_upload_failed_error_is_unwrapped(seaweed: SeaweedServer, tmp_path: Path) -> None:
    path = write_log(tmp_path, "a.log", 10)
    client = s3_client(seaweed.endpoint_url)
    failure = capture(lambda: client.upload_file(str(path), "no-such-bucket-here", "a.log"))
    assert isinstance(failure, S3UploadFailedError)

    error = classify_error(failure)

    assert isinstance(error, S3RequestError)
    assert error.code in ("AccessDenied", "NoSuchBucket")
    assert error.scope == "queue"


def test_real_connection_refused(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    path = write_log(tmp_path, "a.log", 10)
    uploader = make_uploader(f"http://127.0.0.1:{closed_port}", "logs")

    with pytest.raises(S3RequestError) as raised:
        uploader.upload(request_for(path, "v/d/s/a.log"))

    assert raised.value.code == "EndpointConnectionError"
    assert raised.value.scope == "queue"
    assert "s3.endpoint_url" in str(raised.value)


def test_real_read_timeout(tmp_path: Path) -> None:
    """A server that accepts connections and never responds causes a read timeout."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        path = write_log(tmp_path, "a.log", 10)
        uploader = make_uploader(endpoint, "logs", read_timeout_seconds=0.3)

        with pytest.raises(S3RequestError) as raised:
            uploader.upload(request_for(path, "v/d/s/a.log"))

    assert raised.value.code == "ReadTimeoutError"
    assert raised.value.scope == "file"
    assert raised.value.retryable is True


def test_real_no_credentials(
    seaweed: SeaweedServer, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    empty = tmp_path / "aws"
    empty.mkdir()
    path = write_log(tmp_path, "a.log", 10)
    uploader = make_uploader(seaweed.endpoint_url, bucket, credentials_path=empty)

    with pytest.raises(S3RequestError) as raised:
        uploader.upload(request_for(path, "v/d/s/a.log"))

    assert raised.value.code == "NoCredentialsError"
    assert raised.value.scope == "queue"
    assert raised.value.credentials_expired is True


def test_reload_credentials_reads_files_again(
    seaweed: SeaweedServer, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    directory = tmp_path / "aws"
    directory.mkdir()
    path = write_log(tmp_path, "a.log", 10)
    uploader = make_uploader(seaweed.endpoint_url, bucket, credentials_path=directory)
    with pytest.raises(S3RequestError):
        uploader.upload(request_for(path, f"{unique_prefix()}a.log"))
    (directory / "credentials").write_text(
        "[default]\naws_access_key_id = rotated\naws_secret_access_key = rotated-secret\n"
    )

    uploader.reload_credentials()
    result = uploader.upload(request_for(path, f"{unique_prefix()}a.log"))

    assert result.size == 10


def test_real_key_too_long(seaweed: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    path = write_log(tmp_path, "a.log", 10)
    uploader = make_uploader(seaweed.endpoint_url, bucket)

    with pytest.raises(S3RequestError) as raised:
        uploader.upload(request_for(path, "k" * 1100))

    assert raised.value.code == "KeyTooLongError"
    assert raised.value.retryable is False


def test_real_invalid_storage_class(seaweed: SeaweedServer, bucket: str, tmp_path: Path) -> None:
    path = write_log(tmp_path, "a.log", 10)
    uploader = make_uploader(seaweed.endpoint_url, bucket, storage_class="NO_SUCH_CLASS")

    with pytest.raises(S3RequestError) as raised:
        uploader.upload(request_for(path, f"{unique_prefix()}a.log"))

    assert raised.value.code == "InvalidStorageClass"
    assert raised.value.scope == "queue"


def test_real_bad_digest_and_no_such_upload(seaweed: SeaweedServer, bucket: str) -> None:
    client = s3_client(seaweed.endpoint_url)
    key = f"{unique_prefix()}a.log"

    bad_digest = capture(
        lambda: client.put_object(
            Bucket=bucket, Key=key, Body=b"data", ChecksumSHA256="A" * 43 + "="
        )
    )
    no_upload = capture(lambda: client.list_parts(Bucket=bucket, Key=key, UploadId="missing"))

    assert classify_error(bad_digest).scope == "file"
    assert getattr(classify_error(bad_digest), "code", None) == "BadDigest"
    assert classify_error(no_upload).retryable is True
    assert getattr(classify_error(no_upload), "code", None) == "NoSuchUpload"


class _CannedErrorHandler(BaseHTTPRequestHandler):
    """Returns the status and S3 error code of its server for every request."""

    def _answer(self, with_body: bool) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)
        status, code = self.server.canned  # type: ignore[attr-defined]
        body = (
            f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
            f"<Message>{code} from the test server</Message></Error>"
        ).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if with_body:
            self.wfile.write(body)

    def do_PUT(self) -> None:
        self._answer(with_body=True)

    def do_HEAD(self) -> None:
        self._answer(with_body=False)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def canned_server() -> Iterator[ThreadingHTTPServer]:
    """An HTTP server on 127.0.0.1 that returns one S3 error for every request."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _CannedErrorHandler)
    server.canned = (503, "SlowDown")  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_real_slow_down_is_throttled(canned_server: ThreadingHTTPServer, tmp_path: Path) -> None:
    endpoint = f"http://127.0.0.1:{canned_server.server_address[1]}"
    path = write_log(tmp_path, "a.log", 10)
    uploader = Uploader(settings_for(endpoint, "logs"))

    with pytest.raises(S3RequestError) as raised:
        uploader.upload(request_for(path, "v/d/s/a.log"))

    assert raised.value.code in ("SlowDown", "503")
    assert raised.value.throttled is True
    assert raised.value.scope == "queue"


def test_real_head_forbidden_is_queue_error(canned_server: ThreadingHTTPServer) -> None:
    canned_server.canned = (403, "AccessDenied")  # type: ignore[attr-defined]
    endpoint = f"http://127.0.0.1:{canned_server.server_address[1]}"
    uploader = Uploader(settings_for(endpoint, "logs"))

    with pytest.raises(S3RequestError) as raised:
        uploader.head_sha256("v/d/s/a.log")

    assert raised.value.code == "403"
    assert raised.value.scope == "queue"


def test_small_threshold_lowers_part_size() -> None:
    upload_section = SimpleNamespace(multipart_threshold_mb=5)

    settings = UploaderSettings.from_objects(
        SimpleNamespace(bucket="logs", region="us-east-1"), upload_section
    )

    assert settings.multipart_threshold_bytes == 5 * MiB
    assert settings.min_part_size_bytes == 5 * MiB
