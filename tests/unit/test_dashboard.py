"""The jobs dashboard (webhooks/dashboard/) through Flask's test client, on SQLite."""

from __future__ import annotations

import base64
import hashlib
import io
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import pytest
from flask.testing import FlaskClient
from PIL import Image
from sqlalchemy import event

from tests.conftest import Configure
from webhooks import create_app
from webhooks.dashboard import PAGE_SIZE
from worker.config import get_settings
from worker.models import Job, JobEvent, JobInput, utcnow
from worker.runtime import current, session_scope

USER = "ops"
PASSWORD = "pa55:w0rd é"  # a colon and a non-ASCII letter, both legal in basic auth
AUTH = (USER, PASSWORD)
JOB_LINK = re.compile(r'href="/dashboard/jobs/([0-9a-f-]{36})"')
SECRET_HASH = "f" * 64
CLAIM_TOKEN = "claimtoken1234567890abcdefabcdef"


@pytest.fixture
def client(sqlite_url: str, configure: Configure) -> FlaskClient:
    configure(dashboard_user=USER, dashboard_password=PASSWORD)
    app = create_app()
    app.testing = True
    return app.test_client()


def png(size: int = 8) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (10, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def insert_job(*, age: float = 0.0, **fields: Any) -> uuid.UUID:
    """A job row created ``age`` seconds ago; keyword arguments are its columns."""
    created = utcnow() - timedelta(seconds=age)
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "provider": "piapi",
        "status": "queued",
        "params": {"origin_task_id": "o-1", "index": "1", "prompt": "a cat"},
        "deadline": created + timedelta(hours=1),
        "created_at": created,
        "updated_at": created,
        "progress": 0,
    }
    values.update(fields)
    with session_scope() as session:
        session.add(Job(**values))
    job_id: uuid.UUID = values["id"]
    return job_id


def add_event(job_id: uuid.UUID, **fields: Any) -> None:
    values: dict[str, Any] = {"job_id": job_id, "source": "api", "kind": "transition"}
    values.update(fields)
    with session_scope() as session:
        session.add(JobEvent(**values))


def listed(client: FlaskClient, query: str = "") -> list[uuid.UUID]:
    response = client.get(f"/dashboard{query}", auth=AUTH)
    assert response.status_code == 200, response.text
    return [uuid.UUID(m) for m in JOB_LINK.findall(response.text)]


def section(html: str, section_id: str) -> str:
    """The HTML of the page's <section id=...>."""
    return html.split(f'id="{section_id}"', 1)[1].split("</section>", 1)[0]


def count_of(html: str, status: str) -> int:
    match = re.search(rf'data-status="{status}">\s*<span class="n">(\d+)</span>', html)
    assert match, f"no count for {status}"
    return int(match.group(1))


