"""The daemon end to end: real folders, a real SQLite file, real worker processes, a tiny model.

Most tests run `scanrestore watch --once` in-process; those about signals and crashes run the
daemon as a real subprocess.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from conftest import CORPUS, shared_file
from modelfactory import nearest_compact, tiny_compact

from daemon.cli import main
from pipeline.files import sha256_file

REPO = Path(__file__).resolve().parents[1]
SET5 = "corpus/sr_benchmark/Set5/HR"


class Site:
    """A watched folder, an output folder, a state folder and a config file."""

    def __init__(self, root: Path, model: Path, **sections: dict) -> None:
        self.root = root
        self.scans, self.out, self.state = root / "scans", root / "out", root / "state"
        self.scans.mkdir(parents=True, exist_ok=True)
        self.config = root / "config.toml"
        self.model = model
        self.write_config(**sections)

    def write_config(self, *, scale: float = 2.0, model: Path | None = None, **sections) -> None:
        base = {
            "models": {"cache_dir": str(self.root / "cache"), "auto_fetch": False},
            "processing": {"device": "cpu", "precision": "fp32", "threads": 1},
            "watch": {
                "input": str(self.scans),
                "output": str(self.out),
                "stable_seconds": 0.3,
                "mode": "polling",
            },
            "daemon": {"state_dir": str(self.state), "stop_timeout": 30.0, "lease_seconds": 30.0},
        }
        for name, values in sections.items():
            base[name] = {**base.get(name, {}), **values}
        lines = []
        for name, values in base.items():
            lines.append(f"[{name}]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
        lines += [
            "[[pipeline.stages]]",
            'kind = "upscale"',
            f"model = {json.dumps(str(model or self.model))}",
            f"scale = {scale}",
        ]
        self.config.write_text("\n".join(lines) + "\n")

    def cli(self, *args: str) -> int:
        return main(["--config", str(self.config), *args])

    def once(self) -> int:
        return self.cli("watch", "--once")

    def json(self, capsys, *args: str):
        capsys.readouterr()
        self.cli(*args, "--json")
        return json.loads(capsys.readouterr().out)

    def outputs(self) -> list[str]:
        return sorted(
            p.relative_to(self.out).as_posix() for p in self.out.rglob("*") if p.is_file()
        )

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.state / "scanrestore.db")

    def spawn(self) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "daemon", "--config", str(self.config), "-v", "watch"],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return nearest_compact(tmp_path_factory.mktemp("model") / "nearest2x.pth", scale=2)


@pytest.fixture
def site(tmp_path, model) -> Site:
    return Site(tmp_path, model)


def _drop(site: Site, name: str, source: str = f"{SET5}/bird.png") -> Path:
    target = site.scans / name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(shared_file(source), target)
    return target


def _wait(predicate, timeout: float = 120.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_dropped_file_is_published_as_v1_with_provenance_and_history(site, capsys):
    original = _drop(site, "album/bird.png")
    before = sha256_file(original)
    assert site.once() == 0
    assert site.outputs() == ["album/bird.v1.json", "album/bird.v1.png"]
    with site.db() as db:
        (status, token) = db.execute("SELECT status, run_token FROM runs").fetchone()
        stages = db.execute("SELECT stage, model_sha256 FROM stage_runs").fetchall()
        outputs = db.execute("SELECT path, version, output_sha256 FROM outputs").fetchall()
    assert status == "done" and stages == [("upscale", sha256_file(site.model))]
    assert ("album/bird.v1.png", 1, sha256_file(site.out / "album/bird.v1.png")) in outputs
    history = site.json(capsys, "history", "album/bird.png")
    assert [h["outputs"][0]["path"] for h in history] == ["album/bird.v1.png"]
    sidecar = json.loads((site.out / "album/bird.v1.json").read_text())
    assert sidecar["run_id"] == token and sidecar["source"]["sha256"] == before
    from pipeline.image import decode

    xmp = decode(site.out / "album/bird.v1.png").metadata.xmp.decode()
    assert f"<scanrestore:RunId>{token}</scanrestore:RunId>" in xmp
    assert sha256_file(original) == before  # the original is untouched


def test_the_same_bytes_under_another_name_are_linked_not_processed_again(site, capsys):
    _drop(site, "bird.png")
    assert site.once() == 0
    _drop(site, "copies/bird-again.png")
    assert site.once() == 0
    assert site.outputs() == ["bird.v1.json", "bird.v1.png"]
    history = site.json(capsys, "history", "copies/bird-again.png")
    assert [run["path"] for run in history] == ["bird.png"]  # linked to the existing outputs
    with site.db() as db:
        events = db.execute("SELECT kind, path FROM events WHERE kind = 'duplicate'").fetchall()
    assert events == [("duplicate", "copies/bird-again.png")]


def test_a_recipe_change_yields_v2_and_leaves_v1_byte_identical(site, tmp_path):
    _drop(site, "bird.png")
    assert site.once() == 0
    v1 = sha256_file(site.out / "bird.v1.png")
    site.write_config(model=tiny_compact(tmp_path / "other.pth", scale=2))
    assert site.once() == 0
    assert site.outputs() == ["bird.v1.json", "bird.v1.png", "bird.v2.json", "bird.v2.png"]
    assert sha256_file(site.out / "bird.v1.png") == v1


def test_a_restart_hashes_no_unchanged_file_and_every_touched_or_replaced_one(site, monkeypatch):
    names = {"same.png": "bird.png", "touched.png": "baby.png", "replaced.png": "head.png"}
    for name, source in names.items():
        _drop(site, name, f"{SET5}/{source}")
    assert site.once() == 0
    published = site.outputs()
    assert len(published) == 6

    hashed: list[int] = []  # the inode of every file the daemon reads through to a hash
    digest = hashlib.file_digest

    def counting(handle, *args, **kwargs):
        hashed.append(os.fstat(handle.fileno()).st_ino)
        return digest(handle, *args, **kwargs)

    monkeypatch.setattr(hashlib, "file_digest", counting)
    scans = lambda: {path.stat().st_ino: path.name for path in site.scans.iterdir()}  # noqa: E731
    assert site.once() == 0
    assert [scans()[ino] for ino in hashed if ino in scans()] == []

    touched = (site.scans / "touched.png").stat()
    (site.scans / "touched.png").write_bytes((site.scans / "touched.png").read_bytes())
    os.utime(site.scans / "touched.png", ns=(touched.st_atime_ns, touched.st_mtime_ns + 10**9))
    before = (site.scans / "replaced.png").stat()
    shutil.copy(site.scans / "replaced.png", site.root / "replacement.png")
    os.utime(site.root / "replacement.png", ns=(before.st_atime_ns, before.st_mtime_ns))
    os.replace(site.root / "replacement.png", site.scans / "replaced.png")
    after = (site.scans / "replaced.png").stat()
    assert (after.st_size, after.st_mtime_ns, after.st_ino != before.st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        True,
    )
    assert site.once() == 0
    assert sorted(scans()[ino] for ino in hashed if ino in scans()) == [
        "replaced.png",
        "touched.png",
    ]
    assert site.outputs() == published  # the same bytes: nothing to make again

    hashed.clear()
    assert site.once() == 0
    assert [scans()[ino] for ino in hashed if ino in scans()] == []


def test_reprocess_forces_a_new_version(site):
    _drop(site, "bird.png")
    assert site.once() == 0
    assert site.cli("reprocess", str(site.scans / "bird.png")) == 0
    assert site.once() == 0
    assert "bird.v2.png" in site.outputs()


def test_ignored_names_are_skipped_and_symlinks_refused_and_recorded(site, capsys):
    _drop(site, "good.png")
    _drop(site, ".hidden.png")
    _drop(site, "scan.png.part")
    _drop(site, "@eaDir/thumb.png")
    (site.scans / "link.png").symlink_to(site.scans / "good.png")
    assert site.once() == 0
    assert site.outputs() == ["good.v1.json", "good.v1.png"]
    with site.db() as db:
        refused = db.execute("SELECT path, detail_json FROM events WHERE kind='refused'").fetchall()
    assert [path for path, _ in refused] == ["link.png"]
    assert "symbolic link" in refused[0][1]


def test_a_window_outside_the_current_time_ingests_but_does_not_process(site, capsys):
    now = time.localtime()
    start = f"{(now.tm_hour + 2) % 24:02d}:00"
    end = f"{(now.tm_hour + 3) % 24:02d}:00"
    site.write_config(schedule={"active_hours": f"{start}-{end}"})
    _drop(site, "bird.png")
    daemon = site.spawn()
    try:
        _wait(lambda: _count(site, "SELECT COUNT(*) FROM jobs") == 1, what="the file queued")
        # A file queued in a later round of the loop: the round that queued the first one has
        # made its decision about dispatching it by then.
        _drop(site, "later.png", f"{SET5}/head.png")
        _wait(lambda: _count(site, "SELECT COUNT(*) FROM jobs") == 2, what="the later file")
        assert site.outputs() == []
        status = site.json(capsys, "status")
        assert status["counts"]["queued"] == 2 and status["window_open"] is False
        assert status["next_window"].startswith(time.strftime("%Y-%m-%d")[:4])
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
    site.write_config(
        schedule={"active_hours": f"{now.tm_hour:02d}:00-{(now.tm_hour + 1) % 24:02d}:00"}
    )
    assert site.once() == 0
    assert site.outputs() == ["bird.v1.json", "bird.v1.png", "later.v1.json", "later.v1.png"]


def _count(site: Site, sql: str) -> int:
    if not (site.state / "scanrestore.db").exists():
        return -1
    with site.db() as db:
        try:
            return db.execute(sql).fetchone()[0]
        except sqlite3.OperationalError:
            return -1


def test_a_polling_daemon_takes_a_slowly_written_file_once_complete_and_stops_on_sigterm(site):
    daemon = site.spawn()
    try:
        _wait(lambda: (site.state / "scanrestore.db").exists(), what="the database")
        data = shared_file(f"{SET5}/baby.png").read_bytes()
        with open(site.scans / "slow.png", "wb") as handle:
            for start in range(0, len(data), len(data) // 6 + 1):
                handle.write(data[start : start + len(data) // 6 + 1])
                handle.flush()
                time.sleep(0.5)  # longer than stable_seconds between chunks ... events keep it
        _wait(lambda: "slow.v1.png" in site.outputs(), what="the output")
        # A file dropped later and published: a second take of the slow file would have come
        # with it or before it.
        _drop(site, "later.png", f"{SET5}/head.png")
        _wait(
            lambda: _count(site, "SELECT COUNT(*) FROM jobs WHERE state = 'done'") == 2,
            what="both files done",
        )
        started = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
        assert time.monotonic() - started < 30
    finally:
        if daemon.poll() is None:
            daemon.kill()
    assert site.outputs() == ["later.v1.json", "later.v1.png", "slow.v1.json", "slow.v1.png"]
    with site.db() as db:
        runs = db.execute("SELECT path FROM runs ORDER BY path").fetchall()
    assert runs == [("later.png",), ("slow.png",)]


def test_a_second_daemon_on_the_same_state_folder_is_refused(site):
    first = site.spawn()
    try:
        # The daemon opens its database only once it holds the lock.
        _wait(lambda: (site.state / "scanrestore.db").exists(), what="the database")
        second = site.spawn()
        _out, err = second.communicate(timeout=120)
        assert second.returncode == 78
        assert "another scanrestore daemon" in err
    finally:
        first.send_signal(signal.SIGTERM)
        assert first.wait(60) == 0


def test_sigkill_mid_job_then_restart_leaves_exactly_one_output_per_source(site):
    names = [f"img{i}.png" for i in range(4)]
    originals = {
        name: _drop(site, name, f"{SET5}/{src}")
        for name, src in zip(
            names, ["baby.png", "bird.png", "butterfly.png", "head.png"], strict=True
        )
    }
    hashes = {name: sha256_file(path) for name, path in originals.items()}
    daemon = site.spawn()
    _wait(
        lambda: _count(site, "SELECT COUNT(*) FROM jobs WHERE state='running'") >= 1,
        what="a running job",
    )
    children = psutil.Process(daemon.pid).children(recursive=True)
    assert children, "the daemon has no worker"
    daemon.kill()
    daemon.wait(30)
    _wait(lambda: not any(_alive(child) for child in children), 60, "its workers to die with it")
    assert site.once() == 0
    images = [p for p in site.outputs() if p.endswith(".png")]
    assert sorted(images) == sorted(f"{Path(n).stem}.v1.png" for n in names)
    assert not [p for p in site.out.rglob("*") if ".tmp-" in p.name]
    with site.db() as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert (
            db.execute("SELECT COUNT(*) FROM jobs WHERE state NOT IN ('done')").fetchone()[0] == 0
        )
    assert {name: sha256_file(path) for name, path in originals.items()} == hashes


def _alive(process: psutil.Process) -> bool:
    """Running, and not a zombie waiting for its new parent to reap it."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_fixity_audit_reports_a_modified_output_and_a_deleted_original(site, capsys):
    from daemon.config import load_config
    from daemon.service import Daemon

    _drop(site, "a.png")
    _drop(site, "b.png", f"{SET5}/head.png")
    assert site.once() == 0
    (site.out / "a.v1.png").write_bytes(b"tampered")
    (site.scans / "b.png").unlink()
    Daemon(load_config(site.config)).audit_fixity()
    status = site.json(capsys, "status")
    problems = {(p["kind"], p["path"]) for p in status["fixity"]["problems"]}
    assert any(kind.endswith("mismatch") and path == "a.v1.png" for kind, path in problems), (
        problems
    )
    assert any(kind.endswith("missing") and path == "b.png" for kind, path in problems), problems


