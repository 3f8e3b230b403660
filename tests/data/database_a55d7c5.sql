-- A database written by scanrestore at commit a55d7c5 (daemon/store.py before the split): its
-- migrations 0001_provenance, 0002_jobs, 0003_publication and a few rows, dumped with
-- sqlite3's iterdump. tests/test_store.py opens it with the current code.
BEGIN TRANSACTION;
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    occurred_at TEXT NOT NULL,
    kind TEXT NOT NULL,
    path ANY,
    source_sha256 TEXT,
    detail_json TEXT NOT NULL
) STRICT;
INSERT INTO "events" VALUES(1,'2024-05-01T12:00:17.000000+00:00','refused','link.png',NULL,'{"reason":"not a regular file: symbolic link"}');
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
    finished_at TEXT, publishing TEXT,
    CHECK ((state = 'running') = (lease_id IS NOT NULL AND lease_owner IS NOT NULL
        AND lease_process IS NOT NULL AND lease_expires_at IS NOT NULL
        AND lease_expires_mono IS NOT NULL)),
    CHECK (state != 'quarantined' OR quarantine_reason IS NOT NULL)
) STRICT;
INSERT INTO "jobs" VALUES(1,'album/a.png','aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa','fd5ddeac8cbe64cb735ad15cc8fdc44cf1d622b88abcfdcae2499e293138b445','done',0,1,0,0,NULL,NULL,NULL,NULL,NULL,'2024-05-01T12:00:12.000000+00:00','2024-05-01T12:00:11.000000+00:00',NULL,NULL,'2024-05-01T12:00:11.000000+00:00','2024-05-01T12:00:14.000000+00:00','2024-05-01T12:00:13.000000+00:00',NULL);
INSERT INTO "jobs" VALUES(2,'album/b.png','bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb','fd5ddeac8cbe64cb735ad15cc8fdc44cf1d622b88abcfdcae2499e293138b445','queued',0,0,0,0,NULL,NULL,NULL,NULL,NULL,NULL,'2024-05-01T12:00:16.000000+00:00',NULL,NULL,'2024-05-01T12:00:16.000000+00:00','2024-05-01T12:00:16.000000+00:00',NULL,NULL);
CREATE TABLE migrations (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL) STRICT;
INSERT INTO "migrations" VALUES('0001_provenance','2024-05-01T12:00:00.000000+00:00');
INSERT INTO "migrations" VALUES('0002_jobs','2024-05-01T12:00:01.000000+00:00');
INSERT INTO "migrations" VALUES('0003_publication','2024-05-01T12:00:02.000000+00:00');
CREATE TABLE outputs (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs (id),
    path ANY NOT NULL,
    version INTEGER NOT NULL CHECK (version >= 1),
    kind TEXT NOT NULL CHECK (kind IN ('image', 'mask', 'provenance')),
    output_sha256 TEXT NOT NULL,
    bytes INTEGER NOT NULL CHECK (bytes >= 0)
) STRICT;
INSERT INTO "outputs" VALUES(1,1,'album/a.v1.png',1,'image','cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc',1234);
CREATE TABLE recipes (
    recipe_sha256 TEXT PRIMARY KEY,
    recipe_json TEXT NOT NULL,
    first_used_at TEXT NOT NULL
) STRICT;
INSERT INTO "recipes" VALUES('fd5ddeac8cbe64cb735ad15cc8fdc44cf1d622b88abcfdcae2499e293138b445','{"code_version":"0.1.0","stages":[{"stage":"upscale","version":1}]}','2024-05-01T12:00:03.000000+00:00');
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
, run_token TEXT) STRICT;
INSERT INTO "runs" VALUES(1,1,'aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa','album/a.png','fd5ddeac8cbe64cb735ad15cc8fdc44cf1d622b88abcfdcae2499e293138b445','done','2024-05-01T12:00:00.000000+00:00','2024-05-01T12:00:03.000000+00:00','cpu','0.1.0',NULL,'00112233aabbccdd');
CREATE TABLE source_paths (
    id INTEGER PRIMARY KEY,
    path ANY NOT NULL,
    source_sha256 TEXT REFERENCES sources (source_sha256),
    size INTEGER,
    modified_at TEXT,
    seen_at TEXT NOT NULL
) STRICT;
INSERT INTO "source_paths" VALUES(1,'album/a.png','aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa',10,'2024-05-01T12:00:00.000000+00:00','2024-05-01T12:00:05.000000+00:00');
INSERT INTO "source_paths" VALUES(2,'album/b.png','bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb',20,'2024-05-01T12:00:00.000000+00:00','2024-05-01T12:00:07.000000+00:00');
INSERT INTO "source_paths" VALUES(3,'copy of a.png','aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa',10,'2024-05-01T12:00:00.000000+00:00','2024-05-01T12:00:09.000000+00:00');
CREATE TABLE sources (
    source_sha256 TEXT PRIMARY KEY,
    size INTEGER NOT NULL CHECK (size >= 0),
    first_seen_at TEXT NOT NULL
) STRICT;
INSERT INTO "sources" VALUES('aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa',10,'2024-05-01T12:00:04.000000+00:00');
INSERT INTO "sources" VALUES('bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb',20,'2024-05-01T12:00:06.000000+00:00');
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
INSERT INTO "stage_runs" VALUES(1,0,'upscale',1,'m','ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff','{"model":"m","model_sha256":"ffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff"}',1.0,'cpu',NULL);
CREATE INDEX source_paths_path ON source_paths (path, id);
CREATE INDEX source_paths_sha ON source_paths (source_sha256);
CREATE INDEX runs_key ON runs (source_sha256, recipe_sha256, status);
CREATE INDEX runs_path ON runs (path);
CREATE INDEX outputs_run ON outputs (run_id);
CREATE INDEX events_kind ON events (kind, occurred_at);
CREATE INDEX events_path ON events (path);
CREATE TRIGGER migrations_no_update BEFORE UPDATE ON migrations BEGIN SELECT RAISE(ABORT, 'migrations is append-only: UPDATE is not allowed'); END;
CREATE TRIGGER migrations_no_delete BEFORE DELETE ON migrations BEGIN SELECT RAISE(ABORT, 'migrations is append-only: DELETE is not allowed'); END;
CREATE TRIGGER sources_no_update BEFORE UPDATE ON sources BEGIN SELECT RAISE(ABORT, 'sources is append-only: UPDATE is not allowed'); END;
CREATE TRIGGER sources_no_delete BEFORE DELETE ON sources BEGIN SELECT RAISE(ABORT, 'sources is append-only: DELETE is not allowed'); END;
CREATE TRIGGER source_paths_no_update BEFORE UPDATE ON source_paths BEGIN SELECT RAISE(ABORT, 'source_paths is append-only: UPDATE is not allowed'); END;
CREATE TRIGGER source_paths_no_delete BEFORE DELETE ON source_paths BEGIN SELECT RAISE(ABORT, 'source_paths is append-only: DELETE is not allowed'); END;
CREATE TRIGGER recipes_no_update BEFORE UPDATE ON recipes BEGIN SELECT RAISE(ABORT, 'recipes is append-only: UPDATE is not allowed'); END;
CREATE TRIGGER recipes_no_delete BEFORE DELETE ON recipes BEGIN SELECT RAISE(ABORT, 'recipes is append-only: DELETE is not allowed'); END;
CREATE TRIGGER runs_no_update BEFORE UPDATE ON runs BEGIN SELECT RAISE(ABORT, 'runs is append-only: UPDATE is not allowed'); END;
CREATE TRIGGER runs_no_delete BEFORE DELETE ON runs BEGIN SELECT RAISE(ABORT, 'runs is append-only: DELETE is not allowed'); END;
CREATE TRIGGER stage_runs_no_update BEFORE UPDATE ON stage_runs BEGIN SELECT RAISE(ABORT, 'stage_runs is append-only: UPDATE is not allowed'); END;
CREATE TRIGGER stage_runs_no_delete BEFORE DELETE ON stage_runs BEGIN SELECT RAISE(ABORT, 'stage_runs is append-only: DELETE is not allowed'); END;
CREATE TRIGGER outputs_no_update BEFORE UPDATE ON outputs BEGIN SELECT RAISE(ABORT, 'outputs is append-only: UPDATE is not allowed'); END;
CREATE TRIGGER outputs_no_delete BEFORE DELETE ON outputs BEGIN SELECT RAISE(ABORT, 'outputs is append-only: DELETE is not allowed'); END;
CREATE TRIGGER events_no_update BEFORE UPDATE ON events BEGIN SELECT RAISE(ABORT, 'events is append-only: UPDATE is not allowed'); END;
CREATE TRIGGER events_no_delete BEFORE DELETE ON events BEGIN SELECT RAISE(ABORT, 'events is append-only: DELETE is not allowed'); END;
CREATE UNIQUE INDEX jobs_one_active ON jobs (path, source_sha256, recipe_sha256)
    WHERE state IN ('queued', 'running', 'failed');
CREATE INDEX jobs_due ON jobs (state, next_attempt_at, id);
CREATE INDEX jobs_key ON jobs (source_sha256, recipe_sha256, state);
CREATE INDEX jobs_path ON jobs (path, recipe_sha256);
CREATE INDEX runs_token ON runs (run_token);
COMMIT;
