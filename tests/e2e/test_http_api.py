"""The /v1 jobs API over real HTTP (docs/api.md): gunicorn (`variflow serve`), a Celery
worker and beat, the sandbox, PostgreSQL and Redis, driven with plain httpx and with the
Python client (clients/python).

One stack serves the whole module: starting gunicorn, the worker and beat is the
expensive part, and every test here makes its own jobs and tokens or only reads (tenants
acme, globex, and an admin), so sharing the stack couples nothing. The provider jobs are
all created when the module's first test asks for them, so their runs overlap.
"""

from __future__ import annotations

import base64
import io
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import variflow_client
from click.testing import CliRunner
from PIL import Image
from sqlalchemy import Engine, create_engine, func, select, text
from sqlalchemy.orm import Session

from sandbox.config import SandboxConfig
from sandbox.server import SandboxServer
from tests.conftest import Configure
from tests.e2e.conftest import STOP_TIMEOUT, TIMINGS, serving_png
from worker import tokens
from worker.cli import cli
from worker.devstack import Stack, free_port, sandbox_env
from worker.models import Job

pytestmark = pytest.mark.e2e

TERMINAL = {"completed", "failed", "cancelled"}
JOB_TIMEOUT = 60.0  # generous: a job takes about a second against the sandbox
PIAPI_INPUT = {"origin_task_id": "imagine-1", "index": "1", "prompt": "a teal cat"}
REPLAY_THREADS = 8


def square_png(size: int = 64, color: tuple[int, int, int] = (200, 120, 40)) -> bytes:
    # Square: LemonData (the sandbox as the real one) refuses other shapes.
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Api:
    """The running stack and what the tests need to talk to it."""

    url: str
    sandbox: SandboxServer
    stack: Stack
    engine: Engine
    env: dict[str, str]
    image_url: str  # a PNG served on loopback: the input image by URL
    secrets: dict[str, str]  # token name -> secret

    def client(self, token: str) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {self.secrets.get(token, token)}"},
            timeout=JOB_TIMEOUT,
        )

    def count_jobs(self, **where: str) -> int:
        query = select(func.count()).select_from(Job)
        for name, value in where.items():
            query = query.where(getattr(Job, name) == value)
        with self.engine.connect() as conn:
            return int(conn.scalar(query) or 0)


@pytest.fixture(scope="module")
def input_image_url() -> Iterator[str]:
    """A square PNG served over HTTP on loopback (as tests/e2e/conftest.py's image_url,
    for the module): the input image given by URL."""
    with serving_png(square_png(128, (30, 160, 90))) as url:
        yield url


@pytest.fixture(scope="module")
def api(
    pg_server_url: str,
    redis_server_url: str,
    input_image_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Api]:
    """gunicorn, a Celery worker and beat against the sandbox, on PostgreSQL and Redis."""
    engine = create_engine(pg_server_url)
    with engine.begin() as conn:  # what earlier tests left must not be swept by this worker
        conn.execute(text("TRUNCATE jobs, job_events, job_inputs, api_tokens CASCADE"))
    secrets: dict[str, str] = {}
    with Session(engine) as session, session.begin():
        for name, tenant, admin in (
            ("acme", "acme", False),
            ("globex", "globex", False),
            ("ops", "ops", True),
        ):
            secrets[name] = tokens.issue(session, name, tenant, admin=admin)[1]
    home = tmp_path_factory.mktemp("http-api")
    config = SandboxConfig(pending_seconds=0.2, processing_seconds=0.4, seed=7)
    with SandboxServer(config=config) as sandbox:
        web_port = free_port()
        web_url = f"http://127.0.0.1:{web_port}"
        # The settings of running_stack (tests/e2e/conftest.py): short backoffs and
        # intervals, so that polls and the sweep happen within a test.
        env = {
            "VARIFLOW_HOME": str(home / "home"),
            "VARIFLOW_DATABASE_URL": pg_server_url,
            "VARIFLOW_BROKER_URL": redis_server_url,
            "VARIFLOW_QUEUE": f"variflow-test-{uuid.uuid4().hex[:8]}",
            "VARIFLOW_PUBLIC_URL": web_url,
            **TIMINGS,
            **sandbox_env(sandbox.url),
        }
        # The children inherit os.environ under env: a developer's VARIFLOW_* must not
        # leak into them (tests/conftest.py isolates each test the same way).
        with pytest.MonkeyPatch.context() as patch:
            for name in [n for n in os.environ if n.startswith("VARIFLOW_") and "TEST" not in n]:
                patch.delenv(name)
            stack = Stack(env, home / "logs", stop_timeout=STOP_TIMEOUT)
            try:
                # The worker and beat first: their start-up overlaps the web app's.
                stack.start_worker(concurrency=4)
                stack.start_beat()
                # Two gunicorn processes of 4 threads: concurrent requests really race.
                stack.start_web(web_port, workers=2)
            except BaseException:
                stack.stop()
                raise
        with stack:
            yield Api(web_url, sandbox, stack, engine, env, input_image_url, secrets)
    engine.dispose()