def test_every_hostile_input_ends_failed_or_quarantined_and_a_good_file_still_flows(site, capsys):
    hostile = sorted((CORPUS / "hostile_inputs").iterdir()) if CORPUS.is_dir() else []
    if not hostile:
        shared_file("corpus/hostile_inputs")  # skips without ../shared, fails if it is missing
    assert hostile, "corpus/hostile_inputs is empty"
    for path in hostile:
        shutil.copy(path, site.scans / path.name)
    assert site.once() == 1  # failures are reported in the exit status ...
    _drop(site, "good.png")
    assert site.once() == 0  # ... and the next file is processed
    assert "good.v1.png" in site.outputs()
    status = site.json(capsys, "status")
    failed = {job["path"]: job for job in status["recent_failures"]}
    with site.db() as db:
        states = dict(db.execute("SELECT path, state FROM jobs").fetchall())
        errors = dict(db.execute("SELECT path, last_error FROM jobs").fetchall())
    waiting = {e["path"]: e["reason"] for e in status["recent_events"] if e["kind"] == "waiting"}
    for path in hostile:
        if path.stat().st_size == 0:  # a placeholder: never taken while empty, and shown
            assert "empty" in waiting[path.name]
            continue
        assert states.get(path.name) in ("failed", "quarantined"), (path.name, states)
        assert errors[path.name].startswith(str(site.scans / path.name)), errors[path.name]
    assert failed


