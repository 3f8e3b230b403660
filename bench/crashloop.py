"""Crash-loop harness: the daemon SIGKILLed again and again while real scans arrive, then checked.

    .venv/bin/python bench/crashloop.py [--files 200] [--rounds 20] [--seed 0] [--workers 2]
        [--modes delay,temp,...] [--keep] [--out bench/results/crashloop.json]

A seeded batch of small crops of real photos (Set5, Set14, old photos; PNG, JPEG, TIFF; some
grey; in nested folders with spaces and accents) arrives in a watched folder: 40 % before the
first start, the rest in one burst per round while a daemon runs. Each round starts
`scanrestore watch` as a subprocess (a tiny exact nearest-neighbour SRVGGNetCompact, so it
runs on the CPU) and SIGKILLs it at a seeded moment, one of KILL_MODES:

- delay: 0.2-4 s after the spawn (imports, lock, migrations, recovery);
- after-start: 0-10 s after it logged "started" (start-up scan, ingest, workers warming, work);
- ingest: 0.05-1.2 s after a burst landed in a running daemon's folder;
- running: 0-0.1 s after a job is seen running, once the round has finished 1-8 jobs;
- temp: when a `._*.tmp-*` file appears, once the round has finished 0-8 jobs;
- publishing: when a publication plan is recorded (files about to be linked), likewise.

A kill waiting for its moment happens anyway after 60 s. A final `watch --once` finishes the
batch. Then every count in CHECKS must be 0, else the exit status is 1; a table is printed and
JSON written. Exits 2 where ../shared (the corpus) is absent.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import random
import re
import secrets
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from modelfactory import nearest_compact  # noqa: E402

CORPUS = REPO.parent / "shared" / "corpus"
PHOTO_DIRS = (
    "sr_benchmark/Set5/HR",
    "sr_benchmark/Set14/HR",
    "old_photos/historic",
    "old_photos/real_degraded",
)
FOLDERS = ("", "1962", "1962/summer", "box 3/roll 12", "négatifs", "album/Familie Müller")
FORMATS = ((".png", 0.45), (".jpg", 0.35), (".tif", 0.20))
TAG = "SCANRESTORE_BENCH_TAG"  # in the daemon's environment, so its orphans can be found
TEMP_MARKER = ".tmp-"
KILL_MODES = ("delay", "after-start", "ingest", "running", "temp", "publishing")
TRIGGER_TIMEOUT = 60.0  # seconds after which a kill waiting for its moment happens anyway
ORPHAN_GRACE = 5.0  # seconds a killed daemon's children get to go, not counting CPU waits
ORPHAN_DEADLINE = 120.0  # wall seconds after which survivors are orphans however loaded the CPU


# ---------------------------------------------------------------------------- the batch


@dataclass(frozen=True)
class Scan:
    relative: str  # where it lands in the watched folder
    sha256: str
    width: int
    height: int
    staged: str  # where it waits before it arrives


def make_batch(
    staging: Path, count: int, rng: random.Random, sizes: tuple[int, int] = (64, 160)
) -> list[Scan]:
    """`count` distinct crops of real photos, each `sizes` pixels a side, encoded in the
    staging folder under a unique stem per destination folder."""
    paths = _photo_paths()
    photos: dict[Path, np.ndarray | None] = {}
    staging.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    scans: list[Scan] = []
    prefixes = ("scan", "IMG", "Familie Müller", "photo 1962")
    while len(scans) < count:
        path = paths[rng.randrange(len(paths))]
        if path not in photos:
            photos[path] = cv2.imread(str(path), cv2.IMREAD_COLOR)
        photo = photos[path]
        if photo is None or min(photo.shape[:2]) < 16:
            continue
        crop = _crop(photo, rng, sizes)
        if rng.random() < 0.15 and crop.ndim == 3:
            crop = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY)
        suffix = rng.choices([s for s, _ in FORMATS], [w for _, w in FORMATS])[0]
        params = [cv2.IMWRITE_JPEG_QUALITY, rng.randint(80, 95)] if suffix == ".jpg" else []
        ok, data = cv2.imencode(suffix, crop, params)
        if not ok:
            raise RuntimeError(f"cv2 could not encode a {suffix} crop")
        payload = data.tobytes()
        sha = hashlib.sha256(payload).hexdigest()
        if sha in seen:
            continue  # the same bytes twice would be linked, not processed: keep them distinct
        seen.add(sha)
        index = len(scans)
        name = f"{prefixes[index % len(prefixes)]} {index:04d}{suffix}"
        folder = rng.choice(FOLDERS)
        staged = staging / f"{index:04d}{suffix}"
        staged.write_bytes(payload)
        height, width = crop.shape[:2]
        relative = f"{folder}/{name}" if folder else name
        scans.append(Scan(relative, sha, width, height, str(staged)))
    return scans


def _photo_paths() -> list[Path]:
    if not CORPUS.is_dir():
        raise FileNotFoundError(f"{CORPUS}: the shared corpus is absent")
    paths = [path for folder in PHOTO_DIRS for path in sorted((CORPUS / folder).iterdir())]
    if not paths:
        raise FileNotFoundError(f"{CORPUS}: no photos in {', '.join(PHOTO_DIRS)}")
    return paths


def _crop(photo: np.ndarray, rng: random.Random, sizes: tuple[int, int]) -> np.ndarray:
    height, width = photo.shape[:2]
    h = min(height, rng.randint(*sizes))
    w = min(width, rng.randint(*sizes))
    top, left = rng.randint(0, height - h), rng.randint(0, width - w)
    return np.ascontiguousarray(photo[top : top + h, left : left + w])


def drop(scan: Scan, scans_dir: Path, rng: random.Random) -> None:
    """Move a staged file into the watched folder: mostly a rename, sometimes a plain copy
    (written in place, as a scanner or a network client would)."""
    target = scans_dir / scan.relative
    target.parent.mkdir(parents=True, exist_ok=True)
    if rng.random() < 0.8:
        os.replace(scan.staged, target)
    else:
        shutil.copyfile(scan.staged, target)
        os.unlink(scan.staged)


# ---------------------------------------------------------------------------- the site


@dataclass(frozen=True)
class Site:
    """A watched folder, an output folder, a state folder, a tiny model and a config file."""

    root: Path
    scans: Path
    out: Path
    state: Path
    config: Path
    model: Path

    @property
    def db(self) -> Path:
        return self.state / "scanrestore.db"


def make_site(root: Path, *, workers: int, stable_seconds: float = 0.3, mode: str = "auto") -> Site:
    """Folders and a config whose one stage is the tiny exact 2x model, on the CPU."""
    site = Site(root, root / "scans", root / "out", root / "state", root / "config.toml",
                nearest_compact(root / "model" / "nearest2x.pth", scale=2))  # fmt: skip
    site.scans.mkdir(parents=True, exist_ok=True)
    sections = {
        "models": {"cache_dir": str(root / "cache"), "auto_fetch": False},
        "processing": {"device": "cpu", "precision": "fp32", "threads": 1},
        "watch": {
            "input": str(site.scans),
            "output": str(site.out),
            "stable_seconds": stable_seconds,
            "mode": mode,
        },
        "daemon": {
            "state_dir": str(site.state),
            "workers": workers,
            "stop_timeout": 30.0,
            "lease_seconds": 30.0,
        },
        "schedule": {"fixity_at": "", "backup_at": ""},
    }
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    lines += ["[[pipeline.stages]]", 'kind = "upscale"', f"model = {json.dumps(str(site.model))}"]
    lines.append("scale = 2.0")
    site.config.write_text("\n".join(lines) + "\n")
    return site


def spawn(site: Site, tag: str, log: Path, *, once: bool = False) -> subprocess.Popen:
    """`python -m daemon --config FILE -v watch [--once]`, its log appended to `log` (a file,
    never a pipe: a full pipe would stall the daemon)."""
    env = {**os.environ, TAG: tag, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "daemon", "--config", str(site.config), "-v", "watch"]
    with open(log, "ab") as handle:
        return subprocess.Popen(
            [*command, "--once"] if once else command,
            cwd=REPO,
            env=env,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )


def tagged_processes(tag: str) -> list[psutil.Process]:
    """Every live process (not a zombie) whose environment carries this run's tag."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error):
            if proc.pid == os.getpid() or proc.status() == psutil.STATUS_ZOMBIE:
                continue
            if proc.environ().get(TAG) == tag:
                found.append(proc)
    return found


