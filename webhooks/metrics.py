"""``GET /metrics`` (Prometheus text format) and the count of webhook deliveries.

Each delivery to the receiver blueprint is counted once, after its response
is made (so 413s raised while reading the body are counted too), with an
outcome from :func:`webhook_outcome`. The receiver notes what the transition
function decided with :func:`note_webhook_event`.
"""

from __future__ import annotations

from flask import Blueprint, Response, g, request
from flask.typing import ResponseReturnValue

from webhooks.context import runtime
from worker import metrics
from worker.job_stats import JobStatsCollector
from worker.states import EventKind, EventRecord

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


@bp.get("/metrics")
def scrape() -> ResponseReturnValue:
    body = metrics.render_latest([JobStatsCollector(runtime().db.engine)])
    return Response(body, headers={"Content-Type": metrics.CONTENT_TYPE})
