"""Restart cost: a daemon restarted over a large tree it has already processed.

    .venv/bin/python bench/restart.py [--files 20000] [--stable-seconds 5] [--code DIR]
        [--dir /dev/shm] [--keep] [--out bench/results/restart.json]

A tree of `--files` small distinct files (200 per folder) is made and recorded as processed
through the public store and queue methods of the code under test, with exactly what its
daemon records for a finished file: the observation (with its mtime and inode where that code
records them), the recipe (`recipe_of` for the config), a job queued, claimed and completed,
and a done run with its stage and output rows (no output files are written: the files are not
images). Then `scanrestore watch --once` runs in this process over the same config: it opens
the database, scans the tree, takes in whatever it hands over and exits once nothing is left
to do. Reported: files hashed (every `hashlib.file_digest` call on a file of the tree is
counted), files handed to ingest (calls of `JobQueue.enqueue`), seconds until the start-up
scan was taken in (from the start to the later of the watcher's first rescan and the last
file handed over being queued), seconds spent hashing, and the seconds of the whole
`watch --once` (which also starts and stops a worker process: a constant of several seconds).

`--code DIR` measures another checkout (its daemon/ and pipeline/ go first on sys.path), e.g.
the code before restarts were seeded:

    git worktree add ../scanrestore-a55d7c5 a55d7c5
    .venv/bin/python bench/restart.py --code ../scanrestore-a55d7c5 \\
        --out bench/results/restart-before.json
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
PER_FOLDER = 200


def main() -> int:
    args = _parser().parse_args()
    code = Path(args.code).resolve()
    sys.path[:0] = [str(code), str(REPO / "tests")]
    base = Path(args.dir) if args.dir else _default_dir()
    root = Path(tempfile.mkdtemp(prefix="restart-", dir=base))
    try:
        result = run(root, code, files=args.files, stable_seconds=args.stable_seconds)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    _report(result, Path(args.out))
    return 0 if result["restart"]["exit_status"] == 0 else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--stable-seconds", type=float, default=5.0, help="[watch] stable_seconds")
    parser.add_argument("--code", default=str(REPO), help="the checkout to measure")
    parser.add_argument("--dir", help="where the tree and state go (default /dev/shm or /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the tree and the database")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "restart.json"))
    return parser


def _default_dir() -> Path:
    # A RAM disk keeps the set-up's 20,000 committed records from costing minutes of fsyncs;
    # the restart itself is what is measured, on whichever disk.
    shm = Path("/dev/shm")
    return shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())


def run(root: Path, code: Path, *, files: int, stable_seconds: float) -> dict[str, Any]:
    from modelfactory import nearest_compact

    scans, state = root / "scans", root / "state"
    model = nearest_compact(root / "model" / "nearest2x.pth", scale=2)
    config = _write_config(root, scans, state, model, stable_seconds)
    started = time.monotonic()
    tree = _make_tree(scans, files)
    made = time.monotonic() - started
    started = time.monotonic()
    _record_processed(config, tree)
    recorded = time.monotonic() - started
    restart = _restart(config, tree)

    import daemon

    return {
        "code": str(code),
        "daemon_module": daemon.__file__,
        "commit": _commit(code),
        "files": files,
        "stable_seconds": stable_seconds,
        "where": str(root.parent),
        "setup_seconds": {"tree": round(made, 2), "recorded_as_processed": round(recorded, 2)},
        "restart": restart,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "at": datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def _write_config(root: Path, scans: Path, state: Path, model: Path, stable: float) -> Path:
    sections = {
        "models": {"cache_dir": str(root / "cache"), "auto_fetch": False},
        "processing": {"device": "cpu", "precision": "fp32", "threads": 1},
        "watch": {"input": str(scans), "output": str(root / "out"), "stable_seconds": stable},
        "daemon": {"state_dir": str(state), "workers": 1},
        "schedule": {"fixity_at": "", "backup_at": ""},
    }
    lines = []
    for name, values in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    lines += ["[[pipeline.stages]]", 'kind = "upscale"', f"model = {json.dumps(str(model))}"]
    lines.append("scale = 2.0")
    path = root / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _make_tree(scans: Path, files: int) -> dict[str, Path]:
    """`files` distinct small files, 200 to a folder: relative path -> path."""
    tree = {}
    for index in range(files):
        relative = f"box{index // PER_FOLDER:03d}/scan{index:05d}.tif"
        path = scans / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"scan {index} ".encode() * (1 + index % 7))
        tree[relative] = path
    return tree


def _record_processed(config_path: Path, tree: dict[str, Path]) -> None:
    """What the code under test's daemon records for each finished file, through its store's
    and queue's public methods, a thousand files to a transaction."""
    from daemon.config import load_config
    from daemon.queue import JobQueue
    from daemon.service import recipe_of, state_dir
    from daemon.store import Store, open_database

    config = load_config(config_path)
    recipe = recipe_of(config, config.chain(None), None)
    # The code before 0004 records no mtime_ns and inode: what its daemon records, it gets.
    identity = "inode" in inspect.signature(Store.record_observation).parameters
    store = open_database(state_dir(config) / "scanrestore.db")
    try:
        queue = JobQueue(store)
        recipe_sha = store.record_recipe(recipe)
        names = sorted(tree)
        for start in range(0, len(names), 1000):
            with store.transaction():
                for relative in names[start : start + 1000]:
                    _record_one(store, queue, relative, tree[relative], recipe_sha, identity)
    finally:
        store.close()


