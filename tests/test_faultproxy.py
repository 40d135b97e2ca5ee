"""Tests of the fault proxy against the real SeaweedFS server, through a plain boto3 client."""

from __future__ import annotations

import base64
import email.utils
import http.client
import io
import itertools
import os
import socket
import threading
import zlib
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    ReadTimeoutError,
)
from faultproxy import FaultProxy
from faultproxy.framing import ChunkedDecoder, ProtocolError

from tvm_upload.localserver import SeaweedServer, create_bucket

MiB = 1024 * 1024
PART_BYTES = 5 * MiB

_prefix_numbers = itertools.count(1)


def proxy_client(
    proxy: FaultProxy,
    *,
    read_timeout_seconds: float = 10.0,
) -> Any:
    """Return a boto3 S3 client through the proxy that makes a single attempt per call."""
    return boto3.client(
        "s3",
        endpoint_url=proxy.endpoint_url,
        aws_access_key_id="local",
        aws_secret_access_key="local-secret",
        region_name="us-east-1",
        config=Config(
            s3={"addressing_style": "path"},
            retries={"total_max_attempts": 1, "mode": "standard"},
            connect_timeout=2,
            read_timeout=read_timeout_seconds,
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


def proxy_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("faultproxy-")]


def aws_chunked(data: bytes, chunk_bytes: int) -> bytes:
    """Encode data as an unsigned aws-chunked body with a CRC32 trailer."""
    chunks = [data[i : i + chunk_bytes] for i in range(0, len(data), chunk_bytes)]
    encoded = b"".join(b"%x\r\n%b\r\n" % (len(chunk), chunk) for chunk in chunks)
    checksum = base64.b64encode(zlib.crc32(data).to_bytes(4, "big"))
    return encoded + b"0\r\nx-amz-checksum-crc32:" + checksum + b"\r\n\r\n"


@pytest.fixture(scope="module")
def bucket(seaweed: SeaweedServer) -> str:
    """One bucket for the whole module, because SeaweedFS allocates volumes per bucket."""
    name = f"faultproxy-{os.getpid()}"
    create_bucket(seaweed.endpoint_url, name)
    return name


@pytest.fixture
def prefix() -> str:
    """A key prefix of its own for each test in the shared bucket."""
    return f"t{next(_prefix_numbers)}/"


@pytest.fixture
def proxy(seaweed: SeaweedServer) -> Iterator[FaultProxy]:
    with FaultProxy(seaweed.endpoint_url) as running:
        yield running
    assert proxy_threads() == []


@pytest.fixture
def client(proxy: FaultProxy) -> Any:
    return proxy_client(proxy)


def test_put_get_list_pass_through(
    proxy: FaultProxy, client: Any, bucket: str, prefix: str
) -> None:
    client.put_object(Bucket=bucket, Key=f"{prefix}a.log", Body=b"hello")
    client.put_object(Bucket=bucket, Key=f"{prefix}b log.txt", Body=io.BytesIO(b"x" * 3000))
    body = client.get_object(Bucket=bucket, Key=f"{prefix}a.log")["Body"].read()
    listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix)

    assert body == b"hello"
    assert [item["Key"] for item in listing["Contents"]] == [f"{prefix}a.log", f"{prefix}b log.txt"]
    assert proxy.requests[:3] == [
        ("PUT", f"/{bucket}/{prefix}a.log", ""),
        ("PUT", f"/{bucket}/{prefix}b log.txt", ""),
        ("GET", f"/{bucket}/{prefix}a.log", ""),
    ]
    assert proxy.requests[3][2].startswith("list-type=2")
    assert proxy.method_counts == {"PUT": 2, "GET": 2}
    assert proxy.request_body_bytes == 5 + 3000
    assert proxy.bytes_from_client > 3005
    assert proxy.bytes_to_client > 5
    assert [r.status for r in proxy.records] == [200, 200, 200, 200]


