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
from pathlib import Path
from types import FrameType
from typing import Any

from tvm_upload.clock import SYSTEM_CLOCK, Clock
from tvm_upload.config import Config
from tvm_upload.control import ControlServer, socket_path
from tvm_upload.daemonstatus import write_daemon_status
from tvm_upload.dispatcher import Dispatcher
from tvm_upload.errors import StateStoreError
from tvm_upload.instancelock import InstanceLock
from tvm_upload.intake import Intake, directory_of, import_legacy_state, state_store_lost
from tvm_upload.notify import Notifier
from tvm_upload.reload import ReloadPlan, load_reload, rescope_files
from tvm_upload.reporting import MetricsReporter
from tvm_upload.retention import Retention
from tvm_upload.safety import DeletionRule
from tvm_upload.schedule import DrainScope, Trigger, build_trigger
from tvm_upload.state import CorruptStateStoreError, StateStore, open_store
from tvm_upload.storeoutage import StoreOutage
from tvm_upload.uploader import Uploader
from tvm_upload.watcher import Watcher

logger = logging.getLogger(__name__)

SECONDS_PER_DAY = 86400.0
TICK_SECONDS = 0.25
STOP_GRACE_SECONDS = 7.0
STATUS_INTERVAL_SECONDS = 2.0
SUMMARY_INTERVAL_SECONDS = 30.0
RETENTION_INTERVAL_SECONDS = 30.0


@dataclass
class _Flags:
    """Requests from signal handlers and the control socket, taken by the main loop."""

    stop: bool = False
    reload: bool = False
    upload_now: bool = False


