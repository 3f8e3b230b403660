"""Named migrations: each applied once, in order, inside a transaction, and recorded in the
`migrations` table; a database that knows a migration we do not is refused."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import sqlite_utils

from daemon.store.connection import Connection
from daemon.store.errors import SchemaTooNewError

__all__ = ["Migration", "applied_migrations", "merge_histories", "migrate", "script"]


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


def merge_histories(*histories: Sequence[Migration]) -> tuple[Migration, ...]:
    """One database history from the migrations of each table's owner (the store's, the
    queue's), in the order of the four-digit number that starts every name. Owners' parts of
    one step (both hold a "0003_publication") become one migration, their parts run in the
    order the histories are given, in one transaction, recorded once under that name."""
    steps: dict[str, list[Migration]] = {}
    for history in histories:
        for migration in history:
            if not re.fullmatch(r"\d{4}_\w+", migration.name):
                raise ValueError(f"migration {migration.name!r}: name must be NNNN_words")
            steps.setdefault(migration.name, []).append(migration)
    return tuple(_joined(name, steps[name]) for name in sorted(steps))


def _joined(name: str, parts: list[Migration]) -> Migration:
    if len(parts) == 1:
        return parts[0]

    def apply(db: sqlite_utils.Database) -> None:
        for part in parts:
            part.apply(db)

    return Migration(name, apply)
