"""The dashboard's overview (/dashboard/overview): jobs per bucket by how they ended,
p50/p95 time to completion and error codes, aggregated in SQL on SQLite and on
PostgreSQL from rows seeded at known times, statuses and codes.

The sums are asserted through webhooks.dashboard.overview.load_overview with a fixed
"now" (exact buckets and bounds), and the page through Flask's test client (its
totals, its SVG, its 400s).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import event, text

from tests.dashboard_support import backend as backend
from tests.dashboard_support import client as client
from tests.unit.test_dashboard import AUTH, USER
from webhooks.dashboard.overview import (
    IN_FLIGHT,
    NO_CODE,
    TOP_ERRORS,
    WINDOWS,
    Overview,
    interpolate,
    load_overview,
)
from worker.models import Job, utcnow
from worker.runtime import current, session_scope

# 12:30:20 UTC: the hour window is [11:31, 12:31), its last bucket 12:30 (partial).
NOW = datetime(2026, 3, 1, 12, 30, 20, tzinfo=UTC)
HOUR_START = datetime(2026, 3, 1, 11, 31, tzinfo=UTC)
HOUR_END = datetime(2026, 3, 1, 12, 31, tzinfo=UTC)
TOTAL = re.compile(r'data-total="([a-z_0-9]+)"><span class="n">([^<]*)</span>')
BAR = re.compile(
    r'<rect class="bar s-([a-z_]+)" data-series="\1" x="[\d.]+" y="[\d.]+" '
    r'width="([\d.]+)" height="([\d.]+)"/>'
)


def job(
    created: datetime,
    status: str = "completed",
    took: float | None = None,
    provider: str = "piapi",
    code: str | None = None,
) -> dict[str, Any]:
    """A job row created at ``created``; an ended one ended ``took`` seconds later."""
    ended = status in ("completed", "failed", "cancelled")
    finished = created + timedelta(seconds=took if took is not None else 5.0)
    return {
        "id": uuid.uuid4(),
        "provider": provider,
        "status": status,
        "params": {"prompt": "a cat"},
        "deadline": created + timedelta(hours=1),
        "created_at": created,
        "updated_at": finished if ended else created,
        "completed_at": finished if ended else None,
        "error_code": code,
        "progress": 100 if status == "completed" else 0,
    }


def seed(*rows: dict[str, Any]) -> None:
    with session_scope() as session:
        session.add_all(Job(**row) for row in rows)


def overview(window: str = "hour", provider: str | None = None, now: datetime = NOW) -> Overview:
    with session_scope() as session:
        return load_overview(session, WINDOWS[window], provider, now)


def at(minute: int, second: float = 0.0) -> datetime:
    """A time in the hour window: minute 0 is its first bucket (11:31)."""
    return HOUR_START + timedelta(minutes=minute, seconds=second)


# --- sums ------------------------------------------------------------------------------


def test_jobs_are_counted_in_the_minute_they_were_created_by_how_they_ended(
    backend: str,
) -> None:
    seed(
        job(at(0), "completed"),
        job(at(0, 59.999), "completed"),  # the bucket's last instant: still minute 0
        job(at(0, 30), "failed", code="timeout"),
        job(at(1), "completed"),  # the next minute
        job(at(1, 1), "cancelled"),
        job(at(30, 10), "queued"),
        job(at(30, 20), "submitted"),
        job(at(30, 30), "processing"),
        job(at(59, 19.5), "completed"),  # the current, partial minute (12:30)
    )
    found = overview()
    assert (found.start, found.end) == (HOUR_START, HOUR_END)
    assert len(found.buckets) == 60
    assert [b.start for b in found.buckets[:2]] == [at(0), at(1)]
    by_bucket = {i: b.counts for i, b in enumerate(found.buckets) if b.total}
    none = {"completed": 0, "failed": 0, "cancelled": 0, IN_FLIGHT: 0}
    assert by_bucket == {
        0: none | {"completed": 2, "failed": 1},
        1: none | {"completed": 1, "cancelled": 1},
        30: none | {IN_FLIGHT: 3},
        59: none | {"completed": 1},
    }
    assert found.totals == {"completed": 4, "failed": 1, "cancelled": 1, IN_FLIGHT: 3}
    assert found.total == 9


def test_the_day_is_cut_into_quarter_hours(backend: str) -> None:
    day_start = datetime(2026, 2, 28, 12, 45, tzinfo=UTC)  # 96 quarters up to 12:45 today
    seed(
        job(day_start, "completed"),
        job(day_start + timedelta(minutes=14, seconds=59), "failed", code="x"),
        job(day_start + timedelta(minutes=15), "completed"),
        job(NOW, "completed"),
    )
    found = overview("day")
    assert found.start == day_start and found.end == datetime(2026, 3, 1, 12, 45, tzinfo=UTC)
    assert len(found.buckets) == 96
    totals = {i: b.total for i, b in enumerate(found.buckets) if b.total}
    assert totals == {0: 2, 1: 1, 95: 1}


def test_only_jobs_created_in_the_window_count(backend: str) -> None:
    seed(
        job(HOUR_START - timedelta(microseconds=1), "failed", code="too-old"),
        job(HOUR_START - timedelta(days=2), "completed", took=1000.0),
        job(HOUR_START, "failed", code="first-instant"),
        job(HOUR_END - timedelta(microseconds=1), "completed", took=3.0),
        job(HOUR_END, "failed", code="after-the-end"),
    )
    found = overview()
    assert found.totals == {"completed": 1, "failed": 1, "cancelled": 0, IN_FLIGHT: 0}
    assert found.errors == (("first-instant", 1),)
    assert (found.p50, found.p95) == (3.0, 3.0)
    assert found.buckets[0].counts["failed"] == 1
    assert found.buckets[-1].counts["completed"] == 1


def test_time_to_completion_percentiles_per_bucket_and_over_the_window(backend: str) -> None:
    seed(
        # Minute 5: 10, 20, 30, 40 s -> p50 25, p95 30 + 0.85 * 10 (percentile_cont).
        *(job(at(5, s), "completed", took=took) for s, took in enumerate([40, 10, 30, 20])),
        job(at(7, 3), "completed", took=7.0),  # one job: both percentiles are its time
        job(at(5, 9), "failed", took=500.0, code="x"),  # not completed: no time to completion
        job(at(5, 10), "cancelled", took=900.0),
        job(at(9), "processing"),
    )
    found = overview()
    minute5, minute7 = found.buckets[5], found.buckets[7]
    assert minute5.p50 == pytest.approx(25.0)
    assert minute5.p95 == pytest.approx(38.5)
    assert minute7.p50 == pytest.approx(7.0) and minute7.p95 == pytest.approx(7.0)
    assert all(
        b.p50 is None and b.p95 is None for i, b in enumerate(found.buckets) if i not in (5, 7)
    )
    # Over the window: 7, 10, 20, 30, 40.
    assert found.p50 == pytest.approx(20.0)
    assert found.p95 == pytest.approx(38.0)
    # Fractions of a second are kept (to the millisecond at least).
    seed(*(job(at(12, i), "completed", took=took) for i, took in enumerate([0.25, 1.5, 90.125])))
    minute12 = overview().buckets[12]
    assert minute12.p50 == pytest.approx(1.5, abs=1e-3)
    assert minute12.p95 == pytest.approx(1.5 + 0.9 * (90.125 - 1.5), abs=1e-3)


def test_interpolation_is_percentile_conts() -> None:
    values = {0: 10.0, 1: 20.0, 2: 30.0, 3: 40.0}
    assert interpolate(values, 4, 0.5) == 25.0
    assert interpolate(values, 4, 0.95) == pytest.approx(38.5)
    assert interpolate({0: 4.0}, 1, 0.95) == 4.0


def test_error_codes_are_counted_most_first(backend: str) -> None:
    seed(
        *(job(at(10, i), "failed", code="upstream_failed") for i in range(3)),
        *(job(at(20, i), "failed", code="timeout") for i in range(2)),
        job(at(21), "failed", code=None),
        job(at(22), "cancelled", code="cancelled_by_user"),  # not a failure
        job(at(23), "failed", code="lemon_error", provider="lemondata"),
    )
    found = overview()
    # Ties by code, a job without one first.
    assert found.errors == (
        ("upstream_failed", 3),
        ("timeout", 2),
        (NO_CODE, 1),
        ("lemon_error", 1),
    )
    assert found.other_errors == 0
    assert overview(provider="lemondata").errors == (("lemon_error", 1),)

    # Beyond the top codes, the rest are added up: code-00 once, code-01 twice, ...
    codes = [f"code-{i:02d}" for i in range(TOP_ERRORS + 3)]
    seed(*(job(at(i, n), "failed", code=c) for i, c in enumerate(codes) for n in range(i + 1)))
    found = overview()
    assert [c for c, _ in found.errors] == codes[::-1][:TOP_ERRORS]
    assert found.other_errors == 1 + 2 + 3 + (3 + 2 + 1 + 1)  # code-00..02 and the first ones
    assert sum(n for _, n in found.errors) + found.other_errors == found.failed


def test_a_provider_is_shown_alone(backend: str) -> None:
    seed(
        job(at(3), "completed", took=10.0, provider="piapi"),
        job(at(3), "completed", took=50.0, provider="piclaza"),
        job(at(3), "failed", provider="piclaza", code="piclaza_error"),
        job(at(4), "queued", provider="lemondata"),
    )
    piclaza = overview(provider="piclaza")
    assert piclaza.totals == {"completed": 1, "failed": 1, "cancelled": 0, IN_FLIGHT: 0}
    assert (piclaza.p50, piclaza.errors) == (50.0, (("piclaza_error", 1),))
    assert overview(provider="lemondata").totals[IN_FLIGHT] == 1
    everyone = overview()
    assert everyone.total == 4 and everyone.p50 == pytest.approx(30.0)


# --- bounded: the window's index ---------------------------------------------------------


@pytest.fixture
def statements(backend: str) -> Iterator[list[tuple[str, Any]]]:
    """The SQL the overview sends (with its parameters), to ask the planner about."""
    engine = current().db.engine
    seen: list[tuple[str, Any]] = []

    def grab(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if " jobs" in statement:
            seen.append((statement, params))

    event.listen(engine, "before_cursor_execute", grab)
    yield seen
    event.remove(engine, "before_cursor_execute", grab)


def test_every_query_reads_the_window_through_the_status_created_at_index(
    backend: str, statements: list[tuple[str, Any]]
) -> None:
    engine = current().db.engine
    postgres = backend == "postgres"
    # Many old jobs of every provider and status, so that a planner with statistics
    # has every reason to prefer the window's range to anything else.
    with engine.begin() as conn:
        if postgres:
            conn.execute(
                text(
                    "INSERT INTO jobs (id, provider, status, params, deadline, created_at,"
                    " updated_at, completed_at, error_code, progress, submit_attempts,"
                    " poll_attempts, priority)"
                    " SELECT gen_random_uuid(), (ARRAY['piapi','piclaza','lemondata'])[1 + i % 3],"
                    " (ARRAY['completed','failed','cancelled','queued'])[1 + i % 4], '{}',"
                    " :now, :old - i * interval '1 minute', :now, :old, 'e', 0, 0, 0, 0"
                    " FROM generate_series(1, 20000) AS i"
                ),
                {"now": NOW, "old": HOUR_START - timedelta(hours=1)},
            )
            conn.execute(text("ANALYZE jobs"))
    seed(job(at(1), "completed"), job(at(2), "failed", code="x"))
    for provider in (None, "piapi"):
        statements.clear()
        overview("day", provider)
        assert len(statements) == 4  # counts, percentiles by bucket and overall, codes
        with engine.connect() as conn:
            cursor = conn.connection.cursor()
            for statement, params in statements:
                cursor.execute(
                    ("EXPLAIN " if postgres else "EXPLAIN QUERY PLAN ") + statement, params
                )
                plan = "\n".join(str(row) for row in cursor.fetchall())
                assert "ix_jobs_status_created_at" in plan, plan
                assert "Seq Scan" not in plan and "SCAN jobs" not in plan, plan


# --- the page ----------------------------------------------------------------------------


def totals_of(html: str) -> dict[str, str]:
    return dict(TOTAL.findall(html))


def test_the_page_draws_the_last_hour(client: FlaskClient) -> None:
    now = utcnow()
    seed(
        *(job(now - timedelta(minutes=20), "completed", took=t) for t in (4.0, 8.0, 12.0)),
        job(now - timedelta(minutes=10), "failed", code="upstream_failed"),
        job(now - timedelta(minutes=10), "failed", code='<img src=x onerror="alert(1)">'),
        job(now - timedelta(minutes=5), "cancelled"),
        job(now - timedelta(seconds=5), "processing"),
        job(now - timedelta(hours=3), "completed", took=600.0),  # the day's, not the hour's
    )
    response = client.get("/dashboard/overview", auth=AUTH)
    assert response.status_code == 200
    html = response.text
    assert "Content-Security-Policy" in response.headers
    assert totals_of(html) == {
        "all": "7",
        "completed": "3",
        "failed": "2",
        "cancelled": "1",
        IN_FLIGHT: "1",
        "p50": "8.0 s",
        "p95": "12 s",
    }
    bars = BAR.findall(html)
    assert {series for series, _, _ in bars} == {"completed", "failed", "cancelled", IN_FLIGHT}
    assert all(float(width) > 0 and float(height) > 0 for _, width, height in bars)
    assert 'id="durations-chart"' in html and "<polyline" in html
    # Codes from upstream are text, never markup.
    assert "<img src=x" not in html and "&lt;img src=x" in html
    assert re.search(r'data-code="upstream_failed" data-count="1"', html)
    assert 'href="/dashboard/overview"' in html  # the navigation's link

    day = client.get("/dashboard/overview?window=day", auth=AUTH).text
    assert totals_of(day)["all"] == "8"
    assert "Jobs per 15 minutes" in day

    # One provider: these were all piapi's.
    assert totals_of(client.get("/dashboard/overview?provider=piapi", auth=AUTH).text)["all"] == "7"
    piclaza = client.get("/dashboard/overview?provider=piclaza", auth=AUTH).text
    assert '<option value="piclaza" selected>' in piclaza
    assert "No jobs in the last hour for piclaza." in piclaza
    seed(job(now - timedelta(minutes=2), "failed", provider="piclaza", code="x"))
    piclaza = client.get("/dashboard/overview?provider=piclaza", auth=AUTH).text
    assert totals_of(piclaza)["all"] == "1" and totals_of(piclaza)["failed"] == "1"


def test_an_empty_window_says_so(client: FlaskClient) -> None:
    seed(job(utcnow() - timedelta(hours=2), "completed"))
    html = client.get("/dashboard/overview", auth=AUTH).text
    assert "No jobs in the last hour." in html
    assert "<svg" not in html
    assert (
        "No jobs in the last hour for lemondata."
        in client.get("/dashboard/overview?provider=lemondata", auth=AUTH).text
    )
    assert totals_of(client.get("/dashboard/overview?window=day", auth=AUTH).text)["all"] == "1"


BAD_QUERIES = {
    "window=week": "window: one of hour, day",
    "window=HOUR": "window: one of hour, day",
    "provider=nope": "provider: one of piapi, piclaza, lemondata",
    "window=day&provider=%3Cb%3E": "provider: one of",
}


def test_a_bad_parameter_is_a_400_naming_it_and_no_credentials_a_401(
    client: FlaskClient,
) -> None:
    for query, named in BAD_QUERIES.items():
        response = client.get(f"/dashboard/overview?{query}", auth=AUTH)
        assert response.status_code == 400, query
        assert named in response.text
        assert "<b>" not in response.text
    assert client.get("/dashboard/overview").status_code == 401
    assert client.get("/dashboard/overview", auth=(USER, "wrong")).status_code == 401
