"""What the client sends: paths, headers, JSON and multipart bodies, the Idempotency-Key."""

from __future__ import annotations

import json
import tomllib
import uuid
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import httpx
import pytest
from client_support import (
    BASE,
    JOB_ID,
    TOKEN,
    FakeClock,
    Server,
    client,
    form_parts,
    job_json,
    ok,
    part_text,
)

import variflow_client
from variflow_client import Client, Job, Result

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 24


def created() -> httpx.Response:
    return ok(job_json(status="queued", progress=0), status=201)


def test_create_sends_json_with_the_token_user_agent_and_a_generated_key() -> None:
    server = Server(created())
    with client(server, FakeClock()) as c:
        job = c.jobs.create(
            "piclaza",
            {"image_url": "https://example.com/cat.png"},
            deadline=900,
            notify_url="https://app.example.com/hooks/variflow",
            metadata={"order": "A-1042"},
        )

    [request] = server.requests
    assert (request.method, request.url.path) == ("POST", "/v1/jobs")
    assert request.headers["authorization"] == f"Bearer {TOKEN}"
    assert request.headers["user-agent"] == "variflow-client/0.1.0"
    assert request.headers["content-type"] == "application/json"
    assert uuid.UUID(request.headers["idempotency-key"]).version == 4
    assert json.loads(request.content) == {
        "provider": "piclaza",
        "input": {"image_url": "https://example.com/cat.png"},
        "deadline": 900,
        "notify_url": "https://app.example.com/hooks/variflow",
        "metadata": {"order": "A-1042"},
    }
    assert isinstance(job, Job)
    assert (job.id, job.status, job.is_terminal) == (JOB_ID, "queued", False)


def test_create_leaves_out_what_is_not_given_and_sends_the_callers_key() -> None:
    server = Server(created())
    with client(server, FakeClock()) as c:
        c.jobs.create("piapi", {"origin_task_id": "t", "index": "1"}, idempotency_key="order-9")

    [request] = server.requests
    assert request.headers["idempotency-key"] == "order-9"
    assert json.loads(request.content) == {
        "provider": "piapi",
        "input": {"origin_task_id": "t", "index": "1"},
    }


def test_each_create_gets_its_own_generated_key() -> None:
    server = Server(created())
    with client(server, FakeClock()) as c:
        c.jobs.create("piclaza", {"image_url": "https://example.com/a.png"})
        c.jobs.create("piclaza", {"image_url": "https://example.com/a.png"})

    first, second = server.header("idempotency-key")
    assert first and second and first != second


def test_a_deadline_as_a_datetime_is_sent_as_rfc3339() -> None:
    server = Server(created())
    at = datetime(2026, 12, 2, 10, 15, tzinfo=timezone(timedelta(hours=2)))
    with client(server, FakeClock()) as c:
        c.jobs.create("piclaza", {"image_url": "https://example.com/a.png"}, deadline=at)

    assert json.loads(server.requests[0].content)["deadline"] == "2026-12-02T10:15:00+02:00"


@pytest.mark.parametrize(
    ("image", "message"),
    [
        ("https://example.com/cat.png", "image_url"),
        (Path("/no/such/file.png"), "No such file"),
    ],
)
def test_a_bad_image_argument_fails_before_any_request(image: str | Path, message: str) -> None:
    server = Server(created())
    with client(server, FakeClock()) as c, pytest.raises((ValueError, OSError), match=message):
        c.jobs.create("piclaza", {}, image=image)
    assert server.requests == []


def test_a_naive_deadline_is_refused_before_any_request() -> None:
    server = Server(created())
    with client(server, FakeClock()) as c, pytest.raises(ValueError, match="deadline"):
        c.jobs.create("piclaza", {}, deadline=datetime(2026, 1, 1))
    assert server.requests == []


def test_create_with_image_bytes_sends_multipart() -> None:
    server = Server(created())
    with client(server, FakeClock()) as c:
        c.jobs.create(
            "lemondata",
            {"n": 2, "size": "512x512"},
            image=PNG,
            deadline=120.5,
            notify_url="https://app.example.com/hook",
            metadata={"order": "A-1"},
            idempotency_key="k-1",
        )

    [request] = server.requests
    assert request.headers["idempotency-key"] == "k-1"
    parts = form_parts(request)
    assert set(parts) == {"provider", "input", "deadline", "notify_url", "metadata", "image"}
    assert part_text(parts["provider"]) == "lemondata"
    assert json.loads(part_text(parts["input"])) == {"n": 2, "size": "512x512"}
    assert part_text(parts["deadline"]) == "120.5"
    assert part_text(parts["notify_url"]) == "https://app.example.com/hook"
    assert json.loads(part_text(parts["metadata"])) == {"order": "A-1"}
    image = parts["image"]
    assert image.get_content_type() == "image/png"
    assert image.get_payload(decode=True) == PNG


def test_create_with_an_image_path_uploads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cat.png"
    path.write_bytes(PNG)
    server = Server(created())
    with client(server, FakeClock()) as c:
        c.jobs.create("piclaza", {}, image=str(path))

    parts = form_parts(server.requests[0])
    assert set(parts) == {"provider", "input", "image"}  # nothing not given
    assert parts["image"].get_filename() == "cat.png"
    assert parts["image"].get_payload(decode=True) == PNG
    assert json.loads(part_text(parts["input"])) == {}


