"""The /v1 operations: jobs created, read, listed, waited for, cancelled, and their results.

Each view checks the caller's token (the blueprint does, before), validates
with the models of webhooks/v1/schemas.py, and calls the same functions as the
Python API (worker/api.py) with the caller's tenant, so the rules are the
ones in-process callers get. Every error is a problem (webhooks/problems.py).
"""

from __future__ import annotations

import base64
import binascii
import inspect
import json
import os
import threading
from typing import Any

from flask import Blueprint, current_app, redirect, request
from flask.typing import ResponseReturnValue

from webhooks.context import runtime
from webhooks.problems import ProblemError, invalid
from webhooks.results import STORE_DOWN, stored_result
from webhooks.v1 import schemas
from webhooks.v1.auth import caller, visible_tenant
from webhooks.v1.openapi import Api, Operation, Param, query_of, validated
from webhooks.v1.schemas import NUMBER, CreateJob, CreateJobForm, Problem
from webhooks.v1.waiting import WEB_FREE_THREADS, Watcher
from worker import api as jobs_api
from worker.api import JobInfo, ResultSource
from worker.errors import IdempotencyConflict, InvalidInput, JobNotFound
from worker.result_store import StoreUnavailable
from worker.results import stored_name

bp = Blueprint("v1", __name__, url_prefix="/v1")
api = Api(bp)

JOB_ID = Param("job_id", {"type": "string", "format": "uuid"}, "The job's id.")
RESULT_N = Param("n", {"type": "integer", "minimum": 0}, "The result's index, from 0.")
IDEMPOTENCY_KEY = Param(
    "Idempotency-Key",
    {"type": "string", "minLength": 1, "maxLength": 255},
    "The same key and request return the first job (200); another request is a 409.",
    required=False,
)
# The keywords of worker.api.submit_or_replay (and its provider): never provider fields,
# so never taken from ``input`` (a hostile {"tenant": ...} must not reach them).
RESERVED_INPUT = frozenset(
    name
    for name, parameter in inspect.signature(jobs_api.submit_or_replay).parameters.items()
    if parameter.kind is not inspect.Parameter.VAR_KEYWORD
)
BAD_REQUEST = ("The request is wrong; `field` names what (nothing was stored)", Problem)
UNAUTHENTICATED = ("No token, or an unknown or revoked one", Problem)
NOT_FOUND = ("No such job for this token's tenant", Problem)
UNAVAILABLE = ("The database is restarting: try again after Retry-After", Problem)
COMMON = {400: BAD_REQUEST, 401: UNAUTHENTICATED, 503: UNAVAILABLE}


# --- create ----------------------------------------------------------------------------------


@api.route(
    Operation(
        "POST",
        "/jobs",
        "createJob",
        "Create a job",
        description=(
            "JSON, or multipart/form-data with the image as a file part. With an "
            "Idempotency-Key, the same request returns the first job (200)."
        ),
        headers=(IDEMPOTENCY_KEY,),
        body=CreateJob,
        form=CreateJobForm,
        responses={
            **COMMON,
            200: ("The job this Idempotency-Key first created", schemas.Job),
            201: ("Created and queued", schemas.Job),
            409: ("The Idempotency-Key was used for another request (`job_id`)", Problem),
            413: ("The body is too large", Problem),
            415: ("Neither JSON nor multipart/form-data", Problem),
        },
        response_headers={201: {"Location": "The job's URL."}},
    )
)
def create_job() -> ResponseReturnValue:
    rt = runtime()
    # Room for an image of the allowed size in base64, plus the rest of the request.
    request.max_content_length = rt.settings.max_image_bytes * 4 // 3 + 64 * 1024
    if request.mimetype == "application/json":
        raw, upload = _json_body(), None
    elif request.mimetype == "multipart/form-data":
        raw, upload = _form_body()
    else:
        raise ProblemError(415, "send application/json or multipart/form-data")
    body: CreateJob = validated(CreateJob, raw)
    fields = dict(body.input)
    for name in sorted(fields.keys() & RESERVED_INPUT):
        raise invalid(f"input.{name}", f"not a field of {body.provider} input")
    image_field = "image"
    image = upload
    if "image_b64" in fields:
        image_field = "input.image_b64"
        if upload is not None:
            raise invalid(image_field, "give the image once: a file part or image_b64")
        image = _decode_image(fields.pop("image_b64"))
    key = request.headers.get("Idempotency-Key")
    try:
        submitted = jobs_api.submit_or_replay(
            body.provider,
            image=image,
            idempotency_key=key,
            deadline=body.deadline,
            notify_url=body.notify_url,
            metadata=body.metadata,
            priority=body.priority,
            tenant=caller().tenant,
            runtime=rt,
            **fields,
        )
    except IdempotencyConflict as exc:
        raise ProblemError(409, str(exc), job_id=str(exc.job_id)) from None
    except InvalidInput as exc:
        raise invalid(_request_field(exc.field, image_field), exc.message) from None
    job = _job(submitted.job)
    if not submitted.created:
        return job, 200
    return job, 201, {"Location": f"{bp.url_prefix}/jobs/{submitted.job.id}"}