def orphans_after(
    tag: str, grace: float = ORPHAN_GRACE, deadline: float = ORPHAN_DEADLINE
) -> list[dict[str, Any]]:
    """Processes of ours still alive after their daemon died (the caller has reaped it). They
    get `grace` seconds to go, counted on a clock that stands still while any of them waits
    for a CPU: on a loaded machine a worker killed with its parent may wait seconds for the turn
    in which it exits, and slow is not left behind, whereas a process that runs or sleeps on is.
    `deadline` wall seconds bound the wait. Survivors are killed (so they cannot disturb the
    next round) and returned."""
    started = time.monotonic()
    left = tagged_processes(tag)
    first = _cpu_waits(left)  # per thread, from its first sight
    starved = 0.0  # the longest any one thread has waited for a CPU since
    while left:
        elapsed = time.monotonic() - started
        if elapsed - starved >= grace or elapsed >= deadline:
            break
        time.sleep(0.1)
        left = tagged_processes(tag)
        for thread, waited in _cpu_waits(left).items():
            starved = max(starved, waited - first.setdefault(thread, waited))
    orphans = []
    for proc in left:
        with contextlib.suppress(psutil.Error):
            orphans.append({"pid": proc.pid, "cmdline": " ".join(proc.cmdline())[:200]})
            proc.kill()
    return orphans