@pytest.fixture
def configured(api: Api, configure: Configure) -> Api:
    """This process's settings are the stack's (for the CLI, which reads them)."""
    configure(**{k.removeprefix("VARIFLOW_").lower(): v for k, v in api.env.items()})
    return api


def wait_done(client: httpx.Client, job_id: str, stack: Stack) -> dict[str, Any]:
    """The job once terminal, long-polling with ?wait=30 as a client would (the server
    holds the request until then, or answers at once when too many requests wait)."""
    deadline = time.monotonic() + JOB_TIMEOUT
    while True:
        answer = client.get(f"/v1/jobs/{job_id}", params={"wait": 30})
        assert answer.status_code == 200, answer.text
        job: dict[str, Any] = answer.json()
        if job["status"] in TERMINAL:
            return job
        stack.check_alive()
        assert time.monotonic() < deadline, f"job {job_id} still {job['status']}"
        # A poll interval: a server whose waiting threads are all taken answers at once.
        time.sleep(0.05)


def fetch_result(client: httpx.Client, job_id: str, n: int) -> bytes:
    """Result n: the archived copy (200), or the provider's, fetched from the 302's Location
    without our token (it is another origin's URL)."""
    answer = client.get(f"/v1/jobs/{job_id}/results/{n}")
    if answer.status_code == 302:
        location = answer.headers["Location"]
        assert not location.startswith("/v1/"), location
        answer = httpx.get(location, timeout=10)
        assert answer.status_code == 200, location
    else:
        assert answer.status_code == 200, answer.text
        assert answer.headers["Content-Type"].startswith("image/")
    return answer.content


def assert_problem(answer: httpx.Response, status: int, kind: str) -> dict[str, Any]:
    assert answer.status_code == status, answer.text
    assert answer.headers["Content-Type"].startswith("application/problem+json")
    problem: dict[str, Any] = answer.json()
    assert (problem["status"], problem["type"]) == (status, f"urn:variflow:problem:{kind}")
    return problem


# --- a job per provider, JSON and multipart -----------------------------------------------


@dataclass(frozen=True)
class Case:
    """One way of creating a job: JSON (image_url or image_b64) or multipart (image part)."""

    name: str
    provider: str
    kind: str  # "json" or "multipart"
    input: dict[str, Any]
    upload: bytes | None = None
    results: int | None = None  # how many results the provider gives, when the input says

    def post(self, client: httpx.Client, image_url: str) -> httpx.Response:
        fields = {k: (image_url if v is IMAGE_URL else v) for k, v in self.input.items()}
        metadata = {"case": self.name}
        if self.kind == "json":
            body = {"provider": self.provider, "input": fields, "metadata": metadata}
            return client.post("/v1/jobs", json=body)
        # Text fields as parts without a filename: multipart/form-data even with no file
        # (PiAPI takes no image).
        parts: dict[str, Any] = {
            "provider": (None, self.provider),
            "input": (None, json.dumps(fields)),
            "metadata": (None, json.dumps(metadata)),
        }
        if self.upload is not None:
            parts["image"] = ("input.png", self.upload, "image/png")
        return client.post("/v1/jobs", files=parts)


IMAGE_URL = object()  # replaced by the module's input image URL
UPLOAD = square_png(96, (40, 90, 200))
CASES = [
    Case("piapi-json", "piapi", "json", PIAPI_INPUT),
    Case("piapi-multipart", "piapi", "multipart", {**PIAPI_INPUT, "index": "2"}),
    Case("piclaza-json-url", "piclaza", "json", {"image_url": IMAGE_URL}),
    Case("piclaza-multipart", "piclaza", "multipart", {}, upload=UPLOAD),
    Case(
        "lemondata-json-url",
        "lemondata",
        "json",
        {"image_url": IMAGE_URL, "n": 2, "size": "256x256"},
        results=2,
    ),
    Case(
        "lemondata-json-b64",
        "lemondata",
        "json",
        {"image_b64": base64.b64encode(UPLOAD).decode(), "response_format": "b64_json"},
        results=1,
    ),
    Case("lemondata-multipart", "lemondata", "multipart", {"n": 1}, upload=UPLOAD, results=1),
]


