"""The daemon under faults: one test per fault, each asserting what must happen.

Real folders, a real SQLite file, real worker processes and the tiny nearest-neighbour model.
A disk that fills up is a small tmpfs mounted over the output folder (root only: skipped, with
the reason, elsewhere). Permission denied is a chmod; run as root, the daemon is started
without the capabilities that let root ignore file modes.

Covered elsewhere: a second daemon on the same database is refused by the lock
(test_daemon.py::test_a_second_daemon_on_the_same_state_folder_is_refused); wall-clock jumps
in the scheduler and the stability timer (test_schedule.py: forward jumps coalesce, backward
ones neither repeat nor stretch; test_watcher.py: only the monotonic clock counts), and in the
queue's leases (test_queue.py::test_a_wall_clock_jump_does_not_take_a_live_workers_lease).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import shared_file
from modelfactory import nearest_compact
from test_daemon import Site

from daemon.config import load_config
from daemon.service import Daemon
from daemon.store import utc_now
from pipeline.files import sha256_file

REPO = Path(__file__).resolve().parents[1]
SET5 = "corpus/sr_benchmark/Set5/HR"


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return nearest_compact(tmp_path_factory.mktemp("model") / "nearest2x.pth", scale=2)


@pytest.fixture
def site(tmp_path, model) -> Site:
    return Site(tmp_path, model, watch={"mode": "native", "stable_seconds": 0.3})


# ---------------------------------------------------------------- helpers


def drop(site: Site, name: str, source: str = f"{SET5}/bird.png") -> Path:
    target = site.scans / name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(shared_file(source), target)
    return target


def wait_for(predicate: Callable[[], object], what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def rows(site: Site, sql: str, params: tuple = ()) -> list[tuple]:
    """Query the daemon's database from outside, as `scanrestore status` does; [] before it
    exists."""
    if not (site.state / "scanrestore.db").exists():
        return []
    try:
        with contextlib.closing(sqlite3.connect(site.state / "scanrestore.db", timeout=30)) as db:
            return db.execute(sql, params).fetchall()
    except sqlite3.OperationalError:  # the schema is still being created
        return []


def job_state(site: Site, path: str) -> str | None:
    found = rows(site, "SELECT state FROM jobs WHERE path = ? ORDER BY id DESC LIMIT 1", (path,))
    return found[0][0] if found else None


def temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp-" in p.name]


def big_scan(path: Path, side: int = 1400, *, flip: bool = False) -> Path:
    """A real photo tiled to a couple of megapixels: slow enough to be caught mid-image."""
    tile = cv2.imread(str(shared_file(f"{SET5}/baby.png")))
    reps = side // tile.shape[0] + 1
    pixels = np.tile(tile, (reps, reps, 1))[:side, :side]
    cv2.imwrite(str(path), pixels[:, ::-1] if flip else pixels)
    return path


def _drop_dac_capabilities() -> None:
    """Runs in the child before exec: take CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH out of the
    bounding set, so root after exec (and every worker it spawns) obeys file modes."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, capability, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "PR_CAPBSET_DROP failed")


@contextlib.contextmanager
def daemon(site: Site, *, obey_file_modes: bool = False) -> Iterator[subprocess.Popen]:
    """`scanrestore -v watch` as a real process, its log in a file (a pipe nobody reads would
    block a chatty daemon); stopped with SIGTERM, which must end it cleanly."""
    preexec = None
    if obey_file_modes and os.geteuid() == 0:
        try:
            subprocess.run([sys.executable, "-c", ""], preexec_fn=_drop_dac_capabilities)
        except subprocess.SubprocessError as exc:
            pytest.skip(f"root here cannot give up CAP_DAC_OVERRIDE for a child: {exc}")
        preexec = _drop_dac_capabilities
    log = open(site.root / "daemon.log", "w")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        [sys.executable, "-m", "daemon", "--config", str(site.config), "-v", "watch"],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=log,
        preexec_fn=preexec,
    )
    try:
        yield process
        assert process.poll() is None, f"the daemon died:\n{daemon_log(site)}"
        process.send_signal(signal.SIGTERM)
        assert process.wait(90) == 0, daemon_log(site)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        log.close()


def _rescans(caplog: pytest.LogCaptureFixture) -> int:
    """Full rescans the watcher of an in-process daemon has logged so far."""
    return sum(record.getMessage().startswith("rescan: path=") for record in caplog.records)


