"""Capacity made visible: each provider account's slots, today's budgets, pause and breaker,
and the jobs waiting for capacity, as GET /metrics, the dashboard and `variflow accounts`
show them, from the same rows, on the embedded SQLite and on PostgreSQL.

The rows are written as the flows leave them (a job in flight on an account, one that
failed upstream today, queued ones with a waiting reason) with account_states holding a
pause and a breaker; the accounts come from an accounts file, as in production.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from html import unescape
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import delete

from tests.conftest import Configure
from webhooks import create_app
from webhooks.metrics import capacity_cache
from worker import capacity, job_stats, metrics
from worker.accounts import Account, Limits
from worker.cli import cli
from worker.job_stats import wait_reason_kind
from worker.models import AccountState, Job, utcnow
from worker.runtime import current, session_scope

USER = "ops"
PASSWORD = "s3cret-pw"
AUTH = (USER, PASSWORD)
KEYS = {"a": "sk-live-aaaa-0001", "b": "sk-live-bbbb-0002", "c": "sk-live-cccc-0003"}
PAUSE_REASON = '429 <script>alert("x")</script> slow down'
ACCOUNTS_TOML = """
[piapi.a]
api_key_env = "TEST_PIAPI_KEY_A"
max_in_flight = 2
daily_jobs = 100
daily_failed = 30
price_per_job = 0.1
daily_spend_cap = 5.0

[piapi.b]
api_key_env = "TEST_PIAPI_KEY_B"
max_in_flight = 1

