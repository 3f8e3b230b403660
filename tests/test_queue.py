"""The durable job queue: dedupe, exclusive claims, leases across crashes and clock jumps,
backoff, quarantine, retry; and a state machine over all of it with restarts."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from daemon.queue import ACTIVE_STATES, STATES, JobQueue, LeaseLostError, ProcessId
from daemon.store import open_database, timestamp

REPO = Path(__file__).resolve().parents[1]
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
SHA_A, SHA_B, SHA_C = ("a" * 64, "b" * 64, "c" * 64)
R1, R2 = ("1" * 64, "2" * 64)


class FakeClock:
    """A wall clock and a monotonic clock that tests move: together, or the wall alone."""

    def __init__(self) -> None:
        self.wall = T0
        self.mono = 1000.0

    def now(self) -> datetime:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += timedelta(seconds=seconds)
        self.mono += seconds


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "scanrestore.db"


def make_queue(store, clock, **options) -> JobQueue:
    defaults = dict(
        lease_seconds=60.0, max_attempts=4, max_worker_deaths=2, backoff_base=10.0,
        backoff_max=35.0, clock=clock.now, monotonic=clock.monotonic,
    )  # fmt: skip
    return JobQueue(store, **{**defaults, **options})


@pytest.fixture
def store(db_path, clock):
    with open_database(db_path, clock=clock.now) as store:
        yield store


@pytest.fixture
def queue(store, clock):
    return make_queue(store, clock)


# ---------------------------------------------------------------- identity and dedupe


def test_the_same_bytes_under_another_name_make_no_new_job_once_done(queue):
    first = queue.enqueue("a.tif", SHA_A, R1)
    queue.complete(queue.claim("w"))
    duplicate = queue.enqueue("copy of a.tif", SHA_A, R1)
    assert first.created and not duplicate.created
    assert (duplicate.reason, duplicate.job.id, duplicate.job.path) == (
        "done",
        first.job.id,
        "a.tif",
    )
    assert queue.counts()["queued"] == 0


def test_a_path_already_queued_or_running_for_these_bytes_makes_no_new_job(queue):
    first = queue.enqueue("a.tif", SHA_A, R1)
    again = queue.enqueue("a.tif", SHA_A, R1)
    queue.claim("w")
    while_running = queue.enqueue("a.tif", SHA_A, R1, force=True)
    assert [again.reason, while_running.reason] == ["active", "active"]
    assert again.job.id == while_running.job.id == first.job.id
    assert not again.created and not while_running.created


def test_a_changed_recipe_makes_a_new_job(queue):
    queue.enqueue("a.tif", SHA_A, R1)
    queue.complete(queue.claim("w"))
    changed = queue.enqueue("a.tif", SHA_A, R2)
    assert changed.created and changed.job.recipe_sha256 == R2


def test_force_makes_a_new_job_for_bytes_already_done(queue):
    queue.enqueue("a.tif", SHA_A, R1)
    done = queue.complete(queue.claim("w"))
    forced = queue.enqueue("a.tif", SHA_A, R1, force=True)
    assert forced.created and forced.job.force and forced.job.id != done.id
    assert queue.claim("w").id == forced.job.id


def test_bytes_quarantined_under_any_name_are_not_queued_again_without_force(queue):
    queue.enqueue("a.tif", SHA_A, R1)
    queue.fail(queue.claim("w"), "decoder crash", retryable=False)
    again = queue.enqueue("renamed.tif", SHA_A, R1)
    assert (again.created, again.reason, again.job.path) == (False, "quarantined", "a.tif")
    assert queue.enqueue("renamed.tif", SHA_A, R1, force=True).created


def test_a_new_job_for_a_path_supersedes_its_waiting_jobs_but_not_a_running_one(queue):
    old = queue.enqueue("a.tif", SHA_A, R1).job
    running = queue.claim("w")
    waiting = queue.enqueue("a.tif", SHA_B, R1).job
    newest = queue.enqueue("a.tif", SHA_C, R1)
    assert [job.id for job in newest.superseded] == [waiting.id]
    assert queue.get(waiting.id).state == "superseded"
    assert queue.get(old.id).state == "running" and running.id == old.id


def test_a_bytes_job_running_under_one_name_does_not_hide_another_name(queue):
    # A file renamed while queued: the new name gets its own job, so nothing is lost when
    # the old name's job finds its file gone.
    queue.enqueue("old name.tif", SHA_A, R1)
    renamed = queue.enqueue("new name.tif", SHA_A, R1)
    assert renamed.created


# ---------------------------------------------------------------- claiming and leases


def test_claim_leases_the_longest_due_job_and_counts_the_attempt(queue, clock):
    first = queue.enqueue("a.tif", SHA_A, R1).job
    clock.advance(1)
    queue.enqueue("b.tif", SHA_B, R1)
    job = queue.claim("worker-1")
    assert (job.id, job.state, job.attempts, job.lease_owner) == (
        first.id,
        "running",
        1,
        "worker-1",
    )
    assert job.lease_expires_at == clock.now() + timedelta(seconds=60)
    assert ProcessId.parse(job.lease_process) == ProcessId.current()
    assert queue.claim("worker-2").path == "b.tif"
    assert queue.claim("worker-3") is None


def test_claims_are_exclusive_across_connections_in_threads(db_path):
    with open_database(db_path) as store:
        queue = JobQueue(store)
        for index in range(40):
            queue.enqueue(f"{index}.tif", f"{index:064x}", R1)
    claimed: list[list[int]] = [[] for _ in range(4)]

    def work(mine: list[int]) -> None:
        with open_database(db_path) as own:
            own_queue = JobQueue(own)
            while (job := own_queue.claim(threading.current_thread().name)) is not None:
                mine.append(job.id)
                own_queue.complete(job)

    threads = [threading.Thread(target=work, args=(ids,)) for ids in claimed]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    everything = [job_id for ids in claimed for job_id in ids]
    assert sorted(everything) == list(range(1, 41))  # each once: none twice, none lost


CLAIMER = """
import sys, time
from pathlib import Path
from daemon.queue import JobQueue
from daemon.store import open_database
store = open_database(sys.argv[1])
queue = JobQueue(store)
Path(sys.argv[2] + "." + sys.argv[3]).touch()  # ready
while not Path(sys.argv[2]).exists():
    time.sleep(0.001)
