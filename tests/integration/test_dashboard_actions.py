"""The dashboard's actions (cancel, retry), their CSRF protection, and its search,
through Flask's test client on SQLite and on PostgreSQL."""

from __future__ import annotations

import re
import time
import uuid
from datetime import timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient
from pydantic import SecretStr
from sqlalchemy import func, select
from werkzeug.test import TestResponse

from tests.conftest import Configure
from tests.dashboard_support import backend as backend
from tests.dashboard_support import client as client
from tests.unit.test_dashboard import AUTH, JOB_LINK, USER, insert_job, png
from webhooks import create_app
from webhooks.dashboard import access
from worker.api import cancel_job, get_job, submit_variation
from worker.config import get_settings
from worker.models import Job, JobInput
from worker.runtime import session_scope
from worker.states import JobStatus

RETRIED = re.compile(r"/dashboard/jobs/([0-9a-f-]{36})\?notice=retried&of=([0-9a-f-]{36})")
TOKEN = re.compile(r'name="csrf_token" value="([^"]+)"')
PIAPI: dict[str, Any] = {"origin_task_id": "o-9", "index": "3", "prompt": "a blue heron"}


def token_of(client: FlaskClient, job_id: uuid.UUID) -> str:
    """The CSRF token of the job page's form, as a browser would post it."""
    html = client.get(f"/dashboard/jobs/{job_id}", auth=AUTH).text
    found = TOKEN.findall(html)
    assert len(found) == 1, "one form on the page"
    return found[0]


def post(
    client: FlaskClient,
    path: str,
    token: str | None,
    auth: tuple[str, str] | None = AUTH,
    **headers: str,
) -> TestResponse:
    data = {"csrf_token": token} if token is not None else {}
    return client.post(path, data=data, auth=auth, headers=headers)


def job_count() -> int:
    with session_scope() as session:
        return int(session.scalar(select(func.count()).select_from(Job)) or 0)


def status_of(job_id: uuid.UUID) -> str:
    return get_job(job_id).status.value


# --- CSRF -------------------------------------------------------------------------------


def forged_tokens() -> dict[str, str]:
    settings = get_settings()
    now = time.time()
    other = settings.model_copy(update={"dashboard_password": SecretStr("another password")})
    return {
        "empty": "",
        "garbage": "not a token",
        "no-mac": f"{int(now)}.",
        "bad-mac": f"{int(now)}.{'0' * 64}",
        "other-user": access.issue_token(settings, "someone", now),
        "other-password": access.issue_token(other, USER, now),
        "expired": access.issue_token(settings, USER, now - access.TOKEN_LIFETIME - 5),
        "from-the-future": access.issue_token(settings, USER, now + access.CLOCK_SKEW + 60),
        "superscript": f"²{int(now)}.{'0' * 64}",
        "huge-time": f"{'9' * 40}.{'0' * 64}",
    }


@pytest.mark.parametrize("action", ["cancel", "retry"])
def test_a_post_without_a_valid_token_is_refused_and_changes_nothing(
    client: FlaskClient, action: str
) -> None:
    queued = insert_job()
    failed = insert_job(status="failed", error_code="boom")
    job_id = queued if action == "cancel" else failed
    path = f"/dashboard/jobs/{job_id}/{action}"
    before = job_count()

    for name, token in {"missing": None, **forged_tokens()}.items():
        response = post(client, path, token)
        assert response.status_code == 400, name
        assert "CSRF token" in response.text, name
    # Not a form at all.
    response = client.post(path, json={"csrf_token": token_of(client, job_id)}, auth=AUTH)
    assert response.status_code == 400
    # A token in the query string is not taken (it would end up in logs and histories).
    response = client.post(f"{path}?csrf_token={token_of(client, job_id)}", auth=AUTH)
    assert response.status_code == 400

    assert status_of(queued) == "queued" and status_of(failed) == "failed"
    assert job_count() == before


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Origin": "http://localhost.evil.example"},
        {"Origin": "http://[::1"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
        {"Sec-Fetch-Site": "same-origin", "Origin": "https://evil.example"},
    ],
    ids=["origin", "null-origin", "lookalike", "malformed", "cross-site", "same-site", "mixed"],
)
def test_a_cross_origin_post_is_refused_even_with_a_token(
    client: FlaskClient, headers: dict[str, str]
) -> None:
    job_id = insert_job()
    response = post(client, f"/dashboard/jobs/{job_id}/cancel", token_of(client, job_id), **headers)
    assert response.status_code == 403
    assert status_of(job_id) == "queued"