[piapi.c]
api_key_env = "TEST_PIAPI_KEY_C"
"""

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def fingerprint(name: str) -> str:
    return hashlib.sha256(KEYS[name].encode()).hexdigest()[:8]


@pytest.fixture(
    params=["sqlite_url", pytest.param("pg_url", marks=pytest.mark.services)],
    ids=["sqlite", "postgresql"],
)
def database(
    request: pytest.FixtureRequest,
    configure: Configure,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> Iterator[str]:
    url: str = request.getfixturevalue(request.param)
    for name, key in KEYS.items():
        monkeypatch.setenv(f"TEST_PIAPI_KEY_{name.upper()}", key)
    accounts_file = tmp_path / "accounts.toml"
    accounts_file.write_text(ACCOUNTS_TOML, encoding="utf-8")
    configure(
        accounts_file=accounts_file,
        lemondata_max_in_flight=4,  # lemondata/main from the environment, with slots
        dashboard_user=USER,
        dashboard_password=PASSWORD,
    )
    # pg_url empties the job tables only: an earlier test's pause or breaker would leak.
    with session_scope() as session:
        session.execute(delete(AccountState))
    metrics.reset_metrics()
    job_stats.job_stats_cache.clear()
    capacity_cache.clear()  # per process, keyed by database URL: PostgreSQL's is shared
    yield url
    metrics.reset_metrics()
    job_stats.job_stats_cache.clear()
    capacity_cache.clear()


@pytest.fixture
def client(database: str) -> FlaskClient:
    app = create_app()
    app.testing = True
    return app.test_client()


def add_job(status: str, provider: str = "piapi", **fields: Any) -> uuid.UUID:
    """A job row as the flows leave it (accepted upstream unless queued)."""
    now = utcnow()
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "provider": provider,
        "status": status,
        "params": {"origin_task_id": "o-1", "index": "1", "prompt": "a cat"},
        "deadline": now + timedelta(hours=1),
        "created_at": now - timedelta(minutes=1),
        "updated_at": now,
        "progress": 0,
    }
    if status != "queued":
        values |= {"upstream_task_id": f"t-{values['id']}", "submitted_at": now}
    if status in ("completed", "failed"):
        values["completed_at"] = now
    values.update(fields)
    with session_scope() as session:
        session.add(Job(**values))
    job_id: uuid.UUID = values["id"]
    return job_id


@dataclass(frozen=True)
class Scene:
    waiting_job: uuid.UUID
    completed_job: uuid.UUID
    paused_until: datetime


@pytest.fixture
def scene(database: str) -> Scene:
    """piapi/a: 2 of 2 slots, breaker open; piapi/b: 1 of 1, paused; piapi/c: half open.
    Waiting: piapi 2 for a slot, 1 paused, 1 breaker; lemondata 1 rate, 1 budget, 1 other."""
    now = utcnow()
    add_job("submitted", account="a")
    add_job("processing", account="a")
    add_job("failed", account="a", error_code="upstream_failed", error_message="bad prompt")
    add_job("failed", account="a", error_code="timeout")  # not the provider's failure
    # Yesterday's failure counts for yesterday only.
    add_job(
        "failed",
        account="a",
        error_code="upstream_failed",
        submitted_at=now - timedelta(days=1, hours=1),
        completed_at=now - timedelta(days=1),
    )
    completed = add_job("completed", account="a", cost=0.25, priority=3, result_urls=["u"])
    add_job("completed", account="a", result_urls=["u"])  # no reported cost: price_per_job
    add_job("processing", account="b")
    waiting = add_job(
        "queued", priority=7, waiting_reason="waiting for a slot: 2/2 in flight on piapi/a"
    )
    add_job("queued", waiting_reason="waiting for a slot: 1 earlier jobs of piapi go first")
    add_job("queued", waiting_reason=f"paused until 12:00:00 UTC on piapi/b: {PAUSE_REASON}")
    add_job("queued", waiting_reason="circuit open until 12:00:00 UTC on piapi/a (5 failures)")
    add_job("queued")  # not waiting for capacity: just queued
    add_job("cancelled", waiting_reason="waiting for a slot: stale")  # ended: not waiting
    for reason in (
        "rate limit of 10 creates a minute on lemondata/main",
        "daily spend cap of 5 reached on lemondata/main: resumes 00:00 UTC",
        "a reason this version does not know",
    ):
        add_job("queued", provider="lemondata", waiting_reason=reason)
    paused_until = now + timedelta(minutes=10)
    with session_scope() as session:
        session.add_all(
            [
                AccountState(
                    provider="piapi",
                    account="a",
                    failures=5,
                    opened_until=now + timedelta(seconds=60),
                    updated_at=now,
                ),
                AccountState(
                    provider="piapi",
                    account="b",
                    paused_until=paused_until,
                    pause_reason=PAUSE_REASON,
                    updated_at=now,
                ),
                AccountState(
                    provider="piapi",
                    account="c",
                    failures=6,
                    opened_until=now - timedelta(seconds=5),
                    updated_at=now,
                ),
            ]
        )
    return Scene(waiting, completed, paused_until)


# --- metrics -----------------------------------------------------------------------


def scrape(client: FlaskClient) -> Samples:
    answer = client.get("/metrics")
    assert answer.status_code == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(answer.get_data(as_text=True))
        for s in family.samples
    }


def of(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


@pytest.mark.usefixtures("scene")
def test_metrics_show_each_accounts_capacity(client: FlaskClient) -> None:
    samples = scrape(client)

    def account(name: str, provider: str, account: str) -> float | None:
        return of(samples, f"variflow_account_{name}", provider=provider, account=account)

    assert account("in_flight", "piapi", "a") == 2
    assert account("in_flight", "piapi", "b") == 1
    assert account("in_flight", "piapi", "c") == 0
    assert account("slots", "piapi", "a") == 2
    assert account("slots", "piapi", "b") == 1
    assert account("slots", "piapi", "c") is None  # no max_in_flight: no series
    assert account("slots", "lemondata", "main") == 4
    assert account("slots", "piclaza", "main") is None
    # Today: 2 in flight, 2 failed and 2 completed were accepted (yesterday's is not).
    assert account("jobs_today", "piapi", "a") == 6
    assert account("failed_today", "piapi", "a") == 1  # upstream_failed today only
    assert account("failed_today", "piapi", "b") == 0
    assert account("spend_today", "piapi", "a") == pytest.approx(0.25 + 0.1)
    assert account("breaker_open", "piapi", "a") == 1
    assert account("breaker_open", "piapi", "b") == 0
    assert account("breaker_open", "piapi", "c") == 0.5
    assert account("paused", "piapi", "a") == 0
    assert account("paused", "piapi", "b") == 1
    assert account("in_flight", "piclaza", "main") == 0

    waiting = {
        (dict(labels)["provider"], dict(labels)["reason"]): value
        for (name, labels), value in samples.items()
        if name == "variflow_jobs_waiting"
    }
    expected = {
        (p, r): 0.0 for p in current().settings.provider_names for r in job_stats.WAIT_REASONS
    }
    expected |= {
        ("piapi", "slot"): 2,
        ("piapi", "paused"): 1,
        ("piapi", "breaker"): 1,
        ("lemondata", "rate"): 1,
        ("lemondata", "budget"): 1,
        ("lemondata", "other"): 1,
    }
    assert waiting == expected
    # Account names label the series; keys and fingerprints never do.
    text = client.get("/metrics").get_data(as_text=True)
    for name in KEYS:
        assert KEYS[name] not in text and fingerprint(name) not in text


# --- the dashboard ---------------------------------------------------------------------


def cells(html: str, label: str) -> dict[str, str]:
    """The text of each data-field cell of the account's row, whitespace collapsed."""
    row = html.split(f'data-account="{label}"', 1)[1].split("</tr>", 1)[0]
    found = {}
    for field, content in re.findall(r'data-field="([a-z]+)">(.*?)</td>', row, re.S):
        found[field] = " ".join(unescape(re.sub(r"<[^>]+>", " ", content)).split())
    return found