while (job := queue.claim(sys.argv[3])) is not None:
    print(job.id, flush=True)
    queue.complete(job)
"""


def test_claims_are_exclusive_across_processes(db_path, tmp_path):
    with open_database(db_path) as store:
        queue = JobQueue(store)
        for index in range(60):
            queue.enqueue(f"{index}.tif", f"{index:064x}", R1)
    go = tmp_path / "go"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", CLAIMER, str(db_path), str(go), f"p{n}"],
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        for n in range(3)
    ]
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("go.p*"))) < len(workers) and time.monotonic() < deadline:
        time.sleep(0.01)  # all at the starting line, so their claims contend
    go.touch()
    outputs = [worker.communicate(timeout=120)[0] for worker in workers]
    assert all(worker.returncode == 0 for worker in workers)
    ids = [int(line) for out in outputs for line in out.split()]
    assert sorted(ids) == list(range(1, 61))


def test_a_heartbeat_keeps_a_lease_that_would_otherwise_expire(queue, clock):
    queue.enqueue("beating.tif", SHA_A, R1)
    queue.enqueue("silent.tif", SHA_B, R1)
    beating, silent = queue.claim("w1"), queue.claim("w2")
    clock.advance(50)
    beating = queue.heartbeat(beating)
    assert beating.lease_expires_at == clock.now() + timedelta(seconds=60)
    assert beating.heartbeat_at == clock.now()
    clock.advance(20)  # 70 s since the claim, 20 s since the heartbeat
    reclaimed = queue.requeue_expired()
    assert [job.id for job in reclaimed] == [silent.id]
    assert queue.complete(beating).state == "done"
    with pytest.raises(LeaseLostError, match=f"job {silent.id} \\(silent.tif\\)"):
        queue.heartbeat(silent)


def test_a_lease_left_by_a_crash_goes_back_to_the_queue_once_it_expires(db_path, clock):
    with open_database(db_path, clock=clock.now) as store:
        queue = make_queue(store, clock)
        queue.enqueue("a.tif", SHA_A, R1)
        abandoned = queue.claim("w")
    # The connection closed without completing: a crash. Reopen the file, as a restart does.
    with open_database(db_path, clock=clock.now) as store:
        queue = make_queue(store, clock)
        assert queue.requeue_expired() == []  # the lease still runs
        clock.advance(61)
        (job,) = queue.requeue_expired()
        assert (job.id, job.state, job.failures, job.worker_deaths) == (
            abandoned.id,
            "failed",
            1,
            1,
        )
        assert "lease expired without a heartbeat" in job.last_error
        assert job.next_attempt_at == clock.now() + timedelta(seconds=10)
        with pytest.raises(LeaseLostError):
            queue.complete(abandoned)
        clock.advance(10)
        assert queue.claim("w").attempts == 2


CRASHER = """
import os, sys
from daemon.queue import JobQueue
from daemon.store import open_database
job = JobQueue(open_database(sys.argv[1]), lease_seconds=3600).claim("doomed")
print(job.id, flush=True)
os._exit(9)  # no complete, no fail, no close: the process is simply gone
"""


def test_a_lease_whose_process_is_gone_is_reclaimed_at_once(db_path):
    with open_database(db_path) as store:
        queue = JobQueue(store)
        queue.enqueue("kills-decoder.tif", SHA_A, R1)
        done = subprocess.run(
            [sys.executable, "-c", CRASHER, str(db_path)],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=120,
        )
        assert done.returncode == 9, done.stderr
        assert queue.current()[0].lease_owner == "doomed"
        (job,) = queue.requeue_expired()  # an hour-long lease, reclaimed without waiting
        assert job.id == int(done.stdout) and job.state == "failed"
        assert "is gone" in job.last_error and job.worker_deaths == 1


def test_a_wall_clock_jump_does_not_take_a_live_workers_lease(queue, clock):
    queue.enqueue("a.tif", SHA_A, R1)
    job = queue.claim("w")
    clock.wall += timedelta(days=1)  # NTP correction or a wrong RTC; no time really passed
    assert queue.requeue_expired() == []
    clock.wall -= timedelta(days=2)  # and back past the claim
    assert queue.complete(job).state == "done"


def test_a_lease_from_another_host_expires_by_the_wall_clock(store, clock):
    elsewhere = ProcessId("other-host", "some-boot", 4242, "777")
    remote = make_queue(store, clock, process=elsewhere)
    remote.enqueue("a.tif", SHA_A, R1)
    job = remote.claim("remote-worker")
    local = make_queue(store, clock)
    clock.wall += timedelta(seconds=59)
    assert local.requeue_expired() == []
    clock.wall += timedelta(seconds=1)
    (reclaimed,) = local.requeue_expired()
    assert reclaimed.id == job.id and "lease expired" in reclaimed.last_error


def test_a_lease_from_an_earlier_boot_is_reclaimed_whatever_the_clocks(store, clock):
    here = ProcessId.current()
    before_reboot = ProcessId(here.host, "an-earlier-boot", here.pid, here.started)
    queue = make_queue(store, clock, process=before_reboot)
    queue.enqueue("a.tif", SHA_A, R1)
    queue.claim("w")
    (job,) = make_queue(store, clock).requeue_expired()
    assert "restarted" in job.last_error


# ---------------------------------------------------------------- failure, backoff, quarantine


def test_failures_back_off_exponentially_up_to_the_cap_and_count_attempts(clock, store):
    queue = make_queue(store, clock, max_attempts=10)
    queue.enqueue("a.tif", SHA_A, R1)
    delays, attempts = [], []
    for _ in range(4):
        job = queue.claim("w")
        attempts.append(job.attempts)
        failed = queue.fail(job, "OSError: share unavailable")
        delays.append((failed.next_attempt_at - clock.now()).total_seconds())
        assert queue.claim("w") is None  # not due before its backoff
        clock.advance(delays[-1])
    assert delays == [10, 20, 35, 35]
    assert attempts == [1, 2, 3, 4]
    assert queue.get(job.id).failures == 4 and queue.get(job.id).last_error.startswith("OSError")


def test_a_job_is_quarantined_after_max_attempts_with_the_reason(queue, clock):
    queue.enqueue("a.tif", SHA_A, R1)
    for attempt in range(1, 5):
        job = queue.fail(queue.claim("w"), f"DecodeError: attempt {attempt}")
        clock.advance(100)
    assert job.state == "quarantined" and job.attempts == 4
    assert job.quarantine_reason == "failed 4 times; last error: DecodeError: attempt 4"
    assert queue.quarantined() == [job]
    assert queue.claim("w") is None


def test_an_error_that_is_not_retryable_quarantines_at_once(queue):
    queue.enqueue("a.tif", SHA_A, R1)
    job = queue.fail(queue.claim("w"), "UnsupportedImageError: CMYK", retryable=False)
    assert (job.state, job.quarantine_reason) == ("quarantined", "UnsupportedImageError: CMYK")


def test_a_file_that_kills_its_worker_n_times_is_quarantined(queue, clock):
    queue.enqueue("bomb.tif", SHA_A, R1)
    first = queue.worker_died(queue.claim("w"), "killed by signal 9 (out of memory)")
    assert (first.state, first.worker_deaths) == ("failed", 1)
    clock.advance(first.failures * 100)
    second = queue.worker_died(queue.claim("w"), "killed by signal 11")
    assert (second.state, second.worker_deaths, second.attempts) == ("quarantined", 2, 2)
    assert second.quarantine_reason == "killed its worker 2 times; last: killed by signal 11"


def test_every_lease_operation_refuses_a_lost_lease(queue, clock):
    queue.enqueue("a.tif", SHA_A, R1)
    stale = queue.claim("w")
    clock.advance(61)
    queue.requeue_expired()
    clock.advance(100)
    fresh = queue.claim("w")
    assert fresh.id == stale.id and fresh.lease_id != stale.lease_id
    for operation in (
        lambda: queue.heartbeat(stale),
        lambda: queue.complete(stale),
        lambda: queue.release(stale),
        lambda: queue.fail(stale, "x"),
        lambda: queue.worker_died(stale, "x"),
        lambda: queue.discard(stale, "x", current_sha256=SHA_B),
    ):
        with pytest.raises(LeaseLostError):
            operation()
    assert queue.get(fresh.id).lease_id == fresh.lease_id


def test_release_gives_a_job_back_without_a_failure(queue):
    queue.enqueue("a.tif", SHA_A, R1)
    released = queue.release(queue.claim("w"))
    assert (released.state, released.failures, released.attempts) == ("queued", 0, 1)
    assert queue.claim("w").attempts == 2


# ---------------------------------------------------------------- a source that changes


def test_a_source_that_changed_during_the_run_is_retried_for_its_new_bytes(queue, clock):
    queue.enqueue("a.tif", SHA_A, R1)
    job = queue.discard(
        queue.claim("w"), "source changed while processing", current_sha256=SHA_B, delay_seconds=30
    )
    assert (job.state, job.source_sha256, job.failures) == ("queued", SHA_B, 0)
    assert job.next_attempt_at == clock.now() + timedelta(seconds=30)
    assert queue.enqueue("a.tif", SHA_B, R1).reason == "active"  # the watcher's late event
    clock.advance(30)
    assert queue.claim("w").source_sha256 == SHA_B


def test_a_discarded_job_whose_file_is_gone_or_already_queued_is_superseded(queue):
    queue.enqueue("gone.tif", SHA_A, R1)
    gone = queue.discard(queue.claim("w"), "source vanished", current_sha256=None)
    queue.enqueue("a.tif", SHA_A, R1)
    running = queue.claim("w")
    queue.enqueue("a.tif", SHA_B, R1)  # the watcher saw the new bytes first
    covered = queue.discard(running, "source changed", current_sha256=SHA_B)
    assert gone.state == covered.state == "superseded"
    assert [job.source_sha256 for job in queue.jobs_for("a.tif") if job.state == "queued"] == [
        SHA_B
    ]


def test_a_file_name_that_is_not_utf8_is_queued_and_found_again(queue):
    latin1 = os.fsdecode(b"\xe9t\xe9 1950.tif")
    queue.enqueue(latin1, SHA_A, R1)
    assert queue.enqueue(latin1, SHA_A, R1).reason == "active"
    job = queue.claim("w")
    assert job.path == latin1
    queued = queue.discard(job, "changed", current_sha256=SHA_B)
    assert queue.jobs_for(latin1) == [queued] and queued.source_sha256 == SHA_B


# ---------------------------------------------------------------- retry and status


def quarantine(queue, path, sha):
    queue.enqueue(path, sha, R1)
    return queue.fail(queue.claim("w"), "bad file", retryable=False)


def test_retry_by_path_releases_its_quarantine_and_makes_its_failures_due(queue, clock):
    held = quarantine(queue, "a.tif", SHA_A)
    other = quarantine(queue, "b.tif", SHA_B)
    (released,) = queue.retry("a.tif")
    assert (released.id, released.state, released.failures) == (held.id, "queued", 0)
    assert released.quarantine_reason is None and released.attempts == 1
    assert queue.get(other.id).state == "quarantined"
    assert queue.claim("w").id == held.id


def test_retry_all_failed_makes_failed_jobs_due_now_but_leaves_quarantine(queue, clock):
    queue.enqueue("a.tif", SHA_A, R1)
    failed = queue.fail(queue.claim("w"), "OSError")
    held = quarantine(queue, "b.tif", SHA_B)
    assert queue.claim("w") is None
    (retried,) = queue.retry(all_failed=True)
    assert retried.id == failed.id and retried.next_attempt_at == clock.now()
    assert queue.claim("w").id == failed.id
    assert queue.get(held.id).state == "quarantined"
    with pytest.raises(ValueError, match="either a path or all_failed"):
        queue.retry("a.tif", all_failed=True)


def test_status_queries_count_every_state_and_list_current_work(queue, clock):
    quarantine(queue, "q.tif", SHA_C)
    queue.enqueue("a.tif", SHA_A, R1)
    queue.enqueue("b.tif", SHA_B, R1)
    running = queue.claim("w1")
    clock.advance(5)
    failed = queue.fail(queue.claim("w2"), "boom")
    assert queue.counts() == {
        "queued": 0, "running": 1, "done": 0, "failed": 1, "quarantined": 1, "superseded": 0,
    }  # fmt: skip
    assert [job.id for job in queue.current()] == [running.id]
    assert [job.path for job in queue.recent_failures()] == ["b.tif", "q.tif"]
    assert queue.next_due_at() == failed.next_attempt_at


# ---------------------------------------------------------------- one transaction with provenance


def record_and_complete(store, job, *, crash: bool) -> None:
    with store.transaction():
        store.record_observation(job.path, job.source_sha256, size=3)
        store.record_run(
            source_sha256=job.source_sha256,
            path=job.path,
            recipe_sha256=job.recipe_sha256,
            status="done",
            started_at=T0,
            finished_at=T0,
            code_version="0.1.0",
            job_id=job.id,
        )
        JobQueue(store).complete(job)
        if crash:
            raise RuntimeError("power cut before commit")


def test_completing_a_job_and_recording_its_run_commit_together_or_not_at_all(queue, store):
    recipe = store.record_recipe({"chain": []})
    queue.enqueue("a.tif", SHA_A, recipe)
    job = queue.claim("w")
    with pytest.raises(RuntimeError):
        record_and_complete(store, job, crash=True)
    assert queue.get(job.id).state == "running" and store.history("a.tif") == []
    record_and_complete(store, job, crash=False)
    assert queue.get(job.id).state == "done" and store.history("a.tif")[0].job_id == job.id


def test_a_run_is_not_recorded_when_the_lease_was_lost_meanwhile(queue, store, clock):
    recipe = store.record_recipe({"chain": []})
    queue.enqueue("a.tif", SHA_A, recipe)
    job = queue.claim("w")
    clock.advance(61)
    queue.requeue_expired()
    with pytest.raises(LeaseLostError):
        record_and_complete(store, job, crash=False)
    assert store.history("a.tif") == []


# ---------------------------------------------------------------- state machine


class QueueMachine(RuleBasedStateMachine):
    """Claims, completions, failures, deaths, discards, releases, heartbeats, retries, clock
    advances, crashes (leases abandoned, then reclaimed) and restarts (the file reopened)."""

    PATHS = ("a.tif", "b.tif", "c.tif")
    SHAS = (SHA_A, SHA_B)

    def __init__(self) -> None:
        super().__init__()
        self.folder = tempfile.TemporaryDirectory()
        self.path = Path(self.folder.name) / "scanrestore.db"
        self.clock = FakeClock()
        self.store = None
        self.open()
        self.ids: set[int] = set()
        self.attempts: dict[int, int] = {}
        self.held: dict[int, object] = {}  # job id -> the Job handle whose lease we hold
        self.stale: list = []  # handles whose lease was taken away

    def open(self) -> None:
        if self.store is not None:
            self.store.close()
        self.store = open_database(self.path, clock=self.clock.now)
        self.queue = make_queue(self.store, self.clock)

    def teardown(self) -> None:
        self.store.close()
        self.folder.cleanup()

    @rule(
        path=st.sampled_from(PATHS),
        sha=st.sampled_from(SHAS),
        recipe=st.sampled_from((R1, R2)),
        force=st.booleans(),
    )
    def enqueue(self, path, sha, recipe, force):
        result = self.queue.enqueue(path, sha, recipe, force=force)
        if result.created:
            assert result.job.id not in self.ids and result.job.state == "queued"
            self.ids.add(result.job.id)
        else:
            assert result.job.id in self.ids
        for job in result.superseded:
            assert job.id not in self.held

    @rule(owner=st.sampled_from(("w1", "w2")))
    def claim(self, owner):
        job = self.queue.claim(owner)
        if job is None:
            due = self.store.conn.execute(
                "SELECT count(*) FROM jobs WHERE state IN ('queued', 'failed') "
                "AND next_attempt_at <= ?",
                (timestamp(self.clock.now()),),
            ).fetchone()[0]
            assert due == 0
        else:
            assert job.id not in self.held  # never two live leases on one job
            self.held[job.id] = job

    def take(self, data):
        job_id = data.draw(st.sampled_from(sorted(self.held)))
        return self.held.pop(job_id)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def complete(self, data):
        assert self.queue.complete(self.take(data)).state == "done"

    @precondition(lambda self: self.held)
    @rule(data=st.data(), retryable=st.booleans())
    def fail(self, data, retryable):
        job = self.queue.fail(self.take(data), "error", retryable=retryable)
        assert job.state == ("failed" if retryable and job.failures < 4 else "quarantined")

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def worker_died(self, data):
        job = self.queue.worker_died(self.take(data), "signal 9")
        assert job.state in ("failed", "quarantined")

    @precondition(lambda self: self.held)
    @rule(data=st.data(), sha=st.sampled_from((*SHAS, None)))
    def discard(self, data, sha):
        job = self.queue.discard(self.take(data), "changed", current_sha256=sha)
        assert job.state in ("queued", "superseded")

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release(self, data):
        assert self.queue.release(self.take(data)).state == "queued"

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def heartbeat(self, data):
        job = self.take(data)
        self.held[job.id] = self.queue.heartbeat(job)

    @precondition(lambda self: self.stale)
    @rule(data=st.data())
    def use_a_lost_lease(self, data):
        stale = data.draw(st.sampled_from(self.stale))
        with pytest.raises(LeaseLostError):
            self.queue.complete(stale)

    @rule(seconds=st.sampled_from((1, 10, 30, 59, 61, 200)))
    def advance(self, seconds):
        self.clock.advance(seconds)

    @rule()
    def requeue_expired(self):
        expired = {i for i, job in self.held.items() if job.lease_expires_at <= self.clock.now()}
        reclaimed = {job.id for job in self.queue.requeue_expired()}
        assert reclaimed == expired
        self.stale.extend(self.held.pop(job_id) for job_id in reclaimed)

    @rule()
    def crash(self):
        """Workers vanish with their leases; the daemon restarts and recovers."""
        self.open()
        self.clock.advance(61)
        self.requeue_expired()
        assert self.held == {}

    @rule()
    def restart(self):
        """Reopen the file: leases held by this (live) process carry on."""
        self.open()

    @rule(path=st.sampled_from(PATHS))
    def retry_path(self, path):
        for job in self.queue.retry(path):
            assert job.state in ("queued", "failed", "superseded")

    @rule()
    def retry_all_failed(self):
        assert all(job.state == "failed" for job in self.queue.retry(all_failed=True))

    @invariant()
    def no_job_lost_none_in_two_states_one_lease_each(self):
        rows = self.store.conn.execute(
            "SELECT id, state, lease_id, attempts, failures, quarantine_reason FROM jobs"
        ).fetchall()
        assert {row[0] for row in rows} == self.ids
        assert sum(self.queue.counts().values()) == len(rows)
        assert all(row[1] in STATES for row in rows)
        running = {row[0]: row[2] for row in rows if row[1] == "running"}
        assert running == {job_id: job.lease_id for job_id, job in self.held.items()}
        assert all(row[2] is None for row in rows if row[1] != "running")
        assert all(row[5] for row in rows if row[1] == "quarantined")
        for job_id, _, _, attempts, failures, _ in rows:
            assert attempts >= self.attempts.get(job_id, 0) and attempts >= failures
            self.attempts[job_id] = attempts
        duplicates = self.store.conn.execute(
            "SELECT count(*) FROM jobs WHERE state IN (?, ?, ?) "
            "GROUP BY path, source_sha256, recipe_sha256 HAVING count(*) > 1",
            ACTIVE_STATES,
        ).fetchall()
        assert duplicates == []


QueueMachine.TestCase.settings = settings(
    max_examples=50, stateful_step_count=30, deadline=None, database=None
)
test_queue_state_machine = QueueMachine.TestCase


def test_process_identity_survives_a_round_trip_and_names_this_process():
    here = ProcessId.current()
    assert ProcessId.parse(str(here)) == here and here.pid == os.getpid()