def test_a_post_needs_the_credentials_first(client: FlaskClient) -> None:
    job_id = insert_job()
    token = token_of(client, job_id)
    for auth in (None, (USER, "wrong")):
        response = post(client, f"/dashboard/jobs/{job_id}/cancel", token, auth=auth)
        assert response.status_code == 401
    assert status_of(job_id) == "queued"


def test_a_browser_post_from_the_page_itself_is_accepted(client: FlaskClient) -> None:
    job_id = insert_job()
    response = post(
        client,
        f"/dashboard/jobs/{job_id}/cancel",
        token_of(client, job_id),
        Origin="http://localhost",
        **{"Sec-Fetch-Site": "same-origin"},
    )
    assert response.status_code == 303
    assert status_of(job_id) == "cancelled"


def test_tokens_are_refused_after_the_password_changes(
    backend: str, client: FlaskClient, configure: Configure
) -> None:
    job_id = insert_job()
    token = token_of(client, job_id)
    configure(dashboard_password="a new password")
    app = create_app()
    response = post(
        app.test_client(), f"/dashboard/jobs/{job_id}/cancel", token, auth=(USER, "a new password")
    )
    assert response.status_code == 400
    assert status_of(job_id) == "queued"


# --- cancel -------------------------------------------------------------------------------


def test_cancel_from_the_job_page(client: FlaskClient) -> None:
    job = submit_variation("piapi", **PIAPI)
    page = client.get(f"/dashboard/jobs/{job.id}", auth=AUTH).text
    assert 'id="cancel"' in page and 'id="retry"' not in page

    response = post(client, f"/dashboard/jobs/{job.id}/cancel", token_of(client, job.id))

    assert response.status_code == 303
    assert response.headers["Location"] == f"/dashboard/jobs/{job.id}?notice=cancelled"
    cancelled = get_job(job.id)
    assert cancelled.status is JobStatus.CANCELLED
    assert cancelled.error_message == f"cancelled from the dashboard by {USER}"
    page = client.get(response.headers["Location"], auth=AUTH).text
    assert 'id="job-status">cancelled<' in page
    assert 'id="notice">Cancelled.</div>' in page
    assert 'id="cancel"' not in page and 'id="retry"' in page  # now it can be retried


def test_cancelling_an_ended_job_leaves_it_and_says_so(client: FlaskClient) -> None:
    job_id = insert_job(status="completed", progress=100)
    response = post(client, f"/dashboard/jobs/{job_id}/cancel", token_of(client, job_id))
    assert response.status_code == 303
    assert response.headers["Location"].endswith("?notice=ended")
    assert status_of(job_id) == "completed"
    page = client.get(response.headers["Location"], auth=AUTH).text
    assert "Nothing to cancel: the job had already ended (completed)." in page


def test_actions_on_unknown_jobs_are_404(client: FlaskClient) -> None:
    token = token_of(client, insert_job())
    for action in ("cancel", "retry"):
        assert post(client, f"/dashboard/jobs/{uuid.uuid4()}/{action}", token).status_code == 404
        assert post(client, f"/dashboard/jobs/nope/{action}", token).status_code == 404
    assert client.get(f"/dashboard/jobs/{uuid.uuid4()}/cancel", auth=AUTH).status_code == 405


# --- retry ---------------------------------------------------------------------------------