def test_keep_alive_carries_several_requests(
    proxy: FaultProxy, client: Any, bucket: str, prefix: str
) -> None:
    for number in range(5):
        client.put_object(Bucket=bucket, Key=f"{prefix}{number}", Body=b"data")
        client.head_object(Bucket=bucket, Key=f"{prefix}{number}")

    assert proxy.method_counts == {"PUT": 5, "HEAD": 5}
    assert proxy.connection_count == 1


def test_multipart_counts_upload_parts(
    proxy: FaultProxy, client: Any, bucket: str, prefix: str, s3: Any
) -> None:
    key = f"{prefix}big.bag"
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    parts = []
    for number, size in ((1, PART_BYTES), (2, 1000)):
        response = client.upload_part(
            Bucket=bucket,
            Key=key,
            UploadId=upload_id,
            PartNumber=number,
            Body=io.BytesIO(b"p" * size),
        )
        parts.append({"PartNumber": number, "ETag": response["ETag"]})
    client.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
    )

    assert s3.head_object(Bucket=bucket, Key=key)["ContentLength"] == PART_BYTES + 1000
    assert proxy.upload_part_count == 2
    assert proxy.upload_part_bytes == PART_BYTES + 1000
    assert proxy.method_counts == {"POST": 2, "PUT": 2}
    assert proxy.bytes_from_client > PART_BYTES + 1000


def test_aws_chunked_body_counts_payload(proxy: FaultProxy, bucket: str, prefix: str) -> None:
    data = bytes(range(256)) * 800
    body = aws_chunked(data, chunk_bytes=65536)
    pieces = [body[i : i + 7000] for i in range(0, len(body), 7000)]
    headers = {
        "Transfer-Encoding": "chunked",
        "Content-Encoding": "aws-chunked",
        "X-Amz-Content-Sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
        "X-Amz-Decoded-Content-Length": str(len(data)),
        "X-Amz-Trailer": "x-amz-checksum-crc32",
    }
    connection = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)

    connection.request(
        "PUT", f"/{bucket}/{prefix}c.log", iter(pieces), headers, encode_chunked=True
    )
    put_response = connection.getresponse()
    put_response.read()
    connection.request("GET", f"/{bucket}/{prefix}c.log")
    stored = connection.getresponse().read()
    connection.close()

    assert put_response.status == 200
    assert stored == data
    assert proxy.records[0].body_bytes == len(data)
    assert proxy.connection_count == 1


@pytest.mark.parametrize(
    ("status", "code"),
    [
        (503, "SlowDown"),
        (403, "AccessDenied"),
        (404, "NoSuchBucket"),
        (403, "InvalidAccessKeyId"),
        (403, "SignatureDoesNotMatch"),
        (403, "RequestTimeTooSkewed"),
    ],
)
def test_respond_error_sets_client_error_code(
    proxy: FaultProxy, client: Any, bucket: str, prefix: str, status: int, code: str
) -> None:
    proxy.respond_error(status, code)

    with pytest.raises(ClientError) as raised:
        client.put_object(Bucket=bucket, Key=f"{prefix}a.log", Body=b"x" * 1000)
    client.put_object(Bucket=bucket, Key=f"{prefix}a.log", Body=b"x" * 1000)

    assert raised.value.response["Error"]["Code"] == code
    assert raised.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
    assert [r.status for r in proxy.records] == [status, 200]
    assert [r.fault for r in proxy.records] == ["respond_error", None]


def test_respond_error_skips_withheld_body(
    proxy: FaultProxy, client: Any, bucket: str, prefix: str, s3: Any
) -> None:
    proxy.respond_error(503, "SlowDown")

    with pytest.raises(ClientError) as raised:
        client.put_object(Bucket=bucket, Key=f"{prefix}a.log", Body=io.BytesIO(b"x" * MiB))
    client.put_object(Bucket=bucket, Key=f"{prefix}b.log", Body=io.BytesIO(b"y" * MiB))

    assert raised.value.response["Error"]["Code"] == "SlowDown"
    assert proxy.records[0].headers["expect"] == "100-continue"
    assert proxy.records[0].body_bytes == 0
    assert proxy.records[1].body_bytes == MiB
    assert proxy.connection_count == 2
    assert s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["KeyCount"] == 1


