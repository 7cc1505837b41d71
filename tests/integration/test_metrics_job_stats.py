"""Jobs by status and polling lag are read at scrape time with one grouped query (and
one indexed MIN query), cached per process: on PostgreSQL and on the embedded SQLite."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import event

from webhooks import create_app
from worker import job_stats, metrics
from worker.models import Job, utcnow
from worker.runtime import current, session_scope


@pytest.fixture(autouse=True)
def _fresh_metrics() -> Iterator[None]:
    metrics.reset_metrics()
    job_stats.job_stats_cache.clear()
    yield
    metrics.reset_metrics()
    job_stats.job_stats_cache.clear()


@pytest.fixture(
    params=["sqlite_url", pytest.param("pg_url", marks=pytest.mark.services)],
    ids=["sqlite", "postgresql"],
)
def database(request: pytest.FixtureRequest) -> str:
    url: str = request.getfixturevalue(request.param)
    return url


@pytest.fixture
def client(database: str) -> FlaskClient:
    app = create_app()
    app.testing = True
    return app.test_client()


def add_jobs(*rows: dict[str, Any]) -> None:
    now = utcnow()
    with session_scope() as session:
        for fields in rows:
            session.add(
                Job(
                    **{
                        "id": uuid.uuid4(),
                        "provider": "piclaza",
                        "params": {},
                        "deadline": now + timedelta(hours=1),
                        **fields,
                    }
                )
            )


def scrape(client: FlaskClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    answer = client.get("/metrics")
    assert answer.status_code == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(answer.get_data(as_text=True))
        for s in family.samples
    }


def jobs(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], status: str) -> float:
    return samples[("variflow_jobs", frozenset({("status", status)}))]


def test_one_grouped_query_per_cache_window(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    now = utcnow()
    add_jobs(
        *[{"status": "queued"} for _ in range(3)],
        {
            "status": "submitted",
            "upstream_task_id": "a",
            "next_poll_at": now - timedelta(seconds=40),
        },
        {
            "status": "submitted",
            "upstream_task_id": "b",
            "next_poll_at": now + timedelta(seconds=40),
        },
        {
            "status": "processing",
            "upstream_task_id": "c",
            "next_poll_at": now - timedelta(seconds=10),
        },
        {"status": "completed", "upstream_task_id": "d", "completed_at": now},
    )
    clock = [500.0]
    monkeypatch.setattr(job_stats.job_stats_cache, "clock", lambda: clock[0])
    statements: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        statements.append(" ".join(statement.split()))

    def job_stats_query(statement: str) -> bool:
        # The job-status queries; the accounts' capacity gauges have their own cache.
        return (
            "jobs" in statement and "account" not in statement and "waiting_reason" not in statement
        )

    engine = current().db.engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        first = scrape(client)
        clock[0] += job_stats.STATS_TTL / 2
        second = scrape(client)  # within the window: nothing is asked
        on_jobs = [s for s in statements if job_stats_query(s)]
        assert len(on_jobs) == 2, on_jobs
        grouped = [s for s in on_jobs if "GROUP BY" in s]
        assert len(grouped) == 1
        assert grouped[0].startswith("SELECT jobs.status, count(*)")
        assert grouped[0].endswith("FROM jobs GROUP BY jobs.status")
        (lag_query,) = [s for s in on_jobs if "GROUP BY" not in s]
        assert "min(jobs.next_poll_at)" in lag_query
        assert "UNION ALL" in lag_query

        clock[0] += job_stats.STATS_TTL  # the window has passed: asked again, once
        scrape(client)
        assert len([s for s in statements if job_stats_query(s)]) == 4
    finally:
        event.remove(engine, "before_cursor_execute", record)

    for samples in (first, second):
        assert jobs(samples, "queued") == 3
        assert jobs(samples, "submitted") == 2
        assert jobs(samples, "processing") == 1
        assert jobs(samples, "completed") == 1
        assert jobs(samples, "failed") == 0
        lag = samples[("variflow_polling_lag_seconds", frozenset())]
        assert 40 <= lag <= 40 + (utcnow() - now).total_seconds()
