"""Triggers and schedules, driven by a fake clock over simulated days.

Every simulation calls ``due()`` once per simulated minute, so a run at a
whole minute is seen at exactly that minute. Nothing sleeps.
"""

from __future__ import annotations

import datetime as dt
import itertools
import logging
import zoneinfo
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from tvm_upload.config import Config, parse_config
from tvm_upload.schedule import (
    ClockStepDetector,
    DailySchedule,
    DrainScope,
    ImmediateTrigger,
    IntervalSchedule,
    ScheduledTrigger,
    Trigger,
    build_trigger,
)

UTC = dt.timezone.utc
BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")
NEW_YORK = zoneinfo.ZoneInfo("America/New_York")
SHANGHAI = zoneinfo.ZoneInfo("Asia/Shanghai")

MINUTE = 60.0
HOUR = 3600.0
DAY = 86400.0
DAILY_15 = {"mode": "daily", "daily_time": "15:00"}


def make_config(
    *,
    zone: str = "Asia/Shanghai",
    schedule: Any = None,
    window: tuple[str, str] | None = None,
    batch: bool = True,
    upload_on_start: bool = True,
) -> Config:
    upload: dict[str, Any] = {
        "batch_upload": {"enabled": batch},
        "upload_on_start": upload_on_start,
    }
    if schedule is not None:
        upload["schedule"] = schedule
    if window is not None:
        upload["operational_hours"] = {"enabled": True, "start": window[0], "end": window[1]}
    data = {
        "vehicle_id": "vehicle-CN-001",
        "timezone": zone,
        "log_directories": [{"path": "/data/logs/ros", "source": "ros"}],
        "s3": {"bucket": "t01logs", "region": "cn-north-1"},
        "upload": upload,
    }
    return parse_config(data, environ={})


def local(zone: dt.tzinfo, text: str, fold: int = 0) -> dt.datetime:
    """Return the aware wall time ``YYYY-MM-DD HH:MM`` in ``zone``."""
    return dt.datetime.fromisoformat(text).replace(tzinfo=zone, fold=fold)


class FakeClock:
    """A wall clock and a monotonic clock that move only when the test moves them."""

    def __init__(self, start: dt.datetime, zone: dt.tzinfo) -> None:
        self.wall = start.astimezone(UTC)
        self.monotonic = 5000.0
        self.zone = zone

    def now(self) -> dt.datetime:
        return self.wall.astimezone(self.zone)

    def advance(self, seconds: float) -> None:
        """Let real time pass: both clocks move."""
        self.wall += dt.timedelta(seconds=seconds)
        self.monotonic += seconds

    def step(self, seconds: float) -> None:
        """Set the wall clock, as NTP or an operator does, and leave the monotonic clock."""
        self.wall += dt.timedelta(seconds=seconds)


Busy = Callable[[FakeClock], bool]


def never_busy(clock: FakeClock) -> bool:
    return False


def simulate(
    trigger: Trigger, clock: FakeClock, seconds: float, *, busy: Busy = never_busy
) -> list[dt.datetime]:
    """Call ``due()`` once per simulated minute for ``seconds`` and return the local run times."""
    runs = []
    end = clock.monotonic + seconds
    while clock.monotonic < end:
        if trigger.due(clock.monotonic, clock.now(), busy=busy(clock)):
            runs.append(clock.now())
        clock.advance(MINUTE)
    return runs


def daily_runs_from(first: dt.datetime, *, until: dt.datetime) -> list[dt.datetime]:
    """Return ``first`` and every later 15:00 before ``until``, one per date."""
    runs = [first]
    day = first.date() + dt.timedelta(days=1)
    while (run := dt.datetime.combine(day, dt.time(15, 0), tzinfo=first.tzinfo)) < until:
        runs.append(run)
        day += dt.timedelta(days=1)
    return runs


def runs_per_date(runs: list[dt.datetime]) -> Counter[dt.date]:
    return Counter(run.date() for run in runs)


