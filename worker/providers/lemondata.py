"""LemonData's OpenAI-compatible image variations (docs/providers.md, LemonData): sync or poll."""

from __future__ import annotations

import base64
import binascii
import re
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
    error_message,
    json_body,
    reject_unknown,
    send,
)
from worker.status import JobStatus, Source, UpstreamState
from worker.validation import MAX_NAME_CHARS, describe, http_url, read_image, text

SIZES = ("256x256", "512x512", "1024x1024")
_DIGITS = re.compile(r"[0-9]{1,3}")
FORMATS = ("url", "b64_json")
_PARAMS = {"image_url", "n", "size", "response_format", "user", "model"}
_STATUS = {
    "pending": JobStatus.SUBMITTED,
    "queued": JobStatus.SUBMITTED,
    "processing": JobStatus.PROCESSING,
    "completed": JobStatus.COMPLETED,
    "succeeded": JobStatus.COMPLETED,
    "failed": JobStatus.FAILED,
}


class LemonDataSettings(ProviderSettings):
    """VARIFLOW_LEMONDATA_*: the account's key, the API's address, the create timeout."""

    base_url: AnyHttpUrl = AnyHttpUrl("https://api.lemondata.cc")
    # A synchronous create answers only when the images are done (up to ~2 min).
    create_timeout: float = Field(default=150.0, ge=120)

    def longest_call(self, http_timeout: float) -> float:
        return max(self.create_timeout, http_timeout)