def _cpu_waits(procs: Sequence[psutil.Process]) -> dict[tuple[int, str], float]:
    """Seconds each thread of `procs` has spent runnable but waiting for a CPU (the second
    field of Linux's /proc/PID/task/TID/schedstat); threads that cannot be read are left out,
    so where there is no schedstat the grace is counted in plain wall seconds."""
    waits = {}
    for proc in procs:
        with contextlib.suppress(OSError):
            for thread in os.listdir(f"/proc/{proc.pid}/task"):
                path = f"/proc/{proc.pid}/task/{thread}/schedstat"
                with contextlib.suppress(OSError, ValueError, IndexError), open(path) as handle:
                    waits[proc.pid, thread] = int(handle.read().split()[1]) / 1e9
    return waits


@contextlib.contextmanager
def reader(db: Path) -> Iterator[sqlite3.Connection | None]:
    """A read-only connection (or None before the daemon made the file). Read-only, so that
    closing it never checkpoints the WAL a killed daemon left behind."""
    if not db.exists():
        yield None
        return
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=0.5)
    try:
        yield conn
    finally:
        conn.close()


def query(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]] | None:
    with reader(db) as conn:
        if conn is None:
            return None
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError:  # not migrated yet, or busy: ask again later
            return None


def temp_files(root: Path) -> list[str]:
    found = []
    for folder, _dirs, names in os.walk(root):
        found += [
            os.path.relpath(os.path.join(folder, n), root)
            for n in names
            if n.startswith("._") and TEMP_MARKER in n
        ]
    return found


# ---------------------------------------------------------------------------- one round


@dataclass
class Kill:
    round: int
    mode: str
    planned_delay: float | None
    dropped: int = 0
    after_seconds: float = 0.0  # from the daemon's start to the SIGKILL
    fired: bool = False  # the awaited moment came (else it was killed at the timeout)
    exited_before: bool = False  # the daemon had already exited on its own
    at_kill: dict[str, int] = field(default_factory=dict)  # what the kill interrupted
    orphans: list[dict[str, Any]] = field(default_factory=list)


