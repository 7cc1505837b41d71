"""One beat process's side of the lease (worker/beat.py): when it checks it, whether
it leads, what it logs, and the liveness record its health check reads.

A beat checks the lease every third of its time to live (``VARIFLOW_BEAT_LEASE_TTL``),
at a fixed rate: the leader renews it, a standby takes it once it has expired. So
when a leader dies, the lease it last renewed expires at most ``ttl`` later and a
standby takes it at its next check, at most ``ttl / 3`` after that: scheduled sends
stop for at most ``4/3 * ttl`` (40 s by default), plus a database round trip.

A leader whose renewals fail (the database is away) keeps sending only until its
lease would have expired: by then a standby may have taken it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import socket
import tempfile
import time
from collections.abc import Callable, Collection
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

from worker import beat
from worker.db import Database

log = logging.getLogger(__name__)

Clock = Callable[[], float]


def new_beat_id() -> str:
    """This beat's name in the lease: host and pid say where it runs; the random part
    keeps a restarted container (same host name, pid 1 again) from passing for its
    predecessor."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def liveness_file(home: Path, host: str | None = None) -> Path:
    """Where the beat of ``host`` (this one by default) records its checks: per host, so
    that containers sharing a VARIFLOW_HOME volume each report their own beat."""
    return home.resolve() / "beat" / f"{host or socket.gethostname()}.json"


@dataclass(frozen=True)
class Liveness:
    """A beat's last successful lease check, written after each one."""

    beat_id: str
    leading: bool
    checked_at: float  # seconds since the epoch
    ttl: float

    def write(self, path: Path) -> None:
        # Write then rename: a health check never reads half a record.
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".beat-", suffix=".tmp")
        with os.fdopen(fd, "w") as out:
            json.dump(asdict(self), out)
        Path(temporary).replace(path)

    @classmethod
    def read(cls, path: Path) -> Liveness | None:
        """The record at ``path``; None when there is none (or it is not one)."""
        try:
            values = json.loads(path.read_text())
            return cls(
                beat_id=str(values["beat_id"]),
                leading=bool(values["leading"]),
                checked_at=float(values["checked_at"]),
                ttl=float(values["ttl"]),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None


class Leadership:
    """Whether this beat leads, kept by checking the lease every ``ttl / 3`` seconds.

    ``clock`` (wall time, for the lease's times and the liveness record) and
    ``monotonic`` (for the checks' rate and the lease's local validity) are
    ``time.time`` and ``time.monotonic`` outside tests.
    """

    def __init__(
        self,
        db: Database,
        ttl: float,
        *,
        entries: Collection[str] = (),
        liveness: Path | None = None,
        beat_id: str | None = None,
        lease: str = beat.LEASE,
        clock: Clock = time.time,
        monotonic: Clock = time.monotonic,
    ) -> None:
        self.db = db
        self.ttl = ttl
        self.check_interval = ttl / 3
        self.beat_id = beat_id or new_beat_id()
        self.entries = tuple(entries)
        self.liveness = liveness
        self.lease = lease
        self._clock = clock
        self._monotonic = monotonic
        self._leading = False
        self._valid_until = -math.inf
        self._next_check = -math.inf
        self._announced = False

    @property
    def leads(self) -> bool:
        """This beat holds the lease, and it has not lapsed since the last renewal."""
        return self._leading and self._monotonic() < self._valid_until

    def seconds_to_next_check(self) -> float:
        return max(self._next_check - self._monotonic(), 0.0)

    def check(self) -> None:
        """Renew or try to take the lease, when a check is due."""
        started = self._monotonic()
        if started < self._next_check:
            return
        # A fixed rate, so that the takeover bound holds; after a stall, start again.
        self._next_check += self.check_interval
        if self._next_check <= started:
            self._next_check = started + self.check_interval
        now = self._now()
        try:
            with self.db.autocommit() as session:
                held = beat.hold_lease(session, self.beat_id, now, self.ttl, self.lease)
                if held and not self._leading:
                    beat.forget_entries(session, self.entries)
                # Who leads, named only when this beat starts standing by (to log it).
                holder = None
                if not held and (self._leading or not self._announced):
                    holder = beat.lease_holder(session, self.lease)
        except Exception as exc:  # the database may be restarting: try again next check
            lapsed = self._leading and started + self.check_interval >= self._valid_until
            log.warning(
                "beat %s could not check its lease (%s: %s)%s",
                self.beat_id,
                type(exc).__name__,
                exc,
                "; it stops sending until it can" if lapsed else "",
            )
            if lapsed:
                self._leading = False
            return
        if held:
            self._valid_until = started + self.ttl
        self._change(held, holder)
        if self.liveness is not None:
            try:
                Liveness(self.beat_id, held, self._clock(), self.ttl).write(self.liveness)
            except OSError as exc:
                log.warning("beat %s could not record its liveness (%s)", self.beat_id, exc)

    def claim(self, entry: str, period: datetime) -> bool:
        """Claim the send of ``entry`` for ``period``: False when it was claimed already
        (by a beat that led then) or cannot be claimed now (the database is away)."""
        try:
            with self.db.autocommit() as session:
                return beat.claim_period(session, entry, period, self.beat_id, self._now())
        except Exception as exc:
            log.warning(
                "beat %s could not claim %s for the period at %s (%s: %s); not sent",
                self.beat_id,
                entry,
                period.isoformat(),
                type(exc).__name__,
                exc,
            )
            return False

    def release(self) -> None:
        """Give the lease up (a clean stop), so a standby takes it at its next check."""
        if not self._leading:
            return
        self._leading = False
        try:
            with self.db.autocommit() as session:
                beat.release_lease(session, self.beat_id, self._now(), self.lease)
        except Exception as exc:
            log.warning(
                "beat %s could not release its lease (%s); a standby takes it when it expires",
                self.beat_id,
                exc,
            )
            return
        log.info("beat %s released the lease", self.beat_id)

    def _change(self, held: bool, holder: str | None) -> None:
        if held and not self._leading:
            log.info("beat %s leads (lease renewed every %gs)", self.beat_id, self.check_interval)
        elif not held and (self._leading or not self._announced):
            log.info(
                "beat %s standing by (the lease is held by %s; checked every %gs)",
                self.beat_id,
                holder or "another beat",
                self.check_interval,
            )
        self._leading = held
        self._announced = True

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock(), UTC)