def daemon_log(site: Site) -> str:
    path = site.root / "daemon.log"
    return path.read_text(errors="replace") if path.exists() else ""


def wait_started(site: Site) -> None:
    wait_for(lambda: " started input=" in daemon_log(site), "the daemon to start", 180)


@contextlib.contextmanager
def small_disk(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` mounted at `path`: a disk that really fills up (ENOSPC)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill up needs root")
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "--lazy", str(path)], check=True)


def fill(folder: Path, *, leave: int = 0) -> Path:
    """Fill the filesystem holding `folder` until `leave` bytes (whole pages) remain free."""
    filler = folder / "filler.bin"
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(filler, "ab") as handle:
        try:
            handle.write(b"\0" * max(0, free - leave))
            handle.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
    return filler


def outputs(site: Site) -> list[str]:
    return [name for name in site.outputs() if name != "filler.bin"]


# ---------------------------------------------------------------- disk full


def test_a_full_disk_leaves_no_partial_output_and_the_job_succeeds_once_space_returns(site):
    with small_disk(site.out, "2m"):
        original = drop(site, "album/bird.png")
        before = sha256_file(original)
        (site.out / "album").mkdir()
        filler = fill(site.out)
        assert site.once() == 1  # the failure is reported, and the run ends normally
        assert outputs(site) == [] and temps(site.out) == []
        ((state, error, failures),) = rows(
            site, "SELECT state, last_error, failures FROM jobs WHERE path = 'album/bird.png'"
        )
        assert state == "failed" and failures == 1  # to be retried, not quarantined
        assert "No space left on device" in error and str(site.out / "album") in error

        filler.unlink()
        assert site.cli("retry", "--all-failed") == 0
        assert site.once() == 0
        assert outputs(site) == ["album/bird.v1.json", "album/bird.v1.png"]
        assert temps(site.out) == []
        assert job_state(site, "album/bird.png") == "done"
        assert rows(site, "SELECT status FROM runs ORDER BY id") == [("failed",), ("done",)]
        assert sha256_file(original) == before


def test_a_disk_filling_up_while_the_daemon_publishes_fails_the_job_and_keeps_it_alive(site):
    """The worker's image fits; the provenance sidecar the daemon itself writes next does not."""
    with small_disk(site.out, "4m"):
        drop(site, "bird.png")
        assert site.once() == 0
        image_pages = -(-(site.out / "bird.v1.png").stat().st_size // 4096)
        assert site.cli("reprocess", str(site.scans / "bird.png")) == 0
        filler = fill(site.out, leave=image_pages * 4096)
        assert site.once() == 1
        assert outputs(site) == ["bird.v1.json", "bird.v1.png"] and temps(site.out) == []
        ((state, error),) = rows(
            site, "SELECT state, last_error FROM jobs WHERE state != 'done' AND path = 'bird.png'"
        )
        assert state == "failed" and "No space left on device" in error

        filler.unlink()
        assert site.cli("retry", "--all-failed") == 0
        assert site.once() == 0
        assert outputs(site) == ["bird.v1.json", "bird.v1.png", "bird.v2.json", "bird.v2.png"]
        recorded = dict(rows(site, "SELECT path, output_sha256 FROM outputs"))
        assert recorded["bird.v2.png"] == sha256_file(site.out / "bird.v2.png")


# ---------------------------------------------------------------- permissions


def test_permission_denied_on_a_source_or_the_output_is_reported_retried_and_changes_nothing(
    site,
):
    site.write_config(watch={"mode": "native", "stable_seconds": 0.3, "rescan_seconds": 2.0})
    secret = drop(site, "secret.png")
    before = sha256_file(secret)
    secret.chmod(0o000)
    drop(site, "album/bird.png", f"{SET5}/head.png")
    locked = site.out / "album"
    locked.mkdir(parents=True)
    locked.chmod(0o555)
    try:
        with daemon(site, obey_file_modes=True):
            wait_for(lambda: job_state(site, "album/bird.png") == "failed", "the output failure")
            wait_for(
                lambda: rows(site, "SELECT 1 FROM events WHERE kind = 'unreadable'"),
                "the unreadable source to be recorded",
            )
            ((error,),) = rows(site, "SELECT last_error FROM jobs WHERE path = 'album/bird.png'")
            assert "Permission denied" in error and str(locked) in error
            ((detail,),) = rows(site, "SELECT detail_json FROM events WHERE kind = 'unreadable'")
            assert "Permission denied" in json.loads(detail)["error"]
            assert 'path="secret.png"' in daemon_log(site)
            assert job_state(site, "secret.png") is None
            assert outputs(site) == [] and temps(site.out) == []

            secret.chmod(0o644)  # fixed by hand: found again at the next rescan
            locked.chmod(0o755)
            assert site.cli("retry", "--all-failed") == 0
            wait_for(lambda: "secret.v1.png" in site.outputs(), "the readable source")
            wait_for(lambda: "album/bird.v1.png" in site.outputs(), "the writable output")
    finally:
        secret.chmod(0o644)
        locked.chmod(0o755)
    assert sha256_file(secret) == before
    assert job_state(site, "album/bird.png") == job_state(site, "secret.png") == "done"


# ---------------------------------------------------------------- the source changing


def test_a_source_deleted_renamed_or_rewritten_while_processed_publishes_nothing_stale(site):
    site.write_config(watch={"mode": "native", "stable_seconds": 0.3, "rescan_seconds": 2.0})
    gone, moved, rewritten = (
        big_scan(site.scans / name) for name in ("a-gone.png", "b-moved.png", "c-rewritten.png")
    )
    moved_sha = sha256_file(moved)
    stale_sha = sha256_file(rewritten)
    with daemon(site):
        # One worker takes them in order; each is changed while its job runs.
        for source, change in (
            (gone, lambda: gone.unlink()),
            (moved, lambda: moved.rename(site.scans / "b-renamed.png")),
            (rewritten, lambda: big_scan(rewritten, flip=True)),
        ):
            wait_for(lambda s=source: job_state(site, s.name) == "running", f"{source.name} to run")
            change()
            wait_for(lambda s=source: job_state(site, s.name) != "running", f"{source.name} to end")
        wait_for(lambda: "b-renamed.v1.png" in site.outputs(), "the renamed file")
        wait_for(lambda: "c-rewritten.v1.png" in site.outputs(), "the rewritten file")
    assert outputs(site) == [
        "b-renamed.v1.json",
        "b-renamed.v1.png",
        "c-rewritten.v1.json",
        "c-rewritten.v1.png",
    ]
    assert temps(site.out) == []
    discarded = rows(site, "SELECT path, source_sha256 FROM runs WHERE status = 'discarded'")
    assert sorted(path for path, _ in discarded) == ["a-gone.png", "b-moved.png", "c-rewritten.png"]
    done = dict(rows(site, "SELECT path, source_sha256 FROM runs WHERE status = 'done'"))
    assert done == {"b-renamed.png": moved_sha, "c-rewritten.png": sha256_file(rewritten)}
    assert stale_sha not in {sha for (sha,) in rows(site, "SELECT source_sha256 FROM outputs")}
    states = dict(
        rows(site, "SELECT path, state FROM jobs WHERE path IN ('a-gone.png', 'b-moved.png')")
    )
    assert states == {"a-gone.png": "superseded", "b-moved.png": "superseded"}


# ---------------------------------------------------------------- what scanners and shares do


def test_an_empty_placeholder_is_left_alone_until_the_scanner_fills_it(site):
    with daemon(site):
        wait_started(site)
        placeholder = site.scans / "scan-0001.png"
        placeholder.touch()
        # A file dropped after the placeholder and taken proves the watcher has let the
        # placeholder be quiet for longer than a file needs: it must still not be taken.
        drop(site, "later.png", f"{SET5}/head.png")
        wait_for(lambda: job_state(site, "later.png") is not None, "the later file to be taken")
        assert rows(site, "SELECT path FROM jobs") == [("later.png",)]
        assert [name for name in outputs(site) if not name.startswith("later.")] == []
        with open(placeholder, "r+b") as handle:  # the scanner writes into its placeholder
            handle.write(shared_file(f"{SET5}/bird.png").read_bytes())
        wait_for(lambda: "scan-0001.v1.png" in site.outputs(), "the filled placeholder")
    assert sorted(rows(site, "SELECT path, status FROM runs")) == [
        ("later.png", "done"),
        ("scan-0001.png", "done"),
    ]
    assert 'file ready: path="scan-0001.png" size=0' not in daemon_log(site)


def test_a_share_that_vanishes_and_returns_loses_nothing_and_processing_resumes(site):
    drop(site, "a.png")
    away = site.root / "share-away"
    with daemon(site):
        wait_for(lambda: "a.v1.png" in site.outputs(), "the first file")
        site.scans.rename(away)  # the share drops out, leaving its empty mount point
        site.scans.mkdir()
        wait_for(lambda: "watched folder unavailable" in daemon_log(site), "the pause")
        time.sleep(2)  # several watcher steps while it is away
        site.scans.rmdir()
        away.rename(site.scans)  # ... and comes back
        wait_for(lambda: "watched folder available again" in daemon_log(site), "the return")
        drop(site, "b.png", f"{SET5}/head.png")
        wait_for(lambda: "b.v1.png" in site.outputs(), "a file dropped after the return")
    assert outputs(site) == ["a.v1.json", "a.v1.png", "b.v1.json", "b.v1.png"]
    assert rows(site, "SELECT path, state FROM jobs ORDER BY id") == [
        ("a.png", "done"),
        ("b.png", "done"),
    ]
    assert rows(site, "SELECT kind, path FROM events WHERE path = 'a.png'") == []
    assert daemon_log(site).count('file ready: path="a.png"') == 1  # not taken as new again


@pytest.mark.slow  # half a minute to a minute: 1500 files through the daemon
def test_a_burst_of_tiny_files_in_an_event_storm_is_processed_each_exactly_once(site):
    count = 1500
    site.write_config(
        watch={"mode": "native", "stable_seconds": 0.5, "rescan_seconds": 3.0},
        daemon={"workers": 2, "provenance_sidecar": False},
    )
    rng = np.random.default_rng(7)
    tiles = [rng.integers(0, 256, (4, 4, 3), dtype=np.uint8) for _ in range(count)]
    names = [f"batch/{index // 300:02d}/scan-{index:05d}.png" for index in range(count)]
    with daemon(site):
        wait_started(site)
        for index, (name, pixels) in enumerate(zip(names, tiles, strict=True)):
            target = site.scans / name
            target.parent.mkdir(parents=True, exist_ok=True)
            # The way scanning software saves: a partial name, then a rename into place.
            partial = target.with_name(target.name + ".part")
            partial.write_bytes(cv2.imencode(".png", pixels)[1].tobytes())
            partial.rename(target)
            if index % 3 == 0:
                os.utime(target)  # touched again: more events, the same bytes
        wait_for(
            lambda: rows(site, "SELECT count(*) FROM jobs WHERE state = 'done'") == [(count,)],
            "every file to be done",
            timeout=600,
        )
        rescans = daemon_log(site).count(" rescan: path=")
        for name in names[::5]:  # touched after processing: the same bytes, nothing new
            os.utime(site.scans / name)
        # A rescan after the touches, then a file dropped after it and processed: whatever
        # the events or the rescan would take again has been taken by then.
        wait_for(lambda: daemon_log(site).count(" rescan: path=") > rescans, "a rescan")
        drop(site, "zz-later.png")
        wait_for(lambda: job_state(site, "zz-later.png") == "done", "the later file")
    expected = [*names, "zz-later.png"]
    runs = rows(site, "SELECT path, count(*) FROM runs WHERE status = 'done' GROUP BY path")
    assert sorted(runs) == sorted((name, 1) for name in expected)
    assert rows(site, "SELECT count(*), count(DISTINCT path) FROM jobs") == [(count + 1,) * 2]
    images = [name for name in outputs(site) if name.endswith(".png")]
    assert sorted(images) == sorted(name.replace(".png", ".v1.png") for name in expected)


# ---------------------------------------------------------------- models


@pytest.mark.parametrize("damage", ["tampered", "truncated"])
def test_a_damaged_model_file_stops_the_start_naming_the_model_and_both_hashes(
    site, model, damage, caplog
):
    assert site.cli("models", "import", str(model), "--id", "nearest2x") == 0
    cached = site.root / "cache" / "custom" / "nearest2x.pth"
    expected = sha256_file(cached)
    data = bytearray(cached.read_bytes())
    if damage == "tampered":
        data[len(data) // 2] ^= 0x01  # one bit: the file still loads, as a different model
    else:
        del data[len(data) // 2 :]
    cached.write_bytes(bytes(data))
    site.write_config(model="nearest2x")
    drop(site, "bird.png")
    assert site.once() == 78  # EX_CONFIG: systemd does not restart it in a loop
    message = " ".join(r.getMessage() for r in caplog.records if r.levelname == "ERROR")
    assert "nearest2x" in message and str(cached) in message
    assert f"expected {expected}, got {sha256_file(cached)}" in message
    assert rows(site, "SELECT count(*) FROM jobs") in ([], [(0,)]) and outputs(site) == []


def test_a_model_file_replaced_while_the_daemon_runs_fails_its_jobs_clearly_not_the_files(
    site, tmp_path
):
    weights = nearest_compact(tmp_path / "weights" / "current.pth", scale=2)
    expected = sha256_file(weights)
    site.write_config(model=weights)
    with daemon(site):
        wait_started(site)
        nearest_compact(weights, scale=2, seed=1)  # other weights under the same name
        drop(site, "bird.png")
        wait_for(lambda: job_state(site, "bird.png") == "failed", "the job to fail")
        ((error,),) = rows(site, "SELECT last_error FROM jobs WHERE path = 'bird.png'")
        assert str(weights) in error
        assert f"expected {expected}, got {sha256_file(weights)}" in error
        assert outputs(site) == []
        nearest_compact(weights, scale=2)  # the right file restored
        assert site.cli("retry", "--all-failed") == 0
        wait_for(lambda: "bird.v1.png" in site.outputs(), "the output")
    ((model_sha,),) = rows(site, "SELECT model_sha256 FROM stage_runs")
    assert model_sha == expected


# ---------------------------------------------------------------- clocks


class JumpingClock:
    """The daemon's wall clock, set off from the real one by whatever the test says."""

    def __init__(self) -> None:
        self.offset = timedelta(0)

    def __call__(self):
        return utc_now() + self.offset


def test_wall_clock_jumps_neither_stall_nor_repeat_queued_work(site, caplog):
    """A machine that booted a day fast and was then corrected by NTP: files queued under the
    wrong time must not wait for the clock to catch up; a jump forward repeats nothing."""
    caplog.set_level(logging.INFO, logger="scanrestore")
    clock = JumpingClock()
    clock.offset = timedelta(days=1)
    site.write_config(watch={"mode": "native", "stable_seconds": 0.3, "rescan_seconds": 1.0})
    service = Daemon(load_config(site.config), clock=clock)
    runner = threading.Thread(target=service.run, name="daemon under test")
    runner.start()
    try:
        wait_for(lambda: service.started.is_set(), "the daemon to start")
        big_scan(site.scans / "big.png")  # keeps the one worker busy ...
        wait_for(lambda: job_state(site, "big.png") == "running", "the first file to run")
        drop(site, "early.png")  # ... while this one waits in the queue
        wait_for(lambda: job_state(site, "early.png") == "queued", "the file to be queued")
        clock.offset = timedelta(0)  # NTP steps the clock back a day
        wait_for(lambda: job_state(site, "early.png") == "done", "the queued file", 60)
        clock.offset = timedelta(days=30)  # ... and a bad step forward
        drop(site, "late.png", f"{SET5}/head.png")
        wait_for(lambda: job_state(site, "late.png") == "done", "a file after the jump", 60)
        # Two rescans under the new time, then a file dropped after them and processed:
        # whatever those rescans would take again has been taken by then.
        rescans = _rescans(caplog)
        wait_for(lambda: _rescans(caplog) >= rescans + 2, "two rescans after the jump", 60)
        drop(site, "zz-later.png", f"{SET5}/butterfly.png")
        wait_for(lambda: job_state(site, "zz-later.png") == "done", "the later file", 60)
    finally:
        service.stop()
        runner.join()
    assert [name for name in outputs(site) if not name.startswith("big.")] == [
        "early.v1.json",
        "early.v1.png",
        "late.v1.json",
        "late.v1.png",
        "zz-later.v1.json",
        "zz-later.v1.png",
    ]
    assert rows(site, "SELECT path, count(*) FROM runs GROUP BY path ORDER BY path") == [
        ("big.png", 1),
        ("early.png", 1),
        ("late.png", 1),
        ("zz-later.png", 1),
    ]