def crash_round(
    site: Site, index: int, mode: str, batch: list[Scan], rng: random.Random, tag: str, log: Path
) -> Kill:
    """Start a daemon, drop `batch` while it runs, SIGKILL it at the moment `mode` waits for."""
    moment = _Moment(site, mode, rng, log)
    kill = Kill(index, mode, moment.delay)
    burst_at = rng.uniform(0.0, 2.0)  # when `batch` lands, for every mode but "ingest"
    pending = list(batch)
    started = time.monotonic()
    proc = spawn(site, tag, log)
    try:
        while (now := time.monotonic() - started) < TRIGGER_TIMEOUT:
            if proc.poll() is not None:
                kill.exited_before = True
                break
            if pending and (moment.up() if mode == "ingest" else now >= burst_at):
                for scan in pending:
                    drop(scan, site.scans, rng)
                kill.dropped, pending = len(pending), []
            if moment.due(now, dropped=not pending):
                kill.fired = True
                break
            time.sleep(0.005)
        kill.after_seconds = round(time.monotonic() - started, 3)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for scan in pending:  # the daemon died before the burst: the files arrive between rounds
        drop(scan, site.scans, rng)
    kill.dropped += len(pending)
    kill.at_kill = _interrupted(site)
    kill.orphans = orphans_after(tag)
    return kill


class _Moment:
    """When one round's kill is due (see KILL_MODES)."""

    def __init__(self, site: Site, mode: str, rng: random.Random, log: Path) -> None:
        self.site, self.mode, self.log = site, mode, log
        self.offset = log.stat().st_size if log.exists() else 0
        self.delay: float | None = {
            "delay": rng.uniform(0.2, 4.0),  # from the spawn: imports, lock, migrations, recovery
            "after-start": rng.uniform(0.0, 10.0),  # from "started": scan, ingest, work
            "ingest": rng.uniform(0.05, 1.2),  # from the burst landing
            "running": rng.uniform(0.0, 0.1),  # from a job seen running on warm workers
        }.get(mode)
        # The work-triggered modes wait for a few completions of this round first, so that
        # rounds make progress and kills land mid-stream, not always at the first image.
        self.warm_up = rng.randint(1, 8) if mode == "running" else rng.randint(0, 8)
        self.done_before = self._done()
        self.fired_at: float | None = None
        self._up = False
        self._armed = mode not in ("running", "temp", "publishing")

    def up(self) -> bool:
        """This round's daemon logged that it recovered and started watching."""
        if not self._up:
            with open(self.log, "rb") as handle:
                handle.seek(self.offset)
                self._up = b" started input=" in handle.read()
        return self._up

    def due(self, now: float, *, dropped: bool) -> bool:
        if self.fired_at is None and self._fired(now, dropped):
            self.fired_at = now
        return self.fired_at is not None and now >= self.fired_at + (self.delay or 0.0)

    def _fired(self, now: float, dropped: bool) -> bool:
        mode = self.mode
        if mode == "delay":
            return True  # the delay counts from the spawn
        if mode == "after-start":
            return self.up()
        if mode == "ingest":
            return dropped and self.up()
        if not self._armed:
            # After "started" the previous daemon's plans and temporary files are gone.
            self._armed = self.up() and self._done() - self.done_before >= self.warm_up
            return False
        if mode == "temp":
            return self.site.out.is_dir() and bool(temp_files(self.site.out))
        if mode == "publishing":
            rows = query(self.site.db, "SELECT count(*) FROM jobs WHERE publishing IS NOT NULL")
            return bool(rows and rows[0][0])
        rows = query(self.site.db, "SELECT count(*) FROM jobs WHERE state = 'running'")
        return bool(rows and rows[0][0])

    def _done(self) -> int:
        rows = query(self.site.db, "SELECT count(*) FROM jobs WHERE state = 'done'")
        return rows[0][0] if rows else 0


def _interrupted(site: Site) -> dict[str, int]:
    """What the dead daemon left: running jobs, recorded publication plans, temporary files."""
    running = query(site.db, "SELECT count(*) FROM jobs WHERE state = 'running'")
    plans = query(site.db, "SELECT count(*) FROM jobs WHERE publishing IS NOT NULL")
    done = query(site.db, "SELECT count(*) FROM jobs WHERE state = 'done'")
    return {
        "running_jobs": running[0][0] if running else 0,
        "publication_plans": plans[0][0] if plans else 0,
        "temp_files": len(temp_files(site.out)) if site.out.is_dir() else 0,
        "jobs_done": done[0][0] if done else 0,
    }


# ---------------------------------------------------------------------------- the checks

