"""Worker processes: decoding and inference run in a child process, so a decoder crash or an
out-of-memory kill takes down only that child. The parent publishes what a child wrote."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import traceback
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from daemon import prewarm
from daemon.logs import log_to_stderr
from daemon.processing import OutputSettings, Stamp, failure_of, process_image
from daemon.progress import ProgressWriter
from daemon.publish import WrittenFile, remove_written
from daemon.recipes import ChainChoice
from pipeline.files import sha256_file

if TYPE_CHECKING:
    from pipeline.chain import Chain
    from pipeline.models import TrustedModels

__all__ = [
    "Outcome",
    "Returned",
    "Runner",
    "Task",
    "WorkerDied",
    "WorkerPool",
    "WorkerSettings",
    "Workers",
]

log = logging.getLogger("scanrestore.worker")


@dataclass(frozen=True)
class WorkerSettings:
    """What a child needs to build its chain: plain data, so it pickles under `spawn`."""

    config: dict[str, Any]  # Config.model_dump(mode="json")
    preset: str | None = None
    device: str = "auto"
    threads: int = 0
    models: dict[str, str] = field(default_factory=dict)  # the recipe's model ref -> sha256
    log_level: int = logging.WARNING


@dataclass(frozen=True)
class Task:
    job_id: int
    run_token: str  # hex, written into the outputs (XMP RunId); the store's run id is an integer
    source: str  # absolute path of the original, opened read-only
    source_sha256: str  # what ingest hashed; a different hash now means the scan changed
    dest_dir: str
    stem: str
    recipe_sha256: str
    software: str
    chain: ChainChoice | None = None  # another preset's recipe; None: the worker's own
    mask: bool = True  # write the mask of invented pixels as a sidecar
    progress: str | None = None  # a file the worker keeps current (daemon.progress)


@dataclass(frozen=True)
class Outcome:
    """A child's report for one task. `files` are fsynced temporary files in `dest_dir`."""

    task: Task
    status: str  # "ok", "error" or "changed" (the source changed while it was processed)
    error: str | None = None
    error_type: str | None = None
    retryable: bool = True
    files: tuple[WrittenFile, ...] = ()
    stages: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    device: str | None = None
    credentials: str | None = None  # "c2pa", or why the image went unsigned; None: signing off
    worker: str | None = None  # which process made it ("HOST:PID", or a cluster worker's ident)


@dataclass(frozen=True)
class WorkerDied:
    """A worker exited or vanished while it held `task` (killed, crashed in native code, out of
    memory, a remote worker's heartbeats stopped). `reason` says so in words where the exit
    code cannot; `backoff` False queues the job again at once (its lease already waited)."""

    task: Task
    exitcode: int | None
    reason: str | None = None
    backoff: bool = True


@dataclass(frozen=True)
class Returned:
    """`task` comes back unprocessed through no fault of the file (a remote worker refused its
    recipe or was stopped, a dispatch was never taken): queued again at once, no failure."""

    task: Task
    reason: str


# ------------------------------------------------------------------------------ parent side


class Workers(Protocol):
    """What the daemon's session dispatches to: local worker processes (WorkerPool) or, with a
    broker configured, workers on other machines (daemon.cluster.dispatch.Dispatcher)."""

    def idle(self) -> int: ...
    def submit(self, task: Task) -> None: ...
    def poll(self, timeout: float) -> list[Outcome | WorkerDied | Returned]: ...
    def drain(self, timeout: float) -> list[Outcome | WorkerDied | Returned]: ...
    def stop(self, timeout: float) -> list[Task]: ...


class _Slot:
    """One worker process: started here, or adopted from those `daemon.prewarm` started
    before the daemon's imports; either way its settings are its first message."""

    def __init__(self, settings: WorkerSettings, index: int, *, adopt: bool = False) -> None:
        self.index = index
        started = prewarm.adopt() if adopt else None
        self.process, self.conn = started or prewarm.started(index)
        _send_quietly(self.conn, settings)  # a child that died meanwhile is polled
        self.task: Task | None = None


