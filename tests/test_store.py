"""The database and its provenance: migrations, append-only tables, history, fixity, backup."""

from __future__ import annotations

import os
import sqlite3
import threading
from contextlib import closing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from daemon.queue import JobQueue
from daemon.store import (
    FIXITY_AUDIT,
    FIXITY_MISMATCH,
    FIXITY_MISSING,
    MIGRATIONS,
    PROVENANCE_TABLES,
    BackupExistsError,
    FixityItem,
    Migration,
    OutputFile,
    SchemaTooNewError,
    StoreError,
    UnknownReferenceError,
    canonical_json,
    merge_histories,
    open_database,
    recipe_sha256,
    timestamp,
)
from pipeline.files import sha256_file

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
SHA_A, SHA_B, SHA_C = ("a" * 64, "b" * 64, "c" * 64)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(tmp_path, clock):
    with open_database(tmp_path / "state" / "scanrestore.db", clock=clock) as store:
        yield store


def recipe(model: str = "realesrgan-x4plus", scale: int = 4) -> dict:
    return {
        "code_version": "0.1.0",
        "chain": [{"stage": "upscale", "version": 1, "options": {"scale": scale}}],
        "models": {model: "f" * 64},
    }


def upscale_record(seconds: float = 1.5) -> dict:
    return {
        "stage": "upscale",
        "version": 1,
        "params": {"model": "realesrgan-x4plus", "model_sha256": "f" * 64, "tile": 192},
        "seconds": seconds,
        "skipped": None,
    }


def record_done(store, clock, path, sha, recipe_sha, version, *, out_sha=SHA_C):
    started = clock()
    clock.advance(10)
    return store.record_run(
        source_sha256=sha,
        path=path,
        recipe_sha256=recipe_sha,
        status="done",
        started_at=started,
        finished_at=clock(),
        code_version="0.1.0",
        device="cpu",
        stages=[upscale_record()],
        outputs=[OutputFile(f"{Path(path).stem}.v{version}.tif", version, out_sha, 1234)],
    )


# ---------------------------------------------------------------- opening and migrations


def test_migrations_are_recorded_once_with_their_time_and_reopening_applies_nothing(
    tmp_path, clock
):
    db = tmp_path / "scanrestore.db"
    with open_database(db, clock=clock) as store:
        rows = store.conn.execute("SELECT name, applied_at FROM migrations").fetchall()
    assert rows == [(m.name, T0.isoformat(timespec="microseconds")) for m in MIGRATIONS]
    clock.advance(60)
    with open_database(db, clock=clock) as again:
        assert again.migrate() == []
        assert again.conn.execute("SELECT count(*) FROM migrations").fetchone()[0] == len(
            MIGRATIONS
        )


def test_a_database_migrated_by_a_newer_version_is_refused_naming_the_migration(tmp_path):
    db = tmp_path / "scanrestore.db"
    with open_database(db) as store:
        store.conn.execute(
            "INSERT INTO migrations (name, applied_at) VALUES ('0099_future', '2030-01-01')"
        )
    with pytest.raises(SchemaTooNewError, match="0099_future") as caught:
        open_database(db)
    assert caught.value.unknown == ("0099_future",) and str(db) in str(caught.value)


def test_a_failing_migration_is_rolled_back_and_stays_pending(tmp_path):
    def broken(db):
        db.execute("CREATE TABLE half_done (x INTEGER)")
        raise RuntimeError("migration bug")

    db = tmp_path / "scanrestore.db"
    with pytest.raises(RuntimeError, match="migration bug"):
        open_database(db, migrations=(*MIGRATIONS, Migration("0003_broken", broken)))
    with open_database(db) as store:
        assert store.applied_migrations() == [m.name for m in MIGRATIONS]
        assert "half_done" not in store.db.table_names()


