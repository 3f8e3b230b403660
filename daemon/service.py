"""The daemon: watched folder -> hashes and provenance -> durable queue -> worker processes ->
versioned outputs. One short loop owns the database; the watcher and the scheduler only hand it
work through thread-safe queues."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import queue as threadqueue
import secrets
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from daemon.config import Config, model_store
from daemon.fsinfo import filesystem_type, is_network_filesystem
from daemon.logs import escape_controls
from daemon.publish import (
    Finished,
    PublicationError,
    Publisher,
    remove_stem_temps,
    remove_stray_temps,
    remove_written,
)
from daemon.queue import Job, JobQueue
from daemon.schedule import ActiveHours, Schedules
from daemon.store import (
    OutputFile,
    Store,
    open_database,
    utc_now,
)
from daemon.watcher import ReadyFile, Refusal, Watcher, safe_name
from daemon.worker import (
    Outcome,
    Task,
    WorkerDied,
    WorkerPool,
    WorkerSettings,
    not_the_files_fault,
)
from pipeline.chain import Chain
from pipeline.files import sha256_file

__all__ = ["Daemon", "DaemonError", "LockHeldError", "code_version", "recipe_of", "state_dir"]

log = logging.getLogger("scanrestore.daemon")


class DaemonError(Exception):
    """The daemon cannot start (its state folder, lock or database)."""


class LockHeldError(DaemonError):
    pass


def code_version() -> str:
    try:
        return version("scanrestore")
    except PackageNotFoundError:
        return "0+unknown"


def state_dir(config: Config) -> Path:
    """Where the database lives: the config's, else systemd's $STATE_DIRECTORY, else XDG."""
    if config.daemon.state_dir:
        return Path(config.daemon.state_dir).expanduser()
    if os.environ.get("STATE_DIRECTORY"):
        return Path(os.environ["STATE_DIRECTORY"].split(":")[0])
    base = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(base) / "scanrestore"


def recipe_of(config: Config, chain: Chain, preset: str | None) -> dict[str, Any]:
    """Everything that shapes an output: the chain's stages with versions and options, the
    sha256 of every model file, the output format, and the code version. Resolving a model
    here also proves it is present (or fetches it) before the first image."""
    store = model_store(config)
    models = {ref: store.resolve(ref).sha256 for _, ref in chain.models()}
    return {
        "stages": chain.describe(),
        "models": models,
        "preset": preset or config.pipeline.preset or None,
        "output": {"format": config.image.output_format, "quality": config.image.quality},
        "precision": config.processing.precision,
        "code_version": code_version(),
    }


def _verify_models(config: Config, chain: Chain) -> None:
    """Hash every model file the chain uses against the hash it must have, before any image
    is taken: a tampered or truncated file stops the start (exit 78) rather than failing every
    image one by one."""
    store = model_store(config)
    for _, ref in chain.models():
        resolved = store.resolve(ref)
        actual = sha256_file(resolved.path)
        if actual != resolved.sha256:
            raise DaemonError(
                f"model {resolved.id} ({resolved.path}): sha256 mismatch: expected "
                f"{resolved.sha256}, got {actual}; the file was altered or cut short: fetch or "
                "import it again"
            )


@contextlib.contextmanager
def instance_lock(directory: Path) -> Iterator[Path]:
    """One daemon per state folder: an exclusive flock held for the daemon's life."""
    path = directory / "scanrestore.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            raise LockHeldError(
                f"{path}: another scanrestore daemon (pid {holder}) uses this state folder"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)


@dataclass
class _Running:
    job: Job
    task: Task
    started_at: datetime
    beat_at: float = field(default_factory=time.monotonic)


