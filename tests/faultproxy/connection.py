"""One client connection of the fault proxy, served by its own thread."""

from __future__ import annotations

import datetime
import email.utils
import http
import itertools
import logging
import select
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable
from xml.sax.saxutils import escape

from .faults import (
    SIGNING_TIME_LIMIT_SECONDS,
    DateFault,
    ErrorFault,
    Faults,
    MidBodyFault,
    StallFault,
)
from .framing import (
    Disconnected,
    MessageHead,
    MessageReader,
    PayloadCounter,
    ProtocolError,
    discard,
    discard_count,
    read_head,
    relay_chunked,
    relay_fixed,
    relay_to_end,
    response_status,
)
from .traffic import RequestRecord, Traffic

logger = logging.getLogger(__name__)

UPSTREAM_TIMEOUT_SECONDS = 30.0
CONTINUE_RESPONSE = b"HTTP/1.1 100 Continue\r\n\r\n"
SIGV4_TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"

_request_numbers = itertools.count(1)


class _Killed(Exception):
    """The proxy closed the connection on purpose (a fault, ``cut()`` or ``stop()``)."""


def _parse_request(head: MessageHead) -> RequestRecord:
    parts = head.start_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise ProtocolError(f"invalid request line {head.start_line[:80]!r}")

    method, target, _ = parts
    raw_path, _, query = target.partition("?")
    path = urllib.parse.unquote(raw_path)
    return RequestRecord(method=method, path=path, query=query, headers=head.as_dict())


def _shift_date(value: str | None, offset_seconds: float) -> str:
    """Return an HTTP date ``offset_seconds`` after ``value`` (or after now when missing)."""
    try:
        base = email.utils.parsedate_to_datetime(value).timestamp() if value else time.time()
    except (TypeError, ValueError):
        base = time.time()
    return email.utils.formatdate(base + offset_seconds, usegmt=True)


def _signing_time(request: RequestRecord) -> float | None:
    """Return the time a request was signed at, from ``X-Amz-Date`` or ``Date``, or None."""
    amz_date = request.headers.get("x-amz-date")
    try:
        if amz_date:
            signed = datetime.datetime.strptime(amz_date, SIGV4_TIMESTAMP_FORMAT)
            return signed.replace(tzinfo=datetime.timezone.utc).timestamp()
        date = request.headers.get("date")
        return email.utils.parsedate_to_datetime(date).timestamp() if date else None
    except (TypeError, ValueError):
        return None


def _too_skewed(request: RequestRecord, clock_offset_seconds: float | None) -> ErrorFault | None:
    """Return a RequestTimeTooSkewed fault when the request was signed too far off the store."""
    signed = _signing_time(request)
    if clock_offset_seconds is None or signed is None or "authorization" not in request.headers:
        return None
    if abs(signed - (time.time() + clock_offset_seconds)) <= SIGNING_TIME_LIMIT_SECONDS:
        return None
    message = "The difference between the request time and the current time is too large."
    return ErrorFault(1, None, 403, "RequestTimeTooSkewed", message)


def _error_response(
    fault: ErrorFault, request: RequestRecord, request_id: str, keep_alive: bool
) -> tuple[MessageHead, bytes]:
    """Build an S3-style XML error response that botocore parses into a ClientError."""
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{escape(fault.code)}</Code><Message>{escape(fault.message)}</Message>"
        f"<Resource>{escape(request.path)}</Resource><RequestId>{request_id}</RequestId></Error>"
    ).encode()
    try:
        reason = http.HTTPStatus(fault.status).phrase
    except ValueError:
        reason = "Error"

    fields = [
        ("Content-Type", "application/xml"),
        ("Content-Length", str(len(body))),
        ("Date", email.utils.formatdate(usegmt=True)),
        ("x-amz-request-id", request_id),
        ("Server", "faultproxy"),
    ]
    if not keep_alive:
        fields.append(("Connection", "close"))
    return MessageHead(f"HTTP/1.1 {fault.status} {reason}", fields), body