def _big_scan(path: Path, side: int = 2400) -> Path:
    """A real photo tiled to a few megapixels: slow enough to be caught mid-image."""
    import cv2
    import numpy as np

    tile = cv2.imread(str(shared_file(f"{SET5}/baby.png")))
    reps = side // tile.shape[0] + 1
    cv2.imwrite(str(path), np.tile(tile, (reps, reps, 1))[:side, :side])
    return path


def test_a_file_that_keeps_killing_its_worker_is_quarantined_while_others_flow(site, capsys):
    site.write_config(daemon={"max_worker_deaths": 2})
    _big_scan(site.scans / "victim.png")
    daemon = site.spawn()
    kills = 0
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            state = _scalar(site, "SELECT state FROM jobs WHERE path = 'victim.png'")
            if state == "quarantined":
                break
            if state == "running":
                for child in psutil.Process(daemon.pid).children():
                    if "multiprocessing" in " ".join(child.cmdline()):
                        child.kill()  # an out-of-memory kill, as the kernel would do it
                        kills += 1
                time.sleep(1)
            time.sleep(0.05)
        assert _scalar(site, "SELECT state FROM jobs WHERE path = 'victim.png'") == "quarantined"
        _drop(site, "good.png")
        _wait(lambda: "good.v1.png" in site.outputs(), what="the good file")
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
    assert kills >= 2
    listing = site.json(capsys, "quarantine", "list")
    assert [entry["path"] for entry in listing] == ["victim.png"]
    assert "killed its worker 2 times" in listing[0]["reason"]
    with site.db() as db:
        died = db.execute("SELECT COUNT(*) FROM runs WHERE status = 'died'").fetchone()[0]
    assert died == 2