def _json_body() -> Any:
    data = request.get_data(cache=False)
    try:
        return json.loads(data, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise invalid("body", f"not valid JSON ({type(exc).__name__})") from None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _form_body() -> tuple[dict[str, Any], bytes | None]:
    form = request.form
    raw: dict[str, Any] = {}
    for name in form:
        if name not in CreateJobForm.model_fields or name == "image":
            raise invalid(name, "not a field of this request")
        value = form[name]
        if name in ("input", "metadata"):
            try:
                raw[name] = json.loads(value, parse_constant=_no_constant)
            except (ValueError, RecursionError):
                raise invalid(name, "must be a JSON object as text") from None
        elif name == "deadline" and NUMBER.fullmatch(value.strip()):
            raw[name] = _seconds(value)
        elif name == "priority":
            raw[name] = _whole(value)
        else:
            raw[name] = value
    raw.setdefault("input", {})
    extra = [name for name in request.files if name != "image"]
    if extra:
        raise invalid(extra[0], "the only file part is `image`")
    upload = request.files.get("image")
    if upload is None:
        return raw, None
    limit = runtime().settings.max_image_bytes
    content = upload.stream.read(limit + 1)
    if len(content) > limit:
        raise invalid("image", f"over the limit of {limit} bytes")
    return raw, content


def _seconds(value: str) -> float:
    try:
        return float(value)
    except ValueError:  # "1.2.3" matches the pattern but is no number
        raise invalid("deadline", "a number of seconds or an RFC 3339 time") from None


def _whole(value: str) -> int | str:
    try:
        return int(value)
    except ValueError:  # left as text: the model names the field
        return value


def _decode_image(value: object) -> bytes:
    if not isinstance(value, str):
        raise invalid("input.image_b64", "base64 text of the image's bytes")
    if value.startswith("data:") and "," in value:  # a data URL: its base64 part
        value = value.split(",", 1)[1]
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise invalid("input.image_b64", "not valid base64") from None


def _request_field(field: str, image_field: str) -> str:
    """A field of submit_or_replay as the request names it."""
    top = field.split(".", 1)[0]
    if top in ("provider", "deadline", "notify_url", "metadata"):
        return field
    if field == "idempotency_key":
        return "Idempotency-Key"
    if field == "image":
        return image_field
    return f"input.{field}"


# --- read ------------------------------------------------------------------------------------


@api.route(
    Operation(
        "GET",
        "/jobs/{job_id}",
        "getJob",
        "Get a job (optionally waiting for its end)",
        path_params=(JOB_ID,),
        query=schemas.WaitQuery,
        responses={
            **COMMON,
            200: ("The job (after ?wait=, terminal or as it is then)", schemas.Job),
            404: NOT_FOUND,
        },
    )
)
def get_job(job_id: str) -> ResponseReturnValue:
    query: schemas.WaitQuery = query_of(schemas.WaitQuery)
    tenant = visible_tenant()
    job = _found(lambda: jobs_api.get_job(job_id, tenant=tenant, events=False, runtime=runtime()))
    if query.wait > 0 and not job.is_terminal:
        _watcher().wait(job.id, query.wait)
        job = _found(
            lambda: jobs_api.get_job(job.id, tenant=tenant, events=False, runtime=runtime())
        )
    return _job(job)


@api.route(
    Operation(
        "GET",
        "/jobs",
        "listJobs",
        "List jobs, newest first",
        query=schemas.ListQuery,
        responses={**COMMON, 200: ("A page of jobs and the cursor of the next", schemas.JobList)},
    )
)
def list_jobs() -> ResponseReturnValue:
    query: schemas.ListQuery = query_of(schemas.ListQuery)
    tenant = visible_tenant()
    if query.tenant is not None:
        if tenant is not None and query.tenant != tenant:
            return {"data": [], "next_cursor": None}  # another tenant's jobs: none visible
        tenant = query.tenant
    labels = dict(item.split(":", 1) for item in query.metadata)
    try:
        page = jobs_api.list_page(
            statuses=query.status,
            provider=query.provider,
            since=query.created_since,
            until=query.created_until,
            metadata=labels,
            tenant=tenant,
            cursor=query.cursor,
            limit=query.limit,
            runtime=runtime(),
        )
    except InvalidInput as exc:
        raise invalid(exc.field, exc.message) from None
    return {"data": [_job(job) for job in page.jobs], "next_cursor": page.next_cursor}


@api.route(
    Operation(
        "GET",
        "/jobs/{job_id}/events",
        "listJobEvents",
        "A job's timeline, oldest first",
        path_params=(JOB_ID,),
        responses={**COMMON, 200: ("The events", schemas.EventList), 404: NOT_FOUND},
    )
)
def job_events(job_id: str) -> ResponseReturnValue:
    tenant = visible_tenant()
    events = _found(lambda: jobs_api.job_events(job_id, tenant=tenant, runtime=runtime()))
    return {
        "data": [
            {
                "at": event.at.isoformat(),
                "source": event.source,
                "kind": event.kind,
                "from_status": event.from_status,
                "to_status": event.to_status,
                "message": event.message,
            }
            for event in events
        ]
    }


@api.route(
    Operation(
        "POST",
        "/jobs/{job_id}/cancel",
        "cancelJob",
        "Cancel a job (a terminal job is left as it is)",
        path_params=(JOB_ID,),
        body=schemas.CancelJob,
        responses={**COMMON, 200: ("The job, as cancelling left it", schemas.Job), 404: NOT_FOUND},
    )
)
def cancel_job(job_id: str) -> ResponseReturnValue:
    reason = f"cancelled through the API (token {caller().name})"
    if request.content_length or request.mimetype == "application/json":
        body: schemas.CancelJob = validated(schemas.CancelJob, _json_body())
        reason = body.reason or reason
    tenant = visible_tenant()
    try:
        job = _found(lambda: jobs_api.cancel_job(job_id, reason, tenant=tenant, runtime=runtime()))
    except InvalidInput as exc:
        raise invalid(exc.field, exc.message) from None
    return _job(job)


@api.route(
    Operation(
        "GET",
        "/jobs/{job_id}/results/{n}",
        "getResult",
        "A result image: the stored copy, else a redirect to the provider's",
        path_params=(JOB_ID, RESULT_N),
        responses={
            401: UNAUTHENTICATED,
            503: ("The database or the result store is unavailable: try again later", Problem),
            200: ("The image (stored in a folder, or streamed from S3)", None),
            302: ("A presigned URL of the stored copy in S3, else the provider's URL", None),
            404: ("No such job for this tenant, not completed, or no result n", Problem),
        },
        response_media={200: {"image/*": {"schema": {"type": "string", "format": "binary"}}}},
        response_headers={302: {"Location": "The stored copy's presigned URL, or the provider's."}},
    )
)
def get_result(job_id: str, n: int) -> ResponseReturnValue:
    tenant = visible_tenant()
    source: ResultSource = _found(
        lambda: jobs_api.result_source(job_id, n, tenant=tenant, runtime=runtime())
    )
    if source.name is not None:
        rt = runtime()
        try:
            stored = stored_result(rt.results, rt.settings, source.job_id, source.name)
        except StoreUnavailable:
            raise ProblemError(503, STORE_DOWN, headers={"Retry-After": "5"}) from None
        if stored is not None:
            return stored
    if source.provider_url is not None:
        return redirect(source.provider_url, 302)
    raise ProblemError(404, f"result {n} of job {job_id} is not stored")


# --- helpers ---------------------------------------------------------------------------------


def _found(read: Any) -> Any:
    try:
        return read()
    except JobNotFound:
        raise ProblemError(404, "no such job") from None


def _job(job: JobInfo) -> dict[str, Any]:
    settings = runtime().settings
    results = [
        {
            "index": n,
            "url": f"{bp.url_prefix}/jobs/{job.id}/results/{n}",
            # A URL of our own /results/ is a stored image, not the provider's.
            "provider_url": url if stored_name(settings, job.id, url) is None else None,
        }
        for n, url in enumerate(job.result_urls)
    ]
    error = None
    if job.error_code is not None:
        error = {"code": job.error_code, "message": job.error_message}
    return {
        "id": str(job.id),
        "provider": job.provider,
        "status": job.status.value,
        "progress": job.progress,
        "tenant": job.tenant,
        "input": job.params,
        "metadata": job.metadata or {},
        "idempotency_key": job.idempotency_key,
        "error": error,
        "results": results,
        "priority": job.priority,
        "waiting_reason": job.waiting_reason,
        "cost": job.cost,
        "deadline": job.deadline.isoformat(),
        "created_at": job.created_at.isoformat(),
        "updated_at": job.updated_at.isoformat(),
        "submitted_at": _time(job.submitted_at),
        "completed_at": _time(job.completed_at),
    }


def _time(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


_watchers_lock = threading.Lock()


def _watcher() -> Watcher:
    """This process's watcher (a forked gunicorn worker makes its own)."""
    found: Watcher | None = current_app.extensions.get("variflow.watcher")
    if found is not None and found.pid == os.getpid():
        return found
    with _watchers_lock:
        found = current_app.extensions.get("variflow.watcher")
        if found is None or found.pid != os.getpid():
            rt = runtime()
            found = Watcher(
                lambda ids: jobs_api.job_statuses(ids, runtime=rt),
                max_waiters=max(1, rt.settings.web_threads - WEB_FREE_THREADS),
            )
            current_app.extensions["variflow.watcher"] = found
    return found