def test_respond_error_match_and_times(
    proxy: FaultProxy, client: Any, bucket: str, prefix: str
) -> None:
    proxy.respond_error(
        403, "AccessDenied", times=2, match=lambda method, path, _: method == "HEAD"
    )
    client.put_object(Bucket=bucket, Key=f"{prefix}a.log", Body=b"x")

    for _ in range(2):
        with pytest.raises(ClientError) as raised:
            client.head_object(Bucket=bucket, Key=f"{prefix}a.log")
        assert raised.value.response["Error"]["Code"] == "403"
    client.head_object(Bucket=bucket, Key=f"{prefix}a.log")

    assert [r.status for r in proxy.records] == [200, 403, 403, 200]
    assert proxy.connection_count == 1


def test_close_mid_body_breaks_one_put(
    proxy: FaultProxy, client: Any, bucket: str, prefix: str, s3: Any
) -> None:
    proxy.close_mid_body(after_bytes=MiB)

    with pytest.raises(ConnectionClosedError):
        client.put_object(Bucket=bucket, Key=f"{prefix}a.bag", Body=io.BytesIO(b"a" * 3 * MiB))
    client.put_object(Bucket=bucket, Key=f"{prefix}b.bag", Body=io.BytesIO(b"b" * 3 * MiB))

    listing = s3.list_objects_v2(Bucket=bucket, Prefix=prefix)
    assert [r.fault for r in proxy.records] == ["close_mid_body", None]
    assert MiB - 2000 < proxy.records[0].body_bytes < 3 * MiB
    assert proxy.records[1].body_bytes == 3 * MiB
    assert [item["Key"] for item in listing["Contents"]] == [f"{prefix}b.bag"]


def test_close_mid_body_matches_upload_part(
    proxy: FaultProxy, client: Any, bucket: str, prefix: str
) -> None:
    key = f"{prefix}big.bag"
    proxy.close_mid_body(after_bytes=1000, match=lambda method, path, _: method == "PUT")
    upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]

    with pytest.raises(ConnectionClosedError):
        client.upload_part(
            Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=1, Body=io.BytesIO(b"p" * MiB)
        )
    client.abort_multipart_upload(Bucket=bucket, Key=key, UploadId=upload_id)

    assert [r.fault for r in proxy.records] == [None, "close_mid_body", None]
    assert proxy.upload_part_count == 1
    assert proxy.upload_part_bytes < MiB


def test_stall_causes_read_timeout(proxy: FaultProxy, bucket: str, prefix: str) -> None:
    client = proxy_client(proxy, read_timeout_seconds=1)
    proxy.stall(5)

    with pytest.raises(ReadTimeoutError):
        client.put_object(Bucket=bucket, Key=f"{prefix}a.log", Body=b"x" * 1000)
    client.put_object(Bucket=bucket, Key=f"{prefix}a.log", Body=b"x" * 1000)

    assert [r.fault for r in proxy.records] == ["stall", None]
    assert [r.status for r in proxy.records] == [None, 200]


def test_cut_and_restore(proxy: FaultProxy, client: Any, bucket: str, prefix: str) -> None:
    client.put_object(Bucket=bucket, Key=f"{prefix}before.log", Body=b"x")

    proxy.cut()
    with pytest.raises(ConnectionClosedError):
        client.put_object(Bucket=bucket, Key=f"{prefix}during.log", Body=b"x")
    proxy.restore()
    client.put_object(Bucket=bucket, Key=f"{prefix}after.log", Body=b"x")

    paths = [path for _, path, _ in proxy.requests]
    assert paths == [f"/{bucket}/{prefix}before.log", f"/{bucket}/{prefix}after.log"]
    assert proxy.rejected_connection_count >= 1


def test_cut_refusing_connections(proxy: FaultProxy, client: Any, bucket: str, prefix: str) -> None:
    proxy.cut(refuse_connections=True)
    with pytest.raises(EndpointConnectionError):
        client.put_object(Bucket=bucket, Key=f"{prefix}during.log", Body=b"x")
    proxy.restore()
    client.put_object(Bucket=bucket, Key=f"{prefix}after.log", Body=b"x")

    assert proxy.requests == [("PUT", f"/{bucket}/{prefix}after.log", "")]
    assert proxy.rejected_connection_count == 0


