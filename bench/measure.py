"""Run child processes and measure them: wall time, CPU time, peak RSS, /proc counters.

CPU time and peak RSS come from ``os.wait4``, whose rusage covers the child
and every descendant it waited for (see ``spawn`` for how the child is
started so that its peak RSS is its own). Processes still running (the daemon,
the S3 server) are sampled from ``/proc/<pid>``.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")
STOP_TIMEOUT_SECONDS = 30.0
LAUNCH_TIMEOUT_SECONDS = 10.0


@dataclass
class ChildResult:
    """Measurements of one finished child process; ``timed_out`` if killed at the deadline."""

    exit_code: int
    wall_seconds: float
    user_seconds: float
    system_seconds: float
    max_rss_bytes: int
    timed_out: bool
    log_path: Path

    @property
    def cpu_seconds(self) -> float:
        return self.user_seconds + self.system_seconds

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])


PR_SET_CHILD_SUBREAPER = 36

# The launcher shell starts the command in the background, prints its PID
# and exits. The command is then reparented to this process (a subreaper),
# which reaps it with wait4.
LAUNCH_SCRIPT = 'log=$1; shift; "$@" </dev/null >>"$log" 2>&1 & echo $!'


@dataclass
class Child:
    """A running child: its PID, its process group (for kills) and when it started."""

    pid: int
    group_id: int
    started: float
    log_path: Path


def become_subreaper() -> None:
    """Make orphaned descendants of this process its children, so that it can wait4 them."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER) failed")


def spawn(argv: list[str], env: dict[str, str], log_path: Path) -> Child:
    """Start ``argv`` in a new session with stdout and stderr appended to ``log_path``.

    The command is forked by a small ``/bin/sh``, not by this process.
    Linux carries the parent's peak RSS into ``ru_maxrss`` of a child forked
    from it. A command forked from this Python process would report at
    least this process's own RSS. Forked from ``sh``, it reports its own,
    with about 1 MiB as the floor.
    """
    become_subreaper()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    launcher = subprocess.Popen(
        ["/bin/sh", "-c", LAUNCH_SCRIPT, "sh", str(log_path), *argv],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    output, _ = launcher.communicate(timeout=LAUNCH_TIMEOUT_SECONDS)
    return Child(int(output), launcher.pid, started, log_path)


def reap(child: Child, timeout_seconds: float) -> ChildResult:
    """Wait for ``child`` with ``os.wait4`` and return its measurements.

    After ``timeout_seconds`` the child's process group is killed and the
    result is marked as timed out.
    """
    timed_out = threading.Event()

    def kill_on_deadline() -> None:
        timed_out.set()
        kill_group(child.group_id)

    timer = threading.Timer(timeout_seconds, kill_on_deadline)
    timer.start()
    try:
        _, status, usage = os.wait4(child.pid, 0)
    finally:
        timer.cancel()

    return ChildResult(
        exit_code=os.waitstatus_to_exitcode(status),
        wall_seconds=time.monotonic() - child.started,
        user_seconds=usage.ru_utime,
        system_seconds=usage.ru_stime,
        max_rss_bytes=usage.ru_maxrss * 1024,
        timed_out=timed_out.is_set(),
        log_path=child.log_path,
    )


def run_child(
    argv: list[str], env: dict[str, str], log_path: Path, timeout_seconds: float
) -> ChildResult:
    """Run ``argv`` to completion (or the deadline) and return its measurements."""
    return reap(spawn(argv, env, log_path), timeout_seconds)


def kill_group(group_id: int) -> None:
    """SIGKILL a process group that this program started."""
    try:
        os.killpg(group_id, signal.SIGKILL)
    except ProcessLookupError:
        pass


def stop_child(child: Child) -> ChildResult:
    """Send SIGTERM to a running child and reap it; SIGKILL its group if it does not exit in time."""
    try:
        os.kill(child.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    return reap(child, STOP_TIMEOUT_SECONDS)


def is_running(pid: int) -> bool:
    """Tell whether the child ``pid`` is still running (a zombie counts as exited)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def process_cpu_seconds(pid: int) -> float:
    """Return user plus system CPU seconds of a running process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    user_ticks, system_ticks = int(fields[11]), int(fields[12])
    return (user_ticks + system_ticks) / CLOCK_TICKS_PER_SECOND


def process_status_bytes(pid: int, field: str) -> int:
    """Return a ``/proc/<pid>/status`` memory field such as ``VmRSS`` or ``VmHWM`` in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(f"{field} not in /proc/{pid}/status")


def process_io(pid: int) -> dict[str, int]:
    """Return the counters of ``/proc/<pid>/io`` (``rchar``, ``read_bytes``, ...)."""
    counters = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        name, value = line.split(":")
        counters[name.strip()] = int(value)
    return counters


class CpuMeter:
    """CPU seconds a running process (such as the S3 server) used between start() and stop()."""

    def __init__(self, pid: int | None) -> None:
        self.pid = pid
        self._start = 0.0

    def start(self) -> None:
        self._start = self._read()

    def stop(self) -> float:
        return self._read() - self._start

    def _read(self) -> float:
        if self.pid is None:
            return 0.0
        try:
            return process_cpu_seconds(self.pid)
        except FileNotFoundError:
            return 0.0
