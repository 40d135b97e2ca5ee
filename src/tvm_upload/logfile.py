"""Reading a log file for upload: pinned to its identity, never through a symlink.

``LogFile.open`` checks that the path still has the identity the file was queued
with, opens it with ``O_NOFOLLOW`` and checks the open descriptor again, so the
bytes read belong to that identity. Reads use ``pread`` at explicit offsets and
never read past the queued size, even when the file has grown since.

``read_digests`` is the first read pass over a file: the SHA-256 of the whole
content, and one digest per part (the whole file is one part for a single PUT).
``PartReader`` is the request body of the second pass, which sends the bytes.
"""

from __future__ import annotations

import errno
import hashlib
import os
import stat
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, final

from tvm_upload.checksums import ChecksumKind, Digest
from tvm_upload.errors import FileChangedError, FileVanishedError, UploadError
from tvm_upload.files import FileIdentity

MiB = 1024 * 1024
READ_CHUNK_BYTES = 1 * MiB
"""Buffer of the digest pass; large enough that hashlib releases the GIL for most of it."""

_OPEN_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class UploadStoppedError(UploadError):
    """The upload stopped early because ``should_stop`` returned True.

    This is no failure of the file: release it without charging an attempt.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, scope="file", retryable=True)


def _describe_change(path: Path, expected: FileIdentity, current: FileIdentity) -> str:
    if (current.device, current.inode) != (expected.device, expected.inode):
        return f"log file {path} was replaced by another file since it was queued"
    return (
        f"log file {path} changed since it was queued: size {expected.size} -> "
        f"{current.size} bytes, mtime {expected.mtime_ns} -> {current.mtime_ns} ns"
    )


def _read_error(path: Path, exc: OSError) -> UploadError:
    if exc.errno == errno.ENOENT:
        return FileVanishedError(f"log file {path} vanished before its upload finished")
    if exc.errno == errno.ELOOP:
        return UploadError(
            f"log file {path} is a symbolic link; symlinks are never followed", retryable=False
        )
    return UploadError(f"cannot read log file {path}: {exc.strerror}")


@final
class LogFile:
    """An open log file pinned to the identity it was queued with.

    Safe to share between threads for reading, because every read is a ``pread``.
    """

    def __init__(self, path: Path, identity: FileIdentity, descriptor: int) -> None:
        self.path = path
        self.identity = identity
        self._descriptor = descriptor

    @classmethod
    def open(cls, path: Path, expected: FileIdentity) -> LogFile:
        """Open ``path`` for reading if it still has the identity ``expected``.

        Raises FileVanishedError when the path is gone, FileChangedError when its
        identity differs, and UploadError (scope ``"file"``) when it cannot be read
        or is not a regular file.
        """
        cls._check_identity(path, expected)
        try:
            descriptor = os.open(path, _OPEN_FLAGS)
        except OSError as exc:
            raise _read_error(path, exc) from exc

        log_file = cls(path, expected, descriptor)
        try:
            log_file._check_descriptor()
        except BaseException:
            log_file.close()
            raise
        return log_file

    @staticmethod
    def _check_identity(path: Path, expected: FileIdentity) -> None:
        try:
            status = os.lstat(path)
        except OSError as exc:
            raise _read_error(path, exc) from exc
        if stat.S_ISLNK(status.st_mode):
            raise FileVanishedError(
                f"{path} is now a symbolic link, which is never followed; the log file is gone"
            )
        if not stat.S_ISREG(status.st_mode):
            raise FileVanishedError(f"{path} is not a regular file any more; the log file is gone")

        current = FileIdentity.from_stat(status)
        if current != expected:
            raise FileChangedError(_describe_change(path, expected, current))

    def _check_descriptor(self) -> None:
        status = os.fstat(self._descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise UploadError(f"{self.path} is not a regular file", retryable=False)

        current = FileIdentity.from_stat(status)
        if current != self.identity:
            raise FileChangedError(_describe_change(self.path, self.identity, current))

    @property
    def size(self) -> int:
        return self.identity.size

    def check_unchanged(self) -> None:
        """Raise FileChangedError or FileVanishedError unless path and descriptor still match."""
        self._check_descriptor()
        self._check_identity(self.path, self.identity)

    def read(self, offset: int, length: int) -> bytes:
        """Read exactly ``length`` bytes at ``offset``; a short read means the file shrank."""
        chunks = []
        remaining = length
        while remaining > 0:
            try:
                chunk = os.pread(self._descriptor, remaining, offset + length - remaining)
            except OSError as exc:
                raise _read_error(self.path, exc) from exc
            if not chunk:
                raise FileChangedError(f"log file {self.path} shrank while it was being read")
            chunks.append(chunk)
            remaining -= len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def read_into(self, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` from ``offset``; a short read means the file shrank."""
        filled = 0
        while filled < len(buffer):
            try:
                count = os.preadv(self._descriptor, [buffer[filled:]], offset + filled)
            except OSError as exc:
                raise _read_error(self.path, exc) from exc
            if count == 0:
                raise FileChangedError(f"log file {self.path} shrank while it was being read")
            filled += count

    def close(self) -> None:
        if self._descriptor >= 0:
            os.close(self._descriptor)
            self._descriptor = -1

    def __enter__(self) -> LogFile:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()


