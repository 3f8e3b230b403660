"""The queue itself: jobs over the store's connection, queued -> running (lease + heartbeat)
-> done | failed (retried with exponential backoff) | quarantined (with a reason) |
superseded, and the publication plan a job carries while its outputs are linked into place."""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Literal

from daemon.queue.holders import UNKNOWN, ProcessId, process_alive
from daemon.store import (
    Clock,
    Store,
    db_path,
    from_timestamp,
    path_from_db,
    timestamp,
)

__all__ = [
    "ACTIVE_STATES",
    "QUARANTINED",
    "STATES",
    "Coverage",
    "Enqueued",
    "Job",
    "JobQueue",
    "LeaseLostError",
    "QueueError",
]

State = Literal["queued", "running", "done", "failed", "quarantined", "superseded"]
STATES: tuple[State, ...] = ("queued", "running", "done", "failed", "quarantined", "superseded")
ACTIVE_STATES: tuple[State, ...] = ("queued", "running", "failed")  # still to be done
_ACTIVE_SQL = "('queued', 'running', 'failed')"
_RETRYABLE = ("failed", "quarantined")
QUARANTINED = "quarantined"  # the kind of the event recorded at each quarantine


class QueueError(Exception):
    """Base class for every error the queue raises on purpose."""


class LeaseLostError(QueueError):
    """The job is no longer running under this lease (reclaimed after the lease expired or
    its owner was presumed dead): whatever the holder produced must be thrown away."""

    def __init__(self, job: Job) -> None:
        self.job = job
        super().__init__(
            f"job {job.id} ({job.path}): lease {job.lease_id} of {job.lease_owner} was lost"
        )


@dataclass(frozen=True)
class Job:
    id: int
    path: str
    source_sha256: str
    recipe_sha256: str
    state: State
    force: bool
    attempts: int  # times claimed; never decreases
    failures: int  # failed attempts (errors, worker deaths); reset by a release from quarantine
    worker_deaths: int
    lease_id: str | None
    lease_owner: str | None
    lease_process: str | None
    lease_expires_at: datetime | None
    heartbeat_at: datetime | None
    next_attempt_at: datetime
    last_error: str | None
    quarantine_reason: str | None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Job:
        return cls(
            id=row["id"],
            path=path_from_db(row["path"]),
            source_sha256=row["source_sha256"],
            recipe_sha256=row["recipe_sha256"],
            state=row["state"],
            force=bool(row["force"]),
            attempts=row["attempts"],
            failures=row["failures"],
            worker_deaths=row["worker_deaths"],
            lease_id=row["lease_id"],
            lease_owner=row["lease_owner"],
            lease_process=row["lease_process"],
            lease_expires_at=from_timestamp(row["lease_expires_at"]),
            heartbeat_at=from_timestamp(row["heartbeat_at"]),
            next_attempt_at=datetime.fromisoformat(row["next_attempt_at"]),
            last_error=row["last_error"],
            quarantine_reason=row["quarantine_reason"],
            created_at=datetime.fromisoformat(row["created_at"]),
            updated_at=datetime.fromisoformat(row["updated_at"]),
            finished_at=from_timestamp(row["finished_at"]),
        )


@dataclass(frozen=True)
class Enqueued:
    """What enqueue did. `created` is False when nothing new is to be done: `job` is then the
    job already covering these bytes and recipe (`reason` says how: "active" for the same
    path, "done" or "quarantined" for the same bytes under any name, whose run the caller
    links the new name to). `superseded`: jobs at this path, for other bytes or another
    recipe, that the new job replaced."""

    job: Job
    created: bool
    reason: Literal["new", "active", "done", "quarantined"]
    superseded: tuple[Job, ...] = ()


@dataclass(frozen=True)
class Coverage:
    """What the queue holds for one recipe, as `enqueue` (without force) judges it: bytes at a
    path with a job still to be done, and bytes done or quarantined under any name."""

    active: frozenset[tuple[str, str]]  # (path, source_sha256)
    finished: frozenset[str]  # source_sha256

    def covers(self, path: str, source_sha256: str) -> bool:
        """True when enqueueing these bytes at `path` would queue nothing new."""
        return (path, source_sha256) in self.active or source_sha256 in self.finished


