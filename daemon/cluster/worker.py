"""A cluster worker (`scanrestore worker`): a Celery worker, one process per device taking one
task at a time, that claims each run once (a redelivered message is dropped), refuses a recipe
whose model hashes its own weights do not match, processes through the same Runner as a local
worker process (source hash checked, temporary outputs fsynced in the output tree), and reports
the files back. A heartbeat thread tells the coordinator it lives and stops a run the
coordinator gave up."""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Literal

from daemon.cluster.broker import TASK_NAME, Broker, BrokerError, celery_app
from daemon.cluster.messages import Beat, RemoteResult, RemoteTask
from daemon.cluster.paths import PathMap
from daemon.config import Config, model_store
from daemon.publish import WrittenFile, remove_stem_temps, remove_written
from daemon.store import utc_now
from daemon.worker import Outcome, Runner, Task, WorkerSettings

__all__ = ["ClusterWorker", "run_worker"]

log = logging.getLogger("scanrestore.cluster")

# Sent by the heartbeat thread to the worker's main thread when the coordinator revoked the
# run in progress (SIGUSR1 is Celery's, for dumping tracebacks).
_REVOKE_SIGNAL = signal.SIGUSR2


class _Interrupted(BaseException):
    """Raised in the main thread, from a signal handler, to stop the run in progress. A
    BaseException so that the Runner's own error handling does not take it for a failure."""

    def __init__(self, why: Literal["released", "revoked"]) -> None:
        super().__init__(why)
        self.why = why


@dataclass(frozen=True)
class _Prepared:
    """A recipe as this worker can run it: a Runner, or why it refuses the recipe."""

    runner: Runner | None
    refusal: str | None = None


