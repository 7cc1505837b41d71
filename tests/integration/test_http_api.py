"""The /v1 HTTP API (webhooks/v1) through Flask's test client, on SQLite and PostgreSQL:
tokens, tenants, idempotency, validation, listing, waiting, results, the document.
(tests/e2e/test_http_api.py runs it over real HTTP with a worker and the sandbox.)"""

from __future__ import annotations

import base64
import io
import threading
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import func, select

from tests import webhook_support as support
from webhooks import create_app
from worker import tokens
from worker.config import get_settings
from worker.models import Job, JobEvent, JobInput, utcnow
from worker.results import job_folder
from worker.runtime import session_scope

PIAPI = {"origin_task_id": "o-1", "index": "1", "prompt": "a cat"}
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)
Token = Callable[..., dict[str, str]]


@pytest.fixture(params=["sqlite", "postgres"])
def backend(request: pytest.FixtureRequest) -> str:
    request.getfixturevalue("pg_url" if request.param == "postgres" else "sqlite_url")
    return str(request.param)


@pytest.fixture
def app(backend: str) -> Flask:
    made = create_app()
    made.testing = True
    return made


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def token() -> Token:
    """Authorization headers of a new token (named after its tenant unless told)."""

    def make(
        tenant: str = "shop", *, name: str | None = None, admin: bool = False
    ) -> dict[str, str]:
        with session_scope() as session:
            _, secret = tokens.issue(
                session, name or f"{tenant}-{uuid.uuid4().hex[:6]}", tenant, admin=admin
            )
        return {"Authorization": f"Bearer {secret}"}

    return make


def create(client: FlaskClient, headers: dict[str, str], **body: Any) -> Any:
    payload = {"provider": "piapi", "input": PIAPI, **body}
    return client.post("/v1/jobs", json=payload, headers=headers)


def counts() -> tuple[int, int]:
    with session_scope() as session:
        jobs = session.scalar(select(func.count()).select_from(Job))
        events = session.scalar(select(func.count()).select_from(JobEvent))
    return int(jobs or 0), int(events or 0)


def is_problem(answer: Any, status: int, field: str | None = None) -> dict[str, Any]:
    assert answer.status_code == status, answer.get_data(as_text=True)
    assert answer.mimetype == "application/problem+json"
    problem: dict[str, Any] = answer.get_json()
    assert problem["status"] == status
    assert problem["type"].startswith("urn:variflow:problem:")
    assert problem["title"] and problem["detail"]
    if field is not None:
        assert problem["field"] == field, problem
    assert "Traceback" not in answer.get_data(as_text=True)
    return problem


# --- creating ------------------------------------------------------------------------------


def test_a_job_is_created_with_its_location_and_read_back(
    client: FlaskClient, token: Token
) -> None:
    headers = token("shop")
    answer = create(client, headers, metadata={"order": "A-1"}, deadline=600)
    assert answer.status_code == 201
    job = answer.get_json()
    assert answer.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert (job["provider"], job["status"], job["tenant"]) == ("piapi", "queued", "shop")
    assert job["input"] == PIAPI and job["metadata"] == {"order": "A-1"}
    assert job["error"] is None and job["results"] == []
    assert client.get(answer.headers["Location"], headers=headers).get_json() == job
    events = client.get(f"/v1/jobs/{job['id']}/events", headers=headers).get_json()["data"]
    assert [(e["source"], e["to_status"]) for e in events] == [("api", "queued")]


def test_an_image_is_taken_as_base64_or_as_a_file_part(client: FlaskClient, token: Token) -> None:
    headers = token()
    as_b64 = client.post(
        "/v1/jobs",
        json={"provider": "piclaza", "input": {"image_b64": base64.b64encode(PNG).decode()}},
        headers=headers,
    )
    as_file = client.post(
        "/v1/jobs",
        data={
            "provider": "piclaza",
            "metadata": '{"via": "form"}',
            "deadline": "900",
            "image": (io.BytesIO(PNG), "cat.png", "image/png"),
        },
        content_type="multipart/form-data",
        headers=headers,
    )
    assert (as_b64.status_code, as_file.status_code) == (201, 201), as_file.get_json()
    assert as_file.get_json()["metadata"] == {"via": "form"}
    with session_scope() as session:
        stored = session.scalars(select(JobInput.content)).all()
    assert stored == [PNG, PNG]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"provider": "nope"}, "provider"),
        ({"input": {**PIAPI, "index": "9"}}, "input.index"),
        ({"input": {**PIAPI, "tenant": "other"}}, "input.tenant"),
        ({"input": {**PIAPI, "runtime": 1}}, "input.runtime"),
        ({"input": {**PIAPI, "priority": 1}}, "input.priority"),
        ({"input": "a cat"}, "input"),
        ({"extra": 1}, "extra"),
        ({"deadline": -5}, "deadline"),
        ({"deadline": "2020-01-01T00:00:00Z"}, "deadline"),
        ({"deadline": "tomorrow"}, "deadline"),
        ({"deadline": "900"}, "deadline"),
        ({"deadline": True}, "deadline"),
        ({"notify_url": "ftp://x.example"}, "notify_url"),
        ({"metadata": {"a b": "c"}}, "metadata"),
        ({"metadata": {"k": 1}}, "metadata"),
        ({"provider": "piclaza", "input": {"image_b64": "not base64!"}}, "input.image_b64"),
        ({"provider": "piclaza", "input": {"image_b64": "aGVsbG8="}}, "input.image_b64"),
        (
            {
                "provider": "piclaza",
                "input": {"image_b64": "aGVsbG8=", "image_url": "https://x.example/a.png"},
            },
            "input.image_b64",
        ),
    ],
)
def test_bad_input_is_a_400_naming_the_field_and_stores_nothing(
    client: FlaskClient, token: Token, body: dict[str, Any], field: str
) -> None:
    is_problem(create(client, token(), **body), 400, field)
    assert counts() == (0, 0)


