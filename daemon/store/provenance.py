"""Provenance: the append-only tables (sources and the paths they were seen at, recipes, runs
with their stages and outputs, events), what is written to them and the queries the CLI shows."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any

from daemon.store.connection import (
    Connection,
    canonical_json,
    db_path,
    from_timestamp,
    path_from_db,
    recipe_sha256,
    timestamp,
)
from daemon.store.errors import UnknownReferenceError
from daemon.store.migrations import Migration, script
from daemon.store.records import (
    Event,
    Observation,
    OutputFile,
    OutputKind,
    RunRecord,
    RunStatus,
    StageRun,
)

__all__ = [
    "PROVENANCE_MIGRATIONS",
    "PROVENANCE_TABLES",
    "Event",
    "Observation",
    "OutputFile",
    "OutputKind",
    "Provenance",
    "RunRecord",
    "RunStatus",
    "StageRun",
]

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

# A run's token is written into its output files (XMP RunId) before the run row exists. (The
# queue's part of this step records a job's publication plan: see daemon.queue.)
_RUN_TOKEN = """
ALTER TABLE runs ADD COLUMN run_token TEXT;
CREATE INDEX runs_token ON runs (run_token);
"""

# What identifies the version of the file that was hashed, beyond its size: its mtime to the
# nanosecond and its inode (a file replaced by a rename keeps neither). A path whose file still
# has all three is not hashed again (daemon.seen). NULL in rows recorded before this step.
_OBSERVATION_IDENTITY = """
ALTER TABLE source_paths ADD COLUMN mtime_ns INTEGER;
ALTER TABLE source_paths ADD COLUMN inode INTEGER;
"""

# Which process made a run's outputs: "HOST:PID" for a local worker, "NAME@HOST:PID" for a
# cluster worker on another machine (daemon.cluster). NULL in rows recorded before this step.
# (The cluster's part of this step adds its registry of workers: see daemon.cluster.registry.)
_RUN_WORKER = """
ALTER TABLE runs ADD COLUMN worker TEXT;
"""

# The provenance tables' history; daemon.store.store merges it with the queue's.
PROVENANCE_MIGRATIONS: tuple[Migration, ...] = (
    Migration("0001_provenance", script(_PROVENANCE)),
    Migration("0003_publication", script(_RUN_TOKEN)),
    Migration("0004_observation_identity", script(_OBSERVATION_IDENTITY)),
    Migration("0006_cluster", script(_RUN_WORKER)),
)


class Provenance(Connection):
    """Writes and reads of the provenance tables over the database's connection."""

    def record_observation(
        self,
        path: str,
        source_sha256: str,
        *,
        size: int,
        modified_at: datetime | None = None,
        mtime_ns: int | None = None,
        inode: int | None = None,
    ) -> Observation:
        """Record that `path` (relative to the watch root) holds these bytes, as the file of
        this size, mtime and inode. A repeat of the path's latest observation is not written
        again; another name for the same bytes is."""
        modified = None if modified_at is None else timestamp(modified_at)
        version = (size, modified, mtime_ns, inode)
        with self.transaction():
            self.conn.execute(
                "INSERT INTO sources (source_sha256, size, first_seen_at) VALUES (?, ?, ?) "
                "ON CONFLICT (source_sha256) DO NOTHING",
                (source_sha256, size, self.now()),
            )
            latest = self.conn.execute(
                "SELECT id, source_sha256, size, modified_at, mtime_ns, inode FROM source_paths "
                "WHERE path = ? ORDER BY id DESC LIMIT 1",
                (db_path(path),),
            ).fetchone()
            if latest is not None and latest[1:] == (source_sha256, *version):
                return self._observations("id = ?", (latest[0],))[0]
            return self._observe(path, source_sha256, *version)

    def record_removal(self, path: str) -> Observation | None:
        """Record that `path` is gone (so the fixity audit stops expecting it there)."""
        with self.transaction():
            latest = self.latest_observation(path)
            if latest is None or latest.source_sha256 is None:
                return latest
            return self._observe(path, None, None, None, None, None)

    def _observe(
        self,
        path: str,
        sha: str | None,
        size: int | None,
        modified: str | None,
        mtime_ns: int | None,
        inode: int | None,
    ) -> Observation:
        row_id = self.conn.execute(
            "INSERT INTO source_paths "
            "(path, source_sha256, size, modified_at, mtime_ns, inode, seen_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (db_path(path), sha, size, modified, mtime_ns, inode, self.now()),
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
        worker: str | None = None,
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
                    "worker": worker,
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

    def latest_observation(self, path: str) -> Observation | None:
        rows = self._observations("path = ? ORDER BY id DESC LIMIT 1", (db_path(path),))
        return rows[0] if rows else None

    def latest_observations(self) -> Iterator[Observation]:
        """Each path's latest observation, in path order (removals included: their hash is
        None). One pass over the table, for seeding what a restart need not hash again."""
        rows = self.db.query(
            "SELECT * FROM source_paths p "
            "WHERE id = (SELECT max(id) FROM source_paths WHERE path = p.path) ORDER BY path"
        )
        return (_observation(row) for row in rows)

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

    def sources(self) -> list[tuple[str, int, datetime]]:
        """Every source recorded: (source_sha256, size, first_seen_at), first seen first."""
        rows = self.conn.execute(
            "SELECT source_sha256, size, first_seen_at FROM sources ORDER BY first_seen_at, rowid"
        )
        return [(sha, size, datetime.fromisoformat(seen)) for sha, size, seen in rows]

    def observations_of(self, source_sha256: str) -> list[Observation]:
        """Every observation of these bytes, under any path, oldest first."""
        return self._observations("source_sha256 = ? ORDER BY id", (source_sha256,))

    def runs_of(self, source_sha256: str) -> list[RunRecord]:
        """Every run of these bytes, oldest first, with its recipe, stages and outputs."""
        return self._runs("r.source_sha256 = ?", (source_sha256,))

    def _observations(self, where: str, params: Sequence[Any]) -> list[Observation]:
        rows = self.db.query(f"SELECT * FROM source_paths WHERE {where}", params)
        return [_observation(row) for row in rows]

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

    def recipe(self, recipe_sha256: str) -> dict[str, Any] | None:
        """The recipe recorded under this hash, None if there is none."""
        row = self.conn.execute(
            "SELECT recipe_json FROM recipes WHERE recipe_sha256 = ?", (recipe_sha256,)
        ).fetchone()
        return json.loads(row[0]) if row else None

    def recorded_versions(self, stem_path: str) -> set[int]:
        """The version numbers of every output recorded as `<stem_path>.v<N>.<suffix>`
        (`stem_path` relative to the output root, like the outputs' paths)."""
        prefix = f"{stem_path}.v"
        pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
        stored = db_path(prefix)  # bytes (a BLOB, measured in bytes) for a name not UTF-8
        rows = self.conn.execute(
            "SELECT path FROM outputs WHERE substr(path, 1, ?) = ?", (len(stored), stored)
        )
        return {int(m.group(1)) for (p,) in rows if (m := pattern.match(path_from_db(p)))}

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
            started_at=datetime.fromisoformat(row["started_at"]),
            finished_at=datetime.fromisoformat(row["finished_at"]),
            device=row["device"],
            code_version=row["code_version"],
            error=row["error"],
            stages=stages,
            outputs=outputs,
            run_token=row["run_token"],
            worker=row["worker"],
        )

    def events(
        self,
        *,
        kinds: Sequence[str] | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        path: str | None = None,
        source_sha256: str | None = None,
        limit: int | None = None,
    ) -> list[Event]:
        """Events, newest first, filtered by kind, time (both bounds inclusive), path and
        source."""
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
        if source_sha256 is not None:
            clauses.append("source_sha256 = ?")
            args.append(source_sha256)
        return self._events(" AND ".join(clauses), args, limit)

    def _events(self, where: str, args: Sequence[Any], limit: int | None = None) -> list[Event]:
        sql = f"SELECT * FROM events WHERE {where} ORDER BY occurred_at DESC, id DESC"
        if limit is not None:
            sql, args = sql + " LIMIT ?", [*args, limit]
        return [
            Event(
                id=row["id"],
                occurred_at=datetime.fromisoformat(row["occurred_at"]),
                kind=row["kind"],
                path=None if row["path"] is None else path_from_db(row["path"]),
                source_sha256=row["source_sha256"],
                detail=json.loads(row["detail_json"]),
            )
            for row in self.db.query(sql, args)
        ]


def _observation(row: Mapping[str, Any]) -> Observation:
    return Observation(
        id=row["id"],
        path=path_from_db(row["path"]),
        source_sha256=row["source_sha256"],
        size=row["size"],
        modified_at=from_timestamp(row["modified_at"]),
        seen_at=datetime.fromisoformat(row["seen_at"]),
        mtime_ns=row["mtime_ns"],
        inode=row["inode"],
    )


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
