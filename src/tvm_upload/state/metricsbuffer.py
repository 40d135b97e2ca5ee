"""Counters and the offline buffer of metric data, kept in the state store."""

from __future__ import annotations

import json
from collections.abc import Iterable

from tvm_upload.state.database import Database
from tvm_upload.state.records import BufferedMetric, MetricDatum


class MetricsBuffer(Database):
    """Methods on the ``counters`` and ``metrics_buffer`` tables."""

    def increment(self, name: str, by: int = 1) -> int:
        """Add ``by`` to the counter ``name`` (created at 0) and return its new value."""
        with self.transaction(f"increment counter {name}") as conn:
            conn.execute(
                "INSERT INTO counters (name, value) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                (name, by),
            )
            row = conn.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
        return int(row["value"])

    def increment_many(self, amounts: dict[str, int]) -> None:
        """Add each amount to its counter (created at 0), all in one transaction."""
        if not amounts:
            return

        with self.transaction(f"increment counters {', '.join(amounts)}") as conn:
            conn.executemany(
                "INSERT INTO counters (name, value) VALUES (?, ?)"
                " ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                list(amounts.items()),
            )

    def counters(self) -> dict[str, int]:
        """Return every counter by name."""
        with self.transaction("read counters", write=False) as conn:
            rows = conn.execute("SELECT name, value FROM counters").fetchall()
        return {row["name"]: row["value"] for row in rows}

    def buffer_metrics(self, rows: Iterable[MetricDatum], max_rows: int) -> int:
        """Append ``rows`` to the buffer, keep the newest ``max_rows``, return how many were dropped.

        The buffer keeps metric data that could not be sent (CloudWatch
        unreachable) until ``peek_metrics`` and ``drop_metrics`` send it.
        """
        with self.transaction("buffer metric data") as conn:
            conn.executemany(
                "INSERT INTO metrics_buffer (name, value, unit, timestamp, dimensions)"
                " VALUES (?, ?, ?, ?, ?)",
                [
                    (
                        datum.name,
                        datum.value,
                        datum.unit,
                        datum.timestamp,
                        json.dumps(dict(datum.dimensions), sort_keys=True),
                    )
                    for datum in rows
                ],
            )
            cursor = conn.execute(
                "DELETE FROM metrics_buffer WHERE id NOT IN"
                " (SELECT id FROM metrics_buffer ORDER BY id DESC LIMIT ?)",
                (max(max_rows, 0),),
            )
            return cursor.rowcount

    def peek_metrics(self, limit: int) -> list[BufferedMetric]:
        """Return up to ``limit`` buffered metric data, oldest first, without removing them."""
        with self.transaction("read buffered metric data", write=False) as conn:
            rows = conn.execute(
                "SELECT id, name, value, unit, timestamp, dimensions FROM metrics_buffer"
                " ORDER BY id LIMIT ?",
                (limit,),
            ).fetchall()
        return [
            BufferedMetric(
                id=row["id"],
                datum=MetricDatum(
                    name=row["name"],
                    value=row["value"],
                    unit=row["unit"],
                    timestamp=row["timestamp"],
                    dimensions=json.loads(row["dimensions"]),
                ),
            )
            for row in rows
        ]

    def drop_metrics(self, ids: Iterable[int]) -> None:
        """Remove buffered metric data by id, after they were sent."""
        with self.transaction("drop sent metric data") as conn:
            conn.executemany("DELETE FROM metrics_buffer WHERE id = ?", [(i,) for i in ids])
