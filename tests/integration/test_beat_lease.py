"""Beat's lease and period claims (worker/beat.py, worker/beat_leader.py) on SQLite and
PostgreSQL: one winner among concurrent claimers, takeover only of an expired lease and
within ttl + one check, a leader that cannot renew stops in time, and the liveness
record `variflow beat-health` reads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from celery.beat import ScheduleEntry
from celery.schedules import crontab, schedule
from click.testing import CliRunner
from sqlalchemy import delete, select

from worker import beat
from worker.beat_leader import Leadership, Liveness, liveness_file
from worker.beat_scheduler import interval_of
from worker.celery_app import app
from worker.cli import cli
from worker.config import ConfigError, load_settings
from worker.db import Database
from worker.models import BeatEntry, BeatLease
from worker.runtime import current

T0 = datetime(2025, 3, 14, 12, 0, 0, tzinfo=UTC)
TTL = 3.0
CHECK = TTL / 3
CLAIMERS = 8


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.services)])
def db(request: pytest.FixtureRequest) -> Iterator[Database]:
    request.getfixturevalue("pg_url" if request.param == "postgres" else "sqlite_url")
    database = current().db
    # The PostgreSQL database is shared by the session's tests: start from no lease.
    with database.session() as session:
        session.execute(delete(BeatLease))
        session.execute(delete(BeatEntry))
    yield database


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def all_at_once(db: Database, work: Callable[[object], bool], n: int = CLAIMERS) -> list[bool]:
    """``work(session)`` from ``n`` threads released together: what each got."""
    barrier = threading.Barrier(n)

    def one(_: int) -> bool:
        barrier.wait(timeout=30)
        with db.autocommit() as session:
            return work(session)

    with ThreadPoolExecutor(n) as pool:
        return list(pool.map(one, range(n)))


def claim(db: Database, entry: str, period: datetime, holder: str) -> bool:
    with db.autocommit() as session:
        return beat.claim_period(session, entry, period, holder, T0)


def hold(db: Database, holder: str, now: datetime) -> bool:
    with db.autocommit() as session:
        return beat.hold_lease(session, holder, now, TTL)


def lease(db: Database) -> BeatLease:
    with db.session() as session:
        found: BeatLease | None = session.scalar(select(BeatLease))
        assert found is not None
        return found


# --- period claims -----------------------------------------------------------------------


def test_one_of_many_concurrent_claimers_wins_each_period(db: Database) -> None:
    first, second = at(0), at(2)
    for period in (first, second):
        won = all_at_once(
            db,
            lambda s, p=period: beat.claim_period(s, "poll-due", p, "b", T0),  # type: ignore[misc]
        )
        assert won.count(True) == 1, won
    # A beat that slept through both (it still believes it leads) sends neither again.
    assert not claim(db, "poll-due", first, "paused")
    assert not claim(db, "poll-due", second, "paused")
    assert claim(db, "poll-due", at(4), "paused")


def test_entries_are_claimed_independently(db: Database) -> None:
    assert claim(db, "poll-due", at(0), "a")
    assert claim(db, "sweep", at(0), "b")
    assert not claim(db, "sweep", at(0), "a")


def test_the_table_keeps_one_row_per_scheduled_entry(db: Database) -> None:
    for n in range(5):
        assert claim(db, "poll-due", at(2 * n), "a")
    assert claim(db, "renamed-away", at(0), "a")
    with db.autocommit() as session:
        assert beat.forget_entries(session, ["poll-due", "sweep"]) == 1
    with db.session() as session:
        rows = session.scalars(select(BeatEntry)).all()
        assert [(r.entry, r.last_period) for r in rows] == [("poll-due", at(8))]


# --- the lease -----------------------------------------------------------------------------


def test_one_of_many_beats_takes_a_free_lease(db: Database) -> None:
    names = iter(range(CLAIMERS))
    lock = threading.Lock()

    def take(session: object) -> bool:
        with lock:
            me = f"beat-{next(names)}"
        return beat.hold_lease(session, me, T0, TTL)  # type: ignore[arg-type]

    assert all_at_once(db, take).count(True) == 1


def test_one_of_many_standbys_takes_an_expired_lease(db: Database) -> None:
    assert hold(db, "dead", T0)
    names = iter(range(CLAIMERS))
    lock = threading.Lock()

    def take(session: object) -> bool:
        with lock:
            me = f"standby-{next(names)}"
        return beat.hold_lease(session, me, at(TTL + 0.5), TTL)  # type: ignore[arg-type]

    assert all_at_once(db, take).count(True) == 1
    assert lease(db).holder.startswith("standby-")


def test_a_lease_is_taken_only_once_it_expired(db: Database) -> None:
    assert hold(db, "a", T0)
    assert not hold(db, "b", at(TTL - 0.001))
    assert hold(db, "a", at(1))  # renewed: it now expires at 1 + TTL
    assert not hold(db, "b", at(TTL + 0.5))
    assert lease(db).acquired_at == T0  # a renewal keeps when it was taken
    assert hold(db, "b", at(1 + TTL))
    assert not hold(db, "a", at(1 + TTL + 0.1))  # the old leader, back: it lost
    taken = lease(db)
    assert (taken.holder, taken.acquired_at, taken.expires_at) == (
        "b",
        at(1 + TTL),
        at(1 + 2 * TTL),
    )


def test_a_released_lease_is_taken_at_once(db: Database) -> None:
    assert hold(db, "a", T0)
    with db.autocommit() as session:
        assert not beat.release_lease(session, "b", at(1))  # not b's to release
        assert beat.release_lease(session, "a", at(1))
    assert hold(db, "b", at(1.1))


# --- leadership: checking the lease at a fixed rate ------------------------------------------


class FakeClock:
    """Wall and monotonic time at once, moved by the test."""

    def __init__(self) -> None:
        self.now = T0.timestamp()

    def __call__(self) -> float:
        return self.now


def leadership(db: Database, clock: FakeClock, beat_id: str, **kwargs: object) -> Leadership:
    return Leadership(db, TTL, beat_id=beat_id, clock=clock, monotonic=clock, **kwargs)  # type: ignore[arg-type]


def run_until(clock: FakeClock, beats: list[Leadership], done: Callable[[], bool]) -> None:
    step = 0.05
    for _ in range(int(10 * TTL / step)):
        for each in beats:
            each.check()
        if done():
            return
        clock.now += step
    raise AssertionError("never happened")


@pytest.mark.parametrize("standby_phase", [0.0, 0.35, 0.95])
def test_a_standby_leads_within_ttl_and_one_check_of_the_last_renewal(
    db: Database, standby_phase: float
) -> None:
    clock = FakeClock()
    a = leadership(db, clock, "a")
    a.check()
    assert a.leads
    clock.now += standby_phase * CHECK  # where in a's rhythm b checks
    b = leadership(db, clock, "b")
    run_until(clock, [a, b], lambda: clock.now >= T0.timestamp() + 2 * TTL)
    assert a.leads and not b.leads
    last_renewal = lease(db).renewed_at.timestamp()  # a dies here, right after it

    run_until(clock, [b], lambda: b.leads)

    taken = clock.now
    assert lease(db).holder == "b"
    assert taken >= last_renewal + TTL  # never a lease that was alive
    assert taken <= last_renewal + TTL + CHECK + 0.05  # the bound, to one step of the clock


def test_a_leader_that_cannot_renew_stops_before_its_lease_can_be_taken(
    db: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    a = leadership(db, clock, "a")
    a.check()
    assert a.leads
    a.db = Database(f"sqlite:///{tmp_path / 'no-tables.db'}")  # every statement fails
    try:
        run_until(clock, [a], lambda: not a.leads)
    finally:
        a.db.dispose()
    assert clock.now < T0.timestamp() + TTL  # before a standby could take the lease
    assert "could not check its lease" in caplog.text
    assert "stops sending" in caplog.text


def test_leadership_changes_are_logged(db: Database, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="worker.beat_leader")
    clock = FakeClock()
    a, b = leadership(db, clock, "a"), leadership(db, clock, "b")
    run_until(clock, [a, b], lambda: a.leads)
    assert "beat a leads" in caplog.text
    assert "beat b standing by (the lease is held by a" in caplog.text
    a.release()
    assert "beat a released the lease" in caplog.text
    run_until(clock, [b], lambda: b.leads)
    assert "beat b leads" in caplog.text


# --- liveness and `variflow beat-health` ---------------------------------------------------


def beat_health(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, ["beat-health", *args], prog_name="variflow")
    return result.exit_code, result.output


def test_beat_health_reports_this_hosts_beat(db: Database, tmp_path: Path) -> None:
    home = current().settings.home
    record = liveness_file(home)
    code, output = beat_health()
    assert code == 1 and "no beat has checked its lease on this host" in output

    Leadership(db, TTL, liveness=record, beat_id="here").check()  # the real clock
    code, output = beat_health()
    assert code == 0, output
    assert output.startswith("healthy: beat here leads; lease checked")

    Liveness("here", False, time.time() - 2 * TTL, TTL).write(record)  # two TTLs silent
    code, output = beat_health()
    assert code == 1 and output.startswith("unhealthy: beat here stands by"), output
    assert beat_health("--max-age", str(10 * TTL))[0] == 0
    code, output = beat_health("--json")
    assert code == 1 and '"healthy": false' in output and '"beat_id": "here"' in output


# --- the schedule ------------------------------------------------------------------------------


def test_periods_are_aligned_on_the_epoch() -> None:
    start, next_in = beat.period_at(T0.timestamp() + 3.25, 2.0)
    assert start == at(2) and next_in == pytest.approx(0.75)
    assert beat.period_at(T0.timestamp() + 3.999, 2.0)[0] == at(2)
    assert beat.period_at(T0.timestamp() + 4.0, 2.0)[0] == at(4)
    # A new interval (a redeploy) keeps periods moving forward in time.
    assert beat.period_at(T0.timestamp() + 6.5, 5.0)[0] > beat.period_at(T0.timestamp(), 2.0)[0]


def test_beat_runs_interval_entries_only() -> None:
    every = ScheduleEntry(name="poll-due", task="t", schedule=schedule(2.0), app=app)
    assert interval_of(every) == 2.0
    nightly = ScheduleEntry(name="nightly", task="t", schedule=crontab(minute="0"), app=app)
    with pytest.raises(ValueError, match="beat entry 'nightly'"):
        interval_of(nightly)


@pytest.mark.parametrize("value", ["0", "0.5", "3601", "soon"])
def test_a_bad_lease_ttl_is_refused_naming_the_variable(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VARIFLOW_BEAT_LEASE_TTL", value)
    with pytest.raises(ConfigError, match="VARIFLOW_BEAT_LEASE_TTL"):
        load_settings()
