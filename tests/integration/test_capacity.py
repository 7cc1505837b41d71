"""Capacity admission (worker/capacity.py) decided on real databases, at injected times.

Every test writes job rows as the flows leave them (a queued job waiting, one claimed,
one submitted upstream, one that failed today...) and asks :func:`capacity.admit` about
a queued job at a chosen ``now``: no clock is waited for, so pauses, the breaker's
cool-down, GCRA turns and the UTC day can be crossed in one step. SQLite and
PostgreSQL both, since slots and budgets are counted by one SQL query on each.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import delete

from worker import capacity, jobs
from worker.accounts import Account, Limits
from worker.capacity import Decision, Usage
from worker.errors import ErrorCode
from worker.models import AccountState, Job
from worker.runtime import session_scope

# A fixed "now", early enough in its UTC day that an hour either side stays in it.
T0 = datetime(2025, 3, 14, 12, 0, 0, tzinfo=UTC)
MIDNIGHT = datetime(2025, 3, 15, tzinfo=UTC)
PARAMS = {"origin_task_id": "o-1", "index": "1", "prompt": "a cat"}


@pytest.fixture(
    params=["sqlite", pytest.param("postgres", marks=pytest.mark.services)], autouse=True
)
def database(request: pytest.FixtureRequest) -> Iterator[str]:
    request.getfixturevalue("pg_url" if request.param == "postgres" else "sqlite_url")
    # pg_url empties the job tables only: an earlier test's pause or breaker would leak.
    with session_scope() as session:
        session.execute(delete(AccountState))
    yield str(request.param)


def account(name: str = "main", provider: str = "piapi", **limits: Any) -> Account:
    return Account(provider, name, f"key-{name}", Limits(**limits))


def add_job(
    status: str = "queued",
    *,
    created: datetime = T0 - timedelta(minutes=5),
    provider: str = "piapi",
    **fields: Any,
) -> uuid.UUID:
    """A job row as the flows write it; ``status`` and ``fields`` say where it stands."""
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "provider": provider,
        "status": status,
        "params": PARAMS,
        "deadline": T0 + timedelta(days=30),
        "created_at": created,
        "updated_at": created,
        "progress": 0,
    }
    if status != "queued":
        # Accepted upstream: it has a task; the claim and create_started_at were cleared.
        values |= {"upstream_task_id": f"t-{values['id']}", "submitted_at": created}
        values.setdefault("account", "main")
    values.update(fields)
    with session_scope() as session:
        session.add(Job(**values))
    job_id: uuid.UUID = values["id"]
    return job_id


def add_many(count: int, status: str, **fields: Any) -> None:
    for _ in range(count):
        add_job(status, **fields)


def admit(
    job_id: uuid.UUID, accounts: list[Account] | Account, now: datetime, **options: Any
) -> Decision:
    """The decision for one queued job at ``now``, committed (rate turns and probes stay)."""
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        given = accounts if isinstance(accounts, list) else [accounts]
        return capacity.admit(session, given, job, now, **options)


def usage(now: datetime, provider: str = "piapi") -> dict[str, Usage]:
    with session_scope() as session:
        return capacity.usage_by_account(session, provider, now)


def state(acct: Account) -> AccountState | None:
    with session_scope() as session:
        found = session.get(AccountState, (acct.provider, acct.name))
        if found is not None:
            session.expunge(found)
        return found


def claim(job_id: uuid.UUID, until: datetime, **fields: Any) -> None:
    """What claim_for_submit leaves on a row: a token and its expiry (and the account)."""
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.claim_token = uuid.uuid4().hex
        job.claimed_until = until
        job.account = job.account or "main"
        for name, value in fields.items():
            setattr(job, name, value)


# --------------------------------------------------------------------------- slots


def test_a_full_account_makes_the_next_job_wait_for_a_slot_with_the_counts() -> None:
    main = account(max_in_flight=3)
    add_job("submitted")
    add_job("processing")
    claim(add_job(), T0 + timedelta(seconds=10))  # claimed: its create is about to go
    waiting = add_job(created=T0)

    decision = admit(waiting, main, T0)

    assert not decision.admitted
    assert decision.reason == "waiting for a slot: 3/3 in flight on piapi/main"
    assert decision.until is None  # a job's end frees it, not the clock
    assert usage(T0)["main"].in_flight == 3


def test_staged_jobs_go_beyond_the_slots_up_to_the_providers_own_queue() -> None:
    staging = account(max_in_flight=3, max_staged=1)
    add_many(3, "processing")
    fourth, fifth = add_job(created=T0), add_job(created=T0 + timedelta(seconds=1))
    assert admit(fourth, staging, T0).admitted  # held upstream, started as a slot frees
    claim(fourth, T0 + timedelta(seconds=30), account="main")
    waiting = admit(fifth, staging, T0)
    assert waiting.reason == (
        "waiting for a slot: 4/3 (+1 staged upstream) in flight on piapi/main"
    )
    assert room_now([staging], T0) == 0


def test_an_expired_claim_frees_its_slot_unless_its_create_may_have_been_sent() -> None:
    """A worker killed holding a claim leaks nothing: slots are counted from rows, and a
    lapsed claim of a job whose create was never sent holds none. One whose create may
    have gone out still holds its slot (a paid task may be running upstream)."""
    main = account(max_in_flight=2)
    dead = add_job(created=T0 - timedelta(minutes=2))
    claim(dead, T0 + timedelta(seconds=3))
    add_job("submitted")
    waiting = add_job(created=T0)

    assert usage(T0)["main"].in_flight == 2
    assert admit(waiting, main, T0).reason == "waiting for a slot: 2/2 in flight on piapi/main"

    after_ttl = T0 + timedelta(seconds=3, microseconds=1)
    assert usage(after_ttl)["main"].in_flight == 1
    # The dead worker's job is first in line again, so it gets the free slot first...
    assert admit(dead, main, after_ttl).admitted
    second = admit(waiting, main, after_ttl)
    assert second.reason == "waiting for a slot: 1 earlier jobs of piapi go first"
    assert second.ahead == 1

    # ...but a lapsed claim with its create sent keeps the slot until the sweep settles it.
    claim(dead, T0 + timedelta(seconds=3), create_started_at=T0)
    assert usage(after_ttl)["main"].in_flight == 2
    assert not admit(waiting, main, after_ttl).admitted


def test_jobs_are_admitted_first_in_first_out_and_higher_priorities_jump_the_queue() -> None:
    main = account(max_in_flight=2)
    a = add_job(created=T0 - timedelta(seconds=40))
    b = add_job(created=T0 - timedelta(seconds=30))
    urgent = add_job(created=T0 - timedelta(seconds=20), priority=5)
    d = add_job(created=T0 - timedelta(seconds=10))
    # Not in line: one waiting out its retry backoff, one past its deadline.
    add_job(created=T0 - timedelta(hours=1), retry_at=T0 + timedelta(seconds=5))
    add_job(created=T0 - timedelta(hours=1), deadline=T0 - timedelta(seconds=1))

    decisions = {name: admit(job, main, T0) for name, job in [("urgent", urgent), ("a", a)]}
    assert {name: (d.admitted, d.ahead) for name, d in decisions.items()} == {
        "urgent": (True, 0),
        "a": (True, 1),
    }
    late = admit(b, main, T0)
    assert (late.admitted, late.ahead) == (False, 2)
    assert late.reason == "waiting for a slot: 2 earlier jobs of piapi go first"
    assert admit(d, main, T0).ahead == 3

    # The urgent job is claimed: it holds a slot and is no longer ahead of anyone.
    claim(urgent, T0 + timedelta(seconds=30))
    assert (admit(a, main, T0).admitted, admit(b, main, T0).ahead) == (True, 1)
    assert not admit(b, main, T0).admitted  # one free slot, and a goes first

    # Equal priority and creation time: the id decides, the same way every time.
    twins = sorted([add_job(created=T0), add_job(created=T0)])
    assert admit(twins[1], main, T0).ahead == admit(twins[0], main, T0).ahead + 1


def test_with_two_accounts_the_job_goes_where_most_slots_are_free() -> None:
    a, b = account("a", max_in_flight=2), account("b", max_in_flight=2)
    add_job("submitted", account="a")
    job = add_job(created=T0)

    assert admit(job, [a, b], T0).account == b
    add_job("submitted", account="b")
    add_job("submitted", account="b")
    assert admit(job, [a, b], T0).account == a
    add_job("submitted", account="a")
    full = admit(job, [a, b], T0)
    assert full.reason == (
        "waiting for a slot: 2/2 in flight on piapi/a; waiting for a slot: 2/2 in flight on piapi/b"
    )


def test_accounts_without_slot_limits_share_by_fewest_in_flight() -> None:
    a, b = account("a", daily_jobs=1000), account("b", daily_jobs=1000)
    add_job("submitted", account="a")
    job = add_job(created=T0)
    assert admit(job, [a, b], T0).account == b
    add_job("submitted", account="b")
    add_job("submitted", account="b")
    assert admit(job, [a, b], T0).account == a


def test_an_admission_says_how_many_more_may_go_now() -> None:
    slots = account("main", max_in_flight=5)
    add_job("submitted", account="main")
    job = add_job(created=T0)
    # 4 free: this job takes one, 3 more may go (the caller wakes them).
    assert admit(job, [slots], T0).spare == 3
    paced = account("main", max_in_flight=5, creates_per_minute=60)
    assert admit(job, [paced], T0 + timedelta(hours=1)).spare == 0


# --------------------------------------------------------------------------- pause, breaker


def test_a_429_pauses_the_account_until_retry_after() -> None:
    main = account(max_in_flight=5)
    job = add_job(created=T0)
    until = T0 + timedelta(seconds=42)
    with session_scope() as session:
        capacity.pause(session, main, until, "piapi: rate limited (429)", T0)

    paused = admit(job, main, T0 + timedelta(seconds=1))

    assert paused.reason == "paused until 12:00:42 UTC on piapi/main: piapi: rate limited (429)"
    assert paused.until == until
    assert admit(job, main, until - timedelta(microseconds=1)).until == until
    assert admit(job, main, until).admitted


def test_the_breaker_opens_after_the_threshold_lets_one_probe_through_and_closes() -> None:
    main = account(max_in_flight=5)
    probe, other = add_job(created=T0 - timedelta(seconds=2)), add_job(created=T0)
    options = {"breaker_threshold": 3, "breaker_cooldown": 60.0}

    def outcome(job_id: uuid.UUID, at: datetime, *, transient: bool) -> None:
        with session_scope() as session:
            capacity.record_outcome(
                session,
                main,
                job_id,
                transient_failure=transient,
                now=at,
                threshold=3,
                cooldown=60,
            )

    for _ in range(2):
        outcome(other, T0, transient=True)
    assert admit(probe, main, T0, **options).admitted  # two in a row: still closed
    outcome(other, T0, transient=True)

    opened = admit(probe, main, T0 + timedelta(seconds=1), **options)
    assert opened.reason == "circuit open until 12:01:00 UTC on piapi/main (3 failures in a row)"
    assert opened.until == T0 + timedelta(seconds=60)

    after = T0 + timedelta(seconds=60)
    assert admit(probe, main, after, **options).admitted  # the probe
    half_open = state(main)
    assert half_open is not None and half_open.probe_job_id == probe
    half = admit(other, main, after, **options)
    assert half.reason == "circuit half open on piapi/main: one probe job decides"
    assert half.until == after + timedelta(seconds=60)  # unless the probe reports first
    assert admit(probe, main, after, **options).admitted  # the probe itself may go again

    # The probe fails: open again for a cool-down.
    outcome(probe, after, transient=True)
    reopened = admit(other, main, after, **options)
    assert reopened.until == after + timedelta(seconds=60)
    assert "(4 failures in a row)" in (reopened.reason or "")

    # The next probe succeeds: closed, everyone goes.
    later = after + timedelta(seconds=60)
    assert admit(probe, main, later, **options).admitted
    outcome(probe, later, transient=False)
    assert admit(other, main, later, **options).admitted
    closed = state(main)
    assert closed is not None
    assert (closed.failures, closed.opened_until, closed.probe_job_id) == (0, None, None)
    with session_scope() as session:
        [status] = capacity.snapshot(session, [main], later, 3)
    assert status.breaker == "closed"


def test_a_probe_that_never_reports_gives_way_to_another_after_the_cool_down() -> None:
    main = account(max_in_flight=5)
    lost, other = add_job(created=T0 - timedelta(seconds=2)), add_job(created=T0)
    options = {"breaker_threshold": 1, "breaker_cooldown": 30.0}
    with session_scope() as session:
        capacity.record_outcome(
            session, main, other, transient_failure=True, now=T0, threshold=1, cooldown=30
        )
    half_open = T0 + timedelta(seconds=30)
    assert admit(lost, main, half_open, **options).admitted  # its worker then dies
    assert not admit(other, main, half_open + timedelta(seconds=29), **options).admitted

    assert admit(other, main, half_open + timedelta(seconds=30), **options).admitted
    probe = state(main)
    assert probe is not None and probe.probe_job_id == other


# --------------------------------------------------------------------------- daily budgets


def test_the_daily_failed_task_budget_waits_for_the_next_utc_day() -> None:
    main = account(daily_failed=60, max_in_flight=100)
    today = T0 - timedelta(hours=1)
    add_many(59, "failed", completed_at=today, error_code=ErrorCode.UPSTREAM_FAILED.value)
    # Failures that are not the provider's do not count against its allowance...
    add_many(3, "failed", completed_at=today, error_code=ErrorCode.TIMEOUT.value)
    # ...nor do yesterday's.
    add_many(3, "failed", completed_at=T0 - timedelta(days=1), error_code="upstream_failed")
    job = add_job(created=T0)
    assert admit(job, main, T0).admitted
    add_job("failed", completed_at=today, error_code=ErrorCode.UPSTREAM_REJECTED.value)

    waiting = admit(job, main, T0)

    assert waiting.reason == (
        "daily budget of 60 failed tasks reached on piapi/main: resumes 00:00 UTC"
    )
    assert waiting.until == MIDNIGHT
    assert not waiting.fail
    assert usage(T0)["main"].failed_today == 60
    assert admit(job, main, MIDNIGHT - timedelta(microseconds=1)).until == MIDNIGHT
    assert admit(job, main, MIDNIGHT).admitted  # a new UTC day

    refused = admit(job, main, T0, budget_policy="fail")
    assert refused.fail and refused.reason == waiting.reason


def test_the_daily_job_budget_counts_the_jobs_created_upstream_today() -> None:
    """Jobs the provider accepted today count, whatever became of them (rows as the flows
    leave them: ``create_started_at`` is cleared once the create's answer is known)."""
    main = account(daily_jobs=3)
    add_job("completed", submitted_at=T0 - timedelta(hours=2), completed_at=T0)
    add_job("submitted", submitted_at=T0 - timedelta(hours=1))
    add_job("completed", submitted_at=T0 - timedelta(days=1), completed_at=T0 - timedelta(days=1))
    job = add_job(created=T0)
    assert admit(job, main, T0).admitted
    # A create in flight (claimed, the call made, no answer yet) counts too.
    claim(add_job(), T0 + timedelta(seconds=10), create_started_at=T0)

    waiting = admit(job, main, T0)

    assert waiting.reason == "daily budget of 3 jobs reached on piapi/main: resumes 00:00 UTC"
    assert waiting.until == MIDNIGHT
    assert admit(job, main, T0, budget_policy="fail").fail
    assert admit(job, main, MIDNIGHT + timedelta(seconds=1)).admitted


def test_the_daily_spend_cap_counts_reported_costs_and_prices_of_jobs_ended_today() -> None:
    main = account(daily_spend_cap=1.0, price_per_job=0.1, price_per_image=0.05)
    add_job("completed", completed_at=T0 - timedelta(hours=1), cost=0.5)
    add_job("completed", completed_at=T0 - timedelta(days=1), cost=5.0)
    # No reported cost: priced by the account, per job and per result image.
    add_job("completed", completed_at=T0, result_urls=["https://r/1.png", "https://r/2.png"])
    job = add_job(created=T0)
    assert usage(T0)["main"].spend(main.limits) == pytest.approx(0.7)
    assert admit(job, main, T0).admitted
    add_job("failed", completed_at=T0, cost=0.3, error_code="upstream_failed")

    waiting = admit(job, main, T0)

    assert waiting.reason == "daily spend cap of 1 reached on piapi/main: resumes 00:00 UTC"
    assert waiting.until == MIDNIGHT
    assert admit(job, main, MIDNIGHT).admitted


def test_the_fail_policy_fails_only_when_every_account_is_out_of_budget() -> None:
    spent = account("spent", daily_failed=0)
    full = account("full", max_in_flight=1)
    add_job("submitted", account="full")
    job = add_job(created=T0)

    both = admit(job, [spent, full], T0, budget_policy="fail")
    assert not both.fail  # "full" frees a slot when a job ends: worth waiting for
    assert both.reason == (
        "daily budget of 0 failed tasks reached on piapi/spent: resumes 00:00 UTC; "
        "waiting for a slot: 1/1 in flight on piapi/full"
    )
    assert both.until == MIDNIGHT
    alone = admit(job, [spent], T0, budget_policy="fail")
    assert alone.fail and not alone.admitted


# --------------------------------------------------------------------------- rates (GCRA)


def test_creates_per_minute_space_admissions_one_interval_apart() -> None:
    main = account(creates_per_minute=60)
    first, second, third = (add_job(created=T0 + timedelta(seconds=i)) for i in range(3))

    assert admit(first, main, T0).admitted
    same_second = admit(second, main, T0 + timedelta(milliseconds=400))

    assert same_second.reason == "rate limit of 60 creates a minute on piapi/main"
    assert same_second.until == T0 + timedelta(seconds=1)
    assert admit(second, main, T0 + timedelta(seconds=1)).admitted
    # No burst after a quiet spell: the turn after a late admission is one interval later.
    assert admit(third, main, T0 + timedelta(seconds=1)).until == T0 + timedelta(seconds=2)
    assert admit(third, main, T0 + timedelta(seconds=30)).admitted
    assert admit(first, main, T0 + timedelta(seconds=30)).until == T0 + timedelta(seconds=31)


def test_requests_per_minute_limits_creates_and_single_request_turns() -> None:
    main = account("main", "lemondata", requests_per_minute=120)
    job = add_job(created=T0, provider="lemondata")
    assert admit(job, main, T0).admitted
    assert admit(job, main, T0).reason == "rate limit of 120 requests a minute on lemondata/main"

    half = T0 + timedelta(milliseconds=500)
    with session_scope() as session:
        assert capacity.take_request_turn(session, main, half) is None
    with session_scope() as session:
        assert capacity.take_request_turn(session, main, half) == T0 + timedelta(seconds=1)
    assert admit(job, main, half).until == T0 + timedelta(seconds=1)


def test_the_queue_head_is_the_first_job_waiting_for_capacity() -> None:
    first = add_job(created=T0 - timedelta(seconds=3), waiting_reason="waiting for a slot")
    urgent = add_job(created=T0, priority=3, waiting_reason="waiting for a slot")
    claimed = add_job(created=T0 - timedelta(seconds=9), waiting_reason="waiting for a slot")
    claim(claimed, T0 + timedelta(seconds=30))
    add_job(created=T0 - timedelta(seconds=9))  # never asked yet: its own message will
    with session_scope() as session:
        head = capacity.waiting_head(session, "piapi", 5, T0)
    assert head == [urgent, first]


def room_now(accounts: list[Account], now: datetime) -> int:
    with session_scope() as session:
        return capacity.room_now(session, accounts, now)


def test_a_wake_counts_every_free_slot_not_one_per_ended_job() -> None:
    a, b = account("a", max_in_flight=3), account("b", max_in_flight=3)
    add_many(2, "submitted", account="a")
    assert room_now([a, b], T0) == 4  # 1 free on a, 3 on b: a lost wake is made good
    claim(add_job(), T0 + timedelta(seconds=30), account="b")
    assert room_now([a, b], T0) == 3  # a live claim holds its slot
    with session_scope() as session:
        capacity.pause(session, b, T0 + timedelta(seconds=10), "rate limited (429)", T0)
    assert room_now([a, b], T0) == 1  # a paused account has no room until it resumes
    assert room_now([a, b], T0 + timedelta(seconds=10)) == 3


def test_a_paced_account_wakes_one_job_and_an_unlimited_one_a_bounded_batch() -> None:
    paced = account("main", "lemondata", max_in_flight=5, requests_per_minute=120)
    assert room_now([paced], T0) == 1  # the rest would only wake to wait for their turn
    assert room_now([account("main", daily_jobs=1000)], T0) == capacity.MAX_WAKE
    assert room_now([], T0) == 0


def test_usage_is_counted_per_account_from_rows_alone() -> None:
    add_job("submitted", account="a")
    add_job("processing", account="b")
    add_job("completed", account="a", completed_at=T0, cost=0.25)
    add_job("failed", account="b", completed_at=T0, error_code="upstream_rejected")
    add_job("submitted", account="a", provider="piclaza")
    found = usage(T0)
    assert set(found) == {"a", "b"}
    assert found["a"].in_flight == 1 and found["a"].reported_spend == 0.25
    assert found["b"].in_flight == 1 and found["b"].failed_today == 1


def test_without_daily_budgets_only_the_slots_in_use_are_counted() -> None:
    add_job("submitted", account="a")
    add_job("completed", account="a", completed_at=T0, cost=0.25)
    add_job("failed", account="a", completed_at=T0, error_code="upstream_rejected")
    with session_scope() as session:
        slots_only = capacity.usage_by_account(session, "piapi", T0, daily=False)
    assert slots_only == {"a": Usage(in_flight=1)}
    assert usage(T0)["a"] == Usage(1, 3, 1, 0.25, 0, 0)  # all three went upstream today


# --------------------------------------------------------------------------- waking


def wake(accounts: list[Account], now: datetime, at_least: int = 0) -> list[uuid.UUID]:
    with session_scope() as session:
        return capacity.to_wake(session, accounts, now, at_least=at_least)


def waiting(created: datetime, **fields: Any) -> uuid.UUID:
    return add_job(created=created, waiting_reason="waiting for a slot", **fields)


def test_a_free_slot_wakes_its_job_once_however_many_ends_ask() -> None:
    main = account("main", max_in_flight=2)
    add_job("submitted", account="main")
    first, second, third = (waiting(T0 - timedelta(seconds=s)) for s in (30, 20, 10))
    assert wake([main], T0) == [first]  # one free slot
    # Every later end reads the same free slot until the woken job is admitted: the
    # job on its way is not sent again, and nobody behind it is woken for its slot.
    assert wake([main], T0 + timedelta(seconds=1)) == []
    assert wake([main], T0 + timedelta(seconds=2)) == []
    # Two ended: two slots free, one of them already on its way.
    with session_scope() as session:
        session.execute(
            Job.__table__.update().where(Job.status == "submitted").values(status="completed")
        )
    assert wake([main], T0 + timedelta(seconds=3)) == [second]
    assert third not in wake([main], T0 + timedelta(seconds=4))


def test_a_wake_whose_message_was_lost_is_sent_again_after_its_transit_time() -> None:
    main = account("main", max_in_flight=1)
    head = waiting(T0 - timedelta(seconds=30))
    assert wake([main], T0) == [head]
    later = T0 + capacity.WAKE_IN_TRANSIT
    assert wake([main], later - timedelta(milliseconds=1)) == []
    assert wake([main], later) == [head]


def test_a_woken_job_that_found_no_room_is_back_in_line_at_once() -> None:
    main = account("main", max_in_flight=1)
    head = waiting(T0 - timedelta(seconds=30))
    assert wake([main], T0) == [head]
    with session_scope() as session:  # its admission lost the slot to another job
        assert jobs.set_waiting(session, head, "waiting for a slot", T0, announce=False)
    assert wake([main], T0 + timedelta(seconds=1)) == [head]


def test_the_sweep_wakes_the_head_without_room_unless_it_is_on_its_way() -> None:
    main = account("main", max_in_flight=1)
    add_job("submitted", account="main")
    head = waiting(T0 - timedelta(seconds=30))
    assert wake([main], T0) == []
    assert wake([main], T0, at_least=1) == [head]
    assert wake([main], T0 + timedelta(seconds=1), at_least=1) == []


def test_an_admitted_job_wakes_the_next_but_never_itself() -> None:
    asking = waiting(T0 - timedelta(seconds=30))
    behind = waiting(T0 - timedelta(seconds=20))
    with session_scope() as session:
        assert capacity.wake_next(session, "piapi", 1, T0, but=asking) == [behind]
        assert capacity.wake_next(session, "piapi", 0, T0) == []


def test_a_job_deep_in_a_long_line_surely_waits_and_only_then() -> None:
    slotted = [account("a", max_in_flight=3, max_staged=1), account("b", max_in_flight=3)]
    deep = 4 + 3 + capacity.MAX_WAKE  # every slot, staged ones too, and a margin
    assert capacity.surely_waits(slotted, deep - 1) is None  # admission must decide
    assert capacity.surely_waits(slotted, deep) == (
        f"waiting for a slot: {deep} earlier jobs of piapi go first"
    )
    # An account without a slot limit could take any number: only admission can tell.
    unlimited = [account("a", max_in_flight=3), account("b", requests_per_minute=60)]
    assert capacity.surely_waits(unlimited, 10_000) is None
    assert capacity.surely_waits([], 10_000) is None


def test_a_place_deep_in_line_is_counted_only_as_far_as_it_decides() -> None:
    main = account("main", max_in_flight=1)
    for seconds in range(capacity.PLACES_SHOWN + 5):
        add_job(created=T0 - timedelta(hours=1) + timedelta(seconds=seconds))
    last = add_job(created=T0 - timedelta(minutes=1))
    decision = admit(last, main, T0)  # a free slot, for the first of the others
    assert decision.ahead == capacity.PLACES_SHOWN
    assert decision.reason == (
        f"waiting for a slot: {capacity.PLACES_SHOWN}+ earlier jobs of piapi go first"
    )
    # Without a slot limit on every account, the whole line is counted.
    unlimited = [main, account("spare", requests_per_minute=60)]
    with session_scope() as session:
        job = session.get(Job, last)
        assert job is not None
        cap = capacity.line_cap(unlimited)
        assert cap is None
        assert capacity.jobs_ahead(session, job, T0, cap) == capacity.PLACES_SHOWN + 5


def test_a_success_closes_the_breaker_in_one_write_only_when_something_was_noted() -> None:
    main = account("main", max_in_flight=5)
    with session_scope() as session:  # nothing noted: nothing written, not even a row
        assert not capacity.record_success(session, main, T0)
    assert state(main) is None
    job = add_job()
    with session_scope() as session:
        for _ in range(2):
            capacity.record_outcome(
                session, main, job, transient_failure=True, now=T0, threshold=5, cooldown=60
            )
    noted = state(main)
    assert noted is not None and noted.failures == 2
    with session_scope() as session:
        assert capacity.record_success(session, main, T0)
    cleared = state(main)
    assert cleared is not None and (cleared.failures, cleared.probe_job_id) == (0, None)


def test_many_processes_asking_at_once_wake_a_free_slots_job_once(database: str) -> None:
    """Every end of a busy provider asks for the head of the line at about the same
    moment: the first picks it, the others find it on its way (PostgreSQL: the rows are
    locked in line order and read again; SQLite: writers take turns)."""
    main = account("main", max_in_flight=1)
    line = [waiting(T0 - timedelta(seconds=60 - i)) for i in range(5)]
    barrier = threading.Barrier(8)
    woken: list[uuid.UUID] = []
    errors: list[BaseException] = []

    def ask() -> None:
        try:
            barrier.wait(timeout=30)
            woken.extend(wake([main], T0))
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert woken == [line[0]]
