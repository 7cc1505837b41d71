"""PiAPI Midjourney variation (docs/providers.md): create with a per-job webhook, get, cancel."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Self

import httpx
from pydantic import AnyHttpUrl, Field, SecretStr

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
    json_body,
    reject_image,
    reject_unknown,
    require_str,
    send,
)
from worker.status import JobStatus, Source, UpstreamState
from worker.upstream_text import storable, task_id_problem, usable_url, usable_urls
from worker.validation import MAX_NAME_CHARS, MAX_PROMPT_CHARS, describe

INDEXES = ("1", "2", "3", "4", "high_variation", "low_variation")
SERVICE_MODES = ("", "public", "private")
# ASCII digits only (\d would also take other scripts' digits, which PiAPI cannot read).
_ASPECT_RATIO = re.compile(r"[0-9]{1,3}:[0-9]{1,3}")
_STATUS = {
    "pending": JobStatus.SUBMITTED,
    "staged": JobStatus.SUBMITTED,
    "processing": JobStatus.PROCESSING,
    "completed": JobStatus.COMPLETED,
    "failed": JobStatus.FAILED,
}
TASK_NOT_FOUND = ErrorCode.TASK_NOT_FOUND.value
NOT_CANCELLABLE = ErrorCode.NOT_CANCELLABLE.value
# Only cancel answers 400 for a task past pending; elsewhere 400 is a bad request.
_ERROR_CODES = {404: TASK_NOT_FOUND}
_PARAMS = {"origin_task_id", "index", "prompt", "aspect_ratio", "skip_prompt_check", "service_mode"}


class PiAPISettings(ProviderSettings):
    """VARIFLOW_PIAPI_*: the account's key, the API's address, and its webhooks."""

    base_url: AnyHttpUrl = AnyHttpUrl("https://api.piapi.ai")
    # The one secret of the account-wide webhook endpoint (POST /webhooks/piapi).
    webhook_secret: SecretStr | None = None
    # A job is polled only when no webhook came for this long.
    webhook_grace: float = Field(default=120.0, ge=0)


def _consumed(data: Mapping[str, Any]) -> float | None:
    """The points a finished task consumed (``meta.usage.consume``), if reported sanely."""
    meta = data.get("meta")
    usage = meta.get("usage") if isinstance(meta, Mapping) else None
    consume = usage.get("consume") if isinstance(usage, Mapping) else None
    if isinstance(consume, bool) or not isinstance(consume, int | float):
        return None
    if not math.isfinite(consume) or not 0 <= consume < 1e15:
        return None
    return float(consume)


class PiAPIProvider:
    name: ClassVar[str] = "piapi"
    settings_model: ClassVar[type[ProviderSettings]] = PiAPISettings
    supports_webhook: ClassVar[bool] = True
    webhook_secret_header: ClassVar[str | None] = "x-webhook-secret"  # noqa: S105
    can_cancel: ClassVar[bool] = True
    queues_over_capacity: ClassVar[bool] = True
    needs_image_bytes: ClassVar[bool] = False

    def __init__(
        self,
        client: httpx.Client,
        base_url: str,
        api_key: str | None,
        *,
        webhook_grace: float = 120.0,
    ) -> None:
        self._client = client
        self._base = base_url.rstrip("/")
        self._api_key = api_key
        self.batch_poll_size = 1
        self.webhook_grace: float | None = webhook_grace

    @classmethod
    def from_settings(cls, settings: PiAPISettings, context: AdapterContext) -> Self:
        return cls(
            context.client,
            str(settings.base_url),
            settings.key(),
            webhook_grace=settings.webhook_grace,
        )

    def validate(
        self, params: Mapping[str, Any], image: InputImage | None = None
    ) -> dict[str, Any]:
        reject_image(params, image, self.name)
        reject_unknown(params, _PARAMS, self.name)
        index = params.get("index")
        if isinstance(index, int) and not isinstance(index, bool) and 0 <= index <= 9:
            index = str(index)
        if not isinstance(index, str) or index not in INDEXES:
            raise InvalidInput(
                "index", f"must be one of {', '.join(INDEXES)}, got {describe(index)}"
            )
        clean: dict[str, Any] = {
            "origin_task_id": require_str(params, "origin_task_id", max_chars=MAX_NAME_CHARS),
            "index": index,
            "prompt": require_str(params, "prompt", max_chars=MAX_PROMPT_CHARS),
        }
        if "aspect_ratio" in params:
            ratio = params["aspect_ratio"]
            if not isinstance(ratio, str) or not _ASPECT_RATIO.fullmatch(ratio):
                raise InvalidInput("aspect_ratio", f"must look like '16:9', got {describe(ratio)}")
            clean["aspect_ratio"] = ratio
        if "skip_prompt_check" in params:
            if not isinstance(params["skip_prompt_check"], bool):
                raise InvalidInput("skip_prompt_check", "must be true or false")
            clean["skip_prompt_check"] = params["skip_prompt_check"]
        if "service_mode" in params:
            mode = params["service_mode"]
            if not isinstance(mode, str) or mode not in SERVICE_MODES:
                raise InvalidInput("service_mode", f"must be one of {SERVICE_MODES}")
            clean["service_mode"] = mode
        return clean

    def submit(self, request: SubmitRequest) -> Submission:
        params = dict(request.params)
        service_mode = params.pop("service_mode", None)
        config: dict[str, Any] = {}
        if service_mode is not None:
            config["service_mode"] = service_mode
        if request.webhook_url:
            config["webhook_config"] = {
                "endpoint": request.webhook_url,
                "secret": request.webhook_secret or "",
            }
        body: dict[str, Any] = {"model": "midjourney", "task_type": "variation", "input": params}
        if config:
            body["config"] = config
        data = self._call("POST", "/api/v1/task", operation="create", json=body)
        state = self.state_from_data(data, Source.SUBMIT)
        if not state.upstream_task_id:
            raise PermanentUpstreamError("piapi: create answered without a task_id")
        return Submission(state=state)

    def poll(self, targets: Sequence[PollTarget]) -> dict[str, UpstreamState]:
        states = {}
        for target in targets:
            try:
                data = self._call(
                    "GET", f"/api/v1/task/{target.upstream_task_id}", operation="poll"
                )
            except PermanentUpstreamError as exc:
                if exc.code != TASK_NOT_FOUND:
                    raise
                # PiAPI deletes tasks after a while: polling it again cannot help.
                states[target.upstream_task_id] = UpstreamState(
                    JobStatus.FAILED,
                    Source.POLL,
                    error_code=TASK_NOT_FOUND,
                    error_message=exc.message,
                    upstream_task_id=target.upstream_task_id,
                )
                continue
            states[target.upstream_task_id] = self.state_from_data(data, Source.POLL)
        return states

    def parse_webhook(self, body: Any) -> UpstreamState:
        if not isinstance(body, Mapping) or "timestamp" not in body or "data" not in body:
            raise InvalidWebhook("body must be a JSON object with 'timestamp' and 'data'")
        data = body["data"]
        if not isinstance(data, Mapping):
            raise InvalidWebhook("data.task_id: required (data must be an object)")
        task_id = data.get("task_id")
        if not isinstance(task_id, str) or not task_id.strip():
            raise InvalidWebhook("data.task_id: required, a non-empty string")
        problem = task_id_problem(task_id)
        if problem is not None:  # it could never be stored, nor match a stored one
            raise InvalidWebhook(f"data.task_id: {problem}")
        return self.state_from_data(data, Source.WEBHOOK)

    def cancel(self, target: PollTarget) -> bool:
        try:
            self._call(
                "DELETE",
                f"/api/v1/task/{target.upstream_task_id}",
                operation="cancel",
                envelope=False,
                bad_request_code=NOT_CANCELLABLE,
            )
        except PermanentUpstreamError as exc:
            if exc.code in (NOT_CANCELLABLE, TASK_NOT_FOUND):
                return False  # no longer pending (or gone) upstream
            raise
        return True

    def state_from_data(self, data: Mapping[str, Any], source: Source) -> UpstreamState:
        """The state a task envelope's ``data`` reports, safe to store whatever it holds
        (worker.upstream_text): a value of the wrong type counts as absent."""
        raw_status = data.get("status")
        raw_status = raw_status.strip().lower() if isinstance(raw_status, str) else ""
        status = _STATUS.get(raw_status, JobStatus.SUBMITTED)
        output = data.get("output") if isinstance(data.get("output"), Mapping) else {}
        assert isinstance(output, Mapping)
        progress = output.get("progress", output.get("task_progress"))
        # A JSON number (int() of 1e400's inf or of NaN would raise; so would isfinite()
        # of an integer too large for a float); anything else is no progress.
        percent = (
            max(0, min(100, int(progress)))
            if isinstance(progress, int | float)
            and not isinstance(progress, bool)
            and (isinstance(progress, int) or math.isfinite(progress))
            else None
        )
        error = data.get("error") if isinstance(data.get("error"), Mapping) else {}
        assert isinstance(error, Mapping)
        messages = (error.get("message"), error.get("raw_message"))
        error_message = next((m for m in messages if isinstance(m, str) and m), None)
        task_id = data.get("task_id")
        return storable(
            UpstreamState(
                status=status,
                source=source,
                progress=percent,
                image_urls=_image_urls(output),
                error_code=ErrorCode.UPSTREAM_FAILED if status is JobStatus.FAILED else None,
                error_message=error_message,
                upstream_task_id=str(task_id) if task_id else None,
                payload={"status": raw_status, "progress": progress, "task_id": task_id},
                cost=_consumed(data) if status.is_terminal else None,
            )
        )

    def _call(
        self,
        method: str,
        path: str,
        *,
        operation: str,
        envelope: bool = True,
        bad_request_code: str = ErrorCode.UPSTREAM_REJECTED,
        **kwargs: Any,
    ) -> Any:
        if not self._api_key:
            raise ProviderNotConfigured("piapi: VARIFLOW_PIAPI_API_KEY is not set")
        response = send(
            self._client,
            self.name,
            method,
            self._base + path,
            operation=operation,
            headers={"X-API-Key": self._api_key},
            **kwargs,
        )
        body = json_body(response, self.name)
        code = body.get("code") if isinstance(body, Mapping) else None
        if response.status_code != 200 or code != 200:
            message = body.get("message") if isinstance(body, Mapping) else None
            raise PermanentUpstreamError(
                f"piapi: {message or 'error'} (HTTP {response.status_code}, code {code})",
                code=bad_request_code
                if response.status_code == 400
                else _ERROR_CODES.get(response.status_code, ErrorCode.UPSTREAM_REJECTED),
            )
        if not envelope:
            return body
        data = body.get("data")
        if not isinstance(data, Mapping):
            raise PermanentUpstreamError("piapi: answer without a data object")
        return data


def _image_urls(output: Mapping[str, Any]) -> tuple[str, ...]:
    """The result URLs, from the first field that holds a usable one (a URL that could
    not be stored whole — NUL, lone surrogate, too long — is not usable)."""
    for key in ("image_urls", "temporary_image_urls"):
        urls = output.get(key)
        if isinstance(urls, list):
            found = usable_urls(urls)
            if found:
                return found
    grid = usable_url(output.get("image_url"))
    return (grid,) if grid is not None else ()