def test_retry_makes_a_new_job_asking_the_same(client: FlaskClient) -> None:
    image = png(16)
    old = submit_variation(
        "piclaza",
        image=image,
        tenant="acme",
        metadata={"order": "A-1042"},
        deadline=timedelta(minutes=20),
    )
    cancel_job(old.id)
    page = client.get(f"/dashboard/jobs/{old.id}", auth=AUTH).text
    assert 'id="retry"' in page and 'id="cancel"' not in page
    before = job_count()

    response = post(client, f"/dashboard/jobs/{old.id}/retry", token_of(client, old.id))

    assert response.status_code == 303
    location = response.headers["Location"]
    target = RETRIED.fullmatch(location)
    assert target and uuid.UUID(target.group(2)) == old.id
    new = get_job(target.group(1))
    assert new.id != old.id and job_count() == before + 1
    assert new.status is JobStatus.QUEUED
    assert (new.provider, new.params, new.tenant, new.metadata) == (
        old.provider,
        old.params,
        "acme",
        {"order": "A-1042"},
    )
    assert abs((new.deadline - new.created_at) - timedelta(minutes=20)) < timedelta(seconds=1)
    with session_scope() as session:
        stored = session.get(JobInput, new.id)
        assert stored is not None and stored.content == image
    assert status_of(old.id) == "cancelled"  # the original is left as it was

    page = client.get(location, auth=AUTH).text
    assert 'id="job-status">queued<' in page
    assert f'Created as a retry of job <a class="mono" href="/dashboard/jobs/{old.id}">' in page
    assert f'<img src="/dashboard/jobs/{new.id}/input"' in page


def test_a_double_click_on_retry_makes_one_job(client: FlaskClient) -> None:
    old = submit_variation("piapi", **PIAPI)
    cancel_job(old.id)
    token = token_of(client, old.id)
    before = job_count()
    first = post(client, f"/dashboard/jobs/{old.id}/retry", token)
    second = post(client, f"/dashboard/jobs/{old.id}/retry", token)  # the same form again
    assert first.headers["Location"] == second.headers["Location"]
    assert job_count() == before + 1


def test_only_an_ended_job_is_retried(client: FlaskClient) -> None:
    job = submit_variation("piapi", **PIAPI)
    before = job_count()
    response = post(client, f"/dashboard/jobs/{job.id}/retry", token_of(client, job.id))
    assert response.status_code == 409
    assert "still queued" in response.text
    assert job_count() == before


def test_a_job_that_cannot_be_asked_again_is_a_409_not_a_500(
    backend: str, client: FlaskClient, configure: Configure
) -> None:
    job = submit_variation("piclaza", image_url="https://images.example/in.png")
    cancel_job(job.id)
    token = token_of(client, job.id)
    configure(providers="piapi")  # piclaza no longer takes new jobs
    app = create_app()
    before = job_count()
    response = post(app.test_client(), f"/dashboard/jobs/{job.id}/retry", token)
    assert response.status_code == 409
    assert "piclaza" in response.text and "not enabled" in response.text
    assert job_count() == before


# --- search ----------------------------------------------------------------------------------


def search(client: FlaskClient, query: str) -> TestResponse:
    return client.get("/dashboard", query_string={"q": query}, auth=AUTH)


def found(response: TestResponse) -> list[uuid.UUID]:
    assert response.status_code == 200, response.status_code
    return [uuid.UUID(m) for m in JOB_LINK.findall(response.text)]


def redirected_to(response: TestResponse) -> uuid.UUID:
    assert response.status_code == 302, response.status_code
    path = response.headers["Location"]
    assert path.startswith("/dashboard/jobs/")
    return uuid.UUID(path.removeprefix("/dashboard/jobs/"))


def test_search_by_full_id_in_any_spelling(client: FlaskClient) -> None:
    job_id = insert_job()
    insert_job()
    for query in (str(job_id), job_id.hex, str(job_id).upper(), f"{{{job_id}}}", f" {job_id} "):
        assert redirected_to(search(client, query)) == job_id, query
    assert "No job matches" in search(client, str(uuid.uuid4())).text