class Daemon:
    """One running tvm-upload: watches, queues and uploads until asked to stop."""

    def __init__(
        self,
        config: Config,
        *,
        config_path: Path | None = None,
        clock: Clock = SYSTEM_CLOCK,
        uploader: Uploader | None = None,
        trigger: Trigger | None = None,
        notifier: Notifier | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.clock = clock
        self.trigger: Trigger = trigger or build_trigger(config)
        self.notifier = notifier or Notifier.from_environment()
        self._uploader = uploader
        self._flags = _Flags()
        self._wake = threading.Event()
        self._next_reconcile = 0.0
        self._next_status = 0.0
        self._next_summary = 0.0
        self._next_retention = 0.0
        self._drains_seen = 0
        self._started_at = 0.0
        self._control: ControlServer | None = None
        self._lock = InstanceLock(config.state_file)
        self._store_outage = StoreOutage(clock)
        self.store: StateStore
        self.intake: Intake
        self.dispatcher: Dispatcher
        self.watcher: Watcher

    def request_stop(self) -> None:
        """Ask the loop to stop; safe from signal handlers and other threads."""
        self._flags.stop = True
        self._wake.set()

    def request_reload(self) -> None:
        """Ask the loop to read the configuration file again."""
        self._flags.reload = True
        self._wake.set()

    def request_upload_now(self) -> None:
        """Ask the loop to drain the whole queue now, whatever the schedule."""
        self._flags.upload_now = True
        self._wake.set()

    def install_signal_handlers(self) -> None:
        """Route SIGTERM and SIGINT to a graceful stop, SIGHUP to reload, SIGUSR1 to upload-now."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_signal)
        signal.signal(signal.SIGUSR1, self._on_signal)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGHUP:
            self.request_reload()
        elif signum == signal.SIGUSR1:
            self.request_upload_now()
        else:
            self.request_stop()

    def run(self) -> None:
        """Start every component, loop until stopped, then stop them in order."""
        try:
            self._start()
            while not self._flags.stop:
                self._step_through_store_errors()
                self._wake.wait(TICK_SECONDS)
                self._wake.clear()
        finally:
            self._shutdown()

    def _start(self) -> None:
        config = self.config
        self._started_at = self.clock.time()
        self._lock.acquire()
        lost = state_store_lost(config.state_file)
        self.store, rebuilt = open_store(config.state_file, clock=self.clock.time)
        rebuilt = rebuilt or lost
        if rebuilt:
            logger.error(
                "Rebuilding the state store %s from a scan of the log directories; a file"
                " is uploaded again only if its S3 object is missing or differs",
                config.state_file,
            )

        import_legacy_state(config, self.store, self.clock)
        recovered = self.store.recover_interrupted()
        if recovered:
            logger.info("Queued %d interrupted uploads again", recovered)

        uploader = self._uploader or Uploader.from_config(config)
        self.intake = Intake(config, self.store, self.clock)
        self.metrics = MetricsReporter(config, self.store, self.clock)
        self.dispatcher = Dispatcher(
            config,
            self.store,
            uploader,
            self.clock,
            on_upload=self.metrics.observe_upload,
            on_finished=self._wake.set,
        )
        self.retention = Retention(config, self.store, in_flight=self.dispatcher.in_flight_paths)
        self.watcher = Watcher(config.log_directories, self.intake.on_event)
        self.watcher.start()
        self._start_control()
        self.metrics.start()

        self._startup_scan(rebuilt)
        if self.trigger.on_start():
            self.dispatcher.request_drain(include_failed=True)

        logger.info(
            "Started: vehicle %s, %d log directories, %d files queued, %d waiting to be"
            " stable, state store %s",
            config.vehicle_id,
            len(config.log_directories),
            self.store.queue_length(),
            len(self.intake.stability),
            config.state_file,
        )
        self.notifier.ready()

    def _start_control(self) -> None:
        path = socket_path(self.config.state_file)
        self._control = ControlServer(path, self._handle_control)
        try:
            self._control.start()
        except OSError as error:
            logger.warning(
                "Cannot listen on the control socket %s, so upload-now is unavailable: %s",
                path,
                error,
            )
            self._control = None

    def _handle_control(self, request: dict[str, Any]) -> dict[str, Any]:
        """Return the response to a control request; it runs on the control thread, so it only reads and sets flags."""
        command = request.get("command")
        if command == "upload-now":
            run = self.dispatcher.drain_requests + 1
            self.request_upload_now()
            return {"ok": True, "run": run}
        if command == "progress":
            return {
                "ok": True,
                "draining": self.dispatcher.busy or self._flags.upload_now,
                "in_flight": self.dispatcher.in_flight,
                "run": self.dispatcher.drain_requests,
                "finished_run": self.dispatcher.drains_finished,
            }
        return {"ok": False, "error": f"unknown command {command!r}"}

    def _scan(self, reason: str) -> None:
        """Scan every root for files the queue and registry do not know yet."""
        observed = self.intake.scan(self._scan_min_mtime())
        if observed:
            logger.info("%s found %d files not yet uploaded", reason, observed)
        self._next_reconcile = (
            self.clock.monotonic() + self.config.upload.reconcile_interval_seconds
        )

    def _startup_scan(self, rebuilt: bool) -> None:
        """Scan for the backlog; after a rebuild, every log file (see ``Intake.rebuild_scan``)."""
        if not rebuilt:
            self._scan("Startup scan")
            return

        self.intake.rebuild_scan()
        self._next_reconcile = (
            self.clock.monotonic() + self.config.upload.reconcile_interval_seconds
        )

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

    def _step_through_store_errors(self) -> None:
        """Run ``step``, or wait out a state store outage with uploads paused.

        A failed write (most often a full disk) was rolled back, so the store
        stays consistent, and the step is tried again after a backoff (see
        ``StoreOutage``). Meanwhile only the systemd watchdog is fed. A damaged
        database ends the run with its error: the restart moves it aside and
        rebuilds it.
        """
        outage = self._store_outage
        if outage.waiting():
            self.notifier.watchdog()
            return

        try:
            self.step()
            if outage.requeue_stuck and self.dispatcher.in_flight == 0:
                self._requeue_stuck_uploads()
        except CorruptStateStoreError as error:
            logger.error("Stopping, because the state store is damaged: %s", error)
            raise
        except StateStoreError as error:
            outage.failed(error, self.config.upload.retry)
            self.notifier.watchdog()
            return

        outage.succeeded()

    def _requeue_stuck_uploads(self) -> None:
        """Queue again the rows whose upload finished while their outcome could not be written.

        Such rows stay ``uploading`` with no upload running. Called only when no
        upload is in flight, so every ``uploading`` row is one of them. Their
        next upload finds the object by its ``sha256`` and sends nothing.
        """
        recovered = self.store.recover_interrupted()
        self._store_outage.requeue_stuck = False
        if recovered:
            logger.info(
                "Queued %d files again whose upload outcome was lost while the state store"
                " could not be written",
                recovered,
            )
            self.dispatcher.request_drain()

    def step(self) -> None:
        """Run one pass of every component."""
        self._take_flags()

        self.watcher.poll()
        if self.watcher.overflowed():
            self._scan("Scan after an inotify overflow")
        elif self.clock.monotonic() >= self._next_reconcile:
            self._scan("Reconciliation scan")

        self._observe_changed()
        ready = self.intake.step()
        if self.intake.has_unqueued:
            self._wake.set()
        monotonic_now = self.clock.monotonic()
        now = self.clock.now(self.config.zone())
        if ready:
            self._on_files_ready(ready, now)

        if self.trigger.due(monotonic_now, now):
            logger.info("Scheduled run: uploading the whole queue")
            self.dispatcher.request_drain(include_failed=True)
        if self.trigger.clock_stepped() is not None:
            self._scan("Scan after a wall-clock step")

        self.dispatcher.step()
        self._run_retention(monotonic_now)
        self._report_status(monotonic_now, now)

    def _take_flags(self) -> None:
        if self._flags.reload:
            self._flags.reload = False
            self._reload()
        if self._flags.upload_now:
            self._flags.upload_now = False
            logger.info("Upload requested now: uploading the whole queue")
            self.dispatcher.retry_now()
            self.dispatcher.request_drain(include_failed=True)

    def _on_files_ready(self, ready: list[Path], now: Any) -> None:
        """Release files that just became ready, as the trigger decides.

        For the backlog found at start, ``upload_on_start`` decides instead
        of the window: those files join the start drain, or wait for a
        scheduled run or upload-now.
        """
        backlog = self._take_start_backlog(ready)
        if backlog and self.trigger.on_start():
            self.dispatcher.request_drain()

        fresh = [path for path in ready if path not in backlog]
        scope = self.trigger.on_ready(now) if fresh else DrainScope.NONE
        if scope is DrainScope.QUEUE:
            self.dispatcher.request_drain()
        elif scope is DrainScope.FILE:
            self.dispatcher.request_paths(fresh)

    def _take_start_backlog(self, ready: list[Path]) -> set[Path]:
        """Return the files of ``ready`` that the startup scan found and that did not change since.

        The startup scan's files are those tracked, or ready and not queued
        yet, when the first file becomes ready or the first reload comes,
        whichever is first, less any modified after the start.
        """
        backlog: set[Path] | None = getattr(self, "_start_backlog", None)
        if backlog is None:
            tracked = [*self.intake.stability.tracked(), *self.intake.unqueued_paths()]
            backlog = set(tracked) | set(ready)
            self._start_backlog = backlog

        def unchanged_since_start(path: Path) -> bool:
            try:
                return path.lstat().st_mtime_ns / 1e9 < self._started_at
            except OSError:
                return False

        ready_backlog = {path for path in ready if path in backlog and unchanged_since_start(path)}
        backlog.difference_update(ready)
        return ready_backlog

    def _observe_changed(self) -> None:
        """Watch files that changed during their upload until they are stable again."""
        while self.dispatcher.changed:
            record = self.dispatcher.changed.pop()
            directory = directory_of(self.config, record.path)
            if directory is not None:
                self.intake.stability.observe(record.path, directory)

    def _run_retention(self, monotonic_now: float) -> None:
        """Run due deletions every 30 s, and the emergency check after each finished drain."""
        drain_finished = self.dispatcher.drains_finished != self._drains_seen
        self._drains_seen = self.dispatcher.drains_finished
        if monotonic_now >= self._next_retention:
            self._next_retention = monotonic_now + RETENTION_INTERVAL_SECONDS
            report = self.retention.run_due(self.clock.time())
        elif drain_finished and self.config.deletion.emergency.enabled:
            report = self.retention.execute(
                [DeletionRule.EMERGENCY], self.clock.time(), dry_run=False
            )
        else:
            return

        for record in report.requeue:
            directory = directory_of(self.config, record.path)
            if directory is not None:
                self.intake.stability.observe(record.path, directory)

    def _reload(self) -> None:
        if self.config_path is None:
            logger.warning("Ignored a reload request: the daemon was started without a config file")
            return

        self.notifier.reloading()
        plan = load_reload(self.config_path, self.config)
        if plan is not None:
            self._apply(plan)
        self.notifier.ready()

    def _apply(self, plan: ReloadPlan) -> None:
        """Switch every component to the validated new configuration; uploads in flight go on."""
        self._take_start_backlog([])
        config = plan.config
        self.config = config
        self.intake.apply_config(config)
        self.dispatcher.apply_config(config, plan.uploader)
        self.retention.apply_config(config)
        self.metrics.reconfigure(config)
        self.watcher.update(config.log_directories)
        if plan.directories_changed:
            rescope_files(config, self.intake, self.store)
        if plan.trigger_changed:
            self.trigger = build_trigger(config, previous=self.trigger)

        logger.info("Reloaded the configuration from %s: %s", self.config_path, plan.summary)
        if plan.directories_changed:
            self._scan("Scan of the reloaded log directories")
        self._next_status = 0.0

    def _report_status(self, monotonic_now: float, now: Any) -> None:
        """Ping the watchdog; every 2 s rewrite the status file, every 30 s the STATUS line.

        The STATUS line needs a summary query over the whole state store, so it
        runs less often than the status file, which contains only in-memory figures.
        """
        self.notifier.watchdog()
        if monotonic_now >= self._next_summary:
            self._next_summary = monotonic_now + SUMMARY_INTERVAL_SECONDS
            summary = self.store.summary(self.clock.time())
            self.notifier.status(
                f"{summary.queue_count} queued, {self.dispatcher.in_flight} uploading, "
                f"{self.dispatcher.stats.uploaded_files} uploaded since start"
            )

        if monotonic_now < self._next_status:
            return
        self._next_status = monotonic_now + STATUS_INTERVAL_SECONDS
        self._write_status(monotonic_now, now)

    def _write_status(self, monotonic_now: float, now: Any, *, running: bool = True) -> None:
        stats = self.dispatcher.stats
        hours = self.config.upload.operational_hours
        window = f"{hours.start:%H:%M}-{hours.end:%H:%M}" if hours.enabled else None
        write_daemon_status(
            self.config.state_file,
            {
                "schedule": {**self.trigger.describe(monotonic_now, now), "window": window},
                "in_flight": self.dispatcher.in_flight if running else 0,
                "waiting_to_be_stable": len(self.intake.stability),
                "paused": self.dispatcher.pause_state(),
                "uploaded_since_start": stats.uploaded_files,
                "last_upload_at": stats.last_upload_at,
                "started_at": self._started_at,
                "updated_at": self.clock.time(),
                "stopped": not running,
            },
        )

    def _shutdown(self) -> None:
        """Stop whatever ``_start`` got to start, in reverse order."""
        logger.info("Stopping: waiting up to %.0f s for uploads in flight", STOP_GRACE_SECONDS)
        self.notifier.stopping()
        if self._control is not None:
            self._control.stop()
        if hasattr(self, "watcher"):
            self.watcher.stop()
        if hasattr(self, "dispatcher"):
            self.dispatcher.stop(STOP_GRACE_SECONDS)
            self._write_status(
                self.clock.monotonic(), self.clock.now(self.config.zone()), running=False
            )
            stats = self.dispatcher.stats
            logger.info(
                "Stopped: %d files (%d bytes) uploaded since start",
                stats.uploaded_files,
                stats.uploaded_bytes,
            )
        if hasattr(self, "metrics"):
            self.metrics.stop()
        if hasattr(self, "store"):
            self.store.close()
        self._lock.release()
