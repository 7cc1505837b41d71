"""RabbitMQ as the broker: one job of each provider through a real worker, beat, the
webhook app and the sandbox, on RabbitMQ + PostgreSQL, to completed.

The stack is tests/e2e/conftest.py's ``running_stack``; only its backend differs: this
module's ``backend`` puts the broker on RabbitMQ, on a queue of the test's own.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable

import httpx
import pytest
from amqp.exceptions import NotFound
from kombu import Connection
from PIL import Image

from tests.e2e.conftest import RunningStack
from worker.api import JobInfo, submit_variation

pytestmark = pytest.mark.e2e


@pytest.fixture
def backend(pg_url: str, rabbitmq_url: str) -> str:
    return "rabbitmq"


def square_png(size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (40, 90, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


# One job of each provider, each ending its own way: PiAPI's by webhook, Piclaza's by
# beat's poll_due, LemonData's in the answer to its create (the sandbox's sync mode).
SUBMIT: dict[str, Callable[[], JobInfo]] = {
    "piapi": lambda: submit_variation(
        "piapi", origin_task_id="imagine-rmq", index="1", prompt="a harbour in fog"
    ),
    "piclaza": lambda: submit_variation("piclaza", image=square_png()),
    "lemondata": lambda: submit_variation("lemondata", image=square_png(), n=2, size="256x256"),
}


def consumers_of_queue(conn: Connection) -> int:
    """How many consumers RabbitMQ itself counts on this test's queue (a passive
    declare creates nothing; the queue exists once the worker has declared it)."""
    channel = conn.channel()  # a channel of its own: NotFound closes it
    try:
        _, _, consumers = channel.queue_declare(queue=os.environ["VARIFLOW_QUEUE"], passive=True)
    except NotFound:
        return 0
    finally:
        channel.close()
    return int(consumers)


def test_a_job_of_each_provider_completes_with_rabbitmq_as_the_broker(
    running_stack: RunningStack, rabbitmq_url: str
) -> None:
    # The worker consumes this test's queue on RabbitMQ (not some other broker).
    with Connection(rabbitmq_url, connect_timeout=2) as conn:
        running_stack.wait_for(
            lambda: consumers_of_queue(conn) >= 1, what="the worker to consume the queue"
        )
    # One stack for the three jobs, at once: a stack's start is most of the time.
    jobs = {provider: submit() for provider, submit in SUBMIT.items()}

    for provider, job in jobs.items():
        done = running_stack.wait_terminal(job.id)

        assert done.status == "completed", (provider, done.error_message)
        assert done.result_urls, provider
        for url in done.result_urls:
            image = httpx.get(url, timeout=10)
            assert image.status_code == 200, (provider, url)
            assert image.content.startswith(b"\x89PNG"), provider
    assert running_stack.sandbox.state.stats()["duplicate_creates"] == []
