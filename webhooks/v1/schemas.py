"""The HTTP API's request and response models.

They validate what comes in and shape what goes out, and the OpenAPI document
is generated from them (webhooks/v1/openapi.py): the document cannot drift
from what the code accepts. A provider's ``input`` fields are checked by the
provider's adapter (worker/providers), which names the field; here they are
an object.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator

NUMBER = re.compile(r"[-+]?[0-9.]+([eE][-+]?[0-9]+)?")
MAX_WAIT_SECONDS = 60.0
MAX_PAGE_SIZE = 100
# worker.states.JobStatus, spelled out so the document lists them (a test keeps them equal).
Status = Literal["queued", "submitted", "processing", "completed", "failed", "cancelled"]

Metadata = Annotated[
    dict[
        Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,40}$")],
        Annotated[str, Field(max_length=500)],
    ],
    Field(max_length=16, description="Up to 16 labels of your own, returned and filterable."),
]


class _Strict(BaseModel):
    # Unknown fields are refused, naming them: a typo never passes unnoticed.
    model_config = ConfigDict(extra="forbid")


class CreateJob(_Strict):
    """A job to create (``application/json``)."""

    provider: str = Field(description="piapi, piclaza or lemondata (as configured).")
    input: dict[str, Any] = Field(
        description=(
            "The provider's fields (docs/providers.md). The input image is image_url "
            "(http/https) or image_b64 (base64 of PNG, JPEG or WebP bytes), not both."
        )
    )
    deadline: Annotated[float, Field(gt=0, strict=True)] | AwareDatetime | None = Field(
        default=None,
        description="Seconds from now, or an RFC 3339 time with an offset. Past it the job fails.",
    )
    notify_url: str | None = Field(
        default=None,
        max_length=2048,
        description="POSTed the final state, signed per Standard Webhooks.",
    )
    metadata: Metadata | None = None
    priority: int = Field(
        default=0,
        ge=-100,
        le=100,
        strict=True,
        description="Higher goes first in the provider's queue when its accounts are full.",
    )

    @field_validator("deadline", mode="before")
    @classmethod
    def _no_number_as_text(cls, value: object) -> object:
        # pydantic would read "900" as a Unix time (1970): a number must be a number.
        if isinstance(value, str) and NUMBER.fullmatch(value.strip()):
            raise ValueError("a number of seconds must be a JSON number, not text")
        return value


class CreateJobForm(BaseModel):
    """The same request as ``multipart/form-data``: the image as a file part."""

    provider: str
    input: str = Field(default="{}", description="The input object as JSON text.")
    deadline: str | None = Field(default=None, description="As in the JSON request.")
    notify_url: str | None = None
    metadata: str | None = Field(default=None, description="The metadata object as JSON text.")
    priority: str | None = Field(default=None, description="As in the JSON request.")
    image: bytes | None = Field(
        default=None, json_schema_extra={"format": "binary"}, description="The input image."
    )


class CancelJob(_Strict):
    reason: str | None = Field(default=None, min_length=1, max_length=255)


class WaitQuery(BaseModel):
    wait: float = Field(
        default=0.0,
        ge=0.0,
        le=MAX_WAIT_SECONDS,
        description="Hold the request until the job is terminal or this many seconds pass.",
    )


class ListQuery(BaseModel):
    status: list[Status] = Field(default_factory=list, description="Any of these statuses.")
    provider: str | None = Field(default=None, max_length=32)
    created_since: AwareDatetime | None = Field(default=None, description="Inclusive.")
    created_until: AwareDatetime | None = Field(default=None, description="Exclusive.")
    metadata: list[Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,40}:")]] = Field(
        default_factory=list, description="key:value; every one must match."
    )
    tenant: str | None = Field(default=None, description="Admin tokens only: one tenant's jobs.")
    limit: int = Field(default=20, ge=1, le=MAX_PAGE_SIZE)
    cursor: str | None = Field(
        default=None, max_length=200, description="next_cursor of the previous page."
    )


class JobError(BaseModel):
    code: str
    message: str | None


class ResultLink(BaseModel):
    index: int
    url: str = Field(description="This API's link to the image (needs the token).")
    provider_url: str | None = Field(description="The provider's own link; it may expire.")


class Job(BaseModel):
    id: str
    provider: str
    status: Status
    progress: int = Field(ge=0, le=100)
    tenant: str | None
    input: dict[str, Any]
    metadata: dict[str, str]
    idempotency_key: str | None
    error: JobError | None
    results: list[ResultLink]
    priority: int
    waiting_reason: str | None = Field(
        description="Why a queued job is not submitted yet (provider capacity), else null."
    )
    cost: float | None = Field(description="What the job cost, when the provider said.")
    deadline: datetime
    created_at: datetime
    updated_at: datetime
    submitted_at: datetime | None
    completed_at: datetime | None


class JobList(BaseModel):
    data: list[Job]
    next_cursor: str | None


class Event(BaseModel):
    at: datetime
    source: str
    kind: str
    from_status: str | None
    to_status: str | None
    message: str | None


class EventList(BaseModel):
    data: list[Event]


class Problem(BaseModel):
    """An error, as RFC 9457 ``application/problem+json``."""

    model_config = ConfigDict(extra="allow")

    type: str
    title: str
    status: int
    detail: str
    field: str | None = Field(default=None, description="The input at fault (400).")
    job_id: str | None = Field(default=None, description="The job the key first made (409).")
