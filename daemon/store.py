"""The daemon's SQLite database: opening it, named migrations, and the append-only provenance
tables (sources, runs, stage runs, outputs, events) with the queries the CLI shows."""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import sqlite_utils

from daemon.outputs import TEMP_MARKER
from pipeline.files import fsync_dir, fsync_file, link_no_replace, sha256_file

__all__ = [
    "FIXITY_AUDIT",
    "FIXITY_MISMATCH",
    "FIXITY_MISSING",
    "FIXITY_PROBLEMS",
    "FIXITY_UNREADABLE",
    "MIGRATIONS",
    "PROVENANCE_TABLES",
    "BackupExistsError",
    "Clock",
    "Event",
    "FixityItem",
    "FixityReport",
    "Migration",
    "Observation",
    "OutputFile",
    "RunRecord",
    "SchemaTooNewError",
    "StageRun",
    "Store",
    "StoreError",
    "UnknownReferenceError",
    "canonical_json",
    "db_path",
    "from_timestamp",
    "open_database",
    "path_from_db",
    "recipe_sha256",
    "timestamp",
    "utc_now",
]

Clock = Callable[[], datetime]
RunStatus = Literal["done", "failed", "discarded", "died"]
OutputKind = Literal["image", "mask", "provenance"]

FIXITY_MISMATCH = "fixity_mismatch"
FIXITY_MISSING = "fixity_missing"
FIXITY_UNREADABLE = "fixity_unreadable"
FIXITY_AUDIT = "fixity_audit"  # one summary event per audit, written when it finishes
FIXITY_PROBLEMS = (FIXITY_MISMATCH, FIXITY_MISSING, FIXITY_UNREADABLE)

PROVENANCE_TABLES = (
    "migrations",
    "sources",
    "source_paths",
    "recipes",
    "runs",
    "stage_runs",
    "outputs",
    "events",
)


class StoreError(Exception):
    """Base class for every error the store raises on purpose."""


class SchemaTooNewError(StoreError):
    """The database was migrated by a newer scanrestore: `unknown` names its migrations."""

    def __init__(self, path: Path, unknown: Sequence[str]) -> None:
        self.path = path
        self.unknown = tuple(unknown)
        super().__init__(
            f"{path}: written by a newer scanrestore (unknown migrations: "
            f"{', '.join(self.unknown)}); upgrade scanrestore or open a backup"
        )


