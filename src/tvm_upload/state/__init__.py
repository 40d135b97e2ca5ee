"""The state store: queue and registry of log files in one SQLite database.

It is what the daemon remembers across restarts, crashes and power cuts:
each ready log file has one row in ``files`` from the moment it is queued
until it is pruned from the registry. The main loop, the upload threads and
the retention pass share one ``StateStore``. ``tvm-upload status`` opens the
same file read-only from another process while the daemon runs.

Modules, one per concern, each adding the methods on its tables:
``database`` (connection, transactions, durability, errors), ``schema``
(tables and migrations), ``queue``, ``registry`` (uploaded rows, deletion,
status summary), ``journal`` (multipart parts), ``metricsbuffer``
(counters and unsent metric data), ``legacy`` (import of the older
uploader's JSON files) and ``store`` (``StateStore`` and ``open_store``).
"""

from tvm_upload.state.database import BUSY_TIMEOUT_SECONDS, CorruptStateStoreError
from tvm_upload.state.records import (
    QUEUE_STATES,
    REGISTRY_STATES,
    BufferedMetric,
    ConfirmedUpload,
    EnqueueResult,
    FailedFile,
    FileRecord,
    FileState,
    MetricDatum,
    PartRecord,
    ReadyEntry,
    StatusSummary,
)
from tvm_upload.state.schema import SCHEMA_VERSION
from tvm_upload.state.store import StateStore, open_store

__all__ = [
    "BUSY_TIMEOUT_SECONDS",
    "QUEUE_STATES",
    "REGISTRY_STATES",
    "SCHEMA_VERSION",
    "BufferedMetric",
    "ConfirmedUpload",
    "CorruptStateStoreError",
    "EnqueueResult",
    "FailedFile",
    "FileRecord",
    "FileState",
    "MetricDatum",
    "PartRecord",
    "ReadyEntry",
    "StateStore",
    "StatusSummary",
    "open_store",
]
