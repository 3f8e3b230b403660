"""Worker processes: real children, a tiny real model, real files."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_file
from modelfactory import nearest_compact

from daemon.config import Config
from daemon.publish import TEMP_MARKER
from daemon.worker import Outcome, Task, WorkerDied, WorkerPool, WorkerSettings
from pipeline.files import sha256_file
from pipeline.image import decode


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    root = tmp_path_factory.mktemp("worker")
    model = nearest_compact(root / "nearest.pth", scale=2)
    config = Config.model_validate(
        {
            "models": {"cache_dir": str(root / "cache"), "auto_fetch": False},
            "processing": {"device": "cpu", "precision": "fp32", "threads": 1},
            "pipeline": {"stages": [{"kind": "upscale", "model": str(model), "scale": 2.0}]},
        }
    )
    workers = WorkerPool(WorkerSettings(config.model_dump(mode="json"), device="cpu"), size=1)
    yield workers
    workers.stop(30)


def _task(source: Path, dest: Path, **changes) -> Task:
    fields = {
        "job_id": 1,
        "run_token": "run-1",
        "source": str(source),
        "source_sha256": sha256_file(source),
        "dest_dir": str(dest),
        "stem": source.stem,
        "recipe_sha256": "r" * 64,
        "software": "scanrestore test",
    } | changes
    return Task(**fields)


def _one_event(pool: WorkerPool) -> Outcome | WorkerDied:
    for _ in range(240):
        events = pool.poll(0.5)
        if events:
            assert len(events) == 1
            return events[0]
    raise AssertionError("the worker reported nothing in 120 s")


def test_a_task_yields_fsynced_temporary_files_with_hashes_and_stamped_provenance(pool, tmp_path):
    source = tmp_path / "in" / "photo.png"
    source.parent.mkdir()
    shutil.copy(shared_file("corpus/sr_benchmark/Set5/HR/baby.png"), source)
    before = sha256_file(source)
    pool.submit(_task(source, tmp_path / "out"))
    outcome = _one_event(pool)
    assert isinstance(outcome, Outcome) and outcome.status == "ok", outcome
    (image,) = outcome.files
    temp = image.temp
    assert temp.parent == tmp_path / "out" and TEMP_MARKER in temp.name
    assert image.sha256 == sha256_file(temp) and image.suffix == ".png"
    written, original = decode(temp), decode(source)
    assert written.pixels.shape == (original.height * 2, original.width * 2, 3)
    assert np.array_equal(written.pixels[::2, ::2], original.pixels)  # exact nearest 2x model
    assert b"<scanrestore:RunId>run-1</scanrestore:RunId>" in written.metadata.xmp
    assert [stage["stage"] for stage in outcome.stages] == ["upscale"]
    assert sha256_file(source) == before  # the original is untouched


def test_a_source_changed_since_ingest_is_reported_and_nothing_is_left(pool, tmp_path):
    source = tmp_path / "photo.png"
    shutil.copy(shared_file("corpus/sr_benchmark/Set5/HR/bird.png"), source)
    pool.submit(_task(source, tmp_path / "out", source_sha256="0" * 64))
    outcome = _one_event(pool)
    assert outcome.status == "changed" and str(source) in outcome.error
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_a_broken_file_is_an_error_naming_it_and_is_not_retried(pool, tmp_path):
    source = tmp_path / "broken.jpg"
    shutil.copy(shared_file("corpus/hostile_inputs/pillow_truncated_jpeg.jpg"), source)
    pool.submit(_task(source, tmp_path / "out"))
    outcome = _one_event(pool)
    assert outcome.status == "error" and not outcome.retryable
    assert outcome.error.startswith(str(source))
    assert not [p for p in (tmp_path / "out").glob("*") if TEMP_MARKER in p.name]


def test_a_killed_worker_is_reported_with_its_task_and_replaced(pool, tmp_path):
    source = tmp_path / "photo.png"
    shutil.copy(shared_file("corpus/sr_benchmark/Set5/HR/head.png"), source)
    task = _task(source, tmp_path / "out", job_id=7)
    pool.submit(task)
    (slot,) = pool._slots
    os.kill(slot.process.pid, signal.SIGKILL)
    event = _one_event(pool)
    assert isinstance(event, WorkerDied) and event.task == task
    assert event.exitcode == -signal.SIGKILL
    pool.submit(task)  # the replacement works
    assert _one_event(pool).status == "ok"
