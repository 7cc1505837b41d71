"""Webhook ingest benchmark: the real receiver vs a bare Flask app, both under gunicorn.

Run by ``make bench`` (``.venv/bin/python bench/webhook_ingest.py``). It prints
numbers and exits 0 whether or not the goals are met; it exits non-zero only
when it could not measure (database unreachable, server did not start, ...).

What it does:

1. Creates a throw-away PostgreSQL database, migrates it with
   ``worker.migrate.upgrade`` and inserts ``--jobs`` PiAPI jobs in ``submitted``
   with an upstream task id and a per-job webhook secret (stored hashed, as the
   submit task does). The database is dropped at the end, always.
2. Counts the SQL round trips of one delivery in-process (Flask test client),
   so a regression in statements per delivery is visible without a profiler.
3. For the real app (``webhooks``) and then a bare Flask app (bench/bare_app.py),
   under identical gunicorn settings: warm up, then a closed-loop run at
   saturation (throughput, p50/p99), then an open-loop run at half that rate
   (p50/p99 measured from the scheduled send time). Each delivery is realistic:
   per job ``processing`` (progress 50) then ``completed`` (with image URLs),
   plus some duplicate ``completed`` and late ``processing`` deliveries that the
   receiver must record as ignored and still answer 200.
4. After each real-app run, checks in the database that every job reached
   ``completed`` and that the events are what the deliveries imply.

The real app runs with a Redis broker (``--broker-url``, default
redis://127.0.0.1:6379) and a queue of its own (``variflow_bench_<pid>``): a
``completed`` delivery publishes ``finalize_job`` after its commit, so that
publish is part of the measured path, as in a deployment. Nothing consumes the
queue; the bench counts the messages it holds at the end (one per completed job
per run) and deletes it, always.

The load generator runs on the same machine and shares its CPUs with gunicorn
and PostgreSQL: absolute numbers are a floor, the real/bare ratio is the point.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from _db import create_database, drop_database, nullpool_engine
from _gunicorn import GunicornServer, http_status, probe_healthz
from _load import Delivery, LoadReport, run_load
from _machine import CLK_TCK, busy_seconds
from celery import Celery
from sqlalchemy import Engine, event, func, insert, select, text, update
from sqlalchemy.engine import URL

from worker.migrate import upgrade
from worker.models import Job, JobEvent
from worker.webhook_secrets import hash_secret

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "bench"
HOST = "127.0.0.1"
DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379"
P99_GOAL_MS = 25.0
RATIO_GOAL = 0.5
# Above this share of the machine used by others, say that the numbers are noisy.
NOISY_SHARE = 0.10


# --------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--jobs", type=int, default=2000, help="jobs per measured run")
    parser.add_argument(
        "--deliveries",
        type=int,
        default=None,
        help="approximate deliveries per measured run (overrides --jobs)",
    )
    parser.add_argument(
        "--duplicates",
        type=float,
        default=0.1,
        help="fraction of jobs that also get a duplicate 'completed' and a late 'processing'",
    )
    parser.add_argument("--warmup-jobs", type=int, default=300, help="jobs in the warm-up pass")
    # 2 workers x 4 threads on 2 cores: one process per core for the Python
    # work, threads to overlap the PostgreSQL round trips (most of a delivery's
    # wall time). More workers would only fight the load generator and
    # PostgreSQL for the same two cores.
    parser.add_argument("--workers", type=int, default=2, help="gunicorn worker processes")
    parser.add_argument("--threads", type=int, default=4, help="gunicorn threads per worker")
    parser.add_argument("--load-processes", type=int, default=2, help="load generator processes")
    parser.add_argument(
        "--load-threads",
        type=int,
        default=8,
        help="connections (threads) per load generator process",
    )
    parser.add_argument(
        "--open-loop-fraction",
        type=float,
        default=0.5,
        help="open-loop rate as a fraction of the saturating rate",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("VARIFLOW_BENCH_DATABASE_URL", DEFAULT_ADMIN_URL),
        help="a PostgreSQL database to connect to for CREATE/DROP DATABASE "
        "(env VARIFLOW_BENCH_DATABASE_URL); the bench creates its own database",
    )
    parser.add_argument(
        "--broker-url",
        default=os.environ.get("VARIFLOW_BENCH_BROKER_URL", DEFAULT_BROKER_URL),
        help="the Redis broker the real app publishes finalize_job to, on a queue of the"
        " bench's own, deleted at the end (env VARIFLOW_BENCH_BROKER_URL)",
    )
    parser.add_argument("--request-timeout", type=float, default=30.0, help="seconds")
    args = parser.parse_args(argv)
    if not args.broker_url.startswith(("redis://", "rediss://")):
        parser.error("--broker-url must be a Redis URL (redis://...)")
    if args.deliveries is not None:
        args.jobs = max(1, round(args.deliveries / (2 * (1 + args.duplicates))))
    for name in ("jobs", "workers", "threads", "load_processes", "load_threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= args.duplicates <= 1:
        parser.error("--duplicates must be between 0 and 1")
    if not 0 < args.open_loop_fraction <= 1:
        parser.error("--open-loop-fraction must be in (0, 1]")
    args.warmup_jobs = max(1, min(args.warmup_jobs, args.jobs))
    return args


# --------------------------------------------------------------------------- database


@dataclass(frozen=True)
class BenchJob:
    index: int
    id: uuid.UUID
    task_id: str
    secret: str


def insert_jobs(engine: Engine, count: int) -> list[BenchJob]:
    now = datetime.now(UTC)
    jobs = [
        BenchJob(i, uuid.uuid4(), str(uuid.uuid4()), f"bench-secret-{i}-{uuid.uuid4().hex}")
        for i in range(count)
    ]
    rows = [
        {
            "id": job.id,
            "provider": "piapi",
            "status": "submitted",
            "params": {
                "origin_task_id": str(uuid.uuid4()),
                "index": "1",
                "prompt": "a lighthouse at dusk, oil painting",
            },
            "upstream_task_id": job.task_id,
            # Stored exactly as the submit task stores it.
            "webhook_secret_hash": hash_secret(job.secret),
            "progress": 0,
            "submit_attempts": 1,
            "poll_attempts": 0,
            "next_poll_at": now + timedelta(minutes=2),
            "deadline": now + timedelta(days=1),
            "created_at": now,
            "updated_at": now,
            "submitted_at": now,
        }
        for job in jobs
    ]
    with engine.begin() as conn:
        conn.execute(insert(Job.__table__), rows)
    return jobs


def reset_jobs(engine: Engine) -> None:
    """Put every job back to ``submitted`` with no history, so each run does the same work."""
    now = datetime.now(UTC)
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE job_events RESTART IDENTITY"))
        conn.execute(
            update(Job.__table__).values(
                status="submitted",
                progress=0,
                result_urls=None,
                error_code=None,
                error_message=None,
                completed_at=None,
                last_webhook_at=None,
                next_poll_at=now + timedelta(minutes=2),
                updated_at=now,
            )
        )
    # Dead tuples of the previous run would make later runs slower than earlier ones.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM (ANALYZE) jobs")
        conn.exec_driver_sql("VACUUM (ANALYZE) job_events")


@dataclass(frozen=True)
class Verification:
    completed: int
    expected_completed: int
    transitions: int
    ignored: int
    expected_transitions: int
    expected_ignored: int
    statuses: dict[str, int]

    @property
    def ok(self) -> bool:
        return (
            self.completed == self.expected_completed
            and self.transitions == self.expected_transitions
            and self.ignored == self.expected_ignored
        )

    def describe(self) -> str:
        verdict = "OK" if self.ok else "MISMATCH"
        return (
            f"{verdict}: {self.completed}/{self.expected_completed} jobs completed"
            f" (statuses {self.statuses}); events: {self.transitions} transitions"
            f" (expected {self.expected_transitions}), {self.ignored} ignored"
            f" (expected {self.expected_ignored})"
        )


def verify(engine: Engine, workload: Workload) -> Verification:
    with engine.connect() as conn:
        statuses: dict[str, int] = {
            status: count
            for status, count in conn.execute(select(Job.status, func.count()).group_by(Job.status))
        }
        kinds: dict[str, int] = {
            kind: count
            for kind, count in conn.execute(
                select(JobEvent.kind, func.count()).group_by(JobEvent.kind)
            )
        }
    return Verification(
        completed=statuses.get("completed", 0),
        expected_completed=workload.jobs,
        transitions=kinds.get("transition", 0),
        ignored=kinds.get("ignored", 0),
        expected_transitions=2 * workload.jobs,
        expected_ignored=workload.extras,
        statuses=statuses,
    )


# --------------------------------------------------------------------------- workload


@dataclass(frozen=True)
class Workload:
    thread_lists: list[list[Delivery]]
    jobs: int
    extras: int  # duplicate/late deliveries, each recorded as an ignored event

    @property
    def deliveries(self) -> int:
        return sum(len(t) for t in self.thread_lists)


def _task_data(job: BenchJob, status: str) -> dict[str, Any]:
    """The `data` object of a PiAPI webhook (docs/providers.md, PiAPI), as the real one looks."""
    done = status == "completed"
    base = f"https://img.theapi.app/mj/{job.task_id}"
    images = [f"{base}/{n}.png" for n in range(4)] if done else None
    return {
        "task_id": job.task_id,
        "model": "midjourney",
        "task_type": "variation",
        "status": status,
        "config": {"service_mode": "public", "webhook_config": {"endpoint": "", "secret": ""}},
        "input": {
            "origin_task_id": "0f2c9a7e-3c1b-4d7e-9a55-2b1f0c6d8e41",
            "index": "1",
            "prompt": "a lighthouse at dusk, oil painting",
        },
        "output": {
            "image_url": f"{base}/grid.png" if done else "",
            "image_urls": images,
            "temporary_image_urls": images,
            "discord_image_url": "",
            "actions": ["upscale1", "upscale2", "variation1", "reroll"] if done else [],
            "progress": 100 if done else 50,
            "intermediate_image_urls": None,
        },
        "meta": {
            "created_at": "2025-01-01T00:00:00Z",
            "started_at": "2025-01-01T00:00:05Z",
            "ended_at": "2025-01-01T00:01:00Z" if done else "",
            "usage": {"type": "point", "frozen": 700000, "consume": 700000 if done else 0},
        },
        "detail": None,
        "logs": [],
        "error": {"code": 0, "raw_message": "", "message": "", "detail": None},
    }


def _delivery(job: BenchJob, status: str, timestamp: int) -> Delivery:
    body = json.dumps({"timestamp": timestamp, "data": _task_data(job, status)})
    return Delivery(f"/webhooks/piapi/{job.id}", job.secret, body.encode())


def build_workload(jobs: list[BenchJob], threads: int, duplicates: float) -> Workload:
    """Jobs dealt round-robin to connections; per connection all `processing` first, then
    all `completed`, then the extras, so one job's deliveries keep their order."""
    now = int(time.time())
    lists: list[list[Delivery]] = []
    extras = 0
    for k in range(threads):
        mine = jobs[k::threads]
        # Chosen by position on this connection, so every connection gets the same
        # number of extras: equal list lengths keep the open-loop schedule uniform.
        chosen = [
            j
            for n, j in enumerate(mine)
            if math.floor((n + 1) * duplicates) > math.floor(n * duplicates)
        ]
        deliveries = [_delivery(j, "processing", now) for j in mine]
        deliveries += [_delivery(j, "completed", now + 60) for j in mine]
        for j in chosen:
            # A retried completed (PiAPI retries) and an out-of-order processing:
            # both must be answered 200 and recorded as ignored.
            deliveries.append(_delivery(j, "completed", now + 60))
            deliveries.append(_delivery(j, "processing", now))
        extras += 2 * len(chosen)
        lists.append(deliveries)
    return Workload(lists, len(jobs), extras)