def test_processes_opening_a_new_file_at_once_apply_each_migration_once(tmp_path):
    db = tmp_path / "scanrestore.db"
    errors: list[BaseException] = []

    def open_and_close() -> None:
        try:
            open_database(db).close()
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=open_and_close) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with open_database(db) as store:
        assert store.applied_migrations() == [m.name for m in MIGRATIONS]


OLD_DATABASE = Path(__file__).parent / "data" / "database_a55d7c5.sql"


def _schema(conn: sqlite3.Connection) -> list[tuple]:
    return conn.execute(
        "SELECT type, name, tbl_name, sql FROM sqlite_master ORDER BY type, name"
    ).fetchall()


def test_a_database_written_before_the_split_reopens_with_its_names_and_runs_only_new_steps(
    tmp_path, clock
):
    """A file the single-module store wrote (its 0001..0003, the jobs table's included) is
    opened by the store and queue of today: no recorded migration runs again, only newer
    ones do, its rows read back, and its schema ends up identical to a new file's."""
    old = tmp_path / "old.db"
    with closing(sqlite3.connect(old)) as conn:
        conn.executescript(OLD_DATABASE.read_text())
    before = ["0001_provenance", "0002_jobs", "0003_publication"]
    clock.advance(86400)  # the file's own steps were recorded at T0 and just after
    with open_database(old, clock=clock) as store:
        applied = store.applied_migrations()
        assert applied[:3] == before
        assert applied == [m.name for m in MIGRATIONS]
        newer = [m.name for m in MIGRATIONS if m.name not in before]
        recorded = store.conn.execute("SELECT name, applied_at FROM migrations").fetchall()
        assert [name for name, at in recorded if at == timestamp(clock())] == newer
        [run] = store.history("album/a.png")
        assert run.run_token == "00112233aabbccdd" and run.outputs[0].path == "album/a.v1.png"
        queue = JobQueue(store)
        assert queue.counts()["done"] == 1 and queue.counts()["queued"] == 1
        assert queue.claim("new-daemon").path == "album/b.png"
        migrated = _schema(store.conn)
    with open_database(tmp_path / "new.db", clock=clock) as fresh:
        assert _schema(fresh.conn) == migrated


def test_owners_histories_merge_by_number_and_a_shared_step_runs_once(tmp_path):
    ran: list[str] = []
    store_steps = [
        Migration("0001_a", lambda db: ran.append("store 1")),
        Migration("0003_c", lambda db: ran.append("store 3")),
    ]
    queue_steps = [
        Migration("0002_b", lambda db: ran.append("queue 2")),
        Migration("0003_c", lambda db: ran.append("queue 3")),
    ]
    merged = merge_histories(store_steps, queue_steps)
    assert [m.name for m in merged] == ["0001_a", "0002_b", "0003_c"]
    with open_database(tmp_path / "x.db", migrations=merged) as store:
        assert store.applied_migrations() == ["0001_a", "0002_b", "0003_c"]
    assert ran == ["store 1", "queue 2", "store 3", "queue 3"]
    with pytest.raises(ValueError, match="'later': name must be NNNN_words"):
        merge_histories([Migration("later", lambda db: None)])


def test_the_connection_uses_wal_full_sync_and_foreign_keys(store):
    pragma = lambda name: store.conn.execute(f"PRAGMA {name}").fetchone()[0]  # noqa: E731
    assert pragma("journal_mode") == "wal"
    assert pragma("synchronous") == 2  # FULL
    assert pragma("foreign_keys") == 1
    assert pragma("busy_timeout") == 30_000


def test_a_file_that_is_not_a_database_is_refused_with_its_path(tmp_path):
    bogus = tmp_path / "scanrestore.db"
    bogus.write_bytes(b"this is not sqlite " * 100)
    with pytest.raises(StoreError, match=r"scanrestore\.db: cannot open"):
        open_database(bogus)


# ---------------------------------------------------------------- append-only provenance


def populate(store, clock) -> None:
    recipe_sha = store.record_recipe(recipe())
    store.record_observation("a.tif", SHA_A, size=10)
    record_done(store, clock, "a.tif", SHA_A, recipe_sha, 1)
    store.record_event("note", path="a.tif")