class WorkerPool:
    """N child processes, each working on one task at a time."""

    def __init__(self, settings: WorkerSettings, size: int = 1, *, adopt: bool = False):
        """`adopt`: take the worker processes daemon.prewarm started, as far as they go."""
        self._settings = settings
        self._slots = [_Slot(settings, index, adopt=adopt) for index in range(size)]

    @property
    def busy(self) -> list[Task]:
        return [slot.task for slot in self._slots if slot.task is not None]

    def idle(self) -> int:
        return sum(slot.task is None for slot in self._slots)

    def submit(self, task: Task) -> None:
        slot = next(slot for slot in self._slots if slot.task is None)
        slot.task = task
        slot.conn.send(task)

    def poll(self, timeout: float) -> list[Outcome | WorkerDied]:
        """Outcomes and deaths that happened within `timeout` seconds; dead children are
        replaced so the pool keeps its size."""
        busy = [slot for slot in self._slots if slot.task is not None]
        handles = {slot.conn: slot for slot in busy} | {
            slot.process.sentinel: slot for slot in busy
        }
        if not handles:
            time.sleep(timeout)
            return []
        events: list[Outcome | WorkerDied] = []
        for ready in wait(list(handles), timeout):
            slot = handles[ready]
            if slot.task is None:
                continue  # both its pipe and its sentinel fired: handled already
            outcome = self._receive(slot)
            events.append(outcome)
            slot.task = None
            if isinstance(outcome, WorkerDied):
                self._replace(slot)
        return events

    def _receive(self, slot: _Slot) -> Outcome | WorkerDied:
        assert slot.task is not None
        try:
            if slot.conn.poll():
                return slot.conn.recv()
        except (EOFError, OSError):
            pass
        slot.process.join(5)
        return WorkerDied(slot.task, slot.process.exitcode)

    def _replace(self, slot: _Slot) -> None:
        slot.conn.close()
        if slot.process.is_alive():
            slot.process.kill()
        slot.process.join()
        self._slots[slot.index] = _Slot(self._settings, slot.index)

    def stop(self, timeout: float) -> list[Task]:
        """Ask every child to finish its task and exit; after `timeout` seconds kill the rest.
        Returns the tasks abandoned (their temporary files are the caller's to remove)."""
        deadline = time.monotonic() + timeout
        for slot in self._slots:
            if slot.task is None:
                _send_quietly(slot.conn, None)
        abandoned: list[Task] = []
        while any(slot.task is not None for slot in self._slots):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for event in self.poll(min(left, 0.5)):
                if isinstance(event, Outcome):
                    abandoned.append(event.task)  # finished, but the caller stopped listening
        for slot in self._slots:
            if slot.task is not None:
                abandoned.append(slot.task)
                slot.process.kill()
            else:
                _send_quietly(slot.conn, None)
            slot.process.join(max(0.0, deadline - time.monotonic()) + 5)
            if slot.process.is_alive():
                slot.process.kill()
                slot.process.join()
            slot.conn.close()
        return abandoned

    def drain(self, timeout: float) -> list[Outcome | WorkerDied]:
        """Wait up to `timeout` for the running tasks and return their events (for SIGTERM:
        finish the current image within the stop timeout)."""
        deadline = time.monotonic() + timeout
        events: list[Outcome | WorkerDied] = []
        while self.busy and (left := deadline - time.monotonic()) > 0:
            events += self.poll(min(left, 0.5))
        return events


def _send_quietly(conn: Connection, message: Any) -> None:
    with contextlib.suppress(BrokenPipeError, OSError):
        conn.send(message)


# ------------------------------------------------------------------------------- child side


def serve(conn: Connection, settings: WorkerSettings) -> None:
    """A child's loop, entered through daemon.worker_entry once the child dies with its parent:
    run each task the parent sends until it sends None or goes away."""
    # A spawned child starts with no logging set up: records (a decoder's warning naming the
    # file, tifffile's complaints, Pillow's warnings) would reach stderr bare and raw.
    log_to_stderr(settings.log_level)
    logging.captureWarnings(True)
    runner = Runner(settings)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        conn.send(runner.run(task))


