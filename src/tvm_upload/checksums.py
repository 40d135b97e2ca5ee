"""Checksums that S3 verifies, in the form its ``x-amz-checksum-*`` headers carry.

``SHA256`` and ``CRC32C`` map to the S3 checksum algorithms of the same names and
travel in ``x-amz-checksum-*`` headers. ``none`` sends none of those headers, for
stores that reject them, and sends the older ``Content-MD5`` header instead, which
S3 and the common S3-compatible stores verify as well.

CRC32C comes from the ``crc32c`` package or from ``awscrt`` (``boto3[crt]``), the
first one found; neither is a hard dependency.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

CHECKSUM_ALGORITHMS = frozenset({"SHA256", "CRC32C", "none"})


def _find_crc32c() -> Callable[[bytes | memoryview, int], int] | None:
    try:
        import crc32c

        return crc32c.crc32c  # type: ignore[no-any-return, unused-ignore]
    except ImportError:
        pass
    try:
        from awscrt import checksums

        return checksums.crc32c  # type: ignore[no-any-return, unused-ignore]
    except ImportError:
        return None


_crc32c = _find_crc32c()


def crc32c_available() -> bool:
    """Tell whether a CRC32C implementation is installed."""
    return _crc32c is not None


class Digest(Protocol):
    """The part of the ``hashlib`` interface the uploader uses."""

    def update(self, data: bytes | memoryview, /) -> None: ...

    def digest(self) -> bytes: ...


class _Crc32cDigest:
    def __init__(self) -> None:
        if _crc32c is None:
            raise RuntimeError("CRC32C needs the 'crc32c' or 'awscrt' package")
        self._function = _crc32c
        self._value = 0

    def update(self, data: bytes | memoryview, /) -> None:
        self._value = self._function(data, self._value)

    def digest(self) -> bytes:
        return self._value.to_bytes(4, "big")


class ChecksumKind:
    """One checksum algorithm and the boto3 fields that carry it.

    ``algorithm`` is the ``ChecksumAlgorithm`` value for CreateMultipartUpload and
    ``field`` the request argument and response field (``ChecksumSHA256``); both are
    None for ``none``. Instances are immutable and safe to share between threads.
    """

    def __init__(self, name: str) -> None:
        if name not in CHECKSUM_ALGORITHMS:
            raise ValueError(f"checksum algorithm {name!r} is not one of {CHECKSUM_ALGORITHMS}")
        self.name = name
        self.algorithm = None if name == "none" else name
        self.field = None if name == "none" else f"Checksum{name}"

    def new(self) -> Digest:
        """Return a fresh digest: the algorithm's own, or MD5 for ``none``."""
        if self.name == "SHA256":
            return hashlib.sha256()
        if self.name == "CRC32C":
            return _Crc32cDigest()
        return hashlib.md5(usedforsecurity=False)

    def request_arguments(self, digest: bytes) -> dict[str, str]:
        """Return the boto3 argument that sends ``digest`` for the store to verify."""
        return {self.field or "ContentMD5": encode(digest)}

    def confirms(self, response: Mapping[str, Any], digest: bytes) -> bool:
        """Tell whether a PutObject or UploadPart response shows that the store verified ``digest``.

        A store that checked an ``x-amz-checksum-*`` header returns it in the
        response. For ``none`` the ETag of a single PUT or a part is the hex MD5 of
        the body on S3 and the common S3-compatible stores (not with SSE-KMS), so an
        equal ETag confirms the ``Content-MD5`` the store verified. False means the
        response proves nothing, not that the upload is wrong.
        """
        if self.field is not None:
            return response.get(self.field) == encode(digest)
        return str(response.get("ETag", "")).strip('"') == digest.hex()

    def composite(self, part_digests: Sequence[bytes]) -> str | None:
        """Return the checksum S3 reports for a multipart object built from these parts.

        S3 computes the algorithm over the concatenated part digests and appends
        ``-N``, the number of parts. None for ``none``.
        """
        if self.field is None:
            return None
        combined = self.new()
        for digest in part_digests:
            combined.update(digest)
        return f"{encode(combined.digest())}-{len(part_digests)}"


def encode(digest: bytes) -> str:
    """Encode a digest as the base64 text S3 uses in checksum headers."""
    return base64.b64encode(digest).decode("ascii")


class StoreConfirmations:
    """Whether the store confirmed the checksum in its latest upload response.

    Shared by every upload thread of one uploader. While the latest response
    confirmed its checksum, request bodies are not digested again as they are sent,
    because the store verifies them. A response without confirmation turns the local
    digest back on for the bodies that follow.
    """

    def __init__(self) -> None:
        self._confirmed = False

    @property
    def verify_locally(self) -> bool:
        """True while bodies must be digested as they are sent."""
        return not self._confirmed

    def record(self, confirmed: bool) -> None:
        self._confirmed = confirmed
