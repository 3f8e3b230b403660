"""Several machines on one: throughput of `scanrestore worker` processes through a real Redis
beside local worker processes, and the coordinator's overhead per file through the broker.

    .venv/bin/python bench/cluster.py [--files 16] [--size 256] [--out bench/results/cluster.json]

Each configuration runs the same batch of `--files` distinct crops of a corpus photo
(`--size` px square) through a 2x SRVGGNetCompact (32 features, 8 convolutions, randomly
initialised: the work of a real architecture, seconds per image on one thread), from the first
file dropped until every job is done: local worker processes (1 and 2), and cluster workers
(1 and 2) with a coordinator, each process at one thread (this machine has 2 cores). Reported:
files per second and seconds per input megapixel (from the first file dropped, so the
watcher's polling and hashing are in every number alike; one untimed file first warms each
worker). Then the overhead: the same run with a near-free model (a 2x nearest SRVGGNetCompact
on 48 px crops) and one worker: per file, the time from the job's dispatch to its publication
being recorded (runs.started_at to runs.finished_at), locally and through the broker; the
difference is what the broker adds per file (dispatch as a Celery task, claim, heartbeat,
result through Redis).
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--overhead-files", type=int, default=30)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "cluster.json"))
    args = parser.parse_args()
    from clusterkit import REDIS_SERVER

    if REDIS_SERVER is None or not (REPO.parent / "shared").is_dir():
        print("needs redis-server (scripts/setup) and ../shared (the corpus)", file=sys.stderr)
        return 2
    root = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    try:
        result = run(root, args.files, args.size, args.overhead_files)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


def run(root: Path, files: int, size: int, overhead_files: int) -> dict:
    from modelfactory import nearest_compact, tiny_compact

    work = tiny_compact(root / "work.pth", scale=2, num_feat=32, num_conv=8)
    free = nearest_compact(root / "free.pth", scale=2)
    throughput = []
    for kind, count in (("local", 1), ("cluster", 1), ("local", 2), ("cluster", 2)):
        row = measure(root / f"{kind}{count}", work, kind, count, files, size)
        throughput.append(row)
        print(
            f"{kind:8s} {count} worker(s): {row['files_per_second']:.3f} files/s, "
            f"{row['seconds_per_megapixel']:.1f} s/MP ({row['seconds']:.1f} s for {files} files)"
        )
    overhead = {}
    for kind in ("local", "cluster"):
        row = measure(root / f"overhead-{kind}", free, kind, 1, overhead_files, 48)
        overhead[kind] = row
        print(
            f"overhead {kind:8s}: {row['dispatch_to_publication_ms']:.0f} ms from dispatch to "
            f"publication per file ({row['stage_ms_per_file']:.0f} ms of it in the stages); "
            f"wall {row['overhead_ms_per_file']:.0f} ms per file from drop to done "
            f"(watcher included, {overhead_files} files)"
        )
    added = overhead["cluster"]["dispatch_to_publication_ms"]
    added -= overhead["local"]["dispatch_to_publication_ms"]
    print(f"the broker adds {added:.0f} ms per file between dispatch and publication")
    return {
        "machine": {"cpus": _cpus(), "platform": platform.platform()},
        "files": files,
        "size": size,
        "throughput": throughput,
        "overhead": overhead,
        "overhead_through_broker_ms": overhead["cluster"]["dispatch_to_publication_ms"]
        - overhead["local"]["dispatch_to_publication_ms"],
    }


def measure(root: Path, model: Path, kind: str, count: int, files: int, size: int) -> dict:
    from clusterkit import Cluster, RedisServer, wait_for
    from test_cluster import drop

    redis = None
    if kind == "cluster":
        redis = RedisServer(root / "redis")
        redis.start()
    site = Cluster(root / "site", redis, model, local_workers=count)
    try:
        site.start_coordinator()
        for index in range(count if kind == "cluster" else 0):
            site.start_worker(f"w{index + 1}")
        # One file first, untimed: every worker (local or remote) has then loaded its model.
        drop(site, count, size=size, start=1000)
        wait_for(lambda: site.done() == count, 600, "the warm-up files done")
        started = time.perf_counter()
        sources = drop(site, files, size=size)
        wait_for(lambda: site.done() == files + count, 3600, f"{files} jobs done")
        seconds = time.perf_counter() - started
        batch = "runs.status = 'done' AND runs.path NOT LIKE '%scan1___.png'"
        (processing,) = site.query(
            "SELECT sum(seconds) FROM stage_runs JOIN runs ON runs.id = stage_runs.run_id "
            f"WHERE {batch}"
        )[0]
        # From the job's dispatch (claimed, handed to a worker) to its publication recorded.
        spans = site.query(f"SELECT started_at, finished_at FROM runs WHERE {batch}")
    finally:
        site.stop_all()
        if redis is not None:
            redis.stop()
    megapixels = len(sources) * size * size / 1e6
    return {
        "kind": kind,
        "workers": count,
        "seconds": seconds,
        "files_per_second": files / seconds,
        "seconds_per_megapixel": seconds / megapixels,
        "processing_seconds": processing,
        "overhead_ms_per_file": 1000 * (seconds - processing / count) / files,
        "dispatch_to_publication_ms": 1000 * statistics.mean(_seconds(a, b) for a, b in spans),
        "stage_ms_per_file": 1000 * processing / files,
    }


def _seconds(start: str, end: str) -> float:
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
