"""``GET /metrics`` (Prometheus text format) and the count of webhook deliveries.

The web app serves the samples of its own scope on this host (worker/metrics.py:
its gunicorn workers') and the gauges read from the database, which only it
serves: a Celery worker serves its own samples on its own port, never these
gauges, so that a fleet of workers does not multiply them.

Each delivery to the receiver blueprint is counted once, after its response
is made (so 413s raised while reading the body are counted too), with an
outcome from :func:`webhook_outcome`. The receiver notes what the transition
function decided with :func:`note_webhook_event`.

At scrape time, besides the jobs by status (worker/job_stats.py), the
capacity of every provider account (:class:`CapacityCollector`): its slots in
use, today's jobs, failed tasks and spend, its pause and breaker
(worker/capacity.py's snapshot), and the jobs waiting for capacity by provider
and kind of reason. It is here, not in worker/job_stats.py, because reading
capacity sits above job_stats in the layers (pyproject.toml).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from flask import Blueprint, Response, g, request
from flask.typing import ResponseReturnValue
from sqlalchemy.exc import SQLAlchemyError

from webhooks.context import runtime
from worker import capacity, metrics
from worker.accounts import Account
from worker.capacity import AccountStatus
from worker.job_stats import WAIT_REASONS, JobStatsCollector, ScrapeCache, query_waiting
from worker.models import utcnow
from worker.runtime import Runtime
from worker.states import EventKind, EventRecord

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

log = logging.getLogger(__name__)

bp = Blueprint("metrics", __name__)

RECEIVER_BLUEPRINT = "webhooks"  # webhooks/receiver.py's blueprint
_EVENT_KEY = "variflow_webhook_event"

_BY_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    409: "conflict",
    413: "too_large",
}


def note_webhook_event(event: EventRecord | None) -> None:
    """Remember, for this request, what applying the delivery did."""
    setattr(g, _EVENT_KEY, event)


def webhook_outcome(status_code: int, event: EventRecord | None) -> str:
    """The outcome label of one delivery (see worker.metrics.WEBHOOK_OUTCOMES).

    A 200 is ``accepted`` when it changed the job (a transition or new
    progress). An ignored delivery is a ``duplicate`` when it reports the
    status the job already has — also a terminal one, which the transition
    function does not flag as a duplicate — and ``stale`` otherwise (an older
    or conflicting status).
    """
    if status_code != 200:
        return _BY_STATUS.get(status_code, "error")
    if event is None:
        return "stale"
    if event.kind in (EventKind.TRANSITION, EventKind.PROGRESS):
        return "accepted"
    if event.duplicate or event.from_status is event.to_status:
        return "duplicate"
    return "stale"


@bp.after_app_request
def _count_delivery(response: Response) -> Response:
    if request.blueprint == RECEIVER_BLUEPRINT and request.view_args is not None:
        provider = str(request.view_args.get("provider_name", ""))
        event: EventRecord | None = g.get(_EVENT_KEY)
        metrics.count_webhook(provider, webhook_outcome(response.status_code, event))
    return response


# --- capacity, read at scrape time ------------------------------------------------

# The breaker as a number: alerts compare it (> 0: not closed; 1: refusing creates).
BREAKER_VALUES = {"closed": 0.0, "half-open": 0.5, "open": 1.0}


@dataclass(frozen=True)
class CapacityStats:
    providers: tuple[str, ...]
    accounts: tuple[AccountStatus, ...]
    waiting: dict[tuple[str, str], int]  # (provider, kind of reason) -> queued jobs


def all_accounts(rt: Runtime) -> tuple[Account, ...]:
    """Every account of every provider with settings (enabled for new jobs or not)."""
    return tuple(a for name in rt.settings.provider_names for a in rt.providers.accounts(name))


def query_capacity(rt: Runtime) -> CapacityStats:
    """The accounts' snapshot and the waiting jobs by reason, in one transaction."""
    accounts = all_accounts(rt)
    with rt.session() as session:
        statuses = capacity.snapshot(session, accounts, utcnow(), rt.settings.breaker_threshold)
        waiting = query_waiting(session)
    return CapacityStats(rt.settings.provider_names, tuple(statuses), waiting)


