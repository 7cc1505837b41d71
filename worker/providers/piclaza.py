"""Piclaza image variation (docs/providers.md, Piclaza): create, then batched polling; no webhook.

Where Piclaza's documentation is silent (status words, where result URLs
are), this parses tolerantly exactly as docs/providers.md, Piclaza chooses.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Self

import httpx
from pydantic import AnyHttpUrl, Field

from worker.errors import ErrorCode, InvalidInput, InvalidWebhook
from worker.providers.base import (
    AdapterContext,
    InputImage,
    PermanentUpstreamError,
    PollTarget,
    ProviderNotConfigured,
    ProviderSettings,
    Submission,
    SubmitRequest,
    TransientUpstreamError,
    error_message,
    json_body,
    reject_unknown,
    send,
)
from worker.status import JobStatus, Source, UpstreamState
from worker.validation import MAX_NAME_CHARS, http_url, read_image, required_text

COMPLETED_WORDS = frozenset({"ok", "success", "completed", "done"})
FAILED_WORDS = frozenset({"failed", "error"})
_PARAMS = {"image_url", "image_name", "grouping"}
# The image types Piclaza reads (sent as a data: URI of the detected type).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
# Not a result: the input image is echoed back in `reference`.
_NOT_RESULTS = frozenset({"reference"})


LIMIT_WORDS = ("limit", "concurrency", "too many requests", "capacity")


def over_capacity(code: object, message: object) -> bool:
    """A non-zero code of 429, or one whose message speaks of a limit: the account is
    over its capacity (transient), not the task refused."""
    if code in (0, None, "0"):
        return False
    if code in (429, "429"):
        return True
    text = message.lower() if isinstance(message, str) else ""
    return any(word in text for word in LIMIT_WORDS)


class PiclazaSettings(ProviderSettings):
    """VARIFLOW_PICLAZA_*: the account's key, the API's address, jobs per result query."""

    base_url: AnyHttpUrl = AnyHttpUrl("https://api.piclaza.com")
    batch_size: int = Field(default=50, ge=1, le=100)


class PiclazaProvider:
    name: ClassVar[str] = "piclaza"
    settings_model: ClassVar[type[ProviderSettings]] = PiclazaSettings
    supports_webhook: ClassVar[bool] = False
    webhook_secret_header: ClassVar[str | None] = None
    can_cancel: ClassVar[bool] = False
    queues_over_capacity: ClassVar[bool] = False
    needs_image_bytes: ClassVar[bool] = False

    def __init__(
        self, client: httpx.Client, base_url: str, api_key: str | None, batch_poll_size: int = 50
    ) -> None:
        self._client = client
        self._base = base_url.rstrip("/")
        self._api_key = api_key
        self.batch_poll_size = batch_poll_size
        self.webhook_grace: float | None = None

    @classmethod
    def from_settings(cls, settings: PiclazaSettings, context: AdapterContext) -> Self:
        return cls(
            context.client,
            str(settings.base_url),
            settings.key(),
            batch_poll_size=settings.batch_size,
        )

    def validate(
        self, params: Mapping[str, Any], image: InputImage | None = None
    ) -> dict[str, Any]:
        reject_unknown(params, _PARAMS, self.name)
        has_url = "image_url" in params
        if has_url == (image is not None):
            raise InvalidInput("image", "exactly one image is required (a URL, a path or bytes)")
        clean: dict[str, Any] = {}
        if has_url:
            clean["image_url"] = http_url("image_url", params["image_url"])
        elif image is not None:
            read_image("image", image.content, IMAGE_FORMATS)
        if "image_name" in params:
            # Accepted and checked, but the file's own name is what is sent (docs/providers.md).
            required_text("image_name", params["image_name"], max_chars=MAX_NAME_CHARS)
        if "grouping" in params:
            if not isinstance(params["grouping"], bool):
                raise InvalidInput("grouping", "must be true or false")
            clean["grouping"] = params["grouping"]
        return clean

    def submit(self, request: SubmitRequest) -> Submission:
        body: dict[str, Any] = {"source": "api", "title": str(request.job_id)}
        if "grouping" in request.params:
            body["grouping"] = request.params["grouping"]
        if request.image is not None:
            encoded = base64.b64encode(request.image.content).decode()
            body["image_file_b64"] = f"data:{request.image.content_type};base64,{encoded}"
            body["image_name"] = request.image.filename
        else:
            body["image_url"] = request.params["image_url"]
        data = self._call("/task/v1/image/vary", body, operation="create")
        results = data.get("results")
        item = results[0] if isinstance(results, list) and results else None
        if not isinstance(item, Mapping):
            raise PermanentUpstreamError("piclaza: create answered without a result item")
        if over_capacity(item.get("code"), item.get("message")):
            raise TransientUpstreamError(
                f"piclaza: over capacity: {item.get('message') or 'limit reached'}",
                code=ErrorCode.RATE_LIMITED,
            )
        if item.get("code") not in (0, None):
            raise PermanentUpstreamError(
                f"piclaza: {item.get('message') or 'task not created'} (code {item.get('code')})",
                code=ErrorCode.UPSTREAM_REJECTED,
            )
        task_id = item.get("task_id")
        if not task_id:
            raise PermanentUpstreamError("piclaza: create answered without a task_id")
        return Submission(
            state=UpstreamState(
                JobStatus.SUBMITTED,
                Source.SUBMIT,
                upstream_task_id=str(task_id),
                payload={"task_id": task_id},
            )
        )

    def poll(self, targets: Sequence[PollTarget]) -> dict[str, UpstreamState]:
        ids = [t.upstream_task_id for t in targets]
        data = self._call("/task/v1/image/vary/result", {"task_ids": ids}, operation="poll")
        results = data.get("results")
        if not isinstance(results, list):
            raise TransientUpstreamError("piclaza: query answered without results")
        states = {}
        for item in results:
            if isinstance(item, Mapping) and item.get("task_id"):
                states[str(item["task_id"])] = self.state_from_item(item)
        return states

    def parse_webhook(self, body: Any) -> UpstreamState:
        raise InvalidWebhook("piclaza has no webhooks")

    def cancel(self, target: PollTarget) -> bool:
        return False

    @staticmethod
    def state_from_item(item: Mapping[str, Any]) -> UpstreamState:
        task_id = str(item["task_id"])
        raw = str(item.get("status") or "").strip().lower()
        payload = {"status": raw, "task_id": task_id, "code": item.get("code")}
        if item.get("code") not in (0, None):
            # A task id the provider does not know (or refuses to report).
            return UpstreamState(
                JobStatus.FAILED,
                Source.POLL,
                error_code=ErrorCode.UPSTREAM_REJECTED,
                error_message=f"piclaza: {item.get('message') or 'unknown task'} "
                f"(code {item.get('code')})",
                upstream_task_id=task_id,
                payload=payload,
            )
        if raw in FAILED_WORDS:
            return UpstreamState(
                JobStatus.FAILED,
                Source.POLL,
                error_message=str(item.get("message") or "") or None,
                upstream_task_id=task_id,
                payload=payload,
            )
        if raw in COMPLETED_WORDS:
            return UpstreamState(
                JobStatus.COMPLETED,
                Source.POLL,
                image_urls=result_urls(item),
                upstream_task_id=task_id,
                payload=payload,
            )
        status = JobStatus.PROCESSING if raw == "running" else JobStatus.SUBMITTED
        return UpstreamState(status, Source.POLL, upstream_task_id=task_id, payload=payload)

    def _call(self, path: str, body: dict[str, Any], *, operation: str) -> Mapping[str, Any]:
        if not self._api_key:
            raise ProviderNotConfigured("piclaza: VARIFLOW_PICLAZA_API_KEY is not set")
        response = send(
            self._client,
            self.name,
            "POST",
            self._base + path,
            operation=operation,
            json=body,
            headers={"X-API-Key": self._api_key},
        )
        answer = json_body(response, self.name)
        if isinstance(answer, Mapping) and over_capacity(answer.get("code"), error_message(answer)):
            # Piclaza documents no limits: "over capacity" is a refusal to retry later
            # (docs/providers.md §5), never the job's failure.
            raise TransientUpstreamError(
                f"piclaza: over capacity: {error_message(answer) or 'limit reached'}",
                code=ErrorCode.RATE_LIMITED,
            )
        if response.status_code != 200 or not isinstance(answer, Mapping) or answer.get("code"):
            raise PermanentUpstreamError(
                f"piclaza: {error_message(answer) or 'error'} (HTTP {response.status_code})",
                code=ErrorCode.UPSTREAM_REJECTED,
            )
        data = answer.get("data")
        if not isinstance(data, Mapping):
            raise PermanentUpstreamError("piclaza: answer without a data object")
        return data


def result_urls(item: Mapping[str, Any]) -> tuple[str, ...]:
    urls = item.get("image_urls")
    if isinstance(urls, list) and (found := tuple(u for u in urls if _is_http(u))):
        return found
    if _is_http(item.get("image_url")):
        return (str(item["image_url"]),)
    return tuple(
        str(value) for key, value in item.items() if key not in _NOT_RESULTS and _is_http(value)
    )


def _is_http(value: object) -> bool:
    return isinstance(value, str) and value.startswith(("http://", "https://"))