@dataclass
class ContentDigests:
    """Result of the digest pass.

    ``sha256`` is the hex SHA-256 of the whole content. ``part_digests[i]`` is the
    checksum kind's digest of part ``i + 1``. ``part_md5`` maps a part number to the
    hex MD5 of that part, for the requested parts, to compare with the ETags of parts
    already on the store.
    """

    sha256: str
    part_digests: list[bytes]
    part_md5: dict[int, str] = field(default_factory=dict)


def part_spans(size: int, part_size: int) -> list[tuple[int, int]]:
    """Return ``(offset, length)`` of each part; an empty file is one empty part."""
    if size == 0:
        return [(0, 0)]
    return [(offset, min(part_size, size - offset)) for offset in range(0, size, part_size)]


def read_digests(
    log_file: LogFile,
    *,
    part_size: int,
    kind: ChecksumKind,
    md5_parts: Collection[int] = (),
    should_stop: Callable[[], bool] | None = None,
    helper: Executor | None = None,
) -> ContentDigests:
    """Read the whole file once and return its SHA-256 and per-part digests.

    Memory stays at one ``READ_CHUNK_BYTES`` buffer. When the file is one part and
    the checksum kind is SHA-256, the part digest is the SHA-256 itself and is not
    computed twice. Otherwise ``helper``, if given, updates the part digests while
    this thread updates the SHA-256, so that the two hashes of each chunk run on two
    cores (hashlib releases the GIL for large updates). ``should_stop`` is polled
    before each part; when it returns True, UploadStoppedError is raised.
    """
    spans = part_spans(log_file.size, part_size)
    whole = hashlib.sha256()
    shared = kind.name == "SHA256" and len(spans) == 1
    buffer = memoryview(bytearray(READ_CHUNK_BYTES))
    result = ContentDigests(sha256="", part_digests=[])

    for number, (offset, length) in enumerate(spans, start=1):
        if should_stop is not None and should_stop():
            raise UploadStoppedError(f"upload of {log_file.path} stopped while reading it")

        part = _PartDigests(kind, shared=shared, md5=number in md5_parts)
        for chunk_offset in range(offset, offset + length, READ_CHUNK_BYTES):
            view = buffer[: min(READ_CHUNK_BYTES, offset + length - chunk_offset)]
            log_file.read_into(chunk_offset, view)
            part.update_with(whole, view, helper)

        result.part_digests.append(whole.digest() if shared else part.digest())
        if part.md5 is not None:
            result.part_md5[number] = part.md5.hexdigest()

    result.sha256 = whole.hexdigest()
    return result


class _PartDigests:
    """The checksum kind's digest and the optional MD5 of one part during ``read_digests``."""

    def __init__(self, kind: ChecksumKind, *, shared: bool, md5: bool) -> None:
        self.checksum = None if shared else kind.new()
        self.md5 = hashlib.md5(usedforsecurity=False) if md5 else None

    def update(self, view: memoryview) -> None:
        if self.checksum is not None:
            self.checksum.update(view)
        if self.md5 is not None:
            self.md5.update(view)

    def update_with(self, whole: Digest, view: memoryview, helper: Executor | None) -> None:
        """Update these digests and ``whole`` with ``view``; both are done when this returns."""
        if helper is None or (self.checksum is None and self.md5 is None):
            whole.update(view)
            self.update(view)
            return

        pending = helper.submit(self.update, view)
        try:
            whole.update(view)
        finally:
            pending.result()

    def digest(self) -> bytes:
        assert self.checksum is not None
        return self.checksum.digest()


