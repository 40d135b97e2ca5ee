"""CloudWatch metrics: measured on a fixed interval, buffered in the state store, sent in batches.

Each measurement becomes metric data in the state store's ``metrics_buffer``
first, and a datum leaves the buffer only after a PutMetricData call that
carried it succeeded. So data measured while the vehicle is offline are
sent with their original timestamps when the network returns. The buffer
keeps the newest ``MAX_BUFFERED_DATA`` data, and data that CloudWatch would
reject for their age are dropped before sending.

CloudWatch is never needed to start: building a publisher makes no network
call and reads no credentials, and every failure is logged at WARNING
(rate-limited) and retried with backoff, so it never stops uploads.
"""

from __future__ import annotations

import datetime as dt
import logging
import random
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import boto3
from botocore.config import Config as BotocoreConfig
from botocore.exceptions import BotoCoreError, ClientError

from tvm_upload.backoff import backoff_seconds
from tvm_upload.clock import SYSTEM_CLOCK, Clock
from tvm_upload.config import Config
from tvm_upload.errors import StateStoreError, TvmUploadError
from tvm_upload.metrics import (
    BYTES_UPLOADED,
    DATA_LOSS_FILES,
    DELETION_POLICIES,
    FILES_UPLOADED,
    UPLOAD_FAILURES,
    CounterBaseline,
    MetricsCollector,
    MetricsSnapshot,
    WarningLimiter,
    files_deleted_counter,
)
from tvm_upload.s3client import THROTTLING_CODES, UploaderSettings, build_session
from tvm_upload.state import BufferedMetric, MetricDatum, StateStore

logger = logging.getLogger(__name__)

CloudWatchClient = Any
"""A botocore CloudWatch client; botocore ships no type stubs."""

# PutMetricData accepts at most 1000 metric data and 1 MB per request, according
# to the AWS CloudWatch API Reference (PutMetricData) and the botocore 1.44
# service model. Before 2022 the limits were 20 data and 40 KB. Half of each
# leaves room for endpoints with older limits and for our size estimate's error.
MAX_DATA_PER_REQUEST = 500
MAX_REQUEST_BYTES = 512 * 1024

MAX_BUFFERED_DATA = 50_000
"""Newest metric data kept while CloudWatch is unreachable, about 14 days of the
11 data measured every 300 s; older data are dropped first."""

# CloudWatch accepts timestamps up to two weeks in the past and two hours in the
# future. The margins cover the time a request spends in flight.
MAX_DATUM_AGE_SECONDS = 14 * 86400 - 3600
MAX_DATUM_AHEAD_SECONDS = 2 * 3600 - 600

RETRY_INITIAL_SECONDS = 10.0
MIN_RETRY_SECONDS = 1.0
WARNING_REPEAT_SECONDS = 3600.0
CONNECT_TIMEOUT_SECONDS = 5.0
READ_TIMEOUT_SECONDS = 15.0
BASELINE_PREFIX = "cloudwatch.reported."

# Errors that mean CloudWatch will never accept these data, so keeping them would
# block the buffer forever.
REJECTED_DATA_CODES = frozenset(
    {
        "InvalidParameterValue",
        "InvalidParameterValueException",
        "InvalidParameterCombination",
        "InvalidParameterCombinationException",
        "MissingParameter",
        "MissingRequiredParameterException",
    }
)


def cloudwatch_session(config: Config) -> boto3.Session:
    """Build the boto3 session of the S3 uploader, so s3.profile and s3.credentials_path apply."""
    return build_session(UploaderSettings.from_objects(config.s3, config.upload))


