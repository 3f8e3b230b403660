"""Worker processes: decoding and inference run in a child process, so a decoder crash or an
out-of-memory kill takes down only that child. The parent publishes what a child wrote."""

from __future__ import annotations

import contextlib
import errno
import logging
import multiprocessing
import os
import pickle
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import numpy as np

from daemon import worker_entry
from daemon.logs import log_to_stderr
from daemon.publish import WrittenFile, write_temp
from daemon.store.provenance import OutputKind
from pipeline.files import sha256_file

__all__ = ["Outcome", "Task", "WorkerDied", "WorkerPool", "WorkerSettings", "not_the_files_fault"]

log = logging.getLogger("scanrestore.worker")
# OS errors that say something about the machine, not the image: worth another try later.
_SYSTEM_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ENOSPC", "EDQUOT", "EFBIG", "EACCES", "EPERM", "EROFS", "EIO", "ENOENT", "ESTALE",
        "ENOTCONN", "ETIMEDOUT", "EHOSTDOWN", "EHOSTUNREACH", "ENETDOWN", "ENETUNREACH",
        "ECONNRESET", "ECONNABORTED", "EAGAIN", "EINTR", "ENOMEM", "EMFILE", "ENFILE", "EBUSY",
        "ENODEV", "ENXIO",
    )
    if hasattr(errno, name)
)  # fmt: skip


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
    run_id: str
    source: str  # absolute path of the original, opened read-only
    source_sha256: str  # what ingest hashed; a different hash now means the scan changed
    dest_dir: str
    stem: str
    recipe_sha256: str
    software: str
    mask: bool = True  # write the mask of invented pixels as a sidecar


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


@dataclass(frozen=True)
class WorkerDied:
    """A child exited while it held `task` (killed, crashed in native code, out of memory)."""

    task: Task
    exitcode: int | None


# ------------------------------------------------------------------------------ parent side


class _Slot:
    def __init__(self, ctx: Any, settings: WorkerSettings, index: int) -> None:
        self.index = index
        parent, child = ctx.Pipe()
        self.conn: Connection = parent
        self.process = ctx.Process(
            target=worker_entry.main,
            args=(child, os.getpid(), pickle.dumps(settings)),
            name=f"scanrestore-worker-{index}",
        )
        self.process.start()
        child.close()
        self.task: Task | None = None


class WorkerPool:
    """N child processes, each working on one task at a time."""

    def __init__(self, settings: WorkerSettings, size: int = 1, *, start_method: str = "spawn"):
        self._ctx = multiprocessing.get_context(start_method)
        self._settings = settings
        self._slots = [_Slot(self._ctx, settings, index) for index in range(size)]

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
        self._slots[slot.index] = _Slot(self._ctx, self._settings, slot.index)

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
    runner = _Runner(settings)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        conn.send(runner.run(task))