class CapacityCache(ScrapeCache[CapacityStats]):
    """The last CapacityStats of this process (per database and accounts)."""

    def stats(self, rt: Runtime) -> CapacityStats:
        # The same database and the same accounts: a reloaded configuration is not stale.
        key = (
            rt.db.engine.url.render_as_string(hide_password=False),
            all_accounts(rt),
            rt.settings.breaker_threshold,
        )
        return self.get(key, lambda: query_capacity(rt))


capacity_cache = CapacityCache()


class CapacityCollector:
    """Gauges of every provider account's capacity, computed from the database when
    scraped (labels: provider, account — the account's name, never its key)."""

    def __init__(self, rt: Runtime, cache: CapacityCache | None = None) -> None:
        self.rt = rt
        self.cache = cache or capacity_cache

    def describe(self) -> Iterable[Metric]:
        return list(capacity_families(CapacityStats((), (), {})))

    def collect(self) -> Iterable[Metric]:
        try:
            stats = self.cache.stats(self.rt)
        except SQLAlchemyError as exc:
            # As for the job stats: the other metrics are still served; these go missing.
            log.warning("metrics: capacity unavailable (%s)", type(exc).__name__)
            return []
        return list(capacity_families(stats))


def capacity_families(stats: CapacityStats) -> Iterable[Metric]:
    from prometheus_client.core import GaugeMetricFamily

    labels = ["provider", "account"]

    def family(name: str, help_text: str) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, help_text, labels=labels)

    in_flight = family(
        "variflow_account_in_flight",
        "Slots the account holds: jobs claimed for their create, submitted or processing.",
    )
    slots = family(
        "variflow_account_slots",
        "The account's max_in_flight (only for accounts with that limit).",
    )
    jobs_today = family("variflow_account_jobs_today", "Jobs created on the account today (UTC).")
    failed_today = family(
        "variflow_account_failed_today",
        "The account's jobs the provider failed or rejected today (UTC): PiAPI's "
        "daily allowance of incorrect tasks.",
    )
    spend_today = family(
        "variflow_account_spend_today", "The cost of the account's jobs ended today (UTC)."
    )
    breaker = family(
        "variflow_account_breaker_open",
        "The account's circuit breaker: 0 closed, 0.5 half open (one probe job), 1 open.",
    )
    paused = family(
        "variflow_account_paused",
        "1 while the account is paused (the provider answered 429), else 0.",
    )
    for status in stats.accounts:
        account = status.account
        values = [account.provider, account.name]
        in_flight.add_metric(values, status.usage.in_flight)
        if account.limits.max_in_flight is not None:
            slots.add_metric(values, account.limits.max_in_flight)
        jobs_today.add_metric(values, status.usage.jobs_today)
        failed_today.add_metric(values, status.usage.failed_today)
        spend_today.add_metric(values, status.spend_today)
        breaker.add_metric(values, BREAKER_VALUES.get(status.breaker, 1.0))
        paused.add_metric(values, 1.0 if status.paused_until is not None else 0.0)
    yield from (in_flight, slots, jobs_today, failed_today, spend_today, breaker, paused)
    waiting = GaugeMetricFamily(
        "variflow_jobs_waiting",
        "Queued jobs waiting for provider capacity, by the kind of their reason "
        "(slot, rate, budget, paused, breaker, other).",
        labels=["provider", "reason"],
    )
    for provider in _providers(stats.providers, stats.waiting):
        for reason in WAIT_REASONS:
            waiting.add_metric([provider, reason], stats.waiting.get((provider, reason), 0))
    yield waiting


def _providers(configured: Sequence[str], waiting: dict[tuple[str, str], int]) -> list[str]:
    # Every configured provider has its series (0 when nothing waits); a provider whose
    # settings are gone still shows the jobs it left waiting.
    return list(dict.fromkeys([*configured, *(provider for provider, _ in waiting)]))


@bp.get("/metrics")
def scrape() -> ResponseReturnValue:
    rt = runtime()
    body = metrics.render_latest([JobStatsCollector(rt.db.engine), CapacityCollector(rt)])
    return Response(body, headers={"Content-Type": metrics.CONTENT_TYPE})
