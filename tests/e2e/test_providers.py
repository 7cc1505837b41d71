"""Piclaza and LemonData end to end (polling), PiAPI's polling fallback, cancel.

One stack per backend serves the module (tests/e2e/conftest.py's ``shared_stack``): each
test makes its own jobs and looks only at them and their upstream tasks.
"""

from __future__ import annotations

import io

import httpx
import pytest
from PIL import Image

from sandbox.tasks import TaskSnapshot
from tests.e2e.conftest import RunningStack
from worker.api import cancel_job, get_job, submit_variation

pytestmark = pytest.mark.e2e


@pytest.fixture
def running_stack(on_shared_stack: RunningStack) -> RunningStack:
    """The module's stack (one per backend), this test on it."""
    return on_shared_stack


def square_png(size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (200, 120, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def _transitions(job_id: object) -> list[tuple[str, str]]:
    return [
        (e.source, str(e.to_status))
        for e in get_job(job_id).events  # type: ignore[arg-type]
        if e.kind == "transition"
    ]


def _assert_images(urls: list[str]) -> None:
    assert urls
    for url in urls:
        response = httpx.get(url, timeout=10)
        assert response.status_code == 200, url
        assert response.content.startswith(b"\x89PNG")


def test_piclaza_job_completes_by_polling(running_stack: RunningStack) -> None:
    job = submit_variation("piclaza", image=square_png())

    done = running_stack.wait_terminal(job.id)

    assert done.status == "completed", done.error_message
    _assert_images(done.result_urls)
    assert ("poll", "completed") in _transitions(job.id)
    task = running_stack.sandbox.state.task_by_correlation(str(job.id))
    assert task is not None and task.task_id == done.upstream_task_id
    assert str(job.id) not in running_stack.sandbox.state.stats()["duplicate_creates"]


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_lemondata_job_completes(running_stack: RunningStack, image_url: str, mode: str) -> None:
    running_stack.sandbox.state.update_config(lemondata_mode=mode)
    job = submit_variation("lemondata", image=image_url, n=2, size="256x256")

    done = running_stack.wait_terminal(job.id)

    assert done.status == "completed", done.error_message
    assert len(done.result_urls) == 2
    _assert_images(done.result_urls)
    expected_source = "submit" if mode == "sync" else "poll"
    assert (expected_source, "completed") in _transitions(job.id)


@pytest.mark.parametrize("stack_backend", ["postgres"], indirect=True)
def test_lemondata_b64_results_are_stored_and_served(running_stack: RunningStack) -> None:
    job = submit_variation("lemondata", image=square_png(), response_format="b64_json")

    done = running_stack.wait_terminal(job.id)

    assert done.status == "completed", done.error_message
    assert all(url.startswith(running_stack.web_url + "/results/") for url in done.result_urls)
    _assert_images(done.result_urls)


@pytest.mark.parametrize("stack_backend", ["postgres"], indirect=True)
def test_piapi_job_completes_by_polling_when_every_webhook_is_lost(
    running_stack: RunningStack,
) -> None:
    running_stack.sandbox.state.update_config(webhook_drop_rate=1.0)
    job = submit_variation("piapi", origin_task_id="imagine-7", index="1", prompt="a teal cat")

    done = running_stack.wait_terminal(job.id)

    assert done.status == "completed", done.error_message
    assert ("poll", "completed") in _transitions(job.id)
    assert all(source != "webhook" for source, _ in _transitions(job.id))


@pytest.mark.parametrize("stack_backend", ["postgres"], indirect=True)
def test_an_image_url_that_is_not_a_png_fails_the_job_clearly(
    running_stack: RunningStack,
) -> None:
    job = submit_variation("lemondata", image=f"{running_stack.sandbox.url}/_sandbox/config")

    done = running_stack.wait_terminal(job.id)

    assert done.status == "failed"
    assert done.error_code == "invalid_input"
    assert "not usable" in (done.error_message or "")


@pytest.mark.parametrize("stack_backend", ["postgres"], indirect=True)
def test_cancel_a_pending_piapi_job_cancels_it_upstream(running_stack: RunningStack) -> None:
    running_stack.sandbox.state.update_config(pending_seconds=30.0)
    job = submit_variation("piapi", origin_task_id="imagine-8", index="2", prompt="a pink yak")
    running_stack.wait_for(lambda: get_job(job.id).status == "submitted", what="submitted")

    cancelled = cancel_job(job.id)

    assert cancelled.status == "cancelled"

    def cancelled_upstream() -> TaskSnapshot | None:
        tasks = running_stack.sandbox.state.tasks_by_correlation(str(job.id))
        return next((t for t in tasks if t.cancelled), None)

    upstream = running_stack.wait_for(cancelled_upstream, what="the upstream task to be cancelled")
    assert upstream.task_id == cancelled.upstream_task_id
    running_stack.wait_for(
        lambda: any("cancelled upstream" in (e.message or "") for e in get_job(job.id).events),
        what="the upstream cancel to be recorded",
    )
    assert get_job(job.id).status == "cancelled"
