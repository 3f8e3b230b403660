"""The `jobs` table's schema and its named migrations; the store runs them with its own
(daemon.store.database_migrations)."""

from __future__ import annotations

from daemon.store import Migration, script

__all__ = ["JOB_MIGRATIONS"]

# The only mutable table. A lease exists exactly while a job runs, and a (path, bytes, recipe)
# has at most one job that is still to be done.
_JOBS = """
CREATE TABLE jobs (
    id INTEGER PRIMARY KEY,
    path ANY NOT NULL,
    source_sha256 TEXT NOT NULL,
    recipe_sha256 TEXT NOT NULL,
    state TEXT NOT NULL CHECK (
        state IN ('queued', 'running', 'done', 'failed', 'quarantined', 'superseded')),
    force INTEGER NOT NULL CHECK (force IN (0, 1)),
    attempts INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    worker_deaths INTEGER NOT NULL DEFAULT 0,
    lease_id TEXT,
    lease_owner TEXT,
    lease_process TEXT,
    lease_expires_at TEXT,
    lease_expires_mono REAL,
    heartbeat_at TEXT,
    next_attempt_at TEXT NOT NULL,
    last_error TEXT,
    quarantine_reason TEXT,
    created_at TEXT NOT NULL,
    updated_at TEXT NOT NULL,
    finished_at TEXT,
    CHECK ((state = 'running') = (lease_id IS NOT NULL AND lease_owner IS NOT NULL
        AND lease_process IS NOT NULL AND lease_expires_at IS NOT NULL
        AND lease_expires_mono IS NOT NULL)),
    CHECK (state != 'quarantined' OR quarantine_reason IS NOT NULL)
) STRICT;
CREATE UNIQUE INDEX jobs_one_active ON jobs (path, source_sha256, recipe_sha256)
    WHERE state IN ('queued', 'running', 'failed');
CREATE INDEX jobs_due ON jobs (state, next_attempt_at, id);
CREATE INDEX jobs_key ON jobs (source_sha256, recipe_sha256, state);
CREATE INDEX jobs_path ON jobs (path, recipe_sha256);
"""

# A job's publication plan (the final names and hashes of its outputs) is recorded before the
# files are linked into place, so a crash between linking and recording finishes the record
# on restart instead of publishing the same recipe twice. The store's part of the same step
# adds the run token.
_PUBLICATION = """
ALTER TABLE jobs ADD COLUMN publishing TEXT;
"""

# Each quarantine is also an event (daemon.queue.jobs), so /metrics can count quarantines as a
# counter although a retry releases the job. Files quarantined before this step get theirs here.
_QUARANTINE_EVENTS = """
INSERT INTO events (occurred_at, kind, path, source_sha256, detail_json)
SELECT coalesce(finished_at, updated_at), 'quarantined', path, source_sha256,
       json_object('job', id, 'reason', quarantine_reason)
FROM jobs WHERE state = 'quarantined' ORDER BY id;
"""

JOB_MIGRATIONS: tuple[Migration, ...] = (
    Migration("0002_jobs", script(_JOBS)),
    Migration("0003_publication", script(_PUBLICATION)),
    Migration("0007_quarantine_events", script(_QUARANTINE_EVENTS)),
)
