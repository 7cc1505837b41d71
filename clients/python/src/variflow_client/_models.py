"""The API's objects as frozen dataclasses, parsed from its JSON.

Parsing tolerates fields it does not know (a newer server may add some) but not a known
field of the wrong type: that is :class:`InvalidResponse`, rather than a wrong value
surfacing later. The whole object stays available as ``raw``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from variflow_client._errors import InvalidResponse

TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})


@dataclass(frozen=True)
class JobError:
    code: str
    message: str


@dataclass(frozen=True)
class Result:
    index: int
    url: str  # this API's link (needs the token): see jobs.download
    provider_url: str | None  # the provider's own link, when it gave one (it may expire)


@dataclass(frozen=True)
class Job:
    id: str
    provider: str
    status: str  # queued, submitted, processing, completed, failed or cancelled
    progress: int
    tenant: str | None
    input: dict[str, Any]
    metadata: dict[str, str]
    idempotency_key: str | None
    error: JobError | None
    results: list[Result]
    deadline: datetime | None
    created_at: datetime
    updated_at: datetime
    submitted_at: datetime | None
    completed_at: datetime | None
    priority: int = 0
    # Why a queued job is not submitted yet (its provider's capacity), else None.
    waiting_reason: str | None = None
    cost: float | None = None  # what it cost, when the provider said
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    @classmethod
    def from_json(cls, data: object) -> Job:
        obj = _object(data, "job")
        error = obj.get("error")
        return cls(
            id=_str(obj, "id"),
            provider=_str(obj, "provider"),
            status=_str(obj, "status"),
            progress=_int(obj, "progress", default=0),
            tenant=_opt_str(obj, "tenant"),
            # null or absent reads as empty: "no metadata" and "no results yet" alike.
            input=dict(_object(_given(obj, "input", {}), "input")),
            metadata=_str_map(_given(obj, "metadata", {}), "metadata"),
            idempotency_key=_opt_str(obj, "idempotency_key"),
            error=None if error is None else _job_error(error),
            results=[_result(r) for r in _list(_given(obj, "results", []), "results")],
            deadline=_opt_time(obj, "deadline"),
            created_at=_time(obj, "created_at"),
            updated_at=_time(obj, "updated_at"),
            submitted_at=_opt_time(obj, "submitted_at"),
            completed_at=_opt_time(obj, "completed_at"),
            priority=_int(obj, "priority", default=0),
            waiting_reason=_opt_str(obj, "waiting_reason"),
            cost=_opt_number(obj, "cost"),
            raw=dict(obj),
        )


@dataclass(frozen=True)
class Event:
    at: datetime
    source: str
    kind: str
    from_status: str | None
    to_status: str | None
    message: str | None

    @classmethod
    def from_json(cls, data: object) -> Event:
        obj = _object(data, "event")
        return cls(
            at=_time(obj, "at"),
            source=_str(obj, "source"),
            kind=_str(obj, "kind"),
            from_status=_opt_str(obj, "from_status"),
            to_status=_opt_str(obj, "to_status"),
            message=_opt_str(obj, "message"),
        )


@dataclass(frozen=True)
class Page:
    """One answer of GET /v1/jobs."""

    jobs: list[Job]
    next_cursor: str | None

    @classmethod
    def from_json(cls, data: object) -> Page:
        obj = _object(data, "page")
        return cls(
            jobs=[Job.from_json(j) for j in _list(obj.get("data"), "data")],
            next_cursor=_opt_str(obj, "next_cursor"),
        )


def events_from_json(data: object) -> list[Event]:
    """The answer of GET /v1/jobs/{id}/events."""
    return [Event.from_json(e) for e in _list(_object(data, "events").get("data"), "data")]


def _job_error(data: object) -> JobError:
    obj = _object(data, "error")
    return JobError(code=_str(obj, "code"), message=_opt_str(obj, "message") or "")


def _result(data: object) -> Result:
    obj = _object(data, "result")
    return Result(
        index=_int(obj, "index"), url=_str(obj, "url"), provider_url=_opt_str(obj, "provider_url")
    )


def _wrong(name: str, expected: str, value: object) -> InvalidResponse:
    return InvalidResponse(f"{name}: expected {expected}, got {type(value).__name__}")


def _object(value: object, name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise _wrong(name, "an object", value)
    return value


def _list(value: object, name: str) -> list[Any]:
    if not isinstance(value, list):
        raise _wrong(name, "a list", value)
    return value


def _given(obj: Mapping[str, Any], name: str, empty: object) -> object:
    value = obj.get(name)
    return empty if value is None else value


def _str(obj: Mapping[str, Any], name: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str):
        raise _wrong(name, "a string", value)
    return value


def _opt_str(obj: Mapping[str, Any], name: str) -> str | None:
    value = obj.get(name)
    return None if value is None else _str(obj, name)


def _int(obj: Mapping[str, Any], name: str, default: int | None = None) -> int:
    value = obj.get(name, default)
    # bool is an int to Python, not to JSON.
    if not isinstance(value, int) or isinstance(value, bool):
        raise _wrong(name, "an integer", value)
    return value


def _str_map(value: object, name: str) -> dict[str, str]:
    obj = _object(value, name)
    for key, item in obj.items():
        if not isinstance(item, str):
            raise _wrong(f"{name}.{key}", "a string", item)
    return dict(obj)


def _time(obj: Mapping[str, Any], name: str) -> datetime:
    text = _str(obj, name)
    try:
        return datetime.fromisoformat(text)  # RFC 3339, "Z" included (Python 3.11+)
    except ValueError:
        raise InvalidResponse(f"{name}: {text!r} is not an RFC 3339 timestamp") from None


def _opt_time(obj: Mapping[str, Any], name: str) -> datetime | None:
    return None if obj.get(name) is None else _time(obj, name)


def _opt_number(obj: Mapping[str, Any], key: str) -> float | None:
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidResponse(f"{key}: expected a number, got {type(value).__name__}")
    return float(value)