class Runner:
    """Runs tasks with the worker's chain and trusted models, built once, or another preset's a
    task names (built at its first task, then kept): the same code in a local worker process and
    in a cluster worker."""

    def __init__(self, settings: WorkerSettings) -> None:
        from daemon.config import Config, model_store
        from pipeline.models import TrustedModels

        config = Config.model_validate(settings.config)
        if settings.threads:
            import torch

            torch.set_num_threads(settings.threads)
        self.config = config
        self.chain = config.chain(settings.preset)
        self.device = settings.device
        # Bound to the hashes the daemon took at start: no file is hashed again per task, and
        # a weights file replaced since then fails as it loads (its bytes no longer match).
        self.models = TrustedModels(model_store(config), settings.models)
        self.ident = f"{socket.gethostname()}:{os.getpid()}"
        self._chains: dict[str, tuple[Chain, TrustedModels]] = {}

    def _chain_for(self, task: Task) -> tuple[Chain, TrustedModels]:
        """The task's chain, and its models bound to the hashes the daemon verified."""
        from daemon.config import model_store
        from pipeline.models import TrustedModels

        if task.chain is None:
            return self.chain, self.models
        if task.recipe_sha256 not in self._chains:
            chain = self.config.chain(task.chain.preset)
            models = TrustedModels(model_store(self.config), task.chain.models)
            self._chains[task.recipe_sha256] = (chain, models)
        return self._chains[task.recipe_sha256]

    def run(self, task: Task) -> Outcome:
        started = time.perf_counter()
        try:
            outcome = self._process(task, started)
        except Exception as exc:  # a bug on one image must not take the worker down
            failure = failure_of(task.source, exc)
            if failure.internal:
                log.error("internal error on %r\n%s", task.source, traceback.format_exc())
            outcome = Outcome(
                task,
                "error",
                error=failure.message,
                error_type=failure.error_type,
                retryable=failure.retryable,
                seconds=time.perf_counter() - started,
            )
            outcome = _unless_changed(task, outcome)
        return outcome

    def _process(self, task: Task, started: float) -> Outcome:
        from pipeline.stage import StageContext

        if (change := _source_change(task)) is not None:
            return Outcome(task, "changed", error=f"{change} since it was queued")
        dest = Path(task.dest_dir)
        chain, models = self._chain_for(task)
        report = None
        if task.progress is not None:
            report = ProgressWriter(Path(task.progress), len(chain.stages))
        ctx = StageContext(
            models=models,
            device=self.device,
            precision=self.config.processing.precision,
            engine=self.config.processing.engine,
            seed=self.config.processing.seed,
            scratch_dir=dest,
            progress=None if report is None else report.tiles,
            on_stage=None if report is None else report.stage,
        )
        made = process_image(
            Path(task.source),
            dest,
            task.stem,
            chain=chain,
            ctx=ctx,
            output=replace(OutputSettings.from_config(self.config), mask=task.mask),
            stamp=Stamp(task.software, task.run_token, task.recipe_sha256),
        )
        if (change := _source_change(task)) is not None:
            remove_written(made.files)
            return Outcome(task, "changed", error=f"{change} while it was processed")
        return Outcome(
            task,
            "ok",
            files=made.files,
            stages=made.stages,
            seconds=time.perf_counter() - started,
            device=made.device,
            credentials=made.credentials,
            worker=self.ident,
        )


def _source_change(task: Task) -> str | None:
    """What happened to the source if it no longer holds the queued bytes, else None. Any
    other OSError (permission denied, a share gone) propagates: that is no change of content."""
    try:
        if sha256_file(task.source) == task.source_sha256:
            return None
    except (FileNotFoundError, NotADirectoryError):
        return f"{task.source}: gone (deleted or renamed)"
    return f"{task.source}: changed"


def _unless_changed(task: Task, failure: Outcome) -> Outcome:
    """A failure on a source rewritten or removed meanwhile (a decoder reading a half-written
    file, say) is no verdict on the file: the run is discarded, not counted against it."""
    try:
        change = _source_change(task)
    except OSError:
        return failure
    if change is None:
        return failure
    error = f"{change} while it was processed ({failure.error})"
    return Outcome(task, "changed", error=error, seconds=failure.seconds)
