"""One connection to the daemon's SQLite file (WAL, full sync, write transactions and savepoints)
and the encoders every table uses: timestamps, canonical JSON, paths that may not be UTF-8."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

import sqlite_utils

from daemon.store.errors import StoreError

__all__ = [
    "Clock",
    "Connection",
    "canonical_json",
    "connect",
    "db_path",
    "from_timestamp",
    "path_from_db",
    "recipe_sha256",
    "timestamp",
    "utc_now",
]

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


def timestamp(moment: datetime) -> str:
    """UTC ISO-8601 with microseconds: fixed width, so text order is time order in SQL."""
    if moment.tzinfo is None:
        raise ValueError(f"naive datetime {moment!r}: the clock must return aware datetimes")
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def from_timestamp(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def canonical_json(value: Any) -> str:
    """One spelling per value (sorted keys, no spaces, no NaN), so equal recipes hash equal.
    ASCII-escaped, so a surrogate-escaped file name in a detail is still storable text."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def db_path(path: str) -> str | bytes:
    """A path as stored: its text, or its raw bytes when the name is not UTF-8 (a str from
    os.fsdecode with surrogate escapes, which SQLite cannot hold as text). Every file name
    round-trips exactly through path_from_db, and equal names compare equal in SQL."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return os.fsencode(path)
    return path


def path_from_db(value: str | bytes) -> str:
    return os.fsdecode(value) if isinstance(value, bytes) else value


def recipe_sha256(recipe: Mapping[str, Any]) -> str:
    """The recipe hash that keys a job: chain, stage versions, model hashes, code version."""
    return hashlib.sha256(canonical_json(recipe).encode("utf-8")).hexdigest()


def connect(path: Path, busy_timeout: float) -> sqlite3.Connection:
    """A connection in WAL mode, creating the file (and its folder) if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: no implicit transactions; every write is inside transaction(),
    # which is what makes BEGIN IMMEDIATE and the savepoints below mean what they say.
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    try:
        _enable_wal(conn, path, busy_timeout)
    except BaseException:
        conn.close()
        raise
    return conn


def _enable_wal(conn: sqlite3.Connection, path: Path, busy_timeout: float) -> None:
    """Switch a new file to WAL (it persists in the file). The switch can answer SQLITE_BUSY
    without waiting on the busy handler while another process opens the same new file, so
    it is retried here for as long as the busy timeout."""
    deadline = time.monotonic() + busy_timeout
    while True:
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            break
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
    if mode.lower() != "wal":
        raise StoreError(
            f"{path}: SQLite could not use WAL (journal mode {mode!r}); keep the database "
            "on a local disk, not a network share"
        )


class Connection:
    """The database file over one sqlite3 connection: the clock that stamps rows and the write
    transactions. The store's concerns (daemon.store.Store) and the queue build on it."""

    def __init__(self, path: Path, conn: sqlite3.Connection, clock: Clock) -> None:
        self.path = path
        self.conn = conn
        self.clock = clock
        self._savepoints = itertools.count()
        # FULL, not NORMAL: in WAL mode NORMAL may lose the last commits on power loss, and
        # they record outputs that are already fsynced on disk (and jobs already done). We
        # commit a handful of times per image, which takes seconds to minutes, so one more
        # fsync per commit costs nothing measurable.
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        # sqlite-utils turns recursive_triggers on, so INSERT OR REPLACE fires the
        # append-only DELETE trigger instead of silently replacing a provenance row.
        self.db = sqlite_utils.Database(conn, execute_plugins=False)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def now(self) -> str:
        return timestamp(self.clock())

    @contextmanager
    def transaction(self) -> Iterator[Self]:
        """A write transaction, BEGIN IMMEDIATE so it holds the write lock from the start (a
        deferred one that upgrades can fail with SQLITE_BUSY without waiting). Nested use
        becomes a savepoint, so a job's completion and its run record commit together."""
        if self.conn.in_transaction:
            name = f"sp_{next(self._savepoints)}"
            self.conn.execute(f"SAVEPOINT {name}")
            try:
                yield self
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute(f"ROLLBACK TO {name}")
                    self.conn.execute(f"RELEASE {name}")
                raise
            self.conn.execute(f"RELEASE {name}")
            return
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self
            self.conn.execute("COMMIT")
        except BaseException:
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")
            raise
