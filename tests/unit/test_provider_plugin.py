"""A fourth provider, defined here and nowhere else, runs a job end to end: the proof that
adding a provider touches only its adapter (and its sandbox module) and one registration.

"Echo" is a made-up polling provider: POST /v1/echo creates a task, GET /v1/echo/<id>
answers "working" once and then "done" with an image URL. It talks to an
httpx.MockTransport; its settings are its own VARIFLOW_ECHO_* variables.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Mapping, Sequence
from datetime import timedelta
from typing import Any, ClassVar, Self

import httpx
import pytest
from pydantic import AnyHttpUrl, Field

from tests.conftest import Configure
from worker import providers, runtime
from worker.api import get_job, submit_variation
from worker.celery_app import TERMINAL_CONSUMERS
from worker.config import ConfigError, load_settings
from worker.errors import InvalidInput, InvalidWebhook
from worker.models import utcnow
from worker.polling import lease_due
from worker.providers.base import (
    AdapterContext,
    InputImage,
    PollTarget,
    ProviderSettings,
    Submission,
    SubmitRequest,
    json_body,
    require_str,
    send,
)
from worker.runtime import Runtime
from worker.status import JobStatus, Source, TerminalJob, UpstreamState
from worker.tasks import poll_batch, submit_job


class EchoSettings(ProviderSettings):
    base_url: AnyHttpUrl = AnyHttpUrl("https://echo.example")
    polls_per_request: int = Field(default=10, ge=1, le=100)


class EchoProvider:
    name: ClassVar[str] = "echo"
    settings_model: ClassVar[type[ProviderSettings]] = EchoSettings
    supports_webhook: ClassVar[bool] = False
    webhook_secret_header: ClassVar[str | None] = None
    can_cancel: ClassVar[bool] = False
    queues_over_capacity: ClassVar[bool] = False
    needs_image_bytes: ClassVar[bool] = False

    def __init__(self, client: httpx.Client, base_url: str, api_key: str | None, batch: int):
        self._client, self._base, self._key = client, base_url.rstrip("/"), api_key
        self.batch_poll_size = batch
        self.webhook_grace: float | None = None

    @classmethod
    def from_settings(cls, settings: EchoSettings, context: AdapterContext) -> Self:
        key = settings.api_key.get_secret_value() if settings.api_key else None
        return cls(context.client, str(settings.base_url), key, settings.polls_per_request)

    def validate(self, params: Mapping[str, Any], image: InputImage | None) -> dict[str, Any]:
        if set(params) - {"text"}:
            raise InvalidInput(sorted(set(params) - {"text"})[0], "not an echo parameter")
        return {"text": require_str(params, "text")}

    def submit(self, request: SubmitRequest) -> Submission:
        response = send(
            self._client,
            self.name,
            "POST",
            f"{self._base}/v1/echo",
            operation="create",
            json={"text": request.params["text"], "ref": str(request.job_id)},
            headers={"Authorization": f"Bearer {self._key}"},
        )
        task_id = json_body(response, self.name)["id"]
        return Submission(
            UpstreamState(JobStatus.SUBMITTED, Source.SUBMIT, upstream_task_id=task_id)
        )

    def poll(self, targets: Sequence[PollTarget]) -> dict[str, UpstreamState]:
        states = {}
        for target in targets:
            url = f"{self._base}/v1/echo/{target.upstream_task_id}"
            body = json_body(send(self._client, self.name, "GET", url, operation="poll"), self.name)
            done = body["state"] == "done"
            states[target.upstream_task_id] = UpstreamState(
                JobStatus.COMPLETED if done else JobStatus.PROCESSING,
                Source.POLL,
                image_urls=tuple(body.get("images", ())),
                upstream_task_id=target.upstream_task_id,
            )
        return states

    def parse_webhook(self, body: Any) -> UpstreamState:
        raise InvalidWebhook("echo has no webhooks")

    def cancel(self, target: PollTarget) -> bool:
        return False


class EchoUpstream:
    """The provider's side: what the MockTransport answers, and what it was asked."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.polls: dict[str, int] = {}
        self._ids = itertools.count(1)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if request.method == "POST" and request.url.path == "/v1/echo":
            assert request.headers["authorization"] == "Bearer echo-key"
            task_id = f"echo-{next(self._ids)}"
            self.polls[task_id] = 0
            return httpx.Response(200, json={"id": task_id, "text": json.loads(request.content)})
        task_id = request.url.path.rsplit("/", 1)[-1]
        self.polls[task_id] += 1
        if self.polls[task_id] < 2:
            return httpx.Response(200, json={"id": task_id, "state": "working"})
        images = [f"https://cdn.echo.example/{task_id}.png"]
        return httpx.Response(200, json={"id": task_id, "state": "done", "images": images})