class _Runner:
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

    def run(self, task: Task) -> Outcome:
        from pipeline.errors import PipelineError

        started = time.perf_counter()
        temps: list[Path] = []
        try:
            outcome = self._process(task, temps, started)
        except PipelineError as exc:
            outcome = _failure(task, str(exc), exc, not_the_files_fault(exc), started)
        except MemoryError as exc:
            outcome = _failure(task, f"{task.source}: out of memory", exc, True, started)
        except OSError as exc:  # disk full, permissions, a share gone: worth another try
            outcome = _failure(task, f"{task.source}: {exc}", exc, True, started)
        except Exception as exc:  # a bug on one image must not take the worker down
            log.error("internal error on %r\n%s", task.source, traceback.format_exc())
            outcome = _failure(task, f"{task.source}: internal error: {exc!r}", exc, True, started)
        if outcome.status == "error":
            outcome = _unless_changed(task, outcome)
        if outcome.status != "ok":
            for temp in temps:
                with contextlib.suppress(OSError):  # a cleanup must never end the worker
                    temp.unlink(missing_ok=True)
        return outcome

    def _process(self, task: Task, temps: list[Path], started: float) -> Outcome:
        from pipeline import image as imageio
        from pipeline.stage import StageContext
        from pipeline.stamp import stamp

        if (change := _source_change(task)) is not None:
            return Outcome(task, "changed", error=f"{change} since it was queued")
        image = imageio.decode(Path(task.source), max_pixels=self.config.image.max_pixels)
        dest = Path(task.dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        ctx = StageContext(
            models=self.models,
            device=self.device,
            precision=self.config.processing.precision,
            seed=self.config.processing.seed,
            scratch_dir=dest,
        )
        result = self.chain.run(image, ctx)
        stages = [record.as_dict() for record in result.stages]
        metadata = stamp(
            result.image.metadata,
            software=task.software,
            properties={"RunId": task.run_id, "RecipeSHA256": task.recipe_sha256},
            stages=[_stage_line(record) for record in stages],
        )
        fmt = self.config.image.output_format
        fmt = image.format if fmt == "same" else fmt
        files = [
            self._write(
                task,
                temps,
                "image",
                imageio.suffix_for(fmt),
                lambda path: imageio.encode(
                    result.image.replace(metadata=metadata),
                    path,
                    format=fmt,
                    quality=self.config.image.quality,
                ),
            )
        ]
        mask = _invented(result.masks, result.image.width, result.image.height)
        if task.mask and mask is not None:
            files.append(self._write(task, temps, "mask", ".mask.png", _mask_writer(mask)))
        if (change := _source_change(task)) is not None:
            return Outcome(task, "changed", error=f"{change} while it was processed")
        return Outcome(
            task,
            "ok",
            files=tuple(files),
            stages=stages,
            seconds=time.perf_counter() - started,
            device=ctx.device,
        )

    @staticmethod
    def _write(
        task: Task,
        temps: list[Path],
        kind: OutputKind,
        suffix: str,
        write: Callable[[Path], object],
    ) -> WrittenFile:
        written = write_temp(Path(task.dest_dir), task.stem, kind, suffix, write)
        temps.append(written.temp)
        return written


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


def _failure(task: Task, message: str, exc: BaseException, retryable: bool, started: float):
    return Outcome(
        task,
        "error",
        error=message,
        error_type=type(exc).__name__,
        retryable=retryable,
        seconds=time.perf_counter() - started,
    )


def not_the_files_fault(exc: BaseException) -> bool:
    """Whether another try may succeed: a model problem (tampered, missing) is not the image's
    fault, nor is an error caused by the system (disk full, permission denied, a share gone).
    A decoder's own OSError for damaged data ("image file is truncated", a seek to a bogus
    offset) carries no errno or EINVAL, and a name too long for its output stays too long."""
    from pipeline.errors import ModelError

    if isinstance(exc, ModelError):
        return True
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError) and cause.errno in _SYSTEM_ERRNOS:
            return True
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return False


def _stage_line(record: dict[str, Any]) -> str:
    params = record["params"]
    model = params.get("model")
    text = f"{record['stage']} v{record['version']}"
    if model:
        text += f" {model} sha256:{params.get('model_sha256')}"
    if record.get("skipped"):
        text += f" (skipped: {record['skipped']})"
    return text


def _invented(masks: dict[str, Any], width: int, height: int) -> np.ndarray | None:
    """One 8-bit mask of every pixel a stage invented, at the output's size (a stage that ran
    before an upscale returned its mask at the smaller size)."""
    import cv2

    combined = None
    for mask in masks.values():
        mask = np.asarray(mask)
        if mask.dtype != np.uint8:
            mask = np.clip(np.rint(mask.astype(np.float32) * 255), 0, 255).astype(np.uint8)
        if mask.shape[:2] != (height, width):
            mask = cv2.resize(mask, (width, height), interpolation=cv2.INTER_NEAREST)
        combined = mask if combined is None else np.maximum(combined, mask)
    return combined


def _mask_writer(mask: np.ndarray) -> Callable[[Path], object]:
    def write(path: Path) -> None:
        import cv2

        ok, data = cv2.imencode(".png", mask)
        if not ok:
            raise OSError(f"{path}: PNG encoding of the mask failed")
        with open(path, "wb") as handle:
            handle.write(data.tobytes())

    return write
