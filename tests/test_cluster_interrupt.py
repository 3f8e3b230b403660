"""A cluster worker's run interrupted by a signal whose exception the run swallowed.

The worker stops a run by raising from its signal handler (SIGTERM hands the run back, the
revoke signal drops it). Raised inside an extension module's import (OpenVINO's, during a first
run's engine calibration), Python turns that exception into an ImportError, the engine code
takes it for an engine that cannot load, and the run goes on. Seen in the cluster test where a
late worker is stopped mid-job: the run finished and nothing was handed back. The worker must
still treat the run as interrupted: its files go, and the recipe is prepared again.

Each case runs in a fresh Python: signals are raised at that process, never at pytest's."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCENARIO = r'''
import json, signal, sys
from pathlib import Path

from daemon.cluster.messages import RemoteTask
from daemon.cluster.worker import _REVOKE_SIGNAL, ClusterWorker, _Prepared
from daemon.config import Config
from daemon.publish import write_temp
from daemon.worker import Outcome

folder, which = Path(sys.argv[1]), sys.argv[2]
signum = {"term": signal.SIGTERM, "revoke": _REVOKE_SIGNAL, "none": None}[which]


class Runner:
    """Writes the run's output, then receives `signum` inside code that swallows every
    exception, as the import machinery does."""

    swallowed = []

    def run(self, task):
        written = write_temp(
            Path(task.dest_dir), task.stem, "image", ".png", lambda p: p.write_bytes(b"x")
        )
        if signum is not None:
            try:
                signal.raise_signal(signum)
            except BaseException as exc:  # what an extension module's import does with it
                self.swallowed.append(type(exc).__name__)
        return Outcome(task=task, status="ok", files=(written,))


config = Config.model_validate(
    {
        "models": {"cache_dir": str(folder / "cache"), "auto_fetch": False},
        "cluster": {"broker": "redis://127.0.0.1:1/0"},  # connected lazily: never here
    }
)
worker = ClusterWorker(config, device="cpu", name="t")
worker._term_handler = signal.SIG_IGN  # no Celery handler to chain to
signal.signal(signal.SIGTERM, worker._interrupt)
signal.signal(_REVOKE_SIGNAL, worker._interrupt)
source = folder / "scan.png"
source.write_bytes(b"scan")
task = RemoteTask(
    run_token="run-1", job_id=1, path="scan.png", source=str(source), source_sha256="0" * 64,
    dest_dir=str(folder), stem="scan", recipe_sha256="r" * 64, models={}, stages=[],
    precision="fp32", seed=0, software="scanrestore test",
    output={"format": "png", "quality": 95, "max_pixels": 0, "mask": False},
)
runner = Runner()
worker._prepared[task.recipe_sha256] = _Prepared(runner)
result = worker._run(task)
print(json.dumps({
    "swallowed": runner.swallowed,
    "result": None if result is None else {"status": result.status, "error": result.error,
                                           "files": [str(f.temp) for f in result.files]},
    "temporaries": sorted(p.name for p in folder.iterdir() if p.name.startswith("._")),
    "prepared": task.recipe_sha256 in worker._prepared,
}))
'''


def _scenario(tmp_path: Path, which: str) -> dict:
    run = subprocess.run(
        [sys.executable, "-c", SCENARIO, str(tmp_path), which],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.splitlines()[-1])


@pytest.mark.parametrize(("which", "status"), [("term", "released"), ("revoke", None)])
def test_a_swallowed_interrupt_still_discards_the_run_and_its_files(tmp_path, which, status):
    seen = _scenario(tmp_path, which)
    assert seen["swallowed"] == ["_Interrupted"], "the interrupt was not swallowed"
    if status is None:  # revoked: the coordinator gave the run up, nothing is reported
        assert seen["result"] is None
    else:  # released: handed back, with why
        assert seen["result"]["status"] == status and "stopping" in seen["result"]["error"]
    assert seen["temporaries"] == []
    assert seen["prepared"] is False  # prepared again on the next task


def test_a_run_without_an_interrupt_reports_its_files(tmp_path):
    """The control: the same runner with no signal keeps its output for publication."""
    seen = _scenario(tmp_path, "none")
    assert seen["swallowed"] == []
    assert seen["result"]["status"] == "ok" and len(seen["result"]["files"]) == 1
    assert seen["temporaries"] == [Path(seen["result"]["files"][0]).name]
    assert seen["prepared"] is True
