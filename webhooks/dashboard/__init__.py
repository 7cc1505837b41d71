"""The operators' jobs dashboard: server-rendered, behind HTTP basic auth.

    GET  /dashboard                     counts by status, then the jobs, newest first,
                                        50 a page (?page=), filtered by ?status= and
                                        ?provider=; ?q= searches (below); while a job
                                        shown is in flight the list refreshes itself
    GET  /dashboard/overview            charts of the last hour (?window=day: day) of jobs,
                                        all providers' or one's (?provider=): jobs per
                                        minute by how they ended, p50/p95 time to
                                        completion, failed jobs' error codes (overview.py
                                        queries, charts.py draws as inline SVG)
    GET  /dashboard/accounts            every provider account: slots in use, today's
                                        jobs, failed tasks and spend against its limits,
                                        pause and breaker; the jobs waiting for capacity
    GET  /dashboard/jobs/<id>           one job: its fields, input, results, error and
                                        timeline (account, priority, cost, why it waits),
                                        and what can be done with it
    GET  /dashboard/jobs/<id>/input     the input image stored with the job (job_inputs)
    POST /dashboard/jobs/<id>/cancel    worker.api.cancel_job, then back to the job (303)
    POST /dashboard/jobs/<id>/retry     worker.api.resubmit_job (an ended job only), then
                                        to the new job (303)

Search (?q=) finds a job by its full id, by a prefix of its id (4 or more hex
digits) or by its idempotency key (exact): one job found is its page, several
are the list, filtered.

Credentials come from VARIFLOW_DASHBOARD_USER and VARIFLOW_DASHBOARD_PASSWORD.
Unless both are set, every dashboard URL answers 404, as if there were no
dashboard: it is never open by default. Every POST needs a CSRF token of the
dashboard's own pages and a same-origin request (access.py says why so).

The dashboard never writes a row: its actions go through worker.api, as the
HTTP API's do. Templates get plain view objects (queries.py), never ORM rows;
Jinja autoescapes everything.
"""

from __future__ import annotations

from webhooks.dashboard.queries import PAGE_SIZE
from webhooks.dashboard.views import bp

__all__ = ["PAGE_SIZE", "bp"]
