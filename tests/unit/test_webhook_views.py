"""The webhook receiver (webhooks/receiver.py) through Flask's test client, on SQLite."""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import func, select

from tests import webhook_support as support
from webhooks import MAX_BODY_BYTES, create_app
from worker.config import get_settings
from worker.models import Job, JobEvent, utcnow
from worker.runtime import session_scope
from worker.webhook_secrets import hash_secret

SECRET = "s3cret"
GLOBAL_SECRET = "gl0bal-s3cret"
HEADER = "x-webhook-secret"
MARKER = "prompt-marker-7f3a9c"  # appears only in the webhook payload
URLS = ["https://cdn.piapi.test/1.png", "https://cdn.piapi.test/2.png"]

MakeClient = Callable[..., FlaskClient]


@pytest.fixture
def make_client(sqlite_url: str, configure: Callable[..., Any]) -> MakeClient:
    """A test client of a fresh app; keyword arguments are settings applied first."""

    def make(**settings: object) -> FlaskClient:
        if settings:
            configure(**settings)
        app = create_app()
        app.testing = True
        return app.test_client()

    return make


@pytest.fixture
def client(make_client: MakeClient) -> FlaskClient:
    return make_client()


def insert_job(**fields: Any) -> uuid.UUID:
    """A submitted PiAPI job following task t-1, with this module's secret."""
    return support.insert_job(**{"webhook_secret_hash": hash_secret(SECRET), **fields})


def snapshot(job_id: uuid.UUID) -> tuple[dict[str, Any], int]:
    """Every column of the job and the number of its events."""
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        columns = {c.key: getattr(job, c.key) for c in Job.__table__.columns}
        count = session.scalar(
            select(func.count()).select_from(JobEvent).where(JobEvent.job_id == job_id)
        )
    return columns, int(count or 0)


def row(job_id: uuid.UUID) -> dict[str, Any]:
    return snapshot(job_id)[0]


def events(job_id: uuid.UUID) -> list[JobEvent]:
    with session_scope() as session:
        return list(
            session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id))
        )


def body(
    status: str = "processing",
    task_id: str = "t-1",
    progress: int = 0,
    image_urls: list[str] | None = None,
    timestamp: int = 1_700_000_000,
) -> dict[str, Any]:
    """A PiAPI webhook body: {"timestamp", "data": <the task envelope's data>}."""
    return {
        "timestamp": timestamp,
        "data": {
            "task_id": task_id,
            "model": "midjourney",
            "task_type": "variation",
            "status": status,
            # PiAPI echoes the webhook secret back in the payload it delivers.
            "config": {
                "service_mode": "public",
                "webhook_config": {"endpoint": "https://hooks.test/x", "secret": SECRET},
            },
            "input": {"origin_task_id": "o-1", "index": "1", "prompt": MARKER},
            "output": {
                "image_url": URLS[0] if image_urls else "",
                "image_urls": image_urls,
                "temporary_image_urls": image_urls,
                "discord_image_url": "",
                "actions": [],
                "progress": progress,
                "intermediate_image_urls": None,
            },
            "meta": {"usage": {"type": "point", "frozen": 0, "consume": 0}},
            "detail": None,
            "logs": [],
            "error": {"code": 0, "raw_message": "", "message": "", "detail": None},
        },
    }


def post(
    client: FlaskClient, job_id: object, payload: Any, secret: str | None = SECRET, **kw: Any
) -> Any:
    headers = {HEADER: secret} if secret is not None else {}
    return client.post(f"/webhooks/piapi/{job_id}", json=payload, headers=headers, **kw)


# --- the happy path ---------------------------------------------------------------------


