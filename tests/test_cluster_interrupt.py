"""A cluster worker's run interrupted by a signal whose exception the run swallowed.

The worker stops a run by raising from its signal handler (SIGTERM hands the run back, the
revoke signal drops it). Raised inside an extension module's import (OpenVINO's, during a first
run's engine calibration), Python turns that exception into an ImportError, the engine code
takes it for an engine that cannot load, and the run goes on. Seen in the cluster test where a
late worker is stopped mid-job: the run finished and nothing was handed back. The worker must
still treat the run as interrupted: its files go, and the recipe is prepared again."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from daemon.cluster.messages import RemoteTask
from daemon.cluster.worker import _REVOKE_SIGNAL, ClusterWorker, _Prepared
from daemon.config import Config
from daemon.publish import write_temp
from daemon.worker import Outcome


class _SwallowingRunner:
    """Writes the run's output, then receives `signum` inside code that swallows every
    exception, as the import machinery does."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.swallowed: list[BaseException] = []
        self.ran = False

    def run(self, task):  # type: ignore[no-untyped-def]
        written = write_temp(
            Path(task.dest_dir), task.stem, "image", ".png", lambda p: p.write_bytes(b"x")
        )
        try:
            signal.raise_signal(self.signum)
        except BaseException as exc:  # what an extension module's import does with it
            self.swallowed.append(exc)
        self.ran = True
        return Outcome(task=task, status="ok", files=(written,))


def _task(tmp_path: Path) -> RemoteTask:
    source = tmp_path / "scan.png"
    source.write_bytes(b"scan")
    return RemoteTask(
        run_token="run-1",
        job_id=1,
        path="scan.png",
        source=str(source),
        source_sha256="0" * 64,
        dest_dir=str(tmp_path),
        stem="scan",
        recipe_sha256="r" * 64,
        models={},
        stages=[],
        precision="fp32",
        seed=0,
        output={"format": "png", "quality": 95, "max_pixels": 0, "mask": False},
        software="scanrestore test",
    )


@pytest.fixture
def worker(tmp_path: Path):
    # The broker client connects lazily: nothing here talks to Redis.
    config = Config.model_validate(
        {
            "models": {"cache_dir": str(tmp_path / "cache"), "auto_fetch": False},
            "cluster": {"broker": "redis://127.0.0.1:1/0"},
        }
    )
    made = ClusterWorker(config, device="cpu", name="t")
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, _REVOKE_SIGNAL)}
    made._term_handler = signal.SIG_IGN  # the test process has no Celery handler to chain to
    signal.signal(signal.SIGTERM, made._interrupt)
    signal.signal(_REVOKE_SIGNAL, made._interrupt)
    yield made
    for signum, handler in previous.items():
        signal.signal(signum, handler)


@pytest.mark.parametrize(
    ("signum", "status"), [(signal.SIGTERM, "released"), (_REVOKE_SIGNAL, None)]
)
def test_a_swallowed_interrupt_still_discards_the_run_and_its_files(
    worker: ClusterWorker, tmp_path: Path, signum: int, status: str | None
) -> None:
    task = _task(tmp_path)
    runner = _SwallowingRunner(signum)
    worker._prepared[task.recipe_sha256] = _Prepared(runner)  # type: ignore[arg-type]
    result = worker._run(task)
    assert runner.ran and len(runner.swallowed) == 1, "the interrupt was not swallowed"
    if status is None:  # revoked: the coordinator gave the run up, nothing is reported
        assert result is None
    else:  # released: handed back, with why
        assert result is not None and result.status == status
        assert "stopping" in (result.error or "")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("._")] == []
    assert task.recipe_sha256 not in worker._prepared  # prepared again on the next task


def test_a_run_without_an_interrupt_reports_its_files(worker: ClusterWorker, tmp_path: Path):
    """The control: the same runner with no signal keeps its output for publication."""
    task = _task(tmp_path)

    class Quiet(_SwallowingRunner):
        def run(self, task):  # type: ignore[no-untyped-def]
            written = write_temp(
                Path(task.dest_dir), task.stem, "image", ".png", lambda p: p.write_bytes(b"x")
            )
            return Outcome(task=task, status="ok", files=(written,))

    worker._prepared[task.recipe_sha256] = _Prepared(Quiet(0))  # type: ignore[arg-type]
    result = worker._run(task)
    assert result is not None and result.status == "ok" and len(result.files) == 1
    assert Path(result.files[0].temp).exists()
    assert task.recipe_sha256 in worker._prepared