def started(config: Config, start: dt.datetime) -> tuple[ScheduledTrigger, FakeClock]:
    """Return the trigger for ``config`` and a clock at ``start``, after the first loop step."""
    trigger = build_trigger(config)
    clock = FakeClock(start, config.zone())
    assert not trigger.due(clock.monotonic, clock.now())
    return trigger, clock


# Operational window and batch upload


DAY_WINDOW = ("09:00", "18:00")
NIGHT_WINDOW = ("22:00", "06:00")

WINDOW_CASES = [
    (DAY_WINDOW, "08:59", False),
    (DAY_WINDOW, "09:00", True),
    (DAY_WINDOW, "12:00", True),
    (DAY_WINDOW, "17:59", True),
    (DAY_WINDOW, "18:00", False),
    (DAY_WINDOW, "23:30", False),
    (NIGHT_WINDOW, "21:59", False),
    (NIGHT_WINDOW, "22:00", True),
    (NIGHT_WINDOW, "23:59", True),
    (NIGHT_WINDOW, "00:00", True),
    (NIGHT_WINDOW, "05:59", True),
    (NIGHT_WINDOW, "06:00", False),
    (NIGHT_WINDOW, "12:00", False),
]


@pytest.mark.parametrize(("window", "time_of_day", "inside"), WINDOW_CASES)
def test_window_edges(window: tuple[str, str], time_of_day: str, inside: bool) -> None:
    trigger = build_trigger(make_config(window=window))
    now = local(SHANGHAI, f"2026-12-01 {time_of_day}")

    assert trigger.window_open(now) is inside
    assert trigger.on_ready(now) is (DrainScope.QUEUE if inside else DrainScope.NONE)


@pytest.mark.parametrize(("window", "time_of_day", "inside"), WINDOW_CASES)
def test_window_without_batch_releases_file(
    window: tuple[str, str], time_of_day: str, inside: bool
) -> None:
    trigger = build_trigger(make_config(window=window, batch=False))

    scope = trigger.on_ready(local(SHANGHAI, f"2026-12-01 {time_of_day}"))

    assert scope is (DrainScope.FILE if inside else DrainScope.NONE)


@pytest.mark.parametrize("batch", [True, False])
def test_disabled_window_is_always_open(batch: bool) -> None:
    trigger = build_trigger(make_config(batch=batch))
    expected = DrainScope.QUEUE if batch else DrainScope.FILE

    for minute in range(0, 24 * 60, 7):
        now = local(SHANGHAI, "2026-12-01 00:00") + dt.timedelta(minutes=minute)
        assert trigger.window_open(now)
        assert trigger.on_ready(now) is expected


def test_window_uses_configured_zone() -> None:
    trigger = build_trigger(make_config(window=NIGHT_WINDOW))

    # 14:00 UTC is 22:00 in Shanghai and 03:00 UTC is 11:00 there.
    assert trigger.window_open(dt.datetime(2026, 12, 1, 14, 0, tzinfo=UTC))
    assert not trigger.window_open(dt.datetime(2026, 12, 1, 3, 0, tzinfo=UTC))


def test_window_across_dst_change() -> None:
    trigger = build_trigger(make_config(zone="Europe/Berlin", window=("01:00", "02:45")))

    # On 2026-10-25 Berlin's clocks go from 03:00 back to 02:00, so 02:30 occurs twice.
    assert trigger.window_open(local(BERLIN, "2026-10-25 02:30", fold=0))
    assert trigger.window_open(local(BERLIN, "2026-10-25 02:30", fold=1))
    assert not trigger.window_open(local(BERLIN, "2026-10-25 03:00"))


def test_naive_wall_time_is_rejected() -> None:
    trigger = build_trigger(make_config())

    with pytest.raises(ValueError, match="timezone-aware"):
        trigger.on_ready(dt.datetime(2026, 12, 1, 12, 0))


# Start


@pytest.mark.parametrize("schedule", [None, DAILY_15])
@pytest.mark.parametrize("upload_on_start", [True, False])
def test_upload_on_start(schedule: Any, upload_on_start: bool) -> None:
    config = make_config(schedule=schedule, upload_on_start=upload_on_start)
    trigger, clock = started(config, local(SHANGHAI, "2026-12-01 12:00"))

    runs = simulate(trigger, clock, 4 * HOUR)

    assert trigger.on_start() is upload_on_start
    first = "2026-12-01 14:00" if schedule is None else "2026-12-01 15:00"
    assert runs[0] == local(SHANGHAI, first)