def test_dashboard_accounts_page_shows_each_account(client: FlaskClient, scene: Scene) -> None:
    assert client.get("/dashboard/accounts").status_code == 401  # basic auth, as every page
    index = client.get("/dashboard", auth=AUTH).text
    assert 'href="/dashboard/accounts"' in index

    response = client.get("/dashboard/accounts", auth=AUTH)

    assert response.status_code == 200
    html = response.text
    a, b, c = (cells(html, f"piapi/{name}") for name in "abc")
    assert a["slots"] == "2 / 2"
    assert a["jobs"] == "6 / 100"
    assert a["failed"] == "1 / 30"
    assert a["spend"] == "0.35 / 5"
    assert a["breaker"].startswith("open until ")
    assert "5 failures in a row" in a["breaker"]
    assert a["paused"] == "—"
    assert a["waiting"] == "4"
    assert b["slots"] == "1 / 1"
    assert b["jobs"] == "1 / ∞"
    assert b["breaker"] == "closed"
    assert b["paused"] == (f"until {scene.paused_until:%Y-%m-%d %H:%M:%S}: {PAUSE_REASON}")
    assert c["slots"] == "0 / ∞"
    assert c["breaker"].startswith("half-open")
    assert cells(html, "lemondata/main")["slots"] == "0 / 4"
    assert cells(html, "lemondata/main")["waiting"] == "3"
    for name in KEYS:
        assert KEYS[name] not in html
        assert f">{fingerprint(name)}<" in html
    # The provider's text is escaped, never markup.
    assert "<script>alert" not in html and "&lt;script&gt;alert" in html

    waiting = html.split('id="waiting"', 1)[1]
    piapi = waiting.split('data-provider="piapi"', 1)[1].split("</tr>", 1)[0]
    assert re.findall(r'data-reason="([a-z]+)">[a-z]+ (\d+)<', piapi) == [
        ("slot", "2"),
        ("paused", "1"),
        ("breaker", "1"),
    ]


def test_dashboard_job_page_shows_account_priority_cost_and_why_it_waits(
    client: FlaskClient, scene: Scene
) -> None:
    waiting = client.get(f"/dashboard/jobs/{scene.waiting_job}", auth=AUTH).text
    done = client.get(f"/dashboard/jobs/{scene.completed_job}", auth=AUTH).text

    def field(html: str, name: str) -> str:
        found = re.search(rf'id="job-{name}"[^>]*>(.*?)</(?:dd|div)>', html, re.S)
        assert found, name
        return " ".join(unescape(re.sub(r"<[^>]+>", " ", found.group(1))).split())

    assert field(waiting, "priority") == "7"
    assert field(waiting, "account") == "— (not yet admitted)"
    assert field(waiting, "cost") == "—"
    assert field(waiting, "waiting") == (
        "Waiting for capacity — waiting for a slot: 2/2 in flight on piapi/a Accounts"
    )
    assert field(done, "account") == "piapi/a"
    assert field(done, "priority") == "3"
    assert field(done, "cost") == "0.25"
    assert 'id="job-waiting"' not in done


# --- the command -------------------------------------------------------------------------