def test_processing_then_completed(client: FlaskClient) -> None:
    job_id = insert_job()

    answer = post(client, job_id, body("processing", progress=30))
    assert answer.status_code == 200
    assert answer.get_json() == {
        "job_id": str(job_id),
        "status": "processing",
        "outcome": "transition",
    }
    job = row(job_id)
    assert job["status"] == "processing"
    assert job["progress"] == 30
    assert job["last_webhook_at"] is not None
    assert job["completed_at"] is None

    answer = post(client, job_id, body("completed", progress=100, image_urls=URLS))
    assert answer.status_code == 200
    assert answer.get_json()["status"] == "completed"
    job = row(job_id)
    assert job["status"] == "completed"
    assert job["result_urls"] == URLS
    assert job["progress"] == 100
    assert job["completed_at"] is not None
    assert job["next_poll_at"] is None

    history = events(job_id)
    assert [(e.source, e.kind, e.from_status, e.to_status) for e in history] == [
        ("webhook", "transition", "submitted", "processing"),
        ("webhook", "transition", "processing", "completed"),
    ]
    for event in history:  # the stored payload is a redacted summary
        stored = json.dumps(event.payload)
        assert SECRET not in stored
        assert MARKER not in stored


def test_non_terminal_webhook_pushes_the_fallback_poll_back(client: FlaskClient) -> None:
    job_id = insert_job(next_poll_at=utcnow())
    assert post(client, job_id, body("processing", progress=30)).status_code == 200
    job = row(job_id)
    grace = timedelta(seconds=get_settings().provider("piapi").webhook_grace)
    assert job["next_poll_at"] == job["last_webhook_at"] + grace


def test_completed_without_images_fails_the_job(client: FlaskClient) -> None:
    job_id = insert_job()
    assert post(client, job_id, body("completed", progress=100)).status_code == 200
    job = row(job_id)
    assert job["status"] == "failed"
    assert job["error_code"] == "no_result"


def test_failed_webhook_records_the_providers_message(client: FlaskClient) -> None:
    job_id = insert_job()
    payload = body("failed")
    payload["data"]["error"] = {"code": 10000, "raw_message": "x", "message": "banned prompt"}
    assert post(client, job_id, payload).status_code == 200
    job = row(job_id)
    assert job["status"] == "failed"
    assert job["error_message"] == "banned prompt"


# --- authentication: nothing is touched -------------------------------------------------


@pytest.mark.parametrize("secret", [None, "", "wrong", SECRET.upper()])
def test_missing_or_wrong_secret_is_401_and_changes_nothing(
    client: FlaskClient, secret: str | None
) -> None:
    job_id = insert_job()
    before = snapshot(job_id)
    answer = post(client, job_id, body("completed", image_urls=URLS), secret=secret)
    assert answer.status_code == 401
    assert snapshot(job_id) == before


def test_the_secret_must_be_in_the_header_not_the_body(client: FlaskClient) -> None:
    job_id = insert_job()
    before = snapshot(job_id)
    payload = body("completed", image_urls=URLS)  # carries the secret in data.config
    assert post(client, job_id, payload, secret=None).status_code == 401
    assert snapshot(job_id) == before


def test_job_without_a_secret_hash_accepts_no_webhook(client: FlaskClient) -> None:
    job_id = insert_job(webhook_secret_hash=None)
    before = snapshot(job_id)
    assert post(client, job_id, body("completed", image_urls=URLS)).status_code == 401
    assert snapshot(job_id) == before


# --- unknown things ---------------------------------------------------------------------


def test_unknown_job_is_404(client: FlaskClient) -> None:
    insert_job()
    assert post(client, uuid.uuid4(), body()).status_code == 404


@pytest.mark.parametrize("job_id", ["not-a-uuid", "t-1"])
def test_non_uuid_job_id_is_404(client: FlaskClient, job_id: str) -> None:
    insert_job()
    assert post(client, job_id, body()).status_code == 404


@pytest.mark.parametrize("provider", ["nope", "piclaza", "PIAPI"])
def test_unknown_or_non_webhook_provider_is_404(client: FlaskClient, provider: str) -> None:
    job_id = insert_job()
    before = snapshot(job_id)
    answer = client.post(f"/webhooks/{provider}/{job_id}", json=body(), headers={HEADER: SECRET})
    assert answer.status_code == 404
    assert snapshot(job_id) == before


