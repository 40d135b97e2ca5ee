"""The daemon: wiring, signals and the main loop.

This is the only module where finding files (``intake``) and sending them
(``dispatcher``) meet. Each loop step takes the current time, lets every
component do its share, then waits on an event so that a stop, a reload or
an upload request is handled at once.
"""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass
from types import FrameType

from tvm_upload.clock import SYSTEM_CLOCK, Clock
from tvm_upload.config import Config
from tvm_upload.dispatcher import Dispatcher
from tvm_upload.intake import Intake, directory_of, import_legacy_state
from tvm_upload.notify import Notifier
from tvm_upload.schedule import DrainScope, ImmediateTrigger, Trigger
from tvm_upload.state import StateStore, open_store
from tvm_upload.uploader import Uploader
from tvm_upload.watcher import Watcher

logger = logging.getLogger(__name__)

SECONDS_PER_DAY = 86400.0
TICK_SECONDS = 0.25
STOP_GRACE_SECONDS = 7.0
STATUS_INTERVAL_SECONDS = 30.0


@dataclass
class _Flags:
    stop: bool = False
    reload: bool = False
    upload_now: bool = False


class Daemon:
    """One running tvm-upload: watches, queues and uploads until asked to stop."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Clock = SYSTEM_CLOCK,
        uploader: Uploader | None = None,
        trigger: Trigger | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.clock = clock
        self.trigger: Trigger = trigger or ImmediateTrigger()
        self.notifier = notifier or Notifier.from_environment()
        self._uploader = uploader
        self._flags = _Flags()
        self._wake = threading.Event()
        self._next_reconcile = 0.0
        self._next_status = 0.0
        self._started_at = 0.0
        self.store: StateStore
        self.intake: Intake
        self.dispatcher: Dispatcher
        self.watcher: Watcher

    def request_stop(self) -> None:
        """Ask the loop to stop; safe from signal handlers and other threads."""
        self._flags.stop = True
        self._wake.set()

    def request_upload_now(self) -> None:
        """Ask the loop to drain the whole queue now, whatever the schedule."""
        self._flags.upload_now = True
        self._wake.set()

    def install_signal_handlers(self) -> None:
        """Route SIGTERM and SIGINT to a graceful stop and SIGUSR1 to upload-now."""
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        signal.signal(signal.SIGUSR1, self._on_upload_now_signal)

    def _on_stop_signal(self, signum: int, frame: FrameType | None) -> None:
        self.request_stop()

    def _on_upload_now_signal(self, signum: int, frame: FrameType | None) -> None:
        self.request_upload_now()

    def run(self) -> None:
        """Start every component, loop until stopped, then stop them in order."""
        self._start()
        try:
            while not self._flags.stop:
                self.step()
                self._wake.wait(TICK_SECONDS)
                self._wake.clear()
        finally:
            self._shutdown()

    def _start(self) -> None:
        config = self.config
        self._started_at = self.clock.time()
        self.store, rebuilt = open_store(config.state_file, clock=self.clock.time)
        if rebuilt:
            logger.error(
                "Rebuilt the state store %s from a scan of the log directories", config.state_file
            )

        import_legacy_state(config, self.store, self.clock)
        recovered = self.store.recover_interrupted()
        if recovered:
            logger.info("Queued %d interrupted uploads again", recovered)

        self.intake = Intake(config, self.store, self.clock)
        self.dispatcher = Dispatcher(
            config, self.store, self._uploader or Uploader.from_config(config), self.clock
        )
        self.watcher = Watcher(config.log_directories, self.intake.on_event)
        self.watcher.start()

        self._initial_scan()
        if self.trigger.on_start():
            self.dispatcher.request_drain()

        logger.info(
            "Started: vehicle %s, %d log directories, %d files queued, state store %s",
            config.vehicle_id,
            len(config.log_directories),
            self.store.summary(self.clock.time()).pending_count,
            config.state_file,
        )
        self.notifier.ready()

    def _initial_scan(self) -> None:
        scan_settings = self.config.upload.scan_existing_files
        if not scan_settings.enabled:
            self._schedule_reconcile()
            return

        observed = self.intake.scan(self._scan_min_mtime())
        logger.info("Startup scan found %d files not yet uploaded", observed)
        self._schedule_reconcile()

    def _scan_min_mtime(self) -> float | None:
        """Return the oldest mtime a scan considers.

        With the startup scan disabled, scans only look at files modified
        since this process started, so old files stay ignored as configured.
        """
        scan_settings = self.config.upload.scan_existing_files
        if not scan_settings.enabled:
            return self._started_at - self.config.upload.file_stable_seconds
        if scan_settings.max_age_days == 0:
            return None
        return self.clock.time() - scan_settings.max_age_days * SECONDS_PER_DAY

    def _schedule_reconcile(self) -> None:
        self._next_reconcile = (
            self.clock.monotonic() + self.config.upload.reconcile_interval_seconds
        )

    def step(self) -> None:
        """Run one pass of every component."""
        self._take_flags()

        self.watcher.poll()
        if self.watcher.overflowed() or self.clock.monotonic() >= self._next_reconcile:
            self.intake.scan(self._scan_min_mtime())
            self._schedule_reconcile()

        self._requeue_changed()
        counts = self.intake.step()
        now = self.clock.now(self.config.zone())
        if counts.queued:
            self._on_files_ready(now)
        if self.trigger.due(self.clock.monotonic(), now):
            logger.info("Scheduled run: uploading the whole queue")
            self.dispatcher.request_drain(include_failed=True)

        self.dispatcher.step()
        self._report_status()

    def _take_flags(self) -> None:
        if self._flags.upload_now:
            self._flags.upload_now = False
            logger.info("Upload requested now: uploading the whole queue")
            self.dispatcher.request_drain(include_failed=True)

    def _on_files_ready(self, now: object) -> None:
        scope = self.trigger.on_ready(now)  # type: ignore[arg-type]
        if scope is not DrainScope.NONE:
            self.dispatcher.request_drain()

    def _requeue_changed(self) -> None:
        while self.dispatcher.changed:
            record = self.dispatcher.changed.pop()
            directory = directory_of(self.config, record.path)
            if directory is not None:
                self.intake.stability.observe(record.path, directory)

    def _report_status(self) -> None:
        self.notifier.watchdog()
        if self.clock.monotonic() < self._next_status:
            return

        self._next_status = self.clock.monotonic() + STATUS_INTERVAL_SECONDS
        summary = self.store.summary(self.clock.time())
        self.notifier.status(
            f"{summary.pending_count} queued, {self.dispatcher.in_flight} uploading, "
            f"{self.dispatcher.stats.uploaded_files} uploaded since start"
        )

    def _shutdown(self) -> None:
        """Stop whatever ``_start`` got to start, in reverse order."""
        logger.info("Stopping: waiting up to %.0f s for uploads in flight", STOP_GRACE_SECONDS)
        self.notifier.stopping()
        if hasattr(self, "watcher"):
            self.watcher.stop()
        if not hasattr(self, "dispatcher"):
            if hasattr(self, "store"):
                self.store.close()
            return

        self.dispatcher.stop(STOP_GRACE_SECONDS)
        stats = self.dispatcher.stats
        self.store.close()
        logger.info(
            "Stopped: %d files (%d bytes) uploaded since start",
            stats.uploaded_files,
            stats.uploaded_bytes,
        )
