"""Results in S3 (VARIFLOW_RESULT_STORE=s3://bucket/prefix) against a real S3-compatible
HTTP server, moto's, in a subprocess (tests/s3_support.py): inline and archived images
land in the bucket under the prefix, and both routes serve them (a redirect to a
presigned URL, or streamed), with the API's tenant checks, 404s and a 503 when the store
is down. The whole flow with a worker: tests/e2e/test_results_in_s3.py."""

from __future__ import annotations

import io
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from PIL import Image

from tests import webhook_support as support
from tests.e2e.conftest import serving_png
from tests.s3_support import MotoServer, use_s3_env
from webhooks import create_app
from worker import tokens
from worker.config import Settings
from worker.devstack import free_port
from worker.finalize import archive_results
from worker.models import Job
from worker.result_store import S3Store, StoreUnavailable
from worker.results import store_inline
from worker.runtime import current, session_scope
from worker.status import JobStatus, Source, UpstreamState

Configure = Callable[..., Settings]
PUBLIC = "https://variflow.example.test"
PREFIX = "variflow/results"


def image(kind: str, color: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, format=kind)
    return buffer.getvalue()


PNG, JPEG = image("PNG", (200, 40, 40)), image("JPEG", (40, 40, 200))


@pytest.fixture
def bucket(
    s3_server: MotoServer, monkeypatch: pytest.MonkeyPatch, configure: Configure, sqlite_url: str
) -> str:
    """A bucket of this test's own, made the result store (with the prefix)."""
    use_s3_env(monkeypatch, s3_server)
    name = s3_server.create_bucket()
    configure(result_store=f"s3://{name}/{PREFIX}/", public_url=PUBLIC, allow_private_urls=True)
    return name


def objects(server: MotoServer, bucket: str) -> dict[str, tuple[bytes, str]]:
    """Every object in the bucket: key -> (bytes, content type)."""
    client = server.client()
    found = {}
    for item in client.list_objects_v2(Bucket=bucket).get("Contents", []):
        answer = client.get_object(Bucket=bucket, Key=item["Key"])
        found[item["Key"]] = (answer["Body"].read(), answer["ContentType"])
    return found


def test_inline_and_archived_results_land_in_the_bucket_under_the_prefix(
    s3_server: MotoServer, bucket: str
) -> None:
    runtime = current()
    job_id = uuid.uuid4()
    state = UpstreamState(JobStatus.COMPLETED, Source.SUBMIT, images=(PNG, PNG[::-1]))
    stored = store_inline(runtime.results, runtime.settings, job_id, state)
    base = f"{PUBLIC}/results/{job_id}"
    assert stored.image_urls == (f"{base}/1.png", f"{base}/2.png") and stored.images == ()

    with serving_png(JPEG) as url:  # served as image/png: the provider's type is kept
        job = Job(id=uuid.uuid4(), provider="piapi", status="completed", result_urls=[url])
        archived = archive_results(job, runtime.settings, runtime.http, store=runtime.results)
        assert archived.errors == [] and archived.urls == [f"{PUBLIC}/results/{job.id}/1.png"]
        again = archive_results(job, runtime.settings, runtime.http, store=runtime.results)
        assert again == archived  # a task run twice writes the same object again

    assert objects(s3_server, bucket) == {
        f"{PREFIX}/{job_id}/1.png": (PNG, "image/png"),
        f"{PREFIX}/{job_id}/2.png": (PNG[::-1], "image/png"),
        f"{PREFIX}/{job.id}/1.png": (JPEG, "image/png"),
    }


Token = Callable[[str], dict[str, str]]


@pytest.fixture
def token() -> Token:
    def make(tenant: str) -> dict[str, str]:
        with session_scope() as session:
            _, secret = tokens.issue(session, f"{tenant}-{uuid.uuid4().hex[:6]}", tenant)
        return {"Authorization": f"Bearer {secret}"}

    return make


def stored_job(tenant: str = "shop") -> uuid.UUID:
    """A completed job of ``tenant``: result 0 archived into the store (a JPEG), result 1
    only at the provider."""
    job_id = uuid.uuid4()
    current().results.put(job_id, "1.jpg", JPEG, "image/jpeg")
    support.insert_job(
        id=job_id,
        tenant=tenant,
        status="completed",
        progress=100,
        result_urls=["https://cdn.example/0.png", "https://cdn.example/1.png"],
        archived_urls=[f"{PUBLIC}/results/{job_id}/1.jpg"],
    )
    return job_id


