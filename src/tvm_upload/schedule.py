"""When the queue is drained: immediate uploads, scheduled runs and clock steps.

``build_trigger(config)`` returns the trigger that the daemon calls on every
loop step. It combines three rules:

- Immediate: a file that becomes ready inside the operational window (or at
  any time when the window is disabled) releases the whole queue with batch
  upload on, otherwise only itself.
- Scheduled: the whole queue is drained every interval, measured on the
  monotonic clock, or once a day at a wall time in the configured zone,
  whatever the window.
- Start: the queue is drained once right after start when
  ``upload_on_start`` is set.

Triggers read no clock themselves. Every method takes the times it needs,
so tests drive them with a fake clock. Wall times are handled as UTC
instants, because Python compares and subtracts two datetimes that share a
tzinfo by their local fields, which is wrong across a DST change.
"""

from __future__ import annotations

import enum
import logging
import math
from datetime import date, datetime, time, timedelta, timezone, tzinfo
from typing import Protocol

from tvm_upload.config import Config, OperationalHours, ScheduleSettings

logger = logging.getLogger(__name__)

CLOCK_STEP_THRESHOLD_SECONDS = 120.0
"""How far the wall clock may move apart from the monotonic clock between two calls before
it counts as a step. NTP slewing changes the clock rate by a small fraction, so between calls
a quarter second apart it moves the clocks apart by far less than this."""

_ONE_DAY = timedelta(days=1)


class DrainScope(enum.Enum):
    """How much of the queue a trigger releases."""

    NONE = "none"
    FILE = "file"
    QUEUE = "queue"


class Trigger(Protocol):
    """Decides when queued files are uploaded. Called from the daemon's main loop only."""

    def on_start(self) -> bool:
        """Return True to drain the queue once right after start."""
        ...

    def on_ready(self, now: datetime) -> DrainScope:
        """Return what a file that just became ready releases at wall time ``now``."""
        ...

    def due(self, monotonic_now: float, now: datetime, *, busy: bool = False) -> bool:
        """Return True once per scheduled run that is due, and the caller then drains the queue.

        While ``busy`` is True (a drain is still running) a due run waits, and
        every run that comes due meanwhile merges into it.
        """
        ...

    def next_run(self, monotonic_now: float, now: datetime) -> datetime | None:
        """Return the wall time of the next scheduled run, or None when there is none."""
        ...

    def clock_stepped(self) -> float | None:
        """Return the wall-clock steps seen since the last call, in seconds, or None."""
        ...

    def describe(self, monotonic_now: float, now: datetime) -> dict[str, object]:
        """Return the schedule state for ``tvm-upload status``."""
        ...


class ImmediateTrigger:
    """Trigger that uploads every file as soon as it is ready and drains the queue at start.

    It has no schedule.
    """

    def on_start(self) -> bool:
        return True

    def on_ready(self, now: datetime) -> DrainScope:
        return DrainScope.QUEUE

    def due(self, monotonic_now: float, now: datetime, *, busy: bool = False) -> bool:
        return False

    def next_run(self, monotonic_now: float, now: datetime) -> datetime | None:
        return None

    def clock_stepped(self) -> float | None:
        return None

    def describe(self, monotonic_now: float, now: datetime) -> dict[str, object]:
        return {"mode": "immediate", "next_run": None, "run_waiting": False, "window_open": True}


class ClockStepDetector:
    """Detector of wall-clock steps, found by comparing the progress of both clocks.

    Between two readings both clocks advance by the same amount unless the
    wall clock was set (NTP after a boot with a dead RTC, a manual change) or
    the machine was suspended, which Linux's monotonic clock does not count.
    """

    def __init__(self, threshold_seconds: float = CLOCK_STEP_THRESHOLD_SECONDS) -> None:
        self.threshold_seconds = threshold_seconds
        self._last: tuple[float, datetime] | None = None
        self._unreported_seconds: float | None = None

    def observe(self, monotonic_now: float, now_utc: datetime) -> float | None:
        """Record a pair of readings and return the step since the previous pair, or None.

        The step is in seconds and positive when the wall clock jumped forward.
        """
        last = self._last
        self._last = (monotonic_now, now_utc)
        if last is None:
            return None

        wall_seconds = (now_utc - last[1]).total_seconds()
        step_seconds = wall_seconds - (monotonic_now - last[0])
        if abs(step_seconds) <= self.threshold_seconds:
            return None

        self._unreported_seconds = (self._unreported_seconds or 0.0) + step_seconds
        return step_seconds

    def take_unreported(self) -> float | None:
        """Return the sum of the steps observed since the last call, or None, and reset it."""
        step_seconds, self._unreported_seconds = self._unreported_seconds, None
        return step_seconds