def test_variflow_accounts_prints_each_account(scene: Scene) -> None:
    runner = CliRunner()

    as_json = runner.invoke(cli, ["accounts", "--json"], prog_name="variflow")
    text = runner.invoke(cli, ["accounts"], prog_name="variflow")

    assert as_json.exit_code == 0, as_json.output
    rows = {f"{r['provider']}/{r['account']}": r for r in json.loads(as_json.output)}
    assert list(rows) == ["piapi/a", "piapi/b", "piapi/c", "piclaza/main", "lemondata/main"]
    a, b, c = rows["piapi/a"], rows["piapi/b"], rows["piapi/c"]
    assert a["fingerprint"] == fingerprint("a")
    assert (a["in_flight"], a["limits"]["max_in_flight"]) == (2, 2)
    assert (a["jobs_today"], a["limits"]["daily_jobs"]) == (6, 100)
    assert (a["failed_today"], a["limits"]["daily_failed"]) == (1, 30)
    assert a["spend_today"] == pytest.approx(0.35)
    assert a["limits"]["daily_spend_cap"] == 5.0
    assert (a["breaker"], a["failures"], a["paused_until"]) == ("open", 5, None)
    assert a["opened_until"] is not None
    assert (b["in_flight"], b["limits"]["max_in_flight"], b["breaker"]) == (1, 1, "closed")
    assert datetime.fromisoformat(b["paused_until"]) == scene.paused_until
    assert b["pause_reason"] == PAUSE_REASON
    assert (c["breaker"], c["failures"]) == ("half-open", 6)
    assert [r["waiting"] for r in rows.values()] == [4, 4, 4, 0, 3]
    assert rows["lemondata/main"]["limits"]["max_in_flight"] == 4

    assert text.exit_code == 0, text.output
    lines = text.output.splitlines()
    headings = "ACCOUNT KEY SLOTS JOBS TODAY FAILED SPEND BREAKER WAITING PAUSED"
    assert lines[0].split() == headings.split()
    by_label = {line.split()[0]: line for line in lines[1:]}
    assert list(by_label) == list(rows)
    assert by_label["piapi/a"].split()[1:6] == [fingerprint("a"), "2/2", "6/100", "1/30", "0.35/5"]
    assert by_label["piapi/b"].rstrip().endswith(f"UTC: {PAUSE_REASON}")
    assert by_label["piapi/c"].split()[2:7] == ["0/-", "0/-", "0/-", "0/-", "half-open"]
    # Aligned: every column starts where its heading does.
    for heading in ("KEY", "BREAKER", "PAUSED"):
        start = lines[0].index(heading)
        assert all(line[start - 2 : start] == "  " for line in lines[1:]), heading
    for heading in ("SLOTS", "WAITING"):  # numbers are right-aligned under theirs
        end = lines[0].index(heading) + len(heading)
        assert all(line[end - 1] != " " and line[end] == " " for line in lines[1:]), heading
    for output in (as_json.output, text.output):
        assert not any(key in output for key in KEYS.values())


# --- the reasons capacity gives, and their kinds --------------------------------------------


@pytest.mark.usefixtures("database")
@pytest.mark.parametrize(
    ("limits", "state", "usage", "kind"),
    [
        ({"max_in_flight": 1}, {}, {"status": "submitted"}, "slot"),
        ({}, {"paused_until": 600, "pause_reason": "429"}, None, "paused"),
        ({}, {"failures": 5, "opened_until": 600}, None, "breaker"),
        ({}, {"failures": 5, "opened_until": -5, "probe_job_id": uuid.uuid4()}, None, "breaker"),
        ({"daily_jobs": 1}, {}, {"status": "completed"}, "budget"),
        (
            {"daily_failed": 1},
            {},
            {"status": "failed", "error_code": "upstream_failed"},
            "budget",
        ),
        ({"daily_spend_cap": 0.1}, {}, {"status": "completed", "cost": 0.2}, "budget"),
        ({"creates_per_minute": 1}, {"next_create_at": 30}, None, "rate"),
    ],
    ids=["slot", "paused", "breaker-open", "breaker-half-open", "jobs", "failed", "spend", "rate"],
)
def test_every_reason_capacity_gives_has_its_kind(
    limits: dict[str, Any],
    state: dict[str, Any],
    usage: dict[str, Any] | None,
    kind: str,
) -> None:
    # The classifier reads worker/capacity.py's texts: a new wording must not become "other".
    now = utcnow()
    account = Account("piapi", "x", "k", Limits(**limits))
    if usage is not None:
        add_job(account="x", **usage)
    if state:
        # Times are given in seconds from now.
        values = {
            k: now + timedelta(seconds=v) if k.endswith(("_until", "_at")) else v
            for k, v in state.items()
        }
        with session_scope() as session:
            session.add(AccountState(provider="piapi", account="x", updated_at=now, **values))
    job_id = add_job("queued")

    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        decision = capacity.admit(session, [account], job, now)

    assert decision.reason is not None and not decision.admitted
    assert wait_reason_kind(decision.reason) == kind, decision.reason


@pytest.mark.usefixtures("database")
def test_a_job_behind_earlier_ones_waits_for_a_slot() -> None:
    now = utcnow()
    add_job("queued", provider="piclaza", created_at=now - timedelta(minutes=5))
    job_id = add_job("queued", provider="piclaza", created_at=now)

    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        account = Account("piclaza", "main", "k", Limits(max_in_flight=1))
        decision = capacity.admit(session, [account], job, now)

    assert decision.reason is not None
    assert wait_reason_kind(decision.reason) == "slot", decision.reason