CHECKS = (
    ("originals_changed", "originals whose bytes changed (or vanished)"),
    ("outputs_missing", "sources without an image output"),
    ("outputs_duplicated", "sources with more than one image version"),
    ("done_runs_duplicated", "sources processed to 'done' more than once"),
    ("partial_files", "temporary, empty, unexpected or half-published files in the output tree"),
    ("outputs_unreadable", "image outputs that do not decode at twice the source's size"),
    ("outputs_unrecorded", "output files with no row in the outputs table"),
    ("recorded_outputs_bad", "recorded outputs missing on disk or with another hash"),
    ("integrity_errors", "PRAGMA integrity_check lines other than 'ok'"),
    ("jobs_stuck", "jobs not 'done', or with a publication plan left"),
    ("orphan_processes", "processes of a daemon still alive after it ended"),
    ("final_run_failed", "the final `watch --once` exited non-zero"),
)


def check(site: Site, scans: list[Scan], orphans: int) -> tuple[dict[str, int], dict[str, list]]:
    """Every count in CHECKS (0 is right), and the offending names for each."""
    bad: dict[str, list] = {name: [] for name, _ in CHECKS}
    for scan in scans:
        path = site.scans / scan.relative
        if not path.is_file() or _sha256(path) != scan.sha256:
            bad["originals_changed"].append(scan.relative)
    files = _output_files(site.out)
    recorded = _recorded_outputs(site)
    claimed = _check_outputs(site, scans, files, bad)
    for relative in files:
        if relative in claimed:
            continue
        bad["partial_files"].append(relative)  # a temp, or a name no source explains
    for relative, sha in recorded.items():
        path = site.out / relative
        if not path.is_file() or _sha256(path) != sha:
            bad["recorded_outputs_bad"].append(relative)
    bad["outputs_unrecorded"] = sorted(set(claimed) - set(recorded))
    _check_database(site, scans, bad)
    counts = {name: len(bad[name]) for name, _ in CHECKS}
    counts["orphan_processes"] = orphans
    return counts, bad


def _check_outputs(
    site: Site, scans: list[Scan], files: list[str], bad: dict[str, list]
) -> set[str]:
    """Per source: exactly one image version, each version a complete set (image + JSON
    sidecar), no empty file, the image decodable at 2x. Returns the files a source explains."""
    by_folder: dict[str, list[str]] = {}
    for relative in files:
        by_folder.setdefault(os.path.dirname(relative), []).append(os.path.basename(relative))
    claimed: set[str] = set()
    for scan in scans:
        folder, stem = os.path.dirname(scan.relative), Path(scan.relative).stem
        pattern = re.compile(re.escape(stem) + r"\.v(\d+)(\..+)")
        versions: dict[int, set[str]] = {}
        for name in by_folder.get(folder, []):
            match = pattern.fullmatch(name)
            if match and not name.startswith("._"):
                versions.setdefault(int(match.group(1)), set()).add(match.group(2))
                claimed.add(os.path.join(folder, name))
        images = {v: s - {".json", ".mask.png"} for v, s in versions.items()}
        images = {v: s for v, s in images.items() if s}
        if not images:
            bad["outputs_missing"].append(scan.relative)
        elif len(images) > 1 or any(len(s) > 1 for s in images.values()):
            bad["outputs_duplicated"].append(scan.relative)
        for number, suffixes in versions.items():
            if ".json" not in suffixes or not images.get(number):
                bad["partial_files"].append(f"{os.path.join(folder, stem)}.v{number}: {suffixes}")
        for number, suffixes in images.items():
            for suffix in suffixes:
                path = site.out / folder / f"{stem}.v{number}{suffix}"
                image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
                if image is None or image.shape[:2] != (2 * scan.height, 2 * scan.width):
                    bad["outputs_unreadable"].append(str(path.relative_to(site.out)))
    for relative in claimed:
        if (site.out / relative).stat().st_size == 0:
            bad["partial_files"].append(f"{relative}: empty")
    return claimed