def test_search_by_id_prefix(client: FlaskClient) -> None:
    ids = {
        name: uuid.UUID(value)
        for name, value in {
            "a1": "abcd1234-0000-4000-8000-000000000001",
            "a2": "abcd5678-0000-4000-8000-000000000002",
            "a3": "abce0000-0000-4000-8000-000000000003",
            "low": "00000000-0000-4000-8000-000000000000",
            "high": "ffffffff-ffff-4fff-bfff-ffffffffffff",
        }.items()
    }
    for age, job_id in enumerate(ids.values()):
        insert_job(id=job_id, age=age)

    assert found(search(client, "abcd")) == [ids["a1"], ids["a2"]]  # newest first
    assert found(search(client, "ABCD")) == [ids["a1"], ids["a2"]]
    assert redirected_to(search(client, "abcd12")) == ids["a1"]
    assert redirected_to(search(client, "abcd1234-00")) == ids["a1"]  # hyphens as in an id
    assert redirected_to(search(client, "abcd1234-0000-4000-8000-00000000000")) == ids["a1"]
    assert found(search(client, "abc")) == []  # three digits are not a prefix
    assert redirected_to(search(client, "0000")) == ids["low"]  # both ends of the range
    assert redirected_to(search(client, "ffff")) == ids["high"]
    assert found(search(client, "abcf")) == []
    assert found(search(client, "abcg")) == []  # not hex


def test_search_by_idempotency_key(client: FlaskClient) -> None:
    mine = insert_job(idempotency_key="order-42", tenant="acme", age=3)
    theirs = insert_job(idempotency_key="order-42", tenant="globex", age=2)
    single = insert_job(idempotency_key="Order 7/ü", age=1)
    # A key that is also an id prefix finds both.
    hexy = insert_job(id=uuid.UUID("beef0000-0000-4000-8000-000000000000"))
    keyed = insert_job(idempotency_key="beef")

    assert redirected_to(search(client, "Order 7/ü")) == single
    assert found(search(client, "order-42")) == [theirs, mine]  # the same key, two tenants
    assert found(search(client, "order-4")) == []  # exact, not a prefix
    assert found(search(client, "ORDER-42")) == []
    assert set(found(search(client, "beef"))) == {hexy, keyed}


def test_several_matches_are_the_list_and_none_says_so(client: FlaskClient) -> None:
    for n in range(52):
        insert_job(id=uuid.UUID(f"cafe{n:04x}-0000-4000-8000-000000000000"), age=n)

    html = search(client, "cafe").text
    assert len(JOB_LINK.findall(html)) == 50
    assert "50+ jobs match" in html and "give more of the id" in html
    html = search(client, "cafe003").text
    assert len(JOB_LINK.findall(html)) == 4 and "4 jobs match" in html
    assert 'value="cafe003"' in html  # the box keeps what was searched

    html = search(client, "no-such-key").text
    assert "No job matches" in html and "no-such-key" in html


@pytest.mark.parametrize(
    "query", ["\x00", "abcd\x00", "<script>alert(1)</script>", "' OR 1=1 --", "%", "_", "\\"]
)
def test_odd_searches_find_nothing_and_break_nothing(client: FlaskClient, query: str) -> None:
    insert_job(idempotency_key="k-1")
    response = search(client, query)
    assert response.status_code == 200
    assert found(response) == []
    assert "<script>" not in response.text


def test_a_search_too_long_for_any_key_is_a_400(client: FlaskClient) -> None:
    assert search(client, "k" * 255).status_code == 200
    response = search(client, "k" * 256)
    assert response.status_code == 400
    assert "at most 255 characters" in response.text


def test_a_blank_search_is_the_whole_list(client: FlaskClient) -> None:
    job_id = insert_job()
    assert found(search(client, "   ")) == [job_id]