def test_immediate_trigger_has_no_schedule() -> None:
    trigger = ImmediateTrigger()
    now = local(SHANGHAI, "2026-12-01 12:00")

    assert trigger.on_start()
    assert trigger.on_ready(now) is DrainScope.QUEUE
    assert not trigger.due(0.0, now)
    assert trigger.next_run(0.0, now) is None
    assert trigger.clock_stepped() is None


# Interval mode


def test_interval_runs_every_two_hours() -> None:
    start = local(SHANGHAI, "2026-12-01 00:00")
    trigger, clock = started(make_config(), start)

    runs = simulate(trigger, clock, 3 * DAY)

    assert runs[0] == start + dt.timedelta(hours=2)
    gaps = {later - earlier for earlier, later in itertools.pairwise(runs)}
    assert gaps == {dt.timedelta(hours=2)}
    # The first day starts at 00:00 without a run; the others have one at 00:00.
    assert list(runs_per_date(runs).values()) == [11, 12, 12]


def test_interval_of_five_minutes() -> None:
    schedule = {"mode": "interval", "interval_hours": 0, "interval_minutes": 5}
    trigger, clock = started(make_config(schedule=schedule), local(SHANGHAI, "2026-12-01 00:00"))

    runs = simulate(trigger, clock, DAY)

    assert len(runs) == 24 * 12 - 1
    assert runs[0] == local(SHANGHAI, "2026-12-01 00:05")


def test_interval_stalled_loop_runs_once() -> None:
    schedule = IntervalSchedule(10 * MINUTE)
    now = local(SHANGHAI, "2026-12-01 00:00")
    assert not schedule.take_due(0.0, now)

    # The loop was blocked for 55 minutes: five run times passed.
    assert schedule.take_due(55 * MINUTE, now)
    assert not schedule.take_due(55 * MINUTE + 1, now)
    assert not schedule.take_due(60 * MINUTE - 1, now)
    assert schedule.take_due(60 * MINUTE, now)


@pytest.mark.parametrize("step_seconds", [3 * DAY, 5 * HOUR, -5 * HOUR, -3 * DAY])
def test_interval_ignores_clock_steps(step_seconds: float) -> None:
    trigger, clock = started(make_config(), local(SHANGHAI, "2026-12-01 00:00"))
    started_monotonic = clock.monotonic
    runs_monotonic = []

    for _ in range(6 * 60):
        if trigger.due(clock.monotonic, clock.now()):
            runs_monotonic.append(clock.monotonic - started_monotonic)
        if clock.monotonic - started_monotonic == 3 * HOUR:
            clock.step(step_seconds)
        clock.advance(MINUTE)

    assert runs_monotonic == [2 * HOUR, 4 * HOUR]
    assert trigger.clock_stepped() == pytest.approx(step_seconds)


def test_interval_next_run_follows_monotonic_clock() -> None:
    trigger, clock = started(make_config(), local(SHANGHAI, "2026-12-01 00:00"))
    clock.advance(30 * MINUTE)
    clock.step(-DAY)

    next_run = trigger.next_run(clock.monotonic, clock.now())

    assert next_run == clock.now() + dt.timedelta(minutes=90)
    assert next_run.tzinfo is SHANGHAI


# Daily mode


def test_daily_runs_once_a_day() -> None:
    config = make_config(schedule=DAILY_15)
    trigger, clock = started(config, local(SHANGHAI, "2026-12-01 00:00"))

    runs = simulate(trigger, clock, 10 * DAY)

    assert set(runs_per_date(runs).values()) == {1}
    assert len(runs) == 10
    assert {run.time() for run in runs} == {dt.time(15, 0)}


