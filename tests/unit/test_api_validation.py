"""The application API (worker/api.py) on the embedded SQLite default."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

from worker import JobNotFound, cancel_job, get_job, submit_variation, wait
from worker.api import JobInfo
from worker.errors import IdempotencyConflict, InvalidInput
from worker.models import Job, JobEvent
from worker.runtime import session_scope
from worker.states import JobStatus

pytestmark = pytest.mark.usefixtures("sqlite_url")

VALID: dict[str, Any] = {"origin_task_id": "o-1", "index": "1", "prompt": "a red fox"}


def counts() -> tuple[int, int]:
    with session_scope() as session:
        jobs = session.scalar(select(func.count()).select_from(Job))
        events = session.scalar(select(func.count()).select_from(JobEvent))
    return int(jobs or 0), int(events or 0)


def submit(**kw: Any) -> JobInfo:
    return submit_variation("piapi", **{**VALID, **kw})


# --- a good submission ------------------------------------------------------------------


def test_submit_stores_a_queued_job_with_its_event() -> None:
    before = datetime.now(UTC)
    job = submit_variation("piapi", origin_task_id=" o-1 ", index=2, prompt="a red fox")
    assert job.status is JobStatus.QUEUED
    assert job.provider == "piapi"
    assert job.params == {"origin_task_id": "o-1", "index": "2", "prompt": "a red fox"}
    assert job.progress == 0
    assert job.result_urls == []
    assert job.upstream_task_id is None
    assert job.submitted_at is None and job.completed_at is None
    # Default deadline: an hour from now.
    assert before + timedelta(minutes=59) < job.deadline <= datetime.now(UTC) + timedelta(hours=1)
    assert [(e.source, e.kind, e.from_status, e.to_status) for e in job.events] == [
        ("api", "transition", None, "queued")
    ]
    assert counts() == (1, 1)
    assert get_job(job.id) == job
    assert get_job(str(job.id)) == job


@pytest.mark.parametrize(
    "deadline",
    # The datetime form is built when the test runs, not at collection time:
    # other tests may run for minutes in between.
    [timedelta(minutes=5), 300, 300.5, "aware-datetime"],
    ids=["timedelta", "int", "float", "datetime"],
)
def test_deadline_forms(deadline: Any) -> None:
    if deadline == "aware-datetime":
        deadline = datetime.now(UTC) + timedelta(minutes=5)
    job = submit(deadline=deadline)
    remaining = job.deadline - datetime.now(UTC)
    assert timedelta(minutes=4) < remaining <= timedelta(minutes=5, seconds=1)


# --- bad input: ValueError naming the field, nothing stored -----------------------------

BAD_INPUT: list[tuple[Any, dict[str, Any], str]] = [
    ("nope", VALID, "provider"),
    ("", VALID, "provider"),
    ("PIAPI", VALID, "provider"),
    (None, VALID, "provider"),
    ("piapi", {"index": "1", "prompt": "p"}, "origin_task_id"),
    ("piapi", {**VALID, "origin_task_id": "  "}, "origin_task_id"),
    ("piapi", {**VALID, "origin_task_id": 7}, "origin_task_id"),
    ("piapi", {"origin_task_id": "o", "prompt": "p"}, "index"),
    ("piapi", {**VALID, "index": "9"}, "index"),
    ("piapi", {**VALID, "index": True}, "index"),
    ("piapi", {"origin_task_id": "o", "index": "1"}, "prompt"),
    ("piapi", {**VALID, "prompt": ""}, "prompt"),
    ("piapi", {**VALID, "aspect_ratio": "wide"}, "aspect_ratio"),
    ("piapi", {**VALID, "skip_prompt_check": "yes"}, "skip_prompt_check"),
    ("piapi", {**VALID, "service_mode": "turbo"}, "service_mode"),
    ("piapi", {**VALID, "seed": 1}, "seed"),
    ("piapi", {**VALID, "image": b"\x89PNG\r\n\x1a\n" + b"0" * 64}, "image"),
    ("piapi", {**VALID, "image": "https://img.test/in.png"}, "image"),
    ("piapi", {**VALID, "image_url": "https://img.test/in.png"}, "image"),
    ("piapi", {**VALID, "image": "/no/such/file.png"}, "image"),
    ("piapi", {**VALID, "idempotency_key": ""}, "idempotency_key"),
    ("piapi", {**VALID, "idempotency_key": "k" * 256}, "idempotency_key"),
    ("piapi", {**VALID, "idempotency_key": 42}, "idempotency_key"),
    ("piapi", {**VALID, "deadline": datetime.now(UTC) - timedelta(seconds=1)}, "deadline"),
    ("piapi", {**VALID, "deadline": datetime(2099, 1, 1)}, "deadline"),  # naive
    ("piapi", {**VALID, "deadline": timedelta(0)}, "deadline"),
    ("piapi", {**VALID, "deadline": timedelta(seconds=-5)}, "deadline"),
    ("piapi", {**VALID, "deadline": -1}, "deadline"),
    ("piapi", {**VALID, "deadline": 0}, "deadline"),
    ("piapi", {**VALID, "deadline": "tomorrow"}, "deadline"),
    ("piapi", {**VALID, "deadline": True}, "deadline"),
]


@pytest.mark.parametrize(
    ("provider", "params", "field"),
    BAD_INPUT,
    ids=[f"{field}-{i}" for i, (_p, _k, field) in enumerate(BAD_INPUT)],
)
def test_bad_input_names_the_field_and_stores_nothing(
    provider: Any, params: dict[str, Any], field: str
) -> None:
    submit(idempotency_key="existing")  # a row already there must stay the only one
    before = counts()
    with pytest.raises(ValueError) as info:
        submit_variation(provider, **params)
    assert str(info.value).startswith(f"{field}:"), str(info.value)
    assert counts() == before


@pytest.mark.parametrize(
    "deadline",
    [float("inf"), float("nan"), 1e20, timedelta(days=999_999_999)],
    ids=["inf", "nan", "huge-number", "huge-timedelta"],
)
def test_absurd_deadline_is_a_value_error_naming_deadline(deadline: Any) -> None:
    # The promise is "a clear ValueError naming the field": a number or timedelta
    # that cannot become a datetime must not escape as OverflowError or as a
    # ValueError about float conversion.
    before = counts()
    with pytest.raises(ValueError, match=r"^deadline:"):
        submit(deadline=deadline)
    assert counts() == before


def test_disabled_provider_is_refused(configure: Any) -> None:
    configure(providers="lemondata")
    with pytest.raises(ValueError, match=r"^provider:.*not enabled"):
        submit()
    assert counts() == (0, 0)


# --- idempotency ------------------------------------------------------------------------


def test_idempotency_key_returns_the_first_job() -> None:
    first = submit(idempotency_key="order-42")
    assert counts() == (1, 1)
    again = submit(idempotency_key="order-42")
    assert again.id == first.id
    assert again.idempotency_key == "order-42"
    # Same request in another spelling (int index, padded id) is the same request.
    third = submit_variation(
        "piapi", origin_task_id=" o-1", index=1, prompt="a red fox", idempotency_key="order-42"
    )
    assert third.id == first.id
    assert counts() == (1, 1)


def test_idempotency_key_ignores_a_different_deadline() -> None:
    first = submit(idempotency_key="order-43", deadline=600)
    assert submit(idempotency_key="order-43", deadline=1200).id == first.id
    assert counts() == (1, 1)


@pytest.mark.parametrize(
    "change",
    [{"prompt": "a blue fox"}, {"index": "2"}, {"aspect_ratio": "16:9"}],
    ids=["prompt", "index", "extra-param"],
)
def test_idempotency_key_with_different_params_is_refused(change: dict[str, Any]) -> None:
    first = submit(idempotency_key="order-44")
    before = counts()
    with pytest.raises(ValueError) as info:
        submit(idempotency_key="order-44", **change)
    assert str(info.value).startswith("idempotency_key:")
    assert str(first.id) in str(info.value)
    assert counts() == before


def test_jobs_without_a_key_are_distinct() -> None:
    assert submit().id != submit().id
    assert counts() == (2, 2)


# --- cancel, get, wait ------------------------------------------------------------------


def test_cancel_queued_job() -> None:
    job = submit()
    cancelled = cancel_job(job.id, reason="changed my mind")
    assert cancelled.status is JobStatus.CANCELLED
    assert cancelled.is_terminal
    assert cancelled.error_code == "cancelled"
    assert cancelled.error_message == "changed my mind"
    assert cancelled.completed_at is not None
    last = cancelled.events[-1]
    assert (last.source, last.kind, last.from_status, last.to_status) == (
        "cancel",
        "transition",
        "queued",
        "cancelled",
    )
    assert len(cancelled.events) == 2
    assert get_job(job.id).status is JobStatus.CANCELLED


def test_cancelled_queued_job_was_never_submitted() -> None:
    # submitted_at means "the provider accepted it" (design.md, Job states).
    assert cancel_job(submit().id).submitted_at is None


def test_cancel_terminal_job_changes_nothing_but_is_recorded() -> None:
    job = cancel_job(submit().id, reason="first")
    again = cancel_job(str(job.id), reason="second")
    assert again.status is JobStatus.CANCELLED
    assert again.error_message == "first"
    assert again.completed_at == job.completed_at
    assert len(again.events) == len(job.events) + 1
    assert again.events[-1].kind == "ignored"


@pytest.mark.parametrize("job_id", [uuid.uuid4(), str(uuid.uuid4()), "not-a-uuid", ""])
def test_unknown_job_is_job_not_found(job_id: Any) -> None:
    with pytest.raises(JobNotFound):
        get_job(job_id)
    with pytest.raises(JobNotFound):
        cancel_job(job_id)
    with pytest.raises(JobNotFound):
        wait(job_id, timeout=0)
    assert isinstance(JobNotFound("x"), LookupError)


def test_wait_returns_a_terminal_job_at_once() -> None:
    job = cancel_job(submit().id)
    # timeout=0: anything but an immediate answer would be a TimeoutError.
    assert wait(job.id, timeout=0) == job


def test_wait_on_a_queued_job_times_out() -> None:
    job = submit()
    with pytest.raises(TimeoutError) as info:
        wait(job.id, timeout=0.05, interval=0.01)
    assert str(job.id) in str(info.value)
    assert "queued" in str(info.value)
    assert get_job(job.id).status is JobStatus.QUEUED


# --- tenants -------------------------------------------------------------------------------


def test_a_job_may_name_its_tenant() -> None:
    job = submit(tenant="shop")
    assert job.tenant == "shop"
    assert get_job(job.id).tenant == "shop"
    assert submit().tenant is None  # in-process, without a tenant


@pytest.mark.parametrize("tenant", ["", "-lead", "has space", "x" * 65, "t\x00", 7])
def test_a_bad_tenant_names_the_field_and_stores_nothing(tenant: Any) -> None:
    with pytest.raises(ValueError) as info:
        submit(tenant=tenant)
    assert str(info.value).startswith("tenant:")
    assert counts() == (0, 0)


def test_idempotency_keys_are_per_tenant() -> None:
    # Another tenant's key is not a conflict (that would tell it the key exists):
    # it is its own job.
    first = submit(idempotency_key="order-45", tenant="shop")
    assert submit(idempotency_key="order-45", tenant="shop").id == first.id
    other = submit(idempotency_key="order-45", tenant="other")
    untenanted = submit(idempotency_key="order-45")
    assert len({first.id, other.id, untenanted.id}) == 3
    assert submit(idempotency_key="order-45").id == untenanted.id
    assert counts() == (3, 3)


def test_the_same_key_for_a_different_request_names_the_first_job() -> None:
    first = submit(idempotency_key="order-46", tenant="shop", metadata={"order": "46"})
    with pytest.raises(IdempotencyConflict) as info:
        submit(idempotency_key="order-46", tenant="shop", metadata={"order": "47"})
    assert info.value.job_id == first.id
    assert info.value.field == "idempotency_key"
    assert str(first.id) in str(info.value)
    assert counts() == (1, 1)


@pytest.mark.parametrize(
    ("labels", "field"),
    [
        ("order=1", "metadata"),
        ({"": "x"}, "metadata"),
        ({"a b": "x"}, "metadata"),
        ({"k" * 41: "x"}, "metadata"),
        ({f"k{i}": "x" for i in range(17)}, "metadata"),
        ({"order": 1}, "metadata.order"),
        ({"order": "x" * 501}, "metadata.order"),
        ({"order": "nul\x00"}, "metadata.order"),
    ],
)
def test_bad_metadata_names_the_field_and_stores_nothing(labels: object, field: str) -> None:
    with pytest.raises(InvalidInput) as info:
        submit(metadata=labels)
    assert info.value.field == field
    assert counts() == (0, 0)