class BackupExistsError(StoreError, FileExistsError):
    """A backup is never written over an existing file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        super().__init__(f"{path}: already exists; a backup never overwrites a file")


class UnknownReferenceError(StoreError):
    """A record names a source or recipe that was never recorded."""


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


# ---------------------------------------------------------------- schema


def _append_only(table: str) -> str:
    return "".join(
        f"CREATE TRIGGER {table}_no_{verb.lower()} BEFORE {verb} ON {table} BEGIN "
        f"SELECT RAISE(ABORT, '{table} is append-only: {verb} is not allowed'); END;\n"
        for verb in ("UPDATE", "DELETE")
    )


# STRICT tables: a wrong type is an error, not a silent conversion.
_PROVENANCE = """
CREATE TABLE sources (
    source_sha256 TEXT PRIMARY KEY,
    size INTEGER NOT NULL CHECK (size >= 0),
    first_seen_at TEXT NOT NULL
) STRICT;
-- Every observation of a path (a duplicate name too); a NULL hash records that it vanished.
-- Path columns are ANY: text, or the raw bytes of a name that is not UTF-8 (see db_path).
CREATE TABLE source_paths (
    id INTEGER PRIMARY KEY,
    path ANY NOT NULL,
    source_sha256 TEXT REFERENCES sources (source_sha256),
    size INTEGER,
    modified_at TEXT,
    seen_at TEXT NOT NULL
) STRICT;
CREATE INDEX source_paths_path ON source_paths (path, id);
CREATE INDEX source_paths_sha ON source_paths (source_sha256);
CREATE TABLE recipes (
    recipe_sha256 TEXT PRIMARY KEY,
    recipe_json TEXT NOT NULL,
    first_used_at TEXT NOT NULL
) STRICT;
CREATE TABLE runs (
    id INTEGER PRIMARY KEY,
    job_id INTEGER,
    source_sha256 TEXT NOT NULL REFERENCES sources (source_sha256),
    path ANY NOT NULL,
    recipe_sha256 TEXT NOT NULL REFERENCES recipes (recipe_sha256),
    status TEXT NOT NULL CHECK (status IN ('done', 'failed', 'discarded', 'died')),
    started_at TEXT NOT NULL,
    finished_at TEXT NOT NULL,
    device TEXT,
    code_version TEXT NOT NULL,
    error TEXT
) STRICT;
CREATE INDEX runs_key ON runs (source_sha256, recipe_sha256, status);
CREATE INDEX runs_path ON runs (path);
CREATE TABLE stage_runs (
    run_id INTEGER NOT NULL REFERENCES runs (id),
    position INTEGER NOT NULL,
    stage TEXT NOT NULL,
    version INTEGER NOT NULL,
    model_id TEXT,
    model_sha256 TEXT,
    params_json TEXT NOT NULL,
    seconds REAL NOT NULL,
    device TEXT,
    skipped TEXT,
    PRIMARY KEY (run_id, position)
) STRICT;
CREATE TABLE outputs (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs (id),
    path ANY NOT NULL,
    version INTEGER NOT NULL CHECK (version >= 1),
    kind TEXT NOT NULL CHECK (kind IN ('image', 'mask', 'provenance')),
    output_sha256 TEXT NOT NULL,
    bytes INTEGER NOT NULL CHECK (bytes >= 0)
) STRICT;
CREATE INDEX outputs_run ON outputs (run_id);
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    occurred_at TEXT NOT NULL,
    kind TEXT NOT NULL,
    path ANY,
    source_sha256 TEXT,
    detail_json TEXT NOT NULL
) STRICT;
CREATE INDEX events_kind ON events (kind, occurred_at);
CREATE INDEX events_path ON events (path);
""" + "".join(_append_only(table) for table in PROVENANCE_TABLES)

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


@dataclass(frozen=True)
class Migration:
    """A named schema step; applied once, in order, inside a transaction, and recorded."""

    name: str
    apply: Callable[[sqlite_utils.Database], object]


def _script(sql: str) -> Callable[[sqlite_utils.Database], object]:
    # sqlite-utils runs a script statement by statement inside an open transaction, where
    # sqlite3's own executescript would commit first.
    return lambda db: db.executescript(sql)


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
    Migration("0001_provenance", _script(_PROVENANCE)),
    Migration("0002_jobs", _script(_JOBS)),
    Migration("0003_publication", _script(_PUBLICATION)),
)


# ---------------------------------------------------------------- records


@dataclass(frozen=True)
class Observation:
    id: int
    path: str
    source_sha256: str | None  # None: the path was seen empty (the file went away)
    size: int | None
    modified_at: datetime | None
    seen_at: datetime


@dataclass(frozen=True)
class StageRun:
    position: int
    stage: str
    version: int
    model_id: str | None
    model_sha256: str | None
    params: dict[str, Any]
    seconds: float
    device: str | None
    skipped: str | None


@dataclass(frozen=True)
class OutputFile:
    """A published file: its path as the daemon names it (relative to the output root)."""

    path: str
    version: int
    output_sha256: str
    bytes: int
    kind: OutputKind = "image"


@dataclass(frozen=True)
class RunRecord:
    id: int
    job_id: int | None
    source_sha256: str
    path: str
    recipe_sha256: str
    recipe: dict[str, Any]
    status: RunStatus
    started_at: datetime
    finished_at: datetime
    device: str | None
    code_version: str
    error: str | None
    stages: tuple[StageRun, ...]
    outputs: tuple[OutputFile, ...]
    run_token: str | None = None  # the RunId written into the output files


@dataclass(frozen=True)
class Event:
    id: int
    occurred_at: datetime
    kind: str
    path: str | None
    source_sha256: str | None
    detail: dict[str, Any]


@dataclass(frozen=True)
class FixityItem:
    """A file whose bytes the database vouches for: an original (path relative to the watch
    root) or an output (path as recorded, relative to the output root)."""

    kind: Literal["original", "output"]
    path: str
    expected_sha256: str
    run_id: int | None = None


@dataclass(frozen=True)
class FixityReport:
    started_at: datetime
    finished_at: datetime
    checked: int
    problems: tuple[Event, ...]


# ---------------------------------------------------------------- opening


def open_database(
    path: str | os.PathLike[str],
    *,
    clock: Clock = utc_now,
    busy_timeout: float = 30.0,
    migrations: Sequence[Migration] = MIGRATIONS,
) -> Store:
    """Open (creating if needed) the database file and bring its schema up to date.

    One Store per thread: a sqlite3 connection is not shared between threads.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # isolation_level=None: no implicit transactions; every write is inside transaction(),
    # which is what makes BEGIN IMMEDIATE and the savepoints below mean what they say.
    conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    try:
        _enable_wal(conn, path, busy_timeout)
        store = Store(path, conn, clock)
        store.migrate(migrations)
    except sqlite3.DatabaseError as exc:
        conn.close()
        raise StoreError(f"{path}: cannot open as a scanrestore database: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return store


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


class Store:
    """Provenance over one connection; the job queue shares it (see daemon.queue)."""

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

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def now(self) -> str:
        return timestamp(self.clock())

    @contextmanager
    def transaction(self) -> Iterator[Store]:
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

    # ------------------------------------------------------------ migrations

    def migrate(self, migrations: Sequence[Migration] = MIGRATIONS) -> list[str]:
        """Apply pending migrations, each in its own transaction; return the names applied.

        The applied list is re-read under the write lock, so two processes opening a new
        file at once apply each migration once.
        """
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS migrations "
            "(name TEXT PRIMARY KEY, applied_at TEXT NOT NULL) STRICT"
        )
        known = {migration.name for migration in migrations}
        unknown = [name for name in self.applied_migrations() if name not in known]
        if unknown:
            raise SchemaTooNewError(self.path, unknown)
        applied = []
        for migration in migrations:
            with self.transaction():
                if migration.name in self.applied_migrations():
                    continue
                migration.apply(self.db)
                self.conn.execute(
                    "INSERT INTO migrations (name, applied_at) VALUES (?, ?)",
                    (migration.name, self.now()),
                )
                applied.append(migration.name)
        return applied

    def applied_migrations(self) -> list[str]:
        return [row[0] for row in self.conn.execute("SELECT name FROM migrations ORDER BY rowid")]

    # ------------------------------------------------------------ writing provenance

    def record_observation(
        self,
        path: str,
        source_sha256: str,
        *,
        size: int,
        modified_at: datetime | None = None,
    ) -> Observation:
        """Record that `path` (relative to the watch root) holds these bytes. A repeat of the
        path's latest observation is not written again; another name for the same bytes is."""
        modified = None if modified_at is None else timestamp(modified_at)
        with self.transaction():
            self.conn.execute(
                "INSERT INTO sources (source_sha256, size, first_seen_at) VALUES (?, ?, ?) "
                "ON CONFLICT (source_sha256) DO NOTHING",
                (source_sha256, size, self.now()),
            )
            latest = self.conn.execute(
                "SELECT id, source_sha256, size, modified_at FROM source_paths "
                "WHERE path = ? ORDER BY id DESC LIMIT 1",
                (db_path(path),),
            ).fetchone()
            if latest is not None and latest[1:] == (source_sha256, size, modified):
                return self._observations("id = ?", (latest[0],))[0]
            return self._observe(path, source_sha256, size, modified)

    def record_removal(self, path: str) -> Observation | None:
        """Record that `path` is gone (so the fixity audit stops expecting it there)."""
        with self.transaction():
            latest = self.latest_observation(path)
            if latest is None or latest.source_sha256 is None:
                return latest
            return self._observe(path, None, None, None)

    def _observe(
        self, path: str, sha: str | None, size: int | None, modified: str | None
    ) -> Observation:
        row_id = self.conn.execute(
            "INSERT INTO source_paths (path, source_sha256, size, modified_at, seen_at) "
            "VALUES (?, ?, ?, ?, ?)",
            (db_path(path), sha, size, modified, self.now()),
        ).lastrowid
        return self._observations("id = ?", (row_id,))[0]

    def record_recipe(self, recipe: Mapping[str, Any]) -> str:
        """Store a recipe (idempotent) and return its recipe_sha256."""
        sha = recipe_sha256(recipe)
        with self.transaction():
            self.conn.execute(
                "INSERT INTO recipes (recipe_sha256, recipe_json, first_used_at) "
                "VALUES (?, ?, ?) ON CONFLICT (recipe_sha256) DO NOTHING",
                (sha, canonical_json(recipe), self.now()),
            )
        return sha

    def record_run(
        self,
        *,
        source_sha256: str,
        path: str,
        recipe_sha256: str,
        status: RunStatus,
        started_at: datetime,
        finished_at: datetime,
        code_version: str,
        device: str | None = None,
        error: str | None = None,
        job_id: int | None = None,
        run_token: str | None = None,
        stages: Sequence[Mapping[str, Any]] = (),
        outputs: Sequence[OutputFile] = (),
    ) -> int:
        """Record one processing attempt with its stages (dicts shaped like
        pipeline.chain.StageRecord.as_dict(), optionally with "device") and, for a done run,
        its published outputs. Returns the run id."""
        if outputs and status != "done":
            raise ValueError(f"{path}: a {status} run has no outputs to record")
        stage_rows = [_stage_row(index, stage, device) for index, stage in enumerate(stages)]
        with self.transaction():
            self._require("sources", "source_sha256", source_sha256)
            self._require("recipes", "recipe_sha256", recipe_sha256)
            runs = self.db.table("runs")
            runs.insert(
                {
                    "job_id": job_id,
                    "source_sha256": source_sha256,
                    "path": db_path(path),
                    "recipe_sha256": recipe_sha256,
                    "status": status,
                    "started_at": timestamp(started_at),
                    "finished_at": timestamp(finished_at),
                    "device": device,
                    "code_version": code_version,
                    "error": error,
                    "run_token": run_token,
                }
            )
            run_id = int(runs.last_pk)
            if stage_rows:
                self.db.table("stage_runs").insert_all(
                    {"run_id": run_id, **row} for row in stage_rows
                )
            if outputs:
                self.db.table("outputs").insert_all(
                    {
                        "run_id": run_id,
                        "path": db_path(out.path),
                        "version": out.version,
                        "kind": out.kind,
                        "output_sha256": out.output_sha256,
                        "bytes": out.bytes,
                    }
                    for out in outputs
                )
        return run_id

    def record_event(
        self,
        kind: str,
        *,
        path: str | None = None,
        source_sha256: str | None = None,
        detail: Mapping[str, Any] | None = None,
    ) -> Event:
        with self.transaction():
            row_id = self.conn.execute(
                "INSERT INTO events (occurred_at, kind, path, source_sha256, detail_json) "
                "VALUES (?, ?, ?, ?, ?)",
                (
                    self.now(),
                    kind,
                    None if path is None else db_path(path),
                    source_sha256,
                    canonical_json(dict(detail or {})),
                ),
            ).lastrowid
        return self._events("id = ?", (row_id,))[0]

    def _require(self, table: str, column: str, value: str) -> None:
        found = self.conn.execute(f"SELECT 1 FROM {table} WHERE {column} = ?", (value,))
        if found.fetchone() is None:
            raise UnknownReferenceError(f"{table}: no {column} {value}; record it first")

    # ------------------------------------------------------------ reading provenance

    def latest_observation(self, path: str) -> Observation | None:
        rows = self._observations("path = ? ORDER BY id DESC LIMIT 1", (db_path(path),))
        return rows[0] if rows else None

    def observations(self, path: str) -> list[Observation]:
        """Every observation of `path`, oldest first."""
        return self._observations("path = ? ORDER BY id", (db_path(path),))

    def paths_of(self, source_sha256: str) -> list[str]:
        """Every path these bytes were ever seen under (duplicates included), first seen first."""
        rows = self.conn.execute(
            "SELECT path FROM source_paths WHERE source_sha256 = ? GROUP BY path ORDER BY min(id)",
            (source_sha256,),
        )
        return [path_from_db(row[0]) for row in rows]

    def _observations(self, where: str, params: Sequence[Any]) -> list[Observation]:
        rows = self.db.query(f"SELECT * FROM source_paths WHERE {where}", params)
        return [
            Observation(
                id=row["id"],
                path=path_from_db(row["path"]),
                source_sha256=row["source_sha256"],
                size=row["size"],
                modified_at=from_timestamp(row["modified_at"]),
                seen_at=_at(row["seen_at"]),
            )
            for row in rows
        ]

    def run(self, run_id: int) -> RunRecord:
        runs = self._runs("r.id = ?", (run_id,))
        if not runs:
            raise KeyError(f"no run {run_id}")
        return runs[0]

    def history(self, path: str) -> list[RunRecord]:
        """Every run of every version of the bytes ever seen at `path`, and of anything run
        under that name, oldest first: each with its recipe, stages and outputs. A run whose
        `path` differs was made for the same bytes under another name (a duplicate link)."""
        return self._runs(
            "r.path = ? OR r.source_sha256 IN "
            "(SELECT source_sha256 FROM source_paths WHERE path = ?)",
            (db_path(path), db_path(path)),
        )

    def done_run_for(self, source_sha256: str, recipe_sha256: str) -> RunRecord | None:
        """The latest successful run of these bytes under this recipe, with its outputs: what
        a duplicate name links to instead of being processed again."""
        runs = self._runs(
            "r.source_sha256 = ? AND r.recipe_sha256 = ? AND r.status = 'done'",
            (source_sha256, recipe_sha256),
        )
        return runs[-1] if runs else None

    def recent_runs(self, *, status: RunStatus | None = None, limit: int = 20) -> list[RunRecord]:
        """The latest runs, newest first (status="failed" for the CLI's recent failures)."""
        where = "r.status = ?" if status else "1"
        params: tuple[Any, ...] = (status,) if status else ()
        ids = self.conn.execute(
            f"SELECT id FROM runs r WHERE {where} ORDER BY finished_at DESC, id DESC LIMIT ?",
            (*params, limit),
        ).fetchall()
        return [self.run(row[0]) for row in ids]

    def _runs(self, where: str, params: Sequence[Any]) -> list[RunRecord]:
        rows = list(
            self.db.query(
                "SELECT r.*, c.recipe_json FROM runs r JOIN recipes c USING (recipe_sha256) "
                f"WHERE {where} ORDER BY r.finished_at, r.id",
                params,
            )
        )
        return [self._run_record(row) for row in rows]

    def _run_record(self, row: Mapping[str, Any]) -> RunRecord:
        stages = tuple(
            StageRun(
                position=s["position"],
                stage=s["stage"],
                version=s["version"],
                model_id=s["model_id"],
                model_sha256=s["model_sha256"],
                params=json.loads(s["params_json"]),
                seconds=s["seconds"],
                device=s["device"],
                skipped=s["skipped"],
            )
            for s in self.db.query(
                "SELECT * FROM stage_runs WHERE run_id = ? ORDER BY position", (row["id"],)
            )
        )
        outputs = tuple(
            OutputFile(
                path_from_db(o["path"]), o["version"], o["output_sha256"], o["bytes"], o["kind"]
            )
            for o in self.db.query(
                "SELECT * FROM outputs WHERE run_id = ? ORDER BY id", (row["id"],)
            )
        )
        return RunRecord(
            id=row["id"],
            job_id=row["job_id"],
            source_sha256=row["source_sha256"],
            path=path_from_db(row["path"]),
            recipe_sha256=row["recipe_sha256"],
            recipe=json.loads(row["recipe_json"]),
            status=row["status"],
            started_at=_at(row["started_at"]),
            finished_at=_at(row["finished_at"]),
            device=row["device"],
            code_version=row["code_version"],
            error=row["error"],
            stages=stages,
            outputs=outputs,
            run_token=row["run_token"],
        )

    def events(
        self,
        *,
        kinds: Sequence[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        path: str | None = None,
        limit: int | None = None,
    ) -> list[Event]:
        """Events, newest first, filtered by kind, time (both bounds inclusive) and path."""
        clauses, args = ["1"], []
        if kinds is not None:
            clauses.append(f"kind IN ({', '.join('?' * len(kinds))})")
            args.extend(kinds)
        if since is not None:
            clauses.append("occurred_at >= ?")
            args.append(timestamp(since))
        if until is not None:
            clauses.append("occurred_at <= ?")
            args.append(timestamp(until))
        if path is not None:
            clauses.append("path = ?")
            args.append(db_path(path))
        return self._events(" AND ".join(clauses), args, limit)

    def _events(self, where: str, args: Sequence[Any], limit: int | None = None) -> list[Event]:
        sql = f"SELECT * FROM events WHERE {where} ORDER BY occurred_at DESC, id DESC"
        if limit is not None:
            sql, args = sql + " LIMIT ?", [*args, limit]
        return [
            Event(
                id=row["id"],
                occurred_at=_at(row["occurred_at"]),
                kind=row["kind"],
                path=None if row["path"] is None else path_from_db(row["path"]),
                source_sha256=row["source_sha256"],
                detail=json.loads(row["detail_json"]),
            )
            for row in self.db.query(sql, args)
        ]

    # ------------------------------------------------------------ fixity and backup

    def fixity_items(self) -> list[FixityItem]:
        """What the audit re-hashes: each path's latest original (unless it was recorded as
        removed) and every recorded output."""
        originals = self.conn.execute(
            "SELECT path, source_sha256 FROM source_paths p "
            "WHERE id = (SELECT max(id) FROM source_paths WHERE path = p.path) "
            "AND source_sha256 IS NOT NULL ORDER BY path"
        )
        outputs = self.conn.execute("SELECT path, output_sha256, run_id FROM outputs ORDER BY id")
        return [FixityItem("original", path_from_db(path), sha) for path, sha in originals] + [
            FixityItem("output", path_from_db(path), sha, run_id) for path, sha, run_id in outputs
        ]

    def audit_fixity(
        self,
        locate: Callable[[FixityItem], Path],
        *,
        hash_file: Callable[[Path], str] = sha256_file,
    ) -> FixityReport:
        """Re-hash every fixity item (`locate` maps it to a file); each missing, unreadable or
        changed file becomes an event, and a summary event closes the audit. No transaction
        is held while hashing, so the daemon keeps working during a long audit."""
        started_at = self.clock()
        items = self.fixity_items()
        problems = [
            event for item in items if (event := self._check(item, locate(item), hash_file))
        ]
        report = FixityReport(started_at, self.clock(), len(items), tuple(problems))
        self.record_event(
            FIXITY_AUDIT,
            detail={
                "started_at": timestamp(report.started_at),
                "checked": report.checked,
                "problems": len(problems),
            },
        )
        return report

    def _check(
        self, item: FixityItem, file: Path, hash_file: Callable[[Path], str]
    ) -> Event | None:
        detail: dict[str, Any] = {"item": item.kind, "file": str(file)}
        detail |= {"expected_sha256": item.expected_sha256, "run_id": item.run_id}
        try:
            actual = hash_file(file)
        except FileNotFoundError:
            return self.record_event(FIXITY_MISSING, path=item.path, detail=detail)
        except OSError as exc:
            detail["error"] = str(exc)
            return self.record_event(FIXITY_UNREADABLE, path=item.path, detail=detail)
        if actual == item.expected_sha256:
            return None
        detail["actual_sha256"] = actual
        return self.record_event(FIXITY_MISMATCH, path=item.path, detail=detail)

    def fixity_status(self) -> FixityReport | None:
        """The latest finished audit and the problems it found (for `scanrestore status`)."""
        summaries = self.events(kinds=[FIXITY_AUDIT], limit=1)
        if not summaries:
            return None
        summary = summaries[0]
        started = _at(summary.detail["started_at"])
        problems = self.events(kinds=FIXITY_PROBLEMS, since=started, until=summary.occurred_at)
        return FixityReport(
            started, summary.occurred_at, summary.detail["checked"], tuple(reversed(problems))
        )

    def backup(self, dest: str | os.PathLike[str]) -> Path:
        """A consistent copy with VACUUM INTO, written beside `dest` and then linked into
        place, so `dest` is either a complete database or absent; never overwritten."""
        dest = Path(dest)
        if dest.exists():
            raise BackupExistsError(dest)
        if self.conn.in_transaction:
            raise StoreError("backup cannot run inside a transaction (VACUUM INTO)")
        dest.parent.mkdir(parents=True, exist_ok=True)
        temp = dest.parent / f"._{dest.name}{TEMP_MARKER}{secrets.token_hex(4)}"
        try:
            self.conn.execute("VACUUM INTO ?", (str(temp),))
            fsync_file(temp)
            if not link_no_replace(temp, dest):
                raise BackupExistsError(dest)
            fsync_dir(dest.parent)
        finally:
            temp.unlink(missing_ok=True)
        return dest


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text)


def _stage_row(position: int, record: Mapping[str, Any], run_device: str | None) -> dict[str, Any]:
    """A stage_runs row from a StageRecord.as_dict()-shaped mapping; unknown keys are an error
    so nothing the pipeline reports is silently dropped."""
    allowed = {"stage", "version", "params", "seconds", "skipped", "device"}
    extra = sorted(set(record) - allowed)
    missing = sorted({"stage", "version", "params", "seconds"} - set(record))
    if extra or missing:
        raise ValueError(f"stage record {position}: missing {missing}, unknown {extra}")
    params = dict(record["params"])
    return {
        "position": position,
        "stage": record["stage"],
        "version": int(record["version"]),
        "model_id": params.get("model"),
        "model_sha256": params.get("model_sha256"),
        "params_json": canonical_json(params),
        "seconds": float(record["seconds"]),
        "device": record.get("device") or params.get("device") or run_device,
        "skipped": record.get("skipped"),
    }
