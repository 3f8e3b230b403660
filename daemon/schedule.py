"""Schedules: the processing window (`active_hours`) and the routines (rescan, fixity audit,
database backup), run in-process by APScheduler with missed runs coalesced into one, DST-safe
and steady across wall-clock jumps."""

from __future__ import annotations

import logging
import re
import threading
import time as _time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta, tzinfo

from apscheduler.events import EVENT_JOB_SUBMITTED, JobSubmissionEvent
from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from tzlocal import get_localzone

__all__ = ["ActiveHours", "RoutineState", "Schedules", "parse_time_of_day"]

log = logging.getLogger(__name__)

#: How far apart the wall clock and the real elapsed time may drift between two scheduler rounds
#: before it counts as a jump (NTP slews at most 0.5 ms/s, i.e. 30 ms in a minute).
CLOCK_TOLERANCE = timedelta(seconds=2)

_CLOCK = re.compile(r"(\d{1,2}):(\d{2})")


def _now() -> datetime:
    return datetime.now(UTC)


def _elapsed() -> float:
    """Seconds of real time, counting suspend (CLOCK_BOOTTIME), immune to clock changes."""
    return _time.clock_gettime(_time.CLOCK_BOOTTIME)


def _clocks() -> tuple[datetime, float]:
    """The wall clock and the real elapsed time, read together."""
    return _now(), _elapsed()


# ---------------------------------------------------------------- times of day


def parse_time_of_day(text: str) -> time:
    """ "03:00" -> time(3, 0); a ValueError names the text and the reason."""
    try:
        return _clock(text)
    except ValueError as exc:
        raise ValueError(f'"{text}": {exc}') from None


def _clock(text: str) -> time:
    match = _CLOCK.fullmatch(text.strip())
    if not match:
        raise ValueError("expected HH:MM on the 24-hour clock")
    hour, minute = int(match[1]), int(match[2])
    if hour > 23:
        raise ValueError("hour must be 0-23")
    if minute > 59:
        raise ValueError("minute must be 0-59")
    return time(hour, minute)


def _aware(moment: datetime | None) -> datetime:
    if moment is None:
        return _now()
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise ValueError(f"{moment}: a moment must be timezone-aware")
    return moment


def _offset_changes(tz: tzinfo, begin: datetime, end: datetime) -> list[datetime]:
    """The instants in (begin, end] at which `tz` changes its UTC offset (the clocks jump).

    Hourly samples find each change (zones change at most once in an hour), bisection finds
    its exact second."""

    def offset(seconds: int) -> timedelta | None:
        return datetime.fromtimestamp(seconds, tz).utcoffset()

    changes = []
    lo, stop = int(begin.timestamp()), int(end.timestamp())
    current = offset(lo)
    while lo < stop:
        hi = min(lo + 3600, stop)
        if offset(hi) != current:
            left, right = lo, hi
            while right - left > 1:
                middle = (left + right) // 2
                left, right = (middle, right) if offset(middle) == current else (left, middle)
            changes.append(datetime.fromtimestamp(right, UTC))
            current = offset(hi)
        lo = hi
    return changes


def _instants_reading(day: date, wall: time, tz: tzinfo) -> list[datetime]:
    """The instants (UTC) at which the clock in `tz` reads `wall` on `day`: one, two in the hour
    repeated when the clocks go back, none in the hour skipped when they go forward."""
    instants = []
    for fold in (0, 1):
        local = datetime.combine(day, wall, tzinfo=tz).replace(fold=fold)
        instant = local.astimezone(UTC)
        if instant.astimezone(tz).replace(tzinfo=None) == local.replace(tzinfo=None):
            instants.append(instant)
    return sorted(set(instants))


def _first_instant_at(day: date, wall: time, tz: tzinfo) -> datetime:
    """The first instant (UTC) on `day` at which the clock in `tz` reads `wall` or later: the
    earlier of a repeated time, the moment of the jump for a skipped one."""
    instants = _instants_reading(day, wall, tz)
    if instants:
        return instants[0]
    # Skipped: fold=1 reads the wall time with the later offset (an instant before the jump),
    # fold=0 with the earlier one (after it); the jump lies between them.
    local = datetime.combine(day, wall, tzinfo=tz)
    before, after = local.replace(fold=1).astimezone(UTC), local.astimezone(UTC)
    return _offset_changes(tz, before, after)[0]


# ---------------------------------------------------------------- processing window


