"""Service manager notifications (the ``sd_notify`` protocol) without libsystemd.

systemd passes ``NOTIFY_SOCKET`` to a ``Type=notify`` service: a filesystem
path or, when it starts with ``@``, a name in the abstract namespace. Each
notification is one datagram of newline-separated ``KEY=value`` lines sent
to that AF_UNIX socket. ``WATCHDOG_USEC`` (and optionally ``WATCHDOG_PID``)
ask the process to send ``WATCHDOG=1`` more often than that interval.

Outside systemd every method is a no-op. Sending never raises: the daemon
must keep working when the service manager is gone or slow, so failures are
only logged at DEBUG.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping

logger = logging.getLogger(__name__)

# A blocked receiver must never stall the main loop for long.
SEND_TIMEOUT_SECONDS = 2.0


class Notifier:
    """Sends readiness, status, watchdog, reload and stop notifications to systemd.

    ``socket_address`` is the value of ``NOTIFY_SOCKET`` (None disables every
    notification). ``watchdog_timeout_seconds`` is the service's watchdog
    timeout (None disables ``watchdog()``). ``clock`` is monotonic seconds
    for rate-limiting watchdog pings; ``monotonic_ns`` must read
    CLOCK_MONOTONIC, because systemd compares ``MONOTONIC_USEC`` with its own
    clock. Methods are thread-safe.
    """

    def __init__(
        self,
        *,
        socket_address: str | None,
        watchdog_timeout_seconds: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        monotonic_ns: Callable[[], int] = time.monotonic_ns,
    ) -> None:
        self._address = _socket_address(socket_address)
        self._watchdog_timeout_seconds = watchdog_timeout_seconds
        self._clock = clock
        self._monotonic_ns = monotonic_ns
        self._lock = threading.Lock()
        self._last_watchdog_at: float | None = None

    @classmethod
    def from_environment(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        pid: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> Notifier:
        """Build a notifier from ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID``.

        ``environ`` defaults to ``os.environ`` and ``pid`` to ``os.getpid()``.
        The watchdog stays disabled when ``WATCHDOG_USEC`` is missing, not a
        positive integer, or when ``WATCHDOG_PID`` names another process.
        """
        environ = os.environ if environ is None else environ
        pid = os.getpid() if pid is None else pid
        return cls(
            socket_address=environ.get("NOTIFY_SOCKET") or None,
            watchdog_timeout_seconds=_watchdog_timeout_seconds(environ, pid),
            clock=clock,
        )

    @property
    def enabled(self) -> bool:
        """Whether notifications are sent at all (a usable ``NOTIFY_SOCKET`` is set)."""
        return self._address is not None

    @property
    def watchdog_interval_seconds(self) -> float | None:
        """Seconds between watchdog pings: half the watchdog timeout, or None when disabled.

        ``watchdog()`` sends at most once per interval, so the main loop should
        call it at least this often (for example, by waiting no longer).
        """
        if self._address is None or self._watchdog_timeout_seconds is None:
            return None
        return self._watchdog_timeout_seconds / 2

    def ready(self) -> None:
        """Tell systemd that start-up, or a reload announced by ``reloading()``, is done."""
        self._send("READY=1")

    def status(self, text: str) -> None:
        """Set the one-line status shown by ``systemctl status``.

        Line breaks in ``text`` become spaces, because a newline would end the field.
        """
        one_line = " ".join(text.splitlines())
        self._send(f"STATUS={one_line}")

    def watchdog(self) -> None:
        """Ping the watchdog, unless it is disabled or the last ping is under an interval old."""
        interval_seconds = self.watchdog_interval_seconds
        if interval_seconds is None:
            return

        with self._lock:
            now = self._clock()
            last = self._last_watchdog_at
            if last is not None and now - last < interval_seconds:
                return
            self._last_watchdog_at = now

        self._send("WATCHDOG=1")

    def reloading(self) -> None:
        """Tell systemd that a configuration reload started; call ``ready()`` when it ends.

        systemd 253 and later expect ``MONOTONIC_USEC`` in the same message to
        match it to the reload (sd_notify(3)); older versions ignore the field.
        """
        monotonic_usec = self._monotonic_ns() // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec}")

    def stopping(self) -> None:
        """Tell systemd that a graceful stop started."""
        self._send("STOPPING=1")

    def _send(self, message: str) -> None:
        if self._address is None:
            return

        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.settimeout(SEND_TIMEOUT_SECONDS)
                sock.sendto(message.encode("utf-8", errors="replace"), self._address)
        except OSError as error:
            first_line = message.partition("\n")[0]
            logger.debug("Sending %s to the service manager failed: %s", first_line, error)


def _socket_address(value: str | None) -> str | None:
    """Turn a ``NOTIFY_SOCKET`` value into a socket address, or None if unusable."""
    if not value:
        return None

    if value.startswith("@"):
        return "\0" + value[1:]

    if value.startswith("/"):
        return value

    # Newer systemd versions may also pass a vsock: address, which AF_UNIX cannot reach.
    logger.debug("NOTIFY_SOCKET %r is not a path or abstract name; notifications are off", value)
    return None


def _watchdog_timeout_seconds(environ: Mapping[str, str], pid: int) -> float | None:
    """Read the watchdog timeout meant for process ``pid`` from the environment."""
    watchdog_pid = environ.get("WATCHDOG_PID")
    if watchdog_pid and watchdog_pid != str(pid):
        return None

    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None

    if usec <= 0:
        return None
    return usec / 1_000_000