@pytest.fixture(scope="module")
def created(api: Api) -> dict[str, httpx.Response]:
    """Every case's create answer, all sent at once so that the jobs run side by side."""
    with api.client("acme") as client:
        return {case.name: case.post(client, api.image_url) for case in CASES}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_job_is_created_waited_for_and_its_results_downloaded(
    api: Api, created: dict[str, httpx.Response], case: Case
) -> None:
    answer = created[case.name]
    assert answer.status_code == 201, answer.text
    job = answer.json()
    assert answer.headers["Location"] == f"/v1/jobs/{job['id']}"
    assert (job["provider"], job["status"], job["tenant"]) == (case.provider, "queued", "acme")
    assert job["metadata"] == {"case": case.name}
    assert "image_b64" not in job["input"]  # the bytes are stored with the job, not echoed

    with api.client("acme") as client:
        done = wait_done(client, job["id"], api.stack)
        assert done["status"] == "completed", done["error"]
        assert done["error"] is None and done["completed_at"] is not None
        results = done["results"]
        assert results, done
        if case.results is not None:
            assert len(results) == case.results
        for n, result in enumerate(results):
            assert (result["index"], result["url"]) == (n, f"/v1/jobs/{job['id']}/results/{n}")
            assert fetch_result(client, job["id"], n).startswith(b"\x89PNG")
        assert_problem(client.get(f"/v1/jobs/{job['id']}/results/{len(results)}"), 404, "not-found")

        kinds = [e["to_status"] for e in client.get(f"/v1/jobs/{job['id']}/events").json()["data"]]
        assert kinds[0] == "queued" and kinds[-1] == "completed"

    # The job's id is in the provider request's correlation field (LemonData: "variflow-<id>").
    task = next((t for t in api.sandbox.state.tasks() if job["id"] in t.correlation), None)
    assert task is not None, "the provider never got the job"
    if case.upload is not None:  # the uploaded bytes reached the provider
        sent = task.request.get("image_bytes") or task.request.get("image_file_b64")
        assert sent, task.request
        if case.provider == "lemondata":
            assert task.request["image_bytes"] == len(case.upload)


# --- idempotency under concurrency --------------------------------------------------------


@pytest.mark.parametrize("kind", ["json", "multipart"])
def test_concurrent_replays_of_one_request_make_exactly_one_job(api: Api, kind: str) -> None:
    key = f"replay-{kind}-{uuid.uuid4()}"
    case = Case("replay", "piclaza", kind, {"image_url": IMAGE_URL}, upload=None)
    if kind == "multipart":
        case = Case("replay", "lemondata", kind, {"n": 1}, upload=UPLOAD)
    start = threading.Barrier(REPLAY_THREADS)

    def send(_: int) -> httpx.Response:
        # A client (and connection) per thread: the requests really arrive together.
        with api.client("acme") as client:
            client.headers["Idempotency-Key"] = key
            start.wait(timeout=30)
            return case.post(client, api.image_url)

    with ThreadPoolExecutor(REPLAY_THREADS) as pool:
        answers = list(pool.map(send, range(REPLAY_THREADS)))

    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200] * (REPLAY_THREADS - 1) + [201], [a.text for a in answers]
    assert len({a.json()["id"] for a in answers}) == 1
    assert api.count_jobs(idempotency_key=key) == 1

    # The same key with another request is a conflict naming the job; another tenant's
    # same key is another job.
    other = Case("replay", "piapi", "json", PIAPI_INPUT)
    with api.client("acme") as client:
        client.headers["Idempotency-Key"] = key
        conflict = assert_problem(other.post(client, api.image_url), 409, "idempotency-conflict")
    assert conflict["job_id"] == answers[0].json()["id"]
    with api.client("globex") as client:
        client.headers["Idempotency-Key"] = key
        theirs = case.post(client, api.image_url)
    assert theirs.status_code == 201, theirs.text
    assert theirs.json()["id"] != answers[0].json()["id"]
    assert api.count_jobs(idempotency_key=key) == 2


# --- tenants ------------------------------------------------------------------------------


