"""Prometheus exporter: scraped over real HTTP on 127.0.0.1, and the node_exporter textfile."""

from __future__ import annotations

import logging
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from metrics_support import VEHICLE_ID, FakeClock, free_port, identity, make_config
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from tvm_upload import __version__
from tvm_upload.config import Config
from tvm_upload.metrics import MetricsCollector, count_deletion, count_upload
from tvm_upload.prometheus import REFRESH_SECONDS, PrometheusExporter
from tvm_upload.state import StateStore

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    with StateStore(tmp_path / "state.db") as opened:
        yield opened


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def exporter_for(
    config: Config, store: StateStore, clock: FakeClock, published_at: float | None = None
) -> PrometheusExporter:
    return PrometheusExporter(
        config,
        MetricsCollector(config, store),
        clock,
        cloudwatch_published_at=lambda: published_at,
    )


@pytest.fixture
def served(tmp_path: Path, store: StateStore, clock: FakeClock) -> Iterator[PrometheusExporter]:
    config = make_config(
        tmp_path, monitoring__prometheus__enabled=True, monitoring__prometheus__port=free_port()
    )
    exporter = exporter_for(config, store, clock, published_at=1_799_999_000.0)
    assert exporter.start()
    yield exporter
    exporter.stop()


def scrape(exporter: PrometheusExporter) -> str:
    assert exporter.address is not None
    host, port = exporter.address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as response:
        text: str = response.read().decode()
        return text


def samples(text: str) -> Samples:
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_scrape_shows_counters_and_gauges(
    served: PrometheusExporter, store: StateStore, clock: FakeClock
) -> None:
    count_upload(store, 4096)
    count_deletion(store, "emergency", data_loss=True)
    store.enqueue("/logs/a.log", "ros", identity(1, size=700), "k/a", now=clock.wall - 30)

    served.refresh(clock.wall)
    found = samples(scrape(served))

    assert found[("tvm_upload_uploaded_bytes_total", ())] == 4096
    assert found[("tvm_upload_uploaded_files_total", ())] == 1
    assert found[("tvm_upload_upload_failures_total", ())] == 0
    assert found[("tvm_upload_data_loss_files_total", ())] == 1
    assert found[("tvm_upload_deleted_files_total", (("policy", "emergency"),))] == 1
    assert found[("tvm_upload_deleted_files_total", (("policy", "age"),))] == 0
    assert found[("tvm_upload_queue_files", ())] == 1
    assert found[("tvm_upload_queue_bytes", ())] == 700
    assert found[("tvm_upload_oldest_pending_age_seconds", ())] == 30
    assert found[("tvm_upload_cloudwatch_last_publish_timestamp_seconds", ())] == 1_799_999_000
    assert found[("tvm_upload_info", (("vehicle_id", VEHICLE_ID), ("version", __version__)))] == 1


def test_scrape_shows_disk_usage(served: PrometheusExporter, clock: FakeClock) -> None:
    served.refresh(clock.wall)

    disks = {
        labels: value
        for (name, labels), value in samples(scrape(served)).items()
        if name == "tvm_upload_disk_usage_ratio"
    }

    [(labels, ratio)] = disks.items()
    assert labels[0][0] == "mountpoint"
    assert 0.0 <= ratio <= 1.0


def test_upload_histogram(served: PrometheusExporter) -> None:
    served.observe_upload(0.3, 2_000)
    served.observe_upload(42.0, 500_000_000)

    found = samples(scrape(served))

    assert found[("tvm_upload_upload_duration_seconds_count", ())] == 2
    assert found[("tvm_upload_upload_duration_seconds_sum", ())] == pytest.approx(42.3)
    assert found[("tvm_upload_upload_duration_seconds_bucket", (("le", "0.5"),))] == 1
    assert found[("tvm_upload_upload_size_bytes_sum", ())] == 500_002_000


def test_before_first_refresh_only_info(served: PrometheusExporter) -> None:
    names = {name for name, _ in samples(scrape(served))}

    assert "tvm_upload_info" in names
    assert "tvm_upload_queue_files" not in names


