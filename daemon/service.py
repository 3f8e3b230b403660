"""The daemon: watched folder -> hashes and provenance -> durable queue -> worker processes ->
versioned outputs. One short loop owns the database; the watcher and the scheduler only hand it
work through thread-safe queues."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import queue as threadqueue
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path

from daemon import prewarm
from daemon.config import Config, state_dir, worker_threads
from daemon.fsinfo import filesystem_type, is_network_filesystem
from daemon.ingest import IngestError, Intake
from daemon.processing import code_version, recipe_of, signing_key
from daemon.publish import Publisher, remove_stray_temps
from daemon.queue import JobQueue
from daemon.recipes import ChainChoice, Recipe, RecipeBook, RecipeError, prepare_models
from daemon.schedule import Schedules
from daemon.seen import Version, seen_versions
from daemon.session import Session
from daemon.store import Store, open_database, utc_now
from daemon.watcher import ReadyFile, Refusal, Watcher, safe_name
from daemon.web.server import WebServer
from daemon.worker import WorkerPool, Workers, WorkerSettings

__all__ = ["Daemon", "DaemonError", "LockHeldError", "state_dir"]

log = logging.getLogger("scanrestore.daemon")


class DaemonError(Exception):
    """The daemon cannot start (its state folder, lock or database)."""


class LockHeldError(DaemonError):
    pass


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
        self.started = threading.Event()  # set once: recovered, workers and watcher up
        self.failures = 0  # images failed in the last run (`watch --once` exits 1 if any)
        self._loop_at = time.monotonic()

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
            store = open_database(self.state / "scanrestore.db", clock=self._clock)
            try:
                return self._run_locked(store)
            finally:
                store.close()

    def _run_locked(self, store: Store) -> int:
        cfg = self.config.daemon
        queue = JobQueue(
            store,
            lease_seconds=cfg.lease_seconds,
            max_attempts=cfg.max_attempts,
            max_worker_deaths=cfg.max_worker_deaths,
            clock=self._clock,
        )
        try:
            chain, models = prepare_models(self.config, self.preset)
        except RecipeError as exc:
            raise DaemonError(str(exc)) from exc
        signing_key(self.config)  # a certificate and key that cannot sign stop the start
        recipe = recipe_of(self.config, chain, self.preset, models.expected)
        recipe_sha256 = store.record_recipe(recipe)
        publisher = Publisher(
            store,
            queue,
            code_version=code_version(),
            provenance_sidecar=cfg.provenance_sidecar,
            clock=self._clock,
        )
        _recover(publisher, queue, self.output)
        settings = WorkerSettings(
            self.config.model_dump(mode="json"),
            preset=self.preset,
            models=recipe["models"],
            log_level=logging.getLogger().getEffectiveLevel(),
            device=self.config.processing.device,
            threads=worker_threads(self.config),
        )
        pool = self._workers(store, settings, recipe, recipe_sha256)
        own = Recipe(recipe_sha256, ChainChoice(recipe["preset"], dict(recipe["models"])))
        # Cluster workers are bound to the one recipe they were sent; local ones build any.
        recipes = None if self.config.cluster.broker else RecipeBook(self.config, store, own)
        watcher = self._watcher(seen_versions(store, queue, recipe_sha256))
        schedules = self._schedules(watcher)
        session = Session(
            self.config,
            store=store,
            queue=queue,
            pool=pool,
            publisher=publisher,
            recipe_sha256=recipe_sha256,
            recipes=recipes,
            input_root=self.input,
            output_root=self.output,
            state_root=self.state,
            software=f"scanrestore {code_version()}",
            once=self.once,
            stopping=self._stop,
            notify=self._notify,
            clock=self._clock,
            owner=f"{os.uname().nodename}:{os.getpid()}",
        )
        intake = Intake(
            self.config,
            store,
            queue,
            watcher,
            self._ready,
            recipe_sha256=recipe_sha256,
            input_root=self.input,
            exclude=(self.output, self.state),
        )
        log.info(
            "started input=%s output=%s recipe=%s workers=%d",
            safe_name(self.input),
            safe_name(self.output),
            recipe_sha256[:12],
            cfg.workers,
        )
        web = self._web()
        try:
            if not self.once:
                watcher.start()
                schedules.start()
            self._notify("READY=1")
            self.started.set()
            self._loop(session, intake)
        finally:
            schedules.shutdown()
            watcher.stop()
            session.shutdown()
            if web is not None:
                web.stop()
            self.failures = session.failures
        log.info("stopped")
        return 0

    def _web(self) -> WebServer | None:
        """The review page in a child process of its own ([web] enabled; not for --once, which
        exits when the folder is done). A public address without a token stops the start."""
        if not self.config.web.enabled or self.once:
            return None
        from daemon.web.security import TokenRequiredError
        from daemon.web.server import start_child

        try:
            return start_child(self.config)
        except TokenRequiredError as exc:
            raise DaemonError(str(exc)) from None

    def _workers(
        self, store: Store, settings: WorkerSettings, recipe: dict, recipe_sha256: str
    ) -> Workers:
        """Local worker processes, or with `[cluster] broker` the workers on other machines."""
        if not self.config.cluster.broker:
            pool = WorkerPool(settings, self.config.daemon.workers, adopt=True)
            prewarm.discard()
            return pool
        prewarm.discard()  # the work goes to the cluster's workers
        from daemon.cluster.dispatch import Dispatcher, Recipe
        from daemon.cluster.registry import WorkerRegistry

        image = self.config.image
        return Dispatcher(
            self.config.cluster,
            Recipe(
                sha256=recipe_sha256,
                models=dict(recipe["models"]),
                stages=self.config.stages(self.preset),
                precision=self.config.processing.precision,
                seed=self.config.processing.seed,
                output={
                    "format": image.output_format,
                    "quality": image.quality,
                    "max_pixels": image.max_pixels,
                },
            ),
            input_root=self.input,
            output_root=self.output,
            registry=WorkerRegistry(store),
        )

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

    def _watcher(self, known: Mapping[str, Version]) -> Watcher:
        """The watcher, told what it need not hand over again (daemon.seen.seen_versions)."""
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
            known=known,
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

    def _loop(self, session: Session, intake: Intake) -> None:
        if self.once:
            try:
                intake.scan_once()
            except IngestError as exc:
                raise DaemonError(str(exc)) from None
        while not self._stop.is_set():
            self._loop_at = time.monotonic()
            session.report_status()
            intake.drain(self.ingest_seconds)
            session.dispatch()
            session.collect(0.2 if self._ready.empty() else 0.0)
            session.heartbeat()
            if self.once and not session.busy() and not session.claimable() and self._ready.empty():
                break


def _recover(publisher: Publisher, queue: JobQueue, output: Path) -> None:
    """After a crash: finish recorded publications, return leases of the dead to the queue,
    and remove temporary files no plan refers to."""
    for job in publisher.recover():
        log.info("recovered publication path=%s", safe_name(job.path))
    for job in queue.requeue_expired(penalise=False):
        log.warning("requeued path=%s after a crash", safe_name(job.path))
    removed = remove_stray_temps(output)
    if removed:
        log.info("removed %d leftover temporary files", removed)
