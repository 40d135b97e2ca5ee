"""Import of the older uploader's JSON queue and registry into the state store."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path

import pytest

from tvm_upload.files import FileIdentity
from tvm_upload.state import FileState, StateStore, legacy

START = 1_800_000_000.0
DAY_SECONDS = 86400.0


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    directory = tmp_path / "logs"
    directory.mkdir()
    return directory


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    with StateStore(tmp_path / "state.db", lambda: START) as opened:
        yield opened


def resolver(logs: Path) -> Callable[[Path], tuple[str, str] | None]:
    """Map paths under ``logs`` to source ros and a key made of the file name."""

    def resolve(path: Path) -> tuple[str, str] | None:
        if not path.is_relative_to(logs):
            return None
        return "ros", f"v1/2026-01-01/ros/{path.relative_to(logs)}"

    return resolve


def write_log(path: Path, content: str = "log line\n") -> Path:
    path.write_text(content)
    os.utime(path, ns=(1_700_000_000_123_456_789, 1_700_000_000_123_456_789))
    return path


def registry_entry(path: Path, processed_at: float = START - 100) -> tuple[str, dict[str, object]]:
    """Write one entry as the older uploader did: key path::size::mtime and its metadata."""
    st = path.stat()
    key = f"{path.resolve()}::{st.st_size}::{st.st_mtime}"
    meta = {
        "processed_at": processed_at,
        "size": st.st_size,
        "mtime": st.st_mtime,
        "filepath": str(path.resolve()),
        "filename": path.name,
    }
    return key, meta


def write_registry(
    path: Path, entries: Mapping[str, object], *, with_metadata: bool = True
) -> Path:
    data: object = dict(entries)
    if with_metadata:
        metadata = {"last_updated": "2026-12-01T10:00:00", "total_entries": len(entries)}
        data = {"_metadata": metadata, "files": entries}
    path.write_text(json.dumps(data, indent=2))
    return path


def write_queue(path: Path, files: list[Path], detected_at: str = "2026-11-30T15:30:00") -> Path:
    entries = [
        {"filepath": str(file), "size": 10, "detected_at": detected_at, "attempts": 3}
        for file in files
    ]
    path.write_text(json.dumps(entries, indent=2))
    return path


# Registry


def test_registry_entries_become_uploaded(tmp_path: Path, logs: Path, store: StateStore) -> None:
    unchanged = write_log(logs / "unchanged.log")
    registry = write_registry(tmp_path / "processed_files.json", dict([registry_entry(unchanged)]))

    imported = store.import_legacy(None, registry, resolver(logs), delete_after_seconds=DAY_SECONDS)

    assert imported == 1
    (record,) = store.files_in_state(FileState.UPLOADED)
    assert record.path == unchanged
    assert record.identity == FileIdentity.of(unchanged)
    assert record.object_key == "v1/2026-01-01/ros/unchanged.log"
    assert record.uploaded_at == START - 100
    assert record.delete_after == START - 100 + DAY_SECONDS
    assert store.is_registered(unchanged, FileIdentity.of(unchanged))
    assert not registry.exists()
    assert (tmp_path / "processed_files.json.imported").exists()


def test_registry_skips_changed_gone_and_outside(
    tmp_path: Path, logs: Path, store: StateStore, caplog: pytest.LogCaptureFixture
) -> None:
    changed = write_log(logs / "changed.log")
    gone = write_log(logs / "gone.log")
    outside = write_log(tmp_path / "outside.log")
    entries = dict(registry_entry(path) for path in (changed, gone, outside))
    registry = write_registry(tmp_path / "processed_files.json", entries)
    changed.write_text("more content than before\n")
    gone.unlink()

    with caplog.at_level(logging.INFO):
        imported = store.import_legacy(None, registry, resolver(logs))

    assert imported == 0
    assert store.summary(START).uploaded_count == 0
    assert "outside every configured log directory" in caplog.text
    assert "changed after that upload" in caplog.text
    assert "no longer exists" in caplog.text


def test_registry_without_metadata(tmp_path: Path, logs: Path, store: StateStore) -> None:
    unchanged = write_log(logs / "unchanged.log")
    key, _ = registry_entry(unchanged)
    registry = write_registry(
        tmp_path / "processed_files.json",
        {key: {"processed_at": START - 5}, "no-separators": {"processed_at": 1}},
        with_metadata=False,
    )

    assert store.import_legacy(None, registry, resolver(logs)) == 1
    (record,) = store.files_in_state(FileState.UPLOADED)
    assert record.path == unchanged
    assert record.delete_after is None


# Queue


def test_queue_entries_become_pending(
    tmp_path: Path, logs: Path, store: StateStore, caplog: pytest.LogCaptureFixture
) -> None:
    waiting = write_log(logs / "waiting.log")
    queue_file = write_queue(
        tmp_path / "queue.json", [waiting, logs / "gone.log", tmp_path / "elsewhere.log"]
    )

    with caplog.at_level(logging.INFO):
        imported = store.import_legacy(queue_file, None, resolver(logs))

    assert imported == 1
    (record,) = store.files_in_state(FileState.PENDING)
    assert record.path == waiting
    assert record.identity == FileIdentity.of(waiting)
    assert record.attempts == 0
    assert record.queued_at == datetime(2026, 11, 30, 15, 30).timestamp()
    assert "gone.log from the old queue: the file no longer exists" in caplog.text
    assert "elsewhere.log from the old queue: it is outside" in caplog.text
    assert (tmp_path / "queue.json.imported").exists()


def test_file_in_both_is_not_requeued(tmp_path: Path, logs: Path, store: StateStore) -> None:
    done = write_log(logs / "done.log")
    registry = write_registry(tmp_path / "processed_files.json", dict([registry_entry(done)]))
    queue_file = write_queue(tmp_path / "queue.json", [done])

    assert store.import_legacy(queue_file, registry, resolver(logs)) == 1

    summary = store.summary(START)
    assert summary.uploaded_count == 1
    assert summary.pending_count == 0


def test_damaged_queue_uses_backup(tmp_path: Path, logs: Path, store: StateStore) -> None:
    waiting = write_log(logs / "waiting.log")
    write_queue(tmp_path / "queue.json.bak", [waiting])
    (tmp_path / "queue.json").write_text('[{"filepath": "/var/log/half')

    assert store.import_legacy(tmp_path / "queue.json", None, resolver(logs)) == 1
    assert store.summary(START).pending_count == 1


def test_unreadable_files_stay_in_place(
    tmp_path: Path, logs: Path, store: StateStore, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "queue.json").write_text("{not json")
    (tmp_path / "processed_files.json").write_text('["a list, not a mapping"]')

    with caplog.at_level(logging.ERROR):
        imported = store.import_legacy(
            tmp_path / "queue.json", tmp_path / "processed_files.json", resolver(logs)
        )

    assert imported == 0
    assert (tmp_path / "queue.json").exists()
    assert (tmp_path / "processed_files.json").exists()
    assert "Did not import" in caplog.text
    assert "invalid format, expected a JSON object" in caplog.text


def test_missing_legacy_files(tmp_path: Path, logs: Path, store: StateStore) -> None:
    assert store.import_legacy(None, None, resolver(logs)) == 0
    assert store.import_legacy(tmp_path / "q.json", tmp_path / "r.json", resolver(logs)) == 0


# Idempotence


def test_import_again_after_crash_before_rename(
    tmp_path: Path, logs: Path, store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    done = write_log(logs / "done.log")
    waiting = write_log(logs / "waiting.log", "other content\n")
    registry = write_registry(tmp_path / "processed_files.json", dict([registry_entry(done)]))
    queue_file = write_queue(tmp_path / "queue.json", [waiting])
    shutil.copy(registry, tmp_path / "registry-copy.json")
    shutil.copy(queue_file, tmp_path / "queue-copy.json")

    def crash(path: Path) -> None:
        raise KeyboardInterrupt("simulated crash before the rename")

    monkeypatch.setattr(legacy, "_rename_imported", crash)
    with pytest.raises(KeyboardInterrupt):
        store.import_legacy(queue_file, registry, resolver(logs))
    monkeypatch.undo()

    assert store.import_legacy(queue_file, registry, resolver(logs)) == 1
    assert store.summary(START).uploaded_count == 1
    assert store.summary(START).pending_count == 1
    assert not queue_file.exists()
    assert not registry.exists()

    shutil.copy(tmp_path / "registry-copy.json", registry)
    shutil.copy(tmp_path / "queue-copy.json", queue_file)
    assert store.import_legacy(queue_file, registry, resolver(logs)) == 0
    summary = store.summary(START)
    assert (summary.uploaded_count, summary.pending_count) == (1, 1)