def build_cloudwatch_client(config: Config, *, endpoint_url: str | None = None) -> CloudWatchClient:
    """Create a CloudWatch client in ``s3.region``; China regions resolve to ``amazonaws.com.cn``.

    ``s3.endpoint_url`` does not apply, because it names an S3-compatible
    store; ``endpoint_url`` overrides the CloudWatch endpoint (tests, VPC
    endpoints). botocore makes one attempt per request, because the
    publisher retries from its buffer. Raises ``ConfigError`` when
    ``s3.profile`` does not exist.
    """
    client_config = BotocoreConfig(
        region_name=config.s3.region,
        retries={"mode": "standard", "total_max_attempts": 1},
        connect_timeout=CONNECT_TIMEOUT_SECONDS,
        read_timeout=READ_TIMEOUT_SECONDS,
    )
    return cloudwatch_session(config).client(
        "cloudwatch", endpoint_url=endpoint_url, config=client_config
    )


def metric_data(
    snapshot: MetricsSnapshot, deltas: Mapping[str, int], vehicle_id: str
) -> list[MetricDatum]:
    """Turn a snapshot and the counter deltas of its period into CloudWatch metric data.

    Every metric is included, zeros too, so that alarms see a value in each
    period. ``FilesDeleted`` has one datum per retention policy, with the
    extra dimension ``Policy``.
    """
    at = snapshot.measured_at
    vehicle = {"VehicleId": vehicle_id}

    def datum(name: str, value: float, unit: str, **extra: str) -> MetricDatum:
        return MetricDatum(name, float(value), unit, at, {**vehicle, **extra})

    data = [
        datum("BytesUploaded", deltas[BYTES_UPLOADED], "Bytes"),
        datum("FileCount", deltas[FILES_UPLOADED], "Count"),
        datum("FailureCount", deltas[UPLOAD_FAILURES], "Count"),
        datum("QueueDepth", snapshot.queue_files, "Count"),
        datum("QueueBytes", snapshot.queue_bytes, "Bytes"),
        datum("OldestPendingAgeSeconds", snapshot.oldest_pending_age_seconds, "Seconds"),
        datum("DiskUsagePercent", snapshot.disk_usage_percent, "Percent"),
        datum("DataLossFiles", deltas[DATA_LOSS_FILES], "Count"),
    ]
    for policy in DELETION_POLICIES:
        count = deltas[files_deleted_counter(policy)]
        data.append(datum("FilesDeleted", count, "Count", Policy=policy))
    return data


def api_datum(datum: MetricDatum) -> dict[str, Any]:
    """Return the PutMetricData form of a datum, its timestamp as an aware UTC datetime."""
    return {
        "MetricName": datum.name,
        "Value": datum.value,
        "Unit": datum.unit,
        "Timestamp": dt.datetime.fromtimestamp(datum.timestamp, dt.timezone.utc),
        "Dimensions": [
            {"Name": name, "Value": value} for name, value in sorted(datum.dimensions.items())
        ],
    }


def estimated_bytes(datum: MetricDatum) -> int:
    """Estimate the request bytes of one datum generously: its texts plus field overhead."""
    texts = [datum.name, datum.unit, *datum.dimensions.keys(), *datum.dimensions.values()]
    return 200 + sum(len(text.encode()) for text in texts)


def split_batches(
    rows: Iterable[BufferedMetric],
    *,
    max_data: int = MAX_DATA_PER_REQUEST,
    max_bytes: int = MAX_REQUEST_BYTES,
) -> list[list[BufferedMetric]]:
    """Split rows, in order, into batches within ``max_data`` data and ``max_bytes`` estimated."""
    batches: list[list[BufferedMetric]] = []
    batch: list[BufferedMetric] = []
    size = 0
    for row in rows:
        row_bytes = estimated_bytes(row.datum)
        if batch and (len(batch) >= max_data or size + row_bytes > max_bytes):
            batches.append(batch)
            batch, size = [], 0
        batch.append(row)
        size += row_bytes
    if batch:
        batches.append(batch)
    return batches


class MetricsSendError(TvmUploadError):
    """A PutMetricData call failed in a way that a later try may fix; the data stay buffered.

    ``code`` is the CloudWatch error code, or the botocore exception name
    when no response arrived.
    """

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(detail)
        self.code = code