def test_bodies_that_are_not_a_request_are_refused_cleanly(
    client: FlaskClient, token: Token
) -> None:
    headers = token()
    for data in (b"{bad", b"NaN", b"[1]", b"\xff\xfe", b"[" * 100_000, b"null"):
        answer = client.post(
            "/v1/jobs", data=data, content_type="application/json", headers=headers
        )
        is_problem(answer, 400)
    is_problem(client.post("/v1/jobs", data="x", content_type="text/plain", headers=headers), 415)
    too_big = b'{"provider": "piapi", "input": {"prompt": "' + b"x" * (8 * 1024 * 1024) + b'"}}'
    is_problem(
        client.post("/v1/jobs", data=too_big, content_type="application/json", headers=headers), 413
    )
    assert counts() == (0, 0)


# --- idempotency ---------------------------------------------------------------------------


def test_the_same_key_and_request_replay_the_job_and_another_request_is_a_409(
    client: FlaskClient, token: Token
) -> None:
    headers = {**token("shop"), "Idempotency-Key": "order-7"}
    first = create(client, headers)
    again = create(client, headers)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.get_json()["id"] == first.get_json()["id"]
    assert "Location" not in again.headers
    conflict = is_problem(create(client, headers, metadata={"other": "request"}), 409)
    assert conflict["job_id"] == first.get_json()["id"]
    # Another tenant's identical key is its own job, not a conflict (it learns nothing).
    theirs = create(client, {**token("rival"), "Idempotency-Key": "order-7"})
    assert theirs.status_code == 201 and theirs.get_json()["id"] != first.get_json()["id"]
    assert counts()[0] == 2