@pytest.mark.parametrize("table", PROVENANCE_TABLES)
def test_every_provenance_table_rejects_update_and_delete(store, clock, table):
    populate(store, clock)
    column = store.conn.execute(f"SELECT name FROM pragma_table_info('{table}')").fetchone()[0]
    assert store.conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] > 0
    with pytest.raises(sqlite3.IntegrityError, match=f"{table} is append-only: UPDATE"):
        store.conn.execute(f"UPDATE {table} SET {column} = {column}")
    with pytest.raises(sqlite3.IntegrityError, match=f"{table} is append-only: DELETE"):
        store.conn.execute(f"DELETE FROM {table}")


def test_insert_or_replace_cannot_rewrite_a_provenance_row(store):
    store.record_observation("a.tif", SHA_A, size=10)
    with pytest.raises(sqlite3.IntegrityError, match="sources is append-only: DELETE"):
        store.conn.execute(
            "INSERT OR REPLACE INTO sources (source_sha256, size, first_seen_at) "
            "VALUES (?, 99, 'x')",
            (SHA_A,),
        )
    assert store.conn.execute("SELECT size FROM sources").fetchall() == [(10,)]


# ---------------------------------------------------------------- sources and recipes


def test_a_second_name_for_the_same_bytes_is_recorded_but_a_repeat_is_not(store, clock):
    first = store.record_observation("inbox/a.tif", SHA_A, size=10, modified_at=T0)
    clock.advance(5)
    repeat = store.record_observation("inbox/a.tif", SHA_A, size=10, modified_at=T0)
    copy = store.record_observation("inbox/copy of a.tif", SHA_A, size=10, modified_at=T0)
    assert repeat == first
    assert store.paths_of(SHA_A) == ["inbox/a.tif", "inbox/copy of a.tif"]
    assert copy.seen_at == T0 + timedelta(seconds=5)
    assert store.conn.execute("SELECT count(*) FROM sources").fetchone()[0] == 1


def test_new_bytes_and_removal_at_a_path_are_observations_in_order(store):
    store.record_observation("a.tif", SHA_A, size=10)
    store.record_observation("a.tif", SHA_B, size=11)
    store.record_removal("a.tif")
    assert store.record_removal("a.tif").source_sha256 is None  # not recorded twice
    assert [o.source_sha256 for o in store.observations("a.tif")] == [SHA_A, SHA_B, None]
    assert store.latest_observation("a.tif").source_sha256 is None


def test_the_recipe_hash_ignores_key_order_and_refuses_nan():
    a = {"chain": [{"stage": "upscale", "version": 1}], "code_version": "1"}
    b = {"code_version": "1", "chain": [{"version": 1, "stage": "upscale"}]}
    assert recipe_sha256(a) == recipe_sha256(b)
    assert recipe_sha256(a) != recipe_sha256({**a, "code_version": "2"})
    with pytest.raises(ValueError):
        canonical_json({"strength": float("nan")})


def test_recording_a_recipe_twice_keeps_one_row_and_returns_its_hash(store):
    assert store.record_recipe(recipe()) == store.record_recipe(recipe()) == recipe_sha256(recipe())
    assert store.conn.execute("SELECT count(*) FROM recipes").fetchone()[0] == 1


# ---------------------------------------------------------------- runs and history