class Schedule(Protocol):
    """Run times of scheduled drains; ``now`` arguments are aware UTC datetimes."""

    mode: str

    def take_due(self, monotonic_now: float, now: datetime) -> bool:
        """Return True when a run time has passed, and move on to the next run time.

        Several run times that passed since the previous call count as one run.
        """
        ...

    def next_run(self, monotonic_now: float, now: datetime) -> datetime:
        """Return the UTC time of the next run."""
        ...

    def replan(self, step_seconds: float, now: datetime) -> None:
        """Adjust the next run time after the wall clock stepped by ``step_seconds``."""
        ...


class IntervalSchedule:
    """Schedule of a run every ``interval_seconds`` on the monotonic clock.

    The first run is one interval after start, which is the first monotonic
    time the schedule is given. Later runs stay on that grid. Run times that
    passed while the loop was stalled count as one run, and the next is the
    next grid point. Wall-clock steps do not move the schedule.
    """

    mode = "interval"

    def __init__(self, interval_seconds: float) -> None:
        if interval_seconds <= 0:
            raise ValueError(f"interval_seconds must be above 0, got {interval_seconds}")
        self.interval_seconds = interval_seconds
        self._next_monotonic: float | None = None

    def take_due(self, monotonic_now: float, now: datetime) -> bool:
        next_monotonic = self._anchor(monotonic_now)
        if monotonic_now < next_monotonic:
            return False

        passed = math.floor((monotonic_now - next_monotonic) / self.interval_seconds) + 1
        self._next_monotonic = next_monotonic + passed * self.interval_seconds
        return True

    def next_run(self, monotonic_now: float, now: datetime) -> datetime:
        remaining_seconds = self._anchor(monotonic_now) - monotonic_now
        return now + timedelta(seconds=remaining_seconds)

    def replan(self, step_seconds: float, now: datetime) -> None:
        """Keep the run times, which follow the monotonic clock."""

    def _anchor(self, monotonic_now: float) -> float:
        if self._next_monotonic is None:
            self._next_monotonic = monotonic_now + self.interval_seconds
        return self._next_monotonic


class DailySchedule:
    """Schedule of one run per calendar date in ``zone``, at the wall time ``at``.

    - The first run is the first run time at or after start.
    - A run time that a DST change skips (02:30 on a spring-forward day) runs
      at the first instant after the gap (03:00). A run time that occurs twice
      (fall back) runs at its first occurrence only.
    - Run times that passed while the loop was stalled count as one run.
    - After the wall clock steps forward, today's run is owed unless it
      already happened today: it is due at once if its time has passed (one
      catch-up run), otherwise at its time.
    - After the wall clock steps back, the next run is the first run time
      after the new wall time on a date other than that of the last run.
    """

    mode = "daily"

    def __init__(self, at: time, zone: tzinfo) -> None:
        self.at = at
        self.zone = zone
        self._next: datetime | None = None
        self._last_date: date | None = None

    def take_due(self, monotonic_now: float, now: datetime) -> bool:
        if now < self._planned(now):
            return False

        today = self._local_date(now)
        latest = today if self.run_time(today) <= now else today - _ONE_DAY
        self._last_date = latest
        self._next = self.run_time(latest + _ONE_DAY)
        return True

    def next_run(self, monotonic_now: float, now: datetime) -> datetime:
        return self._planned(now)

    def replan(self, step_seconds: float, now: datetime) -> None:
        today = self._local_date(now)
        if step_seconds > 0 and today != self._last_date:
            self._next = self.run_time(today)
            return

        self._next = self._first_run_from(now)

    def run_time(self, day: date) -> datetime:
        """Return the UTC instant of the run on ``day``, following the DST rules above."""
        local = datetime.combine(day, self.at, tzinfo=self.zone)
        instant = local.astimezone(timezone.utc)
        if instant.astimezone(self.zone).replace(tzinfo=None) == local.replace(tzinfo=None):
            return instant
        return _end_of_gap(local)

    def _planned(self, now: datetime) -> datetime:
        if self._next is None:
            self._next = self._first_run_from(now)
        return self._next

    def _first_run_from(self, now: datetime) -> datetime:
        """Return the first run time at or after ``now`` on a date other than the last run's."""
        day = self._local_date(now)
        while day == self._last_date or self.run_time(day) < now:
            day += _ONE_DAY
        return self.run_time(day)

    def _local_date(self, now: datetime) -> date:
        return now.astimezone(self.zone).date()


