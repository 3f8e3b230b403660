"""The coordinator's record of the cluster's workers, in the store's SQLite file (the `workers`
table and its migration live here, its only writer): what `scanrestore status` lists."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from daemon.store import Migration, Store, script, timestamp

__all__ = ["CLUSTER_MIGRATIONS", "WorkerRecord", "WorkerRegistry"]

WorkerState = Literal["idle", "busy", "refusing", "gone"]

# One row per worker name, rewritten as its heartbeats come in. Mutable on purpose (like
# `jobs`): the provenance of a run names its worker in runs.worker, which never changes.
_WORKERS = """
CREATE TABLE workers (
    name TEXT PRIMARY KEY,
    ident TEXT NOT NULL,
    host TEXT NOT NULL,
    device TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('idle', 'busy', 'refusing', 'gone')),
    job TEXT,
    last_heartbeat_at TEXT NOT NULL,
    jobs_done INTEGER NOT NULL DEFAULT 0,
    duplicates_dropped INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    first_seen_at TEXT NOT NULL
) STRICT;
"""

CLUSTER_MIGRATIONS: tuple[Migration, ...] = (Migration("0006_cluster", script(_WORKERS)),)


@dataclass(frozen=True)
class WorkerRecord:
    """A worker as the coordinator last saw it. `last_heartbeat_at` is on the coordinator's
    clock: when it last saw the worker's heartbeat change."""

    name: str
    ident: str  # NAME@HOST:PID
    host: str
    device: str
    state: WorkerState
    job: str | None
    last_heartbeat_at: datetime
    jobs_done: int
    duplicates_dropped: int
    error: str | None
    first_seen_at: datetime

    def as_json(self) -> dict[str, object]:
        return {
            "name": self.name,
            "ident": self.ident,
            "host": self.host,
            "device": self.device,
            "state": self.state,
            "job": self.job,
            "last_heartbeat_at": self.last_heartbeat_at.isoformat(),
            "jobs_done": self.jobs_done,
            "duplicates_dropped": self.duplicates_dropped,
            "error": self.error,
        }


class WorkerRegistry:
    """The `workers` table over a Store's connection."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def record(self, records: Iterable[WorkerRecord]) -> None:
        """Insert or rewrite these workers' rows, in one transaction."""
        with self.store.transaction():
            for item in records:
                self.store.conn.execute(
                    "INSERT INTO workers (name, ident, host, device, state, job, "
                    "last_heartbeat_at, jobs_done, duplicates_dropped, error, first_seen_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET "
                    "ident = excluded.ident, host = excluded.host, device = excluded.device, "
                    "state = excluded.state, job = excluded.job, "
                    "last_heartbeat_at = excluded.last_heartbeat_at, "
                    "jobs_done = excluded.jobs_done, "
                    "duplicates_dropped = excluded.duplicates_dropped, error = excluded.error",
                    (
                        item.name,
                        item.ident,
                        item.host,
                        item.device,
                        item.state,
                        item.job,
                        timestamp(item.last_heartbeat_at),
                        item.jobs_done,
                        item.duplicates_dropped,
                        item.error,
                        timestamp(item.first_seen_at),
                    ),
                )

    def workers(self) -> list[WorkerRecord]:
        """Every worker ever seen, the most recently heard first."""
        rows = self.store.db.query("SELECT * FROM workers ORDER BY last_heartbeat_at DESC, name")
        return [
            WorkerRecord(
                name=row["name"],
                ident=row["ident"],
                host=row["host"],
                device=row["device"],
                state=row["state"],
                job=row["job"],
                last_heartbeat_at=datetime.fromisoformat(row["last_heartbeat_at"]),
                jobs_done=row["jobs_done"],
                duplicates_dropped=row["duplicates_dropped"],
                error=row["error"],
                first_seen_at=datetime.fromisoformat(row["first_seen_at"]),
            )
            for row in rows
        ]