def test_a_run_records_real_stage_records_with_model_and_device(store, clock):
    from pipeline.chain import StageRecord

    recipe_sha = store.record_recipe(recipe())
    store.record_observation("a.tif", SHA_A, size=10)
    records = [
        StageRecord("denoise", 2, {"method": "nlm", "h": 3.0}, 0.25),
        StageRecord(
            "upscale",
            1,
            {"model": "realesrgan-x4plus", "model_sha256": "f" * 64, "device": "cuda:0"},
            2.0,
        ),
        StageRecord("face", 1, {}, 0.0, skipped="no faces found"),
    ]
    run_id = store.record_run(
        source_sha256=SHA_A,
        path="a.tif",
        recipe_sha256=recipe_sha,
        status="done",
        started_at=T0,
        finished_at=T0 + timedelta(seconds=3),
        code_version="0.1.0",
        device="cpu",
        job_id=7,
        stages=[r.as_dict() for r in records],
        outputs=[
            OutputFile("a.v1.tif", 1, SHA_C, 4096),
            OutputFile("a.v1.mask.png", 1, SHA_B, 100, kind="mask"),
        ],
    )
    run = store.run(run_id)
    assert (run.job_id, run.recipe, run.device) == (7, recipe(), "cpu")
    assert [(s.stage, s.version, s.model_id, s.device, s.skipped) for s in run.stages] == [
        ("denoise", 2, None, "cpu", None),
        ("upscale", 1, "realesrgan-x4plus", "cuda:0", None),
        ("face", 1, None, "cpu", "no faces found"),
    ]
    assert run.stages[1].model_sha256 == "f" * 64 and run.stages[0].params["h"] == 3.0
    assert [o.kind for o in run.outputs] == ["image", "mask"]


def test_a_run_naming_an_unrecorded_source_or_recipe_is_refused(store, clock):
    recipe_sha = store.record_recipe(recipe())
    with pytest.raises(UnknownReferenceError, match=f"no source_sha256 {SHA_A}"):
        record_done(store, clock, "a.tif", SHA_A, recipe_sha, 1)
    store.record_observation("a.tif", SHA_A, size=10)
    with pytest.raises(UnknownReferenceError, match="no recipe_sha256"):
        record_done(store, clock, "a.tif", SHA_A, "0" * 64, 1)
    assert store.conn.execute("SELECT count(*) FROM runs").fetchone()[0] == 0


def test_only_a_done_run_has_outputs_and_stage_records_are_checked(store):
    store.record_observation("a.tif", SHA_A, size=10)
    recipe_sha = store.record_recipe(recipe())
    common = dict(
        source_sha256=SHA_A,
        path="a.tif",
        recipe_sha256=recipe_sha,
        started_at=T0,
        finished_at=T0,
        code_version="0.1.0",
    )
    with pytest.raises(ValueError, match="a failed run has no outputs"):
        store.record_run(**common, status="failed", outputs=[OutputFile("a.v1.tif", 1, SHA_C, 1)])
    with pytest.raises(ValueError, match=r"unknown \['mask'\]"):
        store.record_run(**common, status="done", stages=[{**upscale_record(), "mask": 1}])
    failed = store.record_run(**common, status="failed", error="DecodeError: truncated")
    assert store.recent_runs(status="failed")[0].id == failed


def test_history_lists_every_version_with_its_recipe_and_links_duplicates(store, clock):
    store.record_observation("a.tif", SHA_A, size=10)
    first_recipe = store.record_recipe(recipe(scale=4))
    second_recipe = store.record_recipe(recipe(scale=2))
    v1 = record_done(store, clock, "a.tif", SHA_A, first_recipe, 1)
    v2 = record_done(store, clock, "a.tif", SHA_A, second_recipe, 2)
    store.record_observation("copy.tif", SHA_A, size=10)  # same bytes, another name
    store.record_observation("a.tif", SHA_B, size=12)  # the file was replaced
    v3 = record_done(store, clock, "a.tif", SHA_B, second_recipe, 3)
    store.record_observation("other.tif", SHA_C, size=5)
    record_done(store, clock, "other.tif", SHA_C, second_recipe, 1)

    history = store.history("a.tif")
    assert [(r.id, r.source_sha256, r.recipe["chain"][0]["options"]["scale"]) for r in history] == [
        (v1, SHA_A, 4),
        (v2, SHA_A, 2),
        (v3, SHA_B, 2),
    ]
    assert [r.outputs[0].version for r in history] == [1, 2, 3]
    assert [r.stages[0].stage for r in history] == ["upscale"] * 3
    linked = store.history("copy.tif")
    assert [(r.id, r.path) for r in linked] == [(v1, "a.tif"), (v2, "a.tif")]