def test_concurrent_requests_with_one_key_make_one_job(app: Flask, token: Token) -> None:
    headers = {**token(), "Idempotency-Key": "burst-1"}
    answers: list[tuple[int, str]] = []
    start = threading.Barrier(8)

    def send() -> None:
        start.wait()
        answer = create(app.test_client(), headers)
        answers.append((answer.status_code, answer.get_json()["id"]))

    threads = [threading.Thread(target=send) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(status for status, _ in answers) == [200] * 7 + [201]
    assert len({job_id for _, job_id in answers}) == 1
    assert counts()[0] == 1


# --- tokens and tenants --------------------------------------------------------------------


def test_every_operation_needs_a_live_token(client: FlaskClient, token: Token) -> None:
    job_id = create(client, token()).get_json()["id"]
    calls = [
        ("POST", "/v1/jobs"),
        ("GET", "/v1/jobs"),
        ("GET", f"/v1/jobs/{job_id}"),
        ("GET", f"/v1/jobs/{job_id}/events"),
        ("POST", f"/v1/jobs/{job_id}/cancel"),
        ("GET", f"/v1/jobs/{job_id}/results/0"),
    ]
    for headers in ({}, {"Authorization": "Bearer vf_nope"}, {"Authorization": "Basic dTpw"}):
        for method, path in calls:
            answer = client.open(path, method=method, headers=headers)
            is_problem(answer, 401)
            assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    revoked = token("gone", name="gone")
    assert client.get("/v1/jobs", headers=revoked).status_code == 200
    with session_scope() as session:
        tokens.revoke(session, "gone")
    is_problem(client.get("/v1/jobs", headers=revoked), 401)


def test_another_tenants_job_is_not_found_anywhere(client: FlaskClient, token: Token) -> None:
    ours, theirs, admin = token("shop"), token("rival"), token("ops", admin=True)
    job_id = support.insert_job(
        tenant="shop", status="completed", result_urls=["https://cdn.example/1.png"], progress=100
    )
    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/events", f"/v1/jobs/{job_id}/results/0"):
        assert client.get(path, headers=ours).status_code in (200, 302)
        is_problem(client.get(path, headers=theirs), 404)
        assert client.get(path, headers=admin).status_code in (200, 302)
    is_problem(client.post(f"/v1/jobs/{job_id}/cancel", headers=theirs), 404)
    assert client.get("/v1/jobs", headers=theirs).get_json()["data"] == []
    assert client.get("/v1/jobs?tenant=shop", headers=theirs).get_json()["data"] == []
    assert [j["id"] for j in client.get("/v1/jobs", headers=ours).get_json()["data"]] == [
        str(job_id)
    ]
    listed = client.get("/v1/jobs?tenant=shop", headers=admin).get_json()["data"]
    assert [j["id"] for j in listed] == [str(job_id)]
    assert client.get("/v1/jobs?tenant=rival", headers=admin).get_json()["data"] == []


# --- reading -------------------------------------------------------------------------------


def test_pages_follow_a_cursor_stable_under_inserts(client: FlaskClient, token: Token) -> None:
    headers = token()
    base = utcnow() - timedelta(hours=1)
    made = [
        support.insert_job(
            tenant="shop", upstream_task_id=f"t-{i}", created_at=base + timedelta(seconds=i)
        )
        for i in range(5)
    ]
    first = client.get("/v1/jobs?limit=2", headers=headers).get_json()
    # Jobs created meanwhile are newer: they shift nothing after the cursor.
    support.insert_job(tenant="shop", upstream_task_id="t-new")
    second = client.get(
        f"/v1/jobs?limit=2&cursor={first['next_cursor']}", headers=headers
    ).get_json()
    third = client.get(
        f"/v1/jobs?limit=2&cursor={second['next_cursor']}", headers=headers
    ).get_json()
    seen = [j["id"] for page in (first, second, third) for j in page["data"]]
    assert seen == [str(job_id) for job_id in reversed(made)]
    assert third["next_cursor"] is None
    is_problem(client.get("/v1/jobs?cursor=bm90LWEtY3Vyc29y", headers=headers), 400, "cursor")
    is_problem(client.get("/v1/jobs?limit=1000", headers=headers), 400, "limit")
    is_problem(client.get("/v1/jobs?status=lost", headers=headers), 400, "status")


def test_the_list_filters_by_status_provider_time_and_metadata(
    client: FlaskClient, token: Token
) -> None:
    headers = token()
    old = utcnow() - timedelta(days=2)
    a = support.insert_job(
        tenant="shop", upstream_task_id="a", job_metadata={"order": "1"}, created_at=old
    )
    b = support.insert_job(
        tenant="shop", upstream_task_id="b", status="failed", job_metadata={"order": "2"}
    )
    c = support.insert_job(tenant="shop", provider="piclaza", upstream_task_id="c")

    def ids(query: str) -> set[str]:
        answer = client.get(f"/v1/jobs?{query}", headers=headers)
        assert answer.status_code == 200, answer.get_json()
        return {job["id"] for job in answer.get_json()["data"]}

    assert ids("status=failed") == {str(b)}
    assert ids("status=failed&status=submitted") == {str(a), str(b), str(c)}
    assert ids("provider=piclaza") == {str(c)}
    since = (utcnow() - timedelta(days=1)).isoformat()
    assert ids(f"created_since={since.replace('+', '%2B')}") == {str(b), str(c)}
    assert ids(f"created_until={since.replace('+', '%2B')}") == {str(a)}
    assert ids("metadata=order:2") == {str(b)}
    assert ids("metadata=order:3") == set()


def test_wait_returns_when_the_job_ends(app: Flask, client: FlaskClient, token: Token) -> None:
    headers = token()
    job_id = create(client, headers).get_json()["id"]
    assert (
        client.get(f"/v1/jobs/{job_id}?wait=0.05", headers=headers).get_json()["status"] == "queued"
    )
    answers: list[Any] = []
    waiter = threading.Thread(
        target=lambda: answers.append(
            app.test_client().get(f"/v1/jobs/{job_id}?wait=60", headers=headers)
        )
    )
    waiter.start()
    for _ in range(100_000):  # until the request is registered with the watcher
        found = app.extensions.get("variflow.watcher")
        if found is not None and uuid.UUID(job_id) in found.watched():
            break
        threading.Event().wait(0.001)
    assert (
        client.post(f"/v1/jobs/{job_id}/cancel", headers=headers).get_json()["status"]
        == "cancelled"
    )
    waiter.join(timeout=60)
    assert not waiter.is_alive()
    assert answers[0].get_json()["status"] == "cancelled"
    assert answers[0].get_json()["error"]["code"] == "cancelled"
    is_problem(client.get(f"/v1/jobs/{job_id}?wait=61", headers=headers), 400, "wait")


def test_cancel_ends_the_job_once(client: FlaskClient, token: Token) -> None:
    headers = token()
    job_id = create(client, headers).get_json()["id"]
    first = client.post(
        f"/v1/jobs/{job_id}/cancel", json={"reason": "changed my mind"}, headers=headers
    )
    assert first.get_json()["status"] == "cancelled"
    assert first.get_json()["error"] == {"code": "cancelled", "message": "changed my mind"}
    again = client.post(f"/v1/jobs/{job_id}/cancel", headers=headers)
    assert again.status_code == 200 and again.get_json() == first.get_json()
    is_problem(
        client.post(f"/v1/jobs/{job_id}/cancel", json={"why": 1}, headers=headers), 400, "why"
    )
    is_problem(client.post(f"/v1/jobs/{uuid.uuid4()}/cancel", headers=headers), 404)
    is_problem(client.get("/v1/jobs/not-a-uuid", headers=headers), 404)


def test_results_are_the_stored_copy_or_a_redirect(client: FlaskClient, token: Token) -> None:
    headers = token()
    settings = get_settings()
    job_id = uuid.uuid4()
    folder = job_folder(settings, job_id)
    folder.mkdir(parents=True)
    (folder / "0.png").write_bytes(PNG)
    support.insert_job(
        id=job_id,
        tenant="shop",
        status="completed",
        progress=100,
        result_urls=["https://cdn.example/0.png", "https://cdn.example/1.png"],
        archived_urls=[f"{settings.public_base}/results/{job_id}/0.png"],
    )
    stored = client.get(f"/v1/jobs/{job_id}/results/0", headers=headers)
    assert (stored.status_code, stored.data, stored.mimetype) == (200, PNG, "image/png")
    linked = client.get(f"/v1/jobs/{job_id}/results/1", headers=headers)
    assert (linked.status_code, linked.headers["Location"]) == (302, "https://cdn.example/1.png")
    is_problem(client.get(f"/v1/jobs/{job_id}/results/2", headers=headers), 404)
    job = client.get(f"/v1/jobs/{job_id}", headers=headers).get_json()
    assert job["results"][1] == {
        "index": 1,
        "url": f"/v1/jobs/{job_id}/results/1",
        "provider_url": "https://cdn.example/1.png",
    }
    running = support.insert_job(
        tenant="shop", upstream_task_id="t-2", result_urls=["https://x/1.png"]
    )
    is_problem(client.get(f"/v1/jobs/{running}/results/0", headers=headers), 404)


# --- the document --------------------------------------------------------------------------


def test_the_document_describes_every_operation_without_a_token(client: FlaskClient) -> None:
    document = client.get("/v1/openapi.json").get_json()
    assert document["openapi"] == "3.1.0"
    operations = {
        (method.upper(), path): op["operationId"]
        for path, methods in document["paths"].items()
        for method, op in methods.items()
    }
    assert operations == {
        ("POST", "/v1/jobs"): "createJob",
        ("GET", "/v1/jobs"): "listJobs",
        ("GET", "/v1/jobs/{job_id}"): "getJob",
        ("GET", "/v1/jobs/{job_id}/events"): "listJobEvents",
        ("POST", "/v1/jobs/{job_id}/cancel"): "cancelJob",
        ("GET", "/v1/jobs/{job_id}/results/{n}"): "getResult",
    }
    create_op = document["paths"]["/v1/jobs"]["post"]
    assert set(create_op["requestBody"]["content"]) == {"application/json", "multipart/form-data"}
    schemas = document["components"]["schemas"]
    assert set(schemas["CreateJob"]["properties"]) == {
        "priority",
        "provider",
        "input",
        "deadline",
        "notify_url",
        "metadata",
    }
    statuses = schemas["Job"]["properties"]["status"]["enum"]
    from worker.states import JobStatus

    assert statuses == [s.value for s in JobStatus]
    page = client.get("/v1/docs")
    assert page.status_code == 200 and b"swagger-ui-bundle.js" in page.data
    assert client.get("/v1/docs/static/swagger-ui-bundle.js").status_code == 200


def test_unknown_routes_and_methods_are_problems(client: FlaskClient, token: Token) -> None:
    headers = token()
    is_problem(client.get("/v1/nothing", headers=headers), 404)
    not_allowed = is_problem(client.delete("/v1/jobs", headers=headers), 405)
    assert not_allowed["status"] == 405