def test_another_tenants_job_is_not_found_anywhere_but_an_admin_sees_it(
    api: Api, created: dict[str, httpx.Response]
) -> None:
    job_id = created["piclaza-json-url"].json()["id"]
    with api.client("acme") as acme:
        done = wait_done(acme, job_id, api.stack)
    assert done["status"] == "completed" and done["results"]
    path = f"/v1/jobs/{job_id}"

    with api.client("globex") as globex:
        for answer in (
            globex.get(path),
            globex.get(path, params={"wait": 5}),
            globex.get(f"{path}/events"),
            globex.post(f"{path}/cancel", json={"reason": "not yours"}),
            globex.get(f"{path}/results/0"),
        ):
            assert_problem(answer, 404, "not-found")
        listed = globex.get("/v1/jobs", params={"limit": 100})
        assert listed.status_code == 200
        assert job_id not in {j["id"] for j in listed.json()["data"]}
        assert all(j["tenant"] == "globex" for j in listed.json()["data"])
        # Asking for acme's jobs by name shows none of them either.
        assert globex.get("/v1/jobs", params={"tenant": "acme"}).json()["data"] == []

    with api.client("ops") as admin:
        seen = admin.get(path)
        assert seen.status_code == 200 and seen.json()["tenant"] == "acme"
        assert seen.json()["status"] == "completed"  # globex's cancel changed nothing
        events = admin.get(f"{path}/events").json()["data"]
        assert not any("not yours" in (e["message"] or "") for e in events)
        assert fetch_result(admin, job_id, 0).startswith(b"\x89PNG")
        by_tenant = admin.get("/v1/jobs", params={"tenant": "acme", "limit": 100}).json()
        assert job_id in {j["id"] for j in by_tenant["data"]}
        assert {j["tenant"] for j in by_tenant["data"]} == {"acme"}
        others = admin.get("/v1/jobs", params={"tenant": "globex", "limit": 100}).json()
        assert job_id not in {j["id"] for j in others["data"]}


# --- tokens -------------------------------------------------------------------------------


def test_a_revoked_token_is_refused_at_once(configured: Api) -> None:
    api = configured
    runner = CliRunner()
    made = runner.invoke(cli, ["tokens", "create", "short-lived", "--tenant", "initech"])
    assert made.exit_code == 0, made.output
    secret = made.stdout.strip()
    with api.client(secret) as client:
        assert client.get("/v1/jobs").status_code == 200

        revoked = runner.invoke(cli, ["tokens", "revoke", "short-lived"])
        assert revoked.exit_code == 0, revoked.output

        for answer in (
            client.get("/v1/jobs"),
            Case("revoked", "piapi", "json", PIAPI_INPUT).post(client, api.image_url),
        ):
            assert_problem(answer, 401, "unauthenticated")
            assert answer.headers["WWW-Authenticate"].startswith("Bearer")
    assert api.count_jobs(tenant="initech") == 0
    for headers in ({}, {"Authorization": "Bearer vf_unknown"}, {"Authorization": "Basic eDp5"}):
        assert_problem(httpx.get(f"{api.url}/v1/jobs", headers=headers), 401, "unauthenticated")


# --- the Python client (clients/python) ---------------------------------------------------


@pytest.mark.parametrize("provider", ["piapi", "piclaza", "lemondata"])
def test_the_python_client_creates_waits_for_and_downloads_a_job(
    api: Api, provider: str, tmp_path: Path
) -> None:
    upload = tmp_path / "cat.png"
    upload.write_bytes(UPLOAD)
    with variflow_client.Client(api.url, api.secrets["acme"]) as client:
        # Without metadata (the API answers "metadata": null) and with some.
        if provider == "piapi":
            job = client.jobs.create("piapi", {**PIAPI_INPUT, "index": "3"})
        elif provider == "piclaza":  # a file: uploaded as multipart
            job = client.jobs.create("piclaza", {}, image=upload, metadata={"via": "client"})
        else:
            fields = {"image_url": api.image_url, "n": 2}
            job = client.jobs.create("lemondata", fields, metadata={"via": "client"})
        assert (job.provider, job.tenant) == (provider, "acme")

        done = client.jobs.wait(job.id, timeout=JOB_TIMEOUT)

        assert done.status == "completed"
        assert done.metadata == ({} if provider == "piapi" else {"via": "client"})
        assert len(done.results) == (2 if provider == "lemondata" else 4)
        for result in done.results:
            assert client.jobs.download(job.id, result.index).startswith(b"\x89PNG")
