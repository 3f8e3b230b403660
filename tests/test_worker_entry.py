"""A worker's entry: tied to the daemon's life before its heavy imports, and gone when the daemon
died before the tie was made. Real spawned children, observed from inside by an import hook."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from modelfactory import nearest_compact

from daemon.config import Config
from daemon.worker import WorkerPool, WorkerSettings
from daemon.worker_entry import PARENT_GONE

# Loaded by `site` in every Python started with its folder first on PYTHONPATH: at the first
# import of each watched module it writes the process's parent-death signal (PR_GET_PDEATHSIG).
RECORDER = """
import ctypes, os, sys

_WATCHED = {"numpy", "torch", "pipeline", "daemon.worker"}


class _Recorder:
    def find_spec(self, name, path=None, target=None):
        if name in _WATCHED:
            armed = ctypes.c_int(-1)
            ctypes.CDLL(None).prctl(2, ctypes.byref(armed))  # PR_GET_PDEATHSIG
            with open(os.environ["IMPORT_RECORD"], "a") as handle:
                handle.write(f"{os.getpid()} {name} {armed.value}\\n")
        return None


sys.meta_path.insert(0, _Recorder())
"""


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_a_spawned_worker_dies_with_its_parent_before_it_imports_numpy_or_torch(
    tmp_path, monkeypatch
):
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(RECORDER)
    record = tmp_path / "imports.txt"
    monkeypatch.setenv("IMPORT_RECORD", str(record))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(hook), *sys.path]))
    model = nearest_compact(tmp_path / "nearest.pth", scale=2)
    config = Config.model_validate(
        {
            "models": {"cache_dir": str(tmp_path / "cache"), "auto_fetch": False},
            "processing": {"device": "cpu", "precision": "fp32", "threads": 1},
            "pipeline": {"stages": [{"kind": "upscale", "model": str(model), "scale": 2.0}]},
        }
    )
    pool = WorkerPool(WorkerSettings(config.model_dump(mode="json"), device="cpu"), size=1)
    try:
        (slot,) = pool._slots
        worker = str(slot.process.pid)
        deadline = time.monotonic() + 120
        seen: dict[str, int] = {}
        while not {"numpy", "pipeline"} <= set(seen) and time.monotonic() < deadline:
            lines = record.read_text().splitlines() if record.exists() else []
            seen = {name: int(armed) for pid, name, armed in map(str.split, lines) if pid == worker}
            time.sleep(0.05)
    finally:
        pool.stop(30)
    assert {"numpy", "daemon.worker", "pipeline"} <= set(seen), seen
    assert seen == dict.fromkeys(seen, signal.SIGKILL), seen


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_a_child_whose_parent_is_not_the_expected_one_exits_at_once():
    code = "from daemon.worker_entry import die_with_parent; die_with_parent(1); print('went on')"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert run.returncode == PARENT_GONE, run.stderr
    assert "went on" not in run.stdout


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_an_armed_child_is_killed_when_its_parent_is_killed():
    # The parent starts a child that arms the signal and then sleeps; the parent reports the
    # child's pid once the child says it is armed, then waits to be killed.
    child = textwrap.dedent(
        """
        import os, sys, time
        from daemon.worker_entry import die_with_parent
        die_with_parent(int(sys.argv[1]))
        print("armed", flush=True)
        time.sleep(120)
        """
    )
    parent = textwrap.dedent(
        f"""
        import os, subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", {child!r}, str(os.getpid())],
                                 stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline() == "armed\\n"
        print(child.pid, flush=True)
        time.sleep(120)
        """
    )
    daemon = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True)
    worker = None
    try:
        worker = psutil.Process(int(daemon.stdout.readline()))
        daemon.kill()
        daemon.wait(30)
        worker.wait(30)  # psutil.TimeoutExpired if the child outlived its parent
    finally:
        daemon.kill()
        daemon.wait()
        if worker is not None and worker.is_running():
            worker.kill()