CHECKSUM_REJECTED_CODES = frozenset({"BadDigest", "XAmzContentSHA256Mismatch"})
"""S3 error codes for a body that does not match the checksum sent with it."""


class PartReader:
    """A file-like view of one byte range of a log file, for a streamed request body.

    With ``verify`` the reader digests the bytes it returns. botocore may read the
    body more than once: to sign it over plain HTTP, and again after a retry. Every
    read from offset 0 starts a new digest, so ``digest()`` covers the bytes of the
    last complete pass, the ones that reached the store. Without ``verify`` the
    store's checksum verification alone proves what was sent, which saves one hash
    of every byte.
    """

    def __init__(
        self,
        log_file: LogFile,
        offset: int,
        length: int,
        kind: ChecksumKind,
        *,
        verify: bool = True,
    ) -> None:
        self._log_file = log_file
        self._offset = offset
        self._length = length
        self._kind = kind
        self._verify = verify
        self._position = 0
        self._digest = kind.new()
        self._digested = 0
        self.confirmed = False

    def read(self, size: int = -1) -> bytes:
        remaining = self._length - self._position
        count = remaining if size is None or size < 0 else min(size, remaining)
        if count <= 0:
            return b""

        data = self._log_file.read(self._offset + self._position, count)
        if self._verify and self._digested == self._position:
            self._digest.update(data)
            self._digested += count
        self._position += count
        return data

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        bases = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: self._length}
        self._position = max(0, min(self._length, bases[whence] + offset))
        if self._position == 0:
            self._digest = self._kind.new()
            self._digested = 0
        return self._position

    def tell(self) -> int:
        return self._position

    def digest(self) -> bytes | None:
        """Return the digest of the last full sequential read, None if there was none."""
        if not self._verify or self._digested != self._length:
            return None
        return self._digest.digest()

    def send(
        self, request: Callable[[PartReader], Mapping[str, Any]], expected: bytes, what: str
    ) -> Mapping[str, Any]:
        """Call ``request`` with this reader as its body, then prove the bytes sent.

        ``expected`` is the digest from the first read pass, which the request also
        sends for the store to verify. The bytes are proven by this reader's digest,
        or by the response when it confirms ``expected`` (``confirmed`` is then
        True), or else by reading and digesting the range once more. Raises
        FileChangedError when they differ from ``expected``, also when the store
        rejected the request because of that.
        """
        try:
            response = request(self)
        except Exception as exc:
            if self.digest() not in (None, expected):
                raise self._changed(what) from exc
            if _is_checksum_rejection(exc) and self._digest_again() != expected:
                raise self._changed(what) from exc
            raise

        self.confirmed = self._kind.confirms(response, expected)
        digest = self.digest()
        if digest is None and not self.confirmed:
            digest = self._digest_again()
        if digest not in (None, expected):
            raise self._changed(what)
        return response

    def _digest_again(self) -> bytes:
        digest = self._kind.new()
        buffer = memoryview(bytearray(min(READ_CHUNK_BYTES, max(self._length, 1))))
        end = self._offset + self._length
        for chunk_offset in range(self._offset, end, len(buffer)):
            view = buffer[: min(len(buffer), end - chunk_offset)]
            self._log_file.read_into(chunk_offset, view)
            digest.update(view)
        return digest.digest()

    def _changed(self, what: str) -> FileChangedError:
        return FileChangedError(
            f"log file {self._log_file.path} changed during upload: {what} differs "
            "from the first read"
        )


def _is_checksum_rejection(exc: BaseException) -> bool:
    response = getattr(exc, "response", None)
    if not isinstance(response, dict):
        return False
    return response.get("Error", {}).get("Code") in CHECKSUM_REJECTED_CODES