def test_get_quotes_the_id_as_one_path_segment() -> None:
    server = Server(ok(job_json()))
    with client(server, FakeClock()) as c:
        c.jobs.get("../tokens?x=1")

    assert server.requests[0].url.raw_path == b"/v1/jobs/..%2Ftokens%3Fx%3D1"


def test_a_base_url_with_a_path_prefix_keeps_it() -> None:
    server = Server(ok(job_json()))
    c = Client(f"{BASE}/variflow/", TOKEN, transport=httpx.MockTransport(server))
    with c:
        c.jobs.get(JOB_ID)

    assert server.requests[0].url == httpx.URL(f"{BASE}/variflow/v1/jobs/{JOB_ID}")


@pytest.mark.parametrize(("reason", "sent"), [(None, {}), ("duplicate", {"reason": "duplicate"})])
def test_cancel_posts_the_reason(reason: str | None, sent: dict[str, str]) -> None:
    server = Server(ok(job_json(status="cancelled")))
    with client(server, FakeClock()) as c:
        job = c.jobs.cancel(JOB_ID, reason)

    [request] = server.requests
    assert (request.method, request.url.path) == ("POST", f"/v1/jobs/{JOB_ID}/cancel")
    assert json.loads(request.content) == sent
    assert job.status == "cancelled"


def test_events_are_parsed_oldest_first() -> None:
    events = {
        "data": [
            {
                "at": "2026-12-02T10:00:00Z",
                "source": "api",
                "kind": "created",
                "from_status": None,
                "to_status": "queued",
                "message": "accepted",
            },
            {
                "at": "2026-12-02T10:00:03Z",
                "source": "webhook",
                "kind": "progress",
                "from_status": "queued",
                "to_status": "processing",
                "message": None,
                "new_field": 1,
            },
        ]
    }
    server = Server(ok(events))
    with client(server, FakeClock()) as c:
        first, second = c.jobs.events(JOB_ID)

    assert server.paths == [f"/v1/jobs/{JOB_ID}/events"]
    assert first.at == datetime(2026, 12, 2, 10, 0, tzinfo=UTC)
    assert (first.source, first.from_status, first.to_status) == ("api", None, "queued")
    assert (second.kind, second.message) == ("progress", None)


def test_download_follows_the_redirect_without_sending_the_token_to_the_provider() -> None:
    provider_url = "https://cdn.provider.test/img/1.png"

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.host == "cdn.provider.test":
            return httpx.Response(200, content=PNG, headers={"content-type": "image/png"})
        return httpx.Response(302, headers={"location": provider_url})

    server = Server(answer)
    with client(server, FakeClock()) as c:
        data = c.jobs.download(JOB_ID, 1)

    assert data == PNG
    first, second = server.requests
    assert first.url == httpx.URL(f"{BASE}/v1/jobs/{JOB_ID}/results/1")
    assert first.headers["authorization"] == f"Bearer {TOKEN}"
    assert second.url == httpx.URL(provider_url)
    assert "authorization" not in second.headers


def test_download_of_an_archived_copy_needs_no_redirect() -> None:
    server = Server(httpx.Response(200, content=PNG, headers={"content-type": "image/png"}))
    with client(server, FakeClock()) as c:
        assert c.jobs.download(JOB_ID, 0) == PNG
    with client(server, FakeClock()) as c, pytest.raises(ValueError, match="n:"):
        c.jobs.download(JOB_ID, -1)
    assert len(server.requests) == 1


def test_the_job_is_parsed_into_typed_fields() -> None:
    completed = job_json(
        status="completed",
        progress=100,
        results=[
            {"index": 0, "url": f"/v1/jobs/{JOB_ID}/results/0", "provider_url": "https://p/0"},
            {"index": 1, "url": f"/v1/jobs/{JOB_ID}/results/1", "provider_url": None},
        ],
        completed_at="2026-12-02T10:01:00Z",
        a_field_of_a_newer_server={"x": 1},
    )
    server = Server(ok(completed))
    with client(server, FakeClock()) as c:
        job = c.jobs.get(JOB_ID)

    assert job.is_terminal
    assert job.results == [
        Result(0, f"/v1/jobs/{JOB_ID}/results/0", "https://p/0"),
        Result(1, f"/v1/jobs/{JOB_ID}/results/1", None),
    ]
    assert job.created_at == datetime(2026, 12, 2, 10, 0, tzinfo=UTC)
    assert job.updated_at == datetime(2026, 12, 2, 10, 0, 5, 250000, tzinfo=UTC)
    assert job.completed_at == datetime(2026, 12, 2, 10, 1, tzinfo=UTC)
    assert (job.tenant, job.metadata, job.error) == ("acme", {"order": "A-1042"}, None)
    assert job.raw["a_field_of_a_newer_server"] == {"x": 1}


def test_the_context_manager_closes_the_http_client() -> None:
    c = client(Server(ok(job_json())), FakeClock())
    with c:
        pass
    with pytest.raises(RuntimeError):
        c.jobs.get(JOB_ID)  # httpx refuses a request on a closed client


def test_the_version_is_the_distributions() -> None:
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    version = tomllib.loads(pyproject.read_text())["project"]["version"]
    assert variflow_client.__version__ == version == "0.1.0"