def _record_one(
    store: Any, queue: Any, relative: str, path: Path, recipe_sha: str, identity: bool
) -> None:
    from daemon.service import code_version
    from daemon.store import OutputFile
    from pipeline.files import sha256_file

    info = path.stat()
    sha = sha256_file(path, follow_symlinks=False)
    modified = datetime.fromtimestamp(info.st_mtime_ns / 1e9).astimezone()
    extra = {"mtime_ns": info.st_mtime_ns, "inode": info.st_ino} if identity else {}
    store.record_observation(relative, sha, size=info.st_size, modified_at=modified, **extra)
    queue.enqueue(relative, sha, recipe_sha)
    job = queue.claim("bench")
    now = store.clock()
    stem = relative.rsplit(".", 1)[0]
    store.record_run(
        source_sha256=sha,
        path=relative,
        recipe_sha256=recipe_sha,
        status="done",
        started_at=now - timedelta(seconds=1),
        finished_at=now,
        code_version=code_version(),
        device="cpu",
        job_id=job.id,
        run_token=job.lease_id,
        stages=[{"stage": "upscale", "version": 1, "params": {}, "seconds": 0.5}],
        outputs=[OutputFile(f"{stem}.v1.tif", 1, "0" * 64, 1)],
    )
    queue.complete(job)


def _restart(config: Path, tree: dict[str, Path]) -> dict[str, Any]:
    """`watch --once` in this process, counting and timing the hashes of the tree's files, and
    noting when the start-up scan was taken in: the later of the watcher's first rescan and
    the last file handed to ingest being queued."""
    import logging

    from daemon.cli import main as cli
    from daemon.queue import JobQueue

    inodes = {path.stat().st_ino for path in tree.values()}
    counts = {"hashed": 0, "hash_seconds": 0.0, "handed_over": 0}
    marks: dict[str, float] = {}
    digest, enqueue = hashlib.file_digest, JobQueue.enqueue

    def counting(handle: Any, *args: Any, **kwargs: Any) -> Any:
        started = time.monotonic()
        try:
            return digest(handle, *args, **kwargs)
        finally:
            if os.fstat(handle.fileno()).st_ino in inodes:
                counts["hashed"] += 1
                counts["hash_seconds"] += time.monotonic() - started

    def noting(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return enqueue(self, *args, **kwargs)
        finally:
            counts["handed_over"] += 1
            marks["last_queued"] = time.monotonic()

    class Rescan(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("rescan:"):
                marks.setdefault("rescan", time.monotonic())

    # The watcher's INFO lines come here only (20,000 "file ready" lines would flood stderr).
    hook, watcher_log = Rescan(), logging.getLogger("scanrestore.watcher")
    level, propagate = watcher_log.level, watcher_log.propagate
    watcher_log.addHandler(hook)
    watcher_log.setLevel(logging.INFO)
    watcher_log.propagate = False
    hashlib.file_digest, JobQueue.enqueue = counting, noting  # type: ignore[method-assign]
    try:
        started = time.monotonic()
        status = cli(["--config", str(config), "watch", "--once"])
        ended = time.monotonic()
    finally:
        hashlib.file_digest, JobQueue.enqueue = digest, enqueue  # type: ignore[method-assign]
        watcher_log.removeHandler(hook)
        watcher_log.setLevel(level)
        watcher_log.propagate = propagate
    taken_in = max(marks.get("rescan", ended), marks.get("last_queued", 0.0))
    return {
        "exit_status": status,
        "unchanged_files": len(tree),
        "files_hashed": counts["hashed"],
        "files_handed_to_ingest": counts["handed_over"],
        "seconds_until_scan_taken_in": round(taken_in - started, 2),
        "seconds_watch_once": round(ended - started, 2),
        "hash_seconds": round(counts["hash_seconds"], 2),
    }


def _commit(code: Path) -> str | None:
    try:
        found = subprocess.run(
            ["git", "-C", str(code), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return None
    dirty = subprocess.run(
        ["git", "-C", str(code), "status", "--porcelain", "--untracked-files=no"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return found.stdout.strip() + ("+changes" if dirty else "")


def _report(result: dict[str, Any], out: Path) -> None:
    restart = result["restart"]
    print(f"code {result['code']} (commit {result['commit']})")
    print(
        f"{result['files']} files already processed; restart (watch --once, "
        f"stable_seconds {result['stable_seconds']:g}):"
    )
    hashed, unchanged = restart["files_hashed"], restart["unchanged_files"]
    print(f"  files hashed                {hashed:>8} of {unchanged}")
    print(f"  files handed to ingest      {restart['files_handed_to_ingest']:>8}")
    print(f"  seconds until scan taken in {restart['seconds_until_scan_taken_in']:>8.2f}")
    print(f"  of which hashing            {restart['hash_seconds']:>8.2f}")
    print(f"  seconds of watch --once     {restart['seconds_watch_once']:>8.2f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written {out}")


if __name__ == "__main__":
    sys.exit(main())
