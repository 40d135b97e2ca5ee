"""Prometheus metrics: an HTTP endpoint on 127.0.0.1, a node_exporter textfile, or both.

The exporter keeps its own ``CollectorRegistry``, never the library's global
one, so nothing is exposed that tvm-upload did not define. The figures come
from the latest ``MetricsSnapshot``, refreshed by the daemon every
``REFRESH_SECONDS``; upload durations and sizes are observed as uploads finish.
Counters are the cumulative totals of the state store, so they continue
across restarts.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Histogram, start_http_server, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tvm_upload import __version__
from tvm_upload.clock import SYSTEM_CLOCK, Clock
from tvm_upload.config import PROMETHEUS_BIND_ADDRESS, Config
from tvm_upload.errors import StateStoreError
from tvm_upload.metrics import (
    BYTES_UPLOADED,
    DATA_LOSS_FILES,
    DELETION_POLICIES,
    FILES_UPLOADED,
    UPLOAD_FAILURES,
    MetricsCollector,
    MetricsSnapshot,
    WarningLimiter,
    files_deleted_counter,
)

logger = logging.getLogger(__name__)

REFRESH_SECONDS = 15.0
WARNING_REPEAT_SECONDS = 3600.0
PREFIX = "tvm_upload"

DURATION_BUCKETS_SECONDS = (0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
SIZE_BUCKETS_BYTES = (1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11)


class SnapshotCollector(Collector):
    """Exposes the latest snapshot and CloudWatch publish time as metric families.

    ``update`` replaces the snapshot in one assignment, so a scrape on the
    HTTP server's thread reads either the old or the new one whole.
    """

    def __init__(self, vehicle_id: str) -> None:
        self._vehicle_id = vehicle_id
        self._snapshot: MetricsSnapshot | None = None
        self._published_at: float | None = None

    def update(self, snapshot: MetricsSnapshot, cloudwatch_published_at: float | None) -> None:
        self._snapshot = snapshot
        self._published_at = cloudwatch_published_at

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            f"{PREFIX}_info", "tvm-upload version and vehicle id", labels=["vehicle_id", "version"]
        )
        info.add_metric([self._vehicle_id, __version__], 1)
        yield info

        snapshot = self._snapshot
        if snapshot is not None:
            yield from _counter_families(snapshot)
            yield from _gauge_families(snapshot)
        if self._published_at is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_cloudwatch_last_publish_timestamp_seconds",
                "Wall-clock time of the last successful PutMetricData call",
                value=self._published_at,
            )


def _counter_families(snapshot: MetricsSnapshot) -> Iterator[Metric]:
    totals = snapshot.totals

    def counter(name: str, documentation: str, counter_name: str) -> CounterMetricFamily:
        return CounterMetricFamily(
            f"{PREFIX}_{name}", documentation, value=totals.get(counter_name, 0)
        )

    yield counter("uploaded_bytes", "Bytes of log files uploaded", BYTES_UPLOADED)
    yield counter("uploaded_files", "Log files uploaded", FILES_UPLOADED)
    yield counter("upload_failures", "Upload attempts that failed", UPLOAD_FAILURES)
    yield counter("data_loss_files", "Log files deleted before their upload", DATA_LOSS_FILES)

    deleted = CounterMetricFamily(
        f"{PREFIX}_deleted_files", "Local log files deleted by retention", labels=["policy"]
    )
    for policy in DELETION_POLICIES:
        deleted.add_metric([policy], totals.get(files_deleted_counter(policy), 0))
    yield deleted


def _gauge_families(snapshot: MetricsSnapshot) -> Iterator[Metric]:
    yield GaugeMetricFamily(
        f"{PREFIX}_queue_files", "Log files not uploaded yet", value=snapshot.queue_files
    )
    yield GaugeMetricFamily(
        f"{PREFIX}_queue_bytes", "Bytes of log files not uploaded yet", value=snapshot.queue_bytes
    )
    yield GaugeMetricFamily(
        f"{PREFIX}_oldest_pending_age_seconds",
        "Age of the oldest log file not uploaded yet",
        value=snapshot.oldest_pending_age_seconds,
    )

    disk = GaugeMetricFamily(
        f"{PREFIX}_disk_usage_ratio",
        "Used fraction of a filesystem holding a watched directory, as df computes it",
        labels=["mountpoint"],
    )
    for usage in snapshot.disks:
        disk.add_metric([usage.mount_point], usage.used_fraction)
    yield disk


class PrometheusExporter:
    """Serves the metrics on 127.0.0.1 and writes the textfile, as configured.

    ``start`` binds the HTTP server when ``monitoring.prometheus.enabled``;
    ``refresh_due`` (or ``refresh``) takes a new snapshot and rewrites
    ``monitoring.prometheus.textfile_path`` when set. ``cloudwatch_published_at``
    returns the time of the last CloudWatch publication, or None.
    ``observe_upload`` is thread-safe; call the other methods from one thread.
    """

    def __init__(
        self,
        config: Config,
        collector: MetricsCollector,
        clock: Clock = SYSTEM_CLOCK,
        *,
        cloudwatch_published_at: Callable[[], float | None] = lambda: None,
    ) -> None:
        self._settings = config.monitoring.prometheus
        self._collector = collector
        self._clock = clock
        self._published_at = cloudwatch_published_at
        self._warnings = WarningLimiter(logger, WARNING_REPEAT_SECONDS, clock.monotonic)
        self._next_refresh_at: float | None = None
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

        self.registry = CollectorRegistry(auto_describe=False)
        self._snapshot = SnapshotCollector(config.vehicle_id)
        self.registry.register(self._snapshot)
        self._durations = Histogram(
            f"{PREFIX}_upload_duration_seconds",
            "Time to upload one log file, from its first read to the confirmed object",
            buckets=DURATION_BUCKETS_SECONDS,
            registry=self.registry,
        )
        self._sizes = Histogram(
            f"{PREFIX}_upload_size_bytes",
            "Size of each uploaded log file",
            buckets=SIZE_BUCKETS_BYTES,
            registry=self.registry,
        )

    @property
    def enabled(self) -> bool:
        """True when the configuration enables the HTTP endpoint or the textfile."""
        return self._settings.enabled or self._settings.textfile_path is not None

    @property
    def address(self) -> tuple[str, int] | None:
        """The bound address and TCP port, None while the server is not running."""
        if self._server is None:
            return None
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self) -> bool:
        """Start the HTTP server on 127.0.0.1 if enabled; return whether it runs.

        A port in use is logged at ERROR and the daemon goes on without the
        endpoint, because metrics must never stop uploads.
        """
        if not self._settings.enabled or self._server is not None:
            return self._server is not None

        port = self._settings.port
        try:
            self._server, self._thread = start_http_server(
                port, addr=PROMETHEUS_BIND_ADDRESS, registry=self.registry
            )
        except OSError as error:
            logger.error(
                "Cannot serve Prometheus metrics on %s:%d: %s. Choose a free port in"
                " monitoring.prometheus.port; uploads continue without the endpoint",
                PROMETHEUS_BIND_ADDRESS,
                port,
                error,
            )
            return False

        logger.info(
            "Serving Prometheus metrics on http://%s:%d/metrics", PROMETHEUS_BIND_ADDRESS, port
        )
        return True

    def stop(self) -> None:
        """Stop the HTTP server and wait for its thread; safe to call twice."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        self._server = None
        self._thread = None

    def observe_upload(self, seconds: float, size_bytes: int) -> None:
        """Record one finished upload: its duration in seconds and its size in bytes."""
        self._durations.observe(seconds)
        self._sizes.observe(size_bytes)

    def refresh_due(self, now: float | None = None) -> bool:
        """Refresh when ``REFRESH_SECONDS`` passed on the monotonic clock; return whether it did."""
        if not self.enabled:
            return False
        monotonic = self._clock.monotonic()
        if self._next_refresh_at is not None and monotonic < self._next_refresh_at:
            return False

        self._next_refresh_at = monotonic + REFRESH_SECONDS
        self.refresh(self._clock.time() if now is None else now)
        return True

    def refresh(self, now: float) -> None:
        """Take a snapshot at wall-clock ``now`` and rewrite the textfile; failures only warn."""
        try:
            snapshot = self._collector.collect(now)
        except (StateStoreError, OSError) as error:
            self._warnings.warn("collect", "Cannot read the Prometheus metrics: %s", error)
            return

        self._snapshot.update(snapshot, self._published_at())
        if self._settings.textfile_path is not None:
            self.write_textfile(self._settings.textfile_path)

    def write_textfile(self, path: Path) -> None:
        """Write every metric to ``path`` atomically: a temporary file renamed over it."""
        try:
            write_to_textfile(str(path), self.registry)
        except OSError as error:
            self._warnings.warn(
                "textfile",
                "Cannot write the Prometheus textfile %s: %s. Check that its directory"
                " exists and is writable (ReadWritePaths in the service unit)",
                path,
                error,
            )