def is_problem(answer: Any, status: int) -> None:
    assert answer.status_code == status, answer.get_data(as_text=True)
    assert answer.mimetype == "application/problem+json"
    assert answer.get_json()["status"] == status
    assert "Traceback" not in answer.get_data(as_text=True)


def test_both_routes_redirect_to_a_presigned_url_of_the_stored_image(
    s3_server: MotoServer, bucket: str, token: Token
) -> None:
    client = create_app().test_client()
    job_id = stored_job()
    shop, globex = token("shop"), token("globex")

    for answer in (
        client.get(f"/results/{job_id}/1.jpg"),
        client.get(f"/v1/jobs/{job_id}/results/0", headers=shop),
    ):
        assert answer.status_code == 302, answer.get_data(as_text=True)
        location = answer.headers["Location"]
        assert location.startswith(f"{s3_server.url}/{bucket}/{PREFIX}/{job_id}/1.jpg?")
        assert "X-Amz-Expires=300" in location and "X-Amz-Signature=" in location
        assert answer.headers["Cache-Control"] == "no-store"
        download = httpx.get(location)
        assert (download.status_code, download.content) == (200, JPEG)

    # The API keeps its checks: another tenant's job is not found; result 1 is the provider's.
    is_problem(client.get(f"/v1/jobs/{job_id}/results/0", headers=globex), 404)
    linked = client.get(f"/v1/jobs/{job_id}/results/1", headers=shop)
    assert (linked.status_code, linked.headers["Location"]) == (302, "https://cdn.example/1.png")
    assert client.get(f"/results/{job_id}/2.jpg").status_code == 404
    assert client.get(f"/results/{uuid.uuid4()}/1.jpg").status_code == 404
    assert client.get(f"/results/{job_id}/.1.jpg.tmp").status_code == 404


def test_stream_mode_serves_the_bytes_with_their_type(
    bucket: str, configure: Configure, token: Token
) -> None:
    configure(result_serve="stream")
    client = create_app().test_client()
    job_id = stored_job()
    for answer in (
        client.get(f"/results/{job_id}/1.jpg"),
        client.get(f"/v1/jobs/{job_id}/results/0", headers=token("shop")),
    ):
        assert (answer.status_code, answer.mimetype, answer.data) == (200, "image/jpeg", JPEG)
        assert answer.headers["Content-Length"] == str(len(JPEG))
    assert client.get(f"/results/{job_id}/2.jpg").status_code == 404
    is_problem(client.get(f"/v1/jobs/{job_id}/results/0", headers=token("globex")), 404)


def test_presigned_urls_name_the_public_endpoint_when_there_is_one(
    bucket: str, configure: Configure
) -> None:
    configure(result_public_endpoint="https://files.example.test")
    job_id = stored_job()
    answer = create_app().test_client().get(f"/results/{job_id}/1.jpg")
    assert answer.status_code == 302
    assert answer.headers["Location"].startswith(
        f"https://files.example.test/{bucket}/{PREFIX}/{job_id}/1.jpg?"
    )


@pytest.mark.parametrize("serve", ["redirect", "stream"])
def test_a_store_that_is_down_is_a_503_problem(
    bucket: str,
    configure: Configure,
    monkeypatch: pytest.MonkeyPatch,
    token: Token,
    caplog: pytest.LogCaptureFixture,
    serve: str,
) -> None:
    job_id = stored_job()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # nobody there
    configure(result_serve=serve)
    client = create_app().test_client()
    is_problem(client.get(f"/results/{job_id}/1.jpg"), 503)
    is_problem(client.get(f"/v1/jobs/{job_id}/results/0", headers=token("shop")), 503)
    assert "the result store did not answer" in caplog.text  # the details go to the log

    store = current().results
    assert isinstance(store, S3Store)
    with pytest.raises(StoreUnavailable, match="EndpointConnectionError"):
        store.put(job_id, "2.png", PNG, "image/png")  # a worker's write fails as an OSError
