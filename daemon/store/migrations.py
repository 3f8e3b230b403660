"""Named migrations: each applied once, in order, inside a transaction, and recorded in the
`migrations` table; a database that knows a migration we do not is refused."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import sqlite_utils

from daemon.store.connection import Connection
from daemon.store.errors import SchemaTooNewError
from daemon.store.provenance import PROVENANCE_SCHEMA

__all__ = ["MIGRATIONS", "Migration", "applied_migrations", "migrate", "script"]


@dataclass(frozen=True)
class Migration:
    """A named schema step; applied once, in order, inside a transaction, and recorded."""

    name: str
    apply: Callable[[sqlite_utils.Database], object]


def script(sql: str) -> Callable[[sqlite_utils.Database], object]:
    """A migration step that runs `sql` inside the migration's transaction."""
    # sqlite-utils runs a script statement by statement inside an open transaction, where
    # sqlite3's own executescript would commit first.
    return lambda db: db.executescript(sql)


def migrate(database: Connection, migrations: Sequence[Migration]) -> list[str]:
    """Apply pending migrations, each in its own transaction; return the names applied.

    The applied list is re-read under the write lock, so two processes opening a new
    file at once apply each migration once.
    """
    database.conn.execute(
        "CREATE TABLE IF NOT EXISTS migrations "
        "(name TEXT PRIMARY KEY, applied_at TEXT NOT NULL) STRICT"
    )
    known = {migration.name for migration in migrations}
    unknown = [name for name in applied_migrations(database) if name not in known]
    if unknown:
        raise SchemaTooNewError(database.path, unknown)
    applied = []
    for migration in migrations:
        with database.transaction():
            if migration.name in applied_migrations(database):
                continue
            migration.apply(database.db)
            database.conn.execute(
                "INSERT INTO migrations (name, applied_at) VALUES (?, ?)",
                (migration.name, database.now()),
            )
            applied.append(migration.name)
    return applied


def applied_migrations(database: Connection) -> list[str]:
    rows = database.conn.execute("SELECT name FROM migrations ORDER BY rowid")
    return [row[0] for row in rows]


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


# A run's token is written into its output files (XMP RunId) before the run row exists. A job's
# publication plan (the final names and hashes of its outputs) is recorded before the files
# are linked into place, so a crash between linking and recording finishes the record on
# restart instead of publishing the same recipe twice.
_PUBLICATION = """
ALTER TABLE runs ADD COLUMN run_token TEXT;
CREATE INDEX runs_token ON runs (run_token);
ALTER TABLE jobs ADD COLUMN publishing TEXT;
"""

MIGRATIONS: tuple[Migration, ...] = (
    Migration("0001_provenance", script(PROVENANCE_SCHEMA)),
    Migration("0002_jobs", script(_JOBS)),
    Migration("0003_publication", script(_PUBLICATION)),
)


def database_migrations() -> tuple[Migration, ...]:
    """Every migration of the daemon's database file, in order."""
    return MIGRATIONS