def _check_database(site: Site, scans: list[Scan], bad: dict[str, list]) -> None:
    with contextlib.closing(sqlite3.connect(f"file:{site.db}?mode=ro", uri=True)) as conn:
        lines = [row[0] for row in conn.execute("PRAGMA integrity_check")]
        bad["integrity_errors"] = [line for line in lines if line != "ok"]
        bad["jobs_stuck"] = [
            f"{path}: {state}{' (publication plan left)' if plan else ''}"
            for path, state, plan in conn.execute(
                "SELECT path, state, publishing IS NOT NULL FROM jobs "
                "WHERE state != 'done' OR publishing IS NOT NULL ORDER BY id"
            )
        ]
        wanted = {scan.sha256 for scan in scans}
        bad["done_runs_duplicated"] = [
            f"{sha[:12]}: {count} runs"
            for sha, count in conn.execute(
                "SELECT source_sha256, count(*) FROM runs WHERE status = 'done' "
                "GROUP BY source_sha256, recipe_sha256 HAVING count(*) > 1"
            )
            if sha in wanted
        ]


def _output_files(root: Path) -> list[str]:
    if not root.is_dir():
        return []
    return sorted(
        os.path.relpath(os.path.join(folder, name), root)
        for folder, _dirs, names in os.walk(root)
        for name in names
    )


def _recorded_outputs(site: Site) -> dict[str, str]:
    with sqlite3.connect(f"file:{site.db}?mode=ro", uri=True) as conn:
        return {
            str(path): sha for path, sha in conn.execute("SELECT path, output_sha256 FROM outputs")
        }


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------- the whole run


@dataclass
class Result:
    command: str
    files: int
    rounds: int
    seed: int
    workers: int
    counts: dict[str, int]
    problems: dict[str, list]
    kills: list[dict[str, Any]]
    durations: dict[str, float]
    final_exit: int | None
    recovery: dict[str, int]
    environment: dict[str, Any]

    @property
    def ok(self) -> bool:
        return not any(self.counts.values())


def crashloop(
    root: Path,
    *,
    files: int,
    rounds: int,
    seed: int,
    workers: int,
    modes: Sequence[str] = (),
    command: str = "",
) -> Result:
    """The whole experiment in `root` (which must be empty or absent). Round i is killed the
    `modes[i % len(modes)]` way, or a seeded random way of KILL_MODES when `modes` is empty."""
    rng = random.Random(seed)
    tag = f"crashloop-{secrets.token_hex(6)}"
    clock = time.monotonic()
    durations: dict[str, float] = {}
    site = make_site(root, workers=workers)
    scans = make_batch(root / "staging", files, rng)
    durations["prepare"] = time.monotonic() - clock
    early = max(1, round(len(scans) * 0.4)) if rounds else len(scans)
    for scan in scans[:early]:
        drop(scan, site.scans, rng)
    batches = _split(scans[early:], rounds)
    log = root / "daemon.log"
    kills: list[Kill] = []
    clock = time.monotonic()
    for index in range(rounds):
        mode = modes[index % len(modes)] if modes else rng.choice(KILL_MODES)
        kills.append(crash_round(site, index + 1, mode, batches[index], rng, tag, log))
    durations["rounds"] = time.monotonic() - clock
    clock = time.monotonic()
    final = spawn(site, tag, log, once=True)
    try:
        final_exit = final.wait(timeout=1800)
    except subprocess.TimeoutExpired:
        final.kill()
        final_exit = final.wait()
    durations["final_run"] = time.monotonic() - clock
    orphans = orphans_after(tag, grace=2.0) + [o for k in kills for o in k.orphans]
    clock = time.monotonic()
    counts, problems = check(site, scans, len(orphans))
    counts["final_run_failed"] = int(final_exit != 0)
    durations["checks"] = time.monotonic() - clock
    problems["orphan_processes"] = orphans
    return Result(
        command=command,
        files=files,
        rounds=rounds,
        seed=seed,
        workers=workers,
        counts=counts,
        problems={name: items[:20] for name, items in problems.items()},
        kills=[asdict(kill) for kill in kills],
        durations={name: round(value, 2) for name, value in durations.items()},
        final_exit=final_exit,
        recovery=recovery_actions(log),
        environment=environment(),
    )


