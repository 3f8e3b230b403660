"""bench/crashloop.py in small: a real daemon SIGKILLed in four different moments while scans
arrive must leave every original intact, exactly one complete output per source, no temporary
file, a sound database, no stuck job and no orphan worker. And the harness's checks must see
each of those faults when one is planted, or their zeros would prove nothing.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import cv2
import psutil
import pytest
from conftest import REPO, SHARED


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


bench = _load("bench_crashloop", REPO / "bench" / "crashloop.py")
MODES = ("publishing", "temp", "delay", "ingest")


@pytest.fixture(scope="module")
def crashed(tmp_path_factory):
    """One crash loop: 24 scans, kills at a recorded publication plan, at a temporary file
    (a job running), in start-up and just after a burst arrives, then `watch --once`. (Each
    round pays a daemon's and a worker's start-up: four rounds keep this near a minute.)"""
    if not (SHARED / "corpus").is_dir():
        pytest.skip("../shared (the corpus) is not present beside the repository")
    root = tmp_path_factory.mktemp("crashloop")
    result = bench.crashloop(root, files=24, rounds=4, seed=5, workers=2, modes=MODES)
    return root, result


def test_a_daemon_killed_four_ways_leaves_every_count_at_zero(crashed):
    _root, result = crashed
    assert [kill["mode"] for kill in result.kills] == list(MODES)
    assert not any(kill["exited_before"] for kill in result.kills)
    assert result.counts == dict.fromkeys(result.counts, 0), result.problems
    assert result.ok


def test_the_checks_count_each_planted_fault(crashed, tmp_path):
    root, _result = crashed
    copy = tmp_path / "site"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("model", "staging"))
    site = bench.Site(copy, copy / "scans", copy / "out", copy / "state", copy / "config.toml",
                      copy / "model")  # fmt: skip
    scans = _scans(site)
    changed, lost, doubled = scans[0], scans[1], scans[2]
    with open(site.scans / changed.relative, "ab") as handle:
        handle.write(b"\0")
    lost_image = _image_of(site, lost)
    lost_image.unlink()
    image = _image_of(site, doubled)
    shutil.copy(image, image.with_name(re.sub(r"\.v\d+\.", ".v7.", image.name)))
    (site.out / "._stray.png.tmp-0000").write_bytes(b"partial")
    with sqlite3.connect(site.db) as db:
        db.execute("UPDATE jobs SET state = 'queued' WHERE id = (SELECT min(id) FROM jobs)")
    counts, problems = bench.check(site, scans, orphans=0)
    assert counts["originals_changed"] == 1
    assert problems["outputs_missing"] == [lost.relative]
    assert counts["outputs_duplicated"] == 1 and counts["outputs_unrecorded"] == 1
    assert counts["recorded_outputs_bad"] == 1  # the lost image is still recorded
    assert any("._stray" in item for item in problems["partial_files"])
    assert any("v1" in item for item in problems["partial_files"])  # a JSON without its image
    assert counts["jobs_stuck"] == 1


def test_a_process_left_behind_is_found_by_its_tag_and_killed():
    tag = f"test-{os.getpid()}"
    child = subprocess.Popen(["sleep", "60"], env={**os.environ, bench.TAG: tag})
    try:
        orphans = bench.orphans_after(tag, grace=0.3)
        assert [orphan["pid"] for orphan in orphans] == [child.pid]
        assert child.wait(10) == -9
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert bench.tagged_processes(tag) == []


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_a_child_that_does_not_die_with_its_parent_is_an_orphan_and_one_that_does_is_not():
    tag = f"test-{os.getpid()}"
    child = (
        "import sys, time\n"
        "from daemon.worker_entry import die_with_parent\n"
        "if sys.argv[1] == 'armed':\n"
        "    die_with_parent(int(sys.argv[2]))\n"
        "print('ready', flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = (
        "import os, subprocess, sys, time\n"
        "children = [subprocess.Popen([sys.executable, '-c', sys.argv[1], kind, str(os.getpid())],"
        " stdout=subprocess.PIPE, text=True) for kind in ('armed', 'unarmed')]\n"
        "assert [c.stdout.readline() for c in children] == ['ready\\n'] * 2\n"
        "print(*(c.pid for c in children), flush=True)\n"
        "time.sleep(120)\n"
    )
    env = {**os.environ, bench.TAG: tag}
    daemon = subprocess.Popen(
        [sys.executable, "-c", parent, child], env=env, cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        armed, unarmed = map(int, daemon.stdout.readline().split())
        daemon.kill()
        daemon.wait(30)
        orphans = bench.orphans_after(tag, grace=1.0)
    finally:
        daemon.kill()
        daemon.wait()
        bench.orphans_after(tag, grace=0.0)
    assert [orphan["pid"] for orphan in orphans] == [unarmed]
    assert not psutil.pid_exists(armed) or psutil.Process(armed).status() == "zombie"


@pytest.mark.skipif(sys.platform != "linux", reason="schedstat and CPU affinity are Linux's")
def test_time_a_dying_process_waits_for_the_cpu_does_not_count_against_its_grace():
    """A tagged child that needs 0.4 s of CPU to finish, sharing one CPU with two busy loops,
    takes longer than its 0.8 s grace in wall seconds but is not an orphan."""
    tag = f"test-{os.getpid()}"
    cpu = {min(os.sched_getaffinity(0))}
    hogs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        for hog in hogs:
            os.sched_setaffinity(hog.pid, cpu)
        busy = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.4: pass"
        started = time.monotonic()
        child = subprocess.Popen([sys.executable, "-c", busy], env={**os.environ, bench.TAG: tag})
        os.sched_setaffinity(child.pid, cpu)
        orphans = bench.orphans_after(tag, grace=0.8)
        assert child.wait(60) == 0
        took = time.monotonic() - started
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()
        bench.orphans_after(tag, grace=0.0)
    assert took > 0.8  # the premise: a wall-clock grace would have counted it
    assert orphans == []


def _scans(site) -> list:
    """The batch as the harness saw it, read back from the copy (sources are distinct)."""
    scans = []
    for path in sorted(p for p in site.scans.rglob("*") if p.is_file()):
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        relative = path.relative_to(site.scans).as_posix()
        sha = bench._sha256(path)
        scans.append(bench.Scan(relative, sha, image.shape[1], image.shape[0], ""))
    return scans


def _image_of(site, scan) -> Path:
    stem, folder = Path(scan.relative).stem, site.out / Path(scan.relative).parent
    (path,) = [
        p for p in folder.glob(f"{stem}.v*") if p.suffix != ".json" and ".mask" not in p.name
    ]
    return path