class LemonDataProvider:
    name: ClassVar[str] = "lemondata"
    settings_model: ClassVar[type[ProviderSettings]] = LemonDataSettings
    supports_webhook: ClassVar[bool] = False
    webhook_secret_header: ClassVar[str | None] = None
    can_cancel: ClassVar[bool] = False
    queues_over_capacity: ClassVar[bool] = False
    needs_image_bytes: ClassVar[bool] = True

    def __init__(
        self,
        client: httpx.Client,
        base_url: str,
        api_key: str | None,
        *,
        max_image_bytes: int = 4 * 1024 * 1024,
        create_timeout: float = 150.0,
    ) -> None:
        self._client = client
        self._base = base_url.rstrip("/")
        self._api_key = api_key
        self._max_image_bytes = max_image_bytes
        self._create_timeout = create_timeout
        self.batch_poll_size = 1
        self.webhook_grace: float | None = None

    @classmethod
    def from_settings(cls, settings: LemonDataSettings, context: AdapterContext) -> Self:
        return cls(
            context.client,
            str(settings.base_url),
            settings.key(),
            max_image_bytes=context.max_image_bytes,
            create_timeout=settings.create_timeout,
        )

    def validate(
        self, params: Mapping[str, Any], image: InputImage | None = None
    ) -> dict[str, Any]:
        reject_unknown(params, _PARAMS, self.name)
        if ("image_url" in params) == (image is not None):
            raise InvalidInput("image", "exactly one image is required (a URL, a path or bytes)")
        if image is not None:
            self.check_image(image)
        clean: dict[str, Any] = {}
        if "image_url" in params:
            clean["image_url"] = http_url("image_url", params["image_url"])
        if "user" in params:
            clean["user"] = text("user", params["user"], max_chars=MAX_NAME_CHARS)
        n = params.get("n", 1)
        # ASCII digits only: str.isdigit() also takes "²", which int() refuses.
        if isinstance(n, str) and _DIGITS.fullmatch(n):
            n = int(n)
        if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= 10:
            raise InvalidInput("n", f"an integer from 1 to 10, got {describe(n)}")
        clean["n"] = n
        size = params.get("size", "1024x1024")
        if not isinstance(size, str) or size not in SIZES:
            raise InvalidInput("size", f"one of {', '.join(SIZES)}, got {describe(size)}")
        clean["size"] = size
        response_format = params.get("response_format", "url")
        if not isinstance(response_format, str) or response_format not in FORMATS:
            raise InvalidInput("response_format", f"one of {', '.join(FORMATS)}")
        clean["response_format"] = response_format
        model = params.get("model", "dall-e-2")
        if not isinstance(model, str) or model != "dall-e-2":
            raise InvalidInput("model", "only dall-e-2 makes variations")
        return clean

    def check_image(self, image: InputImage) -> None:
        """The file rules of docs/providers.md, LemonData: a square PNG within the size limit that
        decodes (its pixel size read from the header and capped first: worker.validation)."""
        if len(image.content) > self._max_image_bytes:
            raise InvalidInput(
                "image", f"{len(image.content)} bytes is over the limit of {self._max_image_bytes}"
            )
        _format, width, height = read_image("image", image.content, ("PNG",))
        if width != height:
            raise InvalidInput("image", f"must be square, got {width}x{height}")

    def submit(self, request: SubmitRequest) -> Submission:
        if request.image is None:
            raise PermanentUpstreamError(
                "lemondata: no image to send", code=ErrorCode.INVALID_INPUT
            )
        params = request.params
        form = {
            "model": "dall-e-2",
            "n": str(params.get("n", 1)),
            "size": params.get("size", "1024x1024"),
            "response_format": params.get("response_format", "url"),
            # The job id doubles as the abuse-monitoring user when none is given.
            "user": params.get("user") or f"variflow-{request.job_id}",
        }
        body = self._call(
            "POST",
            "/v1/images/variations",
            operation="create",
            data=form,
            files={"image": (request.image.filename, request.image.content, "image/png")},
            timeout=httpx.Timeout(self._create_timeout, connect=10.0),
        )
        if body.get("status") == "pending" or body.get("task_id") or body.get("poll_url"):
            task_id = str(body.get("task_id") or "")
            if not task_id:
                raise PermanentUpstreamError("lemondata: asynchronous answer without a task_id")
            poll_url = _own_path(body.get("poll_url")) or f"/v1/tasks/{task_id}"
            return Submission(
                state=UpstreamState(
                    JobStatus.SUBMITTED,
                    Source.SUBMIT,
                    upstream_task_id=task_id,
                    payload={"status": "pending", "task_id": task_id},
                ),
                poll_url=poll_url,
            )
        urls, images = _results(body)
        return Submission(
            state=UpstreamState(
                JobStatus.COMPLETED,
                Source.SUBMIT,
                image_urls=urls,
                payload={"sync": True, "images": len(urls) + len(images)},
                images=images,
            ),
        )

    def poll(self, targets: Sequence[PollTarget]) -> dict[str, UpstreamState]:
        states = {}
        for target in targets:
            path = target.poll_url or f"/v1/tasks/{target.upstream_task_id}"
            try:
                body = self._call("GET", path, operation="poll")
            except PermanentUpstreamError as exc:
                if exc.code != ErrorCode.ASYNC_TASK_NOT_FOUND:
                    raise
                states[target.upstream_task_id] = UpstreamState(
                    JobStatus.FAILED,
                    Source.POLL,
                    error_code=ErrorCode.ASYNC_TASK_NOT_FOUND,
                    error_message=exc.message,
                    upstream_task_id=target.upstream_task_id,
                )
                continue
            raw = str(body.get("status") or "").lower()
            status = _STATUS.get(raw, JobStatus.SUBMITTED)
            urls, images = _results(body) if status is JobStatus.COMPLETED else ((), ())
            error = body.get("error")
            states[target.upstream_task_id] = UpstreamState(
                status,
                Source.POLL,
                image_urls=urls,
                images=images,
                error_message=error_message(body) if error else None,
                upstream_task_id=target.upstream_task_id,
                payload={"status": raw, "task_id": target.upstream_task_id},
            )
        return states

    def parse_webhook(self, body: Any) -> UpstreamState:
        raise InvalidWebhook("lemondata has no webhooks")

    def cancel(self, target: PollTarget) -> bool:
        return False

    def _call(self, method: str, path: str, *, operation: str, **kwargs: Any) -> Mapping[str, Any]:
        if not self._api_key:
            raise ProviderNotConfigured("lemondata: VARIFLOW_LEMONDATA_API_KEY is not set")
        response = send(
            self._client,
            self.name,
            method,
            self._base + path,
            operation=operation,
            headers={"Authorization": f"Bearer {self._api_key}"},
            **kwargs,
        )
        body = json_body(response, self.name)
        if response.status_code != 200 or not isinstance(body, Mapping):
            error = body.get("error") if isinstance(body, Mapping) else None
            code = error.get("code") if isinstance(error, Mapping) else None
            raise PermanentUpstreamError(
                f"lemondata: {error_message(body) or 'error'} (HTTP {response.status_code})",
                code=str(code) if code else ErrorCode.UPSTREAM_REJECTED,
            )
        return body


def _own_path(value: object) -> str | None:
    """A poll_url we may follow: a path on the provider's own host, nothing else.

    The API key goes with every poll, so "//elsewhere" or "@elsewhere" must
    never become part of the URL.
    """
    if isinstance(value, str) and value.startswith("/") and not value.startswith("//"):
        return value
    return None


def _results(body: Mapping[str, Any]) -> tuple[tuple[str, ...], tuple[bytes, ...]]:
    urls: list[str] = []
    images: list[bytes] = []
    for item in body.get("data") or []:
        if not isinstance(item, Mapping):
            continue
        if isinstance(item.get("url"), str) and item["url"]:
            urls.append(item["url"])
        elif isinstance(item.get("b64_json"), str):
            try:
                images.append(base64.b64decode(item["b64_json"], validate=True))
            except (binascii.Error, ValueError) as exc:
                raise PermanentUpstreamError("lemondata: a b64_json image does not decode") from exc
    return tuple(urls), tuple(images)
