"""Sending side of the daemon: claimed queue rows run on the upload pool.

The main loop calls ``step()``. Upload threads only run ``Uploader.upload``;
each outcome is written to the state store on the main loop, which keeps
the store's writers to one thread apart from the uploader's part journal.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from tvm_upload.backoff import backoff_seconds
from tvm_upload.clock import Clock
from tvm_upload.config import Config
from tvm_upload.errors import FileChangedError, FileVanishedError, UploadError
from tvm_upload.metrics import count_failed_attempt, count_upload
from tvm_upload.state import FileRecord, StateStore
from tvm_upload.uploader import Uploader, UploadRequest, UploadResult

logger = logging.getLogger(__name__)

SECONDS_PER_DAY = 86400.0
MIB = 1024 * 1024


@dataclass
class DispatchStats:
    """Totals since the daemon started, for status lines and metrics."""

    uploaded_files: int = 0
    uploaded_bytes: int = 0
    failed_attempts: int = 0
    last_upload_at: float | None = None


@dataclass
class _QueuePause:
    """A pause of the whole queue after an error that every upload would hit."""

    until_monotonic: float = 0.0
    began_monotonic: float = -1.0
    consecutive: int = 0
    last_message: str = ""


@dataclass
class _Running:
    record: FileRecord
    future: Future[UploadResult]
    started_monotonic: float


@dataclass
class Dispatcher:
    """Claims due queue rows, uploads them concurrently and records each outcome."""

    config: Config
    store: StateStore
    uploader: Uploader
    clock: Clock
    rng: random.Random = field(default_factory=random.Random)
    stats: DispatchStats = field(default_factory=DispatchStats)
    on_upload: Callable[[float, int], None] | None = None
    on_finished: Callable[[], None] | None = None
    """Called from the upload thread when an upload ends, so the main loop can refill at once."""

    def __post_init__(self) -> None:
        self._pool = ThreadPoolExecutor(
            max_workers=self.config.upload.max_concurrency, thread_name_prefix="upload"
        )
        self._running: dict[int, _Running] = {}
        self._pause = _QueuePause()
        self._stopping = threading.Event()
        self._draining = False
        self._wanted: list[Path] = []
        self.drain_requests = 0
        self.drains_finished = 0
        self.changed: list[FileRecord] = []

    @property
    def busy(self) -> bool:
        """True while uploads are running or a drain is in progress."""
        return bool(self._running) or self._draining

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def in_flight_paths(self) -> list[Path]:
        """Return the paths of the files being uploaded right now."""
        return [running.record.path for running in list(self._running.values())]

    def request_drain(self, *, include_failed: bool = False) -> int:
        """Upload every due queue row until none is left; failed rows too if asked.

        A request while a drain is running merges into it. Returns the
        request's number; ``drains_finished`` reaches it when the queue is empty.
        """
        self._draining = True
        if include_failed:
            retried = self.store.retry_failed()
            if retried:
                logger.info("Queued %d failed files again for this run", retried)
        self.drain_requests += 1
        return self.drain_requests

    def request_paths(self, paths: list[Path]) -> None:
        """Upload just these queued files, for immediate uploads with batch upload off."""
        self._wanted.extend(paths)

    def apply_config(self, config: Config, uploader: Uploader | None) -> None:
        """Use a reloaded configuration; uploads in flight finish with the old uploader."""
        if config.upload.max_concurrency != self.config.upload.max_concurrency:
            old_pool = self._pool
            self._pool = ThreadPoolExecutor(
                max_workers=config.upload.max_concurrency, thread_name_prefix="upload"
            )
            old_pool.shutdown(wait=False)
        if uploader is not None:
            self.uploader = uploader
        self.config = config

    def step(self) -> None:
        """Record finished uploads, then start new ones for a drain or for wanted files."""
        self._collect()
        if self._stopping.is_set() or self.clock.monotonic() < self._pause.until_monotonic:
            return

        free = self.config.upload.max_concurrency - len(self._running)
        if free <= 0:
            return

        if self._wanted:
            wanted, self._wanted = self._wanted[:free], self._wanted[free:]
            claimed = self.store.claim_paths(wanted, self.clock.time())
            for record in claimed:
                self._submit(record)
            free -= len(claimed)

        if not self._draining or free <= 0:
            return

        claimed = self.store.claim(self.clock.time(), free)
        for record in claimed:
            self._submit(record)

        if not claimed and not self._running:
            self._finish_drain()

    def _finish_drain(self) -> None:
        if self.store.has_pending():
            return
        self._draining = False
        self.drains_finished = self.drain_requests

    def _submit(self, record: FileRecord) -> None:
        request = UploadRequest(
            path=record.path,
            object_key=record.object_key,
            identity=record.identity,
            source=record.source,
            vehicle_id=self.config.vehicle_id,
        )
        future = self._pool.submit(self.uploader.upload, request, should_stop=self._stopping.is_set)
        self._running[record.id] = _Running(record, future, self.clock.monotonic())
        notify = self.on_finished
        if notify is not None:
            future.add_done_callback(lambda _future: notify())

    def _collect(self) -> None:
        for file_id, running in list(self._running.items()):
            if not running.future.done():
                continue
            del self._running[file_id]
            self._record_outcome(running)

    def _record_outcome(self, running: _Running) -> None:
        error = running.future.exception()
        if error is None:
            self._record_success(running.record, running.future.result())
        elif isinstance(error, UploadError):
            self._record_failure(running.record, error, running.started_monotonic)
        else:
            logger.exception(
                "Upload of %s failed unexpectedly", running.record.path, exc_info=error
            )
            self._record_failure(running.record, UploadError(repr(error)))

    def _record_success(self, record: FileRecord, result: UploadResult) -> None:
        now = self.clock.time()
        after_upload = self.config.deletion.after_upload
        delete_after = (
            now + after_upload.keep_days * SECONDS_PER_DAY if after_upload.enabled else None
        )
        self.store.mark_uploaded(
            record.id, result.sha256, now, delete_after, result.identity or record.identity
        )

        self._pause = _QueuePause()
        self.stats.last_upload_at = now
        if result.skipped_existing:
            logger.info(
                "Skipped %s: s3 object %s already has this content", record.path, record.object_key
            )
            return

        self.stats.uploaded_files += 1
        self.stats.uploaded_bytes += result.size
        count_upload(self.store, result.size)
        if self.on_upload is not None:
            self.on_upload(result.seconds, result.size)
        rate = result.size / MIB / result.seconds if result.seconds > 0 else 0.0
        logger.info(
            "Uploaded %s to %s (%d bytes, %.2f s, %.1f MB/s)",
            record.path,
            record.object_key,
            result.size,
            result.seconds,
            rate,
        )

    def _record_failure(
        self, record: FileRecord, error: UploadError, started_monotonic: float = 0.0
    ) -> None:
        """Record a failed attempt.

        A queue-wide error pauses the queue once per episode: uploads that
        started before the current pause fail the same way and do not
        lengthen it.
        """
        if isinstance(error, FileVanishedError):
            logger.info("Removed %s from the queue: %s", record.path, error)
            self.store.remove(record.id)
            return

        if isinstance(error, FileChangedError):
            logger.info(
                "Waiting for %s to be stable again: it changed during upload: %s",
                record.path,
                error,
            )
            settle_seconds = self.config.upload.file_stable_seconds
            self.store.release(record.id, next_attempt_at=self.clock.time() + settle_seconds)
            self.changed.append(record)
            return

        if self._stopping.is_set():
            self.store.release(record.id)
            return

        if error.scope == "queue":
            self.store.release(record.id)
            if started_monotonic >= self._pause.began_monotonic:
                self._pause_queue(error)
            return

        self._charge_attempt(record, error)

    def _charge_attempt(self, record: FileRecord, error: UploadError) -> None:
        attempt = record.attempts + 1
        limit = self.config.upload.max_attempts
        self.stats.failed_attempts += 1
        count_failed_attempt(self.store)

        if attempt >= limit or not error.retryable:
            self.store.mark_failed(record.id, str(error))
            logger.error(
                "Upload of %s failed (attempt %d/%d), marked failed until the next scheduled run: %s",
                record.path,
                attempt,
                limit,
                error,
            )
            return

        delay = self._backoff(attempt)
        self.store.mark_retry(record.id, str(error), self.clock.time() + delay)
        logger.warning(
            "Upload of %s failed (attempt %d/%d), retrying in %.1f s: %s",
            record.path,
            attempt,
            limit,
            delay,
            error,
        )

    def _pause_queue(self, error: UploadError) -> None:
        self._pause.consecutive += 1
        delay = self._backoff(self._pause.consecutive)
        self._pause.began_monotonic = self.clock.monotonic()
        self._pause.until_monotonic = self._pause.began_monotonic + delay

        message = str(error)
        level = logging.ERROR if message != self._pause.last_message else logging.WARNING
        self._pause.last_message = message
        logger.log(level, "Paused all uploads for %.1f s: %s", delay, message)

    def _backoff(self, attempt: int) -> float:
        retry = self.config.upload.retry
        return backoff_seconds(
            attempt,
            initial_seconds=retry.initial_delay_seconds,
            cap_seconds=retry.max_delay_seconds,
            rng=self.rng,
        )

    def stop(self, grace_seconds: float) -> None:
        """Stop starting uploads, wait up to ``grace_seconds`` and release what did not finish.

        Uploads see the stop through ``should_stop`` and end between parts, so
        a large file does not hold the stop for its whole transfer.
        """
        self._stopping.set()
        futures = [running.future for running in self._running.values()]
        wait(futures, timeout=grace_seconds)

        self._collect()
        for running in self._running.values():
            self.store.release(running.record.id)
            logger.info("Released %s back to the queue at stop", running.record.path)
        self._running.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