# --------------------------------------------------------------------------- SQL per delivery


@dataclass
class SqlProfile:
    statements: list[str] = field(default_factory=list)
    pings: int = 0
    begins: int = 0
    commits: int = 0
    rollbacks: int = 0

    @property
    def round_trips(self) -> int:
        # psycopg sends BEGIN as its own query before the first statement.
        return self.pings + self.begins + len(self.statements) + self.commits + self.rollbacks


def _describe_sql(statement: str) -> str:
    words = statement.split()
    verb = words[0].upper() if words else "?"
    match = re.search(r"\b(?:FROM|INTO|UPDATE)\s+(\w+)", statement, re.IGNORECASE)
    table = match.group(1) if match else ""
    suffix = " FOR UPDATE" if "FOR UPDATE" in statement.upper() else ""
    return f"{verb} {table}{suffix}".strip()


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def profile_sql(
    db_url: URL, jobs: list[BenchJob], broker_env: dict[str, str]
) -> dict[str, SqlProfile]:
    """Round trips of one delivery of each kind, in-process through the Flask test client."""
    from webhooks import create_app
    from worker import runtime as runtimes
    from worker.celery_app import build_runtime, reconfigure
    from worker.config import load_settings

    url = db_url.render_as_string(hide_password=False)
    profiles: dict[str, SqlProfile] = {}
    with _environment(VARIFLOW_DATABASE_URL=url, VARIFLOW_LOG_LEVEL="WARNING", **broker_env):
        # This process's runtime, as the web process builds it (read once, installed);
        # the Celery app sends finalize_job with the same settings (the bench's broker).
        settings = load_settings()
        runtime = runtimes.install(build_runtime(settings))
        reconfigure(settings)
        try:
            app = create_app(runtime=runtime)
            engine = runtime.db.engine
            current = SqlProfile()

            def on_execute(*args: Any) -> None:
                current.statements.append(_describe_sql(args[2]))

            # In autocommit (worker.db.Database.autocommit) SQLAlchemy still reports
            # begin and commit, but psycopg sends neither: not round trips.
            def autocommit(conn: Any) -> bool:
                return bool(conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT")

            def on_begin(conn: Any) -> None:
                current.begins += 0 if autocommit(conn) else 1

            def on_commit(conn: Any) -> None:
                current.commits += 0 if autocommit(conn) else 1

            def on_rollback(_conn: Any) -> None:
                current.rollbacks += 1

            event.listen(engine, "before_cursor_execute", on_execute)
            event.listen(engine, "begin", on_begin)
            event.listen(engine, "commit", on_commit)
            event.listen(engine, "rollback", on_rollback)
            # pool_pre_ping runs below the event layer: count it at the dialect.
            dialect: Any = engine.dialect
            do_ping = dialect.do_ping

            def counting_ping(dbapi_connection: Any) -> bool:
                current.pings += 1
                return bool(do_ping(dbapi_connection))

            dialect.do_ping = counting_ping
            client = app.test_client()
            first = jobs[0]
            # The first request opens the pooled connection (no ping); warm that
            # up on another job so every measured delivery is a steady-state one.
            client.post(
                f"/webhooks/piapi/{jobs[1].id}",
                data=_delivery(jobs[1], "processing", 0).body,
                headers={"x-webhook-secret": jobs[1].secret, "Content-Type": "application/json"},
            )
            for label, status in (
                ("processing (applied)", "processing"),
                ("completed (applied)", "completed"),
                ("duplicate completed (ignored)", "completed"),
            ):
                current = SqlProfile()
                delivery = _delivery(first, status, 0)
                response = client.post(
                    delivery.path,
                    data=delivery.body,
                    headers={"x-webhook-secret": first.secret, "Content-Type": "application/json"},
                )
                if response.status_code != 200:
                    raise RuntimeError(
                        f"in-process delivery answered {response.status_code}: "
                        f"{response.get_data(as_text=True)[:300]}"
                    )
                profiles[label] = current
        finally:
            runtimes.uninstall()  # closes its engine and HTTP client
    return profiles


# --------------------------------------------------------------------------- broker


def _redacted(url: str) -> str:
    # A broker URL may carry a password: never print it.
    return re.sub(r"//[^@/]*@", "//***@", url)


def broker_app(broker_url: str, queue: str) -> Celery:
    """A Celery app for the bench's own use of the broker: its default queue is declared
    as variflow's app declares it (task_default_queue; Celery's default exchange and
    routing key for it), so deleting it here deletes what the real app published to."""
    return Celery(
        "variflow-bench",
        set_as_current=False,
        broker=broker_url,
        config_source={"task_default_queue": queue, "broker_connection_timeout": 3},
    )


def check_broker(broker: Celery) -> None:
    """Raise when the broker does not answer: a real app that cannot publish
    finalize_job would be measuring its connect timeouts, not its ingest."""
    with broker.connection_for_write() as conn:
        conn.ensure_connection(max_retries=1)


@dataclass(frozen=True)
class FinalizeCount:
    broker: str
    queue: str
    published: int  # messages the queue held at the end of the real app's runs
    expected: int

    def describe(self) -> str:
        verdict = "OK" if self.published == self.expected else "MISMATCH"
        return (
            f"finalize_job published to Redis at {self.broker} (queue {self.queue}):"
            f" {self.published} messages, expected {self.expected}"
            f" (one per completed job per run) - {verdict}"
        )


def delete_queue(broker: Celery) -> int:
    """Purge and delete the bench's queue (its messages and bindings); returns the
    number of messages it held."""
    with broker.connection_for_write() as conn:
        bound = broker.amqp.queues[broker.conf.task_default_queue].bind(conn.default_channel)
        bound.declare()  # known to this connection too, so delete() drops its bindings
        count = int(bound.purge() or 0)
        bound.delete()
    return count


# --------------------------------------------------------------------------- CPU accounting


def _processes() -> Iterator[tuple[int, int, str, float]]:
    """(pid, ppid, comm, cpu seconds) of every process we can read in /proc."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        fields = raw[raw.rindex(")") + 2 :].split()
        # fields[1] is ppid; fields[11], fields[12] are utime, stime (proc(5)).
        yield int(entry.name), int(fields[1]), comm, (int(fields[11]) + int(fields[12])) / CLK_TCK


@dataclass(frozen=True)
class CpuSnapshot:
    wall: float
    machine: float
    app: float
    postgres: float

    @classmethod
    def take(cls, master_pid: int | None = None) -> CpuSnapshot:
        app = postgres = 0.0
        for _pid, ppid, comm, cpu in _processes():
            if master_pid is not None and ppid == master_pid:
                app += cpu  # gunicorn workers are the master's children
            elif comm.startswith("postgres"):
                postgres += cpu
        return cls(time.monotonic(), busy_seconds(), app, postgres)


@dataclass(frozen=True)
class CpuUse:
    """CPU seconds spent during one run, by whom, over ``wall`` seconds."""

    wall: float
    machine: float
    app: float
    postgres: float
    loadgen: float

    @classmethod
    def between(cls, before: CpuSnapshot, after: CpuSnapshot, loadgen: float) -> CpuUse:
        return cls(
            wall=after.wall - before.wall,
            machine=after.machine - before.machine,
            app=after.app - before.app,
            postgres=after.postgres - before.postgres,
            loadgen=loadgen,
        )

    @property
    def other(self) -> float:
        """Everything else: the kernel, this script, and whatever else runs on the machine."""
        return max(0.0, self.machine - self.app - self.postgres - self.loadgen)

    def share(self, seconds: float) -> float:
        """CPU seconds as a fraction of the machine's capacity over the window."""
        return seconds / (self.wall * _cpus()) if self.wall > 0 else 0.0


def machine_background(seconds: float = 1.0) -> CpuUse:
    """What the machine is busy with before the bench starts (other tests, builds ...)."""
    before = CpuSnapshot.take()
    time.sleep(seconds)  # a measurement window, not a wait for something
    return CpuUse.between(before, CpuSnapshot.take(), 0.0)


# --------------------------------------------------------------------------- gunicorn


def real_app_spec() -> str:
    # Prefer a module-level WSGI object if the project grows one; else gunicorn's factory call.
    if importlib.util.find_spec("webhooks.wsgi") is not None:
        return "webhooks.wsgi:app"
    return "webhooks:create_app()"


def probe_route(port: int) -> bool:
    return http_status(port, "POST", f"/webhooks/piapi/{uuid.uuid4()}", b"{}") == 200


# --------------------------------------------------------------------------- running


@dataclass
class AppResult:
    name: str
    saturation: LoadReport
    open_loop: LoadReport
    offered_rate: float
    cpu_saturation: CpuUse
    cpu_open_loop: CpuUse
    verifications: list[tuple[str, Verification]] = field(default_factory=list)
    server_log: str = ""


def _measure(
    server: GunicornServer, workload: Workload, args: argparse.Namespace, rate: float | None
) -> tuple[LoadReport, CpuUse]:
    before = CpuSnapshot.take(server.pid)
    report = run_load(
        HOST,
        server.port,
        workload.thread_lists,
        args.load_processes,
        rate=rate,
        timeout=args.request_timeout,
    )
    cpu = CpuUse.between(before, CpuSnapshot.take(server.pid), report.loadgen_cpu_seconds)
    return report, cpu


def _line(label: str, report: LoadReport, cpu: CpuUse) -> str:
    errors = f", {report.errors} ERRORS" if report.errors else ""
    lag = f", send lag p99 {_ms(report.lag_percentile(99))} ms" if report.lags else ""
    return (
        f"  {label:<12} {report.sent} deliveries in {report.seconds:.2f} s = "
        f"{report.throughput:,.0f}/s  p50 {_ms(report.percentile(50))} ms  "
        f"p99 {_ms(report.percentile(99))} ms{lag}{errors}"
        f"  [CPU busy {cpu.share(cpu.machine):.0%}, other processes {cpu.share(cpu.other):.0%}]"
    )


def bench_app(
    server: GunicornServer,
    workload: Workload,
    warmup: Workload,
    args: argparse.Namespace,
    before_run: Callable[[], None] = lambda: None,
    after_run: Callable[[Workload], Verification | None] = lambda _load: None,
) -> AppResult:
    print(f"\n== {server.name}: {' '.join(server.command[1:])}", flush=True)
    started = time.monotonic()
    server.start()
    print(f"  ready in {time.monotonic() - started:.2f} s (polled readiness)", flush=True)
    verifications: list[tuple[str, Verification]] = []

    def run(label: str, load: Workload, rate: float | None) -> tuple[LoadReport, CpuUse]:
        before_run()
        report, cpu = _measure(server, load, args, rate)
        print(_line(label, report, cpu), flush=True)
        for sample in report.error_samples:
            print(f"    error: {sample}", flush=True)
        checked = after_run(load)
        if checked is not None:
            print(f"    database: {checked.describe()}", flush=True)
            verifications.append((label, checked))
        return report, cpu

    # Warm-up: every worker process imports, connects its pool, fills caches.
    run("warm-up", warmup, None)
    saturation, cpu = run("saturation", workload, None)
    rate = saturation.throughput * args.open_loop_fraction
    open_loop, cpu_open = run(f"open {rate:,.0f}/s", workload, rate)
    return AppResult(
        server.name,
        saturation,
        open_loop,
        rate,
        cpu,
        cpu_open,
        verifications,
        server_log=server.log(),
    )


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def print_report(
    real: AppResult,
    bare: AppResult,
    profiles: dict[str, SqlProfile],
    workload: Workload,
    background: CpuUse,
    finalize: FinalizeCount,
) -> None:
    per = 1e6 / max(1, workload.deliveries)
    rows: list[tuple[str, Callable[[AppResult], str]]] = [
        ("saturation: deliveries/s", lambda r: f"{r.saturation.throughput:,.0f}"),
        ("saturation: p50 ms", lambda r: _ms(r.saturation.percentile(50))),
        ("saturation: p99 ms", lambda r: _ms(r.saturation.percentile(99))),
        ("open loop: offered/s", lambda r: f"{r.offered_rate:,.0f}"),
        ("open loop: achieved/s", lambda r: f"{r.open_loop.throughput:,.0f}"),
        ("open loop: p50 ms", lambda r: _ms(r.open_loop.percentile(50))),
        ("open loop: p99 ms", lambda r: _ms(r.open_loop.percentile(99))),
        # High send lag means the generator, not the server, was late: p99 is then inflated.
        ("open loop: generator send lag p99 ms", lambda r: _ms(r.open_loop.lag_percentile(99))),
        ("errors (non-200 / failed)", lambda r: f"{r.saturation.errors + r.open_loop.errors}"),
        (
            "reconnects (idle keep-alive)",
            lambda r: f"{r.saturation.reconnects + r.open_loop.reconnects}",
        ),
        # CPU at saturation, per delivery: where the two cores went.
        ("sat. CPU us/delivery: app workers", lambda r: f"{r.cpu_saturation.app * per:,.0f}"),
        ("sat. CPU us/delivery: PostgreSQL", lambda r: f"{r.cpu_saturation.postgres * per:,.0f}"),
        ("sat. CPU us/delivery: load gen.", lambda r: f"{r.cpu_saturation.loadgen * per:,.0f}"),
        ("sat. CPU us/delivery: other", lambda r: f"{r.cpu_saturation.other * per:,.0f}"),
        (
            "sat. machine CPU busy",
            lambda r: f"{r.cpu_saturation.share(r.cpu_saturation.machine):.0%}",
        ),
        (
            "sat. other processes' CPU",
            lambda r: f"{r.cpu_saturation.share(r.cpu_saturation.other):.0%}",
        ),
    ]
    width = 38
    print("\n== results")
    print(f"{'':<{width}} {'variflow webhooks':>18} {'bare Flask':>12}")
    for label, value in rows:
        print(f"{label:<{width}} {value(real):>18} {value(bare):>12}")

    ratio = real.saturation.throughput / bare.saturation.throughput
    p99 = real.open_loop.percentile(99) * 1000
    print()
    print(
        f"throughput real/bare: {ratio:.2f}  (goal >= {RATIO_GOAL}: "
        f"{'met' if ratio >= RATIO_GOAL else 'NOT met'})"
    )
    print(
        f"real app p99 at {real.offered_rate:,.0f}/s (open loop): {p99:.1f} ms  "
        f"(goal < {P99_GOAL_MS:.0f} ms: {'met' if p99 < P99_GOAL_MS else 'NOT met'})"
    )
    all_ok = all(v.ok for _, v in real.verifications)
    print(
        "deliveries applied: "
        + ("yes, every run verified in the database" if all_ok else "NO, see MISMATCH above")
    )
    print(finalize.describe())
    busiest = max(
        background.share(background.machine),
        *(r.cpu_saturation.share(r.cpu_saturation.other) for r in (real, bare)),
    )
    if busiest > NOISY_SHARE:
        print(
            f"note: other processes used up to {busiest:.0%} of the CPUs during the bench"
            " (see 'other' above): the numbers are noisy, compare them on a quiet machine"
        )

    print("\n== PostgreSQL round trips per delivery (in-process, Flask test client)")
    for label, profile in profiles.items():
        statements = ", ".join(profile.statements)
        print(
            f"  {label:<30} {profile.round_trips} round trips: {profile.pings} pre-ping, "
            f"{profile.begins} BEGIN, [{statements}], {profile.commits} COMMIT"
            + (f", {profile.rollbacks} ROLLBACK" if profile.rollbacks else "")
        )

    for result in (real, bare):
        noise = [
            line
            for line in result.server_log.splitlines()
            if "Traceback" in line or " ERROR " in line or "[ERROR]" in line
        ]
        if noise:
            print(f"\n{result.name}: gunicorn log has {len(noise)} error lines, e.g. {noise[0]}")


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workload_threads = args.load_processes * args.load_threads
    print("== webhook ingest benchmark")
    print(
        f"machine: {os.cpu_count()} CPUs ({_cpus()} usable by this process); the load generator,"
        " gunicorn and PostgreSQL all share them, so absolute numbers are a floor"
    )
    print(
        f"gunicorn (both apps): gthread, {args.workers} workers x {args.threads} threads,"
        f" bound to {HOST}; VARIFLOW_LOG_LEVEL=WARNING"
    )
    queue = f"variflow_bench_{os.getpid()}"
    broker = _redacted(args.broker_url)
    print(
        f"broker: Redis at {broker}, queue {queue} (VARIFLOW_BROKER_URL, VARIFLOW_QUEUE):"
        " the real app publishes finalize_job there for every completed job; deleted at the end"
    )
    print(
        f"load generator: {args.load_processes} processes x {args.load_threads} keep-alive"
        f" connections (http.client); open loop at {args.open_loop_fraction:.0%} of saturation"
    )

    background = machine_background()
    print(
        f"machine busy before start: {background.share(background.machine):.0%} of"
        f" {_cpus()} CPUs (other processes)"
    )

    broker_queue = broker_app(args.broker_url, queue)
    try:
        check_broker(broker_queue)
    except Exception as exc:
        print(f"cannot reach the broker {broker}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    broker_env = {"VARIFLOW_BROKER_URL": args.broker_url, "VARIFLOW_QUEUE": queue}

    db_name = f"variflow_bench_{os.getpid()}"
    db_url = create_database(args.database_url, db_name)
    engine = nullpool_engine(db_url)
    servers: list[GunicornServer] = []
    queue_deleted = False
    try:
        print(f"database: {db_name} (dropped at the end)")
        upgrade(db_url.render_as_string(hide_password=False))
        jobs = insert_jobs(engine, args.jobs)
        workload = build_workload(jobs, workload_threads, args.duplicates)
        warmup = build_workload(jobs[: args.warmup_jobs], workload_threads, args.duplicates)
        print(
            f"workload per run: {workload.jobs} jobs -> {workload.deliveries} deliveries"
            f" (processing + completed each, {workload.extras} duplicate/late);"
            f" warm-up {warmup.deliveries} deliveries",
            flush=True,
        )
        profiles = profile_sql(db_url, jobs, broker_env)

        env = {
            "VARIFLOW_DATABASE_URL": db_url.render_as_string(hide_password=False),
            "VARIFLOW_LOG_LEVEL": "WARNING",
            **broker_env,
        }
        real_server = GunicornServer(
            "variflow webhooks",
            real_app_spec(),
            workers=args.workers,
            threads=args.threads,
            env=env,
            probe=probe_healthz,
        )
        servers.append(real_server)
        real = bench_app(
            real_server,
            workload,
            warmup,
            args,
            before_run=lambda: reset_jobs(engine),
            after_run=lambda load: verify(engine, load),
        )
        real_server.stop()
        # One finalize_job per completed job: the SQL profile's one, then every job of
        # each real-app run (warm-up, saturation, open loop; reset_jobs before each).
        finalize = FinalizeCount(
            broker=broker,
            queue=queue,
            published=delete_queue(broker_queue),
            expected=1 + warmup.jobs + 2 * workload.jobs,
        )
        queue_deleted = True

        bare_server = GunicornServer(
            "bare Flask",
            "bare_app:app",
            workers=args.workers,
            threads=args.threads,
            env=env,
            probe=probe_route,
            pythonpath=BENCH_DIR,
        )
        servers.append(bare_server)
        bare = bench_app(bare_server, workload, warmup, args)
        bare_server.stop()
        print_report(real, bare, profiles, workload, background, finalize)
    finally:
        for server in servers:
            server.stop()
        engine.dispose()
        drop_database(args.database_url, db_name)
        if not queue_deleted:
            try:
                delete_queue(broker_queue)
            except Exception as exc:
                print(f"could not delete the queue {queue}: {exc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