@dataclass(frozen=True)
class ActiveHours:
    """When images are processed, on the local wall clock of `tz`: open while the time of day is
    within [start, end), across midnight when end <= start ("22:00-06:00"); always open when
    start is None. Outside the window files are still ingested and hashed, and a running image
    finishes; the worker asks `is_open()` before it starts the next one.

    The clock decides on DST nights too: a window starting in the hour skipped in spring opens
    when the clocks jump past its start, and the hour repeated in autumn is inside or outside
    the window each time as its wall time says.
    """

    start: time | None
    end: time | None
    tz: tzinfo

    @classmethod
    def parse(cls, text: str, tz: tzinfo | None = None) -> ActiveHours:
        """ "22:00-06:00", or "always"/"" for no limit; `tz` defaults to the system's zone."""
        zone = tz if tz is not None else get_localzone()
        if text.strip().lower() in ("", "always"):
            return cls(None, None, zone)
        parts = text.split("-")
        if len(parts) != 2:
            raise ValueError(f'"{text}": expected HH:MM-HH:MM, or "always"')
        try:
            start, end = _clock(parts[0]), _clock(parts[1])
        except ValueError as exc:
            raise ValueError(f'"{text}": {exc}') from None
        if start == end:
            raise ValueError(f'"{text}": start and end are equal; write "always" for no limit')
        return cls(start, end, zone)

    @property
    def always(self) -> bool:
        return self.start is None

    def __str__(self) -> str:
        if self.start is None or self.end is None:
            return "always"
        return f"{self.start:%H:%M}-{self.end:%H:%M}"

    def is_open(self, moment: datetime | None = None) -> bool:
        """Whether images may be processed at `moment` (aware; default now)."""
        moment = _aware(moment)
        if self.start is None or self.end is None:
            return True
        wall = moment.astimezone(self.tz).time()
        if self.start < self.end:
            return self.start <= wall < self.end
        return wall >= self.start or wall < self.end

    def next_open(self, moment: datetime | None = None) -> datetime:
        """The first instant at or after `moment` (default now) when the window is open: `moment`
        itself while open. Aware, in the window's zone; compare results through UTC."""
        return self._next(_aware(moment), opening=True)

    def next_close(self, moment: datetime | None = None) -> datetime | None:
        """The first instant at or after `moment` when the window is closed; None if always open."""
        return None if self.always else self._next(_aware(moment), opening=False)

    def _next(self, moment: datetime, *, opening: bool) -> datetime:
        if self.is_open(moment) == opening:
            return moment
        for instant in self._changes_after(moment):
            if self.is_open(instant) == opening:
                return instant.astimezone(self.tz)
        # Unreachable: with start != end the window opens and closes every day.
        raise RuntimeError(f"active_hours {self}: no change within three days of {moment}")

    def _changes_after(self, moment: datetime) -> Iterator[datetime]:
        """In order, every instant within three days after `moment` at which `is_open` can change:
        when the clock reads start or end, and when it jumps."""
        assert self.start is not None and self.end is not None
        # All in UTC: datetimes sharing one tzinfo compare by wall time and ignore fold.
        after = moment.astimezone(UTC)
        horizon = after + timedelta(days=3)
        instants = set(_offset_changes(self.tz, after, horizon))
        today = after.astimezone(self.tz).date()
        for days in range(-1, 4):
            for wall in (self.start, self.end):
                instants.update(_instants_reading(today + timedelta(days=days), wall, self.tz))
        yield from sorted(t for t in instants if after < t <= horizon)


# ---------------------------------------------------------------- triggers


class _Every(BaseTrigger):
    """Every `period` of real time, first one period after the job is added."""

    def __init__(self, seconds: float) -> None:
        if seconds <= 0:
            raise ValueError(f"interval must be > 0 seconds, got {seconds}")
        self.period = timedelta(seconds=seconds)

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime:
        # In UTC: arithmetic on a zoned datetime is wall-clock arithmetic, off by an hour at DST.
        return (previous_fire_time or now).astimezone(UTC) + self.period

    def first_at_or_after(self, moment: datetime) -> datetime:
        return moment.astimezone(UTC)

    def __str__(self) -> str:
        return f"every {self.period.total_seconds():g} s"


