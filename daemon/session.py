"""A running daemon's work: jobs claimed from the queue and handed to worker processes, leases
renewed, and each worker's report turned into a publication, a retry, a discard or a
quarantine. Built once the store, queue, worker pool and publisher all exist."""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal

from daemon.config import Config
from daemon.logs import escape_controls
from daemon.processing import retry_is_worthwhile
from daemon.progress import progress_path
from daemon.publish import (
    Finished,
    PublicationError,
    Publisher,
    remove_stem_temps,
    remove_written,
)
from daemon.queue import Job, JobQueue
from daemon.recipes import ChainChoice, RecipeBook, RecipeError
from daemon.schedule import ActiveHours
from daemon.store import Store
from daemon.store.provenance import RunStatus
from daemon.watcher import safe_name
from daemon.worker import Outcome, Returned, Task, WorkerDied, Workers
from pipeline.files import sha256_file

__all__ = ["Session"]

log = logging.getLogger("scanrestore.daemon")


@dataclass
class _Running:
    """A claimed job and the task a worker runs for it."""

    job: Job
    task: Task
    started_at: datetime
    beat_at: float = field(default_factory=time.monotonic)


class Session:
    """What one `Daemon.run` works with, whole from construction. Everything here runs on the
    loop's thread, which alone uses the store's connection."""

    def __init__(
        self,
        config: Config,
        *,
        store: Store,
        queue: JobQueue,
        pool: Workers,
        publisher: Publisher,
        recipe_sha256: str,
        recipes: RecipeBook | None,
        input_root: Path,
        output_root: Path,
        state_root: Path,
        software: str,
        once: bool,
        stopping: threading.Event,
        notify: Callable[[str], object],
        clock: Callable[[], datetime],
        owner: str,
    ) -> None:
        self.config = config
        self.store = store
        self.queue = queue
        self.pool = pool
        self.publisher = publisher
        self.recipe_sha256 = recipe_sha256
        self.recipes = recipes  # None: the workers run only the daemon's own recipe
        self.input = input_root
        self.output = output_root
        self.state = state_root
        self.software = software
        self.once = once
        self.failures = 0
        self._stopping = stopping
        self._notify = notify
        self._clock = clock
        self._owner = owner
        self._hours = ActiveHours.parse(config.schedule.active_hours)
        self._running: dict[int, _Running] = {}
        self._status_at = float("-inf")

    # ------------------------------------------------------------------ the loop's steps

    def busy(self) -> bool:
        return bool(self._running)

    def claimable(self) -> bool:
        """Whether a job is due now (queued, or failed and past its backoff)."""
        counts = self.queue.counts()
        due = self.queue.next_due_at()
        return bool(counts.get("queued")) or (due is not None and due <= self._clock())

    def report_status(self) -> None:
        """systemd's STATUS line, at most every 5 seconds."""
        if time.monotonic() - self._status_at < 5:
            return
        self._status_at = time.monotonic()
        counts = self.queue.counts()
        text = ", ".join(f"{counts.get(s, 0)} {s}" for s in ("queued", "running", "failed", "done"))
        if not self._window_open():
            text += "; outside active hours"
        self._notify(f"STATUS={text}")

    def _window_open(self) -> bool:
        return self.once or self._hours.is_open()

    def dispatch(self) -> None:
        """Claim due jobs while a worker is idle and the processing window is open."""
        while self.pool.idle() and not self._stopping.is_set() and self._window_open():
            job = self.queue.claim(self._owner)
            if job is None:
                return
            choice = self._chain_for(job)
            if choice is False:
                continue
            done = (
                None if job.force else self.store.done_run_for(job.source_sha256, job.recipe_sha256)
            )
            if done is not None:
                self.queue.complete(job)
                continue
            relative = Path(job.path)
            task = Task(
                job_id=job.id,
                run_token=secrets.token_hex(8),
                source=str(self.input / relative),
                source_sha256=job.source_sha256,
                dest_dir=str(self.output / relative.parent),
                stem=relative.stem,
                recipe_sha256=job.recipe_sha256,
                software=self.software,
                chain=choice,
                mask=self.config.daemon.mask_sidecar,
                progress=str(progress_path(self.state, job.id)),
            )
            self._running[job.id] = _Running(job, task, self._clock())
            self.pool.submit(task)
            log.info("processing path=%s job=%d", safe_name(job.path), job.id)

    def _chain_for(self, job: Job) -> ChainChoice | Literal[False] | None:
        """The chain a claimed job is made with: None for the daemon's own recipe, another
        preset's where the job was queued under it (reprocess with another preset). False where
        the job left: queued again under the recipe it deserves now (its own preset's current
        one, or the daemon's where its preset is gone), or failed because its preset's models
        cannot be used (missing, altered, a licence not allowed; retried later)."""
        if job.recipe_sha256 == self.recipe_sha256:
            return None
        target = self.recipe_sha256
        if self.recipes is not None:
            try:
                recipe = self.recipes.recipe_for(job.recipe_sha256)
            except RecipeError as exc:
                log.error("failed path=%s error=%s", safe_name(job.path), _one_line(str(exc)))
                self.queue.fail(job, str(exc))
                self.failures += 1
                return False
            if recipe.sha256 == job.recipe_sha256:
                return recipe.choice
            target = recipe.sha256
        # Queued under an older recipe: the bytes still deserve the current one.
        self.queue.enqueue(job.path, job.source_sha256, target, force=job.force)
        self.queue.discard(job, "recipe changed", current_sha256=job.source_sha256, delay_seconds=0)
        return False

    def heartbeat(self) -> None:
        """Renew the leases of running jobs, every third of the lease."""
        interval = self.config.daemon.lease_seconds / 3
        for running in self._running.values():
            if time.monotonic() - running.beat_at >= interval:
                running.job = self.queue.heartbeat(running.job)
                running.beat_at = time.monotonic()

    def collect(self, timeout: float) -> None:
        """Handle what the workers reported within `timeout` seconds."""
        for event in self.pool.poll(timeout):
            self._finish(event)

    def shutdown(self) -> None:
        """Stop claiming; let the current images finish within the stop timeout, then abandon
        the rest cleanly (back to the queue, temporary files removed)."""
        timeout = self.config.daemon.stop_timeout
        if self._running:
            self._notify("STOPPING=1\nSTATUS=finishing the current image")
            for event in self.pool.drain(timeout):
                self._finish(event)
        for task in self.pool.stop(0 if self._running else timeout):
            running = self._running.pop(task.job_id, None)
            remove_stem_temps(Path(task.dest_dir), task.stem)
            progress_path(self.state, task.job_id).unlink(missing_ok=True)
            if running is not None:
                self.queue.release(running.job)
                log.info("abandoned path=%s back to the queue", safe_name(running.job.path))

    # ------------------------------------------------------------------ results

    def _finish(self, event: Outcome | WorkerDied | Returned) -> None:
        running = self._running.pop(event.task.job_id, None)
        progress_path(self.state, event.task.job_id).unlink(missing_ok=True)
        if running is None or running.task.run_token != event.task.run_token:
            if running is not None:
                self._running[running.job.id] = running
            if isinstance(event, Outcome):
                remove_written(event.files)
            return
        job, task = running.job, running.task
        if isinstance(event, Returned):
            remove_stem_temps(Path(task.dest_dir), task.stem)
            log.warning("returned path=%s reason=%s", safe_name(job.path), _one_line(event.reason))
            self.queue.release(job)
        elif isinstance(event, WorkerDied):
            remove_stem_temps(Path(task.dest_dir), task.stem)
            reason = event.reason or f"worker died (exit code {event.exitcode})"
            reason = f"{reason} while processing {job.path}"
            log.error("worker_died path=%s exit=%s", safe_name(job.path), event.exitcode)
            self._record(running, "died", error=reason)
            self.queue.worker_died(job, reason, backoff=event.backoff)
            self.failures += 1
        elif event.status == "ok":
            self._publish(running, event)
        elif event.status == "changed":
            current = _hash_or_none(Path(task.source))
            log.warning("changed path=%s run discarded", safe_name(job.path))
            self._record(running, "discarded", error=event.error, outcome=event)
            self.queue.discard(
                job,
                event.error or "source changed",
                current_sha256=current,
                delay_seconds=self.config.watch.stable_seconds,
            )
        else:
            log.error("failed path=%s error=%s", safe_name(job.path), _one_line(event.error))
            self._record(running, "failed", error=event.error, outcome=event)
            self.queue.fail(job, event.error or "failed", retryable=event.retryable)
            self.failures += 1

    def _record(
        self,
        running: _Running,
        status: RunStatus,
        *,
        error: str | None = None,
        outcome: Outcome | None = None,
    ) -> int:
        """Record a run that published nothing (failed, discarded, its worker died)."""
        job = running.job
        return self.store.record_run(
            source_sha256=job.source_sha256,
            path=job.path,
            recipe_sha256=job.recipe_sha256,
            status=status,
            started_at=running.started_at,
            finished_at=self._clock(),
            code_version=self.publisher.code_version,
            device=outcome.device if outcome else None,
            worker=outcome.worker if outcome else None,
            error=error,
            job_id=job.id,
            run_token=running.task.run_token,
            stages=outcome.stages if outcome else (),
        )

    def _publish(self, running: _Running, outcome: Outcome) -> None:
        """Publish the run's files at one fresh version and record it. When the filesystem
        fails on the way (disk full, permissions, a share gone) nothing of the run is left
        published and the job is retried later, unless the cause is permanent (a name too long
        for a versioned output)."""
        job, task = running.job, running.task
        finished = Finished(
            job=job,
            run_token=task.run_token,
            started_at=running.started_at,
            dest_dir=Path(task.dest_dir),
            stem=task.stem,
            files=outcome.files,
            stages=tuple(outcome.stages),
            device=outcome.device,
            credentials=outcome.credentials,
            worker=outcome.worker,
        )
        try:
            plan = self.publisher.publish(finished)
        except PublicationError as exc:
            error = f"{task.source}: publishing in {task.dest_dir} failed: {exc.cause}"
            log.error("failed path=%s error=%s", safe_name(job.path), _one_line(error))
            self._record(running, "failed", error=error, outcome=outcome)
            self.queue.fail(job, error, retryable=retry_is_worthwhile(exc.cause))
            self.failures += 1
            return
        log.info(
            "published path=%s version=%d output=%s seconds=%.2f",
            safe_name(job.path),
            plan.version,
            safe_name(plan.files[0].relative),
            outcome.seconds,
        )


def _hash_or_none(path: Path) -> str | None:
    try:
        return sha256_file(path, follow_symlinks=False)
    except OSError:
        return None


def _one_line(text: str | None) -> str:
    return escape_controls(text or "")
