"""The metrics thread: CloudWatch publishing and Prometheus refreshes off the main loop.

A CloudWatch call can wait for its connect and read timeouts while the
vehicle is offline; running it here keeps the main loop, and with it
uploads and the systemd watchdog, independent of the metrics endpoint.
"""

from __future__ import annotations

import logging
import threading

from tvm_upload.clock import Clock
from tvm_upload.cloudwatch import CloudWatchPublisher
from tvm_upload.config import Config
from tvm_upload.metrics import MetricsCollector
from tvm_upload.prometheus import PrometheusExporter
from tvm_upload.state import StateStore

logger = logging.getLogger(__name__)

TICK_SECONDS = 1.0
STOP_TIMEOUT_SECONDS = 25.0


class MetricsReporter:
    """Owns the CloudWatch publisher and the Prometheus exporter and drives them on a thread."""

    def __init__(self, config: Config, store: StateStore, clock: Clock) -> None:
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.publisher: CloudWatchPublisher | None = None
        if config.monitoring.cloudwatch_enabled:
            self.publisher = CloudWatchPublisher(config, store, clock)

        self.exporter = PrometheusExporter(
            config,
            MetricsCollector(config, store),
            clock,
            cloudwatch_published_at=self._published_at,
        )

    def _published_at(self) -> float | None:
        return self.publisher.last_success_at if self.publisher is not None else None

    def start(self) -> None:
        """Start the Prometheus endpoint (if enabled) and the metrics thread."""
        self.exporter.start()
        self._thread = threading.Thread(target=self._run, name="metrics", daemon=True)
        self._thread.start()

    def observe_upload(self, seconds: float, size_bytes: int) -> None:
        """Record one finished upload in the duration histogram."""
        self.exporter.observe_upload(seconds, size_bytes)

    def reconfigure(self, config: Config) -> None:
        """Apply a reloaded configuration to the publisher."""
        with self._lock:
            if self.publisher is not None:
                self.publisher.reconfigure(config)

    def _run(self) -> None:
        while not self._stop.wait(TICK_SECONDS):
            with self._lock:
                try:
                    if self.publisher is not None:
                        self.publisher.publish_due()
                    self.exporter.refresh_due()
                except Exception:
                    logger.exception("Metrics step failed; retrying in %.0f s", TICK_SECONDS)

    def stop(self) -> None:
        """Stop the thread (waiting for a CloudWatch call in progress) and the endpoint."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_SECONDS)
        self.exporter.stop()