def test_job_of_another_provider_is_404(client: FlaskClient) -> None:
    job_id = insert_job(provider="lemondata")
    before = snapshot(job_id)
    assert post(client, job_id, body()).status_code == 404
    assert snapshot(job_id) == before


# --- malformed bodies -------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["not json", "{", ""], ids=["text", "truncated", "empty"])
def test_body_that_is_not_json_is_400(client: FlaskClient, raw: str) -> None:
    job_id = insert_job()
    before = snapshot(job_id)
    answer = client.post(
        f"/webhooks/piapi/{job_id}",
        data=raw,
        content_type="application/json",
        headers={HEADER: SECRET},
    )
    assert answer.status_code == 400
    assert snapshot(job_id) == before


@pytest.mark.parametrize(
    "payload",
    [
        {"data": body()["data"]},
        {"timestamp": 1},
        body()["data"],
        [body()],
        {"timestamp": 1, "data": "t-1"},
        {"timestamp": 1, "data": {"status": "completed"}},
    ],
    ids=["no-timestamp", "no-data", "bare-data", "list", "data-string", "no-task-id"],
)
def test_json_without_timestamp_and_data_is_400(client: FlaskClient, payload: Any) -> None:
    job_id = insert_job()
    before = snapshot(job_id)
    answer = post(client, job_id, payload)
    assert answer.status_code == 400
    assert answer.get_json()["error"]
    assert snapshot(job_id) == before


def test_task_id_of_another_task_is_409_and_changes_nothing(client: FlaskClient) -> None:
    job_id = insert_job()
    before = snapshot(job_id)
    answer = post(client, job_id, body("completed", task_id="t-other", image_urls=URLS))
    assert answer.status_code == 409
    assert snapshot(job_id) == before


def test_body_over_one_mib_is_413(client: FlaskClient) -> None:
    job_id = insert_job()
    before = snapshot(job_id)
    payload = body("completed", image_urls=URLS)
    payload["data"]["logs"] = ["x" * MAX_BODY_BYTES]
    raw = json.dumps(payload)
    assert len(raw) > MAX_BODY_BYTES
    answer = client.post(
        f"/webhooks/piapi/{job_id}",
        data=raw,
        content_type="application/json",
        headers={HEADER: SECRET},
    )
    assert answer.status_code == 413
    assert snapshot(job_id) == before


def test_chunked_body_over_one_mib_is_413(client: FlaskClient) -> None:
    # No Content-Length: the server's stream just stops at the limit, so the
    # receiver must notice the excess itself rather than parse a cut body.
    job_id = insert_job()
    before = snapshot(job_id)
    payload = body("completed", image_urls=URLS)
    payload["data"]["logs"] = ["x" * MAX_BODY_BYTES]
    answer = client.post(
        f"/webhooks/piapi/{job_id}",
        input_stream=io.BytesIO(json.dumps(payload).encode()),
        headers={HEADER: SECRET, "Transfer-Encoding": "chunked"},
        content_type="application/json",
        environ_overrides={"wsgi.input_terminated": True},
    )
    assert answer.status_code == 413
    assert snapshot(job_id) == before


def test_body_just_under_one_mib_is_accepted(client: FlaskClient) -> None:
    job_id = insert_job()
    payload = body("processing", progress=5)
    payload["data"]["logs"] = [""]
    filler = MAX_BODY_BYTES - len(json.dumps(payload)) - 10
    payload["data"]["logs"] = ["x" * filler]
    assert len(json.dumps(payload)) <= MAX_BODY_BYTES
    assert post(client, job_id, payload).status_code == 200
    assert row(job_id)["status"] == "processing"


# --- duplicates, stale and out-of-order deliveries --------------------------------------


