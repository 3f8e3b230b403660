"""The durable job queue, in the store's SQLite file: the `jobs` table's schema (schema), who
holds a lease and whether it still lives (holders), and the queue with its job records (jobs)."""

from daemon.queue.holders import ProcessId, process_alive
from daemon.queue.jobs import (
    ACTIVE_STATES,
    QUARANTINED,
    STATES,
    Coverage,
    Enqueued,
    Job,
    JobQueue,
    LeaseLostError,
    QueueError,
)
from daemon.queue.schema import JOB_MIGRATIONS

__all__ = [
    "ACTIVE_STATES",
    "JOB_MIGRATIONS",
    "QUARANTINED",
    "STATES",
    "Coverage",
    "Enqueued",
    "Job",
    "JobQueue",
    "LeaseLostError",
    "ProcessId",
    "QueueError",
    "process_alive",
]
