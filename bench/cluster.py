"""Several machines on one: throughput of `scanrestore worker` processes through a real Redis
beside local worker processes, and the coordinator's overhead per file through the broker.

    .venv/bin/python bench/cluster.py [--files 16] [--size 256] [--out bench/results/cluster.json]

Each configuration runs the same batch of `--files` distinct crops of a corpus photo
(`--size` px square) through a 2x SRVGGNetCompact (32 features, 8 convolutions, randomly
initialised: the work of a real architecture, seconds per image on one thread), from the first
file dropped until every job is done: local worker processes (1 and 2), and cluster workers
(1 and 2) with a coordinator, each process at one thread (this machine has 2 cores). Reported:
files per second and seconds per input megapixel. Then the overhead: the same run with a
near-free model (a 2x nearest SRVGGNetCompact on 48 px crops) and one worker, where the wall
time per file minus the worker's own processing seconds is what dispatching, claiming,
reporting and publishing cost per file, through the broker and locally.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import sys
import tempfile
import time
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
            f"overhead {kind:8s}: {row['overhead_ms_per_file']:.0f} ms per file "
            f"({row['seconds']:.2f} s wall, {row['processing_seconds']:.2f} s processing, "
            f"{overhead_files} files)"
        )
    return {
        "machine": {"cpus": _cpus(), "platform": platform.platform()},
        "files": files,
        "size": size,
        "throughput": throughput,
        "overhead": overhead,
        "overhead_through_broker_ms": overhead["cluster"]["overhead_ms_per_file"]
        - overhead["local"]["overhead_ms_per_file"],
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
        if kind == "local":  # the coordinator's own workers are up once its database is
            wait_for(lambda: site.query("SELECT 1 FROM jobs LIMIT 1") is not None, 120)
        started = time.perf_counter()
        sources = drop(site, files, size=size)
        wait_for(lambda: site.done() == files, 3600, f"{files} jobs done")
        seconds = time.perf_counter() - started
        (processing,) = site.query(
            "SELECT sum(seconds) FROM stage_runs JOIN runs ON runs.id = stage_runs.run_id "
            "WHERE runs.status = 'done'"
        )[0]
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
    }


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0))


if __name__ == "__main__":
    sys.exit(main())