def test_duplicate_delivery_is_200_and_recorded_as_ignored(client: FlaskClient) -> None:
    job_id = insert_job()
    assert post(client, job_id, body("processing", progress=40)).status_code == 200
    after_first, count = snapshot(job_id)

    answer = post(client, job_id, body("processing", progress=40))
    assert answer.status_code == 200
    assert answer.get_json()["outcome"] == "ignored"
    after_second, second_count = snapshot(job_id)
    assert second_count == count + 1
    assert events(job_id)[-1].kind == "ignored"
    assert after_second["status"] == after_first["status"] == "processing"
    assert after_second["progress"] == 40


def test_stale_processing_after_completed_is_ignored(client: FlaskClient) -> None:
    job_id = insert_job()
    assert post(client, job_id, body("completed", progress=100, image_urls=URLS)).status_code == 200
    completed, count = snapshot(job_id)

    answer = post(client, job_id, body("processing", progress=50))
    assert answer.status_code == 200
    assert answer.get_json() == {"job_id": str(job_id), "status": "completed", "outcome": "ignored"}
    job, new_count = snapshot(job_id)
    assert new_count == count + 1
    last = events(job_id)[-1]
    assert (last.kind, last.from_status, last.to_status) == ("ignored", "completed", "processing")
    for column in ("status", "result_urls", "progress", "completed_at", "error_code"):
        assert job[column] == completed[column]


def test_progress_webhook_raises_progress_in_place(client: FlaskClient) -> None:
    job_id = insert_job(status="processing", progress=10)
    answer = post(client, job_id, body("processing", progress=70))
    assert answer.status_code == 200
    assert answer.get_json()["outcome"] == "progress"
    assert row(job_id)["progress"] == 70


def test_job_without_task_id_adopts_the_webhooks(client: FlaskClient) -> None:
    job_id = insert_job(
        status="queued",
        upstream_task_id=None,
        submitted_at=None,
        claim_token="tok",
        claimed_until=utcnow() + timedelta(minutes=5),
    )
    answer = post(client, job_id, body("pending", task_id="t-9"))
    assert answer.status_code == 200
    job = row(job_id)
    assert job["status"] == "submitted"
    assert job["upstream_task_id"] == "t-9"
    assert job["claim_token"] is None
    # From now on, the job belongs to that task only.
    before = snapshot(job_id)
    late = body("completed", task_id="t-1", image_urls=URLS)
    assert post(client, job_id, late).status_code == 409
    assert snapshot(job_id) == before


# --- the global endpoint ----------------------------------------------------------------


def post_global(client: FlaskClient, payload: Any, secret: str | None = GLOBAL_SECRET) -> Any:
    headers = {HEADER: secret} if secret is not None else {}
    return client.post("/webhooks/piapi", json=payload, headers=headers)


def test_global_endpoint_finds_the_job_by_task_id(make_client: MakeClient) -> None:
    client = make_client(piapi_webhook_secret=GLOBAL_SECRET)
    other = insert_job(upstream_task_id="t-2")
    other_before = snapshot(other)
    job_id = insert_job(upstream_task_id="t-1")

    answer = post_global(client, body("processing", task_id="t-1", progress=20))
    assert answer.status_code == 200
    assert answer.get_json()["job_id"] == str(job_id)
    assert row(job_id)["status"] == "processing"
    assert row(job_id)["progress"] == 20
    assert snapshot(other) == other_before


@pytest.mark.parametrize("secret", [None, "wrong", SECRET])
def test_global_endpoint_wrong_secret_is_401(make_client: MakeClient, secret: str | None) -> None:
    client = make_client(piapi_webhook_secret=GLOBAL_SECRET)
    job_id = insert_job()
    before = snapshot(job_id)
    assert post_global(client, body("completed", image_urls=URLS), secret=secret).status_code == 401
    assert snapshot(job_id) == before


def test_global_endpoint_unknown_task_is_404(make_client: MakeClient) -> None:
    client = make_client(piapi_webhook_secret=GLOBAL_SECRET)
    insert_job()
    assert post_global(client, body("completed", task_id="t-unknown")).status_code == 404


