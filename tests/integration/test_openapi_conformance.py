"""The /v1 API answers as its own OpenAPI document says (schemathesis, property-based).

The web app runs as it is deployed — `variflow serve` (gunicorn) on PostgreSQL, with
Redis as the broker (a queue of this module's own, deleted at the end; nothing consumes
it) — and its document is read from ``GET /v1/openapi.json``. Schemathesis generates
requests for every operation from that document, valid and invalid ones (its coverage
and fuzzing phases), sends them with a live token, and checks each answer: never a 5xx,
a documented status, content type, body and headers.

Not checked: that schema-valid requests are accepted (positive_data_acceptance). A
provider's ``input`` is an object in the document and is validated by the provider's
adapter, so a request the document allows may rightly be a 400.

Generated job ids are random, so they would only ever meet 404s: most of them are
replaced by the id of one of a few terminal jobs of the token's tenant, inserted before
the run (one completed with an archived and a provider-only result, one failed, one
cancelled). Terminal, so that ``?wait=`` answers at once and cancelling changes nothing.
"""

from __future__ import annotations

import json
import os
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
import schemathesis
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

from sandbox.testing import png_bytes
from worker import tokens
from worker.devstack import Stack, free_port, sandbox_env
from worker.models import Job, JobEvent, utcnow

pytestmark = pytest.mark.services

MAX_EXAMPLES = 50  # per operation, in the fuzzing phase (the coverage phase adds its own)
SEED = 20261202
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
TENANT = "conformance"
PIAPI_INPUT = {"origin_task_id": "o-1", "index": "1", "prompt": "a red fox"}
PROVIDER_URL = "https://cdn.provider.test/results/{job}/{n}.png"


@dataclass(frozen=True)
class Server:
    url: str
    token: str
    job_ids: tuple[str, ...]  # terminal jobs of the token's tenant
    log: Path


def insert_terminal_jobs(session: Session, public_url: str, results: Path) -> list[uuid.UUID]:
    """A completed job (result 0 archived here, result 1 only at the provider), a failed
    one (an error without a message) and a cancelled one, with metadata and events."""
    now = utcnow()
    ids = [uuid.uuid4() for _ in range(3)]
    completed, failed, cancelled = ids
    common: dict[str, Any] = {
        "provider": "piapi",
        "params": PIAPI_INPUT,
        "tenant": TENANT,
        "deadline": now + timedelta(hours=1),
        "created_at": now,
        "updated_at": now,
        "submitted_at": now,
        "completed_at": now,
    }
    session.add_all(
        [
            Job(
                id=completed,
                status="completed",
                progress=100,
                result_urls=[PROVIDER_URL.format(job=completed, n=n) for n in range(2)],
                archived_urls=[f"{public_url}/results/{completed}/0.png"],
                job_metadata={"order": "A-1"},
                **common,
            ),
            Job(
                id=failed,
                status="failed",
                error_code="upstream_failed",
                error_message=None,
                idempotency_key="failed-once",
                **common,
            ),
            Job(
                id=cancelled,
                status="cancelled",
                error_code="cancelled",
                error_message="not needed",
                **common,
            ),
        ]
    )
    session.flush()
    for job_id, last in zip(ids, ("completed", "failed", "cancelled"), strict=True):
        for source, before, after in (("api", None, "queued"), ("poll", "queued", last)):
            session.add(
                JobEvent(
                    job_id=job_id,
                    at=now,
                    source=source,
                    kind="transition",
                    from_status=before,
                    to_status=after,
                )
            )
    folder = results / str(completed)
    folder.mkdir(parents=True)
    (folder / "0.png").write_bytes(png_bytes(32, 32))
    return ids


