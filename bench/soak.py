"""Soak: the daemon on thousands of tiny scans arriving in bursts, sampled for leaks and overhead.

    .venv/bin/python bench/soak.py [--files 3000] [--seconds 1800] [--workers 2] [--bursts 10]
        [--gap 10] [--trickle 20] [--interval 2] [--seed 0] [--keep] [--out bench/results/soak.json]

`scanrestore watch` runs as a subprocess with the tiny exact 2x model (so the model's own time is
small and the daemon's shows). The batch (distinct 16-48 px crops of real photos, PNG/JPEG/TIFF,
in nested folders) lands in `--bursts` bursts `--gap` seconds apart. Every `--interval` seconds
the harness samples: jobs done, files/s, resident memory of the daemon and of its children (the
workers and multiprocessing's resource tracker), the daemon's open descriptors and threads.
When the batch is done (or `--seconds` have passed), `--trickle` more files arrive one at a
time, each after the previous one is published, then the daemon gets SIGTERM.

Reported: start/end/max of each sample; the least-squares slope of total RSS against files done
(MB per 1000 files) and against time (MB per minute), fitted from 10 % of the batch on, so the
workers' first model load is not read as growth; per file, from the database: the time from
dispatch to published (runs.started_at -> finished_at) less the model's own time (stage_runs
seconds), under load and for the trickle, where nothing waits; ingest-to-published
(jobs.created_at -> runs.finished_at) less the model time for the trickle (under load that
mostly measures the queue); and, from the daemon's log, how the overhead splits between the
worker (decode, encode, hashes, fsync) and the daemon (IPC, the plan, the sidecar, linking,
the commits). Target: overhead < 100 ms per file beyond the model's own time.
Exits 2 where ../shared (the corpus) is absent.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import random
import re
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from crashloop import (
    CORPUS,
    REPO,
    Scan,
    Site,
    drop,
    environment,
    make_batch,
    make_site,
    orphans_after,
    query,
    spawn,
)

from daemon.watcher import safe_name

MB = 1024 * 1024
TARGET_OVERHEAD_MS = 100.0


# ---------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class Sample:
    seconds: float  # since the spawn
    done: int
    backlog: int  # jobs queued or running
    daemon_rss_mb: float
    children_rss_mb: float  # workers and the resource tracker together
    children: int
    daemon_fds: int
    children_fds: int
    daemon_threads: int

    @property
    def total_rss_mb(self) -> float:
        return self.daemon_rss_mb + self.children_rss_mb


def sample(proc: psutil.Process, seconds: float, done: int, backlog: int) -> Sample | None:
    """One look at the daemon and its children (None once the daemon is gone)."""
    try:
        with proc.oneshot():
            rss, fds, threads = proc.memory_info().rss, proc.num_fds(), proc.num_threads()
        children = proc.children(recursive=True)
    except psutil.Error:
        return None
    child_rss = child_fds = 0
    alive = 0
    for child in children:
        with contextlib.suppress(psutil.Error):
            child_rss += child.memory_info().rss
            child_fds += child.num_fds()
            alive += 1
    return Sample(
        round(seconds, 2), done, backlog, rss / MB, child_rss / MB, alive, fds, child_fds, threads
    )


def _backlog(site: Site) -> int:
    rows = query(site.db, "SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')")
    return rows[0][0] if rows else 0


def _done(site: Site) -> int:
    rows = query(site.db, "SELECT count(*) FROM jobs WHERE state = 'done'")
    return rows[0][0] if rows else 0


# ---------------------------------------------------------------------------- the run


@dataclass
class Run:
    samples: list[Sample]
    bursts: list[dict[str, Any]]  # when each landed and how many files
    trickle: list[str]  # relative paths of the one-at-a-time files
    batch_done_at: float | None  # seconds from the spawn when the whole batch was done
    stop_seconds: float  # SIGTERM to exit
    exit_code: int | None
    worker_pids: int  # distinct child pids seen (more than the pool's size: a child replaced)


def soak(
    site: Site,
    batch: list[Scan],
    trickle: list[Scan],
    args: argparse.Namespace,
    tag: str,
    log: Path,
) -> Run:
    """Run the daemon through the bursts (sampling), then the trickle, then SIGTERM it."""
    rng = random.Random(args.seed + 1)
    parts = [batch[index :: args.bursts] for index in range(args.bursts)]
    bursts: list[dict[str, Any]] = []
    samples: list[Sample] = []
    pids: set[int] = set()
    started = time.monotonic()
    daemon = spawn(site, tag, log)
    proc = psutil.Process(daemon.pid)
    batch_done_at = None
    next_sample = 0.0
    try:
        while (now := time.monotonic() - started) < args.seconds:
            if daemon.poll() is not None:
                break
            if parts and now >= len(bursts) * args.gap:
                for scan in parts[0]:
                    drop(scan, site.scans, rng)
                bursts.append({"at_seconds": round(now, 2), "files": len(parts.pop(0))})
            if now >= next_sample:
                done = _done(site)
                if (taken := sample(proc, now, done, _backlog(site))) is not None:
                    samples.append(taken)
                with contextlib.suppress(psutil.Error):
                    pids |= {child.pid for child in proc.children(recursive=True)}
                next_sample = now + args.interval
                if not parts and done >= len(batch):
                    batch_done_at = now
                    break
            time.sleep(0.05)
        # Only through an idle daemon does the trickle measure a file's own path.
        idle = batch_done_at is not None
        trickled = _trickle(site, trickle, rng, time.monotonic() + 120) if idle else []
        with contextlib.suppress(psutil.Error):
            pids |= {child.pid for child in proc.children(recursive=True)}
        stopping = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        try:
            code = daemon.wait(120)
        except subprocess.TimeoutExpired:
            daemon.kill()
            code = daemon.wait()
        stop_seconds = time.monotonic() - stopping
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
    return Run(
        samples=samples,
        bursts=bursts,
        trickle=trickled,
        batch_done_at=None if batch_done_at is None else round(batch_done_at, 2),
        stop_seconds=round(stop_seconds, 2),
        exit_code=code,
        worker_pids=len(pids),
    )


def _trickle(site: Site, scans: list[Scan], rng: random.Random, deadline: float) -> list[str]:
    """Drop each file once the previous one is done: its whole path through an idle daemon."""
    landed = []
    for scan in scans:
        before = _done(site)
        drop(scan, site.scans, rng)
        landed.append(scan.relative)
        while _done(site) <= before:
            if time.monotonic() > deadline:
                return landed
            time.sleep(0.02)
    return landed


# ---------------------------------------------------------------------------- analysis


@dataclass(frozen=True)
class FileTimes:
    path: str
    model: float  # seconds in the stages (stage_runs.seconds)
    service: float  # dispatch to published
    latency: float  # queued (after ingest) to published
    worker: float | None  # the worker's whole time, from the log
    started_at: datetime
    finished_at: datetime


def file_times(site: Site, log: Path) -> list[FileTimes]:
    """Per done job of this run, from the database and the daemon's `published` log lines."""
    worker = _worker_seconds(log)
    rows = query(
        site.db,
        "SELECT j.path, j.created_at, r.started_at, r.finished_at, "
        "(SELECT total(seconds) FROM stage_runs s WHERE s.run_id = r.id) "
        "FROM jobs j JOIN runs r ON r.job_id = j.id AND r.status = 'done' "
        "WHERE j.state = 'done' ORDER BY r.id",
    )
    times = []
    for path, created, started, finished, model in rows or []:
        created_at, started_at, finished_at = map(
            datetime.fromisoformat, (created, started, finished)
        )
        times.append(
            FileTimes(
                str(path),
                model,
                (finished_at - started_at).total_seconds(),
                (finished_at - created_at).total_seconds(),
                worker.get(safe_name(str(path))),
                started_at,
                finished_at,
            )
        )
    return times