@pytest.mark.parametrize("secret", [GLOBAL_SECRET, "anything"])
def test_global_endpoint_without_a_configured_secret_is_401(
    client: FlaskClient, secret: str
) -> None:
    job_id = insert_job()
    before = snapshot(job_id)
    assert post_global(client, body("completed", image_urls=URLS), secret=secret).status_code == 401
    assert snapshot(job_id) == before


def test_global_endpoint_malformed_body_is_400(make_client: MakeClient) -> None:
    client = make_client(piapi_webhook_secret=GLOBAL_SECRET)
    assert post_global(client, {"timestamp": 1}).status_code == 400
    answer = client.post(
        "/webhooks/piapi",
        data="nope",
        content_type="application/json",
        headers={HEADER: GLOBAL_SECRET},
    )
    assert answer.status_code == 400


def test_global_endpoint_unknown_provider_is_404(make_client: MakeClient) -> None:
    client = make_client(piapi_webhook_secret=GLOBAL_SECRET)
    answer = client.post("/webhooks/nope", json=body(), headers={HEADER: GLOBAL_SECRET})
    assert answer.status_code == 404


def test_global_endpoint_empty_task_id_matches_no_job(make_client: MakeClient) -> None:
    # A job still being submitted has no upstream_task_id yet. An empty task id
    # in a webhook must not be looked up as "upstream_task_id IS NULL" and
    # complete that unrelated job.
    client = make_client(piapi_webhook_secret=GLOBAL_SECRET)
    job_id = insert_job(status="queued", upstream_task_id=None, submitted_at=None)
    before = snapshot(job_id)
    answer = post_global(client, body("completed", task_id="", image_urls=URLS))
    assert answer.status_code in (400, 404)
    assert snapshot(job_id) == before


# --- health and logs --------------------------------------------------------------------


def test_healthz(client: FlaskClient) -> None:
    answer = client.get("/healthz")
    assert answer.status_code == 200
    assert answer.get_json() == {"status": "ok", "database": "ok"}


def test_webhook_endpoints_accept_only_post(client: FlaskClient) -> None:
    job_id = insert_job()
    assert client.get(f"/webhooks/piapi/{job_id}").status_code == 405
    assert client.get("/webhooks/piapi").status_code == 405


def test_logs_carry_neither_secrets_nor_payloads(
    make_client: MakeClient, caplog: pytest.LogCaptureFixture
) -> None:
    client = make_client(piapi_webhook_secret=GLOBAL_SECRET)
    caplog.set_level(logging.DEBUG)
    job_id = insert_job()
    other = insert_job(upstream_task_id="t-2")
    wrong = "wr0ng-s3cret-guess"

    completed = body("completed", progress=100, image_urls=URLS)
    assert post(client, job_id, body("processing", progress=10)).status_code == 200
    assert post(client, job_id, body("processing", progress=10)).status_code == 200  # duplicate
    assert post(client, job_id, completed, secret=wrong).status_code == 401
    assert post(client, job_id, body("completed", task_id="t-x")).status_code == 409
    assert post(client, job_id, {"timestamp": 1}).status_code == 400
    assert post(client, job_id, completed).status_code == 200
    assert post_global(client, body("processing", task_id="t-2")).status_code == 200
    assert post_global(client, body("processing", task_id="t-2"), secret=wrong).status_code == 401

    # The receiver did log (so this test can see what it says) ...
    messages = [r.getMessage() for r in caplog.records]
    assert any(str(job_id) in m and "completed" in m for m in messages)
    assert any(str(other) in m for m in messages)
    assert any("wrong secret" in m for m in messages)
    # ... but never a secret, nor the payload it received.
    logged = caplog.text + "\n".join(messages)
    for record in caplog.records:
        logged += repr(record.args) + repr(record.__dict__)
    for secret in (SECRET, GLOBAL_SECRET, wrong, hash_secret(SECRET)):
        assert secret not in logged
    assert MARKER not in logged
    assert json.dumps(completed) not in logged
    assert json.dumps(completed["data"]) not in logged
