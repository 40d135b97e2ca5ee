"""State store: ``unknown_paths``, the lookup of many scanned files at once."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tvm_upload.files import FileIdentity
from tvm_upload.state import EnqueueResult, FileState, StateStore
from tvm_upload.state.registry import LOOKUP_FILES, FileVersion

START = 1_800_000_000.0


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    with StateStore(tmp_path / "state.db", lambda: START) as opened:
        yield opened


def identity(number: int) -> FileIdentity:
    return FileIdentity(device=7, inode=number, size=100 + number, mtime_ns=number * 1_000)


def version(path: str, file_identity: FileIdentity) -> FileVersion:
    return (
        path,
        file_identity.device,
        file_identity.inode,
        file_identity.size,
        file_identity.mtime_ns,
    )


def add_row(
    store: StateStore, path: str, file_identity: FileIdentity, state: FileState = FileState.PENDING
) -> None:
    """Queue ``path`` and move its row to ``state`` through the store's own methods."""
    result = store.enqueue(path, "logs", file_identity, f"v1/2026-01-01/logs/{path}")
    assert result is EnqueueResult.QUEUED
    if state is FileState.PENDING:
        return

    [record] = store.claim_paths([Path(path)], START)
    if state is FileState.FAILED:
        store.mark_failed(record.id, "HTTP 500")
    elif state in (FileState.UPLOADED, FileState.DELETED):
        store.mark_uploaded(record.id, "0" * 64, START, None, file_identity)
        if state is FileState.DELETED:
            assert store.mark_deleted(record.id, START)

    stored = store.record_for(path)
    assert stored is not None
    assert stored.state is state


def test_unknown_paths_empty_input(store: StateStore) -> None:
    assert store.unknown_paths([]) == []


def test_unknown_paths_rows_in_every_state(store: StateStore) -> None:
    versions = []
    for number, state in enumerate(FileState):
        path = f"/logs/{state.value}.log"
        add_row(store, path, identity(number), state)
        versions.append(version(path, identity(number)))

    assert store.unknown_paths(versions) == []


@pytest.mark.parametrize("changed", ["device", "inode", "size", "mtime_ns"])
@pytest.mark.parametrize("state", list(FileState))
def test_unknown_paths_changed_identity(store: StateStore, changed: str, state: FileState) -> None:
    add_row(store, "/logs/a.log", identity(1), state)
    values = {
        "device": 7,
        "inode": 1,
        "size": 101,
        "mtime_ns": 1_000,
    }
    values[changed] += 1

    scanned = ("/logs/a.log", values["device"], values["inode"], values["size"], values["mtime_ns"])

    assert store.unknown_paths([scanned]) == ["/logs/a.log"]
    assert not store.is_known("/logs/a.log", FileIdentity(**values))


def test_unknown_paths_new_file(store: StateStore) -> None:
    add_row(store, "/logs/a.log", identity(1))

    unknown = store.unknown_paths(
        [version("/logs/a.log", identity(1)), version("/logs/b.log", identity(2))]
    )

    assert unknown == ["/logs/b.log"]


def test_unknown_paths_siblings_with_shared_prefix(store: StateStore) -> None:
    # ' ' sorts before '/', '0' right after it, and '%' and '_' are LIKE wildcards:
    # none of them may let a row of one directory count for another one.
    directories = ["/logs/a", "/logs/a b", "/logs/a0", "/logs/a.", "/logs/a%", "/logs/a_"]
    for number, directory in enumerate(directories):
        add_row(store, f"{directory}/x.log", identity(number), FileState.UPLOADED)

    for number, directory in enumerate(directories):
        others = [d for d in directories if d != directory]
        scanned = [version(f"{other}/x.log", identity(number)) for other in others]
        known = version(f"{directory}/x.log", identity(number))

        assert store.unknown_paths([known, *scanned]) == [v[0] for v in scanned]


def test_unknown_paths_wildcard_and_odd_names(store: StateStore) -> None:
    names = ["100%.log", "a_b.log", "a%b.log", "x*y?.log", "\u00e9t\u00e9.log", "tab\tname.log"]
    for number, name in enumerate(names):
        add_row(store, f"/logs/{name}", identity(number), FileState.UPLOADED)

    lookalikes = ["100x.log", "aXb.log", "a%%b.log", "xzy?.log", "ete.log", "tab name.log"]
    scanned = [version(f"/logs/{name}", identity(n)) for n, name in enumerate(lookalikes)]
    known = [version(f"/logs/{name}", identity(n)) for n, name in enumerate(names)]

    assert store.unknown_paths(known + scanned) == [v[0] for v in scanned]


def test_unknown_paths_other_directory_rows(store: StateStore) -> None:
    add_row(store, "/logs/a/sub/x.log", identity(1), FileState.UPLOADED)
    add_row(store, "/logs/x.log", identity(2), FileState.UPLOADED)

    unknown = store.unknown_paths(
        [version("/logs/a/x.log", identity(1)), version("/logs/a/x.log", identity(2))]
    )

    assert unknown == ["/logs/a/x.log", "/logs/a/x.log"]


def test_unknown_paths_more_than_one_query(store: StateStore) -> None:
    count = 2 * LOOKUP_FILES + 3
    for number in range(0, count, 2):
        add_row(store, f"/logs/{number:04d}.log", identity(number), FileState.UPLOADED)

    scanned = [version(f"/logs/{number:04d}.log", identity(number)) for number in range(count)]

    expected = [f"/logs/{number:04d}.log" for number in range(1, count, 2)]
    assert store.unknown_paths(scanned) == expected


def test_unknown_paths_device_above_int64(store: StateStore) -> None:
    # SQLite stores them folded into signed 64-bit integers.
    big = FileIdentity(device=2**64 - 1, inode=2**63, size=5, mtime_ns=9)
    add_row(store, "/logs/big.log", big, FileState.UPLOADED)

    assert store.unknown_paths([version("/logs/big.log", big)]) == []
    assert store.unknown_paths([("/logs/big.log", 2**64 - 1, 2**63, 5, 10)]) == ["/logs/big.log"]


def test_unknown_paths_agrees_with_is_known(store: StateStore) -> None:
    for number in range(6):
        add_row(store, f"/logs/{number}.log", identity(number), list(FileState)[number % 5])

    scanned = [version(f"/logs/{number}.log", identity(number % 4)) for number in range(8)]

    expected = [
        path
        for path, device, inode, size, mtime_ns in scanned
        if not store.is_known(path, FileIdentity(device, inode, size, mtime_ns))
    ]
    assert store.unknown_paths(scanned) == expected
