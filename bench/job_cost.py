"""What one job costs: SQL statements, commits, broker messages and HTTP requests.

    python bench/job_cost.py            # one job per provider (Piclaza: a batch of 50)

Counted, not guessed: SQLAlchemy's engine events (every cursor execute, every
COMMIT), the dialect's ping (``pool_pre_ping`` would send one per checkout;
variflow runs without it, and the count shows it), Celery's
``before_task_publish`` signal (messages), and the sandbox's own request
counters (HTTP). Everything runs in this process against
real servers: a throwaway PostgreSQL database, Redis as the broker (a queue of
its own, deleted at the end), the sandbox, and the web app (for PiAPI's
webhooks) on a real socket. The code paths are the ones the Celery tasks run
(the submit, polling and finalize flows), called directly so that every
statement of the job is seen by one engine; result archiving is off, so
finalize runs only for a job that sent finalize_job. The bench watches the
jobs through an engine of its own, and a beat tick that leases nothing is not
counted: neither is part of a job's cost.

Prints one line per provider:

    cost <provider>: statements=<n> commits=<n> messages=<n> http=<n> pings=<n> round_trips=<n>

``commits`` counts units of work (transactions), also those that run in
autocommit; ``round_trips`` counts what reaches PostgreSQL: statements, pings,
and the BEGIN and COMMIT of units of work that are not in autocommit.

The goals of issue 9 (per job): PiAPI <= 10 statements and <= 6 commits,
Piclaza <= 10 / 6 (amortised over a batch of 50), LemonData <= 8 / 4.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

from _inprocess import in_process
from celery.signals import before_task_publish
from PIL import Image
from sqlalchemy import Engine, create_engine, event, func, select
from sqlalchemy.pool import NullPool
from werkzeug.serving import make_server

from sandbox.config import SandboxConfig
from sandbox.server import SandboxServer
from webhooks import create_app
from worker.api import submit_variation
from worker.devstack import free_port, sandbox_env
from worker.finalize import finalize
from worker.models import Job
from worker.polling import lease_due, poll_jobs
from worker.runtime import Runtime
from worker.states import JobStatus
from worker.submit import submit

ADMIN_URL = os.environ.get(
    "VARIFLOW_BENCH_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("VARIFLOW_BENCH_BROKER_URL", "redis://127.0.0.1:6379/0")
GOALS = {"piapi": (10, 6), "piclaza": (10, 6), "lemondata": (8, 4)}


@dataclass
class Tally:
    statements: int = 0
    commits: int = 0
    pings: int = 0
    messages: int = 0
    # BEGIN and COMMIT that psycopg really sends (not in autocommit units of work).
    brackets: int = 0

    def reset(self) -> None:
        self.statements = self.commits = self.pings = self.messages = self.brackets = 0

    @property
    def round_trips(self) -> int:
        return self.statements + self.brackets + self.pings

    def add(self, other: Tally) -> None:
        self.statements += other.statements
        self.commits += other.commits
        self.pings += other.pings
        self.messages += other.messages
        self.brackets += other.brackets

    @contextmanager
    def paused(self) -> Iterator[Tally]:
        """Count what runs inside apart (into the tally yielded), for the caller to add."""
        before = replace(self)
        apart = Tally()
        try:
            yield apart
        finally:
            apart.statements = self.statements - before.statements
            apart.commits = self.commits - before.commits
            apart.pings = self.pings - before.pings
            apart.messages = self.messages - before.messages
            apart.brackets = self.brackets - before.brackets
            self.statements, self.commits = before.statements, before.commits
            self.pings, self.messages = before.pings, before.messages
            self.brackets = before.brackets


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (30, 90, 160)).save(buffer, format="PNG")
    return buffer.getvalue()


def autocommit(conn: Any) -> bool:
    """A unit of work in autocommit (worker.db.Database.autocommit): SQLAlchemy still
    reports its commit, but psycopg sends no BEGIN and no COMMIT."""
    return bool(conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT")


def count(rt: Runtime, tally: Tally) -> None:
    lock = threading.Lock()

    def statement(*_: Any) -> None:
        with lock:
            tally.statements += 1

    def commit(conn: Any) -> None:
        with lock:
            tally.commits += 1
            tally.brackets += 0 if autocommit(conn) else 2  # its BEGIN and the COMMIT

    dialect = rt.db.engine.dialect
    do_ping = dialect.do_ping

    def ping(dbapi_connection: Any) -> bool:
        with lock:
            tally.pings += 1
        return do_ping(dbapi_connection)

    def message(**_: Any) -> None:
        with lock:
            tally.messages += 1

    event.listen(rt.db.engine, "before_cursor_execute", statement)
    event.listen(rt.db.engine, "commit", commit)
    dialect.do_ping = ping  # type: ignore[method-assign]
    before_task_publish.connect(message, weak=False)


def http_requests(sandbox: SandboxServer) -> int:
    total: int = sandbox.state.stats()["requests"]["total"]
    return total


def run_jobs(
    rt: Runtime,
    provider: str,
    n: int,
    make: Callable[[int], Any],
    observer: Engine,
    tally: Tally,
) -> list[uuid.UUID]:
    """Submit ``n`` jobs, run them to the end the way the tasks would, then finalize those
    that sent finalize_job (a job with nothing left to do after its end sends none).

    The bench watches the jobs through ``observer``, an engine of its own whose
    statements are not counted: watching is not part of a job's cost.
    """
    ids = [make(i).id for i in range(n)]
    for job_id in ids:
        # As the task does: its message names the provider (worker/celery_app.send_submit),
        # so the flow does not read it from the row.
        submit(job_id, rt, provider=provider)
    deadline = time.monotonic() + 120
    while unfinished(observer, ids):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{provider}: jobs not terminal after 120 s")
        # Only polled providers' jobs come due quickly. A beat tick that leases
        # nothing is the idle cost of the deployment, not of these jobs.
        with tally.paused() as idle:
            batches = lease_due(rt)
        if batches:
            tally.add(idle)
        for batch in batches:
            poll_jobs(batch.provider, batch.job_ids, rt)
        time.sleep(0.1)
    with observer.connect() as conn:
        left = conn.scalars(select(Job.id).where(Job.id.in_(ids), Job.finalized_at.is_(None)))
        for job_id in list(left):
            finalize(job_id, rt, lambda *_: None, retries=0)
    return ids


def unfinished(observer: Engine, ids: list[uuid.UUID]) -> int:
    with observer.connect() as conn:
        terminal = [s.value for s in JobStatus if s.is_terminal]
        done = conn.scalar(select(func.count()).where(Job.id.in_(ids), Job.status.in_(terminal)))
    return len(ids) - (done or 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--piclaza-batch", type=int, default=50)
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    sandbox = SandboxServer(config=SandboxConfig(pending_seconds=0.05, processing_seconds=0.1))
    sandbox.start()
    web_port = free_port()
    env = {
        "VARIFLOW_PUBLIC_URL": f"http://127.0.0.1:{web_port}",
        "VARIFLOW_RESULT_STORE": "off",
        "VARIFLOW_POLL_BACKOFF_START": "0.1",
        "VARIFLOW_PIAPI_WEBHOOK_GRACE": "60",
        **sandbox_env(sandbox.url),
    }
    server = None
    try:
        with in_process("variflow_cost", env) as (url, rt):
            server = make_server("127.0.0.1", web_port, create_app(runtime=rt), threaded=True)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            measure(rt, url, args.piclaza_batch, sandbox)
    finally:
        if server is not None:
            server.shutdown()
        sandbox.stop()


def measure(rt: Runtime, url: str, piclaza_batch: int, sandbox: SandboxServer) -> None:
    """Run and count one job per provider (Piclaza: a batch), printing a line each."""
    observer = create_engine(url, poolclass=NullPool)
    tally = Tally()
    count(rt, tally)
    image = png()
    makers: dict[str, tuple[int, Callable[[int], Any]]] = {
        "piapi": (
            1,
            lambda i: submit_variation(
                "piapi", runtime=rt, origin_task_id=f"o-{i}", index="1", prompt="cost"
            ),
        ),
        "piclaza": (
            piclaza_batch,
            lambda i: submit_variation("piclaza", runtime=rt, image=image),
        ),
        "lemondata": (
            1,
            lambda i: submit_variation("lemondata", runtime=rt, image=image, n=1, size="256x256"),
        ),
    }
    load = os.getloadavg()
    print(f"job cost on PostgreSQL + Redis; load average {load[0]:.2f} {load[1]:.2f}")
    for provider, (n, make) in makers.items():
        tally.reset()
        before = http_requests(sandbox)
        run_jobs(rt, provider, n, make, observer, tally)
        # PiAPI's last webhook may still be answering: let the web thread finish.
        time.sleep(0.2)
        http = http_requests(sandbox) - before
        goal_statements, goal_commits = GOALS[provider]
        print(
            f"cost {provider}: statements={tally.statements / n:.1f} "
            f"commits={tally.commits / n:.1f} messages={tally.messages / n:.1f} "
            f"http={http / n:.1f} pings={tally.pings / n:.1f} "
            f"round_trips={tally.round_trips / n:.1f}"
            f"  (per job{f', a batch of {n}' if n > 1 else ''}; "
            f"goal <= {goal_statements} statements, <= {goal_commits} commits)"
        )
    observer.dispose()


if __name__ == "__main__":
    main()
