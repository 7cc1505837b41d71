"""Beat's leadership and its scheduled sends, decided in the database.

Any number of beat processes may run. One leads: it holds the lease row
(:func:`hold_lease`) and renews it every third of its time to live; the others
stand by and take the lease once it has expired. A lease alone cannot stop two
beats from both believing they lead for a moment (a leader paused past its
lease wakes up and sends before it checks again), so each send of a scheduled
entry is first claimed for its period (:func:`claim_period`): an entry's row
holds the last period sent, which only moves forward, so exactly one claimer
wins each period whatever each beat believes.

Both are one ``INSERT ... ON CONFLICT DO UPDATE ... WHERE ... RETURNING``
statement, on PostgreSQL and SQLite alike: the row is created or updated only
when the condition holds, atomically, with no read before the write for two
beats to race between; a returned row means "won". Times are the caller's
(UTC): the hosts' clocks are assumed synchronized (NTP), and a skew shifts
when a standby takes over, never whether a period is sent twice.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from datetime import UTC, datetime, timedelta

from sqlalchemy import case, delete, or_, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from worker.db import is_postgres
from worker.models import BeatEntry, BeatLease

LEASE = "beat"  # one lease per database: every beat of a deployment competes for it


def hold_lease(session: Session, holder: str, now: datetime, ttl: float, name: str = LEASE) -> bool:
    """Take or renew the lease for ``ttl`` seconds from ``now``: True when ``holder``
    holds it now (it did and renewed it, it was free, or it had expired)."""
    insert = pg_insert if is_postgres(session) else sqlite_insert
    statement = insert(BeatLease).values(
        name=name,
        holder=holder,
        acquired_at=now,
        renewed_at=now,
        expires_at=now + timedelta(seconds=ttl),
    )
    new = statement.excluded
    renewing = BeatLease.holder == new.holder
    return (
        session.execute(
            statement.on_conflict_do_update(
                index_elements=[BeatLease.name],
                set_={
                    "holder": new.holder,
                    "acquired_at": case((renewing, BeatLease.acquired_at), else_=new.acquired_at),
                    "renewed_at": new.renewed_at,
                    "expires_at": new.expires_at,
                },
                where=or_(renewing, BeatLease.expires_at <= new.renewed_at),
            ).returning(BeatLease.name)
        ).first()
        is not None
    )


def release_lease(session: Session, holder: str, now: datetime, name: str = LEASE) -> bool:
    """Let the lease expire now, if ``holder`` holds it (a beat stopping cleanly), so a
    standby takes it at its next check instead of waiting out the time to live."""
    released = session.execute(
        update(BeatLease)
        .where(BeatLease.name == name, BeatLease.holder == holder)
        .values(expires_at=now)
    )
    return bool(released.rowcount)  # type: ignore[attr-defined]


def lease_holder(session: Session, name: str = LEASE) -> str | None:
    """Who holds (or last held) the lease: for log lines and operators."""
    return session.scalar(select(BeatLease.holder).where(BeatLease.name == name))


def claim_period(
    session: Session, entry: str, period: datetime, holder: str, now: datetime
) -> bool:
    """Claim the send of ``entry`` for the period starting at ``period``: True for
    exactly one claimer of each period, and for none of an earlier period."""
    insert = pg_insert if is_postgres(session) else sqlite_insert
    statement = insert(BeatEntry).values(
        entry=entry, last_period=period, claimed_at=now, claimed_by=holder
    )
    new = statement.excluded
    return (
        session.execute(
            statement.on_conflict_do_update(
                index_elements=[BeatEntry.entry],
                set_={
                    "last_period": new.last_period,
                    "claimed_at": new.claimed_at,
                    "claimed_by": new.claimed_by,
                },
                where=BeatEntry.last_period < new.last_period,
            ).returning(BeatEntry.entry)
        ).first()
        is not None
    )


def forget_entries(session: Session, keep: Collection[str]) -> int:
    """Delete the rows of entries no longer scheduled: the table holds one row per
    scheduled entry, however long beat runs."""
    forgotten = session.execute(delete(BeatEntry).where(BeatEntry.entry.not_in(list(keep))))
    return int(forgotten.rowcount)  # type: ignore[attr-defined]


def period_at(timestamp: float, interval: float) -> tuple[datetime, float]:
    """The period of an entry run every ``interval`` seconds that contains ``timestamp``
    (seconds since the epoch): its start, and the seconds until the next one starts.

    Periods are aligned on the epoch, not on when a beat started, so every beat names
    a period the same way: ``poll-due`` every 2 s runs at :00, :02, :04, ...
    """
    index = math.floor(timestamp / interval)
    start = index * interval
    # Never 0: float rounding must not make a beat spin on a boundary.
    return datetime.fromtimestamp(start, UTC), max(start + interval - timestamp, 0.001)
