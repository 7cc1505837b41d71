"""The receiver never answers 5xx to a body it was sent: one regression test per kind of body
that once did, on SQLite and on PostgreSQL (which refuses NUL in text, non-finite numbers
in JSONB, and cannot encode a lone surrogate). See also tests/integration/test_webhook_fuzz.py.

Each body is applied (cleaned), ignored with 200, or refused with a documented 4xx; a
delivery without the right secret changes nothing.
"""

from __future__ import annotations

import json
import threading
import uuid
from datetime import timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import String, create_engine, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import NullPool

from tests.conftest import Configure
from tests.webhook_support import (
    GLOBAL_SECRET,
    HEADER,
    SECRET,
    URL,
    envelope,
    events,
    insert_job,
    picture,
    raw,
    raw_json,
    row,
)
from webhooks import create_app, receiver
from worker import jobs
from worker.models import Job, utcnow
from worker.providers import piapi
from worker.runtime import current, session_scope
from worker.status import JobStatus, Source, UpstreamState
from worker.upstream_text import MAX_ERROR_CODE, MAX_TASK_ID, REPLACEMENT
from worker.webhook_secrets import hash_secret

NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"]
UNSTORABLE = ["\x00", "\ud800", "\udfff"]  # NUL, lone high and lone low surrogates


@pytest.fixture(params=["sqlite", "postgres"])
def client(request: pytest.FixtureRequest, configure: Configure) -> FlaskClient:
    """A test client of the web app on each backend, with the global endpoint's secret."""
    request.getfixturevalue("pg_url" if request.param == "postgres" else "sqlite_url")
    configure(piapi_webhook_secret=GLOBAL_SECRET)
    app = create_app()
    app.testing = True
    return app.test_client()


def post(
    client: FlaskClient, job_id: object, body: str | bytes, secret: str | None = SECRET
) -> Any:
    """POST raw JSON text to the job's endpoint."""
    headers = {HEADER: secret} if secret is not None else {}
    return client.post(
        f"/webhooks/piapi/{job_id}", data=body, content_type="application/json", headers=headers
    )


def post_global(client: FlaskClient, body: str | bytes, secret: str | None = GLOBAL_SECRET) -> Any:
    headers = {HEADER: secret} if secret is not None else {}
    return client.post(
        "/webhooks/piapi", data=body, content_type="application/json", headers=headers
    )


def adopting_job(**fields: Any) -> uuid.UUID:
    """A job whose create call's answer was lost: the first webhook names its task."""
    return insert_job(
        status="queued",
        upstream_task_id=None,
        submitted_at=None,
        claim_token="tok",
        claimed_until=utcnow() + timedelta(minutes=5),
        **fields,
    )


def test_limits_match_the_columns() -> None:
    for column, limit in (("upstream_task_id", MAX_TASK_ID), ("error_code", MAX_ERROR_CODE)):
        kind = Job.__table__.c[column].type
        assert isinstance(kind, String)
        assert kind.length == limit


# --- non-finite numbers ----------------------------------------------------------------


def test_non_finite_progress_is_applied_without_progress(client: FlaskClient) -> None:
    for task, token in enumerate(NON_FINITE):
        job_id = insert_job(upstream_task_id=str(task))
        body = raw_json(envelope("processing", str(task), progress=raw(token)))
        assert f'"progress": {token}' in body
        answer = post(client, job_id, body)
        assert answer.status_code == 200, (token, answer.get_data(as_text=True))
        assert answer.get_json()["outcome"] == "transition"
        job = row(job_id)
        assert (job.status, job.progress) == ("processing", 0)
        payload = events(job_id)[-1].payload
        assert payload == {"status": "processing", "progress": None, "task_id": str(task)}


def test_non_finite_progress_for_the_same_status_is_ignored(client: FlaskClient) -> None:
    for task, token in enumerate(NON_FINITE):
        job_id = insert_job(status="processing", progress=40, upstream_task_id=str(task))
        answer = post(
            client, job_id, raw_json(envelope("processing", str(task), progress=raw(token)))
        )
        assert answer.status_code == 200, token
        assert answer.get_json()["outcome"] == "ignored"
        assert row(job_id).progress == 40


def test_an_integer_too_large_for_a_float_is_full_progress(client: FlaskClient) -> None:
    job_id = insert_job()
    answer = post(client, job_id, raw_json(envelope("processing", progress=raw("9" * 400))))
    assert answer.status_code == 200
    assert row(job_id).progress == 100
    payload = events(job_id)[-1].payload
    assert payload is not None
    assert payload["progress"] is None  # beyond 64 bits: not kept


