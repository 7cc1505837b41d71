"""The job table and its history (SQLAlchemy 2 typed ORM)."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from worker.status import JobStatus

# Stable constraint names, so Alembic can compare and drop them on every backend.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# None is SQL NULL, never the JSON value null: "no result" reads the same from any path.
JSONType = JSON(none_as_null=True).with_variant(JSONB(none_as_null=True), "postgresql")
EventId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on every backend (SQLite stores them naive)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


STATUS_VALUES = ", ".join(f"'{s.value}'" for s in JobStatus)
DUE_CONDITION = text("status IN ('submitted', 'processing') AND upstream_task_id IS NOT NULL")


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(f"status IN ({STATUS_VALUES})", name="status_known"),
        CheckConstraint("progress BETWEEN 0 AND 100", name="progress_range"),
        UniqueConstraint("provider", "upstream_task_id"),
        Index("ix_jobs_status_next_poll_at", "status", "next_poll_at"),
        # Beat's hot query (polling.lease_due): in-flight jobs, oldest next poll
        # first. Partial, so a lease reads 500 index entries instead of sorting
        # every in-flight job (which made a cycle O(N^2)).
        Index(
            "ix_jobs_due",
            "next_poll_at",
            postgresql_where=DUE_CONDITION,
            sqlite_where=DUE_CONDITION,
        ),
        Index("ix_jobs_status_created_at", "status", "created_at"),
        # A tenant's jobs, newest first (the HTTP API's listing).
        Index("ix_jobs_tenant_created_at", "tenant", "created_at"),
        # Idempotency keys are per tenant (no tenant counts as one): the database,
        # not a read before the insert, decides between concurrent duplicates.
        Index(
            "uq_jobs_tenant_idempotency_key",
            func.coalesce(text("tenant"), ""),
            "idempotency_key",
            unique=True,
        ),
        # Finding a job by its key alone (the dashboard's search).
        Index("ix_jobs_idempotency_key", "idempotency_key"),
        # A provider's jobs by status: its queue and what its accounts hold in flight.
        Index("ix_jobs_provider_status_account", "provider", "status", "account"),
        # The sweep's overdue query.
        Index("ix_jobs_status_deadline", "status", "deadline"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    provider: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.QUEUED.value)
    params: Mapped[dict[str, Any]] = mapped_column(JSONType)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    # SHA-256 of the request that created the job (api.request_fingerprint): a replay
    # with the same key is the same request only if this matches.
    request_hash: Mapped[str | None] = mapped_column(String(64))

    upstream_task_id: Mapped[str | None] = mapped_column(String(255))
    poll_url: Mapped[str | None] = mapped_column(String(2048))
    webhook_secret_hash: Mapped[str | None] = mapped_column(String(64))
    result_urls: Mapped[list[str] | None] = mapped_column(JSONType)
    progress: Mapped[int] = mapped_column(Integer, default=0)
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)

    # Submitting: a claim (token + expiry) makes one worker the submitter.
    submit_attempts: Mapped[int] = mapped_column(Integer, default=0)
    claim_token: Mapped[str | None] = mapped_column(String(32))
    claimed_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # Set (and committed) just before the create call, cleared when its outcome
    # is known: a claim that expires with this set may have created a paid task.
    create_started_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    retry_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    # Polling.
    poll_attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_poll_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    last_webhook_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    deadline: Mapped[datetime] = mapped_column(UTCDateTime)

    # After the end: archived copies of the results and telling the application.
    archived_urls: Mapped[list[str] | None] = mapped_column(JSONType)
    notify_url: Mapped[str | None] = mapped_column(String(2048))
    on_complete_task: Mapped[str | None] = mapped_column(String(255))
    # Whose job it is (an API token's tenant; None: submitted in-process without one).
    tenant: Mapped[str | None] = mapped_column(String(64))
    # The application's own labels ({str: str}, bounded by validation.metadata).
    job_metadata: Mapped[dict[str, str] | None] = mapped_column(JSONType)
    # Provider capacity (worker/capacity.py): the account the job is bound to from its
    # first admission (its polls and cancels use that key), its place in the
    # provider's queue (higher first, then oldest), why it waits, and what it cost.
    account: Mapped[str | None] = mapped_column(String(32))
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    waiting_reason: Mapped[str | None] = mapped_column(String(255))
    # When a free slot last woke the waiting job (its submit is on its way): every
    # job's end reads the head of the line, and must not send it again meanwhile.
    woken_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    cost: Mapped[float | None] = mapped_column(Float)
    notified_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    on_complete_sent_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    finalized_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow, onupdate=utcnow)
    submitted_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    completed_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    events: Mapped[list[JobEvent]] = relationship(
        back_populates="job", order_by="JobEvent.id", cascade="all, delete-orphan"
    )

    @property
    def is_terminal(self) -> bool:
        return JobStatus(self.status).is_terminal

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.provider} {self.status}>"


class JobInput(Base):
    """Image bytes given to submit_variation: stored with the job, never in a broker message."""

    __tablename__ = "job_inputs"

    job_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    content: Mapped[bytes] = mapped_column(LargeBinary)
    filename: Mapped[str] = mapped_column(String(255))
    content_type: Mapped[str] = mapped_column(String(64))


class JobEvent(Base):
    __tablename__ = "job_events"
    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)

    id: Mapped[int] = mapped_column(EventId, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(Uuid, ForeignKey("jobs.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    source: Mapped[str] = mapped_column(String(16))
    kind: Mapped[str] = mapped_column(String(16))
    from_status: Mapped[str | None] = mapped_column(String(16))
    to_status: Mapped[str | None] = mapped_column(String(16))
    message: Mapped[str | None] = mapped_column(Text)
    payload: Mapped[dict[str, Any] | None] = mapped_column(JSONType)

    job: Mapped[Job] = relationship(back_populates="events")

    def __repr__(self) -> str:
        return f"<JobEvent {self.source} {self.kind} {self.from_status}->{self.to_status}>"


class AccountState(Base):
    """What variflow learned of a provider account's health (worker/capacity.py):
    a pause (the provider answered 429), the circuit breaker, and the next time a
    create or a request may be sent under the account's per-minute rates.

    Slots and daily budgets are not kept here: they are counted from job rows,
    so a dead worker cannot leak them.
    """

    __tablename__ = "account_states"

    provider: Mapped[str] = mapped_column(String(32), primary_key=True)
    account: Mapped[str] = mapped_column(String(32), primary_key=True)
    paused_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    pause_reason: Mapped[str | None] = mapped_column(String(255))
    # Transient failures in a row; at the threshold the breaker opens until opened_until.
    failures: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    opened_until: Mapped[datetime | None] = mapped_column(UTCDateTime)
    # The one job let through after the cool-down (half open); its outcome decides.
    probe_job_id: Mapped[uuid.UUID | None] = mapped_column(Uuid)
    # Rates as GCRA: the earliest time the next create / request may go.
    next_create_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    next_request_at: Mapped[datetime | None] = mapped_column(UTCDateTime)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


class ApiToken(Base):
    """A bearer token of the HTTP API: only the SHA-256 of its secret is kept.

    A token acts for its ``tenant`` (whose jobs it sees); an ``admin`` token sees
    every tenant's. Named so that an operator can list and revoke it.
    """

    __tablename__ = "api_tokens"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    tenant: Mapped[str] = mapped_column(String(64))
    secret_hash: Mapped[str] = mapped_column(String(64), unique=True)
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime)

    def __repr__(self) -> str:
        return f"<ApiToken {self.name} tenant={self.tenant}{' admin' if self.admin else ''}>"


class BeatLease(Base):
    """Which beat leads (worker/beat.py): one row per lease, held by one beat until
    ``expires_at`` and renewed by it every third of its time to live."""

    __tablename__ = "beat_leases"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    holder: Mapped[str] = mapped_column(String(255))
    acquired_at: Mapped[datetime] = mapped_column(UTCDateTime)
    renewed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    expires_at: Mapped[datetime] = mapped_column(UTCDateTime)


class BeatEntry(Base):
    """The last period a scheduled entry was sent for (worker/beat.py): a send is
    claimed by moving ``last_period`` forward, so no period is sent twice."""

    __tablename__ = "beat_entries"

    entry: Mapped[str] = mapped_column(String(200), primary_key=True)
    # The start of the period (a multiple of the entry's interval since the epoch).
    last_period: Mapped[datetime] = mapped_column(UTCDateTime)
    claimed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    claimed_by: Mapped[str] = mapped_column(String(255))