def test_wrong_date_shifts_response_date(proxy: FaultProxy, client: Any, bucket: str) -> None:
    proxy.wrong_date(-3600)

    shifted = client.list_objects_v2(Bucket=bucket)["ResponseMetadata"]["HTTPHeaders"]["date"]
    normal = client.list_objects_v2(Bucket=bucket)["ResponseMetadata"]["HTTPHeaders"]["date"]

    difference = email.utils.parsedate_to_datetime(normal) - email.utils.parsedate_to_datetime(
        shifted
    )
    assert 3590 < difference.total_seconds() < 3610
    assert [r.fault for r in proxy.records] == ["wrong_date", None]


def test_client_closing_early_does_not_block(
    proxy: FaultProxy, client: Any, bucket: str, prefix: str
) -> None:
    head = f"PUT /{bucket}/{prefix}x HTTP/1.1\r\nHost: a\r\nContent-Length: 100000\r\n\r\n"
    with socket.create_connection(("127.0.0.1", proxy.port)) as raw:
        raw.sendall(head.encode() + b"partial body")

    client.put_object(Bucket=bucket, Key=f"{prefix}after.log", Body=b"x")

    # Each connection has its own proxy thread, so either request may be recorded first.
    statuses = {record.path.rsplit("/", 1)[-1]: record.status for record in proxy.records}
    assert proxy.method_counts == {"PUT": 2}
    assert statuses["x"] is None
    assert statuses["after.log"] == 200


def test_stop_ends_threads_with_open_connections(
    seaweed: SeaweedServer, bucket: str, prefix: str
) -> None:
    with FaultProxy(seaweed.endpoint_url) as proxy:
        client = proxy_client(proxy, read_timeout_seconds=1)
        client.put_object(Bucket=bucket, Key=f"{prefix}a.log", Body=b"x")
        proxy.stall(60)
        with pytest.raises(ReadTimeoutError):
            client.put_object(Bucket=bucket, Key=f"{prefix}b.log", Body=b"x")
        assert len(proxy_threads()) >= 2

    assert proxy_threads() == []


def test_client_closing_during_response(
    proxy: FaultProxy, client: Any, bucket: str, prefix: str
) -> None:
    client.put_object(Bucket=bucket, Key=f"{prefix}big.bag", Body=b"z" * 4 * MiB)
    request = f"GET /{bucket}/{prefix}big.bag HTTP/1.1\r\nHost: a\r\n\r\n"
    with socket.create_connection(("127.0.0.1", proxy.port)) as raw:
        raw.sendall(request.encode())
        first_bytes = raw.recv(1000)

    client.head_object(Bucket=bucket, Key=f"{prefix}big.bag")

    assert first_bytes.startswith(b"HTTP/1.1 200")
    assert [r.status for r in proxy.records] == [200, 200, 200]


def test_chunked_decoder_byte_by_byte() -> None:
    stream = b"5;chunk-signature=abc\r\nhello\r\n0\r\nx-amz-checksum-crc32:AAAA\r\n\r\nNEXT"
    pieces: list[bytes] = []
    decoder = ChunkedDecoder(pieces.append)

    consumed = sum(decoder.feed(stream[i : i + 1]) for i in range(len(stream)))

    assert b"".join(pieces) == b"hello"
    assert decoder.done
    assert consumed == len(stream) - len(b"NEXT")


@pytest.mark.parametrize("stream", [b"zz\r\n", b"-5\r\nhello\r\n", b"2\r\nhello\r\n"])
def test_chunked_decoder_rejects_invalid_framing(stream: bytes) -> None:
    decoder = ChunkedDecoder(lambda data: None)

    with pytest.raises(ProtocolError):
        decoder.feed(stream)


def test_rejects_non_loopback_upstream() -> None:
    with pytest.raises(ValueError, match="127.0.0.1"):
        FaultProxy("http://10.0.0.1:8333")