def test_non_finite_numbers_anywhere_else_are_harmless(client: FlaskClient) -> None:
    job_id = insert_job()
    body = envelope("processing", progress=5)
    body["timestamp"] = raw("NaN")
    body["data"]["error"]["code"] = raw("-Infinity")
    body["data"]["output"]["image_urls"] = [raw("1e400")]
    assert post(client, job_id, raw_json(body)).status_code == 200
    assert row(job_id).progress == 5


# --- NUL and lone surrogates (sent as the JSON escapes \u0000, \ud800, \udfff) ---------


def test_unstorable_characters_in_the_status(client: FlaskClient) -> None:
    for task, bad in enumerate(UNSTORABLE):
        job_id = insert_job(upstream_task_id=str(task))
        body = raw_json(envelope(f"proc{bad}essing", str(task)))
        assert "\\u0000" in body or "\\ud" in body
        answer = post(client, job_id, body)
        assert answer.status_code == 200, repr(bad)
        assert answer.get_json()["outcome"] == "ignored"  # an unknown status: still submitted
        assert row(job_id).status == "submitted"
        payload = events(job_id)[-1].payload
        assert payload is not None
        assert payload["status"] == f"proc{REPLACEMENT}essing"


def test_unstorable_characters_in_the_error_message(client: FlaskClient) -> None:
    for task, bad in enumerate(UNSTORABLE):
        job_id = insert_job(upstream_task_id=str(task))
        body = raw_json(envelope("failed", str(task), error_message=f"bad{bad}prompt"))
        assert post(client, job_id, body).status_code == 200, repr(bad)
        job = row(job_id)
        assert (job.status, job.error_code) == ("failed", "upstream_failed")
        assert job.error_message == f"bad{REPLACEMENT}prompt"
        assert events(job_id)[-1].message == f"upstream_failed: bad{REPLACEMENT}prompt"


def test_a_result_url_with_unstorable_characters_is_dropped(client: FlaskClient) -> None:
    for task, bad in enumerate(UNSTORABLE):
        job_id = insert_job(upstream_task_id=str(task))
        body = envelope("completed", str(task), 100, [f"{URL}{bad}", URL])
        assert post(client, job_id, raw_json(body)).status_code == 200, repr(bad)
        job = row(job_id)
        assert (job.status, job.result_urls) == ("completed", [URL])


def test_only_unusable_result_urls_is_a_completion_without_results(client: FlaskClient) -> None:
    for task, bad in enumerate(UNSTORABLE):
        job_id = insert_job(upstream_task_id=str(task))
        body = envelope("completed", str(task), 100, [f"{URL}{bad}"])
        body["data"]["output"]["image_url"] = bad
        body["data"]["output"]["temporary_image_urls"] = ["x" * 5000]  # longer than a URL
        assert post(client, job_id, raw_json(body)).status_code == 200, repr(bad)
        job = row(job_id)
        assert (job.status, job.error_code, job.result_urls) == ("failed", "no_result", None)


def test_a_huge_error_message_is_cut(client: FlaskClient) -> None:
    job_id = insert_job()
    answer = post(client, job_id, raw_json(envelope("failed", error_message="x" * 500_000)))
    assert answer.status_code == 200
    message = row(job_id).error_message
    assert message is not None
    assert 0 < len(message) <= 2000


def test_unstorable_characters_in_keys_and_other_fields(client: FlaskClient) -> None:
    for task, bad in enumerate(UNSTORABLE):
        job_id = insert_job(upstream_task_id=str(task))
        body = envelope("processing", str(task), progress=10)
        body["data"][f"key{bad}"] = f"value{bad}"
        body["data"]["output"][f"progress{bad}"] = 99
        body["data"]["error"]["raw_message"] = bad
        assert post(client, job_id, raw_json(body)).status_code == 200, repr(bad)
        assert row(job_id).progress == 10


# --- deep nesting ----------------------------------------------------------------------


@pytest.mark.parametrize("depth", [1_000, 5_000, 100_000])
def test_a_body_nested_deeper_than_the_parser_goes_is_400(client: FlaskClient, depth: int) -> None:
    job_id = insert_job()
    before = picture(job_id)
    assert post(client, job_id, "[" * depth + "]" * depth).status_code == 400
    nested = raw_json(envelope(progress=raw('{"a":' * depth + "1" + "}" * depth)))
    assert post(client, job_id, nested).status_code == 400
    assert post_global(client, nested).status_code == 400
    assert picture(job_id) == before