def recovery_actions(log: Path) -> dict[str, int]:
    """What the restarted daemons logged doing at start-up: publications finished from their
    recorded plan, jobs of a dead daemon queued again, leftover temporary files removed."""
    text = log.read_text(encoding="utf-8", errors="replace")
    removed = re.findall(r" removed (\d+) leftover temporary files", text)
    return {
        "publications_finished": text.count(" recovered publication path="),
        "jobs_requeued": len(re.findall(r" requeued path=.* after a crash", text)),
        "temp_files_removed": sum(int(n) for n in removed),
        "daemon_starts": text.count(" started input="),
    }


def _split(items: list[Scan], parts: int) -> list[list[Scan]]:
    if parts <= 0:
        return []
    return [items[index::parts] for index in range(parts)]


def environment() -> dict[str, Any]:
    commit = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "daemon", "bench/crashloop.py", "bench/soak.py"],
        cwd=REPO,
        capture_output=True,
        text=True,
    ).stdout.strip()
    return {
        "commit": commit,
        "daemon_or_bench_modified": bool(dirty),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def print_result(result: Result) -> None:
    print(f"crash loop: {result.files} files, {result.rounds} rounds, seed {result.seed}, "
          f"{result.workers} workers")  # fmt: skip
    print(f"\n{'round':>5}  {'kill mode':<11} {'after s':>8} {'fired':>5} {'dropped':>7} "
          f"{'running':>7} {'plans':>5} {'temps':>5} {'done':>5}")  # fmt: skip
    for kill in result.kills:
        left = kill["at_kill"]
        print(
            f"{kill['round']:>5}  {kill['mode']:<11} {kill['after_seconds']:>8.2f} "
            f"{'yes' if kill['fired'] else 'no':>5} {kill['dropped']:>7} "
            f"{left['running_jobs']:>7} {left['publication_plans']:>5} {left['temp_files']:>5} "
            f"{left['jobs_done']:>5}"
        )
    interrupted = {
        "a running job": sum(k["at_kill"]["running_jobs"] > 0 for k in result.kills),
        "a temporary file": sum(k["at_kill"]["temp_files"] > 0 for k in result.kills),
        "a publication plan": sum(k["at_kill"]["publication_plans"] > 0 for k in result.kills),
    }
    print("\nkills that interrupted " + ", ".join(f"{k}: {v}" for k, v in interrupted.items()))
    print(
        "restarted daemons: "
        + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in result.recovery.items())
    )
    print(f"final `watch --once` exit status: {result.final_exit}")
    print(f"\n{'check':<22} {'count':>5}  what")
    for name, what in CHECKS:
        count = result.counts[name]
        print(f"{name:<22} {count:>5}  {what}{'' if count == 0 else '  <-- FAIL'}")
        for item in result.problems.get(name, [])[:5]:
            print(f"{'':<30}{item}")
    print("\ndurations (s): " + ", ".join(f"{k} {v}" for k, v in result.durations.items()))
    print("PASS: every count is 0" if result.ok else "FAIL: see the counts above")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=200, help="scans in the batch")
    parser.add_argument("--rounds", type=int, default=20, help="daemons killed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2, help="daemon.workers")
    parser.add_argument(
        "--modes",
        default="",
        help=f"comma-separated kill modes to cycle through (default: seeded random of "
        f"{', '.join(KILL_MODES)})",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "crashloop.json")
    args = parser.parse_args(argv)
    unknown = sorted({mode for mode in args.modes.split(",") if mode} - set(KILL_MODES))
    if unknown:
        parser.error(f"--modes: unknown {', '.join(unknown)} (one of {', '.join(KILL_MODES)})")
    if not CORPUS.is_dir():
        print(f"{CORPUS}: the shared corpus is absent", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="scanrestore-crashloop-"))
    command = shlex.join(["bench/crashloop.py", *(argv if argv is not None else sys.argv[1:])])
    try:
        result = crashloop(
            root,
            files=args.files,
            rounds=args.rounds,
            seed=args.seed,
            workers=args.workers,
            modes=[mode for mode in args.modes.split(",") if mode],
            command=command,
        )
    finally:
        if args.keep:
            print(f"kept {root} (daemon.log, scans, out, state)")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print_result(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({**asdict(result), "ok": result.ok}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
