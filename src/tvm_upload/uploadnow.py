"""``tvm-upload upload-now``: ask the running daemon to drain its queue, and optionally wait.

The request goes over the daemon's owner-only control socket. With
``--wait`` a progress bar shows files and bytes left in the queue, read from
the state store, until the daemon reports that the drain finished.
"""

from __future__ import annotations

import sys
import time

from rich.progress import BarColumn, Progress, TextColumn

from tvm_upload.config import Config
from tvm_upload.control import send_request, socket_path
from tvm_upload.errors import ExitCode
from tvm_upload.state import StateStore

POLL_SECONDS = 0.5


def request_upload_now(config: Config, *, wait: bool, timeout_seconds: float | None) -> int:
    """Send the request; with ``wait``, follow the drain. Return the exit code.

    The code is OK when the request was accepted (with ``wait``: the queue is
    empty and no file is failed), FAILURE when files are failed or the
    timeout passed, and UNAVAILABLE when no daemon listens or it went away.
    """
    path = socket_path(config.state_file)
    try:
        response = send_request(path, {"command": "upload-now"})
    except ConnectionError as error:
        print(f"tvm-upload: {error}", file=sys.stderr)
        return ExitCode.UNAVAILABLE
    if not response.get("ok") or not isinstance(response.get("run"), int):
        print(f"tvm-upload: the daemon rejected the request: {response}", file=sys.stderr)
        return ExitCode.SOFTWARE

    print("Upload requested: the daemon is uploading the whole queue.", file=sys.stderr)
    if not wait:
        return ExitCode.OK
    return _wait_for_drain(config, response["run"], timeout_seconds)


def _queue_left(config: Config) -> tuple[int, int, int]:
    with StateStore(config.state_file, read_only=True) as store:
        summary = store.summary(time.time())
    left_files = summary.pending_count + summary.uploading_count
    left_bytes = summary.pending_bytes + summary.uploading_bytes
    return left_files, left_bytes, summary.failed_count


def _wait_for_drain(config: Config, run: int, timeout_seconds: float | None) -> int:
    path = socket_path(config.state_file)
    deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
    start_files, start_bytes, _ = _queue_left(config)
    columns = [TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[detail]}")]

    with Progress(*columns, transient=False) as progress:
        task = progress.add_task("uploading", total=max(start_bytes, 1), detail="")
        while True:
            files, size, failed = _queue_left(config)
            progress.update(
                task,
                completed=max(start_bytes - size, 0),
                detail=f"{files} files, {size / 1e6:.1f} MB left, {failed} failed",
            )
            try:
                state = send_request(path, {"command": "progress"})
            except ConnectionError as error:
                print(f"tvm-upload: lost the daemon while waiting: {error}", file=sys.stderr)
                return ExitCode.UNAVAILABLE
            if state.get("finished_run", 0) >= run:
                break
            if deadline is not None and time.monotonic() > deadline:
                print("tvm-upload: timed out waiting for the queue to drain", file=sys.stderr)
                return ExitCode.FAILURE
            time.sleep(POLL_SECONDS)

    _, _, failed = _queue_left(config)
    if failed:
        print(f"tvm-upload: {failed} files failed; see 'tvm-upload status'", file=sys.stderr)
        return ExitCode.FAILURE
    print(f"Queue drained: {start_files} files uploaded or already in S3.", file=sys.stderr)
    return ExitCode.OK