@contextmanager
def selects() -> Iterator[list[str]]:
    """The SELECT statements run inside the block."""
    seen: list[str] = []

    def record(_conn: Any, _cursor: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append(statement)

    engine = current().db.engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


# --- access ------------------------------------------------------------------


@pytest.mark.parametrize(
    "auth",
    [None, (USER, "wrong"), ("someone", PASSWORD), (USER, ""), ("", "")],
    ids=["none", "wrong-password", "wrong-user", "empty-password", "empty"],
)
def test_credentials_are_required(client: FlaskClient, auth: tuple[str, str] | None) -> None:
    job_id = insert_job(status="failed", error_code="boom")
    for path in ("/dashboard", f"/dashboard/jobs/{job_id}", f"/dashboard/jobs/{job_id}/input"):
        response = client.get(path, auth=auth)
        assert response.status_code == 401, path
        assert response.headers["WWW-Authenticate"].startswith('Basic realm="variflow dashboard"')
        assert "boom" not in response.text


def test_a_bearer_token_is_not_basic_auth(client: FlaskClient) -> None:
    response = client.get("/dashboard", headers={"Authorization": f"Bearer {PASSWORD}"})
    assert response.status_code == 401


def test_right_credentials_open_it(client: FlaskClient) -> None:
    response = client.get("/dashboard", auth=AUTH)
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    assert client.get("/dashboard/", auth=AUTH).status_code == 200


@pytest.mark.parametrize(
    "settings",
    [{}, {"dashboard_user": USER}, {"dashboard_password": PASSWORD}],
    ids=["nothing", "user-only", "password-only"],
)
def test_without_configured_credentials_there_is_no_dashboard(
    sqlite_url: str, configure: Configure, settings: dict[str, str]
) -> None:
    configure(**settings)
    app = create_app()
    client = app.test_client()
    job_id = insert_job()
    for path in ("/dashboard", f"/dashboard/jobs/{job_id}", f"/dashboard/jobs/{job_id}/input"):
        for auth in (None, AUTH):
            response = client.get(path, auth=auth)
            assert response.status_code == 404, (path, auth)
            assert "WWW-Authenticate" not in response.headers


def test_pages_are_not_cached_and_carry_a_strict_policy(client: FlaskClient) -> None:
    response = client.get("/dashboard", auth=AUTH)
    assert response.headers["Cache-Control"] == "no-store"
    policy = csp(response.headers["Content-Security-Policy"])
    assert policy["default-src"] == ["'none'"]
    # Scripts: only the live list's, by its hash; never inline ones in general.
    assert len(policy["script-src"]) == 1 and policy["script-src"][0].startswith("'sha256-")
    assert policy["connect-src"] == ["'self'"] and policy["form-action"] == ["'self'"]
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    # No referrer to other origins (hotlinked results); the forms' POSTs keep their Origin.
    assert response.headers["Referrer-Policy"] == "same-origin"
    assert '<meta name="referrer" content="same-origin">' in response.text


def csp(header: str) -> dict[str, list[str]]:
    directives = (part.split() for part in header.split(";") if part.strip())
    return {name: values for name, *values in directives}


# --- the jobs list -------------------------------------------------------------


def test_counts_by_status_and_newest_first(client: FlaskClient) -> None:
    oldest = insert_job(age=300, status="completed")
    middle = insert_job(age=200, status="failed", provider="piclaza", params={})
    newest = insert_job(age=100, status="completed", provider="lemondata", params={})

    with selects() as statements:
        response = client.get("/dashboard", auth=AUTH)

    assert [uuid.UUID(m) for m in JOB_LINK.findall(response.text)] == [newest, middle, oldest]
    assert count_of(response.text, "completed") == 2
    assert count_of(response.text, "failed") == 1
    assert count_of(response.text, "queued") == 0
    grouped = [s for s in statements if "GROUP BY" in s.upper()]
    assert len(grouped) == 1 and len(statements) == 2  # the counts, then the page


def test_filters_by_status_and_provider(client: FlaskClient) -> None:
    failed_piapi = insert_job(status="failed")
    failed_piclaza = insert_job(status="failed", provider="piclaza", params={})
    done_piclaza = insert_job(status="completed", provider="piclaza", params={})
    queued_lemon = insert_job(status="queued", provider="lemondata", params={})

    assert set(listed(client, "?status=failed")) == {failed_piapi, failed_piclaza}
    assert set(listed(client, "?provider=piclaza")) == {failed_piclaza, done_piclaza}
    assert listed(client, "?status=failed&provider=piclaza") == [failed_piclaza]
    assert listed(client, "?status=queued&provider=piapi") == []
    assert set(listed(client, "?status=&provider=")) == {
        failed_piapi,
        failed_piclaza,
        done_piclaza,
        queued_lemon,
    }
    # The counts follow the provider filter.
    html = client.get("/dashboard?provider=piclaza", auth=AUTH).text
    assert count_of(html, "failed") == 1 and count_of(html, "completed") == 1
    assert count_of(html, "queued") == 0


@pytest.mark.parametrize("query", ["?status=lost", "?provider=openai", "?status=%3Cb%3E"])
def test_unknown_filter_values_are_rejected(client: FlaskClient, query: str) -> None:
    response = client.get(f"/dashboard{query}", auth=AUTH)
    assert response.status_code == 400
    assert "<b>" not in response.text


def test_pages_of_fifty_without_gaps_or_repeats(client: FlaskClient) -> None:
    statuses = ["queued", "submitted", "processing", "completed", "failed", "cancelled"]
    ids = [
        insert_job(age=1000 - n, status=statuses[n % len(statuses)])
        for n in range(PAGE_SIZE * 2 + 7)
    ]
    newest_first = ids[::-1]

    first = client.get("/dashboard", auth=AUTH).text
    assert "Older →" in first and "← Newer" not in first
    assert "1\N{EN DASH}50 of 107" in first
    pages = [listed(client, f"?page={page}") for page in (1, 2, 3)]

    assert pages[0] + pages[1] + pages[2] == newest_first
    assert [len(p) for p in pages] == [PAGE_SIZE, PAGE_SIZE, 7]
    last = client.get("/dashboard?page=3", auth=AUTH).text
    assert "Older →" not in last and "← Newer" in last
    assert listed(client, "?page=4") == []
    for bad in ("0", "-3", "x"):
        assert listed(client, f"?page={bad}") == pages[0]
    # A filtered list pages the same way, and its links keep the filter.
    completed = [i for n, i in enumerate(ids) if statuses[n % len(statuses)] == "completed"]
    assert listed(client, "?status=completed") == completed[::-1]


def test_pagination_links_keep_the_filters(client: FlaskClient) -> None:
    for n in range(PAGE_SIZE + 1):
        insert_job(age=n, status="failed", provider="piclaza", params={})
    html = client.get("/dashboard?status=failed&provider=piclaza", auth=AUTH).text
    older = re.search(r'<a href="([^"]+)" rel="next">', html)
    assert older is not None
    assert "status=failed" in older.group(1) and "provider=piclaza" in older.group(1)
    assert "page=2" in older.group(1)


# --- one job -------------------------------------------------------------------


def test_job_page_shows_the_timeline_and_the_error(client: FlaskClient) -> None:
    job_id = insert_job(
        status="failed",
        upstream_task_id="task-77",
        error_code="provider_error",
        error_message="upstream said: quota exceeded",
        webhook_secret_hash=SECRET_HASH,
        claim_token=CLAIM_TOKEN,
        notify_url="https://app.example/hooks/done?token=s3cr3t-t0ken",
    )
    at = utcnow()
    add_event(job_id, at=at, to_status="queued", message="accepted")
    add_event(
        job_id,
        at=at + timedelta(seconds=1),
        source="submit",
        from_status="queued",
        to_status="submitted",
        message="task created",
    )
    add_event(
        job_id,
        at=at + timedelta(seconds=2),
        source="webhook",
        kind="ignored",
        from_status="submitted",
        to_status="submitted",
        message="duplicate delivery",
    )
    add_event(
        job_id,
        at=at + timedelta(seconds=3),
        source="poll",
        from_status="submitted",
        to_status="failed",
        message="quota exceeded",
    )

    with selects() as statements:
        response = client.get(f"/dashboard/jobs/{job_id}", auth=AUTH)

    assert response.status_code == 200
    html = response.text
    timeline = section(html, "timeline")
    rows = re.findall(r"<tr class=\"(\w+)\">(.*?)</tr>", timeline, re.S)
    assert [kind for kind, _ in rows] == ["transition", "transition", "ignored", "transition"]
    assert ["accepted" in rows[0][1], "webhook" in rows[2][1], "poll" in rows[3][1]] == [True] * 3
    assert re.search(r'badge submitted">submitted</span> → <span class="badge failed">', rows[3][1])
    error = html[html.index('id="job-error"') :]
    assert "provider_error" in error and "upstream said: quota exceeded" in error
    assert "task-77" in html
    assert "app.example" in html
    for secret in (SECRET_HASH, CLAIM_TOKEN, "s3cr3t-t0ken", "/hooks/done"):
        assert secret not in html
    assert len(statements) == 3  # the job, its events, its input's metadata


def test_unknown_or_malformed_job_ids_are_404(client: FlaskClient) -> None:
    assert client.get(f"/dashboard/jobs/{uuid.uuid4()}", auth=AUTH).status_code == 404
    assert client.get("/dashboard/jobs/not-a-uuid", auth=AUTH).status_code == 404


def test_result_images_prefer_the_archived_copies(client: FlaskClient) -> None:
    base = get_settings().public_base
    provider_urls = ["https://cdn.provider.test/1.png", "https://cdn.provider.test/2.png"]
    archived = insert_job(
        status="completed",
        result_urls=provider_urls,
        archived_urls=[f"{base}/results/x/1.png", f"{base}/results/x/2.png"],
    )
    not_archived = insert_job(status="completed", result_urls=[*provider_urls, "javascript:x()"])

    html = client.get(f"/dashboard/jobs/{archived}", auth=AUTH).text
    images = re.findall(r'<img class="result" src="([^"]+)"', html)
    assert images == ["/results/x/1.png", "/results/x/2.png"]
    assert "Provider URLs" in html and provider_urls[0] in html  # as links, for reference

    html = client.get(f"/dashboard/jobs/{not_archived}", auth=AUTH).text
    assert re.findall(r'<img class="result" src="([^"]+)"', html) == provider_urls
    assert "javascript:" not in html


def test_input_image_is_served_behind_the_same_auth(client: FlaskClient) -> None:
    content = png()
    job_id = insert_job(provider="piclaza", params={})
    with session_scope() as session:
        session.add(
            JobInput(job_id=job_id, content=content, filename="in.png", content_type="image/png")
        )

    html = client.get(f"/dashboard/jobs/{job_id}", auth=AUTH).text
    assert f'<img src="/dashboard/jobs/{job_id}/input"' in html
    assert content.hex() not in html and "base64" not in html

    response = client.get(f"/dashboard/jobs/{job_id}/input", auth=AUTH)
    assert response.status_code == 200
    assert response.mimetype == "image/png"
    assert response.data == content
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert client.get(f"/dashboard/jobs/{job_id}/input").status_code == 401


def test_input_of_an_unknown_type_is_a_download(client: FlaskClient) -> None:
    job_id = insert_job(provider="piclaza", params={})
    with session_scope() as session:
        session.add(
            JobInput(
                job_id=job_id,
                content=b"<html><script>alert(1)</script>",
                filename="x.bin",
                content_type="application/octet-stream",
            )
        )
    response = client.get(f"/dashboard/jobs/{job_id}/input", auth=AUTH)
    assert response.mimetype == "application/octet-stream"
    assert response.headers["Content-Disposition"] == "attachment"
    page = client.get(f"/dashboard/jobs/{job_id}", auth=AUTH).text
    assert "<img" not in section(page, "input")
    assert f'href="/dashboard/jobs/{job_id}/input"' in section(page, "input")


def test_jobs_without_input_have_no_input_image(client: FlaskClient) -> None:
    job_id = insert_job()
    assert client.get(f"/dashboard/jobs/{job_id}/input", auth=AUTH).status_code == 404
    assert client.get(f"/dashboard/jobs/{uuid.uuid4()}/input", auth=AUTH).status_code == 404


def test_an_image_url_input_is_a_link_not_a_hotlinked_image(client: FlaskClient) -> None:
    url = "https://images.example/in.png?a=1&b=2"
    job_id = insert_job(provider="lemondata", params={"image_url": url, "n": 2})

    html = client.get(f"/dashboard/jobs/{job_id}", auth=AUTH).text

    escaped = "https://images.example/in.png?a=1&amp;b=2"
    assert f'<a href="{escaped}"' in html
    assert f'src="{escaped}"' not in html
    assert "<img" not in section(html, "input")


def test_everything_is_escaped(client: FlaskClient) -> None:
    evil = '<script>alert("x")</script>'
    job_id = insert_job(
        status="failed",
        params={"origin_task_id": "o-1", "index": "1", "prompt": evil},
        error_code="<b>code</b>",
        error_message=evil,
        idempotency_key=evil,
    )
    add_event(job_id, to_status="queued", message=evil)

    for path in ("/dashboard", f"/dashboard/jobs/{job_id}"):
        html = client.get(path, auth=AUTH).text
        assert "<script>" not in html and "<b>code</b>" not in html, path
        assert "&lt;script&gt;" in html, path


# --- tenant -------------------------------------------------------------------------


def test_the_tenant_is_shown_in_the_list_and_on_the_job_page(client: FlaskClient) -> None:
    mine = insert_job(tenant="acme-corp", age=2)
    nobody = insert_job(age=1)
    evil = insert_job(tenant="<i>t</i>")

    html = client.get("/dashboard", auth=AUTH).text
    tenants = re.findall(r'<td class="tenant">(.*?)</td>', html)
    assert tenants == ["&lt;i&gt;t&lt;/i&gt;", '<span class="muted">—</span>', "acme-corp"]
    assert "<th>Tenant</th>" in html

    page = client.get(f"/dashboard/jobs/{mine}", auth=AUTH).text
    assert '<dd id="job-tenant">acme-corp</dd>' in page
    page = client.get(f"/dashboard/jobs/{nobody}", auth=AUTH).text
    assert '<dd id="job-tenant">—</dd>' in page
    assert "<i>t</i>" not in client.get(f"/dashboard/jobs/{evil}", auth=AUTH).text


# --- the live list --------------------------------------------------------------------

SCRIPT = re.compile(r"<script>(.*?)</script>", re.S)


def live(html: str) -> bool:
    jobs = html.split('<section id="jobs"', 1)[1].split(">", 1)[0]
    return "data-refresh=" in jobs


@pytest.mark.parametrize("status", ["queued", "submitted", "processing"])
def test_the_list_refreshes_while_a_job_on_it_is_in_flight(
    client: FlaskClient, status: str
) -> None:
    insert_job(status="completed", age=2)
    insert_job(status=status, age=1)

    response = client.get("/dashboard", auth=AUTH)

    assert live(response.text)
    scripts = SCRIPT.findall(response.text)
    assert len(scripts) == 1
    # The script runs only if its hash is the one the policy allows.
    digest = base64.b64encode(hashlib.sha256(scripts[0].encode()).digest()).decode()
    policy = csp(response.headers["Content-Security-Policy"])
    assert policy["script-src"] == [f"'sha256-{digest}'"]
    # The regions the script swaps are on the page, with ids.
    assert 'id="counts" data-live' in response.text and 'id="jobs" data-live' in response.text


def test_the_list_stands_still_when_nothing_on_it_is_in_flight(client: FlaskClient) -> None:
    for status in ("completed", "failed", "cancelled"):
        insert_job(status=status)
    html = client.get("/dashboard", auth=AUTH).text
    assert not live(html) and "<script" not in html
    # Empty, too.
    assert "<script" not in client.get("/dashboard?status=queued", auth=AUTH).text


def test_only_the_jobs_shown_decide(client: FlaskClient) -> None:
    in_flight = insert_job(status="processing", age=10_000)
    for n in range(PAGE_SIZE):
        insert_job(status="completed", age=n)
    assert not live(client.get("/dashboard", auth=AUTH).text)  # it is on page 2
    assert live(client.get("/dashboard?page=2", auth=AUTH).text)
    assert live(client.get("/dashboard?status=processing", auth=AUTH).text)
    assert not live(client.get("/dashboard?status=completed", auth=AUTH).text)
    # A job page never refreshes itself.
    assert "<script" not in client.get(f"/dashboard/jobs/{in_flight}", auth=AUTH).text


# --- notices -----------------------------------------------------------------------


def test_a_notice_is_one_of_the_dashboard_own_lines(client: FlaskClient) -> None:
    job_id = insert_job(status="completed")
    other = uuid.uuid4()

    def notice(query: str) -> str | None:
        html = client.get(f"/dashboard/jobs/{job_id}{query}", auth=AUTH).text
        found = re.search(r'<div class="notice" role="status" id="notice">(.*?)</div>', html)
        return found.group(1) if found else None

    assert notice("") is None
    assert notice("?notice=cancelled") == "Cancelled."
    assert notice("?notice=ended") == "Nothing to cancel: the job had already ended (completed)."
    assert notice(f"?notice=retried&of={other}") == (
        f'Created as a retry of job <a class="mono" href="/dashboard/jobs/{other}">{other}</a>'
    )
    assert notice("?notice=retried&of=%3Cscript%3E") == "Created as a retry of job"
    # Whatever else a link says is not shown: nobody can put words on the dashboard.
    assert notice("?notice=%3Cb%3ECall+us%3C/b%3E") is None
    html = client.get(f"/dashboard/jobs/{job_id}?notice=Call+555", auth=AUTH).text
    assert "Call 555" not in html


# --- accounts --------------------------------------------------------------------------


def test_the_accounts_page_needs_credentials_and_exists_only_with_the_dashboard(
    client: FlaskClient, configure: Configure
) -> None:
    assert client.get("/dashboard/accounts").status_code == 401
    assert client.get("/dashboard/accounts", auth=(USER, "wrong")).status_code == 401
    ok = client.get("/dashboard/accounts", auth=AUTH)
    assert ok.status_code == 200 and ok.headers["Cache-Control"] == "no-store"
    # Every page links to it (and back to the jobs).
    index = client.get("/dashboard", auth=AUTH).text
    assert 'href="/dashboard/accounts"' in index and 'href="/dashboard/"' in ok.text

    configure(dashboard_password="")
    closed = create_app().test_client()
    assert closed.get("/dashboard/accounts", auth=AUTH).status_code == 404


def test_the_accounts_page_shows_every_providers_account_never_a_key(
    client: FlaskClient, configure: Configure
) -> None:
    key = "sk-very-secret-key"
    configure(piapi_api_key=key, piapi_max_in_flight=3, piapi_daily_spend_cap=2.5)
    app = create_app()
    app.testing = True
    html = app.test_client().get("/dashboard/accounts", auth=AUTH).text

    labels = re.findall(r'data-account="([^"]+)"', html)
    assert labels == [f"{p}/main" for p in get_settings().provider_names]
    row = html.split('data-account="piapi/main"', 1)[1].split("</tr>", 1)[0]
    assert hashlib.sha256(key.encode()).hexdigest()[:8] in row
    assert key not in html
    slots = re.search(r'data-field="slots">(.*?)</td>', row, re.S)
    assert slots is not None and re.sub(r"<[^>]+>|\s", "", slots.group(1)) == "0/3"
    assert "/ 2.5" in row


def test_the_accounts_page_refreshes_with_the_lists_own_script_while_accounts_are_busy(
    client: FlaskClient,
) -> None:
    quiet = client.get("/dashboard/accounts", auth=AUTH)
    assert "<script" not in quiet.text and "data-refresh" not in quiet.text

    insert_job(status="processing", account="main", submitted_at=utcnow())
    busy = client.get("/dashboard/accounts", auth=AUTH)

    assert 'id="accounts" data-live data-refresh="5"' in busy.text
    assert 'id="waiting" data-live' in busy.text
    # The same script as the jobs list: the policy's one hash allows it, unchanged.
    [script] = SCRIPT.findall(busy.text)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert csp(busy.headers["Content-Security-Policy"])["script-src"] == [f"'sha256-{digest}'"]


def test_a_waiting_jobs_page_says_why_and_escapes_it(client: FlaskClient) -> None:
    reason = 'paused until 12:00:00 UTC on piapi/main: <img src=x onerror="alert(1)">'
    job_id = insert_job(status="queued", waiting_reason=reason, priority=-5)
    html = client.get(f"/dashboard/jobs/{job_id}", auth=AUTH).text
    waiting = re.search(r'id="job-waiting">(.*?)</div>', html, re.S)
    assert waiting is not None
    assert "&lt;img src=x onerror=&#34;alert(1)&#34;&gt;" in waiting.group(1)
    assert "<img src=x" not in html
    assert re.search(r'id="job-priority">-5<', html)

    # An ended job's leftover reason is not shown as waiting.
    ended = insert_job(status="cancelled", waiting_reason=reason)
    assert 'id="job-waiting"' not in client.get(f"/dashboard/jobs/{ended}", auth=AUTH).text
