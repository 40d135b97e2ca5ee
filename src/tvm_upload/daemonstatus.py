"""A small JSON file beside the state store with the figures only the running daemon has.

``tvm-upload status`` runs in another process and reads the queue from the
state store, but the next scheduled run and the operational window live in
the daemon's memory. The daemon rewrites this file atomically every few
seconds; a reader treats a missing or unreadable file as "no daemon data".
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

FILE_NAME = "daemon-status.json"


def daemon_status_path(state_file: Path) -> Path:
    return state_file.parent / FILE_NAME


def write_daemon_status(state_file: Path, data: dict[str, Any]) -> None:
    """Replace the status file with ``data`` plus the daemon's PID; never raises."""
    path = daemon_status_path(state_file)
    temporary = path.with_name(path.name + ".tmp")
    try:
        temporary.write_text(json.dumps({**data, "pid": os.getpid()}, default=str))
        os.replace(temporary, path)
    except OSError as error:
        logger.debug("Cannot write %s: %s", path, error)


def read_daemon_status(state_file: Path) -> dict[str, Any] | None:
    """Return the last status the daemon wrote, or None."""
    try:
        data = json.loads(daemon_status_path(state_file).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def process_exists(pid: object) -> bool:
    """Tell whether a process with this PID exists; False for anything but a positive int.

    ``kill`` with a PID of 0 or below signals a process group, not one process.
    A process of another user exists although it may not be signalled.
    """
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True
