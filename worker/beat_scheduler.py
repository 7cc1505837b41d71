"""Celery beat's scheduler for variflow: any number of beats, one sending.

``celery -A worker.celery_app beat`` loads :class:`BeatScheduler` (the app's
``beat_scheduler`` setting names it). Every beat checks the lease in the
database (worker/beat_leader.py); only the leader sends, and it claims each
send for its period first (worker/beat.py), so a beat that wrongly believes it
still leads (paused past its lease) cannot send a period twice.

Entries run on periods aligned on the epoch (``poll-due`` every 2 s at :00, :02,
:04, ...; ``sweep`` every 30 s at :00 and :30), so that every beat names a period
the same way, and a new leader sends at once what the old one had not sent for
the current period. Beat keeps no schedule file: the database holds its state.
"""

from __future__ import annotations

import copy
import logging
import time
from datetime import datetime
from typing import Any

from celery.beat import ScheduleEntry, Scheduler
from celery.schedules import schedule as interval_schedule

from worker import beat
from worker.beat_leader import Leadership, liveness_file
from worker.celery_app import worker_runtime

log = logging.getLogger(__name__)

# Headers of each message beat sends: which period it is for, and which beat sent it.
PERIOD_HEADER = "variflow_beat_period"
SENDER_HEADER = "variflow_beat_id"


def interval_of(entry: ScheduleEntry) -> float:
    """The entry's interval in seconds; only interval schedules have periods every beat
    computes alike (a crontab's next run depends on when each beat last saw it run)."""
    if type(entry.schedule) is not interval_schedule:
        raise ValueError(
            f"beat entry {entry.name!r}: variflow's beat runs interval schedules only "
            f"(got {entry.schedule!r})"
        )
    return float(entry.schedule.run_every.total_seconds())


class BeatScheduler(Scheduler):  # type: ignore[misc]  # Celery ships no type hints
    """Celery's in-memory scheduler, sending only while this beat leads, each send
    claimed for its period in the database first."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Set before Celery's __init__, which sets the schedule up unless lazy (a
        # lazy instance only describes itself for beat's banner: it never ticks).
        self.leadership: Leadership | None = None
        self._last_period: dict[str, datetime] = {}
        super().__init__(*args, **kwargs)

    def setup_schedule(self) -> None:
        super().setup_schedule()
        for entry in self.schedule.values():
            interval_of(entry)  # an entry beat cannot run stops it at start
        settings = worker_runtime().settings
        self.leadership = Leadership(
            worker_runtime().db,
            settings.beat_lease_ttl,
            entries=tuple(self.schedule),
            liveness=liveness_file(settings.home),
        )

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """Check the lease when due; while leading, send every entry whose period has
        come. Returns the seconds until there is something to do again."""
        leadership = self.leadership
        if leadership is None:
            return float(self.max_interval)
        leadership.check()
        wait = leadership.seconds_to_next_check()
        if leadership.leads:
            for entry in list(self.schedule.values()):
                due, next_period_in = self.is_due(entry)
                if due:
                    self.apply_entry(entry, producer=self.producer)
                wait = min(wait, next_period_in)
        return float(min(wait, self.max_interval))

    def is_due(self, entry: ScheduleEntry) -> tuple[bool, float]:
        """Due when the current period is one this beat has not dealt with yet."""
        period, next_period_in = beat.period_at(time.time(), interval_of(entry))
        last = self._last_period.get(entry.name)
        return last is None or period > last, next_period_in

    def apply_entry(self, entry: ScheduleEntry, producer: Any = None) -> None:
        """Send the entry if this beat wins the claim of its current period."""
        assert self.leadership is not None, "a lazy scheduler never ticks"
        period, _ = beat.period_at(time.time(), interval_of(entry))
        # Dealt with, whoever wins: a lost claim is not tried again within the period.
        self._last_period[entry.name] = period
        if not self.leadership.claim(entry.name, period):
            log.debug("%s for the period at %s: sent already", entry.name, period.isoformat())
            return
        self.reserve(entry)  # Celery's own count of runs and last run, for `celery inspect`
        super().apply_entry(self._stamped(entry, period), producer=producer)

    def _stamped(self, entry: ScheduleEntry, period: datetime) -> ScheduleEntry:
        # A copy: the headers name this send only.
        assert self.leadership is not None
        stamped = copy.copy(entry)
        headers = {
            **entry.options.get("headers", {}),
            PERIOD_HEADER: period.isoformat(),
            SENDER_HEADER: self.leadership.beat_id,
        }
        stamped.options = {**entry.options, "headers": headers}
        return stamped

    def close(self) -> None:
        try:
            if self.leadership is not None:
                self.leadership.release()
        finally:
            super().close()

    @property
    def info(self) -> str:
        return "    . leader lease -> the database (VARIFLOW_BEAT_LEASE_TTL)"
