"""HTTP/1.1 message framing for the fault proxy: heads, bodies and chunked coding.

The proxy parses only what it needs to find where each message ends and to count the
object data in request bodies. It never changes a body.
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass

logger = logging.getLogger(__name__)

READ_SIZE = 64 * 1024
MAX_LINE_BYTES = 64 * 1024
MAX_HEADER_FIELDS = 200


class ProtocolError(Exception):
    """A peer sent bytes that are not valid HTTP/1.1."""


class Disconnected(Exception):
    """A peer closed its connection in the middle of a message."""


class ChunkedDecoder:
    """Incremental parser of the chunked coding, which aws-chunked bodies share.

    ``feed`` takes any slice of the stream and returns how many of its bytes belong to
    the chunked body. ``done`` turns True after the last chunk and its trailer section.
    Chunk extensions (where aws-chunked puts chunk signatures) and trailers are skipped.
    """

    def __init__(self, on_data: Callable[[bytes], None]) -> None:
        self.done = False
        self._on_data = on_data
        self._state = "size"
        self._line = bytearray()
        self._remaining = 0

    def feed(self, data: bytes) -> int:
        position = 0
        while position < len(data) and not self.done:
            if self._state == "data":
                position = self._take_data(data, position)
            else:
                position = self._take_line(data, position)
        return position

    def _take_data(self, data: bytes, position: int) -> int:
        end = min(len(data), position + self._remaining)
        self._on_data(data[position:end])
        self._remaining -= end - position
        if self._remaining == 0:
            self._state = "data-end"
        return end

    def _take_line(self, data: bytes, position: int) -> int:
        newline = data.find(b"\n", position)
        end = len(data) if newline < 0 else newline + 1
        self._line += data[position:end]
        if len(self._line) > MAX_LINE_BYTES:
            raise ProtocolError(f"chunked body line is longer than {MAX_LINE_BYTES} bytes")

        if newline >= 0:
            line = bytes(self._line).rstrip(b"\r\n")
            self._line.clear()
            self._end_line(line)
        return end

    def _end_line(self, line: bytes) -> None:
        if self._state == "size":
            self._start_chunk(line)
        elif self._state == "data-end":
            if line:
                raise ProtocolError(f"chunk data is followed by {line[:40]!r}, not CRLF")
            self._state = "size"
        elif not line:
            self.done = True

    def _start_chunk(self, line: bytes) -> None:
        size_text = line.split(b";", 1)[0].strip()
        if not re.fullmatch(rb"[0-9A-Fa-f]{1,16}", size_text):
            raise ProtocolError(f"invalid chunk size line {line[:40]!r}")

        self._remaining = int(size_text, 16)
        self._state = "data" if self._remaining else "trailer"


class PayloadCounter:
    """Counter of object data in request body content, looking through aws-chunked framing."""

    def __init__(self, content_encoding: str, on_payload: Callable[[int], None]) -> None:
        self._on_payload = on_payload
        self._decoder: ChunkedDecoder | None = None
        if "aws-chunked" in content_encoding.lower():
            self._decoder = ChunkedDecoder(lambda data: on_payload(len(data)))

    def __call__(self, content: bytes) -> None:
        if self._decoder is None:
            self._on_payload(len(content))
            return

        try:
            if not self._decoder.done:
                self._decoder.feed(content)
        except ProtocolError as error:
            logger.warning("Stopped counting an aws-chunked body: %s", error)
            self._decoder = None


class MessageReader:
    """Buffered reader of one socket that reports the size of every receive."""

    def __init__(self, sock: socket.socket, on_receive: Callable[[int], None]) -> None:
        self._sock = sock
        self._on_receive = on_receive
        self._buffer = bytearray()

    def _fill(self) -> bool:
        data = self._sock.recv(READ_SIZE)
        self._on_receive(len(data))
        self._buffer += data
        return bool(data)

    def read_line(self) -> bytes:
        """Return the next line with its line end, or b"" at the end of the stream."""
        while (newline := self._buffer.find(b"\n")) < 0:
            if len(self._buffer) > MAX_LINE_BYTES:
                raise ProtocolError(f"header line is longer than {MAX_LINE_BYTES} bytes")
            if not self._fill():
                if self._buffer:
                    raise Disconnected("peer closed the connection inside a line")
                return b""

        line = bytes(self._buffer[: newline + 1])
        del self._buffer[: newline + 1]
        return line

    def read_some(self, limit: int) -> bytes:
        """Return 1 to ``limit`` bytes, or raise ``Disconnected`` at the end of the stream."""
        if not self._buffer and not self._fill():
            raise Disconnected("peer closed the connection inside a message body")

        data = bytes(self._buffer[:limit])
        del self._buffer[:limit]
        return data

    def unread(self, data: bytes) -> None:
        self._buffer[:0] = data


@dataclass
class MessageHead:
    """The start line and header fields of one HTTP/1.1 message, in their original order."""

    start_line: str
    fields: list[tuple[str, str]]

    def get(self, name: str) -> str | None:
        values = [value for key, value in self.fields if key.lower() == name]
        return ", ".join(values) if values else None

    def without(self, name: str) -> MessageHead:
        return MessageHead(self.start_line, [(k, v) for k, v in self.fields if k.lower() != name])

    def replaced(self, name: str, value: str) -> MessageHead:
        return MessageHead(self.start_line, [*self.without(name.lower()).fields, (name, value)])

    def as_dict(self) -> dict[str, str]:
        return {key.lower(): self.get(key.lower()) or "" for key, _ in self.fields}

    def encode(self) -> bytes:
        lines = [self.start_line, *(f"{key}: {value}" for key, value in self.fields)]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def keeps_alive(self) -> bool:
        """Whether the connection stays open after this message (HTTP/1.1 rules)."""
        tokens = {t.strip().lower() for t in (self.get("connection") or "").split(",")}
        if "close" in tokens:
            return False

        parts = self.start_line.split(" ")
        version = parts[0] if self.start_line.startswith("HTTP/") else parts[-1]
        return "keep-alive" in tokens or version == "HTTP/1.1"

    def is_chunked(self) -> bool:
        codings = (self.get("transfer-encoding") or "").lower().split(",")
        return codings[-1].strip() == "chunked"

    def content_length(self) -> int | None:
        value = self.get("content-length")
        if value is None:
            return None
        if not value.isdigit():
            raise ProtocolError(f"invalid Content-Length {value!r}")
        return int(value)


def read_head(reader: MessageReader) -> MessageHead | None:
    """Read one message head, or return None when the stream ends before its first byte."""
    line = reader.read_line()
    while line in (b"\r\n", b"\n"):
        line = reader.read_line()
    if not line:
        return None

    fields: list[tuple[str, str]] = []
    while (field_line := reader.read_line()) not in (b"\r\n", b"\n"):
        if not field_line:
            raise Disconnected("peer closed the connection inside a message head")
        name, colon, value = field_line.decode("latin-1").partition(":")
        if not colon or not name or name != name.strip() or len(fields) >= MAX_HEADER_FIELDS:
            raise ProtocolError(f"invalid header field {field_line[:40]!r}")
        fields.append((name, value.strip()))

    return MessageHead(line.decode("latin-1").rstrip("\r\n"), fields)


def relay_fixed(
    reader: MessageReader,
    length: int,
    sink: Callable[[bytes], None],
    on_content: Callable[[bytes], None],
) -> None:
    remaining = length
    while remaining > 0:
        data = reader.read_some(min(remaining, READ_SIZE))
        on_content(data)
        sink(data)
        remaining -= len(data)


def relay_chunked(
    reader: MessageReader, sink: Callable[[bytes], None], on_content: Callable[[bytes], None]
) -> None:
    decoder = ChunkedDecoder(on_content)
    while not decoder.done:
        data = reader.read_some(READ_SIZE)
        used = decoder.feed(data)
        reader.unread(data[used:])
        sink(data[:used])


def relay_to_end(reader: MessageReader, sink: Callable[[bytes], None]) -> None:
    try:
        while True:
            sink(reader.read_some(READ_SIZE))
    except Disconnected:
        return


def discard(data: bytes) -> None:
    del data


def response_status(head: MessageHead) -> int:
    parts = head.start_line.split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ProtocolError(f"invalid status line {head.start_line[:80]!r}")
    return int(parts[1])


def discard_count(count: int) -> None:
    del count