class ClusterWorker:
    """The state of one `scanrestore worker` process: its identity and heartbeat, the recipes
    it prepared (each model loaded once), and the run in progress."""

    def __init__(self, config: Config, *, device: str, name: str = "") -> None:
        cluster = config.cluster
        self.config = config
        self.device = device
        self.paths = PathMap.from_config(cluster.path_map)
        self.broker = Broker(cluster.broker, cluster.prefix)
        host, pid = socket.gethostname(), os.getpid()
        name = name or cluster.name or f"{host}-{device.replace(':', '')}-{pid}"
        self.queue = self.broker.worker_queue(name)
        self._beat = Beat(name, host, pid, device, self.queue, utc_now().isoformat())
        self._lock = threading.Lock()
        self._prepared: dict[str, _Prepared] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._interruptible = False
        self._pending: Literal["released", "revoked"] | None = None
        self._term_handler: object = signal.SIG_DFL
        self._broker_down = False

    @property
    def ident(self) -> str:
        return self._beat.ident

    @property
    def name(self) -> str:
        return self._beat.name

    # ------------------------------------------------------------ life

    def start(self) -> None:
        """From the main thread once Celery is ready: the revoke signal and the heartbeats."""
        signal.signal(_REVOKE_SIGNAL, self._interrupt)
        self._send_beat()
        self._thread = threading.Thread(target=self._beating, name="scanrestore-beat", daemon=True)
        self._thread.start()
        log.info("worker %s ready on %s, queue %s", self.ident, self.device, self.queue)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        try:
            self.broker.remove_beat(self.name)
        except BrokerError as exc:
            log.warning("could not remove the heartbeat: %s", exc)
        self.broker.close()

    # ------------------------------------------------------------ one task (main thread)

    def take(self, message: str) -> None:
        """The Celery task: run the dispatch once, whatever number of times it is delivered."""
        task = RemoteTask.from_json(message)
        if not self.broker.claim(task.run_token, self.ident):
            with self._lock:
                self._beat = replace(self._beat, duplicates=self._beat.duplicates + 1)
            holder = self.broker.holder(task.run_token)
            log.warning(
                "dropped a redelivered task run=%s path=%s: held by %s",
                task.run_token,
                task.path,
                holder,
            )
            return
        self._pending = None
        # From the claim on, SIGTERM hands this run back (see _interrupt); Celery's own
        # handler still runs, so no further task is taken.
        self._term_handler = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._interrupt)
        try:
            with self._lock:
                self._beat = replace(self._beat, run_token=task.run_token, job=task.path)
            self._send_beat()
            result = self._run(task)
        finally:
            signal.signal(signal.SIGTERM, self._term_handler)  # type: ignore[arg-type]
        if result is not None:
            self._report(result)
        with self._lock:
            done = self._beat.done + (result is not None and result.status == "ok")
            self._beat = replace(self._beat, run_token=None, job=None, done=done)
        self._send_beat()

    def _run(self, task: RemoteTask) -> RemoteResult | None:
        prepared = self._prepare(task)
        if prepared.runner is None:
            log.error("refused run=%s: %s", task.run_token, prepared.refusal)
            return RemoteResult(task.run_token, self.ident, "refused", error=prepared.refusal)
        local = Task(
            job_id=task.job_id,
            run_token=task.run_token,
            source=self.paths.to_worker(task.source),
            source_sha256=task.source_sha256,
            dest_dir=self.paths.to_worker(task.dest_dir),
            stem=task.stem,
            recipe_sha256=task.recipe_sha256,
            software=task.software,
            mask=bool(task.output.get("mask", True)),
        )
        try:
            try:
                self._interruptible = True
                if self._pending is not None:
                    raise _Interrupted(self._pending)
                outcome = prepared.runner.run(local)
            finally:
                self._interruptible = False
        except _Interrupted as exc:
            self._prepared.pop(task.recipe_sha256, None)
            return self._interrupted(task, local, exc.why)
        if self._pending is not None:
            # The signal's exception was swallowed where it landed (raised inside an extension
            # module's import, it comes out as an ImportError that drops that engine), so the
            # run went on with whatever that broke: its files go, the recipe is prepared again.
            self._prepared.pop(task.recipe_sha256, None)
            remove_written(outcome.files)
            log.warning(
                "run=%s path=%s finished after an interrupt the run swallowed: discarded",
                task.run_token,
                task.path,
            )
            return self._interrupted(task, local, self._pending)
        if outcome.status != "ok":
            with self._lock:
                self._beat = replace(self._beat, error=outcome.error)
        return self._result(task, outcome)

    def _result(self, task: RemoteTask, outcome: Outcome) -> RemoteResult:
        files = tuple(
            WrittenFile(
                item.kind,
                Path(self.paths.to_coordinator(str(item.temp))),
                item.suffix,
                item.sha256,
                item.bytes,
            )
            for item in outcome.files
        )
        return RemoteResult(
            task.run_token,
            self.ident,
            outcome.status,  # type: ignore[arg-type]
            error=outcome.error,
            error_type=outcome.error_type,
            retryable=outcome.retryable,
            files=files,
            stages=outcome.stages,
            seconds=outcome.seconds,
            device=outcome.device,
            credentials=outcome.credentials,
        )

    def _interrupted(
        self, task: RemoteTask, local: Task, why: Literal["released", "revoked"]
    ) -> RemoteResult | None:
        """A run stopped midway: what it wrote was removed as the exception unwound it (see
        daemon.processing.process_image). A revoked run reports nothing: the coordinator has
        given it up and may already have dispatched the job again. A released one (SIGTERM)
        is still this worker's alone, so its stray temporaries go too, and the job is handed
        back."""
        if why == "revoked":
            log.warning(
                "run=%s path=%s revoked by the coordinator: stopped", task.run_token, task.path
            )
            return None
        remove_stem_temps(Path(local.dest_dir), local.stem)
        log.warning("run=%s path=%s handed back: the worker is stopping", task.run_token, task.path)
        return RemoteResult(
            task.run_token, self.ident, "released", error="the worker is stopping (SIGTERM)"
        )

    def _interrupt(self, signum: int, frame: FrameType | None) -> None:
        why: Literal["released", "revoked"] = "released" if signum == signal.SIGTERM else "revoked"
        if signum == signal.SIGTERM and callable(self._term_handler):
            self._term_handler(signum, frame)  # Celery's warm shutdown: no further task
        if self._pending is None:  # kept even when the raise below is swallowed (see _run)
            self._pending = why
        if self._interruptible:
            self._interruptible = False
            raise _Interrupted(why)

    def _prepare(self, task: RemoteTask) -> _Prepared:
        """The recipe's chain over this worker's own weights, once per recipe: refused when a
        model file is not the one the recipe names (a different or altered file), so an
        output is never made with other weights under the same recipe."""
        prepared = self._prepared.get(task.recipe_sha256)
        if prepared is None:
            prepared = self._build(task)
            self._prepared[task.recipe_sha256] = prepared
            if prepared.refusal is not None:
                with self._lock:
                    refusing = {**self._beat.refusing, task.recipe_sha256: prepared.refusal}
                    self._beat = replace(self._beat, refusing=refusing, error=prepared.refusal)
        return prepared

    def _build(self, task: RemoteTask) -> _Prepared:
        from pipeline.chain import ChainConfigError, build_chain
        from pipeline.errors import PipelineError

        try:
            chain = build_chain(task.stages, path="recipe.stages")
            trusted = chain.prepare_models(model_store(self.config))
        except (ChainConfigError, PipelineError, OSError) as exc:
            return _Prepared(
                None, f"{self.ident} cannot prepare recipe {task.recipe_sha256[:12]}: {exc}"
            )
        for ref, wanted in sorted(task.models.items()):
            mine = trusted.expected.get(ref)
            if mine != wanted:
                return _Prepared(
                    None,
                    f"{self.ident}: model {ref}: the recipe names sha256 {wanted}, this "
                    f"worker's weights are {mine or 'absent'}",
                )
        data = self.config.model_dump(mode="json")
        data["pipeline"] = {"preset": "", "stages": task.stages}
        data["processing"] = {
            **data["processing"],
            "device": self.device,
            "precision": task.precision,
            "seed": task.seed,
        }
        data["image"] = {
            "max_pixels": task.output["max_pixels"],
            "output_format": task.output["format"],
            "quality": task.output["quality"],
        }
        settings = WorkerSettings(
            data,
            device=self.device,
            threads=self.config.processing.threads,
            models=dict(task.models),
            log_level=logging.getLogger().getEffectiveLevel(),
        )
        return _Prepared(Runner(settings))

    def _report(self, result: RemoteResult) -> None:
        """Push the result, retrying through a broker outage for up to the worker timeout."""
        deadline = time.monotonic() + self.config.cluster.worker_timeout
        while True:
            try:
                self.broker.push_result(result)
                return
            except BrokerError as exc:
                if time.monotonic() > deadline:
                    log.error("result of run=%s lost: %s", result.run_token, exc)
                    return
                time.sleep(0.5)

    # ------------------------------------------------------------ heartbeats (own thread)

    def _beating(self) -> None:
        while not self._stop.wait(self.config.cluster.heartbeat_seconds):
            self._send_beat(check=True)

    def _send_beat(self, *, check: bool = False) -> None:
        with self._lock:
            self._beat = replace(self._beat, seq=self._beat.seq + 1)
            beat = self._beat
        try:
            self.broker.write_beat(beat)
            if check and beat.run_token is not None:
                self._check_claim(beat.run_token)
        except BrokerError as exc:
            if not self._broker_down:
                log.warning("broker unreachable: %s", exc)
            self._broker_down = True
            return
        if self._broker_down:
            log.info("broker reachable again")
            self._broker_down = False

    def _check_claim(self, token: str) -> None:
        """Stop the run when the coordinator revoked it. A claim gone with a restarted broker
        is taken again, unless the coordinator revoked it first."""
        holder = self.broker.holder(token)
        if holder is None and self.broker.claim(token, self.ident):
            return
        holder = holder or self.broker.holder(token)
        if holder != self.ident and self._beat.run_token == token:
            os.kill(os.getpid(), _REVOKE_SIGNAL)


def run_worker(config: Config, *, device: str, name: str = "", loglevel: str = "INFO") -> int:
    """Run a Celery worker for `config.cluster.broker` until SIGTERM (warm: a run in progress
    is handed back) or SIGINT."""
    from celery import signals

    worker = ClusterWorker(config, device=device, name=name)
    app = celery_app(config.cluster)

    @app.task(name=TASK_NAME, acks_late=True, ignore_result=True)
    def process(message: str) -> None:
        worker.take(message)

    ready = threading.Event()

    def on_ready(**_: object) -> None:
        worker.start()
        ready.set()

    signals.worker_ready.connect(on_ready, weak=False)
    argv = [
        "worker",
        "--pool=solo",
        "--concurrency=1",
        "--prefetch-multiplier=1",
        f"--queues={worker.queue}",
        f"--hostname={worker.name}@{socket.gethostname()}",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        f"--loglevel={loglevel}",
    ]
    try:
        app.worker_main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        signals.worker_ready.disconnect(on_ready)
        if ready.is_set():
            worker.close()
    return 0