_PUBLISHED = re.compile(r' published path=("(?:[^"\\]|\\.)*") version=\d+ .* seconds=([\d.]+)$')


def _worker_seconds(log: Path) -> dict[str, float]:
    found = {}
    with open(log, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            match = _PUBLISHED.search(line.rstrip("\n"))
            if match:
                found[match.group(1)] = float(match.group(2))
    return found


def distribution(values: list[float]) -> dict[str, float] | None:
    """Median, 95th percentile and maximum, in milliseconds."""
    if not values:
        return None
    ordered = sorted(values)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {
        "n": len(ordered),
        "median_ms": round(1000 * statistics.median(ordered), 1),
        "p95_ms": round(1000 * p95, 1),
        "max_ms": round(1000 * ordered[-1], 1),
    }


def overheads(times: list[FileTimes], trickle: set[str]) -> dict[str, Any]:
    """Distributions per file. Jobs dispatched before the first publication are left out of
    the loaded ones: they waited for the workers' start-up (imports, the model's first load)."""
    first = min((t.finished_at for t in times), default=None)
    loaded = [t for t in times if t.path not in trickle and t.started_at >= first]
    idle = [t for t in times if t.path in trickle]
    split = [t for t in loaded if t.worker is not None]
    return {
        "warm_up_excluded": sum(t.path not in trickle and t.started_at < first for t in times),
        "model": distribution([t.model for t in loaded]),
        "loaded_dispatch_to_published_minus_model": distribution(
            [t.service - t.model for t in loaded]
        ),
        "loaded_worker_minus_model": distribution([t.worker - t.model for t in split]),
        "loaded_daemon_beyond_worker": distribution([t.service - t.worker for t in split]),
        "loaded_ingest_to_published": distribution([t.latency for t in loaded]),
        "trickle_dispatch_to_published_minus_model": distribution(
            [t.service - t.model for t in idle]
        ),
        "trickle_ingest_to_published_minus_model": distribution(
            [t.latency - t.model for t in idle]
        ),
    }


def memory(samples: list[Sample], files: int) -> dict[str, Any]:
    """Start/end/max of each series and the RSS slopes, fitted from 10 % of the batch on."""
    series = {
        "daemon_rss_mb": [s.daemon_rss_mb for s in samples],
        "children_rss_mb": [s.children_rss_mb for s in samples],
        "total_rss_mb": [s.total_rss_mb for s in samples],
        "daemon_fds": [s.daemon_fds for s in samples],
        "children_fds": [s.children_fds for s in samples],
        "daemon_threads": [s.daemon_threads for s in samples],
        "children": [s.children for s in samples],
    }
    summary: dict[str, Any] = {
        name: {"start": values[0], "end": values[-1], "max": max(values)}
        for name, values in series.items()
        if values
    }
    fitted = [s for s in samples if s.done >= 0.1 * files]
    summary["fit_samples"] = len(fitted)
    for name in ("total_rss_mb", "daemon_rss_mb", "children_rss_mb"):
        per_file = slope([s.done for s in fitted], [getattr(s, name) for s in fitted])
        per_second = slope([s.seconds for s in fitted], [getattr(s, name) for s in fitted])
        summary[name]["mb_per_1000_files"] = None if per_file is None else round(1000 * per_file, 2)
        summary[name]["mb_per_minute"] = None if per_second is None else round(60 * per_second, 2)
    return summary


def backlogged_rate(samples: list[Sample]) -> float | None:
    """Files per second over the sampling intervals that began and ended with jobs waiting or
    running, once the workers had published a first file: the daemon's throughput when it is
    never short of work."""
    files = seconds = 0.0
    for a, b in itertools.pairwise(samples):
        if a.done and a.backlog and b.backlog and b.seconds > a.seconds:
            files += b.done - a.done
            seconds += b.seconds - a.seconds
    return round(files / seconds, 2) if seconds else None


def slope(x: list[float], y: list[float]) -> float | None:
    """Least-squares slope of y on x (None with fewer than three distinct x)."""
    if len(set(x)) < 3:
        return None
    return float(np.polyfit(np.asarray(x, float), np.asarray(y, float), 1)[0])


# ---------------------------------------------------------------------------- report


def report(result: dict[str, Any]) -> None:
    print(
        f"soak: {result['files']} files in {len(result['bursts'])} bursts + "
        f"{len(result['trickle'])} one at a time, {result['workers']} workers"
    )
    print(
        f"batch done after {result['batch_done_seconds']} s of {result['seconds_limit']} s; "
        f"throughput {result['files_per_second']} files/s (first to last publication); "
        f"{result['backlogged_files_per_second']} files/s while a backlog waited; "
        f"peak {result['peak_files_per_second']} files/s over one sample"
    )
    print(
        f"\n{'sample':<18} {'start':>8} {'end':>8} {'max':>8} {'MB/1000 files':>14} {'MB/min':>8}"
    )
    for name, values in result["memory"].items():
        if not isinstance(values, dict):
            continue
        print(
            f"{name:<18} {values['start']:>8.1f} {values['end']:>8.1f} {values['max']:>8.1f} "
            f"{_num(values.get('mb_per_1000_files')):>14} {_num(values.get('mb_per_minute')):>8}"
        )
    print(f"\n{'per file':<44} {'n':>5} {'median ms':>10} {'p95 ms':>8} {'max ms':>8}")
    for name, values in result["overhead"].items():
        if isinstance(values, dict):
            print(
                f"{name:<44} {values['n']:>5} {values['median_ms']:>10} {values['p95_ms']:>8} "
                f"{values['max_ms']:>8}"
            )
    print(
        f"(left out of 'loaded': {result['overhead']['warm_up_excluded']} jobs dispatched "
        "before the workers' first publication)"
    )
    print(
        f"\njobs not done: {result['jobs_not_done']}; child processes seen: "
        f"{result['worker_pids']}; SIGTERM to exit: {result['stop_seconds']} s "
        f"(exit {result['exit_code']}); orphans: {len(result['orphans'])}"
    )
    verdict = result["overhead_target_met"]
    print(f"overhead target (< {TARGET_OVERHEAD_MS:.0f} ms median beyond the model): {verdict}")


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=3000, help="files in the bursts")
    parser.add_argument("--seconds", type=float, default=1800.0, help="stop after this long")
    parser.add_argument("--workers", type=int, default=2, help="daemon.workers")
    parser.add_argument("--bursts", type=int, default=10)
    parser.add_argument("--gap", type=float, default=10.0, help="seconds between bursts")
    parser.add_argument("--trickle", type=int, default=20, help="files sent one at a time")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "soak.json")
    args = parser.parse_args(argv)
    if not CORPUS.is_dir():
        print(f"{CORPUS}: the shared corpus is absent", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="scanrestore-soak-"))
    command = shlex.join(["bench/soak.py", *(argv if argv is not None else sys.argv[1:])])
    try:
        result = run(root, args, command)
    finally:
        if args.keep:
            print(f"kept {root} (daemon.log, scans, out, state)")
        else:
            shutil.rmtree(root, ignore_errors=True)
    report(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if result["jobs_not_done"] == 0 and not result["orphans"] else 1


def run(root: Path, args: argparse.Namespace, command: str) -> dict[str, Any]:
    rng = random.Random(args.seed)
    tag = f"soak-{secrets.token_hex(6)}"
    site = make_site(root, workers=args.workers)
    scans = make_batch(root / "staging", args.files + args.trickle, rng, sizes=(16, 48))
    log = root / "daemon.log"
    outcome = soak(site, scans[: args.files], scans[args.files :], args, tag, log)
    orphans = orphans_after(tag, grace=5.0)
    times = file_times(site, log)
    table = overheads(times, set(outcome.trickle))
    loaded = table["loaded_dispatch_to_published_minus_model"]
    rows = query(site.db, "SELECT count(*) FROM jobs WHERE state != 'done'")
    published = sorted(t.finished_at for t in times if t.path not in set(outcome.trickle))
    rate = None
    if len(published) > 1:
        rate = round(len(published) / (published[-1] - published[0]).total_seconds(), 2)
    rates = [
        (b.done - a.done) / (b.seconds - a.seconds)
        for a, b in itertools.pairwise(outcome.samples)
        if b.seconds > a.seconds
    ]
    return {
        "command": command,
        "files": args.files,
        "workers": args.workers,
        "seconds_limit": args.seconds,
        "seed": args.seed,
        "bursts": outcome.bursts,
        "trickle": outcome.trickle,
        "batch_done_seconds": outcome.batch_done_at,
        "files_per_second": rate,
        "backlogged_files_per_second": backlogged_rate(outcome.samples),
        "peak_files_per_second": round(max(rates), 2) if rates else None,
        "memory": memory(outcome.samples, args.files),
        "overhead": table,
        "overhead_target_met": bool(loaded and loaded["median_ms"] < TARGET_OVERHEAD_MS),
        "jobs_not_done": rows[0][0] if rows else None,
        "worker_pids": outcome.worker_pids,
        "stop_seconds": outcome.stop_seconds,
        "exit_code": outcome.exit_code,
        "orphans": orphans,
        "samples": [asdict(s) for s in outcome.samples],
        "environment": environment(),
    }


if __name__ == "__main__":
    sys.exit(main())