class _Daily(BaseTrigger):
    """Once per local date, when the clock in `tz` first reads `at` (the jump, if it skips it)."""

    period = timedelta(days=1)

    def __init__(self, at: time, tz: tzinfo) -> None:
        self.at, self.tz = at, tz

    def get_next_fire_time(self, previous_fire_time: datetime | None, now: datetime) -> datetime:
        if previous_fire_time is not None:
            after = previous_fire_time.astimezone(UTC) + timedelta(microseconds=1)
            return self.first_at_or_after(after)
        return self.first_at_or_after(now)

    def first_at_or_after(self, moment: datetime) -> datetime:
        moment = moment.astimezone(UTC)
        day = moment.astimezone(self.tz).date() - timedelta(days=1)
        while (fire := _first_instant_at(day, self.at, self.tz)) < moment:
            day += timedelta(days=1)
        return fire

    def __str__(self) -> str:
        return f"daily at {self.at:%H:%M} ({self.tz})"


# ---------------------------------------------------------------- scheduler


@dataclass(frozen=True)
class RoutineState:
    """One routine as `status` shows it (times aware; None for never)."""

    id: str
    schedule: str
    next_run_at: datetime | None
    last_started_at: datetime | None
    last_finished_at: datetime | None
    last_error: str | None
    running: bool


class _Routine:
    """A periodic routine (an APScheduler job on its side): the callable, its trigger and what
    its last run did."""

    def __init__(self, func: Callable[[], object], trigger: _Every | _Daily) -> None:
        self.func, self.trigger = func, trigger
        self.reference = _elapsed()  # real time the job was last submitted (or the start)
        self.last_started_at: datetime | None = None
        self.last_finished_at: datetime | None = None
        self.last_error: str | None = None
        self.running = False

    def keep_on_schedule(self, next_run: datetime, now: datetime, elapsed: float) -> datetime:
        """Where the next run belongs, given the wall clock `now` and the real time `elapsed`.

        - More than a period overdue (the clock jumped forward, the machine slept): one run now,
          instead of APScheduler walking every missed time to coalesce them.
        - The clock jumped back: the run APScheduler keeps at its old wall time would come that
          much later; it moves to the first fire time one real period after the last
          submission. Never earlier, so nothing runs twice within a period.
        """
        period, next_run = self.trigger.period, next_run.astimezone(UTC)
        if next_run <= now - period:
            return now
        since_last = timedelta(seconds=max(0.0, elapsed - self.reference))
        due = self.trigger.first_at_or_after(now + max(timedelta(0), period - since_last))
        return due if due < next_run - CLOCK_TOLERANCE else next_run


class _Scheduler(BackgroundScheduler):
    """APScheduler's background scheduler, with a hook before each round of due jobs and a cap
    on its sleep: it sleeps on the monotonic clock, so without one a wall-clock jump or a resume
    from suspend would go unnoticed until the next job was due by the old reckoning."""

    def __init__(
        self, before_round: Callable[[], None], poll_seconds: float, **options: object
    ) -> None:
        super().__init__(**options)
        self._before_round = before_round
        self._poll_seconds = poll_seconds
        self.rounds = 0  # rounds completed (tests wait on it to know the clock was seen)

    def _process_jobs(self) -> float:
        try:
            self._before_round()
        except Exception:  # the schedule must go on even if the adjustment has a bug
            log.exception("adjusting the schedule failed")
        wait = super()._process_jobs()
        self.rounds += 1
        return self._poll_seconds if wait is None else min(wait, self._poll_seconds)


