"""150 jobs across the three providers through an unreliable sandbox: every job ends in
the state the sandbox decided for it, none is left in flight, none is created twice."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from sandbox.config import SandboxConfig
from tests.e2e.conftest import RunningStack
from worker.api import get_job, submit_variation

pytestmark = pytest.mark.e2e
JOBS_PER_PROVIDER = 50


@pytest.fixture
def sandbox_config() -> SandboxConfig:
    return SandboxConfig(
        pending_seconds=0.2,
        processing_seconds=0.4,
        seed=11,
        fail_rate=0.2,
        transient_error_rate=0.2,
        transient_error_codes=[429, 500, 502, 503],
        retry_after_seconds=1,
        webhook_drop_rate=0.3,
        lemondata_mode="mixed",
    )


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), (90, 10, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


def _correlation(provider: str, job_id: str) -> str:
    return f"variflow-{job_id}" if provider == "lemondata" else job_id


@pytest.mark.parametrize("backend", ["postgres"], indirect=True)
def test_every_job_reaches_the_state_the_sandbox_decided(
    running_stack: RunningStack, image_url: str
) -> None:
    png = _png()
    jobs = []
    for n in range(JOBS_PER_PROVIDER):
        jobs.append(submit_variation("piapi", origin_task_id=f"o-{n}", index="1", prompt=f"p {n}"))
        jobs.append(submit_variation("piclaza", image=png if n % 2 else image_url))
        jobs.append(submit_variation("lemondata", image=image_url if n % 2 else png))

    finished = [running_stack.wait_terminal(job.id, timeout=240) for job in jobs]

    sandbox = running_stack.sandbox.state
    stats = sandbox.stats()
    assert stats["faults"]["transient"] + stats["faults"]["rate_limited"] > 0, "faults happened"
    assert stats["webhooks"]["dropped"] > 0, "webhooks were dropped"
    assert stats["duplicate_creates"] == []
    mismatched = []
    for job in finished:
        task = sandbox.task_by_correlation(_correlation(job.provider, str(job.id)))
        assert task is not None, f"{job.provider} job {job.id} never reached the provider"
        if job.status != task.decided_outcome:
            mismatched.append((job.provider, str(job.id), job.status, task.decided_outcome))
    assert mismatched == []
    assert {j.status for j in finished} == {"completed", "failed"}
    for job in finished:
        assert get_job(job.id).is_terminal
