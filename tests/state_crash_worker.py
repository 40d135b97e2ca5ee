"""Write to a state store in a loop until killed; used by the crash-safety tests.

Usage: ``python state_crash_worker.py DATABASE FIRST_NUMBER``

Each line on stdout reports a change after its transaction committed:
``queued PATH``, ``uploaded ID`` or ``retried ID``. Every third claimed row is
left ``uploading``, as an upload in flight would be when the process dies.
A second thread writes counters, buffered metrics and parts at the same time.
"""

from __future__ import annotations

import sys
import threading
import time
from itertools import count, islice

from tvm_upload.files import FileIdentity
from tvm_upload.state import FileState, MetricDatum, StateStore


def write_side_tables(store: StateStore) -> None:
    datum = MetricDatum("FileCount", 1.0, "Count", time.time(), {"VehicleId": "crash"})
    for number in count():
        store.increment("crash_worker_loops")
        store.buffer_metrics([datum], max_rows=50)
        for record in islice(store.files_in_state(FileState.UPLOADING), 2):
            store.set_upload(record.id, f"upload-{number}", 5 * 1024 * 1024)
            store.record_part(record.id, f"upload-{number}", 1, 5 * 1024 * 1024, f"etag-{number}")


def main() -> None:
    store = StateStore(sys.argv[1])
    first = int(sys.argv[2])
    threading.Thread(target=write_side_tables, args=(store,), daemon=True).start()

    for number in count(first):
        path = f"/logs/crash/file-{number}.log"
        identity = FileIdentity(device=1, inode=number, size=number, mtime_ns=number)
        store.enqueue(path, "crash", identity, f"crash/{number}")
        print(f"queued {path}", flush=True)

        for record in store.claim(time.time(), 3):
            if record.id % 3 == 0:
                store.mark_uploaded(record.id, "00" * 32, time.time(), None, record.identity)
                print(f"uploaded {record.id}", flush=True)
            elif record.id % 3 == 1:
                store.mark_retry(record.id, "simulated failure", time.time() + 3600)
                print(f"retried {record.id}", flush=True)


if __name__ == "__main__":
    main()