class JobQueue:
    """Jobs over a Store's connection; every change is one transaction, nested into the
    caller's `store.transaction()` when there is one.

    Leases and clocks: a lease records its holder (ProcessId) and two deadlines, one on the
    wall clock and one on the system-wide monotonic clock of the holder's boot. From the same
    host and boot, a lease is reclaimed when its holder process is gone (at once, whatever
    the clocks say) or when the monotonic deadline passes (a hung holder), so a wall clock
    jumping forward never steals a live worker's job and one jumping back never keeps a dead
    one's. Only a lease from another host or boot falls back to the wall clock; another boot
    means the holder is gone.
    """

    def __init__(
        self,
        store: Store,
        *,
        lease_seconds: float = 120.0,
        max_attempts: int = 5,
        max_worker_deaths: int = 3,
        backoff_base: float = 30.0,
        backoff_max: float = 3600.0,
        clock: Clock | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        process: ProcessId | None = None,
        alive: Callable[[ProcessId], bool] = process_alive,
    ) -> None:
        for name, value in (
            ("lease_seconds", lease_seconds),
            ("max_attempts", max_attempts),
            ("max_worker_deaths", max_worker_deaths),
            ("backoff_base", backoff_base),
            ("backoff_max", backoff_max),
        ):
            if value <= 0:
                raise ValueError(f"{name}: must be > 0, got {value}")
        self.store = store
        self.lease_seconds = lease_seconds
        self.max_attempts = max_attempts
        self.max_worker_deaths = max_worker_deaths
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._clock = clock or store.clock
        self._monotonic = monotonic
        self._process = process
        self._alive = alive

    # ------------------------------------------------------------ adding work

    def enqueue(
        self, path: str, source_sha256: str, recipe_sha256: str, *, force: bool = False
    ) -> Enqueued:
        """Queue processing of these bytes at `path` under this recipe, unless it is already
        queued or running for this path, or (without `force`) these bytes were already done
        or quarantined under this recipe under any name. A new job supersedes every job at
        the same path that waits or is quarantined: those bytes or that recipe are gone."""
        with self.store.transaction():
            key = (source_sha256, recipe_sha256)
            same = self._one(
                f"path = ? AND source_sha256 = ? AND recipe_sha256 = ? AND state IN {_ACTIVE_SQL}",
                (db_path(path), *key),
            )
            if same is not None:
                return Enqueued(same, False, "active")
            if not force:
                for state in ("done", "quarantined"):
                    earlier = self._one(
                        "source_sha256 = ? AND recipe_sha256 = ? AND state = ? "
                        "ORDER BY id DESC LIMIT 1",
                        (*key, state),
                    )
                    if earlier is not None:
                        return Enqueued(earlier, False, state)
            superseded = self._supersede_path(path)
            now = self._now()
            job_id = self.store.conn.execute(
                "INSERT INTO jobs (path, source_sha256, recipe_sha256, state, force, "
                "next_attempt_at, created_at, updated_at) VALUES (?, ?, ?, 'queued', ?, ?, ?, ?)",
                (db_path(path), *key, int(force), now, now, now),
            ).lastrowid
            return Enqueued(self.get(job_id), True, "new", superseded)

    def _supersede_path(self, path: str) -> tuple[Job, ...]:
        # Only the latest bytes and recipe at a path matter; running jobs finish (or are
        # discarded when their worker sees the change).
        now = self._now()
        rows = self.store.db.query(
            "UPDATE jobs SET state = 'superseded', updated_at = ?, finished_at = ?, "
            "last_error = 'a newer job for this path replaced it' "
            "WHERE path = ? AND state IN ('queued', 'failed', 'quarantined') RETURNING *",
            (now, now, db_path(path)),
        )
        return tuple(sorted((Job.from_row(row) for row in rows), key=lambda job: job.id))

    # ------------------------------------------------------------ working

    def claim(self, owner: str) -> Job | None:
        """Lease the job that has been due longest (queued, or failed and past its backoff),
        or None. Exclusive across connections and processes: BEGIN IMMEDIATE serialises
        claims and the update re-checks the state.

        A job due further ahead than any delay the queue sets (`backoff_max`) was scheduled
        by a wall clock that has since been stepped back (a machine booted with a fast clock,
        then corrected): it is due now, rather than waiting for the clock to catch up."""
        process = str(self._process or ProcessId.current())
        now = self._clock()
        with self.store.transaction():
            rows = list(
                self.store.db.query(
                    "UPDATE jobs SET state = 'running', attempts = attempts + 1, "
                    "lease_id = ?, lease_owner = ?, lease_process = ?, lease_expires_at = ?, "
                    "lease_expires_mono = ?, heartbeat_at = ?, updated_at = ? "
                    "WHERE id = (SELECT id FROM jobs WHERE state IN ('queued', 'failed') "
                    "AND (next_attempt_at <= ? OR next_attempt_at > ?) "
                    "ORDER BY next_attempt_at, id LIMIT 1) "
                    "AND state IN ('queued', 'failed') RETURNING *",
                    (
                        secrets.token_hex(8),
                        owner,
                        process,
                        timestamp(now + timedelta(seconds=self.lease_seconds)),
                        self._monotonic() + self.lease_seconds,
                        timestamp(now),
                        timestamp(now),
                        timestamp(now),
                        timestamp(now + timedelta(seconds=self.backoff_max + 1)),
                    ),
                )
            )
        return Job.from_row(rows[0]) if rows else None

    def heartbeat(self, job: Job) -> Job:
        """Extend the lease; LeaseLostError if it was taken away."""
        now = self._clock()
        with self.store.transaction():
            self._leased(job)
            return self._set(
                job,
                lease_expires_at=timestamp(now + timedelta(seconds=self.lease_seconds)),
                lease_expires_mono=self._monotonic() + self.lease_seconds,
                heartbeat_at=timestamp(now),
            )

    def complete(self, job: Job) -> Job:
        with self.store.transaction():
            self._leased(job)
            return self._set(job, state="done", **_NO_LEASE, finished_at=self._now())

    def release(self, job: Job) -> Job:
        """Give the job back untouched (shutting down): due again at once, no failure."""
        with self.store.transaction():
            self._leased(job)
            return self._set(job, state="queued", **_NO_LEASE, next_attempt_at=self._now())

    def fail(self, job: Job, error: str, *, retryable: bool = True) -> Job:
        """Record a failed attempt: retried after an exponential backoff, or quarantined once
        it has failed `max_attempts` times, or at once when not retryable."""
        with self.store.transaction():
            current = self._leased(job)
            failures = current.failures + 1
            if not retryable:
                return self._quarantine(job, failures, current.worker_deaths, error, error)
            if failures >= self.max_attempts:
                reason = f"failed {failures} times; last error: {error}"
                return self._quarantine(job, failures, current.worker_deaths, error, reason)
            return self._backoff(job, failures, current.worker_deaths, error)

    def worker_died(self, job: Job, reason: str, *, backoff: bool = True) -> Job:
        """The worker process running the job died (decoder crash, out-of-memory kill): a
        failed attempt, and `max_worker_deaths` of them quarantine the file. `backoff` False:
        due again at once (a remote worker's lease already waited out its silence)."""
        with self.store.transaction():
            return self._death(self._leased(job), reason, backoff=backoff)

    def discard(
        self, job: Job, reason: str, *, current_sha256: str | None, delay_seconds: float = 0.0
    ) -> Job:
        """The source changed while the job ran: nothing it made counts and it is not a
        failure. The job is retried after `delay_seconds` for the bytes now at the path, or
        superseded when the path is empty (None) or another job already covers those bytes."""
        with self.store.transaction():
            current = self._leased(job)
            other = current_sha256 is not None and self._one(
                f"id != ? AND path = ? AND source_sha256 = ? AND recipe_sha256 = ? "
                f"AND state IN {_ACTIVE_SQL}",
                (job.id, db_path(job.path), current_sha256, job.recipe_sha256),
            )
            if current_sha256 is None or other:
                now = self._now()
                return self._set(
                    job, state="superseded", **_NO_LEASE, last_error=reason, finished_at=now
                )
            due = self._clock() + timedelta(seconds=delay_seconds)
            return self._set(
                current,
                state="queued",
                **_NO_LEASE,
                source_sha256=current_sha256,
                last_error=reason,
                next_attempt_at=timestamp(due),
            )

    def requeue_expired(self, *, penalise: bool = True) -> list[Job]:
        """Crash recovery, at start-up and periodically: reclaim every lease whose holder is
        gone or whose lease expired (see the class docstring). Each counts as a worker death,
        since a file that takes the whole daemon down must end in quarantine too, unless
        `penalise` is False: a daemon whose workers hold the image work knows its own crash
        was not the file's doing, and queues the job again at once. Returns the reclaimed
        jobs in their new state; the caller removes their temporary files."""
        here = ProcessId.current()
        now, mono = self._clock(), self._monotonic()
        reclaimed = []
        with self.store.transaction():
            for job, expires_mono in self._running():
                reason = self._abandoned(job, expires_mono, here, now, mono)
                if reason is None:
                    continue
                why = f"{job.lease_owner}: {reason}"
                if penalise:
                    reclaimed.append(self._death(job, why))
                else:
                    reclaimed.append(
                        self._set(
                            job,
                            state="queued",
                            **_NO_LEASE,
                            last_error=why,
                            next_attempt_at=self._now(),
                        )
                    )
        return reclaimed

    def _abandoned(
        self, job: Job, expires_mono: float, here: ProcessId, now: datetime, mono: float
    ) -> str | None:
        holder = ProcessId.parse(job.lease_process or "")
        if holder.host != here.host or UNKNOWN in (holder.boot, here.boot):
            expires = job.lease_expires_at
            return "lease expired" if expires is not None and now >= expires else None
        if holder.boot != here.boot:
            return "the machine restarted since the lease was taken"
        if not self._alive(holder):
            return f"lease holder (pid {holder.pid}) is gone"
        if mono >= expires_mono:
            return "lease expired without a heartbeat"
        return None

    # ------------------------------------------------------------ the CLI's requests

    def retry(self, path: str | None = None, *, all_failed: bool = False) -> list[Job]:
        """`scanrestore retry PATH`: the path's failed jobs due now and its quarantined ones
        released (failure counts reset). `--all-failed`: every failed job due now (quarantined
        ones need a look at the file, and a retry by path)."""
        if (path is None) == (not all_failed):
            raise ValueError("retry: give either a path or all_failed=True")
        now = self._now()
        with self.store.transaction():
            if all_failed:
                rows = self.store.db.query(
                    "UPDATE jobs SET next_attempt_at = ?, updated_at = ? "
                    "WHERE state = 'failed' RETURNING *",
                    (now, now),
                )
                return sorted((Job.from_row(row) for row in rows), key=lambda job: job.id)
            # Newest first, so of two quarantines of the same bytes the latest is released.
            jobs = reversed(self.jobs_for(path))
            retried = [self._retry_job(job, now) for job in jobs if job.state in _RETRYABLE]
            return sorted(retried, key=lambda job: job.id)

    def _retry_job(self, job: Job, now: str) -> Job:
        if job.state == "failed":
            return self._set(job, next_attempt_at=now)
        covered = self._one(
            f"path = ? AND source_sha256 = ? AND recipe_sha256 = ? AND state IN {_ACTIVE_SQL}",
            (db_path(job.path), job.source_sha256, job.recipe_sha256),
        )
        if covered is not None:  # released an earlier quarantine of the same key, or queued
            return self._set(job, state="superseded", finished_at=now)
        return self._set(
            job,
            state="queued",
            failures=0,
            worker_deaths=0,
            quarantine_reason=None,
            next_attempt_at=now,
            finished_at=None,
        )

    def get(self, job_id: int) -> Job:
        job = self._one("id = ?", (job_id,))
        if job is None:
            raise KeyError(f"no job {job_id}")
        return job

    def jobs_for(self, path: str) -> list[Job]:
        return self._many("path = ? ORDER BY id", (db_path(path),))

    def coverage(self, recipe_sha256: str) -> Coverage:
        """Everything this recipe's jobs already cover, read in one pass (for a restart)."""
        rows = self.store.conn.execute(
            "SELECT path, source_sha256, state FROM jobs WHERE recipe_sha256 = ? "
            "AND state IN ('queued', 'running', 'failed', 'done', 'quarantined')",
            (recipe_sha256,),
        ).fetchall()
        return Coverage(
            frozenset((path_from_db(p), sha) for p, sha, state in rows if state in ACTIVE_STATES),
            frozenset(sha for _, sha, state in rows if state in ("done", "quarantined")),
        )

    def counts(self) -> dict[State, int]:
        """Jobs per state, every state present."""
        counts = dict.fromkeys(STATES, 0)
        for state, count in self.store.conn.execute(
            "SELECT state, count(*) FROM jobs GROUP BY state"
        ):
            counts[state] = count
        return counts

    def current(self) -> list[Job]:
        """The running jobs, longest running first."""
        return self._many("state = 'running' ORDER BY updated_at, id", ())

    def recent_failures(self, limit: int = 10) -> list[Job]:
        """Failed and quarantined jobs, latest first."""
        return self._many(
            "state IN ('failed', 'quarantined') ORDER BY updated_at DESC, id DESC LIMIT ?",
            (limit,),
        )

    def quarantined(self) -> list[Job]:
        return self._many("state = 'quarantined' ORDER BY updated_at, id", ())

    def next_due_at(self) -> datetime | None:
        """When the next waiting job becomes due (a worker sleeps until then)."""
        row = self.store.conn.execute(
            "SELECT min(next_attempt_at) FROM jobs WHERE state IN ('queued', 'failed')"
        ).fetchone()
        return from_timestamp(row[0])

    # ------------------------------------------------------------ publication plans
    # A job's publication plan (daemon.publish.Plan, as its JSON text) is recorded before its
    # files are linked into place and cleared when the run is recorded, so a restart finds
    # every publication a crash interrupted.

    def record_plan(self, job: Job, plan_json: str) -> Job:
        """Extend the lease and record the plan, in one transaction; LeaseLostError if the
        lease was taken away (nothing is recorded then)."""
        with self.store.transaction():
            job = self.heartbeat(job)
            self.store.conn.execute(
                "UPDATE jobs SET publishing = ? WHERE id = ?", (plan_json, job.id)
            )
        return job

    def clear_plan(self, job: Job) -> None:
        """Forget the job's plan: its run was recorded, or its files were removed again."""
        with self.store.transaction():
            self.store.conn.execute("UPDATE jobs SET publishing = NULL WHERE id = ?", (job.id,))

    def pending_plans(self) -> list[tuple[Job, str]]:
        """Running jobs with a recorded plan (their publication was cut short), by id."""
        rows = self.store.db.query(
            "SELECT * FROM jobs WHERE publishing IS NOT NULL AND state = 'running' ORDER BY id"
        )
        return [(Job.from_row(row), row["publishing"]) for row in rows]

    # ------------------------------------------------------------ internals

    def _now(self) -> str:
        return timestamp(self._clock())

    def _one(self, where: str, params: tuple[Any, ...]) -> Job | None:
        jobs = self._many(where, params)
        return jobs[0] if jobs else None

    def _many(self, where: str, params: tuple[Any, ...]) -> list[Job]:
        return [
            Job.from_row(row)
            for row in self.store.db.query(f"SELECT * FROM jobs WHERE {where}", params)
        ]

    def _running(self) -> list[tuple[Job, float]]:
        rows = self.store.db.query("SELECT * FROM jobs WHERE state = 'running' ORDER BY id")
        return [(Job.from_row(row), row["lease_expires_mono"]) for row in rows]

    def _leased(self, job: Job) -> Job:
        """The job's current row, if `job`'s lease still holds it; else LeaseLostError."""
        current = self._one("id = ? AND state = 'running' AND lease_id = ?", (job.id, job.lease_id))
        if current is None:
            raise LeaseLostError(job)
        return current

    def _set(self, job: Job, **values: Any) -> Job:
        values["updated_at"] = self._now()
        columns = ", ".join(f"{name} = ?" for name in values)
        rows = list(
            self.store.db.query(
                f"UPDATE jobs SET {columns} WHERE id = ? RETURNING *", (*values.values(), job.id)
            )
        )
        return Job.from_row(rows[0])

    def _backoff(self, job: Job, failures: int, deaths: int, error: str) -> Job:
        delay = min(self.backoff_max, self.backoff_base * 2 ** (failures - 1))
        return self._set(
            job,
            state="failed",
            **_NO_LEASE,
            failures=failures,
            worker_deaths=deaths,
            last_error=error,
            next_attempt_at=timestamp(self._clock() + timedelta(seconds=delay)),
        )

    def _quarantine(self, job: Job, failures: int, deaths: int, error: str, reason: str) -> Job:
        # The job row changes again on a retry; the event stays (what the quarantine counter
        # of /metrics counts), in the same transaction as the state change.
        self.store.record_event(
            QUARANTINED,
            path=job.path,
            source_sha256=job.source_sha256,
            detail={"job": job.id, "reason": reason},
        )
        return self._set(
            job,
            state="quarantined",
            **_NO_LEASE,
            failures=failures,
            worker_deaths=deaths,
            last_error=error,
            quarantine_reason=reason,
            finished_at=self._now(),
        )

    def _death(self, current: Job, reason: str, *, backoff: bool = True) -> Job:
        failures, deaths = current.failures + 1, current.worker_deaths + 1
        if deaths >= self.max_worker_deaths:
            why = f"killed its worker {deaths} times; last: {reason}"
            return self._quarantine(current, failures, deaths, reason, why)
        if failures >= self.max_attempts:
            why = f"failed {failures} times; last error: {reason}"
            return self._quarantine(current, failures, deaths, reason, why)
        if not backoff:
            return self._set(
                current,
                state="failed",
                **_NO_LEASE,
                failures=failures,
                worker_deaths=deaths,
                last_error=reason,
                next_attempt_at=self._now(),
            )
        return self._backoff(current, failures, deaths, reason)


_NO_LEASE: dict[str, None] = dict.fromkeys(
    ("lease_id", "lease_owner", "lease_process", "lease_expires_at", "lease_expires_mono")
)