def _end_of_gap(local: datetime) -> datetime:
    """Return the first UTC instant whose wall time reaches ``local``, which a DST gap skips.

    The two readings of the missing wall time (with the offsets before and
    after the change) bracket the change. Inside that bracket the wall time
    only rises, so a bisection on whole seconds finds the change.
    """
    zone = local.tzinfo
    target = local.replace(tzinfo=None)
    low, high = sorted(int(local.replace(fold=fold).timestamp()) for fold in (0, 1))
    while low < high:
        middle = (low + high) // 2
        if datetime.fromtimestamp(middle, zone).replace(tzinfo=None) >= target:
            high = middle
        else:
            low = middle + 1
    return datetime.fromtimestamp(low, timezone.utc)


class ScheduledTrigger:
    """Trigger for immediate uploads inside the operational window, plus interval or daily runs.

    A run that comes due while the caller reports ``busy`` waits until the
    drain in progress ends. Every run that comes due meanwhile merges into it,
    so runs are neither started twice nor dropped. It is not thread-safe, so
    the daemon calls it from its main loop only.
    """

    def __init__(
        self,
        schedule: Schedule,
        *,
        zone: tzinfo,
        window: OperationalHours,
        batch_upload: bool = True,
        upload_on_start: bool = True,
        step_detector: ClockStepDetector | None = None,
    ) -> None:
        self.schedule = schedule
        self.zone = zone
        self.window = window
        self.batch_upload = batch_upload
        self.upload_on_start = upload_on_start
        self._steps = step_detector or ClockStepDetector()
        self._run_waiting = False

    def on_start(self) -> bool:
        """Return ``upload_on_start``: drain once after start, whatever the window."""
        return self.upload_on_start

    def window_open(self, now: datetime) -> bool:
        """Tell whether ``now`` is inside the operational window; always True when it is disabled.

        The window includes its start and excludes its end (09:00 to 18:00
        is open at 09:00 and closed at 18:00), and wraps midnight when its
        end is earlier than its start.
        """
        return self.window.permits(_to_utc(now).astimezone(self.zone).time())

    def on_ready(self, now: datetime) -> DrainScope:
        """Return QUEUE (batch upload) or FILE inside the window, and NONE outside it."""
        if not self.window_open(now):
            return DrainScope.NONE
        return DrainScope.QUEUE if self.batch_upload else DrainScope.FILE

    def due(self, monotonic_now: float, now: datetime, *, busy: bool = False) -> bool:
        now_utc = self._observe(monotonic_now, now)
        if self.schedule.take_due(monotonic_now, now_utc):
            self._note_run_due(busy)

        if not self._run_waiting or busy:
            return False
        self._run_waiting = False
        return True

    def next_run(self, monotonic_now: float, now: datetime) -> datetime:
        """Return the wall time of the next run in the zone, or ``now`` when a run is overdue.

        A run is overdue while it waits for a busy drain, or when a catch-up
        run after a clock step has not been taken by ``due()`` yet.
        """
        now_utc = self._observe(monotonic_now, now)
        if self._run_waiting:
            return now_utc.astimezone(self.zone)
        return self._planned_run(monotonic_now, now_utc).astimezone(self.zone)

    def clock_stepped(self) -> float | None:
        """Return the wall-clock steps seen since the last call, in seconds, or None.

        Positive means the clock jumped forward. The schedule has already
        been adjusted and the step logged. The caller should run a
        reconciliation scan, because file mtimes may now look old or new.
        """
        return self._steps.take_unreported()

    def describe(self, monotonic_now: float, now: datetime) -> dict[str, object]:
        """Return mode, next_run (ISO 8601 in the zone), run_waiting and window_open."""
        next_run = self.next_run(monotonic_now, now)
        return {
            "mode": self.schedule.mode,
            "next_run": next_run.isoformat(timespec="seconds"),
            "run_waiting": self._run_waiting,
            "window_open": self.window_open(now),
        }

    def take_state_from(self, previous: ScheduledTrigger) -> None:
        """Carry a reloaded trigger's state over from the one it replaces.

        When the schedule's run times did not change, this trigger keeps the
        previous schedule, so the next run time does not move (an interval
        does not start counting again), and a run waiting for a busy drain
        still runs. The clock step detector is always kept.
        """
        self._steps = previous._steps
        if _same_plan(previous.schedule, self.schedule):
            self.schedule = previous.schedule
            self._run_waiting = previous._run_waiting

    def _observe(self, monotonic_now: float, now: datetime) -> datetime:
        now_utc = _to_utc(now)
        step_seconds = self._steps.observe(monotonic_now, now_utc)
        if step_seconds is None:
            return now_utc

        self.schedule.replan(step_seconds, now_utc)
        next_run = self._planned_run(monotonic_now, now_utc).astimezone(self.zone)
        logger.warning(
            "Wall clock stepped by %+.0f s, so the next scheduled run is at %s",
            step_seconds,
            next_run.isoformat(timespec="seconds"),
        )
        return now_utc

    def _planned_run(self, monotonic_now: float, now_utc: datetime) -> datetime:
        return max(self.schedule.next_run(monotonic_now, now_utc), now_utc)

    def _note_run_due(self, busy: bool) -> None:
        if self._run_waiting:
            logger.debug("Scheduled run merged into the one still waiting for uploads to finish")
        elif busy:
            logger.info("Scheduled run is due and starts when the uploads in progress finish")
        self._run_waiting = True