@pytest.fixture(scope="module")
def server(
    pg_server_url: str, redis_server_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    home = tmp_path_factory.mktemp("conformance") / "home"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    queue = f"variflow-conformance-{uuid.uuid4().hex[:8]}"
    engine = create_engine(pg_server_url)
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE jobs, job_events, job_inputs, api_tokens CASCADE"))
    with Session(engine) as session, session.begin():
        _, secret = tokens.issue(session, "conformance-app", TENANT)
        job_ids = insert_terminal_jobs(session, url, home / "results")
    engine.dispose()
    env = {
        "VARIFLOW_HOME": str(home),
        "VARIFLOW_DATABASE_URL": pg_server_url,
        "VARIFLOW_BROKER_URL": redis_server_url,
        "VARIFLOW_QUEUE": queue,
        "VARIFLOW_PUBLIC_URL": url,
        # Every provider configured (at an address nothing listens on: no worker runs).
        **sandbox_env("http://127.0.0.1:9"),
    }
    # The server inherits os.environ under env: a developer's VARIFLOW_* must not leak in.
    with pytest.MonkeyPatch.context() as patch:
        for name in [n for n in os.environ if n.startswith("VARIFLOW_") and "TEST" not in n]:
            patch.delenv(name)
        stack = Stack(env, home.parent / "logs")
        try:
            stack.start_web(port, workers=1)
        except BaseException:
            stack.stop()
            raise
    with stack:
        yield Server(url, secret, tuple(map(str, job_ids)), home.parent / "logs" / "web.log")
    redis.Redis.from_url(redis_server_url).delete(queue)


@pytest.fixture(scope="module")
def api_schema(server: Server) -> schemathesis.BaseSchema:
    config = schemathesis.Config.from_dict(
        {
            "seed": SEED,
            # Deterministic and without shrinking: a run is repeatable and its time bounded.
            "generation": {
                "max-examples": MAX_EXAMPLES,
                "deterministic": True,
                "no-shrink": True,
                "database": "none",
            },
        }
    )
    return schemathesis.openapi.from_url(f"{server.url}/v1/openapi.json", config=config)


schema = schemathesis.pytest.from_fixture("api_schema")


@pytest.fixture(autouse=True)
def _node_id_for_schemathesis(request: pytest.FixtureRequest) -> None:
    # schemathesis 4's lazy loader reads and rewrites Node._nodeid, which pytest 9.2 no
    # longer has (it keeps the id elsewhere); give the test item one, as pytest 8 did.
    if not hasattr(request.node, "_nodeid"):
        request.node._nodeid = request.node.nodeid


def name_known_jobs(case: schemathesis.Case[Any], job_ids: tuple[str, ...]) -> None:
    """Most generated job ids become known jobs' ids: a random one is only ever a 404."""
    job_id = (case.path_parameters or {}).get("job_id")
    if not isinstance(job_id, str):
        return
    try:
        generated = uuid.UUID(job_id)
    except ValueError:
        return  # a malformed id (negative data): sent as generated
    # One in four keeps its random (unknown) id; the others name a known job.
    pick = generated.int % (len(job_ids) + 1)
    if pick < len(job_ids):
        case.path_parameters["job_id"] = job_ids[pick]


def make_creatable(case: schemathesis.Case[Any]) -> None:
    """Most valid createJob bodies become creatable: a generated provider name is never a
    configured one, so without this no job would ever be created (201) or replayed (200,
    409 when a generated Idempotency-Key repeats). A quarter is sent as generated."""
    body: Any = case.body
    if case.meta is None or case.meta.generation.mode is not GenerationMode.POSITIVE:
        return
    if not isinstance(body, dict) or not isinstance(body.get("provider"), str):
        return
    provider: str = body["provider"]
    if zlib.crc32(provider.encode("utf-8", "surrogatepass")) % 4 == 1:  # the same every run
        return
    # The generated text as the prompt: the adapter's validation of it is exercised too.
    fields = {**PIAPI_INPUT, "prompt": provider or PIAPI_INPUT["prompt"]}
    body["provider"] = "piapi"
    body.pop("notify_url", None)  # generated text is no URL, and a URL would be resolved
    if case.media_type == "multipart/form-data":
        body["input"] = json.dumps(fields)
        for name in ("image", "deadline", "metadata"):  # PiAPI takes no image; free text
            body.pop(name, None)
    else:
        body["input"] = fields


@schema.parametrize()
def test_every_answer_is_the_documented_one(case: schemathesis.Case[Any], server: Server) -> None:
    name_known_jobs(case, server.job_ids)
    if case.operation.method.upper() == "POST" and case.operation.path == "/v1/jobs":
        make_creatable(case)
    case.call_and_validate(
        headers={"Authorization": f"Bearer {server.token}"}, checks=CHECKS, timeout=30
    )
