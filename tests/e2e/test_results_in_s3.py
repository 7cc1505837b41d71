"""Results in S3 end to end: a LemonData job (inline b64_json images) and a PiAPI job
(archived copies) run by a real worker against the sandbox, with
VARIFLOW_RESULT_STORE=s3://bucket/prefix on moto's S3-compatible server; their images
are downloaded through the web app (gunicorn), which redirects to presigned URLs."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import httpx
import pytest

from tests.e2e.conftest import RunningStack
from tests.e2e.test_providers import square_png
from tests.s3_support import MotoServer, use_s3_env
from worker import tokens
from worker.api import JobInfo, get_job, submit_variation
from worker.config import Settings
from worker.runtime import session_scope

pytestmark = pytest.mark.e2e

PREFIX = "e2e-results"


@pytest.fixture
def s3_bucket(
    s3_server: MotoServer, monkeypatch: pytest.MonkeyPatch, configure: Callable[..., Settings]
) -> str:
    """The result store: a bucket of this test's own (set before the stack starts, so
    that web and worker get the same AWS_* and VARIFLOW_RESULT_STORE)."""
    use_s3_env(monkeypatch, s3_server)
    bucket = s3_server.create_bucket()
    configure(result_store=f"s3://{bucket}/{PREFIX}")
    return bucket


def download(url: str, headers: dict[str, str] | None = None) -> tuple[str, bytes]:
    """Where the web app redirects ``url`` to, and the bytes found there."""
    first = httpx.get(url, headers=headers, timeout=10)
    assert first.status_code == 302, (url, first.text)
    location = first.headers["location"]
    image = httpx.get(location, timeout=10)
    assert image.status_code == 200, location
    return location, image.content


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_lemondata_and_piapi_results_are_kept_in_s3_and_served_by_the_web_app(
    s3_server: MotoServer, s3_bucket: str, running_stack: RunningStack
) -> None:
    lemon = submit_variation("lemondata", image=square_png(), response_format="b64_json")
    piapi = submit_variation("piapi", origin_task_id="imagine-s3", index="1", prompt="a red fox")
    for job in (lemon, piapi):
        done = running_stack.wait_terminal(job.id)
        assert done.status == "completed", done.error_message

    def archived() -> JobInfo | None:
        job = get_job(piapi.id)
        return job if job.archived_urls else None

    piapi_done: JobInfo = running_stack.wait_for(archived, what="the PiAPI job's archive")
    lemon_done = get_job(lemon.id)
    served = {
        lemon.id: list(lemon_done.result_urls),  # stored inline before the job completed
        piapi.id: list(piapi_done.archived_urls),
    }

    client = s3_server.client()
    for job_id, urls in served.items():
        assert urls and all(u.startswith(f"{running_stack.web_url}/results/") for u in urls)
        for url in urls:
            location, content = download(url)
            key = f"{PREFIX}/{job_id}/{url.rsplit('/', 1)[1]}"
            assert location.startswith(f"{s3_server.url}/{s3_bucket}/{key}?")
            assert content.startswith(b"\x89PNG")
            assert content == client.get_object(Bucket=s3_bucket, Key=key)["Body"].read()

    # The API serves the same stored copy to the job's tenant (the default one here).
    with session_scope() as session:
        _, secret = tokens.issue(session, f"admin-{uuid.uuid4().hex[:6]}", "ops", admin=True)
    api_url = f"{running_stack.web_url}/v1/jobs/{piapi.id}/results/0"
    location, content = download(api_url, {"Authorization": f"Bearer {secret}"})
    assert location.startswith(f"{s3_server.url}/{s3_bucket}/{PREFIX}/{piapi.id}/")
    assert content.startswith(b"\x89PNG")