@pytest.fixture
def echo(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    providers.register(EchoProvider)  # the one registration line
    monkeypatch.setenv("VARIFLOW_ECHO_API_KEY", "echo-key")
    monkeypatch.setenv("VARIFLOW_ECHO_POLLS_PER_REQUEST", "5")
    yield
    providers.unregister("echo")


def test_a_plugged_in_provider_declares_its_own_settings(echo: None, configure: Configure) -> None:
    settings = configure()
    assert "echo" in settings.providers
    assert settings.api_key("echo") == "echo-key"
    assert settings.base_url("echo") == "https://echo.example"
    assert settings.value_of("VARIFLOW_ECHO_POLLS_PER_REQUEST") == 5
    with pytest.raises(ConfigError, match="VARIFLOW_ECHO_POLLS_PER_REQUEST"):
        load_settings(echo_polls_per_request=0)


def test_a_plugged_in_provider_runs_a_job_end_to_end(echo: None, sqlite_url: str) -> None:
    upstream = EchoUpstream()
    ended: list[TerminalJob] = []
    settings = load_settings()
    runtime.install(
        Runtime.build(
            settings,
            consumers=(*TERMINAL_CONSUMERS, ended.append),
            http=httpx.Client(transport=httpx.MockTransport(upstream)),
        )
    )
    with pytest.raises(InvalidInput) as bad:
        submit_variation("echo", text="hi", colour="red")
    assert bad.value.field == "colour"

    job = submit_variation("echo", text="hello")
    submit_job(str(job.id), provider="echo")  # what the worker runs for the message
    assert get_job(job.id).status == JobStatus.SUBMITTED

    polls = 0
    while not get_job(job.id).is_terminal and polls < 5:
        later = utcnow() + timedelta(minutes=10)  # every in-flight job is due by then
        for batch in lease_due(runtime.current(), now=later):
            assert batch.provider == "echo"
            poll_batch(batch.provider, [str(i) for i in batch.job_ids])
        polls += 1

    done = get_job(job.id)
    assert done.status == JobStatus.COMPLETED
    assert done.result_urls == ["https://cdn.echo.example/echo-1.png"]
    assert done.upstream_task_id == "echo-1"
    assert [(e.from_status, e.to_status) for e in done.events if e.kind == "transition"] == [
        (None, "queued"),
        ("queued", "submitted"),
        ("submitted", "processing"),
        ("processing", "completed"),
    ]
    assert [r.method for r in upstream.requests] == ["POST", "GET", "GET"]
    assert [(t.job_id, t.status) for t in ended] == [(job.id, "completed")]


class PollProvider(EchoProvider):
    name: ClassVar[str] = "poll"  # VARIFLOW_POLL_* are variflow's own settings


def test_a_provider_named_like_a_core_setting_is_refused() -> None:
    providers.register(PollProvider)
    try:
        with pytest.raises(ConfigError, match="VARIFLOW_POLL_INTERVAL: a setting of variflow"):
            load_settings()
    finally:
        providers.unregister("poll")