def _scalar(site: Site, sql: str):
    if not (site.state / "scanrestore.db").exists():
        return None
    with site.db() as db:
        try:
            row = db.execute(sql).fetchone()
        except sqlite3.OperationalError:
            return None
    return None if row is None else row[0]


def _burst(folder: Path, count: int) -> Path:
    """`count` distinct 16 px PNGs in `folder` (made outside the watched tree)."""
    import cv2
    import numpy as np

    folder.mkdir(parents=True)
    tile = np.full((16, 16, 3), 90, np.uint8)
    for index in range(count):
        tile[0, 0] = (index % 256, index // 256, 7)
        cv2.imwrite(str(folder / f"{index:04d}.png"), tile)
    return folder


def test_a_large_burst_is_taken_in_slices_while_finished_images_are_published(site):
    """Ingest (hash, record, queue) used to drain every ready file in one go: a burst of
    thousands, or the start-up scan of a large tree, left finished images unpublished, idle
    workers unfed and `healthy()` false for as long as the hashing took."""
    _drop(site, "first.png")
    with open(site.root / "daemon.log", "wb") as log:  # thousands of lines: a pipe would fill
        daemon = subprocess.Popen(
            [sys.executable, "-m", "daemon", "--config", str(site.config), "-v", "watch"],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        _wait(lambda: "first.v1.png" in site.outputs(), what="a warm worker")
        # A whole folder lands at once, as a copied or moved album does.
        _burst(site.root / "burst", 1500).rename(site.scans / "burst")
        queued = "SELECT COUNT(*) FROM jobs WHERE path LIKE 'burst/%'"
        _wait(lambda: _count(site, queued) == 1500, what="the burst queued")
        published_meanwhile = _scalar(
            site,
            "SELECT COUNT(*) FROM runs WHERE status = 'done' AND path LIKE 'burst/%' AND "
            "finished_at < (SELECT max(created_at) FROM jobs WHERE path LIKE 'burst/%')",
        )
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(60) == 0
    assert published_meanwhile > 0


def test_once_taking_one_file_a_round_still_ingests_everything(site):
    """With ingest sliced, `--once` must not stop while files wait to be ingested, even when a
    round's files were all duplicates (nothing queued, nothing running)."""
    from daemon.config import load_config
    from daemon.service import Daemon

    _drop(site, "a.png")
    assert site.once() == 0
    for index in range(3):
        _drop(site, f"copies/a-{index}.png")  # the same bytes: linked, nothing to queue
    _drop(site, "zz/new.png", f"{SET5}/head.png")
    daemon = Daemon(load_config(site.config), once=True)
    daemon.ingest_seconds = 0.0  # one file a round
    assert daemon.run() == 0
    assert "zz/new.v1.png" in site.outputs()
    with site.db() as db:
        duplicates = db.execute("SELECT COUNT(*) FROM events WHERE kind = 'duplicate'").fetchone()
    assert duplicates == (3,)
