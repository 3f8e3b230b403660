"""The Store: provenance, fixity and backup over one connection, and opening the database file
with its schema brought up to date."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path

from daemon.store import migrations as _migrations
from daemon.store.backup import Backup
from daemon.store.connection import Clock, connect, utc_now
from daemon.store.errors import StoreError
from daemon.store.fixity import Fixity
from daemon.store.migrations import Migration, merge_histories
from daemon.store.provenance import PROVENANCE_MIGRATIONS
from daemon.store.review import REVIEW_MIGRATIONS, Reviews
from daemon.store.tallies import Tallies

__all__ = ["Store", "database_migrations", "open_database"]


class Store(Fixity, Backup, Reviews, Tallies):
    """Provenance over one connection; the job queue shares it (see daemon.queue)."""

    def migrate(self, migrations: Sequence[Migration] | None = None) -> list[str]:
        """Apply pending migrations (by default the database's whole history), each in its own
        transaction; return the names applied."""
        if migrations is None:
            migrations = database_migrations()
        return _migrations.migrate(self, migrations)

    def applied_migrations(self) -> list[str]:
        return _migrations.applied_migrations(self)


def database_migrations() -> tuple[Migration, ...]:
    """The database file's whole history: the provenance tables' migrations, the queue's
    (daemon.queue owns `jobs`) and the cluster's (daemon.cluster.registry owns `workers`),
    merged in number order. Imported here, when first asked for, because those packages import
    this one."""
    from daemon.cluster.registry import CLUSTER_MIGRATIONS
    from daemon.queue import JOB_MIGRATIONS

    return merge_histories(
        PROVENANCE_MIGRATIONS, REVIEW_MIGRATIONS, JOB_MIGRATIONS, CLUSTER_MIGRATIONS
    )


def open_database(
    path: str | os.PathLike[str],
    *,
    clock: Clock = utc_now,
    busy_timeout: float = 30.0,
    migrations: Sequence[Migration] | None = None,
) -> Store:
    """Open (creating if needed) the database file and bring its schema up to date (by default
    with every migration of the daemon's database: the store's and the queue's).

    One Store per thread: a sqlite3 connection is not shared between threads.
    """
    path = Path(path)
    try:
        conn = connect(path, busy_timeout)
    except sqlite3.DatabaseError as exc:
        raise StoreError(f"{path}: cannot open as a scanrestore database: {exc}") from exc
    try:
        store = Store(path, conn, clock)
        store.migrate(migrations)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise StoreError(f"{path}: cannot open as a scanrestore database: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return store
