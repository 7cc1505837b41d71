"""The transition rules of worker/states.py, example by example and as properties."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from worker.states import (
    NO_RESULT,
    TERMINAL_STATUSES,
    UPSTREAM_FAILED,
    EventKind,
    JobStatus,
    Source,
    Transition,
    UpstreamState,
    transition,
)

T0 = datetime(2024, 1, 1, 12, 0, tzinfo=UTC)
NOW = T0 + timedelta(minutes=5)
URLS = ("https://img.test/1.png", "https://img.test/2.png")

Q, S, P = JobStatus.QUEUED, JobStatus.SUBMITTED, JobStatus.PROCESSING
C, F, X = JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED


@dataclass
class FakeJob:
    """The JobLike fields plus every column a transition may write."""

    status: str = "queued"
    progress: int = 0
    upstream_task_id: str | None = None
    submitted_at: datetime | None = None
    updated_at: datetime | None = T0
    completed_at: datetime | None = None
    claim_token: str | None = None
    claimed_until: datetime | None = None
    retry_at: datetime | None = None
    create_started_at: datetime | None = None
    next_poll_at: datetime | None = None
    result_urls: list[str] | None = None
    error_code: str | None = None
    error_message: str | None = None

    def apply(self, result: Transition) -> None:
        for column, value in result.changes.items():
            assert column in COLUMNS, f"transition wrote an unknown column {column!r}"
            setattr(self, column, value)


COLUMNS = {f.name for f in dataclasses.fields(FakeJob)}


def job(status: JobStatus = Q, **fields: Any) -> FakeJob:
    if status is not Q:
        fields.setdefault("submitted_at", T0)
    if status.is_terminal:
        fields.setdefault("completed_at", T0)
    return FakeJob(status=status.value, **fields)


def up(status: JobStatus, source: Source = Source.POLL, **fields: Any) -> UpstreamState:
    if status is C:
        fields.setdefault("image_urls", URLS)
    return UpstreamState(status=status, source=source, **fields)


def assert_ignored(result: Transition, before: JobStatus, update: UpstreamState) -> None:
    assert result.changes == {}
    assert not result.applied
    assert not result.became_terminal
    assert result.event is not None
    assert result.event.kind is EventKind.IGNORED
    assert result.event.from_status is before
    assert result.event.to_status is update.status
    assert result.event.source is update.source
    assert result.event.message


# --- status ranks ---------------------------------------------------------------------


def test_ranks_order_queued_submitted_processing_terminal() -> None:
    assert Q.rank < S.rank < P.rank < C.rank
    assert C.rank == F.rank == X.rank
    assert {C, F, X} == TERMINAL_STATUSES
    assert not any(s.is_terminal for s in (Q, S, P))


# --- forward moves ----------------------------------------------------------------------

FORWARD = [(Q, S), (Q, P), (Q, C), (Q, F), (Q, X), (S, P), (S, C), (S, F), (S, X), (P, C), (P, F)]


@pytest.mark.parametrize(("start", "target"), FORWARD, ids=lambda s: s.value)
def test_forward_move_is_a_transition(start: JobStatus, target: JobStatus) -> None:
    update = up(target, payload={"status": target.value})
    result = transition(job(start), update, NOW)
    assert result.applied
    assert result.changes["status"] == target.value
    assert result.changes["updated_at"] == NOW
    assert result.event is not None
    assert result.event.kind is EventKind.TRANSITION
    assert result.event.from_status is start
    assert result.event.to_status is target
    assert result.event.source is Source.POLL
    assert result.event.payload == {"status": target.value}
    assert result.became_terminal is target.is_terminal


def test_non_terminal_move_leaves_completion_and_poll_schedule_alone() -> None:
    result = transition(job(S, next_poll_at=T0), up(P), NOW)
    assert "completed_at" not in result.changes
    assert "next_poll_at" not in result.changes
    assert "result_urls" not in result.changes
    assert "error_code" not in result.changes


# --- terminal is final ------------------------------------------------------------------


@pytest.mark.parametrize("terminal", sorted(TERMINAL_STATUSES), ids=str)
@pytest.mark.parametrize("update_status", list(JobStatus), ids=str)
def test_terminal_job_never_changes(terminal: JobStatus, update_status: JobStatus) -> None:
    update = up(update_status, Source.WEBHOOK, progress=100, upstream_task_id="t-1")
    result = transition(job(terminal, upstream_task_id="t-1", progress=10), update, NOW)
    assert_ignored(result, terminal, update)
    assert result.event is not None and "already" in (result.event.message or "")


# --- stale and duplicate updates --------------------------------------------------------


@pytest.mark.parametrize(("start", "stale"), [(S, Q), (P, Q), (P, S)], ids=lambda s: s.value)
def test_stale_update_is_ignored_not_an_error(start: JobStatus, stale: JobStatus) -> None:
    update = up(stale, progress=99)
    result = transition(job(start, progress=10), update, NOW)
    assert_ignored(result, start, update)
    assert result.event is not None and "stale" in (result.event.message or "")
    assert not result.event.duplicate


@pytest.mark.parametrize("status", [Q, S, P], ids=str)
def test_duplicate_without_progress_is_ignored(status: JobStatus) -> None:
    update = up(status)
    result = transition(job(status, progress=30), update, NOW)
    assert_ignored(result, status, update)
    assert result.event is not None and "duplicate" in (result.event.message or "")
    assert result.event.duplicate  # pollers may skip recording these


@pytest.mark.parametrize("progress", [0, 29, 30, -5])
def test_duplicate_with_progress_not_higher_is_ignored(progress: int) -> None:
    update = up(P, progress=progress)
    assert_ignored(transition(job(P, progress=30), update, NOW), P, update)


# --- progress ---------------------------------------------------------------------------


def test_higher_progress_in_same_status_is_a_progress_event() -> None:
    update = up(P, Source.WEBHOOK, progress=55, payload={"progress": 55})
    result = transition(job(P, progress=30), update, NOW)
    assert result.changes == {"progress": 55, "updated_at": NOW}
    assert result.event is not None
    assert result.event.kind is EventKind.PROGRESS
    assert result.event.from_status is P and result.event.to_status is P
    assert result.event.payload == {"progress": 55}
    assert not result.event.duplicate
    assert not result.became_terminal


@pytest.mark.parametrize(("given", "stored"), [(150, 100), (101, 100), (10**9, 100)])
def test_progress_is_clamped_to_100(given: int, stored: int) -> None:
    assert transition(job(P, progress=30), up(P, progress=given), NOW).changes["progress"] == stored
    assert transition(job(S), up(P, progress=given), NOW).changes["progress"] == stored


def test_negative_progress_is_clamped_to_zero_and_never_written() -> None:
    result = transition(job(S, progress=0), up(P, progress=-40), NOW)
    assert result.changes["status"] == P.value
    assert "progress" not in result.changes


def test_forward_move_never_lowers_progress() -> None:
    result = transition(job(S, progress=40), up(P, progress=10), NOW)
    assert "progress" not in result.changes
    result = transition(job(S, progress=40), up(P, progress=60), NOW)
    assert result.changes["progress"] == 60


# --- completion and failure -------------------------------------------------------------


def test_completed_sets_results_and_full_progress() -> None:
    result = transition(job(P, progress=40), up(C, image_urls=URLS), NOW)
    assert result.changes["status"] == C.value
    assert result.changes["result_urls"] == list(URLS)
    assert result.changes["progress"] == 100
    assert result.changes["completed_at"] == NOW
    assert result.became_terminal


@pytest.mark.parametrize("start", [Q, S, P], ids=str)
def test_completed_without_images_becomes_failed_no_result(start: JobStatus) -> None:
    result = transition(job(start), up(C, image_urls=()), NOW)
    assert result.changes["status"] == F.value
    assert result.changes["error_code"] == NO_RESULT == "no_result"
    assert result.changes["error_message"]
    assert "result_urls" not in result.changes
    assert result.event is not None
    assert result.event.kind is EventKind.TRANSITION
    assert result.event.to_status is F
    assert result.became_terminal


def test_failed_without_details_gets_default_code_and_message() -> None:
    result = transition(job(P), up(F), NOW)
    assert result.changes["error_code"] == UPSTREAM_FAILED
    assert result.changes["error_message"] == "provider reported failure without a message"
    assert result.event is not None
    assert result.event.message == f"{UPSTREAM_FAILED}: provider reported failure without a message"


def test_failed_keeps_the_providers_code_and_message() -> None:
    result = transition(job(S), up(F, error_code="banned_prompt", error_message="nope"), NOW)
    assert result.changes["error_code"] == "banned_prompt"
    assert result.changes["error_message"] == "nope"
    assert result.event is not None and result.event.message == "banned_prompt: nope"


def test_cancelled_records_the_reason() -> None:
    update = up(X, Source.CANCEL, error_code="cancelled", error_message="by user")
    result = transition(job(S), update, NOW)
    assert result.changes["status"] == X.value
    assert result.changes["error_code"] == "cancelled"
    assert result.changes["error_message"] == "by user"
    assert result.became_terminal


@pytest.mark.parametrize("target", sorted(TERMINAL_STATUSES), ids=str)
def test_terminal_sets_completed_at_and_clears_next_poll(target: JobStatus) -> None:
    result = transition(job(P, next_poll_at=T0), up(target), NOW)
    assert result.changes["completed_at"] == NOW
    assert "next_poll_at" in result.changes
    assert result.changes["next_poll_at"] is None


# --- upstream task ids ------------------------------------------------------------------


def test_update_for_another_upstream_task_is_ignored() -> None:
    update = up(C, Source.WEBHOOK, upstream_task_id="t-other")
    result = transition(job(S, upstream_task_id="t-1"), update, NOW)
    assert_ignored(result, S, update)
    assert result.event is not None and "t-other" in (result.event.message or "")


def test_job_without_task_id_adopts_the_updates() -> None:
    result = transition(job(Q), up(S, Source.SUBMIT, upstream_task_id="t-9"), NOW)
    assert result.changes["upstream_task_id"] == "t-9"


def test_matching_or_missing_task_id_is_accepted_and_not_rewritten() -> None:
    for task_id in ("t-1", None):
        result = transition(job(S, upstream_task_id="t-1"), up(P, upstream_task_id=task_id), NOW)
        assert result.changes["status"] == P.value
        assert "upstream_task_id" not in result.changes


# --- timestamps set once, claims cleared ------------------------------------------------


def test_submitted_at_set_on_first_submission() -> None:
    assert transition(job(Q), up(S, Source.SUBMIT), NOW).changes["submitted_at"] == NOW


@pytest.mark.parametrize("target", [P, C, F], ids=str)
def test_submitted_at_is_not_overwritten(target: JobStatus) -> None:
    result = transition(job(S, submitted_at=T0), up(target), NOW)
    assert "submitted_at" not in result.changes


@pytest.mark.parametrize(
    "update",
    [
        UpstreamState(X, Source.CANCEL, error_code="cancelled", error_message="by request"),
        UpstreamState(F, Source.SUBMIT, error_code="upstream_rejected", error_message="bad key"),
        UpstreamState(F, Source.SWEEP, error_code="timeout", error_message="deadline passed"),
    ],
    ids=["cancelled-while-queued", "rejected-at-submit", "timed-out-while-queued"],
)
def test_job_that_never_reached_the_provider_has_no_submitted_at(update: UpstreamState) -> None:
    # design.md: "submitted = the provider accepted it". A queued job that is
    # cancelled, refused at create, or times out before submission was never
    # accepted upstream, so it must not report a submission time.
    result = transition(job(Q), update, NOW)
    assert result.changes["status"] == update.status.value
    assert "submitted_at" not in result.changes


@pytest.mark.parametrize("target", [S, P, C, F, X], ids=str)
def test_leaving_queued_clears_the_claim(target: JobStatus) -> None:
    start = job(Q, claim_token="tok", claimed_until=NOW, retry_at=NOW)
    changes = transition(start, up(target), NOW).changes
    assert changes["claim_token"] is None
    assert changes["claimed_until"] is None
    assert changes["retry_at"] is None


def test_claim_fields_untouched_after_queued() -> None:
    changes = transition(job(S), up(P), NOW).changes
    assert not {"claim_token", "claimed_until", "retry_at"} & set(changes)


def test_transition_is_pure() -> None:
    start = job(S, upstream_task_id="t-1", progress=10)
    snapshot = dataclasses.replace(start)
    transition(start, up(C, upstream_task_id="t-1"), NOW)
    assert start == snapshot


# --- properties -------------------------------------------------------------------------

TASK_IDS = st.one_of(st.none(), st.sampled_from(["t-1", "t-2"]))
IMAGE_LISTS = st.lists(st.sampled_from((*URLS, "https://img.test/3.png")), max_size=4).map(tuple)
UPDATES = st.builds(
    UpstreamState,
    status=st.sampled_from(list(JobStatus)),
    source=st.sampled_from(list(Source)),
    progress=st.one_of(st.none(), st.integers(min_value=-1000, max_value=1000)),
    image_urls=IMAGE_LISTS,
    error_code=st.one_of(st.none(), st.sampled_from(["boom", "timeout"])),
    error_message=st.one_of(st.none(), st.text(max_size=10)),
    upstream_task_id=TASK_IDS,
)
START = st.builds(
    FakeJob,
    upstream_task_id=TASK_IDS,
    claim_token=st.sampled_from([None, "tok"]),
    claimed_until=st.sampled_from([None, T0]),
    retry_at=st.sampled_from([None, T0]),
    next_poll_at=st.sampled_from([None, T0]),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(start=START, updates=st.lists(UPDATES, max_size=25))
def test_any_sequence_of_updates_keeps_the_invariants(
    start: FakeJob, updates: list[UpstreamState]
) -> None:
    current = dataclasses.replace(start)  # never mutate what hypothesis generated
    submitted_at: datetime | None = None
    for step, update in enumerate(updates):
        now = NOW + timedelta(seconds=step)
        before = dataclasses.replace(current)
        before_status = JobStatus(before.status)

        result = transition(current, update, now)  # never raises

        # Exactly one event per call, describing this update from the old status.
        assert result.event is not None
        assert result.event.source is update.source
        assert result.event.from_status is before_status
        assert (result.event.kind is EventKind.IGNORED) == (not result.changes)

        current.apply(result)
        after_status = JobStatus(current.status)

        if (
            update.upstream_task_id
            and before.upstream_task_id
            and update.upstream_task_id != before.upstream_task_id
        ):
            assert result.changes == {}  # meant for another upstream task
        if before_status.is_terminal:
            assert result.changes == {}
            assert current == before
            continue
        assert after_status.rank >= before_status.rank
        assert before.progress <= current.progress <= 100
        assert current.progress >= 0
        if result.event.kind is EventKind.TRANSITION:
            assert after_status is not before_status
            assert result.event.to_status is after_status
        else:
            assert after_status is before_status
        if after_status is C:
            assert current.result_urls
            assert current.progress == 100
        if after_status is F:
            assert current.error_code
            assert current.error_message
        if after_status.is_terminal:
            assert current.completed_at == now
            assert current.next_poll_at is None
        if after_status is not Q:
            assert current.claim_token is None
            assert current.claimed_until is None
            assert current.retry_at is None
        if before.upstream_task_id is not None:
            assert current.upstream_task_id == before.upstream_task_id
        if submitted_at is not None:
            assert current.submitted_at == submitted_at
        submitted_at = current.submitted_at
