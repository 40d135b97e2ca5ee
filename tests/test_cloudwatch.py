"""CloudWatch publisher and alarms against moto in server mode over real HTTP."""

from __future__ import annotations

import datetime as dt
import http.server
import itertools
import json
import logging
import os
import random
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from metrics_support import VEHICLE_ID, FakeClock, free_port, identity, make_config

from tvm_upload.alarms import alarm_name, create_alarms, rounded_period, standard_alarms
from tvm_upload.cloudwatch import (
    MAX_DATA_PER_REQUEST,
    CloudWatchPublisher,
    build_cloudwatch_client,
    cloudwatch_session,
    metric_data,
    split_batches,
)
from tvm_upload.config import Config
from tvm_upload.errors import ConfigError
from tvm_upload.metrics import MetricsCollector, count_deletion, count_upload
from tvm_upload.state import BufferedMetric, MetricDatum, StateStore

NAMESPACE = "TVM/Upload"
INTERVAL = 300.0
STARTUP_TIMEOUT_SECONDS = 30.0
METRICS_PER_MEASUREMENT = 11


@pytest.fixture(scope="session")
def moto_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Start moto_server on a free loopback port for the session and stop it by its PID."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("moto") / "moto.log", "wb")  # noqa: SIM115
    binary = Path(sys.executable).with_name("moto_server")
    process = subprocess.Popen(
        [str(binary), "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_until_answers(endpoint, process)
        yield endpoint
    finally:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)
        log.close()


def _wait_until_answers(endpoint: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        assert process.poll() is None, "moto_server exited at start"
        try:
            with urllib.request.urlopen(endpoint + "/moto-api/", timeout=2):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.1)
    raise RuntimeError("moto_server did not answer within 30 s")


@pytest.fixture
def moto(moto_endpoint: str) -> str:
    """moto with no metrics and no alarms from earlier tests."""
    request = urllib.request.Request(moto_endpoint + "/moto-api/reset", method="POST")
    with urllib.request.urlopen(request, timeout=10):
        pass
    return moto_endpoint


@pytest.fixture
def clock() -> FakeClock:
    """Wall-clock time one hour ago, so every timestamp is one CloudWatch accepts."""
    return FakeClock(wall=float(int(time.time()) - 3600))


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return make_config(tmp_path, monitoring__cloudwatch_enabled=True)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    with StateStore(tmp_path / "state.db") as opened:
        yield opened


class Endpoint:
    """A client factory whose endpoint a test can switch, to take CloudWatch off and on line."""

    def __init__(self, config: Config, url: str) -> None:
        self.config = config
        self.url = url
        self.clients = 0

    def __call__(self) -> Any:
        self.clients += 1
        return build_cloudwatch_client(self.config, endpoint_url=self.url)


def closed_url() -> str:
    return f"http://127.0.0.1:{free_port()}"


def statistics(
    moto: str, config: Config, metric: str, around: float, **dimensions: str
) -> list[dict[str, Any]]:
    """Return moto's data points of ``metric`` within an hour of ``around``, oldest first."""
    client = build_cloudwatch_client(config, endpoint_url=moto)
    start = dt.datetime.fromtimestamp(around - 3600, dt.timezone.utc)
    end = dt.datetime.fromtimestamp(around + 3600, dt.timezone.utc)
    names = {"VehicleId": VEHICLE_ID, **dimensions}
    response = client.get_metric_statistics(
        Namespace=NAMESPACE,
        MetricName=metric,
        Dimensions=[{"Name": key, "Value": value} for key, value in names.items()],
        StartTime=start,
        EndTime=end,
        Period=60,
        Statistics=["Sum", "SampleCount"],
    )
    points: list[dict[str, Any]] = response["Datapoints"]
    return sorted(points, key=lambda point: point["Timestamp"])


def timestamps(points: list[dict[str, Any]]) -> list[float]:
    return [point["Timestamp"].timestamp() for point in points]


def buffered(store: StateStore) -> int:
    return len(store.peek_metrics(1_000_000))


# Measuring and sending.


def test_construction_makes_no_call(config: Config, store: StateStore, clock: FakeClock) -> None:
    def refuse() -> Any:
        raise AssertionError("the publisher built a client at construction")

    CloudWatchPublisher(config, store, clock, refuse)


def test_first_publish_sends_every_metric(
    moto: str, config: Config, store: StateStore, clock: FakeClock
) -> None:
    publisher = CloudWatchPublisher(config, store, clock, Endpoint(config, moto))

    sent = publisher.publish_due()

    client = build_cloudwatch_client(config, endpoint_url=moto)
    metrics = client.list_metrics(Namespace=NAMESPACE)["Metrics"]
    names = sorted({metric["MetricName"] for metric in metrics})
    policies = sorted(
        dimension["Value"]
        for metric in metrics
        for dimension in metric["Dimensions"]
        if dimension["Name"] == "Policy"
    )
    assert sent == METRICS_PER_MEASUREMENT
    assert names == [
        "BytesUploaded",
        "DataLossFiles",
        "DiskUsagePercent",
        "FailureCount",
        "FileCount",
        "FilesDeleted",
        "OldestPendingAgeSeconds",
        "QueueBytes",
        "QueueDepth",
    ]
    assert policies == ["after_upload", "age", "emergency"]
    assert publisher.last_success_at == clock.wall
    assert buffered(store) == 0


def test_zeros_published(moto: str, config: Config, store: StateStore, clock: FakeClock) -> None:
    publisher = CloudWatchPublisher(config, store, clock, Endpoint(config, moto))

    publisher.publish_due()

    [point] = statistics(moto, config, "FileCount", clock.wall)
    [deleted] = statistics(moto, config, "FilesDeleted", clock.wall, Policy="emergency")
    assert point["Sum"] == 0.0
    assert point["SampleCount"] == 1.0
    assert deleted["Sum"] == 0.0


def test_counters_published_as_period_deltas(
    moto: str, config: Config, store: StateStore, clock: FakeClock
) -> None:
    publisher = CloudWatchPublisher(config, store, clock, Endpoint(config, moto))
    first_at = clock.wall

    count_upload(store, 1000)
    count_deletion(store, "emergency", data_loss=True)
    publisher.publish_due()
    clock.advance(INTERVAL)
    count_upload(store, 500)
    publisher.publish_due()

    uploaded = statistics(moto, config, "BytesUploaded", first_at)
    lost = statistics(moto, config, "DataLossFiles", first_at)
    assert [point["Sum"] for point in uploaded] == [1000.0, 500.0]
    assert timestamps(uploaded) == [first_at, first_at + INTERVAL]
    assert [point["Sum"] for point in lost] == [1.0, 0.0]


def test_queue_gauges_published(
    moto: str, config: Config, store: StateStore, clock: FakeClock
) -> None:
    store.enqueue("/logs/a.log", "ros", identity(1, size=2048), "k/a", now=clock.wall - 120)
    publisher = CloudWatchPublisher(config, store, clock, Endpoint(config, moto))

    publisher.publish_due()

    [depth] = statistics(moto, config, "QueueDepth", clock.wall)
    [size] = statistics(moto, config, "QueueBytes", clock.wall)
    [age] = statistics(moto, config, "OldestPendingAgeSeconds", clock.wall)
    assert depth["Sum"] == 1.0
    assert size["Sum"] == 2048.0
    assert age["Sum"] == 120.0


def test_nothing_due_between_intervals(config: Config, store: StateStore, clock: FakeClock) -> None:
    factory = Endpoint(config, closed_url())
    publisher = CloudWatchPublisher(config, store, clock, factory, max_data_per_request=100)
    publisher.publish_due()
    clock.advance(INTERVAL)
    publisher.publish_due()
    measured = buffered(store)

    clock.advance(INTERVAL / 2)
    publisher.publish_due()

    assert measured == 2 * METRICS_PER_MEASUREMENT
    assert buffered(store) == measured


def test_batches_within_request_limit(
    moto: str, config: Config, store: StateStore, clock: FakeClock
) -> None:
    rows = [
        MetricDatum(
            "Synthetic", float(i), "Count", clock.wall - 1200 + i, {"VehicleId": VEHICLE_ID}
        )
        for i in range(1200)
    ]
    store.buffer_metrics(rows, 10_000)
    client = build_cloudwatch_client(config, endpoint_url=moto)
    sizes: list[int] = []
    client.meta.events.register(
        "before-parameter-build.cloudwatch.PutMetricData",
        lambda params, **_: sizes.append(len(params["MetricData"])),
    )
    publisher = CloudWatchPublisher(config, store, clock, lambda: client)

    sent = publisher.flush(clock.wall)

    points = statistics(moto, config, "Synthetic", clock.wall - 600)
    assert sent == 1200
    assert sizes == [MAX_DATA_PER_REQUEST, MAX_DATA_PER_REQUEST, 200]
    assert sum(point["SampleCount"] for point in points) == 1200
    assert buffered(store) == 0


def test_split_batches_by_estimated_size() -> None:
    rows = [
        BufferedMetric(i, MetricDatum("M" * 100, 1.0, "Count", 0.0, {"VehicleId": "v"}))
        for i in range(10)
    ]

    batches = split_batches(rows, max_data=4, max_bytes=700)

    assert [len(batch) for batch in batches] == [2, 2, 2, 2, 2]
    assert [row.id for batch in batches for row in batch] == list(range(10))


def test_split_batches_by_count() -> None:
    rows = [BufferedMetric(i, MetricDatum("M", 1.0, "Count", 0.0)) for i in range(9)]

    assert [len(batch) for batch in split_batches(rows, max_data=4)] == [4, 4, 1]


# Offline buffering.


def test_offline_data_sent_later_with_timestamps(
    moto: str, config: Config, store: StateStore, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    """Given CloudWatch unreachable for three measurements, when it returns, all are sent."""
    factory = Endpoint(config, closed_url())
    publisher = CloudWatchPublisher(config, store, clock, factory)
    measured_at = []

    with caplog.at_level(logging.WARNING, logger="tvm_upload.cloudwatch"):
        for _ in range(3):
            measured_at.append(clock.wall)
            assert publisher.publish_due() == 0
            clock.advance(INTERVAL)
    held = buffered(store)
    factory.url = moto
    sent = publisher.publish_due()

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert held == 3 * METRICS_PER_MEASUREMENT
    assert sent == 4 * METRICS_PER_MEASUREMENT
    assert timestamps(statistics(moto, config, "QueueDepth", measured_at[1])) == [
        *measured_at,
        clock.wall,
    ]
    assert len(warnings) == 1
    assert "stay buffered" in warnings[0].getMessage()
    assert buffered(store) == 0


def test_buffer_survives_restart(
    moto: str, config: Config, tmp_path: Path, clock: FakeClock
) -> None:
    path = tmp_path / "restart.db"
    with StateStore(path) as store:
        offline = CloudWatchPublisher(config, store, clock, Endpoint(config, closed_url()))
        offline.publish_due()
    measured_at = clock.wall
    clock.advance(60)

    with StateStore(path) as reopened:
        online = CloudWatchPublisher(config, reopened, clock, Endpoint(config, moto))
        sent = online.publish_due()

    assert sent == 2 * METRICS_PER_MEASUREMENT
    assert timestamps(statistics(moto, config, "FileCount", measured_at)) == [
        measured_at,
        clock.wall,
    ]


def test_bounded_buffer_drops_oldest(
    moto: str, config: Config, store: StateStore, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    factory = Endpoint(config, closed_url())
    publisher = CloudWatchPublisher(config, store, clock, factory, max_buffered=25)
    measured_at = []

    with caplog.at_level(logging.WARNING, logger="tvm_upload.cloudwatch"):
        for _ in range(4):
            measured_at.append(clock.wall)
            publisher.publish_due()
            clock.advance(INTERVAL)
    held = buffered(store)
    factory.url = moto
    publisher.flush(clock.wall)

    depth = timestamps(statistics(moto, config, "QueueDepth", measured_at[2]))
    assert held == 25
    assert depth == measured_at[2:]
    assert any("Dropped the" in r.getMessage() for r in caplog.records)


def test_stale_data_dropped(
    moto: str, config: Config, store: StateStore, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    old = MetricDatum("Stale", 1.0, "Count", clock.wall - 15 * 86400, {"VehicleId": VEHICLE_ID})
    ahead = MetricDatum("Stale", 1.0, "Count", clock.wall + 3 * 3600, {"VehicleId": VEHICLE_ID})
    store.buffer_metrics([old, ahead], 100)
    publisher = CloudWatchPublisher(config, store, clock, Endpoint(config, moto))

    with caplog.at_level(logging.WARNING, logger="tvm_upload.cloudwatch"):
        sent = publisher.flush(clock.wall)

    client = build_cloudwatch_client(config, endpoint_url=moto)
    assert sent == 0
    assert client.list_metrics(Namespace=NAMESPACE)["Metrics"] == []
    assert buffered(store) == 0
    assert "Dropped 2 buffered" in caplog.text


def test_client_error_never_raises(
    config: Config, store: StateStore, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> Any:
        raise ConfigError(["s3.profile: profile 'china' not found"])

    publisher = CloudWatchPublisher(config, store, clock, broken)

    with caplog.at_level(logging.WARNING, logger="tvm_upload.cloudwatch"):
        sent = publisher.publish_due()

    assert sent == 0
    assert buffered(store) == METRICS_PER_MEASUREMENT
    assert "profile 'china' not found" in caplog.text


# Throttling and rejected data, from a small local server that responds like CloudWatch.


class FakeCloudWatch(http.server.ThreadingHTTPServer):
    """Responds to every request with one CloudWatch error in the JSON protocol, and counts them."""

    def __init__(self, code: str) -> None:
        super().__init__(("127.0.0.1", 0), _ErrorHandler)
        self.code = code
        self.requests = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_port}"


class _ErrorHandler(http.server.BaseHTTPRequestHandler):
    server: FakeCloudWatch

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.requests += 1
        body = json.dumps({"__type": self.server.code, "message": "Rate exceeded"}).encode()
        self.send_response(400)
        self.send_header("Content-Type", "application/x-amz-json-1.0")
        self.send_header("x-amzn-query-error", f"{self.server.code};Sender")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def fake_cloudwatch() -> Iterator[Callable[[str], FakeCloudWatch]]:
    servers: list[FakeCloudWatch] = []

    def start(code: str) -> FakeCloudWatch:
        server = FakeCloudWatch(code)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


class CeilingRandom(random.Random):
    """Draws the upper bound every time, so backoff delays are their ceilings."""

    def uniform(self, a: float, b: float) -> float:
        return b


def test_throttling_backs_off(
    config: Config,
    store: StateStore,
    clock: FakeClock,
    fake_cloudwatch: Callable[[str], FakeCloudWatch],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = fake_cloudwatch("Throttling")
    factory = Endpoint(config, server.url)
    publisher = CloudWatchPublisher(config, store, clock, factory, rng=CeilingRandom())
    requests_at = []

    with caplog.at_level(logging.WARNING, logger="tvm_upload.cloudwatch"):
        for _ in range(80):
            before = server.requests
            publisher.publish_due()
            if server.requests > before:
                requests_at.append(clock.mono)
            clock.advance(5)

    gaps = [later - earlier for earlier, later in itertools.pairwise(requests_at)]
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert gaps[:4] == [10, 20, 40, 80]
    assert all(gap <= INTERVAL for gap in gaps)
    assert buffered(store) == 2 * METRICS_PER_MEASUREMENT
    assert len(warnings) == 1
    assert "Throttling" in warnings[0].getMessage()


def test_rejected_data_dropped(
    config: Config,
    store: StateStore,
    clock: FakeClock,
    fake_cloudwatch: Callable[[str], FakeCloudWatch],
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = fake_cloudwatch("InvalidParameterValue")
    publisher = CloudWatchPublisher(config, store, clock, Endpoint(config, server.url))

    with caplog.at_level(logging.WARNING, logger="tvm_upload.cloudwatch"):
        sent = publisher.publish_due()

    assert sent == 0
    assert server.requests == 1
    assert buffered(store) == 0
    assert "CloudWatch rejected 11 metric data (InvalidParameterValue)" in caplog.text


# Clients, sessions and metric data.


@pytest.mark.parametrize("region", ["cn-north-1", "cn-northwest-1"])
def test_china_region_endpoint(tmp_path: Path, region: str) -> None:
    config = make_config(tmp_path, s3__region=region)

    client = build_cloudwatch_client(config)

    assert client.meta.endpoint_url == f"https://monitoring.{region}.amazonaws.com.cn"


def test_session_honours_profile_and_credentials_path(tmp_path: Path) -> None:
    directory = tmp_path / "aws"
    directory.mkdir()
    (directory / "credentials").write_text(
        "[china]\naws_access_key_id = AKIAPROFILEKEY\naws_secret_access_key = profile-secret\n"
    )
    (directory / "config").write_text("[profile china]\nregion = cn-north-1\n")
    config = make_config(tmp_path, s3__profile="china", s3__credentials_path=str(directory))

    credentials = cloudwatch_session(config).get_credentials()

    assert credentials is not None
    assert credentials.access_key == "AKIAPROFILEKEY"
    assert credentials.method == "shared-credentials-file"


def test_metric_data_units_and_dimensions(
    config: Config, store: StateStore, clock: FakeClock
) -> None:
    snapshot = MetricsCollector(config, store).collect(clock.wall)
    deltas = dict.fromkeys(snapshot.totals, 3)

    data = metric_data(snapshot, deltas, VEHICLE_ID)

    units = {datum.name: datum.unit for datum in data}
    assert units == {
        "BytesUploaded": "Bytes",
        "FileCount": "Count",
        "FailureCount": "Count",
        "QueueDepth": "Count",
        "QueueBytes": "Bytes",
        "OldestPendingAgeSeconds": "Seconds",
        "DiskUsagePercent": "Percent",
        "DataLossFiles": "Count",
        "FilesDeleted": "Count",
    }
    assert all(datum.timestamp == clock.wall for datum in data)
    assert all(datum.dimensions["VehicleId"] == VEHICLE_ID for datum in data)
    assert len(data) == METRICS_PER_MEASUREMENT


# Alarms.


def describe(client: Any) -> dict[str, dict[str, Any]]:
    alarms = client.describe_alarms()["MetricAlarms"]
    return {alarm["AlarmName"]: alarm for alarm in alarms}


def test_create_alarms_idempotent(moto: str, config: Config) -> None:
    client = build_cloudwatch_client(config, endpoint_url=moto)

    first_names = create_alarms(config, client)
    first = describe(client)
    second_names = create_alarms(config, client)
    second = describe(client)

    assert first_names == second_names
    assert sorted(first) == sorted(second) == sorted(first_names)
    assert len(first) == 5
    assert all(name.startswith(f"{VEHICLE_ID}-") for name in first)
    for name, alarm in second.items():
        assert alarm["Namespace"] == NAMESPACE, name
        assert alarm["Dimensions"] == [{"Name": "VehicleId", "Value": VEHICLE_ID}], name


def test_standard_alarm_settings(moto: str, config: Config) -> None:
    client = build_cloudwatch_client(config, endpoint_url=moto)
    create_alarms(config, client)
    alarms = {alarm["MetricName"]: alarm for alarm in describe(client).values()}

    no_upload = alarms["FileCount"]
    assert (no_upload["Statistic"], no_upload["Period"]) == ("Sum", 86400)
    assert no_upload["ComparisonOperator"] == "LessThanThreshold"
    assert no_upload["Threshold"] == 1
    assert no_upload["TreatMissingData"] == "breaching"
    assert alarms["FailureCount"]["ComparisonOperator"] == "GreaterThanThreshold"
    assert alarms["FailureCount"]["Threshold"] == 0
    assert alarms["DiskUsagePercent"]["Threshold"] == 90.0
    assert alarms["DiskUsagePercent"]["ComparisonOperator"] == "GreaterThanOrEqualToThreshold"
    assert alarms["DataLossFiles"]["Threshold"] == 0
    assert alarms["BytesUploaded"]["Threshold"] == 100 * 1024 * 1024
    assert alarms["BytesUploaded"]["EvaluationPeriods"] == 3


def test_alarms_notify_sns_topic(moto: str, config: Config) -> None:
    topic = "arn:aws-cn:sns:cn-north-1:123456789012:vehicle-alarms"
    client = build_cloudwatch_client(config, endpoint_url=moto)

    create_alarms(config, client, sns_topic_arn=topic)

    for alarm in describe(client).values():
        assert alarm["AlarmActions"] == [topic]
        assert alarm["OKActions"] == [topic]


def test_alarm_names_and_periods(tmp_path: Path) -> None:
    config = make_config(tmp_path, monitoring__publish_interval_seconds=90)

    specs = {spec.metric: spec for spec in standard_alarms(config)}

    assert alarm_name(VEHICLE_ID, specs["FileCount"]) == f"{VEHICLE_ID}-tvm-upload-no-upload-24h"
    assert specs["FailureCount"].period_seconds == 120
    assert rounded_period(300) == 300
    assert rounded_period(1) == 60


def test_low_upload_alarm_optional(tmp_path: Path) -> None:
    config = make_config(tmp_path, monitoring__low_upload_threshold_mb=0)

    metrics = [spec.metric for spec in standard_alarms(config)]

    assert "BytesUploaded" not in metrics
    assert len(metrics) == 4


def test_low_upload_periods_capped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = make_config(tmp_path, monitoring__alarm_evaluation_periods=10)

    with caplog.at_level(logging.WARNING, logger="tvm_upload.alarms"):
        specs = {spec.metric: spec for spec in standard_alarms(config)}

    assert specs["BytesUploaded"].evaluation_periods == 7
    assert "at most 7 daily periods" in caplog.text


def test_reconfigure_changes_namespace(
    moto: str, tmp_path: Path, config: Config, store: StateStore, clock: FakeClock
) -> None:
    publisher = CloudWatchPublisher(config, store, clock, Endpoint(config, moto))
    publisher.publish_due()
    reloaded = make_config(
        tmp_path, monitoring__cloudwatch_enabled=True, monitoring__namespace="Fleet/Upload"
    )

    publisher.reconfigure(reloaded)
    clock.advance(INTERVAL)
    sent = publisher.publish_due()

    client = build_cloudwatch_client(config, endpoint_url=moto)
    assert sent == METRICS_PER_MEASUREMENT
    assert len(client.list_metrics(Namespace="Fleet/Upload")["Metrics"]) == METRICS_PER_MEASUREMENT
