"""Sending side of the daemon: claimed queue rows run on the upload pool.

The main loop calls ``step()``. Upload threads only run ``Uploader.upload``;
each outcome is written to the state store on the main loop, which keeps
the store's writers to one thread apart from the uploader's part journal.
Each upload gets a journal on its row (``resume.StoreJournal``), so an
interrupted multipart upload resumes, and ``resume.StaleUploadSweep`` aborts
the multipart uploads that no row records any more.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from botocore.exceptions import BotoCoreError

from tvm_upload.backoff import backoff_seconds
from tvm_upload.clock import Clock
from tvm_upload.config import Config
from tvm_upload.errors import FileChangedError, FileVanishedError, TvmUploadError, UploadError
from tvm_upload.metrics import count_failed_attempt, count_uploads
from tvm_upload.redaction import redact
from tvm_upload.resume import StaleUploadSweep, StoreJournal
from tvm_upload.state import ConfirmedUpload, FileRecord, StateStore
from tvm_upload.uploader import S3RequestError, Uploader, UploadRequest, UploadResult

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
    last_error: str = ""


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
        self._started_at = self.clock.time()
        self._queue_failures: dict[int, int] = {}
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
        self._sweep = StaleUploadSweep()
        self._credentials_reloaded_monotonic = float("-inf")

    @property
    def busy(self) -> bool:
        """True while uploads are running or a drain is in progress."""
        return bool(self._running) or self._draining

    @property
    def in_flight(self) -> int:
        return len(self._running)

    def retry_now(self) -> None:
        """End a queue-wide pause and every file's retry wait: the operator asked to upload now."""
        self._pause.until_monotonic = 0.0
        waiting = self.store.make_due()
        if waiting:
            logger.info("Retrying %d files now instead of after their retry delay", waiting)

    def pause_state(self) -> dict[str, object] | None:
        """Return the queue-wide pause in force (seconds left, reason), or None."""
        left = self._pause.until_monotonic - self.clock.monotonic()
        if left <= 0:
            return None
        return {"seconds_left": round(left, 1), "reason": self._pause.last_error}

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
        if self._sweep_holds_uploads():
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

        claimed = self.store.claim(self.clock.time(), free, max_delay_seconds=self._longest_delay())
        for record in claimed:
            self._submit(record)

        if not claimed and not self._running:
            self._finish_drain()

    def _sweep_holds_uploads(self) -> bool:
        """Collect or start the sweep of abandoned multipart uploads; True while it runs.

        A due sweep starts only while no upload runs, and no upload starts until
        it ends, so it never aborts an upload that is being created.
        """
        now = self.clock.monotonic()
        error = self._sweep.collect(now)
        if error is not None:
            self._reload_expired_credentials(error, now)

        if self._sweep.due(now) and not self._running:
            prefix = f"{self.config.vehicle_id}/"
            future = self._sweep.start(
                self._pool, self.uploader, prefix, self.store.open_upload_ids()
            )
            notify = self.on_finished
            if notify is not None:
                future.add_done_callback(lambda _future: notify())
        return self._sweep.running

    def _longest_delay(self) -> float:
        """Return a bound on any retry delay set here; a later due time means the clock stepped back."""
        upload = self.config.upload
        return max(upload.retry.max_delay_seconds, upload.file_stable_seconds) + 60.0

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
        future = self._pool.submit(
            self.uploader.upload,
            request,
            should_stop=self._stopping.is_set,
            parts_journal=StoreJournal(
                self.store,
                record.id,
                record.identity,
                may_have_upload=record.upload_id is not None,
            ),
        )
        self._running[record.id] = _Running(record, future, self.clock.monotonic())
        notify = self.on_finished
        if notify is not None:
            future.add_done_callback(lambda _future: notify())

    def _collect(self) -> None:
        """Record every finished upload: the successes first, in one state store commit."""
        finished = [running for running in self._running.values() if running.future.done()]
        for running in finished:
            del self._running[running.record.id]

        self._record_successes(
            [
                (running.record, running.future.result())
                for running in finished
                if running.future.exception() is None
            ]
        )
        for running in finished:
            error = running.future.exception()
            if error is not None:
                self._record_error(running, error)

    def _record_error(self, running: _Running, error: BaseException) -> None:
        if isinstance(error, UploadError):
            self._record_failure(running.record, error, running.started_monotonic)
            return

        logger.exception("Upload of %s failed unexpectedly", running.record.path, exc_info=error)
        self._record_failure(running.record, UploadError(repr(error)))

    def _record_successes(self, succeeded: list[tuple[FileRecord, UploadResult]]) -> None:
        """Mark the uploads confirmed in one durable transaction, then count and log them.

        If the transaction fails, the rows stay ``uploading`` and the daemon
        queues them again once the store works. Their next upload finds the
        objects by their ``sha256`` and sends nothing.
        """
        if not succeeded:
            return

        now = self.clock.time()
        self.store.mark_uploaded_many(
            [self._confirmed(record, result, now) for record, result in succeeded]
        )

        self._pause = _QueuePause()
        self._sweep.after_upload(self.clock.monotonic())
        self.stats.last_upload_at = now
        count_uploads(self.store, [res.size for _, res in succeeded if not res.skipped_existing])
        for record, result in succeeded:
            self._report_success(record, result)

    def _confirmed(self, record: FileRecord, result: UploadResult, now: float) -> ConfirmedUpload:
        after_upload = self.config.deletion.after_upload
        delete_after = (
            now + after_upload.keep_days * SECONDS_PER_DAY if after_upload.enabled else None
        )
        return ConfirmedUpload(
            record.id, result.sha256, now, delete_after, result.identity or record.identity
        )

    def _report_success(self, record: FileRecord, result: UploadResult) -> None:
        self._queue_failures.pop(record.id, None)
        if result.skipped_existing:
            logger.info(
                "Skipped %s: s3 object %s already has this content", record.path, record.object_key
            )
            return

        self.stats.uploaded_files += 1
        self.stats.uploaded_bytes += result.size
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

        self._reload_expired_credentials(error, started_monotonic)
        if error.scope == "queue":
            if started_monotonic >= self._pause.began_monotonic:
                self._pause_queue(error)
            self._release_behind_others(record)
            return

        self._charge_attempt(record, error)

    def _release_behind_others(self, record: FileRecord) -> None:
        """Queue a row again after a queue-wide error, behind rows that did not fail.

        The error may concern only this object key (a bucket policy denying one
        prefix), so the row waits out the pause plus its own growing backoff:
        when the pause ends, other files go first and cannot be starved. No
        attempt is charged.
        """
        failures = self._queue_failures.get(record.id, 0) + 1
        self._queue_failures[record.id] = failures
        pause_left = max(self._pause.until_monotonic - self.clock.monotonic(), 0.0)
        wait = pause_left + self._backoff(failures)
        self.store.release(record.id, next_attempt_at=self.clock.time() + wait)

    def _reload_expired_credentials(self, error: UploadError, started_monotonic: float) -> None:
        """Read the credentials again when S3 reported them expired or missing.

        One reload serves every request that started before it, so uploads that
        were in flight and fail alike do not reload again.
        """
        if not isinstance(error, S3RequestError) or not error.credentials_expired:
            return
        if started_monotonic < self._credentials_reloaded_monotonic:
            return

        self._credentials_reloaded_monotonic = self.clock.monotonic()
        logger.info("Reading the S3 credentials again before the next attempt")
        try:
            self.uploader.reload_credentials()
        except (TvmUploadError, BotoCoreError) as reload_error:
            logger.error("Cannot read the S3 credentials again: %s", reload_error)

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
        """Pause every upload after an error that each of them would hit; charge no file.

        The pause grows with each try since the last successful upload, with the
        backoff of ``upload.retry``. The first pause for an error logs the whole
        error at ERROR, or at WARNING for throttling because it heals by itself.
        Repeats of the same error code log one short WARNING per pause (INFO for
        throttling).
        """
        self._pause.consecutive += 1
        delay = self._backoff(self._pause.consecutive)
        self._pause.began_monotonic = self.clock.monotonic()
        self._pause.until_monotonic = self._pause.began_monotonic + delay

        # last_message contains the error code, because the text names a file or key.
        code = str(getattr(error, "code", None) or type(error).__name__)
        repeated = code == self._pause.last_message
        self._pause.last_message = code
        self._pause.last_error = redact(str(error))
        throttled = bool(getattr(error, "throttled", False))
        if repeated:
            logger.log(
                logging.INFO if throttled else logging.WARNING,
                "All uploads still paused: %s again (try %d since the last upload); next try in"
                " %.1f s",
                code,
                self._pause.consecutive,
                delay,
            )
        else:
            logger.log(
                logging.WARNING if throttled else logging.ERROR,
                "Paused all uploads: %s. Next try in %.1f s; no file is charged an attempt",
                error,
                delay,
            )

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
