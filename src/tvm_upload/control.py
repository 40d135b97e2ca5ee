"""Local control channel of a running daemon: a Unix socket beside the state store.

The socket file is created with mode 0600, so only the daemon's user (and
root) can connect; no network port is opened. Each connection sends one JSON
line and reads one JSON line back:

- ``{"command": "upload-now"}`` starts draining the whole queue now and returns
  ``{"ok": true, "run": N}`` with the number of that drain request;
- ``{"command": "progress"}`` returns ``{"ok": true, "draining": bool,
  "in_flight": int, "run": N, "finished_run": M}``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

SOCKET_NAME = "control.sock"
REQUEST_LIMIT_BYTES = 4096
CLIENT_TIMEOUT_SECONDS = 5.0

Handler = Callable[[dict[str, Any]], dict[str, Any]]


def socket_path(state_file: Path) -> Path:
    """Return the control socket's path for a daemon using ``state_file``."""
    return state_file.parent / SOCKET_NAME


class _RequestHandler(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        line = self.rfile.readline(REQUEST_LIMIT_BYTES)
        try:
            request = json.loads(line)
            if not isinstance(request, dict):
                raise TypeError("a request must be a JSON object")
            response = self.server.dispatch(request)
        except (ValueError, TypeError, KeyError) as error:
            response = {"ok": False, "error": str(error)}
        except Exception:
            logger.exception("Control request %r failed", line[:200])
            response = {"ok": False, "error": "the daemon failed to handle the request"}
        self.wfile.write(json.dumps(response).encode() + b"\n")


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def __init__(self, path: str, dispatch: Handler) -> None:
        self.dispatch = dispatch
        super().__init__(path, _RequestHandler)


class ControlServer:
    """Serves control requests on a Unix socket in a background thread."""

    def __init__(self, path: Path, dispatch: Handler) -> None:
        self.path = path
        self._dispatch = dispatch
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Bind the socket (replacing a stale one) with mode 0600 and start serving."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() or self.path.is_symlink():
            self.path.unlink()

        old_umask = os.umask(0o177)
        try:
            self._server = _Server(str(self.path), self._dispatch)
        finally:
            os.umask(old_umask)
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="control"
        )
        self._thread.start()
        logger.debug("Control socket listening at %s", self.path)

    def stop(self) -> None:
        """Stop serving and remove the socket file."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        self._server = None


def send_request(path: Path, request: dict[str, Any]) -> dict[str, Any]:
    """Send one request to a running daemon and return its response.

    Raises ConnectionError (with advice) when no daemon listens at ``path``.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(CLIENT_TIMEOUT_SECONDS)
            client.connect(str(path))
            client.sendall(json.dumps(request).encode() + b"\n")
            reply = client.makefile("rb").readline(REQUEST_LIMIT_BYTES)
    except (FileNotFoundError, ConnectionRefusedError) as error:
        raise ConnectionError(
            f"no tvm-upload daemon is listening at {path}: is the service running"
            f" with this configuration? ({error.strerror})"
        ) from error
    except PermissionError as error:
        raise ConnectionError(
            f"permission denied on {path}: run this command as the daemon's user or root"
        ) from error
    except TimeoutError as error:
        raise ConnectionError(
            f"the daemon at {path} did not reply within {CLIENT_TIMEOUT_SECONDS:.0f} s"
        ) from error

    try:
        response = json.loads(reply)
    except ValueError:
        response = None
    if not isinstance(response, dict):
        raise ConnectionError(f"invalid reply from the daemon at {path}: {reply!r}")
    return response