class CloudWatchPublisher:
    """Measures metrics every ``monitoring.publish_interval_seconds`` and sends them to CloudWatch.

    The daemon calls ``publish_due`` from its loop; it returns at once when
    nothing is due. ``client_factory`` builds the client on first use and
    again after a failure, so rotated credentials are read; the default
    is ``build_cloudwatch_client(config)``. ``rng`` draws the backoff jitter.
    Not thread-safe: call it from one thread.
    """

    def __init__(
        self,
        config: Config,
        store: StateStore,
        clock: Clock = SYSTEM_CLOCK,
        client_factory: Callable[[], CloudWatchClient] | None = None,
        *,
        rng: random.Random | None = None,
        collector: MetricsCollector | None = None,
        max_buffered: int = MAX_BUFFERED_DATA,
        max_data_per_request: int = MAX_DATA_PER_REQUEST,
    ) -> None:
        self._config = config
        self._store = store
        self._clock = clock
        self._client_factory = client_factory or self._default_client
        self._rng = rng or random.Random()
        self._own_collector = collector is None
        self._collector = collector or MetricsCollector(config, store)
        self._baseline = CounterBaseline(store, BASELINE_PREFIX)
        self._max_buffered = max_buffered
        self._max_data_per_request = max_data_per_request
        self._warnings = WarningLimiter(logger, WARNING_REPEAT_SECONDS, clock.monotonic)

        self._client: CloudWatchClient | None = None
        self._next_measure_at: float | None = None
        self._retry_at = 0.0
        self._failures = 0
        self._unsent = True
        self.last_success_at: float | None = None
        """Wall-clock time of the last successful PutMetricData call, None before the first."""

        self._baseline.start()

    @property
    def interval_seconds(self) -> float:
        return self._config.monitoring.publish_interval_seconds

    def reconfigure(self, config: Config) -> None:
        """Use a reloaded configuration from the next measurement and the next call on.

        Buffered data keep their names and dimensions. A changed interval
        takes effect after the measurement already scheduled.
        """
        self._config = config
        self._client = None
        if self._own_collector:
            self._collector = MetricsCollector(config, self._store)

    def _default_client(self) -> CloudWatchClient:
        return build_cloudwatch_client(self._config)

    def publish_due(self, now: float | None = None) -> int:
        """Measure when the interval has passed, then send buffered data unless backing off.

        ``now`` is wall-clock seconds (default the clock's), the timestamp of
        a measurement; the interval and the backoff run on the monotonic
        clock. The first call measures at once. Returns how many data were
        sent. CloudWatch and state store failures are logged, never raised.
        """
        now = self._clock.time() if now is None else now
        monotonic = self._clock.monotonic()
        if self._next_measure_at is None or monotonic >= self._next_measure_at:
            self._next_measure_at = monotonic + self.interval_seconds
            self._measure_safely(now)

        if not self._unsent or monotonic < self._retry_at:
            return 0
        return self._send_safely(now)

    def measure(self, now: float) -> int:
        """Measure every metric at wall-clock ``now`` into the buffer; return how many data.

        The counter baselines move only after the data are buffered, so a
        crash in between reports that period's counts again instead of losing them.
        """
        snapshot = self._collector.collect(now)
        deltas = self._baseline.deltas(snapshot.totals)
        data = metric_data(snapshot, deltas, self._config.vehicle_id)

        dropped = self._store.buffer_metrics(data, self._max_buffered)
        self._baseline.commit(snapshot.totals)
        self._unsent = True
        if dropped:
            self._warnings.warn(
                "buffer full",
                "Dropped the %d oldest unsent CloudWatch metric data: the buffer keeps %d",
                dropped,
                self._max_buffered,
            )
        return len(data)

    def flush(self, now: float) -> int:
        """Send every buffered datum, oldest first, until the buffer is empty; return how many.

        Data that CloudWatch rejects for their timestamp or content are
        dropped with a WARNING. Raises ``MetricsSendError`` at the first call
        that fails otherwise; the data of that call and later ones stay buffered.
        """
        sent = 0
        while True:
            rows = self._store.peek_metrics(self._max_data_per_request)
            if not rows:
                self._unsent = False
                return sent

            fresh = self._drop_unacceptable(rows, now)
            for batch in split_batches(fresh, max_data=self._max_data_per_request):
                sent += self._send_batch(batch)

    def _measure_safely(self, now: float) -> None:
        try:
            self.measure(now)
        except (StateStoreError, OSError) as error:
            self._warnings.warn("measure", "Cannot measure the CloudWatch metrics: %s", error)

    def _send_safely(self, now: float) -> int:
        try:
            sent = self.flush(now)
        except MetricsSendError as error:
            self._back_off(error)
            return 0
        except StateStoreError as error:
            self._warnings.warn("store", "Cannot read the CloudWatch metrics buffer: %s", error)
            self._retry_at = self._clock.monotonic() + self.interval_seconds
            return 0

        self._on_success(sent)
        return sent

    def _drop_unacceptable(self, rows: list[BufferedMetric], now: float) -> list[BufferedMetric]:
        """Drop data whose timestamps CloudWatch rejects; return the others."""
        oldest, newest = now - MAX_DATUM_AGE_SECONDS, now + MAX_DATUM_AHEAD_SECONDS
        fresh = [row for row in rows if oldest <= row.datum.timestamp <= newest]
        if len(fresh) == len(rows):
            return fresh

        stale = [row.id for row in rows if not oldest <= row.datum.timestamp <= newest]
        self._store.drop_metrics(stale)
        self._warnings.warn(
            "stale",
            "Dropped %d buffered CloudWatch metric data with timestamps more than 14 days"
            " old or 2 hours ahead, which CloudWatch rejects",
            len(stale),
        )
        return fresh

    def _send_batch(self, batch: list[BufferedMetric]) -> int:
        try:
            client = self._client or self._client_factory()
            self._client = client
            client.put_metric_data(
                Namespace=self._config.monitoring.namespace,
                MetricData=[api_datum(row.datum) for row in batch],
            )
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code") or "Unknown")
            if code not in REJECTED_DATA_CODES:
                raise MetricsSendError(code, str(error)) from error
            self._warnings.warn(
                "rejected",
                "CloudWatch rejected %d metric data (%s); dropped them: %s",
                len(batch),
                code,
                error,
            )
            self._store.drop_metrics(row.id for row in batch)
            return 0
        except (BotoCoreError, TvmUploadError) as error:
            raise MetricsSendError(type(error).__name__, str(error)) from error

        self._store.drop_metrics(row.id for row in batch)
        self.last_success_at = self._clock.time()
        return len(batch)

    def _back_off(self, error: MetricsSendError) -> None:
        """Wait before the next try, doubling up to one publish interval, and warn."""
        self._client = None
        self._failures += 1
        delay = backoff_seconds(
            self._failures,
            initial_seconds=RETRY_INITIAL_SECONDS,
            cap_seconds=max(self.interval_seconds, RETRY_INITIAL_SECONDS),
            rng=self._rng,
        )
        delay = max(delay, MIN_RETRY_SECONDS)
        self._retry_at = self._clock.monotonic() + delay
        kind = "throttled" if error.code in THROTTLING_CODES else error.code
        self._warnings.warn(
            kind,
            "Cannot send metrics to CloudWatch (attempt %d): %s. They stay buffered;"
            " next try in %.0f s",
            self._failures,
            error,
            delay,
        )

    def _on_success(self, sent: int) -> None:
        if self._failures:
            logger.info(
                "Sent %d buffered metric data to CloudWatch after %d failed attempts",
                sent,
                self._failures,
            )
        self._failures = 0
        self._retry_at = 0.0
        self._warnings.reset()
