"""Helpers of the webhook hardening tests: PiAPI bodies as raw JSON text, jobs inserted
with a known secret, and a byte-for-byte picture of a job's row and events."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import Any

from sqlalchemy import select, text

from worker.models import Job, JobEvent, utcnow
from worker.runtime import session_scope
from worker.webhook_secrets import hash_secret

SECRET = "s3cret-of-the-job"
GLOBAL_SECRET = "gl0bal-s3cret"
HEADER = "x-webhook-secret"
URL = "https://cdn.piapi.test/1.png"

# Written in a body where raw JSON text is wanted (NaN, 1e400, ...): see raw_json.
_RAW = "@@raw:{}@@"


def raw(token: str) -> str:
    """A placeholder that raw_json() writes as ``token`` itself, unquoted (e.g. ``NaN``)."""
    return _RAW.format(token)


def raw_json(value: Any) -> str:
    """``value`` as JSON text: strings escaped with ``\\uXXXX`` (so a NUL is ``\\u0000``
    and a lone surrogate ``\\ud800``), placeholders of raw() written as their token."""
    written = json.dumps(value, ensure_ascii=True)
    while '"@@raw:' in written:
        start = written.index('"@@raw:')
        end = written.index('@@"', start + 7)
        written = written[:start] + written[start + 7 : end] + written[end + 3 :]
    return written


def envelope(
    status: Any = "processing",
    task_id: Any = "t-1",
    progress: Any = 0,
    image_urls: Any = None,
    error_message: Any = "",
) -> dict[str, Any]:
    """A PiAPI webhook body: {"timestamp", "data": <the task envelope's data>}."""
    return {
        "timestamp": 1_700_000_000,
        "data": {
            "task_id": task_id,
            "model": "midjourney",
            "task_type": "variation",
            "status": status,
            "output": {
                "image_url": "",
                "image_urls": image_urls,
                "temporary_image_urls": None,
                "progress": progress,
            },
            "error": {"code": 0, "raw_message": "", "message": error_message},
        },
    }


def insert_job(**fields: Any) -> uuid.UUID:
    """A PiAPI job (submitted, following task t-1, secret SECRET unless told otherwise)."""
    now = utcnow()
    values: dict[str, Any] = {
        "id": uuid.uuid4(),
        "provider": "piapi",
        "status": "submitted",
        "params": {"origin_task_id": "o-1", "index": "1", "prompt": "a cat"},
        "upstream_task_id": "t-1",
        "webhook_secret_hash": hash_secret(SECRET),
        "deadline": now + timedelta(hours=1),
        "created_at": now,
        "updated_at": now,
        "submitted_at": now,
        "next_poll_at": now + timedelta(minutes=2),
        "progress": 0,
    }
    values.update(fields)
    with session_scope() as session:
        session.add(Job(**values))
    job_id: uuid.UUID = values["id"]
    return job_id


def picture(job_id: uuid.UUID) -> tuple[str, ...]:
    """The job's row and its events as the database holds them (PostgreSQL: the text of
    each row; SQLite: the raw column values), to compare byte for byte."""
    with session_scope() as session:
        if session.get_bind().dialect.name == "postgresql":
            found = session.execute(
                text(
                    "SELECT j::text, (SELECT coalesce(string_agg(e::text, E'\\n' ORDER BY e.id),"
                    " '') FROM job_events e WHERE e.job_id = j.id) FROM jobs j WHERE j.id = :id"
                ),
                {"id": job_id},
            ).one()
            return (found[0], found[1])
        job = session.execute(select(Job.__table__).where(Job.id == job_id)).one()
        events = session.execute(
            select(JobEvent.__table__).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
        ).all()
        return (repr(tuple(job)), *(repr(tuple(e)) for e in events))


def row(job_id: uuid.UUID) -> Job:
    with session_scope() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def events(job_id: uuid.UUID) -> list[JobEvent]:
    with session_scope() as session:
        return list(
            session.scalars(select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id))
        )