def test_nesting_the_parser_takes_is_applied_and_kept_shallow(client: FlaskClient) -> None:
    job_id = insert_job()
    progress = raw("[" * 300 + "]" * 300)
    answer = post(client, job_id, raw_json(envelope("processing", progress=progress)))
    assert answer.status_code == 200
    stored = events(job_id)[-1].payload
    assert stored is not None
    assert len(json.dumps(stored)) < 200


# --- task ids --------------------------------------------------------------------------


def test_adopting_a_task_id_another_job_follows_is_409(client: FlaskClient) -> None:
    owner = insert_job(upstream_task_id="t-owned")
    job_id = adopting_job()
    before = picture(job_id), picture(owner)
    for status in ("pending", "processing", "completed", "failed"):
        body = envelope(status, task_id="t-owned", image_urls=[URL])
        answer = post(client, job_id, raw_json(body))
        assert answer.status_code == 409, answer.get_data(as_text=True)
        assert (picture(job_id), picture(owner)) == before


def test_an_adoption_is_decided_by_the_constraint_in_the_write_itself(
    client: FlaskClient,
) -> None:
    # No read before the write (it would race anyway): the unique constraint refuses
    # the UPDATE, the whole transaction is rolled back, 409, nothing changed.
    owner = insert_job(upstream_task_id="t-raced")
    job_id = adopting_job()
    before = picture(job_id), picture(owner)
    answer = post(client, job_id, raw_json(envelope("processing", task_id="t-raced")))
    assert answer.status_code == 409
    assert answer.get_json() == {"error": "task id belongs to another job"}
    assert (picture(job_id), picture(owner)) == before
    # The next delivery of the job's own task is applied as usual.
    assert (
        post(client, job_id, raw_json(envelope("processing", task_id="t-own"))).status_code == 200
    )
    assert row(job_id).upstream_task_id == "t-own"


def test_two_jobs_adopting_one_task_at_once(pg_url: str) -> None:
    # Really concurrent, on PostgreSQL: the second transaction's check cannot see the
    # first's uncommitted adoption; its write waits for it, then hits the constraint.
    first, second = adopting_job(), adopting_job()
    state = UpstreamState(JobStatus.SUBMITTED, Source.WEBHOOK, upstream_task_id="t-both")
    plan = jobs.PollPlan.of(current().settings, 120.0)
    db = current().db
    outcome: list[str] = []

    def adopt_second() -> None:
        with db.session() as session:
            job = jobs.lock_job(session, second)
            assert job is not None
            try:
                jobs.accept_webhook(session, job, state, plan)
                outcome.append("applied")
            except jobs.TaskIdTaken:
                session.rollback()
                outcome.append("taken")

    with db.session() as session:
        job = jobs.lock_job(session, first)
        assert job is not None
        jobs.accept_webhook(session, job, state, plan)
        session.flush()
        racer = threading.Thread(target=adopt_second)
        racer.start()
        racer.join(timeout=0.5)  # it waits on the first's uncommitted row
    racer.join(timeout=30)
    assert outcome == ["taken"]
    assert (row(first).upstream_task_id, row(second).upstream_task_id) == ("t-both", None)


