"""The fault proxy: a listener on 127.0.0.1, its connections and the fault controls."""

from __future__ import annotations

import collections
import itertools
import logging
import select
import socket
import threading
import time
import urllib.parse
from types import TracebackType

from typing_extensions import Self

from .connection import Connection
from .faults import DateFault, ErrorFault, Faults, Matcher, MidBodyFault, StallFault
from .traffic import RequestRecord, Traffic

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
ACCEPT_POLL_SECONDS = 0.05
STOP_TIMEOUT_SECONDS = 5.0


class FaultProxy:
    """An HTTP proxy on 127.0.0.1 that forwards to a loopback S3 server and injects faults.

    Use it as a context manager, or call ``start()`` and ``stop()``. Fault methods may be
    called from any thread at any time. Request faults are used up in the order they were
    added, one request (or connection) at a time, and ``match`` narrows a fault to the
    requests it accepts. Counters cover everything since start or ``reset_counters()``.
    """

    def __init__(self, upstream_url: str, *, port: int = 0) -> None:
        parts = urllib.parse.urlsplit(upstream_url)
        if parts.scheme != "http" or parts.hostname != LOOPBACK or parts.port is None:
            raise ValueError(
                f"upstream URL {upstream_url!r} is invalid: expected http://{LOOPBACK}:PORT"
            )

        self.upstream_address = (LOOPBACK, parts.port)
        self._port = port
        self._faults = Faults()
        self._traffic = Traffic()
        self._connection_numbers = itertools.count(1)
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._cut = False
        self._stopping = threading.Event()
        self._connections: dict[Connection, threading.Thread] = {}
        self._accept_thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The listening port on 127.0.0.1, which is 0 before ``start()`` unless one was given."""
        return self._port

    @property
    def endpoint_url(self) -> str:
        return f"http://{LOOPBACK}:{self._port}"

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Listen on 127.0.0.1 (a free port unless one was given) and start accepting."""
        self._listener = self._listen()
        self._port = self._listener.getsockname()[1]
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"faultproxy-accept-{self._port}", daemon=True
        )
        self._accept_thread.start()
        logger.info(
            "Fault proxy listens on %s and forwards to %s:%d",
            self.endpoint_url,
            *self.upstream_address,
        )

    def stop(self) -> None:
        """Close the listener and every connection, then wait for the threads to end.

        Raises RuntimeError when a thread is still running after STOP_TIMEOUT_SECONDS.
        """
        self._stopping.set()
        self._close_listener()
        with self._lock:
            connections = dict(self._connections)
        for connection in connections:
            connection.kill()

        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        threads = [*connections.values(), self._accept_thread]
        for thread in threads:
            if thread is not None:
                thread.join(max(0.0, deadline - time.monotonic()))

        alive = [t.name for t in threads if t is not None and t.is_alive()]
        if alive:
            raise RuntimeError(
                f"fault proxy threads still run after {STOP_TIMEOUT_SECONDS} s: {alive}"
            )
        logger.info("Fault proxy on %s stopped", self.endpoint_url)

    def cut(self, *, refuse_connections: bool = False) -> None:
        """Close every open connection and reject new ones until ``restore()``.

        By default new connections are accepted and closed at once, which botocore reports
        as a closed connection. With ``refuse_connections`` the listener closes too, so
        connects fail with ECONNREFUSED, which botocore reports as EndpointConnectionError.
        """
        with self._lock:
            self._cut = True
            connections = list(self._connections)
        if refuse_connections:
            self._close_listener()
        for connection in connections:
            connection.kill()
        logger.info("Fault proxy cut %d connections", len(connections))

    def restore(self) -> None:
        """Accept connections again after ``cut()``, listening on the same port."""
        with self._lock:
            self._cut = False
            if self._listener is None and not self._stopping.is_set():
                self._listener = self._listen()
        logger.info("Fault proxy on %s accepts connections again", self.endpoint_url)

    def close_mid_body(
        self, after_bytes: int, *, times: int = 1, match: Matcher | None = None
    ) -> None:
        """Close the next ``times`` connections after forwarding ``after_bytes`` client bytes.

        A connection is chosen when it starts forwarding a request (that ``match`` accepts,
        if given). Its count starts with that request's head and runs on into later
        requests on the same connection. The client gets a reset or closed connection and
        the server receives a truncated request.
        """
        if after_bytes < 0:
            raise ValueError(f"after_bytes must be 0 or more, got {after_bytes}")
        self._faults.add(MidBodyFault(times, match, after_bytes))

    def stall(self, seconds: float, *, times: int = 1, match: Matcher | None = None) -> None:
        """Read the next ``times`` requests, send nothing for ``seconds``, then close.

        Pick ``seconds`` longer than the client's read timeout. A held request never
        reaches the server.
        """
        self._faults.add(StallFault(times, match, seconds))

    def respond_error(
        self,
        status: int = 500,
        code: str = "InternalError",
        *,
        message: str | None = None,
        times: int = 1,
        match: Matcher | None = None,
    ) -> None:
        """Respond to the next ``times`` requests that ``match`` accepts with an S3 XML error.

        The request never reaches the server. Typical pairs: 503 SlowDown, 403
        AccessDenied, 404 NoSuchBucket, 403 InvalidAccessKeyId, 403 SignatureDoesNotMatch,
        403 RequestTimeTooSkewed. HEAD requests get the status without a body, as from S3.
        """
        if not 400 <= status <= 599:
            raise ValueError(f"status must be an HTTP error status (400-599), got {status}")
        text = message or f"{code} injected by the fault proxy."
        self._faults.add(ErrorFault(times, match, status, code, text))

    def wrong_date(self, offset_seconds: float, *, times: int = 1) -> None:
        """Shift the ``Date`` header of the next ``times`` responses by ``offset_seconds``."""
        self._faults.add(DateFault(times, None, offset_seconds))

    def shift_clock(self, offset_seconds: float | None) -> None:
        """Act as a store whose clock runs ``offset_seconds`` ahead of the local clock.

        Every response then carries that clock in its ``Date`` header, and a request whose
        ``X-Amz-Date`` (or ``Date``) differs from it by more than 15 minutes gets 403
        RequestTimeTooSkewed, as from S3, without reaching the server. Unsigned requests
        pass. None turns the simulation off. ``clear_faults()`` leaves it on.
        """
        self._faults.clock_offset_seconds = offset_seconds

    def clear_faults(self) -> None:
        """Drop every pending fault. A connection already chosen for a fault keeps it."""
        self._faults.clear()

    @property
    def records(self) -> list[RequestRecord]:
        """Copies of the requests read so far, in the order they arrived."""
        return self._traffic.snapshot()

    @property
    def requests(self) -> list[tuple[str, str, str]]:
        """``(method, path, query)`` of each request read so far."""
        return [(r.method, r.path, r.query) for r in self._traffic.snapshot()]

    @property
    def method_counts(self) -> collections.Counter[str]:
        return collections.Counter(r.method for r in self._traffic.snapshot())

    @property
    def upload_part_count(self) -> int:
        return sum(1 for r in self._traffic.snapshot() if r.is_upload_part)

    @property
    def upload_part_bytes(self) -> int:
        """Object data bytes that clients sent in UploadPart requests, complete or not."""
        return sum(r.body_bytes for r in self._traffic.snapshot() if r.is_upload_part)

    @property
    def request_body_bytes(self) -> int:
        """Object data bytes that clients sent in all request bodies, complete or not."""
        return sum(r.body_bytes for r in self._traffic.snapshot())

    @property
    def bytes_from_client(self) -> int:
        """Every byte received from clients: request heads, bodies and their framing."""
        return self._traffic.bytes_from_client

    @property
    def bytes_to_client(self) -> int:
        return self._traffic.bytes_to_client

    @property
    def connection_count(self) -> int:
        """Connections accepted, including the ones closed at once while cut."""
        return self._traffic.connections

    @property
    def rejected_connection_count(self) -> int:
        return self._traffic.rejected_connections

    def reset_counters(self) -> None:
        """Forget the request records and set every counter back to zero."""
        self._traffic.reset()

    def _listen(self) -> socket.socket:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((LOOPBACK, self._port))
        except OSError:
            listener.close()
            raise
        listener.listen(128)
        return listener

    def _close_listener(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
        if listener is None:
            return

        # Shutting down stops listening at once. A bare close would leave the socket
        # listening until the accept thread's select() call returns.
        try:
            listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        listener.close()

    def _accept_loop(self) -> None:
        while not self._stopping.is_set():
            listener = self._listener
            if listener is None:
                self._stopping.wait(ACCEPT_POLL_SECONDS)
                continue

            try:
                if not select.select([listener], [], [], ACCEPT_POLL_SECONDS)[0]:
                    continue
                client, _ = listener.accept()
            except (OSError, ValueError):
                continue
            self._admit(client)

    def _admit(self, client: socket.socket) -> None:
        """Start a thread for a new connection, or close it at once while cut or stopping."""
        with self._lock:
            rejected = self._cut or self._stopping.is_set()
            self._traffic.count_connection(rejected=rejected)
            if rejected:
                client.close()
                return

            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            name = f"faultproxy-connection-{next(self._connection_numbers)}"
            connection = Connection(
                client,
                name,
                upstream_address=self.upstream_address,
                faults=self._faults,
                traffic=self._traffic,
            )
            thread = threading.Thread(
                target=self._serve, args=(connection,), name=name, daemon=True
            )
            self._connections[connection] = thread
        thread.start()

    def _serve(self, connection: Connection) -> None:
        try:
            connection.serve()
        finally:
            with self._lock:
                self._connections.pop(connection, None)