@pytest.mark.parametrize(
    ("start", "first"),
    [
        ("2026-12-01 14:59", "2026-12-01 15:00"),
        ("2026-12-01 15:00", "2026-12-01 15:00"),
        ("2026-12-01 15:01", "2026-12-02 15:00"),
    ],
)
def test_daily_first_run(start: str, first: str) -> None:
    trigger = build_trigger(make_config(schedule=DAILY_15))
    clock = FakeClock(local(SHANGHAI, start), SHANGHAI)

    assert trigger.next_run(clock.monotonic, clock.now()) == local(SHANGHAI, first)
    assert simulate(trigger, clock, DAY)[0] == local(SHANGHAI, first)


def test_legacy_schedule_string_is_daily() -> None:
    trigger = build_trigger(make_config(schedule="04:30"))
    now = local(SHANGHAI, "2026-12-01 12:00")

    description = trigger.describe(0.0, now)

    assert description["mode"] == "daily"
    assert description["next_run"] == "2026-12-02T04:30:00+08:00"


def test_daily_stalled_loop_runs_once() -> None:
    schedule = DailySchedule(dt.time(15, 0), SHANGHAI)
    assert not schedule.take_due(0.0, local(SHANGHAI, "2026-12-01 12:00"))

    # Both clocks moved on by three days while the loop was blocked: not a step.
    assert schedule.take_due(0.0, local(SHANGHAI, "2026-12-04 16:00"))
    assert not schedule.take_due(0.0, local(SHANGHAI, "2026-12-04 16:01"))
    assert schedule.next_run(0.0, local(SHANGHAI, "2026-12-04 16:01")) == local(
        SHANGHAI, "2026-12-05 15:00"
    )


# Daylight saving time


DST_CASES = [
    # Spring forward: 02:00 to 03:00, so 02:00 and 02:30 do not exist that day.
    ("Europe/Berlin", "02:30", "2026-03-29", "2026-03-29 03:00"),
    ("Europe/Berlin", "02:00", "2026-03-29", "2026-03-29 03:00"),
    ("America/New_York", "02:30", "2026-03-08", "2026-03-08 03:00"),
    # Fall back: 03:00 to 02:00 in Berlin and 02:00 to 01:00 in New York.
    ("Europe/Berlin", "02:30", "2026-10-25", "2026-10-25 02:30"),
    ("America/New_York", "01:30", "2026-11-01", "2026-11-01 01:30"),
    # No DST: the same days, and the day the others change, are plain days.
    ("Asia/Shanghai", "02:30", "2026-03-29", "2026-03-29 02:30"),
    ("Asia/Shanghai", "02:30", "2026-11-01", "2026-11-01 02:30"),
]


@pytest.mark.parametrize(("zone_name", "daily_time", "change_date", "expected"), DST_CASES)
def test_daily_across_dst_change(
    zone_name: str, daily_time: str, change_date: str, expected: str
) -> None:
    zone = zoneinfo.ZoneInfo(zone_name)
    config = make_config(zone=zone_name, schedule={"mode": "daily", "daily_time": daily_time})
    start = local(zone, change_date) - dt.timedelta(days=2)
    trigger, clock = started(config, start)

    runs = simulate(trigger, clock, 5 * DAY)

    assert set(runs_per_date(runs).values()) == {1}
    assert len(runs) == 5
    change_day_run = [run for run in runs if run.date().isoformat() == change_date]
    assert change_day_run == [local(zone, expected)]
    assert trigger.clock_stepped() is None


def test_fall_back_runs_at_first_occurrence() -> None:
    schedule = DailySchedule(dt.time(2, 30), BERLIN)

    run = schedule.run_time(dt.date(2026, 10, 25))

    assert run == dt.datetime(2026, 10, 25, 0, 30, tzinfo=UTC)
    assert run.astimezone(BERLIN).utcoffset() == dt.timedelta(hours=2)


@pytest.mark.parametrize("zone", [BERLIN, NEW_YORK, SHANGHAI], ids=str)
def test_run_times_over_a_year(zone: zoneinfo.ZoneInfo) -> None:
    schedule = DailySchedule(dt.time(2, 30), zone)
    days = [dt.date(2026, 1, 1) + dt.timedelta(days=n) for n in range(365)]

    runs = [schedule.run_time(day).astimezone(zone) for day in days]

    assert [run.date() for run in runs] == days
    moved = [run for run in runs if run.time() != dt.time(2, 30)]
    assert all(run.time() == dt.time(3, 0) for run in moved)
    assert len(moved) == (0 if zone is SHANGHAI else 1)