class Schedules:
    """The daemon's routines, run in-process by APScheduler (memory job store, nothing shared).

    Each routine is a plain callable run in a scheduler thread (so it opens its own database
    connection). Missed runs coalesce into one, one instance at a time, a run late by up to a
    period still happens; an exception is logged and kept for `routines()`, and never stops the
    scheduler or other jobs. `shutdown()` waits for running jobs and joins every thread.

    `timezone` is the zone of daily times (default: the system's). The scheduler looks at the
    wall clock at least every `poll_seconds`, so a clock jump or a resume from suspend is acted
    on within that time.
    """

    def __init__(self, *, timezone: tzinfo | None = None, poll_seconds: float = 60.0) -> None:
        if poll_seconds <= 0:
            raise ValueError(f"poll_seconds must be > 0, got {poll_seconds}")
        self.timezone = timezone if timezone is not None else get_localzone()
        self._routines: dict[str, _Routine] = {}
        self._lock = threading.Lock()
        self._wall_before: tuple[datetime, float] | None = None
        self._scheduler = _Scheduler(
            self._keep_on_schedule,
            poll_seconds,
            timezone=self.timezone,
            jobstores={"default": MemoryJobStore()},
            executors={"default": ThreadPoolExecutor(max_workers=4)},
            job_defaults={"coalesce": True, "max_instances": 1},
        )
        # Called in the scheduler thread at the end of the round that submitted the job, so the
        # next round's `_keep_on_schedule` already counts the period from this submission.
        self._scheduler.add_listener(self._submitted, EVENT_JOB_SUBMITTED)

    def add_interval(self, job_id: str, func: Callable[[], object], seconds: float) -> None:
        """Run `func` every `seconds` (e.g. the periodic rescan), first after one interval."""
        self._add(job_id, func, _Every(seconds))

    def add_daily(self, job_id: str, func: Callable[[], object], at: str | time) -> None:
        """Run `func` once a day at local time `at` ("03:00"; e.g. fixity audit, backup)."""
        wall = parse_time_of_day(at) if isinstance(at, str) else at
        self._add(job_id, func, _Daily(wall, self.timezone))

    def _add(self, job_id: str, func: Callable[[], object], trigger: _Every | _Daily) -> None:
        if job_id in self._routines:
            raise ValueError(f"job {job_id!r} is already scheduled")
        self._routines[job_id] = _Routine(func, trigger)
        self._scheduler.add_job(
            self._run,
            trigger,
            args=(job_id,),
            id=job_id,
            name=job_id,
            # Late by up to a period still runs: a coalesced run is never dropped as missed.
            misfire_grace_time=max(1, int(trigger.period.total_seconds())),
        )

    def start(self) -> None:
        now = _elapsed()
        with self._lock:
            for job in self._routines.values():
                job.reference = now  # a job's first period begins when the scheduler does
        self._scheduler.start()

    def shutdown(self, wait: bool = True) -> None:
        """Stop scheduling; with `wait`, let running jobs finish. Joins the scheduler's threads."""
        if self._scheduler.running:
            self._scheduler.shutdown(wait=wait)

    @property
    def running(self) -> bool:
        return bool(self._scheduler.running)

    def __enter__(self) -> Schedules:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def routines(self) -> list[RoutineState]:
        """Every routine: its schedule, next run and last outcome (for `status`)."""
        states = []
        for job_id, job in list(self._routines.items()):
            scheduled = self._scheduler.get_job(job_id)
            next_run = getattr(scheduled, "next_run_time", None)
            with self._lock:
                states.append(
                    RoutineState(
                        id=job_id,
                        schedule=str(job.trigger),
                        next_run_at=next_run,
                        last_started_at=job.last_started_at,
                        last_finished_at=job.last_finished_at,
                        last_error=job.last_error,
                        running=job.running,
                    )
                )
        return states

    def _run(self, job_id: str) -> None:
        job = self._routines[job_id]
        with self._lock:
            job.last_started_at, job.running = _now(), True
        error = None
        try:
            job.func()
        except Exception as exc:
            log.exception("scheduled job %s failed", job_id)
            error = f"{type(exc).__name__}: {exc}"
        finally:
            with self._lock:
                job.last_finished_at, job.last_error, job.running = _now(), error, False

    def _submitted(self, event: JobSubmissionEvent) -> None:
        job = self._routines.get(event.job_id)
        if job is not None:
            with self._lock:
                job.reference = _elapsed()

    def _keep_on_schedule(self) -> None:
        """Before each round: note a clock jump, and move next runs as `_Routine` explains."""
        now, elapsed = _clocks()
        self._note_jump(now, elapsed)
        for scheduled in self._scheduler.get_jobs():
            next_run = scheduled.next_run_time
            if next_run is None or scheduled.id not in self._routines:
                continue
            with self._lock:
                moved = self._routines[scheduled.id].keep_on_schedule(next_run, now, elapsed)
            if moved != next_run:
                log.info("job %s: next run moved from %s to %s", scheduled.id, next_run, moved)
                self._scheduler.modify_job(scheduled.id, next_run_time=moved)

    def _note_jump(self, now: datetime, elapsed: float) -> None:
        before, self._wall_before = self._wall_before, (now, elapsed)
        if before is None:
            return
        drift = (now - before[0]) - timedelta(seconds=elapsed - before[1])
        if abs(drift) > CLOCK_TOLERANCE:
            direction = "forward" if drift > timedelta(0) else "back"
            log.warning(
                "the wall clock jumped %s by %s: missed runs coalesce, none repeats",
                direction,
                abs(drift),
            )
