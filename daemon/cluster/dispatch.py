"""The coordinator's side of the cluster: claimed jobs dispatched as Celery tasks to idle
workers, their heartbeats watched, and their results turned into the events local worker
processes produce (daemon.worker.Workers), so the session publishes both alike.

Exactly once, by construction: every dispatch has its own run token (the fencing token). A
result counts only for the token the coordinator is still waiting on, and publication checks
the job's lease in SQLite again; a token the coordinator gave up (its worker went silent, a
message never taken, a result lost with a restarted broker) is first revoked in Redis, so no
worker can start it later and one that runs it stops; anything reported for it is discarded
and its temporary files removed."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from daemon.cluster.broker import REVOKED, TASK_NAME, Broker, BrokerError, celery_app
from daemon.cluster.messages import Beat, RemoteResult, RemoteTask
from daemon.cluster.registry import WorkerRecord, WorkerRegistry
from daemon.config import ClusterConfig
from daemon.publish import remove_written
from daemon.store import utc_now
from daemon.worker import Outcome, Returned, Task, WorkerDied

__all__ = ["Dispatcher", "Recipe"]

log = logging.getLogger("scanrestore.cluster")

Event = Outcome | WorkerDied | Returned


@dataclass(frozen=True)
class Recipe:
    """What every task of this daemon carries besides its file: the chain and how outputs are
    written, exactly as the recipe recorded them."""

    sha256: str
    models: dict[str, str]
    stages: list[dict[str, Any]]
    precision: str
    seed: int
    output: dict[str, Any]  # {"format", "quality", "max_pixels"}


@dataclass
class _Dispatched:
    task: Task
    worker: str  # the name it was sent to
    sent_at: float
    taken: bool = False


@dataclass
class _Seen:
    """A worker as the coordinator follows it: its latest beat and when `seq` last changed."""

    beat: Beat
    changed_at: float
    heard_at: datetime
    first_seen_at: datetime = field(default_factory=utc_now)
    refused: bool = False  # it refused this daemon's recipe (known before its beat says so)
    # Its heartbeat has changed while we watched: a beat left in Redis by a worker killed
    # before this coordinator started is not taken for a live worker to send work to.
    confirmed: bool = False


class Dispatcher:
    """Remote workers behind the interface of daemon.worker.WorkerPool. Runs on the daemon
    loop's thread, which alone writes the registry."""

    def __init__(
        self,
        cluster: ClusterConfig,
        recipe: Recipe,
        *,
        input_root: Path,
        output_root: Path,
        registry: WorkerRegistry,
        monotonic: Callable[[], float] = time.monotonic,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.cluster = cluster
        self.recipe = recipe
        self.input_root = input_root
        self.output_root = output_root
        self.registry = registry
        self.broker = Broker(cluster.broker, cluster.prefix)
        self.app = celery_app(cluster)
        self._mono = monotonic
        self._clock = clock
        self._dispatched: dict[str, _Dispatched] = {}  # run token ->
        self._seen: dict[str, _Seen] = {}  # worker name ->
        self._events: list[Event] = []
        self._blind = False  # the broker could not be read at the last look
        self._recorded_at = float("-inf")

    # ------------------------------------------------------------ WorkerPool's interface

    @property
    def busy(self) -> list[Task]:
        return [item.task for item in self._dispatched.values()]

    def idle(self) -> int:
        if not self._seen:
            self._look()
        return len(self._candidates())

    def submit(self, task: Task) -> None:
        """Send `task` to an idle worker's own queue; a broker that cannot take it returns the
        task at the next poll."""
        candidates = self._candidates()
        if not candidates:
            self._events.append(Returned(task, "no idle cluster worker"))
            return
        name = min(candidates, key=self._jobs_done)  # spread the work
        remote = RemoteTask(
            run_token=task.run_token,
            job_id=task.job_id,
            path=str(Path(task.source).relative_to(self.input_root)),
            source=task.source,
            source_sha256=task.source_sha256,
            dest_dir=task.dest_dir,
            stem=task.stem,
            recipe_sha256=task.recipe_sha256,
            models=self.recipe.models,
            stages=self.recipe.stages,
            precision=self.recipe.precision,
            seed=self.recipe.seed,
            output={**self.recipe.output, "mask": task.mask},
            software=task.software,
        )
        self._dispatched[task.run_token] = _Dispatched(task, name, self._mono())
        try:
            self.app.send_task(
                TASK_NAME, args=[remote.to_json()], queue=self.broker.worker_queue(name)
            )
        except Exception as exc:  # kombu raises its own and the transport's errors
            self._dispatched.pop(task.run_token)
            self._events.append(Returned(task, f"the broker did not take the task: {exc}"))
            return
        log.info("dispatched path=%s worker=%s", remote.path, name)

    def poll(self, timeout: float) -> list[Event]:
        """Results and losses within `timeout` seconds."""
        events, self._events = self._events, []
        beats_ok = self._look()
        try:
            results = self.broker.pop_results(0 if events else timeout)
        except BrokerError as exc:
            self._blinded(exc)
            time.sleep(min(timeout, 0.5))
            return events
        for result in results:
            event = self._accept(result)
            if event is not None:
                events.append(event)
        if beats_ok:
            events += self._judge()
        self._record()
        return events

    def drain(self, timeout: float) -> list[Event]:
        deadline = self._mono() + timeout
        events: list[Event] = []
        while self._dispatched and (left := deadline - self._mono()) > 0:
            events += self.poll(min(left, 0.5))
        return events

    def stop(self, timeout: float) -> list[Task]:
        """Give up every outstanding run (revoked: a worker running one stops and removes its
        files) and return their tasks; `timeout` is spent waiting for results first."""
        for event in self.drain(timeout):
            self._events.append(event)
        abandoned = []
        for token, item in list(self._dispatched.items()):
            try:
                self.broker.revoke(token)
            except BrokerError as exc:
                log.warning("could not revoke run %s: %s", token, exc)
            abandoned.append(item.task)
        self._dispatched.clear()
        abandoned += [event.task for event in self._events]  # arrived but never handled
        self._events.clear()
        self.broker.close()
        return abandoned

    # ------------------------------------------------------------ results

    def _accept(self, result: RemoteResult) -> Event | None:
        item = self._dispatched.get(result.run_token)
        if item is None:
            self._discard(result, "no longer awaited (given up, or a previous daemon's)")
            return None
        task = item.task
        if not result.files_within(Path(task.dest_dir)):
            self._discard(result, "names files outside its output folder")
            return None
        del self._dispatched[result.run_token]
        seen = self._seen.get(item.worker)
        if seen is not None and seen.beat.run_token in (None, result.run_token):
            # It reported this run, so it is done with it: free for the next dispatch now,
            # not only once its next heartbeat has been read (a poll later).
            seen.beat = replace(seen.beat, run_token=None, job=None)
        if result.status == "refused" and seen is not None:
            seen.refused = True
        if result.status in ("refused", "released"):
            log.warning(
                "%s run=%s worker=%s: %s",
                result.status,
                task.run_token,
                result.worker,
                result.error,
            )
            return Returned(task, f"{result.worker}: {result.error}")
        return Outcome(
            task,
            result.status,
            error=result.error,
            error_type=result.error_type,
            retryable=result.retryable,
            files=result.files,
            stages=result.stages,
            seconds=result.seconds,
            device=result.device,
            worker=result.worker,
            credentials=result.credentials,
        )

    def _discard(self, result: RemoteResult, why: str) -> None:
        """A late or foreign result: its temporary files go, nothing is published."""
        inside = all(item.temp.is_relative_to(self.output_root) for item in result.files)
        if inside and result.files_within(result.files[0].temp.parent if result.files else Path()):
            remove_written(result.files)
        log.warning("discarded result run=%s worker=%s: %s", result.run_token, result.worker, why)

    # ------------------------------------------------------------ liveness

    def _look(self) -> bool:
        """Read every worker's heartbeat; False when the broker cannot be read."""
        try:
            beats = self.broker.beats()
        except BrokerError as exc:
            self._blinded(exc)
            return False
        now = self._mono()
        if self._blind:
            # Silence while we could not look is no evidence: every worker starts a new term.
            log.info("broker reachable again")
            for seen in self._seen.values():
                seen.changed_at = now
            self._blind = False
        for name, beat in beats.items():
            seen = self._seen.get(name)
            if seen is None or seen.beat.pid != beat.pid:  # a new worker, or restarted
                self._seen[name] = _Seen(beat, now, self._clock(), self._clock())
            elif seen.beat.seq != beat.seq:
                seen.beat, seen.changed_at, seen.heard_at = beat, now, self._clock()
                seen.confirmed = True
            for item in self._dispatched.values():
                if item.worker == name and beat.run_token == item.task.run_token:
                    item.taken = True
        for name in set(self._seen) - set(beats):  # stopped cleanly: it removed its beat
            self._seen[name].changed_at = float("-inf")
        return True

    def _blinded(self, exc: BrokerError) -> None:
        if not self._blind:
            log.warning("broker unreachable: %s", exc)
        self._blind = True

    def _alive(self, name: str) -> bool:
        seen = self._seen.get(name)
        return seen is not None and self._mono() - seen.changed_at < self.cluster.worker_timeout

    def _candidates(self) -> list[str]:
        waiting = {item.worker for item in self._dispatched.values()}
        return [
            name
            for name, seen in self._seen.items()
            if self._alive(name)
            and seen.confirmed
            and seen.beat.run_token is None
            and name not in waiting
            and self.recipe.sha256 not in seen.beat.refusing
            and not seen.refused
        ]

    def _jobs_done(self, name: str) -> int:
        return self._seen[name].beat.done

    def _judge(self) -> list[Event]:
        """Give up the runs no live worker holds any more; each is revoked first."""
        events: list[Event] = []
        for token, item in list(self._dispatched.items()):
            name, seen = item.worker, self._seen.get(item.worker)
            try:
                if not self._alive(name):
                    _, holder = self.broker.revoke(token)
                    event = self._lost(
                        item,
                        holder,
                        f"cluster worker {name} stopped sending "
                        f"heartbeats ({self.cluster.worker_timeout:g} s)",
                    )
                elif seen is not None and seen.beat.run_token == token:
                    continue
                elif item.taken:
                    self.broker.revoke(token)
                    event = Returned(
                        item.task,
                        f"{name} finished but its result never came "
                        "(lost with a restarted broker?)",
                    )
                elif self._mono() - item.sent_at < self.cluster.pickup_seconds:
                    continue
                else:
                    revoked, holder = self.broker.revoke(token, unless_taken=True)
                    if not revoked:
                        item.taken = holder not in (None, REVOKED)
                        continue
                    event = Returned(
                        item.task,
                        f"{name} did not take it within "
                        f"{self.cluster.pickup_seconds:g} s (message lost?)",
                    )
            except BrokerError as exc:
                self._blinded(exc)
                break
            del self._dispatched[token]
            events.append(event)
        return events

    def _lost(self, item: _Dispatched, holder: str | None, reason: str) -> Event:
        if holder in (None, REVOKED) and not item.taken:
            return Returned(item.task, reason)
        log.error("lost run=%s path=%s: %s", item.task.run_token, item.task.stem, reason)
        return WorkerDied(item.task, None, reason=reason, backoff=False)

    # ------------------------------------------------------------ the registry

    def _record(self) -> None:
        """The workers' state into the registry, at most once a second."""
        if self._mono() - self._recorded_at < 1.0 or not self._seen:
            return
        self._recorded_at = self._mono()
        records = []
        for name, seen in self._seen.items():
            beat = seen.beat
            if not self._alive(name):
                state = "gone"
            elif self.recipe.sha256 in beat.refusing:
                state = "refusing"
            else:
                state = "busy" if beat.run_token else "idle"
            records.append(
                WorkerRecord(
                    name=name,
                    ident=beat.ident,
                    host=beat.host,
                    device=beat.device,
                    state=state,
                    job=beat.job if state == "busy" else None,
                    last_heartbeat_at=seen.heard_at,
                    jobs_done=beat.done,
                    duplicates_dropped=beat.duplicates,
                    error=beat.refusing.get(self.recipe.sha256) or beat.error,
                    first_seen_at=seen.first_seen_at,
                )
            )
        self.registry.record(records)