# Wall-clock steps


STEP_CASES = [
    # (wall time before the step, step in hours, expected first run after the step)
    ("2026-12-10 14:00", 2, "2026-12-10 16:00"),
    ("2026-12-10 16:00", 1, "2026-12-11 15:00"),
    ("2026-12-10 14:00", 72, "2026-12-13 15:00"),
    ("2026-12-10 16:00", 72, "2026-12-13 16:00"),
    ("2026-12-10 16:00", -2, "2026-12-11 15:00"),
    ("2026-12-10 14:30", -2, "2026-12-10 15:00"),
    ("2026-12-10 16:00", -75, "2026-12-07 15:00"),
    ("2026-12-10 16:00", -72, "2026-12-08 15:00"),
    ("2026-12-11 01:00", -2, "2026-12-11 15:00"),
]


@pytest.mark.parametrize(("before", "step_hours", "first"), STEP_CASES)
def test_daily_after_clock_step(before: str, step_hours: int, first: str) -> None:
    trigger, clock = started(make_config(schedule=DAILY_15), local(SHANGHAI, "2026-12-10 12:00"))
    simulate(trigger, clock, (local(SHANGHAI, before) - clock.now()).total_seconds())
    clock.step(step_hours * HOUR)

    after_step = clock.now()
    planned = trigger.next_run(clock.monotonic, after_step)
    runs = simulate(trigger, clock, 3 * DAY)

    assert trigger.clock_stepped() == step_hours * HOUR
    assert planned == max(local(SHANGHAI, first), after_step)
    assert runs == daily_runs_from(local(SHANGHAI, first), until=clock.now())


@pytest.mark.parametrize(
    ("synced", "first"),
    [
        ("2026-12-04 10:00", "2026-12-04 15:00"),
        ("2026-12-04 16:00", "2026-12-04 16:00"),
    ],
)
def test_daily_after_dead_rtc_sync(synced: str, first: str) -> None:
    config = make_config(schedule=DAILY_15)
    trigger, clock = started(config, dt.datetime(2000, 1, 1, 0, 0, tzinfo=UTC))
    assert simulate(trigger, clock, 5 * MINUTE) == []

    clock.step((local(SHANGHAI, synced) - clock.now()).total_seconds())
    runs = simulate(trigger, clock, 2 * DAY)

    assert runs == daily_runs_from(local(SHANGHAI, first), until=clock.now())


def test_clock_step_is_logged_with_next_run(caplog: pytest.LogCaptureFixture) -> None:
    trigger, clock = started(make_config(schedule=DAILY_15), local(SHANGHAI, "2026-12-10 12:00"))
    clock.step(-DAY)

    with caplog.at_level(logging.WARNING, logger="tvm_upload.schedule"):
        trigger.due(clock.monotonic, clock.now())

    assert "Wall clock stepped by -86400 s" in caplog.text
    assert "2026-12-09T15:00:00+08:00" in caplog.text


def test_step_detector_threshold() -> None:
    detector = ClockStepDetector(threshold_seconds=120.0)
    wall = dt.datetime(2026, 12, 1, tzinfo=UTC)
    assert detector.observe(0.0, wall) is None

    assert detector.observe(10.0, wall + dt.timedelta(seconds=100)) is None
    assert detector.take_unreported() is None

    assert detector.observe(20.0, wall + dt.timedelta(seconds=300)) == 190.0
    assert detector.observe(30.0, wall + dt.timedelta(seconds=10)) == -300.0
    assert detector.take_unreported() == -110.0
    assert detector.take_unreported() is None


# A drain still running


def busy_between(start_seconds: float, end_seconds: float, origin: float) -> Busy:
    """Return a busy function true from ``start_seconds`` to ``end_seconds`` after ``origin``."""

    def busy(clock: FakeClock) -> bool:
        return start_seconds <= clock.monotonic - origin < end_seconds

    return busy