def test_own_registry_only(served: PrometheusExporter, clock: FakeClock) -> None:
    served.refresh(clock.wall)

    names = {name for name, _ in samples(scrape(served))}

    assert all(name.startswith("tvm_upload_") for name in names)
    assert REGISTRY.get_sample_value("tvm_upload_queue_files") is None


def test_binds_loopback_only(served: PrometheusExporter) -> None:
    assert served.address is not None
    assert served.address[0] == "127.0.0.1"


def test_stop_closes_port(served: PrometheusExporter) -> None:
    assert served.address is not None
    port = served.address[1]

    served.stop()
    served.stop()

    assert served.address is None
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_port_in_use_logged_not_raised(
    tmp_path: Path, store: StateStore, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = make_config(
            tmp_path, monitoring__prometheus__enabled=True, monitoring__prometheus__port=port
        )
        exporter = exporter_for(config, store, clock)

        with caplog.at_level(logging.ERROR, logger="tvm_upload.prometheus"):
            started = exporter.start()

    assert started is False
    assert exporter.address is None
    assert f"Cannot serve Prometheus metrics on 127.0.0.1:{port}" in caplog.text


def test_disabled_does_nothing(tmp_path: Path, store: StateStore, clock: FakeClock) -> None:
    exporter = exporter_for(make_config(tmp_path), store, clock)

    assert exporter.enabled is False
    assert exporter.start() is False
    assert exporter.refresh_due() is False


def test_textfile_written_atomically(tmp_path: Path, store: StateStore, clock: FakeClock) -> None:
    textfile = tmp_path / "textfile" / "tvm_upload.prom"
    textfile.parent.mkdir()
    config = make_config(tmp_path, monitoring__prometheus__textfile_path=str(textfile))
    exporter = exporter_for(config, store, clock)
    count_upload(store, 1234)

    refreshed = exporter.refresh_due()

    found = samples(textfile.read_text())
    assert refreshed is True
    assert exporter.address is None
    assert found[("tvm_upload_uploaded_bytes_total", ())] == 1234
    assert found[("tvm_upload_queue_files", ())] == 0
    assert [path.name for path in textfile.parent.iterdir()] == ["tvm_upload.prom"]


def test_textfile_refresh_interval(tmp_path: Path, store: StateStore, clock: FakeClock) -> None:
    textfile = tmp_path / "tvm_upload.prom"
    config = make_config(tmp_path, monitoring__prometheus__textfile_path=str(textfile))
    exporter = exporter_for(config, store, clock)
    exporter.refresh_due()
    count_upload(store, 10)

    clock.advance(REFRESH_SECONDS - 1)
    early = exporter.refresh_due()
    before = samples(textfile.read_text())
    clock.advance(1)
    due = exporter.refresh_due()
    after = samples(textfile.read_text())

    assert early is False
    assert before[("tvm_upload_uploaded_bytes_total", ())] == 0
    assert due is True
    assert after[("tvm_upload_uploaded_bytes_total", ())] == 10


def test_textfile_failure_warns(
    tmp_path: Path, store: StateStore, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    textfile = tmp_path / "missing" / "tvm_upload.prom"
    config = make_config(tmp_path, monitoring__prometheus__textfile_path=str(textfile))
    exporter = exporter_for(config, store, clock)

    with caplog.at_level(logging.WARNING, logger="tvm_upload.prometheus"):
        exporter.refresh(clock.wall)

    assert not textfile.exists()
    assert f"Cannot write the Prometheus textfile {textfile}" in caplog.text


def test_closed_store_warns(
    tmp_path: Path, store: StateStore, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    config = make_config(tmp_path, monitoring__prometheus__textfile_path=str(tmp_path / "t.prom"))
    exporter = exporter_for(config, store, clock)
    store.close()

    with caplog.at_level(logging.WARNING, logger="tvm_upload.prometheus"):
        exporter.refresh(clock.wall)

    assert "Cannot read the Prometheus metrics" in caplog.text