def _to_utc(now: datetime) -> datetime:
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"wall time must be timezone-aware, got {now.isoformat()}")
    return now.astimezone(timezone.utc)


def build_schedule(settings: ScheduleSettings, zone: tzinfo) -> IntervalSchedule | DailySchedule:
    """Build the interval or daily schedule that ``upload.schedule`` configures."""
    if settings.mode == "daily":
        return DailySchedule(settings.daily_time, zone)
    return IntervalSchedule(settings.interval_seconds)


def build_trigger(config: Config, *, previous: Trigger | None = None) -> ScheduledTrigger:
    """Build the trigger for ``config``: its schedule, window, batch mode and start drain.

    After a reload, pass the running trigger as ``previous`` to keep its
    state (see ``ScheduledTrigger.take_state_from``).
    """
    upload = config.upload
    zone = config.zone()
    trigger = ScheduledTrigger(
        build_schedule(upload.schedule, zone),
        zone=zone,
        window=upload.operational_hours,
        batch_upload=upload.batch_upload.enabled,
        upload_on_start=upload.upload_on_start,
    )
    if isinstance(previous, ScheduledTrigger):
        trigger.take_state_from(previous)
    return trigger


def _same_plan(old: Schedule, new: Schedule) -> bool:
    """Tell whether two schedules have the same run times, whatever their state."""
    if isinstance(old, IntervalSchedule) and isinstance(new, IntervalSchedule):
        return old.interval_seconds == new.interval_seconds
    if isinstance(old, DailySchedule) and isinstance(new, DailySchedule):
        return old.at == new.at and str(old.zone) == str(new.zone)
    return False