def test_interval_runs_merge_while_busy() -> None:
    schedule = {"mode": "interval", "interval_hours": 0, "interval_minutes": 5}
    trigger, clock = started(make_config(schedule=schedule), local(SHANGHAI, "2026-12-01 00:00"))
    busy = busy_between(4 * MINUTE, 17 * MINUTE, clock.monotonic)

    runs = simulate(trigger, clock, 30 * MINUTE, busy=busy)

    assert [run.strftime("%H:%M") for run in runs] == ["00:17", "00:20", "00:25"]


def test_daily_run_waits_for_busy_drain() -> None:
    trigger, clock = started(make_config(schedule=DAILY_15), local(SHANGHAI, "2026-12-01 14:00"))
    busy = busy_between(50 * MINUTE, 2 * HOUR + 10 * MINUTE, clock.monotonic)

    runs = simulate(trigger, clock, 2 * DAY, busy=busy)

    assert runs == [local(SHANGHAI, "2026-12-01 16:10"), local(SHANGHAI, "2026-12-02 15:00")]


def test_daily_runs_merge_over_long_busy_drain() -> None:
    trigger, clock = started(make_config(schedule=DAILY_15), local(SHANGHAI, "2026-12-01 14:00"))
    busy = busy_between(0.0, DAY + 2 * HOUR, clock.monotonic)

    runs = simulate(trigger, clock, 3 * DAY, busy=busy)

    assert runs == [local(SHANGHAI, "2026-12-02 16:00"), local(SHANGHAI, "2026-12-03 15:00")]


def test_waiting_run_shows_in_status() -> None:
    trigger, clock = started(make_config(window=NIGHT_WINDOW), local(SHANGHAI, "2026-12-01 12:00"))
    clock.advance(2 * HOUR)

    assert not trigger.due(clock.monotonic, clock.now(), busy=True)
    description = trigger.describe(clock.monotonic, clock.now())

    assert description == {
        "mode": "interval",
        "next_run": "2026-12-01T14:00:00+08:00",
        "run_waiting": True,
        "window_open": False,
    }
    assert trigger.due(clock.monotonic, clock.now(), busy=False)
    assert not trigger.due(clock.monotonic, clock.now(), busy=False)


# Status


def test_describe_daily_over_spring_forward() -> None:
    config = make_config(zone="Europe/Berlin", schedule="02:30", window=NIGHT_WINDOW)
    trigger = build_trigger(config)
    now = local(BERLIN, "2026-03-28 23:00")

    description = trigger.describe(100.0, now)

    assert description == {
        "mode": "daily",
        "next_run": "2026-03-29T03:00:00+02:00",
        "run_waiting": False,
        "window_open": True,
    }


def test_describe_interval() -> None:
    trigger = build_trigger(make_config())
    now = local(SHANGHAI, "2026-12-01 12:00")
    trigger.due(100.0, now)

    description = trigger.describe(100.0 + 30 * MINUTE, now + dt.timedelta(minutes=30))

    assert description["mode"] == "interval"
    assert description["next_run"] == "2026-12-01T14:00:00+08:00"
    assert description["window_open"] is True


def test_step_seen_by_status_is_reported_once() -> None:
    trigger, clock = started(make_config(), local(SHANGHAI, "2026-12-01 12:00"))
    clock.advance(MINUTE)
    clock.step(3 * HOUR)

    trigger.describe(clock.monotonic, clock.now())

    assert trigger.clock_stepped() == 3 * HOUR
    assert trigger.clock_stepped() is None


def test_stalled_loop_is_not_a_clock_step() -> None:
    trigger, clock = started(make_config(schedule=DAILY_15), local(SHANGHAI, "2026-12-01 12:00"))
    clock.advance(5 * HOUR)

    assert trigger.due(clock.monotonic, clock.now())
    assert trigger.clock_stepped() is None
    assert trigger.next_run(clock.monotonic, clock.now()) == local(SHANGHAI, "2026-12-02 15:00")