class Connection:
    """One client connection and its upstream connection, served by one thread.

    Only ``kill`` may be called from other threads. Every other method runs in the serving
    thread.
    """

    def __init__(
        self,
        client: socket.socket,
        name: str,
        *,
        upstream_address: tuple[str, int],
        faults: Faults,
        traffic: Traffic,
    ) -> None:
        self.name = name
        self.killed = threading.Event()
        self._upstream_address = upstream_address
        self._faults = faults
        self._traffic = traffic
        self._client = client
        self._client_reader = MessageReader(client, self._traffic.count_from_client)
        self._upstream: socket.socket | None = None
        self._upstream_reader: MessageReader | None = None
        self._cut_budget: int | None = None
        self._current: RequestRecord | None = None
        self._lock = threading.Lock()

    def kill(self) -> None:
        """Shut both sockets down so the serving thread wakes up and closes them."""
        with self._lock:
            self.killed.set()
            for sock in (self._client, self._upstream):
                if sock is not None:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

    def serve(self) -> None:
        try:
            while not self.killed.is_set() and self._serve_request():
                pass
        except ProtocolError as error:
            logger.warning("Closing %s after invalid HTTP: %s", self.name, error)
        except (Disconnected, _Killed, OSError) as error:
            logger.debug("Closing %s: %s", self.name, error)
        finally:
            self._close()

    def _close(self) -> None:
        with self._lock:
            self.killed.set()
            self._client.close()
            self._close_upstream()

    def _close_upstream(self) -> None:
        if self._upstream is not None:
            self._upstream.close()
        self._upstream = None
        self._upstream_reader = None

    def _serve_request(self) -> bool:
        """Serve one request and return whether the connection stays open for another."""
        head = read_head(self._client_reader)
        if head is None:
            return False

        request = _parse_request(head)
        self._current = request
        self._traffic.add_request(request)

        error = self._faults.take(ErrorFault, request)
        if error is not None:
            return self._answer_error(head, request, error)
        skewed = _too_skewed(request, self._faults.clock_offset_seconds)
        if skewed is not None:
            return self._answer_error(head, request, skewed, fault_name="shift_clock")
        stall = self._faults.take(StallFault, request)
        if stall is not None:
            return self._hold(head, request, stall)
        return self._forward(head, request)

    def _send_continue(self, head: MessageHead) -> None:
        if (head.get("expect") or "").lower() == "100-continue":
            self._send_client(CONTINUE_RESPONSE)

    def _send_client(self, data: bytes) -> None:
        self._client.sendall(data)
        self._traffic.count_to_client(len(data))

    def _send_upstream(self, data: bytes) -> None:
        """Forward client bytes, closing the connection once a mid-body budget runs out."""
        assert self._upstream is not None
        if self._cut_budget is None or len(data) < self._cut_budget:
            self._upstream.sendall(data)
            if self._cut_budget is not None:
                self._cut_budget -= len(data)
            return

        self._upstream.sendall(data[: self._cut_budget])
        if self._current is not None:
            self._traffic.mark(self._current, fault="close_mid_body")
        logger.info("Fault proxy closes %s in the middle of a request body", self.name)
        self.kill()
        raise _Killed("closed in the middle of a request body")

    def _relay_request_body(
        self, head: MessageHead, request: RequestRecord, sink: Callable[[bytes], None]
    ) -> None:
        counter = PayloadCounter(
            head.get("content-encoding") or "",
            lambda count: self._traffic.add_body_bytes(request, count),
        )
        if head.is_chunked():
            relay_chunked(self._client_reader, sink, counter)
        elif head.get("transfer-encoding") is not None:
            raise ProtocolError(f"unsupported Transfer-Encoding {head.get('transfer-encoding')}")
        else:
            relay_fixed(self._client_reader, head.content_length() or 0, sink, counter)

    def _answer_error(
        self,
        head: MessageHead,
        request: RequestRecord,
        fault: ErrorFault,
        fault_name: str | None = "respond_error",
    ) -> bool:
        """Send an S3 error response and skip the body, unless the client still withholds it."""
        expects_continue = (head.get("expect") or "").lower() == "100-continue"
        if not expects_continue:
            self._relay_request_body(head, request, discard)

        keep_alive = head.keeps_alive() and not expects_continue
        request_id = f"FAULTPROXY{next(_request_numbers):06d}"
        response, body = _error_response(fault, request, request_id, keep_alive)
        logger.info(
            "Fault proxy responds to %s %s with %d %s",
            request.method,
            request.path,
            fault.status,
            fault.code,
        )
        self._traffic.mark(request, status=fault.status, fault=fault_name)
        self._send_response_head(response, request)
        if request.method != "HEAD":
            self._send_client(body)
        return keep_alive

    def _hold(self, head: MessageHead, request: RequestRecord, fault: StallFault) -> bool:
        """Read the whole request, then send nothing for ``fault.seconds`` and close."""
        self._send_continue(head)
        self._relay_request_body(head, request, discard)
        self._traffic.mark(request, fault="stall")
        logger.info(
            "Fault proxy holds %s %s for %.1f s", request.method, request.path, fault.seconds
        )
        self.killed.wait(fault.seconds)
        return False

    def _forward(self, head: MessageHead, request: RequestRecord) -> bool:
        if not self._ensure_upstream():
            fault = ErrorFault(1, None, 502, "BadGateway", "The upstream S3 server is unreachable.")
            self._answer_error(head, request, fault, fault_name=None)
            return False

        if self._cut_budget is None:
            mid_body = self._faults.take(MidBodyFault, request)
            self._cut_budget = None if mid_body is None else mid_body.after_bytes

        # NOTE: the whole body is sent before the response is read. If the server responds
        # early and closes, the client gets a closed connection instead of that response.
        self._send_continue(head)
        self._send_upstream(head.without("expect").encode())
        self._relay_request_body(head, request, self._send_upstream)
        return self._relay_response(head, request)

    def _ensure_upstream(self) -> bool:
        """Reuse the upstream connection unless the server closed it while it was idle."""
        if self._upstream is not None and select.select([self._upstream], [], [], 0)[0]:
            with self._lock:
                self._close_upstream()
        if self._upstream is not None:
            return True

        try:
            upstream = socket.create_connection(
                self._upstream_address, timeout=UPSTREAM_TIMEOUT_SECONDS
            )
        except OSError as error:
            logger.warning("Fault proxy cannot reach the upstream server: %s", error)
            return False

        upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._upstream = upstream
            self._upstream_reader = MessageReader(upstream, discard_count)
            if self.killed.is_set():
                upstream.shutdown(socket.SHUT_RDWR)
        return True

    def _relay_response(self, request_head: MessageHead, request: RequestRecord) -> bool:
        assert self._upstream_reader is not None
        head = read_head(self._upstream_reader)
        while head is not None and 100 <= response_status(head) < 200:
            head = read_head(self._upstream_reader)
        if head is None:
            raise Disconnected("upstream server closed the connection before responding")

        status = response_status(head)
        self._traffic.mark(request, status=status)
        self._send_response_head(head, request)

        keep_alive = request_head.keeps_alive() and head.keeps_alive()
        reader = self._upstream_reader
        length = head.content_length()
        if request.method == "HEAD" or status in (204, 304):
            return keep_alive
        if head.is_chunked():
            relay_chunked(reader, self._send_client, discard)
        elif length is not None:
            relay_fixed(reader, length, self._send_client, discard)
        else:
            relay_to_end(reader, self._send_client)
            return False
        return keep_alive

    def _send_response_head(self, head: MessageHead, request: RequestRecord) -> None:
        clock_offset = self._faults.clock_offset_seconds
        if clock_offset is not None:
            head = head.replaced("Date", _shift_date(None, clock_offset))
        fault = self._faults.take(DateFault, request)
        if fault is not None:
            head = head.replaced("Date", _shift_date(head.get("date"), fault.offset_seconds))
            self._traffic.mark(request, fault="wrong_date")
            logger.info("Fault proxy shifts the Date header by %.0f s", fault.offset_seconds)
        self._send_client(head.encode())
