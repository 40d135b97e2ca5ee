"""Time state store operations on a large registry; prints one JSON document.

Run by the benchmark with the project's Python as a child process:
``state_probe.py --rows 1000000 --operations 10000 DB``. The registry is
filled with ``--rows`` uploaded rows in one SQL transaction, then each
operation runs ``--operations`` times through the public ``StateStore``
methods, one call (and one transaction) at a time, as the daemon calls them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from tvm_upload.files import FileIdentity
from tvm_upload.state import StateStore

SOURCE = "bench"
CLAIM_BATCH = 8
DELETE_AFTER = None


def registry_path(number: int) -> str:
    return f"/bench/registry/session-{number // 1000:05d}/file-{number:07d}.log"


def registry_identity(number: int) -> FileIdentity:
    return FileIdentity(
        device=2049,
        inode=1_000_000 + number,
        size=4096 + number % 60000,
        mtime_ns=1_796_000_000_000_000_000 + number,
    )


def fill_registry(db: Path, rows: int) -> float:
    """Create the store and insert ``rows`` uploaded rows in one transaction; return seconds."""
    started = time.perf_counter()
    StateStore(db).close()
    now = time.time()

    def generate() -> Iterator[tuple[object, ...]]:
        for number in range(rows):
            identity = registry_identity(number)
            yield (
                registry_path(number),
                SOURCE,
                identity.device,
                identity.inode,
                identity.size,
                identity.mtime_ns,
                f"bench-vehicle/2026-12-04/{SOURCE}/file-{number:07d}.log",
                "uploaded",
                "0" * 64,
                now,
                now,
                now,
            )

    with sqlite3.connect(db) as conn:
        conn.executemany(
            "INSERT INTO files (path, source, device, inode, size, mtime_ns, object_key, state,"
            " sha256, queued_at, uploaded_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?,"
            " ?, ?)",
            generate(),
        )
    return time.perf_counter() - started


def timed(operation: Callable[[], int]) -> dict[str, float]:
    """Run ``operation`` (which returns how many calls it made) and time it."""
    started = time.perf_counter()
    calls = operation()
    seconds = time.perf_counter() - started
    return {"calls": calls, "seconds": seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, required=True, help="uploaded rows in the registry")
    parser.add_argument("--operations", type=int, required=True, help="calls per operation")
    parser.add_argument("db", type=Path, help="state store file to create (replaced)")
    args = parser.parse_args()

    for suffix in ("", "-wal", "-shm"):
        Path(f"{args.db}{suffix}").unlink(missing_ok=True)
    fill_seconds = fill_registry(args.db, args.rows)
    rng = random.Random(1)
    new_numbers = range(args.rows, args.rows + args.operations)
    lookups = [rng.randrange(args.rows) for _ in range(args.operations)]
    results: dict[str, object] = {"rows": args.rows, "fill_seconds": fill_seconds}

    with StateStore(args.db) as store:

        def enqueue() -> int:
            for number in new_numbers:
                store.enqueue(
                    registry_path(number),
                    SOURCE,
                    registry_identity(number),
                    f"bench-vehicle/2026-12-04/{SOURCE}/new-{number}.log",
                )
            return len(new_numbers)

        def lookup_registered() -> int:
            for number in lookups:
                store.is_registered(registry_path(number), registry_identity(number))
            return len(lookups)

        def lookup_known() -> int:
            for number in lookups:
                store.is_known(registry_path(number), registry_identity(number))
            return len(lookups)

        def object_key() -> int:
            for number in lookups:
                store.object_key_for(registry_path(number))
            return len(lookups)

        claimed = []

        def claim() -> int:
            calls = 0
            while True:
                batch = store.claim(time.time(), CLAIM_BATCH)
                calls += 1
                if not batch:
                    return calls
                claimed.extend(batch)

        def mark_uploaded() -> int:
            for record in claimed:
                store.mark_uploaded(record.id, "0" * 64, time.time(), DELETE_AFTER, record.identity)
            return len(claimed)

        def summary() -> int:
            store.summary(time.time())
            return 1

        results["enqueue"] = timed(enqueue)
        results["is_registered"] = timed(lookup_registered)
        results["is_known"] = timed(lookup_known)
        results["object_key_for"] = timed(object_key)
        results[f"claim ({CLAIM_BATCH} rows per call)"] = timed(claim)
        results["mark_uploaded"] = timed(mark_uploaded)
        results["summary"] = timed(summary)

    results["db_bytes"] = sum(
        os.path.getsize(f"{args.db}{suffix}")
        for suffix in ("", "-wal")
        if os.path.exists(f"{args.db}{suffix}")
    )
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
