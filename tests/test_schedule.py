"""daemon.schedule: the processing window (parsing, midnight, DST) and the scheduler's jobs on an
injected clock (on time, coalesced after a jump, never twice, failures contained)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, tzinfo
from zoneinfo import ZoneInfo

import apscheduler.executors.base
import apscheduler.schedulers.base
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon import schedule
from daemon.schedule import ActiveHours, Schedules, _Daily, _Every, parse_time_of_day

BERLIN = ZoneInfo("Europe/Berlin")
SPRING_FORWARD = datetime(2024, 3, 31, 1, 0, tzinfo=UTC)  # Berlin 02:00 CET -> 03:00 CEST
FALL_BACK = datetime(2024, 10, 27, 1, 0, tzinfo=UTC)  # Berlin 03:00 CEST -> 02:00 CET


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def berlin(*args: int, fold: int = 0) -> datetime:
    return datetime(*args, tzinfo=BERLIN, fold=fold)


# ---------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("22:00-06:00", "22:00-06:00"),
        (" 9:00 - 17:30 ", "09:00-17:30"),
        ("00:00-23:59", "00:00-23:59"),
        ("always", "always"),
        ("Always", "always"),
        ("", "always"),
    ],
)
def test_parse_accepts_windows_and_always(text: str, shown: str) -> None:
    assert str(ActiveHours.parse(text, BERLIN)) == shown


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("25:00-06:00", '"25:00-06:00": hour must be 0-23'),
        ("22:00-06:60", '"22:00-06:60": minute must be 0-59'),
        ("24:00-06:00", '"24:00-06:00": hour must be 0-23'),
        ("22:00", '"22:00": expected HH:MM-HH:MM, or "always"'),
        ("22:00-06:00-07:00", '"22:00-06:00-07:00": expected HH:MM-HH:MM, or "always"'),
        ("10pm-6am", '"10pm-6am": expected HH:MM on the 24-hour clock'),
        ("06:00-06:00", '"06:00-06:00": start and end are equal; write "always" for no limit'),
    ],
)
def test_parse_rejects_a_bad_window_naming_text_and_reason(text: str, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        ActiveHours.parse(text, BERLIN)
    assert str(caught.value) == message


def test_parse_time_of_day_reads_hh_mm_and_names_the_problem() -> None:
    assert parse_time_of_day("03:00").hour == 3
    assert parse_time_of_day("7:05").minute == 5
    with pytest.raises(ValueError, match=r'^"3 am": expected HH:MM on the 24-hour clock$'):
        parse_time_of_day("3 am")


def test_default_zone_is_the_systems() -> None:
    from tzlocal import get_localzone

    assert ActiveHours.parse("22:00-06:00").tz == get_localzone()


# ---------------------------------------------------------------- is_open, next_open, next_close


def test_daytime_window_includes_start_and_excludes_end() -> None:
    window = ActiveHours.parse("09:00-17:00", BERLIN)
    assert not window.is_open(berlin(2024, 6, 3, 8, 59))
    assert window.is_open(berlin(2024, 6, 3, 9, 0))
    assert window.is_open(berlin(2024, 6, 3, 16, 59, 59))
    assert not window.is_open(berlin(2024, 6, 3, 17, 0))


def test_overnight_window_wraps_midnight() -> None:
    window = ActiveHours.parse("22:00-06:00", BERLIN)
    assert not window.is_open(berlin(2024, 6, 3, 21, 59))
    assert window.is_open(berlin(2024, 6, 3, 22, 0))
    assert window.is_open(berlin(2024, 6, 4, 0, 0))
    assert window.is_open(berlin(2024, 6, 4, 5, 59))
    assert not window.is_open(berlin(2024, 6, 4, 6, 0))


def test_window_reads_its_own_zone_not_utc() -> None:
    window = ActiveHours.parse("22:00-06:00", BERLIN)
    assert window.is_open(utc(2024, 1, 10, 21, 30))  # 22:30 in Berlin (CET)
    assert not ActiveHours.parse("22:00-06:00", ZoneInfo("UTC")).is_open(utc(2024, 1, 10, 21, 30))


def test_always_is_open_and_never_closes() -> None:
    window = ActiveHours.parse("always", BERLIN)
    moment = utc(2024, 6, 3, 12, 0)
    assert window.always and window.is_open(moment)
    assert window.next_open(moment) == moment
    assert window.next_close(moment) is None


def test_a_naive_moment_is_rejected() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        ActiveHours.parse("22:00-06:00", BERLIN).is_open(datetime(2024, 6, 3, 12, 0))


def test_next_open_and_next_close_of_an_overnight_window() -> None:
    window = ActiveHours.parse("22:00-06:00", BERLIN)
    noon = berlin(2024, 6, 3, 12, 0)
    assert window.next_open(noon) == berlin(2024, 6, 3, 22, 0)
    assert window.next_close(noon) == noon  # closed already
    late = berlin(2024, 6, 3, 23, 0)
    assert window.next_open(late) == late
    assert window.next_close(late) == berlin(2024, 6, 4, 6, 0)


def test_next_open_of_a_day_window_after_it_closed_is_tomorrow() -> None:
    window = ActiveHours.parse("09:00-17:00", BERLIN)
    assert window.next_open(berlin(2024, 6, 3, 18, 0)) == berlin(2024, 6, 4, 9, 0)


def test_window_starting_in_the_skipped_hour_opens_when_the_clocks_jump() -> None:
    window = ActiveHours.parse("02:30-05:00", BERLIN)
    opens = window.next_open(berlin(2024, 3, 30, 12, 0))
    assert opens.astimezone(UTC) == SPRING_FORWARD  # 03:00 CEST, not 03:30
    assert window.is_open(opens)
    assert not window.is_open(SPRING_FORWARD - timedelta(seconds=1))


def test_window_inside_the_skipped_hour_waits_for_the_next_day() -> None:
    window = ActiveHours.parse("02:10-02:50", BERLIN)
    assert window.next_open(berlin(2024, 3, 30, 12, 0)) == berlin(2024, 4, 1, 2, 10)


def test_repeated_hour_reopens_a_window_it_reaches_into() -> None:
    window = ActiveHours.parse("01:00-02:30", BERLIN)
    after_first_pass = berlin(2024, 10, 27, 2, 40)  # CEST, before the clocks go back
    assert not window.is_open(after_first_pass)
    reopens = window.next_open(after_first_pass)
    assert reopens.astimezone(UTC) == FALL_BACK  # the clock reads 02:00 again (CET)
    assert window.next_close(reopens) == berlin(2024, 10, 27, 2, 30, fold=1)
    assert window.next_close(reopens).astimezone(UTC) == utc(2024, 10, 27, 1, 30)


ZONES = ["Europe/Berlin", "America/New_York", "Australia/Lord_Howe", "Asia/Kathmandu", "UTC"]


def _brute_force_next(window: ActiveHours, moment: datetime, opening: bool) -> datetime:
    """Step minute by minute: every zone here changes offset, and every window edge falls, on a
    whole minute, so the first such minute in the wanted state is the answer."""
    if window.is_open(moment) == opening:
        return moment
    step = moment.replace(second=0, microsecond=0) + timedelta(minutes=1)
    for _ in range(4 * 24 * 60):
        if window.is_open(step) == opening:
            return step
        step += timedelta(minutes=1)
    raise AssertionError("no change within four days")


@settings(max_examples=60, deadline=None)
@given(
    zone=st.sampled_from(ZONES),
    start=st.integers(0, 24 * 60 - 1),
    length=st.integers(1, 24 * 60 - 1),
    # Moments spread over 2024, which holds every zone's DST changes.
    offset=st.integers(0, 366 * 24 * 3600),
    near_change=st.booleans(),
)
def test_next_open_and_close_agree_with_a_minute_by_minute_search(
    zone: str, start: int, length: int, offset: int, near_change: bool
) -> None:
    end = (start + length) % (24 * 60)
    window = ActiveHours.parse(f"{start // 60}:{start % 60:02d}-{end // 60}:{end % 60:02d}")
    window = ActiveHours(window.start, window.end, ZoneInfo(zone))
    moment = utc(2024, 1, 1) + timedelta(seconds=offset)
    if near_change:  # land within a day before a DST change, where the edge cases live
        moment = utc(2024, 3, 30, 0, 0) + timedelta(seconds=offset % (2 * 86400))
    for opening in (True, False):
        expected = _brute_force_next(window, moment, opening)
        found = window.next_open(moment) if opening else window.next_close(moment)
        assert found is not None
        assert found.astimezone(UTC) == expected.astimezone(UTC), (opening, str(window))


# ---------------------------------------------------------------- triggers


def test_daily_trigger_fires_once_on_the_night_the_clocks_go_back() -> None:
    trigger = _Daily(parse_time_of_day("02:30"), BERLIN)
    first = trigger.get_next_fire_time(None, utc(2024, 10, 26, 12, 0))
    second = trigger.get_next_fire_time(first, first)
    # 02:30 happens twice on 27 October; APScheduler's CronTrigger fires at both.
    assert first == utc(2024, 10, 27, 0, 30)  # the first 02:30 (CEST)
    assert second == utc(2024, 10, 28, 1, 30)  # the next day's 02:30 (CET)


def test_daily_trigger_fires_at_the_jump_when_its_time_is_skipped() -> None:
    trigger = _Daily(parse_time_of_day("02:30"), BERLIN)
    fire = trigger.get_next_fire_time(None, utc(2024, 3, 30, 12, 0))
    assert fire == SPRING_FORWARD
    assert trigger.get_next_fire_time(fire, fire) == berlin(2024, 4, 1, 2, 30)


def test_interval_trigger_counts_real_seconds_across_dst() -> None:
    before = berlin(2024, 10, 27, 2, 30)  # 00:30 UTC, the first 02:30 (CEST)
    after = _Every(3600).get_next_fire_time(before, before)
    assert after == utc(2024, 10, 27, 1, 30)  # one real hour: the second 02:30 (CET)
    # Adding to the zoned datetime is wall arithmetic: 03:30 CET, two real hours later.
    assert before + timedelta(hours=1) == utc(2024, 10, 27, 2, 30)


# ---------------------------------------------------------------- the scheduler, on a fake clock


class FakeClock:
    """The wall clock and the real elapsed time, moved by the test; one tuple so that a reader
    never sees the wall clock of one step with the elapsed time of another."""

    def __init__(self, wall: datetime) -> None:
        self.state = (wall, 10_000.0)

    @property
    def wall(self) -> datetime:
        return self.state[0]

    def advance(self, seconds: float) -> None:
        """Real time passes."""
        wall, elapsed = self.state
        self.state = (wall + timedelta(seconds=seconds), elapsed + seconds)

    def jump(self, seconds: float) -> None:
        """The wall clock is set: it moves, real time does not."""
        wall, elapsed = self.state
        self.state = (wall + timedelta(seconds=seconds), elapsed)

    def set_wall(self, wall: datetime) -> None:
        self.jump((wall - self.wall).total_seconds())


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """Every clock the scheduler reads: ours, and APScheduler's datetime.now (it computes due
    runs and misfires from it; its sleeps are cut short by poll_seconds)."""
    fake = FakeClock(utc(2024, 3, 30, 12, 0))

    class FakeDatetime(datetime):
        @classmethod
        def now(cls, tz: tzinfo | None = None) -> datetime:
            return fake.wall.astimezone(tz) if tz else fake.wall.astimezone().replace(tzinfo=None)

    monkeypatch.setattr(apscheduler.schedulers.base, "datetime", FakeDatetime)
    monkeypatch.setattr(apscheduler.executors.base, "datetime", FakeDatetime)
    monkeypatch.setattr(schedule, "_now", lambda: fake.state[0])
    monkeypatch.setattr(schedule, "_elapsed", lambda: fake.state[1])
    monkeypatch.setattr(schedule, "_clocks", lambda: fake.state)
    return fake


@pytest.fixture
def schedules(clock: FakeClock):
    """A scheduler that looks at the (fake) clock every 10 ms; shut down before the clock goes."""
    made = Schedules(timezone=BERLIN, poll_seconds=0.01)
    yield made
    made.shutdown()


class Counter:
    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self) -> None:
        with self._lock:
            self.calls += 1


def wait_for(predicate: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.002)


def settle(schedules: Schedules, rounds: int = 5) -> None:
    """Let the scheduler complete a few rounds, so it has acted on the clock as it is now (and
    finished the round that submitted a job that has run: only then is the submission noted)."""
    target = schedules._scheduler.rounds + rounds
    wait_for(lambda: schedules._scheduler.rounds >= target)


def until_idle(schedules: Schedules, predicate: Callable[[], bool]) -> None:
    """Wait for `predicate`, then until no job runs and the scheduler has finished its round
    (a run still finishing would make the next one skip as a second instance)."""
    wait_for(predicate)
    wait_for(lambda: not any(job.running for job in schedules.routines()))
    settle(schedules)


def next_run(schedules: Schedules, job_id: str) -> datetime:
    (state,) = [job for job in schedules.routines() if job.id == job_id]
    assert state.next_run_at is not None
    return state.next_run_at


def test_interval_job_runs_once_each_period(schedules: Schedules, clock: FakeClock) -> None:
    rescan = Counter()
    schedules.add_interval("rescan", rescan, 60)
    schedules.start()
    settle(schedules)
    assert rescan.calls == 0
    assert next_run(schedules, "rescan") == clock.wall + timedelta(seconds=60)
    for expected in (1, 2, 3):
        clock.advance(60)
        until_idle(schedules, lambda expected=expected: rescan.calls == expected)
    assert rescan.calls == 3
    assert next_run(schedules, "rescan") == clock.wall + timedelta(seconds=60)


def test_daily_job_runs_at_its_local_time(schedules: Schedules, clock: FakeClock) -> None:
    fixity = Counter()
    schedules.add_daily("fixity", fixity, "03:00")
    schedules.start()
    # 31 March is the night the clocks skip 02:00-03:00: 03:00 CEST is 01:00 UTC.
    assert next_run(schedules, "fixity") == utc(2024, 3, 31, 1, 0)
    clock.advance((utc(2024, 3, 31, 0, 59, 59) - clock.wall).total_seconds())
    settle(schedules)
    assert fixity.calls == 0
    clock.advance(1)
    until_idle(schedules, lambda: fixity.calls == 1)
    assert fixity.calls == 1
    assert next_run(schedules, "fixity") == berlin(2024, 4, 1, 3, 0)


def test_forward_jump_coalesces_missed_runs_into_one_each(
    schedules: Schedules, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    rescan, fixity, backup = Counter(), Counter(), Counter()
    schedules.add_interval("rescan", rescan, 60)
    schedules.add_daily("fixity", fixity, "03:00")
    schedules.add_daily("backup", backup, "04:00")
    schedules.start()
    settle(schedules)
    with caplog.at_level(logging.WARNING, logger="daemon.schedule"):
        clock.jump(10 * 86400)  # 14 400 missed rescans, 10 missed audits and backups
        until_idle(schedules, lambda: (rescan.calls, fixity.calls, backup.calls) == (1, 1, 1))
    assert (rescan.calls, fixity.calls, backup.calls) == (1, 1, 1)
    assert all(job.next_run_at > clock.wall for job in schedules.routines())
    assert "jumped forward by 10 days" in caplog.text


def test_forward_jump_is_one_run_without_walking_the_missed_times(
    schedules: Schedules, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A clock set from a dead RTC (1970) to the present would otherwise make APScheduler list
    # every missed run time of a frequent job (here 864 000) before coalescing them.
    asked = Counter()
    next_fire_time = _Every.get_next_fire_time

    def counted(self: _Every, previous_fire_time: datetime | None, now: datetime) -> datetime:
        asked()
        return next_fire_time(self, previous_fire_time, now)

    monkeypatch.setattr(_Every, "get_next_fire_time", counted)
    tick = Counter()
    schedules.add_interval("tick", tick, 1)
    schedules.start()
    settle(schedules)
    clock.jump(10 * 86400)
    until_idle(schedules, lambda: tick.calls == 1)
    assert tick.calls == 1
    assert next_run(schedules, "tick") == clock.wall + timedelta(seconds=1)
    assert asked.calls < 10


def test_forward_jump_over_a_daily_time_runs_it_late_once(
    schedules: Schedules, clock: FakeClock
) -> None:
    fixity = Counter()
    schedules.add_daily("fixity", fixity, "03:00")
    clock.set_wall(berlin(2024, 6, 3, 2, 0))
    schedules.start()
    settle(schedules)
    clock.jump(7 * 3600)  # 09:00: six hours late is within the grace of a day
    until_idle(schedules, lambda: fixity.calls == 1)
    assert fixity.calls == 1
    assert next_run(schedules, "fixity") == berlin(2024, 6, 4, 3, 0)


def test_backward_jump_does_not_repeat_a_daily_run(
    schedules: Schedules, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    fixity = Counter()
    schedules.add_daily("fixity", fixity, "03:00")
    clock.set_wall(berlin(2024, 6, 3, 2, 59))
    schedules.start()
    clock.advance(60)
    until_idle(schedules, lambda: fixity.calls == 1)
    clock.advance(30 * 60)  # 03:30
    settle(schedules)
    with caplog.at_level(logging.WARNING, logger="daemon.schedule"):
        clock.jump(-3600)  # 02:30: 03:00 today comes round again on the wall clock
        settle(schedules)
    assert "jumped back by 1:00:00" in caplog.text
    clock.advance(45 * 60)  # 03:15
    settle(schedules)
    assert fixity.calls == 1
    assert next_run(schedules, "fixity") == berlin(2024, 6, 4, 3, 0)


def test_backward_jump_does_not_stretch_an_interval(schedules: Schedules, clock: FakeClock) -> None:
    rescan = Counter()
    schedules.add_interval("rescan", rescan, 3600)
    schedules.start()
    clock.advance(3600)
    until_idle(schedules, lambda: rescan.calls == 1)
    clock.advance(600)
    settle(schedules)
    clock.jump(-86400)
    settle(schedules)
    # By the old wall time it would wait a day and 50 minutes; one real hour after the last
    # run is 50 minutes away.
    assert next_run(schedules, "rescan") == clock.wall + timedelta(seconds=3000)
    clock.advance(2999)
    settle(schedules)
    assert rescan.calls == 1
    clock.advance(1)
    wait_for(lambda: rescan.calls == 2)


def test_failing_job_is_logged_and_others_keep_running(
    schedules: Schedules, clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    good = Counter()
    failures = Counter()

    def bad() -> None:
        failures()
        raise OSError("backup target is gone")

    schedules.add_interval("backup", bad, 60)
    schedules.add_interval("rescan", good, 60)
    schedules.start()
    with caplog.at_level(logging.ERROR, logger="daemon.schedule"):
        for expected in (1, 2):
            clock.advance(60)
            until_idle(
                schedules, lambda expected=expected: (good.calls, failures.calls) == (expected,) * 2
            )
    states = {job.id: job for job in schedules.routines()}
    assert states["backup"].last_error == "OSError: backup target is gone"
    assert states["rescan"].last_error is None
    assert states["rescan"].last_finished_at == clock.wall
    assert "scheduled job backup failed" in caplog.text
    assert "OSError: backup target is gone" in caplog.text  # with its traceback
    assert schedules.running


def test_a_job_still_running_is_not_started_again(schedules: Schedules, clock: FakeClock) -> None:
    started = Counter()
    release = threading.Event()

    def audit() -> None:
        started()
        release.wait(20)

    schedules.add_interval("fixity", audit, 60)
    schedules.start()
    clock.advance(60)
    wait_for(lambda: started.calls == 1)
    for _ in range(3):
        clock.advance(60)
        settle(schedules)
    assert started.calls == 1
    assert [job.running for job in schedules.routines()] == [True]
    release.set()
    wait_for(lambda: not schedules.routines()[0].running)
    clock.advance(60)
    wait_for(lambda: started.calls == 2)


def test_shutdown_waits_for_the_running_job(schedules: Schedules, clock: FakeClock) -> None:
    started, finished = threading.Event(), threading.Event()

    def backup() -> None:
        started.set()
        time.sleep(0.2)
        finished.set()

    schedules.add_interval("backup", backup, 60)
    schedules.start()
    clock.advance(60)
    assert started.wait(20)
    schedules.shutdown(wait=True)
    assert finished.is_set()
    assert not schedules.running
    schedules.shutdown()  # a second shutdown is harmless


def test_adding_rejects_a_duplicate_id_a_bad_time_and_a_bad_interval(
    schedules: Schedules,
) -> None:
    schedules.add_daily("fixity", Counter(), "03:00")
    with pytest.raises(ValueError, match="job 'fixity' is already scheduled"):
        schedules.add_daily("fixity", Counter(), "04:00")
    with pytest.raises(ValueError, match=r'^"25:00": hour must be 0-23$'):
        schedules.add_daily("backup", Counter(), "25:00")
    with pytest.raises(ValueError, match="interval must be > 0 seconds"):
        schedules.add_interval("rescan", Counter(), 0)


def test_jobs_describe_their_schedule_before_and_after_start(
    schedules: Schedules, clock: FakeClock
) -> None:
    schedules.add_interval("rescan", Counter(), 900)
    schedules.add_daily("backup", Counter(), "04:00")
    before = {job.id: job for job in schedules.routines()}
    assert before["rescan"].schedule == "every 900 s"
    assert before["backup"].schedule == "daily at 04:00 (Europe/Berlin)"
    assert before["backup"].next_run_at is None  # not started
    schedules.start()
    after = {job.id: job for job in schedules.routines()}
    assert after["backup"].next_run_at == berlin(2024, 3, 31, 4, 0)
    assert after["rescan"].last_started_at is None