def test_an_integrity_error_that_is_not_about_the_task_id_is_raised(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only a task id another job follows is a conflict; any other violation is a bug.
    job_id = adopting_job()

    def broken(*_args: object, **_kwargs: object) -> None:
        raise IntegrityError("UPDATE jobs ...", {}, Exception("another constraint"))

    monkeypatch.setattr(jobs, "_apply", broken)
    state = UpstreamState(JobStatus.SUBMITTED, Source.WEBHOOK, upstream_task_id="t-9")
    plan = jobs.PollPlan.of(current().settings, 120.0)
    with pytest.raises(IntegrityError), session_scope() as session:
        job = jobs.lock_job(session, job_id)
        assert job is not None
        jobs.accept_webhook(session, job, state, plan)


def test_adopting_the_longest_storable_task_id(client: FlaskClient) -> None:
    job_id = adopting_job()
    task_id = "t" * MAX_TASK_ID
    assert post(client, job_id, raw_json(envelope("pending", task_id=task_id))).status_code == 200
    assert row(job_id).upstream_task_id == task_id


@pytest.mark.parametrize("length", [MAX_TASK_ID + 1, 100_000])
def test_a_task_id_longer_than_the_column_is_400(client: FlaskClient, length: int) -> None:
    job_id = adopting_job()
    other = insert_job(upstream_task_id="t" * MAX_TASK_ID)
    before = picture(job_id), picture(other)
    body = raw_json(envelope("processing", task_id="t" * length))
    answer = post(client, job_id, body)
    assert answer.status_code == 400
    assert "task_id" in answer.get_json()["error"]
    assert post_global(client, body).status_code == 400
    assert (picture(job_id), picture(other)) == before


def test_unstorable_characters_in_the_task_id_are_400(client: FlaskClient) -> None:
    job_id = adopting_job()
    other = insert_job(upstream_task_id="t-1")
    before = picture(job_id), picture(other)
    for task_id in [form.format(bad) for bad in UNSTORABLE for form in ("t-1{}", "{}", "{}t-1")]:
        body = raw_json(envelope("completed", task_id=task_id, image_urls=[URL]))
        assert post_global(client, body).status_code == 400
        assert post(client, job_id, body).status_code == 400
        assert post(client, other, body).status_code == 400
    assert (picture(job_id), picture(other)) == before


# --- the last line of defence ----------------------------------------------------------


def test_a_value_the_database_refuses_is_400_not_500(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Were storable() to miss something, the receiver still answers 400, not 500.
    monkeypatch.setattr(piapi, "storable", lambda state: state)
    monkeypatch.setattr(receiver, "storable", lambda state: state)
    postgres = _is_postgres()
    refused = ["\ud800"] + (["\x00"] if postgres else [])
    for task, bad in enumerate(refused):
        job_id = insert_job(upstream_task_id=str(task))
        before = picture(job_id)
        body = raw_json(envelope("failed", str(task), error_message=f"refused-value{bad}"))
        answer = post(client, job_id, body)
        assert answer.status_code == 400, repr(bad)
        assert answer.get_json() == {"error": "body holds a value that cannot be stored"}
        assert picture(job_id) == before
    caught = [r.getMessage() for r in caplog.records if "database refused" in r.getMessage()]
    assert len(caught) == len(refused)
    # It names no value (a marker that no job id, being hex, can contain).
    assert not any("refused-value" in message for message in caught)


def _is_postgres() -> bool:
    with session_scope() as session:
        return session.get_bind().dialect.name == "postgresql"


# --- without the right secret nothing changes, whatever the body -------------------------


NASTY = {
    "nan-progress": raw_json(envelope("completed", progress=raw("NaN"), image_urls=[URL])),
    "nul-status": raw_json(envelope("fail\x00ed")),
    "surrogate-message": raw_json(envelope("failed", error_message="\ud800")),
    "deep": "[" * 50_000 + "]" * 50_000,
    "long-task-id": raw_json(envelope("completed", task_id="t" * 1000, image_urls=[URL])),
    "owned-task-id": raw_json(envelope("completed", task_id="t-owned", image_urls=[URL])),
    "not-json": b"\xff\xfe{",
}


@pytest.mark.parametrize("body", NASTY.values(), ids=NASTY.keys())
def test_without_the_right_secret_nothing_changes(client: FlaskClient, body: str | bytes) -> None:
    owner = insert_job(upstream_task_id="t-owned")
    job_id = adopting_job()
    before = picture(job_id), picture(owner)
    for secret in (None, "", "wrong", SECRET + "x", GLOBAL_SECRET):
        assert post(client, job_id, body, secret=secret).status_code == 401
    for secret in (None, "", "wrong", SECRET):
        assert post_global(client, body, secret=secret).status_code == 401
    assert (picture(job_id), picture(owner)) == before


# --- a connection the database dropped (no ping per checkout) ----------------------------


def test_a_dropped_connection_is_503_with_retry_after_then_the_delivery_succeeds(
    pg_url: str, configure: Configure
) -> None:
    # There is no pool_pre_ping: a pooled connection the server closed (a restart, a
    # failover, an idle timeout) fails its first statement. The provider is told to
    # come back (503, Retry-After), nothing is written, and its next delivery works.
    app = create_app()
    app.testing = True
    client = app.test_client()
    job_id = insert_job(upstream_task_id="t-drop")
    assert post(client, job_id, raw_json(envelope("processing", "t-drop"))).status_code == 200
    before = picture(job_id)
    admin = create_engine(pg_url, poolclass=NullPool)  # not one of the app's connections
    with admin.connect() as conn:  # ends every other session of this database
        conn.exec_driver_sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
    admin.dispose()
    delivery = raw_json(envelope("completed", "t-drop", image_urls=["https://cdn.example/1.png"]))

    refused = post(client, job_id, delivery)

    assert refused.status_code == 503
    assert refused.headers["Retry-After"] == "1"
    assert picture(job_id) == before
    assert post(client, job_id, delivery).status_code == 200
    assert row(job_id).status == "completed"


# --- guarded writes: no lock held, the row decides -----------------------------------------


def read_without_lock(task_id: str) -> tuple[uuid.UUID, Job]:
    """A submitted job following ``task_id``, and its row as the receiver reads it."""
    job_id = insert_job(upstream_task_id=task_id, status="submitted")
    with current().autocommit() as session:
        stale = jobs.read_row(session, job_id)
    assert stale is not None
    return job_id, stale


def test_a_webhook_decided_on_a_row_that_changed_is_decided_again(client: FlaskClient) -> None:
    # The receiver reads the row without a lock; another writer gets there first.
    job_id, stale = read_without_lock("t-g")
    state = UpstreamState(JobStatus.PROCESSING, Source.WEBHOOK, progress=40, upstream_task_id="t-g")
    plan = jobs.PollPlan.of(current().settings, 120.0)
    with session_scope() as session:  # meanwhile: the job completed
        job = jobs.lock_job(session, job_id)
        assert job is not None
        done = UpstreamState(
            JobStatus.COMPLETED,
            Source.POLL,
            upstream_task_id="t-g",
            image_urls=("https://c/1.png",),
        )
        jobs.apply_update(session, job, done)

    with current().autocommit() as session:
        result = jobs.accept_webhook(session, stale, state, plan, guarded=True)

    # Decided anew on the completed row: ignored, and the row is left as it was.
    assert result.event is not None and result.event.kind.value == "ignored"
    assert stale.status == "completed"
    finished = row(job_id)
    assert (finished.status, finished.progress) == ("completed", 100)
    assert [e.kind for e in events(job_id)][-2:] == ["transition", "ignored"]


def test_concurrent_deliveries_to_one_job_all_land(client: FlaskClient) -> None:
    # Without a lock, deliveries race on the row; each one is applied or ignored on
    # the state it finally saw, none is lost, and the job ends completed.
    job_id = insert_job(upstream_task_id="t-race", status="submitted")
    bodies = [raw_json(envelope("processing", "t-race", progress=p)) for p in (10, 30, 60, 90)]
    bodies.append(raw_json(envelope("completed", "t-race", image_urls=["https://c/1.png"])))
    app = create_app()
    answers: list[int] = []

    def deliver(body: str) -> None:
        with app.test_client() as own:
            answers.append(post(own, job_id, body).status_code)

    threads = [threading.Thread(target=deliver, args=(body,)) for body in bodies * 3]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert answers == [200] * len(threads)
    finished = row(job_id)
    assert (finished.status, finished.progress) == ("completed", 100)
    assert len(events(job_id)) == len(threads)  # one event per delivery: none lost


def test_a_row_that_keeps_changing_is_503_and_nothing_is_written(
    client: FlaskClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Every guarded write finds the row changed (here: no attempt is allowed at all):
    # the provider is told to deliver again rather than the delivery being dropped.
    monkeypatch.setattr(jobs, "GUARDED_ATTEMPTS", 0)
    job_id = insert_job(upstream_task_id="t-busy", status="submitted")
    before = picture(job_id)
    answer = post(client, job_id, raw_json(envelope("processing", "t-busy", progress=20)))
    assert answer.status_code == 503
    assert answer.headers["Retry-After"] == "1"
    assert picture(job_id) == before


def test_a_new_secret_meanwhile_refuses_a_delivery_read_before_it(client: FlaskClient) -> None:
    # The row was read (and the old secret matched); then a new claim gave the job a
    # new secret. The guarded write sees the change, the checks run again and refuse.
    job_id, stale = read_without_lock("t-s")
    state = UpstreamState(JobStatus.PROCESSING, Source.WEBHOOK, progress=30, upstream_task_id="t-s")
    plan = jobs.PollPlan.of(current().settings, 120.0)
    with session_scope() as session:
        session.execute(
            update(Job).where(Job.id == job_id).values(webhook_secret_hash=hash_secret("new"))
        )
    before = picture(job_id)
    seen: list[str | None] = []

    def verify(job: Job) -> None:
        seen.append(job.webhook_secret_hash)
        raise PermissionError("the secret changed")

    with pytest.raises(PermissionError), current().autocommit() as session:
        jobs.accept_webhook(session, stale, state, plan, guarded=True, verify=verify)
    assert seen == [hash_secret("new")]
    assert picture(job_id) == before