def test_done_run_for_finds_the_latest_success_of_these_bytes_and_recipe(store, clock):
    store.record_observation("a.tif", SHA_A, size=10)
    recipe_sha = store.record_recipe(recipe())
    assert store.done_run_for(SHA_A, recipe_sha) is None
    record_done(store, clock, "a.tif", SHA_A, recipe_sha, 1)
    latest = record_done(store, clock, "a.tif", SHA_A, recipe_sha, 2)
    store.record_run(
        source_sha256=SHA_A,
        path="a.tif",
        recipe_sha256=recipe_sha,
        status="failed",
        started_at=clock(),
        finished_at=clock(),
        code_version="0.1.0",
        error="boom",
    )
    found = store.done_run_for(SHA_A, recipe_sha)
    assert found.id == latest and found.outputs[0].path == "a.v2.tif"
    assert store.done_run_for(SHA_A, store.record_recipe(recipe(scale=2))) is None


def test_events_filter_by_kind_time_and_path_newest_first(store, clock):
    store.record_event("duplicate", path="copy.tif", detail={"run_id": 1})
    clock.advance(60)
    store.record_event("worker_died", path="a.tif", source_sha256=SHA_A, detail={"signal": 9})
    clock.advance(60)
    store.record_event("duplicate", path="copy2.tif")
    assert [e.path for e in store.events(kinds=["duplicate"])] == ["copy2.tif", "copy.tif"]
    assert [e.kind for e in store.events(since=T0 + timedelta(seconds=60))] == [
        "duplicate",
        "worker_died",
    ]
    died = store.events(path="a.tif")
    assert len(died) == 1 and died[0].detail == {"signal": 9} and died[0].source_sha256 == SHA_A
    assert store.events(limit=1)[0].path == "copy2.tif"


# ---------------------------------------------------------------- transactions


def test_a_failed_inner_transaction_rolls_back_only_its_own_writes(store):
    with store.transaction():
        store.record_event("kept")
        with pytest.raises(RuntimeError), store.transaction():
            store.record_event("undone")
            raise RuntimeError("inner failure")
    assert [e.kind for e in store.events()] == ["kept"]


def test_an_exception_in_a_transaction_leaves_nothing(store):
    with pytest.raises(RuntimeError), store.transaction():
        store.record_observation("a.tif", SHA_A, size=10)
        store.record_event("seen")
        raise RuntimeError("crash before commit")
    assert store.observations("a.tif") == [] and store.events() == []


# ---------------------------------------------------------------- fixity


def test_fixity_items_are_each_paths_latest_original_and_every_output(store, clock):
    recipe_sha = store.record_recipe(recipe())
    store.record_observation("a.tif", SHA_A, size=10)
    store.record_observation("a.tif", SHA_B, size=10)  # replaced: only SHA_B is expected
    store.record_observation("gone.tif", SHA_C, size=10)
    store.record_removal("gone.tif")
    run_id = record_done(store, clock, "a.tif", SHA_B, recipe_sha, 1, out_sha="d" * 64)
    assert store.fixity_items() == [
        FixityItem("original", "a.tif", SHA_B),
        FixityItem("output", "a.v1.tif", "d" * 64, run_id),
    ]