class Daemon:
    """Runs until `stop()` (or SIGTERM/SIGINT via `install_signal_handlers`)."""

    # Seconds of ingest (hashing, recording, queueing) per round of the loop. A burst of
    # thousands of files, or the start-up scan of a large tree, is then taken in slices: between
    # them finished images are published, idle workers fed, leases renewed and `healthy()` kept
    # true, where one unbounded drain left the workers idle and the watchdog starving for as
    # long as the hashing took (0 still ingests one file a round).
    ingest_seconds: float = 0.25

    def __init__(
        self,
        config: Config,
        *,
        preset: str | None = None,
        once: bool = False,
        notify: Callable[[str], object] | None = None,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.config = config
        self.preset = preset
        self.once = once
        self.input = Path(config.watch.input).expanduser().resolve()
        self.output = Path(config.watch.output).expanduser().resolve()
        self.state = state_dir(config).resolve()
        self._notify = notify or (lambda _state: None)
        self._clock = clock
        self._stop = threading.Event()
        self._ready: threadqueue.SimpleQueue[ReadyFile | Refusal] = threadqueue.SimpleQueue()
        self._live_watcher: Watcher | None = None
        self._unreadable: dict[str, str] = {}  # path -> the error last recorded for it
        self._running: dict[int, _Running] = {}
        self._owner = f"{os.uname().nodename}:{os.getpid()}"
        self.store: Store | None = None
        self.queue: JobQueue | None = None
        self.publisher: Publisher | None = None
        self.recipe_sha256 = ""
        self.failures = 0
        self._loop_at = time.monotonic()
        self._status_at = float("-inf")
        self._hours = ActiveHours.parse(config.schedule.active_hours)

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        self._stop.set()

    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: self.stop())

    def run(self) -> int:
        """Start, work until stopped (or, with `once`, until what was there is done), exit 0."""
        self._check_folders()
        with instance_lock(self.state):
            self.store = open_database(self.state / "scanrestore.db", clock=self._clock)
            try:
                return self._run_locked()
            finally:
                self.store.close()

    def _run_locked(self) -> int:
        assert self.store is not None
        cfg = self.config.daemon
        self.queue = JobQueue(
            self.store,
            lease_seconds=cfg.lease_seconds,
            max_attempts=cfg.max_attempts,
            max_worker_deaths=cfg.max_worker_deaths,
            clock=self._clock,
        )
        chain = self.config.chain(self.preset)
        recipe = recipe_of(self.config, chain, self.preset)
        _verify_models(self.config, chain)
        self.recipe_sha256 = self.store.record_recipe(recipe)
        self.publisher = Publisher(
            self.store,
            self.queue,
            code_version=code_version(),
            provenance_sidecar=cfg.provenance_sidecar,
            clock=self._clock,
        )
        self._recover()
        settings = WorkerSettings(
            self.config.model_dump(mode="json"),
            preset=self.preset,
            models=recipe["models"],
            log_level=logging.getLogger().getEffectiveLevel(),
            device=self.config.processing.device,
            threads=self.config.processing.threads,
        )
        pool = WorkerPool(settings, cfg.workers)
        watcher = self._live_watcher = self._watcher()
        schedules = self._schedules(watcher)
        log.info(
            "started input=%s output=%s recipe=%s workers=%d",
            safe_name(self.input),
            safe_name(self.output),
            self.recipe_sha256[:12],
            cfg.workers,
        )
        try:
            if not self.once:
                watcher.start()
                schedules.start()
            self._notify("READY=1")
            self._loop(pool, watcher)
        finally:
            schedules.shutdown()
            watcher.stop()
            self._shutdown(pool)
        log.info("stopped")
        return 0

    def _check_folders(self) -> None:
        self.state.mkdir(parents=True, exist_ok=True)
        if is_network_filesystem(self.state):
            raise DaemonError(
                f"{self.state}: the database must be on a local disk, not on a network "
                f"filesystem ({filesystem_type(self.state)}): SQLite locking is unreliable there"
            )
        if not self.input.is_dir():
            raise DaemonError(f"{self.input}: the watched folder does not exist")
        self.output.mkdir(parents=True, exist_ok=True)

    def _watcher(self) -> Watcher:
        watch = self.config.watch
        return Watcher(
            self.input,
            self._ready.put,
            self._ready.put,
            mode=watch.mode,
            stable_seconds=watch.stable_seconds,
            rescan_seconds=None,  # the scheduler asks for rescans (see _schedules)
            patterns=watch.ignore,
            exclude=(self.output, self.state),
        )

    def _schedules(self, watcher: Watcher) -> Schedules:
        """Periodic rescan, nightly fixity audit and database backup. Each scheduled job runs
        in a scheduler thread with its own database connection."""
        plan = self.config.schedule
        schedules = Schedules()
        schedules.add_interval("rescan", watcher.rescan, self.config.watch.rescan_seconds)
        if plan.fixity_at:
            schedules.add_daily("fixity", self.audit_fixity, plan.fixity_at)
        if plan.backup_at:
            schedules.add_daily("backup", self.backup, plan.backup_at)
        return schedules

    def audit_fixity(self) -> None:
        """Re-hash every original and output against the database; problems become events."""
        store = open_database(self.state / "scanrestore.db", clock=self._clock)
        try:
            report = store.audit_fixity(
                lambda item: (self.input if item.kind == "original" else self.output) / item.path
            )
        finally:
            store.close()
        log.info("fixity checked=%d problems=%d", report.checked, len(report.problems))
        for problem in report.problems:
            log.warning("fixity %s path=%s", problem.kind, safe_name(problem.path or ""))

    def backup(self) -> Path:
        """VACUUM INTO a dated copy beside the database; keep the newest `backups_kept`."""
        folder = self.state / "backups"
        folder.mkdir(exist_ok=True)
        store = open_database(self.state / "scanrestore.db", clock=self._clock)
        try:
            stamp = self._clock().strftime("%Y%m%dT%H%M%SZ")
            path = store.backup(folder / f"scanrestore-{stamp}.db")
        finally:
            store.close()
        for old in sorted(folder.glob("scanrestore-*.db"))[: -self.config.schedule.backups_kept]:
            old.unlink(missing_ok=True)
        log.info("backup path=%s", safe_name(path))
        return path

    def healthy(self) -> bool:
        """For the systemd watchdog: the main loop went round recently."""
        return time.monotonic() - self._loop_at < max(120.0, self.config.daemon.stop_timeout)

    # ------------------------------------------------------------------ the loop

    def _loop(self, pool: WorkerPool, watcher: Watcher) -> None:
        if self.once:
            self._ingest_once()
        while not self._stop.is_set():
            self._loop_at = time.monotonic()
            self._report_status()
            self._drain_ready()
            self._dispatch(pool)
            for event in pool.poll(0.2 if self._ready.empty() else 0.0):
                self._finish(event)
            self._heartbeat()
            if self.once and not self._running and not self._claimable() and self._ready.empty():
                break

    def _report_status(self) -> None:
        assert self.queue is not None
        if time.monotonic() - self._status_at < 5:
            return
        self._status_at = time.monotonic()
        counts = self.queue.counts()
        text = ", ".join(f"{counts.get(s, 0)} {s}" for s in ("queued", "running", "failed", "done"))
        if not self._window_open():
            text += "; outside active hours"
        self._notify(f"STATUS={text}")

    def _ingest_once(self) -> None:
        from daemon.watcher import run_once

        result = run_once(
            self.input,
            stable_seconds=self.config.watch.stable_seconds,
            patterns=self.config.watch.ignore,
            exclude=(self.output, self.state),
        )
        for item in (*result.ready, *result.refused):
            self._ready.put(item)
        if not result.available:
            raise DaemonError(f"{self.input}: the watched folder is unavailable")
        assert self.store is not None
        for path in result.pending:
            empty = (
                (self.input / path).stat().st_size == 0 if (self.input / path).exists() else False
            )
            reason = "empty (a placeholder still being written?)" if empty else "still changing"
            log.info("waiting path=%s reason=%s", safe_name(path), reason)
            self.store.record_event("waiting", path=path, detail={"reason": reason})

    def _claimable(self) -> bool:
        assert self.queue is not None
        counts = self.queue.counts()
        due = self.queue.next_due_at()
        return bool(counts.get("queued")) or (due is not None and due <= self._clock())

    def _drain_ready(self) -> None:
        deadline = time.monotonic() + self.ingest_seconds
        while True:
            try:
                item = self._ready.get_nowait()
            except threadqueue.Empty:
                return
            if isinstance(item, Refusal):
                self._refuse(item)
            else:
                self._ingest(item)
            if time.monotonic() >= deadline:
                return

    def _refuse(self, item: Refusal) -> None:
        assert self.store is not None
        log.warning("refused path=%s reason=%s", safe_name(item.relative), item.reason)
        self.store.record_event("refused", path=item.relative, detail={"reason": item.reason})

    def _ingest(self, item: ReadyFile) -> None:
        """Hash a settled file, record it, queue it unless these bytes were done already."""
        assert self.store is not None and self.queue is not None
        try:
            sha = sha256_file(item.path, follow_symlinks=False)
        except OSError as exc:
            if self._unreadable.get(item.relative) != str(exc):  # once, not at every rescan
                self._unreadable[item.relative] = str(exc)
                log.warning(
                    "unreadable path=%s error=%s", safe_name(item.relative), _one_line(str(exc))
                )
                detail = {"error": str(exc)}
                self.store.record_event("unreadable", path=item.relative, detail=detail)
            if self._live_watcher is not None:  # permissions get fixed: look again later
                self._live_watcher.offer_again(item.relative)
            return
        self._unreadable.pop(item.relative, None)
        modified = datetime.fromtimestamp(item.mtime_ns / 1e9).astimezone()
        self.store.record_observation(item.relative, sha, size=item.size, modified_at=modified)
        queued = self.queue.enqueue(item.relative, sha, self.recipe_sha256)
        if queued.created:
            log.info("queued path=%s sha256=%s", safe_name(item.relative), sha[:12])
        elif queued.reason in ("done", "quarantined") and queued.job.path != item.relative:
            log.info(
                "duplicate path=%s of=%s state=%s",
                safe_name(item.relative),
                safe_name(queued.job.path),
                queued.reason,
            )
            self.store.record_event(
                "duplicate",
                path=item.relative,
                source_sha256=sha,
                detail={"same_bytes_as": queued.job.path, "job_id": queued.job.id},
            )

    def _window_open(self) -> bool:
        return self.once or self._hours.is_open()

    def _dispatch(self, pool: WorkerPool) -> None:
        assert self.queue is not None and self.store is not None
        while pool.idle() and not self._stop.is_set() and self._window_open():
            job = self.queue.claim(self._owner)
            if job is None:
                return
            if job.recipe_sha256 != self.recipe_sha256:
                # Queued under an older recipe: the bytes still deserve the current one.
                self.queue.enqueue(job.path, job.source_sha256, self.recipe_sha256)
                self.queue.discard(
                    job, "recipe changed", current_sha256=job.source_sha256, delay_seconds=0
                )
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
                run_id=secrets.token_hex(8),
                source=str(self.input / relative),
                source_sha256=job.source_sha256,
                dest_dir=str(self.output / relative.parent),
                stem=relative.stem,
                recipe_sha256=job.recipe_sha256,
                software=f"scanrestore {code_version()}",
                mask=self.config.daemon.mask_sidecar,
            )
            self._running[job.id] = _Running(job, task, self._clock())
            pool.submit(task)
            log.info("processing path=%s job=%d", safe_name(job.path), job.id)

    def _heartbeat(self) -> None:
        assert self.queue is not None
        interval = self.config.daemon.lease_seconds / 3
        for running in self._running.values():
            if time.monotonic() - running.beat_at >= interval:
                running.job = self.queue.heartbeat(running.job)
                running.beat_at = time.monotonic()

    # ------------------------------------------------------------------ results

    def _finish(self, event: Outcome | WorkerDied) -> None:
        assert self.queue is not None and self.store is not None
        running = self._running.pop(event.task.job_id, None)
        if running is None:
            _remove_temps(event)
            return
        job, task = running.job, running.task
        if isinstance(event, WorkerDied):
            remove_stem_temps(Path(task.dest_dir), task.stem)
            reason = f"worker died (exit code {event.exitcode}) while processing {job.path}"
            log.error("worker_died path=%s exit=%s", safe_name(job.path), event.exitcode)
            self._record(job, running, "died", error=reason)
            self.queue.worker_died(job, reason)
            self.failures += 1
        elif event.status == "ok":
            self._publish(job, running, event)
        elif event.status == "changed":
            current = _hash_or_none(Path(task.source))
            log.warning("changed path=%s run discarded", safe_name(job.path))
            self._record(job, running, "discarded", error=event.error, outcome=event)
            self.queue.discard(
                job,
                event.error or "source changed",
                current_sha256=current,
                delay_seconds=self.config.watch.stable_seconds,
            )
        else:
            log.error("failed path=%s error=%s", safe_name(job.path), _one_line(event.error))
            self._record(job, running, "failed", error=event.error, outcome=event)
            self.queue.fail(job, event.error or "failed", retryable=event.retryable)
            self.failures += 1

    def _record(
        self,
        job: Job,
        running: _Running,
        status: str,
        *,
        error: str | None = None,
        outcome: Outcome | None = None,
        outputs: tuple[OutputFile, ...] = (),
    ) -> int:
        assert self.store is not None
        return self.store.record_run(
            source_sha256=job.source_sha256,
            path=job.path,
            recipe_sha256=job.recipe_sha256,
            status=status,  # type: ignore[arg-type]
            started_at=running.started_at,
            finished_at=self._clock(),
            code_version=code_version(),
            device=outcome.device if outcome else None,
            error=error,
            job_id=job.id,
            run_token=running.task.run_id,
            stages=outcome.stages if outcome else (),
            outputs=outputs,
        )

    def _publish(self, job: Job, running: _Running, outcome: Outcome) -> None:
        """Publish the run's files at one fresh version and record it. When the filesystem
        fails on the way (disk full, permissions, a share gone) nothing of the run is left
        published and the job is retried later, unless the cause is permanent (a name too long
        for a versioned output)."""
        assert self.publisher is not None and self.queue is not None
        task = running.task
        finished = Finished(
            job=job,
            run_token=task.run_id,
            started_at=running.started_at,
            dest_dir=Path(task.dest_dir),
            stem=task.stem,
            files=outcome.files,
            stages=tuple(outcome.stages),
            device=outcome.device,
        )
        try:
            plan = self.publisher.publish(finished)
        except PublicationError as exc:
            error = f"{task.source}: publishing in {task.dest_dir} failed: {exc.cause}"
            log.error("failed path=%s error=%s", safe_name(job.path), _one_line(error))
            self._record(job, running, "failed", error=error, outcome=outcome)
            self.queue.fail(job, error, retryable=not_the_files_fault(exc.cause))
            self.failures += 1
            return
        log.info(
            "published path=%s version=%d output=%s seconds=%.2f",
            safe_name(job.path),
            plan.version,
            safe_name(plan.files[0].relative),
            outcome.seconds,
        )

    # ------------------------------------------------------------------ recovery, shutdown

    def _recover(self) -> None:
        """After a crash: finish recorded publications, return leases of the dead to the
        queue, and remove temporary files no plan refers to."""
        assert self.publisher is not None and self.queue is not None
        for job in self.publisher.recover():
            log.info("recovered publication path=%s", safe_name(job.path))
        for job in self.queue.requeue_expired(penalise=False):
            log.warning("requeued path=%s after a crash", safe_name(job.path))
        removed = remove_stray_temps(self.output)
        if removed:
            log.info("removed %d leftover temporary files", removed)

    def _shutdown(self, pool: WorkerPool) -> None:
        """Stop claiming; let the current images finish within the stop timeout, then abandon
        the rest cleanly (back to the queue, temporary files removed)."""
        assert self.queue is not None
        timeout = self.config.daemon.stop_timeout
        if self._running:
            self._notify("STOPPING=1\nSTATUS=finishing the current image")
            for event in pool.drain(timeout):
                self._finish(event)
        for task in pool.stop(0 if self._running else timeout):
            running = self._running.pop(task.job_id, None)
            remove_stem_temps(Path(task.dest_dir), task.stem)
            if running is not None:
                self.queue.release(running.job)
                log.info("abandoned path=%s back to the queue", safe_name(running.job.path))


# ------------------------------------------------------------------ files


def _hash_or_none(path: Path) -> str | None:
    try:
        return sha256_file(path, follow_symlinks=False)
    except OSError:
        return None


def _remove_temps(event: Outcome | WorkerDied) -> None:
    if isinstance(event, Outcome):
        remove_written(event.files)


def _one_line(text: str | None) -> str:
    return escape_controls(text or "")
