"""`scanrestore watch` starts its first worker process before its own imports (daemon.prewarm),
and the program exits without the interpreter's teardown. Real processes: what is started
early is adopted by the pool, or dies with the command when the command fails."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
from modelfactory import nearest_compact
from PIL import Image

from daemon import prewarm
from daemon.config import Config
from daemon.worker import Task, WorkerPool, WorkerSettings
from pipeline.files import sha256_file

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("argv", "starts"),
    [
        (["watch"], True),
        (["--config", "site.toml", "-v", "watch", "--once"], True),
        (["--config", "watch", "status"], False),  # "watch" as the config's name
        (["process", "watch.png", "--out", "o"], False),
        (["status"], False),
        ([], False),
    ],
)
def test_only_watch_starts_a_worker_early(argv, starts, monkeypatch):
    made: list[int] = []
    monkeypatch.setattr(prewarm, "started", lambda index: made.append(index) or ("p", "c"))
    monkeypatch.setattr(prewarm, "_started", [])
    prewarm.start_for(argv)
    assert made == ([0] if starts else [])


def test_the_pool_adopts_the_process_started_early_and_it_works(tmp_path, monkeypatch):
    """The early process gets its settings as its first message and runs a real task."""
    monkeypatch.setattr(prewarm, "_started", [])
    prewarm.start_for(["watch"])
    ((early, _conn),) = prewarm._started
    model = nearest_compact(tmp_path / "nearest.pth", scale=2)
    config = Config.model_validate(
        {
            "models": {"cache_dir": str(tmp_path / "cache"), "auto_fetch": False},
            "processing": {"device": "cpu", "precision": "fp32", "threads": 1},
            "pipeline": {"stages": [{"kind": "upscale", "model": str(model), "scale": 2.0}]},
        }
    )
    pool = WorkerPool(WorkerSettings(config.model_dump(mode="json"), device="cpu"), adopt=True)
    try:
        assert pool._slots[0].process is early and prewarm._started == []
        source = tmp_path / "scan.png"
        Image.new("RGB", (24, 16), (90, 120, 150)).save(source)
        dest = tmp_path / "out"
        dest.mkdir()
        task = Task(
            job_id=1,
            run_token="run-1",
            source=str(source),
            source_sha256=sha256_file(source),
            dest_dir=str(dest),
            stem="scan",
            recipe_sha256="r" * 64,
            software="scanrestore test",
        )
        pool.submit(task)
        events = []
        deadline = time.monotonic() + 120
        while not events and time.monotonic() < deadline:
            events = pool.poll(0.5)
        assert len(events) == 1 and events[0].status == "ok", events
    finally:
        pool.stop(30)
    assert not early.is_alive()


def _marked(mark: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get("SCANRESTORE_TEST_MARK") == mark:
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def test_a_watch_that_cannot_start_exits_with_its_error_and_leaves_no_process(tmp_path):
    """The early worker is never adopted: it ends with the command."""
    mark = uuid.uuid4().hex
    config = tmp_path / "site.toml"
    config.write_text('[watch]\ninput = "absent"\n[daemon]\nworkers = "many"\n')
    run = subprocess.run(
        [sys.executable, "-m", "daemon", "--config", str(config), "watch", "--once"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "SCANRESTORE_TEST_MARK": mark},
    )
    assert run.returncode == 2, run.stderr
    assert "workers" in run.stderr and str(config) in run.stderr
    deadline = time.monotonic() + 60
    while _marked(mark) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _marked(mark) == []


def test_the_program_flushes_its_output_before_it_exits(tmp_path):
    """stdout is a pipe here (block-buffered): what `main` printed must all arrive."""
    run = subprocess.run(
        [sys.executable, "-m", "daemon", "models", "list"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "SCANRESTORE_CACHE_DIR": str(tmp_path / "cache")},
    )
    assert run.returncode == 0, run.stderr
    assert "realesrgan-x4plus" in run.stdout and run.stdout.endswith("\n")