def test_the_audit_records_missing_and_changed_files_and_status_shows_them(tmp_path, store, clock):
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    out.mkdir()
    for name, content in (("a.tif", b"original a"), ("b.tif", b"original b")):
        (inbox / name).write_bytes(content)
        store.record_observation(name, sha256_file(inbox / name), size=len(content))
    (out / "a.v1.tif").write_bytes(b"restored a")
    recipe_sha = store.record_recipe(recipe())
    record_done(
        store, clock, "a.tif", sha256_file(inbox / "a.tif"), recipe_sha, 1,
        out_sha=sha256_file(out / "a.v1.tif"),
    )  # fmt: skip

    def locate(item: FixityItem) -> Path:
        return (inbox if item.kind == "original" else out) / item.path

    clean = store.audit_fixity(locate)
    assert (clean.checked, clean.problems) == (3, ())
    assert store.fixity_status().problems == ()

    clock.advance(86_400)
    (inbox / "b.tif").write_bytes(b"bit rot")
    (out / "a.v1.tif").unlink()
    report = store.audit_fixity(locate)
    assert report.checked == 3
    kinds = {(e.kind, e.path) for e in report.problems}
    assert kinds == {(FIXITY_MISMATCH, "b.tif"), (FIXITY_MISSING, "a.v1.tif")}
    mismatch = next(e for e in report.problems if e.kind == FIXITY_MISMATCH)
    assert mismatch.detail["actual_sha256"] == sha256_file(inbox / "b.tif")
    status = store.fixity_status()
    assert status.finished_at == T0 + timedelta(seconds=10 + 86_400)
    assert [e.id for e in status.problems] == [e.id for e in report.problems]
    assert store.events(kinds=[FIXITY_AUDIT])[0].detail["problems"] == 2


def test_fixity_status_is_none_before_any_audit(store):
    assert store.fixity_status() is None


# ---------------------------------------------------------------- backup


def test_a_backup_is_a_valid_copy_and_is_never_written_over(tmp_path, store, clock):
    populate(store, clock)
    dest = tmp_path / "backups" / "scanrestore-2024-05-01.db"
    assert store.backup(dest) == dest
    with sqlite3.connect(dest) as copy:
        assert copy.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert copy.execute("SELECT path FROM runs").fetchall() == [("a.tif",)]
    copy.close()
    before = dest.read_bytes()
    store.record_event("later")
    with pytest.raises(BackupExistsError, match="never overwrites"):
        store.backup(dest)
    assert dest.read_bytes() == before
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name]


def test_a_backup_opens_as_a_current_database(tmp_path, store, clock):
    populate(store, clock)
    dest = store.backup(tmp_path / "copy.db")
    with open_database(dest) as copy:
        assert copy.history("a.tif")[0].outputs == store.history("a.tif")[0].outputs
        assert copy.migrate() == []


# ---------------------------------------------------------------- file names


def test_a_file_name_that_is_not_utf8_round_trips_everywhere(store, clock):
    latin1 = os.fsdecode(b"caf\xe9 1950.tif")  # how the watcher names it: surrogate escapes
    output = os.fsdecode(b"caf\xe9 1950.v1.tif")
    recipe_sha = store.record_recipe(recipe())
    store.record_observation(latin1, SHA_A, size=10)
    store.record_observation("café 1950.tif", SHA_A, size=10)  # a real UTF-8 name stays text
    record_done(store, clock, latin1, SHA_A, recipe_sha, 1)
    store.record_event("duplicate", path=latin1, detail={"file": latin1})
    store.record_run(
        source_sha256=SHA_A,
        path=latin1,
        recipe_sha256=recipe_sha,
        status="done",
        started_at=T0,
        finished_at=T0,
        code_version="0.1.0",
        outputs=[OutputFile(output, 2, SHA_C, 1)],
    )
    assert store.paths_of(SHA_A) == [latin1, "café 1950.tif"]
    assert [run.path for run in store.history(latin1)] == [latin1, latin1]
    assert store.history(latin1)[1].outputs[0].path == output
    (event,) = store.events(path=latin1)
    assert event.path == latin1 and event.detail == {"file": latin1}
    assert FixityItem("output", output, SHA_C, 2) in store.fixity_items()
    types = store.conn.execute("SELECT typeof(path) FROM source_paths ORDER BY id").fetchall()
    assert types == [("blob",), ("text",)]
