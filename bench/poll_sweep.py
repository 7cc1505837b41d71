"""Polling-cycle benchmark: one complete cycle over N in-flight Piclaza jobs, vs its SQL floor.

For ``make bench`` (``.venv/bin/python bench/poll_sweep.py``). It prints numbers
and exits 0 whether or not the scaling goal is met; it exits 1 when a correctness
check fails (upstream requests != ceil(N / batch size), a job polled twice or not at
all) and 2 when it could not measure (database unreachable, ...).

What it does, for each N in ``--sizes`` (default 1,000 / 10,000 / 100,000):

1. Jobs. A throw-away PostgreSQL database (``variflow_bench_poll_<pid>``, migrated
   with ``worker.migrate.upgrade``, dropped at the end, always) receives N Piclaza
   jobs by ``COPY``: status ``processing``, a unique upstream task id, next_poll_at
   in the past (staggered by 1 ms so ``ORDER BY next_poll_at`` has real work), a
   deadline a day away, poll_attempts 0.
2. Upstream. The sandbox (``sandbox.server.SandboxServer``, in a thread of this
   process, real HTTP on 127.0.0.1) knows every one of those task ids: they are
   created through the sandbox's own state API, ``SandboxState.create_task`` (what
   its create endpoint calls after validating the body), with ``pending_seconds=0``
   and ``processing_seconds`` = one day, so every query item answers at once with
   ``status: "running"``. That is the steady state a cycle pays for most often: the
   job stays ``processing``, the answer is a duplicate (no JobEvent, as pollers
   skip those), poll_attempts goes up by one and next_poll_at moves on with backoff.
3. The cycle: exactly what beat's ``poll_due`` and the ``poll_batch`` tasks do,
   minus the broker -- ``lease_due(runtime, now)`` until it returns nothing, and
   ``poll_jobs(provider, job_ids, runtime)`` for every batch it hands out. ``now``
   is fixed at the start of the cycle, so "one complete cycle" means: every job due
   when it started is polled exactly once (with a moving ``now``, jobs polled early
   in a long cycle would be due again before it ends -- backoff caps at 60 s).
4. The floor, same run, same jobs: next_poll_at and poll_attempts are reset with one
   UPDATE, then the same loop runs with a runtime whose Piclaza adapter is a
   stand-in (same settings, engine and HTTP client otherwise) whose ``poll()``
   builds the UpstreamState objects a "running" answer parses to, locally. Leases,
   the targets SELECT, the SELECT ... FOR UPDATE and the updates of
   ``_apply_answers`` are the very same code and SQL; only the HTTP request, the
   sandbox's work and the JSON parsing are gone. cycle/floor is the price of
   talking to the provider.

Before each measured run the table is VACUUMed (ANALYZE): a cycle updates every row
twice, and the floor, which runs second, must not pay for the cycle's dead tuples.
An unreported warm-up cycle + floor (``--warmup`` jobs) runs first, so the first
size does not pay for SQLAlchemy's statement compilation and the first connections.

The process's runtime is built once from the bench's settings, as a worker builds
its own (``worker.celery_app.build_runtime``), and installed as the current one.
SQL is counted with SQLAlchemy events on its engine (``runtime.db.engine``): cursor
executes (``before_cursor_execute``; an ``executemany`` is one execute carrying many rows),
BEGIN/COMMIT and pool pre-pings, attributed to the lease or the poll step. Upstream
requests come from the sandbox's own counter (``stats()["piclaza_batch"]``).

Everything shares the machine's CPUs (this process, the sandbox thread and
PostgreSQL): absolute numbers are a floor, the ratios are the point. The loop is
sequential (it waits for each answer), so the sandbox thread and the worker code do
not run at the same time; CPU used meanwhile by other processes is reported, and runs
where it exceeds 10% of the machine are flagged as noisy.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import itertools
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from _db import create_database, drop_database, nullpool_engine
from _machine import CLK_TCK, busy_seconds
from sqlalchemy import Engine, event, text

from sandbox.config import SandboxConfig
from sandbox.server import SandboxServer
from sandbox.state import NewTask, SandboxState
from worker import runtime as runtimes
from worker.celery_app import build_runtime
from worker.config import load_settings
from worker.devstack import SANDBOX_KEY, sandbox_env
from worker.migrate import upgrade
from worker.polling import lease_due, poll_jobs
from worker.providers.base import PollTarget, Provider
from worker.runtime import Providers, Runtime
from worker.states import JobStatus, Source, UpstreamState

PROVIDER = "piclaza"
DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DEFAULT_SIZES = (1_000, 10_000, 100_000)
LINEAR_GOAL = 11.0  # t(10 N) / t(N): 10x the jobs may cost at most 11x the time
# Above this share of the machine used by other processes, say that the numbers are noisy.
NOISY = 0.10
# Tasks stay "running" for this long: longer than any run.
RUNNING_FOR_SECONDS = 86_400.0
# Sandbox knobs that make every query answer at once with "running".
SANDBOX_KNOBS: dict[str, Any] = {
    "pending_seconds": 0.0,
    "processing_seconds": RUNNING_FOR_SECONDS,
    "images_per_task": 1,  # registered per task; never downloaded here
    "seed": 1,
}


# --------------------------------------------------------------------------- arguments


def _sizes(value: str) -> list[int]:
    try:
        sizes = [int(part.replace("_", "")) for part in value.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a comma-separated list of integers: {value!r}"
        ) from None
    if not sizes or any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError("sizes must be positive integers")
    return sizes


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--sizes",
        type=_sizes,
        default=list(DEFAULT_SIZES),
        help="in-flight job counts, comma-separated",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=50,
        help="VARIFLOW_PICLAZA_BATCH_SIZE: task ids per Piclaza query (1..100)",
    )
    parser.add_argument(
        "--lease-limit",
        type=int,
        default=500,
        help="VARIFLOW_POLL_BATCH_LIMIT: jobs leased per lease_due call",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=500,
        help="jobs of an unreported warm-up cycle + floor (0: none)",
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("VARIFLOW_BENCH_DATABASE_URL", DEFAULT_ADMIN_URL),
        help="a PostgreSQL database to connect to for CREATE/DROP DATABASE "
        "(env VARIFLOW_BENCH_DATABASE_URL); the bench creates its own database",
    )
    args = parser.parse_args(argv)
    if not 1 <= args.batch_size <= 100:
        parser.error("--batch-size must be between 1 and 100 (Piclaza's and the setting's limit)")
    if args.lease_limit < 1:
        parser.error("--lease-limit must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must not be negative")
    return args


# --------------------------------------------------------------------------- database


_COPY_COLUMNS = (
    "id, provider, status, params, upstream_task_id, progress, submit_attempts,"
    " poll_attempts, next_poll_at, deadline, created_at, updated_at, submitted_at"
)


def load_jobs(engine: Engine, job_ids: Sequence[uuid.UUID], task_ids: Sequence[str]) -> float:
    """Empty the tables and COPY one ``processing`` job per (id, task id); returns seconds."""
    started = time.perf_counter()
    now = datetime.now(UTC)
    first_due = now - timedelta(hours=1)
    deadline = now + timedelta(days=1)
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("TRUNCATE jobs, job_events, job_inputs CASCADE")
        with cursor.copy(f"COPY jobs ({_COPY_COLUMNS}) FROM STDIN") as copy:
            for i, (job_id, task_id) in enumerate(zip(job_ids, task_ids, strict=True)):
                # created_at doubles as the due time: reset_jobs() restores it in one UPDATE.
                due = first_due + timedelta(milliseconds=i)
                params = json.dumps({"image_url": f"https://images.example/in/{i}.png"})
                copy.write_row(
                    (
                        job_id,
                        PROVIDER,
                        JobStatus.PROCESSING.value,
                        params,
                        task_id,
                        0,
                        1,
                        0,
                        due,
                        deadline,
                        due,
                        due,
                        due,
                    )
                )
        raw.commit()
    finally:
        raw.close()
    vacuum(engine)
    return time.perf_counter() - started


def reset_jobs(engine: Engine) -> None:
    """Every job due again, as before the cycle: one UPDATE (then VACUUM, see vacuum())."""
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE jobs SET next_poll_at = created_at, poll_attempts = 0,"
                " updated_at = created_at"
            )
        )
    vacuum(engine)


def vacuum(engine: Engine) -> None:
    # Each cycle updates every row twice (lease, apply). Without this the floor,
    # which runs second, would scan the cycle's dead tuples and look slower.
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.exec_driver_sql("VACUUM (ANALYZE) jobs")


@dataclass(frozen=True)
class JobCheck:
    total: int
    processing: int
    polled_once: int
    still_due: int
    events: int

    def ok(self, expected: int) -> bool:
        return (
            self.total == expected
            and self.processing == expected
            and self.polled_once == expected
            and self.still_due == 0
            and self.events == 0
        )

    def describe(self) -> str:
        return (
            f"{self.polled_once}/{self.total} jobs polled exactly once,"
            f" {self.processing} still processing, {self.still_due} still due,"
            f" {self.events} events"
        )


def check_jobs(engine: Engine, cycle_now: datetime) -> JobCheck:
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT count(*), count(*) FILTER (WHERE status = 'processing'),"
                " count(*) FILTER (WHERE poll_attempts = 1),"
                " count(*) FILTER (WHERE next_poll_at <= :now),"
                " (SELECT count(*) FROM job_events) FROM jobs"
            ),
            {"now": cycle_now},
        ).one()
    return JobCheck(*(int(v) for v in row))


# --------------------------------------------------------------------------- sandbox


def create_sandbox_tasks(
    state: SandboxState, job_ids: Sequence[uuid.UUID], public_base: str
) -> list[str]:
    """One Piclaza task per job through the sandbox's state API, as its create endpoint
    makes them (sandbox/piclaza.py ``create_task``; the worker sends the job id as the
    title, which the sandbox keeps as the correlation); returns their task ids."""
    state.reset(keep_config=True)
    config = state.config
    user_id = "user_" + hashlib.sha256(SANDBOX_KEY.encode()).hexdigest()[:12]
    ids = []
    for i, job_id in enumerate(job_ids):
        image_url = f"https://images.example/in/{i}.png"
        task = state.create_task(
            NewTask(
                provider="piclaza",
                correlation=str(job_id),
                request={"image_url": image_url, "source": "api"},
                public_base=public_base,
                result_count=config.images_per_task,
                image_size=config.image_size,
                extra={
                    "group_id": str(uuid.uuid4()),
                    "request_id": str(uuid.uuid4()),
                    "user_id": user_id,
                    "source": "api",
                    "reference": image_url,
                },
            )
        )
        ids.append(task.task_id)
    return ids


def batch_stats(state: SandboxState) -> tuple[int, int]:
    stats = state.stats()["piclaza_batch"]
    return int(stats["queries"]), int(stats["ids"])


# --------------------------------------------------------------------------- SQL counting


def describe_sql(statement: str) -> str:
    words = statement.split()
    verb = words[0].upper() if words else "?"
    match = re.search(r"\b(?:FROM|INTO|UPDATE)\s+(\w+)", statement, re.IGNORECASE)
    table = match.group(1) if match else ""
    suffix = " FOR UPDATE" if "FOR UPDATE" in statement.upper() else ""
    return f"{verb} {table}{suffix}".strip()


@dataclass
class SqlTally:
    executes: int = 0  # cursor executes (an executemany counts once)
    rows: int = 0  # parameter sets sent (an executemany counts each of its rows)
    begins: int = 0
    commits: int = 0
    rollbacks: int = 0
    pings: int = 0
    kinds: Counter[str] = field(default_factory=Counter)  # "UPDATE jobs x50" -> executes

    def merged(self, other: SqlTally) -> SqlTally:
        return SqlTally(
            executes=self.executes + other.executes,
            rows=self.rows + other.rows,
            begins=self.begins + other.begins,
            commits=self.commits + other.commits,
            rollbacks=self.rollbacks + other.rollbacks,
            pings=self.pings + other.pings,
            kinds=self.kinds + other.kinds,
        )

    @property
    def round_trips(self) -> int:
        """psycopg sends BEGIN as its own query; an executemany is pipelined (~1 trip)."""
        return self.executes + self.begins + self.commits + self.rollbacks + self.pings


class SqlCounter:
    """Counts what the worker's engine sends, by phase ("pending" during a lease_due
    call, then "lease" or "final"; "poll"; "other")."""

    def __init__(self, engine: Engine) -> None:
        self.phase = "other"
        self.tallies: dict[str, SqlTally] = {}
        # lease_due's SELECT ... FOR UPDATE as sent (text, parameters), for EXPLAIN.
        self.lease_select: tuple[str, Any] | None = None
        event.listen(engine, "before_cursor_execute", self._on_execute)
        event.listen(engine, "begin", self._on_begin)
        event.listen(engine, "commit", self._on_commit)
        event.listen(engine, "rollback", self._on_rollback)
        # pool_pre_ping runs below the event layer: count it at the dialect.
        dialect: Any = engine.dialect
        do_ping = dialect.do_ping

        def counting_ping(dbapi_connection: Any) -> bool:
            self._tally().pings += 1
            return bool(do_ping(dbapi_connection))

        dialect.do_ping = counting_ping

    def _tally(self) -> SqlTally:
        return self.tallies.setdefault(self.phase, SqlTally())

    def _on_execute(
        self,
        _conn: Any,
        _cursor: Any,
        statement: str,
        parameters: Any,
        _context: Any,
        executemany: bool,
    ) -> None:
        tally = self._tally()
        rows = len(parameters) if executemany else 1
        tally.executes += 1
        tally.rows += rows
        kind = describe_sql(statement)
        tally.kinds[f"{kind} (executemany x{rows})" if executemany else kind] += 1
        if self.phase == "pending" and self.lease_select is None and kind.endswith("FOR UPDATE"):
            self.lease_select = (statement, parameters)

    def _on_begin(self, _conn: Any) -> None:
        self._tally().begins += 1

    def _on_commit(self, _conn: Any) -> None:
        self._tally().commits += 1

    def _on_rollback(self, _conn: Any) -> None:
        self._tally().rollbacks += 1

    def reset(self) -> None:
        self.tallies = {}
        self.phase = "other"

    def get(self, phase: str) -> SqlTally:
        return self.tallies.get(phase, SqlTally())

    def move(self, source: str, target: str) -> None:
        """Add what was counted under ``source`` to ``target``."""
        moved = self.tallies.pop(source, None)
        if moved is not None:
            self.tallies[target] = self.get(target).merged(moved)


# --------------------------------------------------------------------------- the floor


class LocalAnswers:
    """A Piclaza adapter stand-in whose poll() answers "running" for every id, locally.

    The UpstreamState objects are the ones ``PiclazaProvider.poll`` parses a
    "running" item to, so ``_apply_answers`` does exactly the same work.
    """

    def __init__(self, real: Provider) -> None:
        self._real = real
        self.batch_poll_size = real.batch_poll_size
        self.webhook_grace = real.webhook_grace  # None: Piclaza is only polled
        self.polls = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def poll(self, targets: Sequence[PollTarget]) -> dict[str, UpstreamState]:
        self.polls += 1
        return {
            t.upstream_task_id: UpstreamState(
                JobStatus.PROCESSING,
                Source.POLL,
                upstream_task_id=t.upstream_task_id,
                payload={"status": "running", "task_id": t.upstream_task_id, "code": 0},
            )
            for t in targets
        }


class TimedPolls:
    """The real Piclaza adapter, with the wall time of each poll() recorded
    (HTTP + the sandbox's work + parsing)."""

    def __init__(self, real: Provider) -> None:
        self._real = real
        self.batch_poll_size = real.batch_poll_size
        self.webhook_grace = real.webhook_grace
        self.durations: list[float] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def poll(self, targets: Sequence[PollTarget]) -> dict[str, UpstreamState]:
        started = time.perf_counter()
        try:
            return self._real.poll(targets)
        finally:
            self.durations.append(time.perf_counter() - started)


def with_adapter(runtime: Runtime, adapter: Any) -> Runtime:
    """The same runtime (settings, database, HTTP client) with ``adapter`` for Piclaza:
    lease_due and poll_jobs then use it, with the very same code and SQL."""
    adapters = {name: runtime.providers.get(name) for name in runtime.providers.names()}
    providers = Providers({**adapters, PROVIDER: adapter}, runtime.providers.enabled)
    return dataclasses.replace(runtime, providers=providers)


# --------------------------------------------------------------------------- one cycle


def _postgres_cpu_seconds(database: str) -> float:
    """CPU seconds of PostgreSQL working for us: the backends connected to ``database``
    and the server's own processes (WAL writer, checkpointer ...), not other databases'."""
    ticks = CLK_TCK
    total = 0.0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_text()
            title = Path(entry.path, "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue  # exited meanwhile
        if not raw[raw.index("(") + 1 : raw.rindex(")")].startswith("postgres"):
            continue
        # A backend's title is "postgres: <cluster>: <user> <database> <host>(<port>) ...".
        is_backend = re.search(r"\(\d+\)|\[local\]", title) is not None
        if is_backend and f" {database} " not in title:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def _cpus() -> int:
    return len(os.sched_getaffinity(0))


def lease_plan(engine: Engine, lease_select: tuple[str, Any]) -> str:
    """The plan PostgreSQL chooses for lease_due's SELECT now, as a chain of nodes."""
    statement, parameters = lease_select
    now = datetime.now(UTC)
    if isinstance(parameters, Mapping):
        parameters = {k: now if isinstance(v, datetime) else v for k, v in parameters.items()}
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("EXPLAIN (FORMAT JSON) " + statement, parameters)
        row = cursor.fetchone()
        raw.rollback()
    finally:
        raw.close()
    assert row is not None
    plan = row[0] if isinstance(row[0], list) else json.loads(row[0])
    node: dict[str, Any] | None = plan[0]["Plan"]
    chain = []
    while node is not None:
        label = node["Node Type"]
        if "Index Name" in node:
            label += f" using {node['Index Name']}"
        elif "Relation Name" in node:
            label += f" on {node['Relation Name']}"
        if "Sort Key" in node:
            label += f" ({', '.join(node['Sort Key'])})"
        chain.append(f"{label} [est. {node['Plan Rows']} rows]")
        children = node.get("Plans") or []
        node = children[0] if children else None
    return " <- ".join(chain)


@dataclass
class CycleResult:
    jobs: int
    seconds: float
    lease_seconds: float
    poll_seconds: float
    leases: int
    lease_sizes: list[int]
    lease_durations: list[float]
    poll_batches: int
    lease_sql: SqlTally  # the leases that found jobs
    poll_sql: SqlTally
    final_sql: SqlTally  # the last lease_due call, which found nothing
    process_cpu: float
    postgres_cpu: float
    machine_cpu: float
    check: JobCheck
    upstream_requests: int = 0
    upstream_ids: int = 0
    upstream_seconds: float = 0.0

    @property
    def jobs_per_second(self) -> float:
        return self.jobs / self.seconds if self.seconds > 0 else 0.0

    @property
    def total_sql(self) -> SqlTally:
        return self.lease_sql.merged(self.poll_sql).merged(self.final_sql)

    @property
    def other_cpu(self) -> float:
        """CPU used by other processes on the machine meanwhile (noise)."""
        return max(0.0, self.machine_cpu - self.process_cpu - self.postgres_cpu)

    @property
    def other_share(self) -> float:
        return self.other_cpu / (self.seconds * _cpus()) if self.seconds > 0 else 0.0

    def lease_ms(self, part: slice) -> float:
        chosen = self.lease_durations[part]
        return 1000 * sum(chosen) / len(chosen) if chosen else float("nan")


def run_cycle(engine: Engine, runtime: Runtime, counter: SqlCounter, jobs: int) -> CycleResult:
    """lease_due until it returns nothing, poll_jobs for every batch: one complete cycle."""
    counter.reset()
    now = datetime.now(UTC)
    lease_sizes: list[int] = []
    lease_durations: list[float] = []
    lease_seconds = poll_seconds = 0.0
    poll_batches = 0
    database = engine.url.database or ""
    cpu_before, pg_before = time.process_time(), _postgres_cpu_seconds(database)
    machine_before = busy_seconds()
    started = time.perf_counter()
    while True:
        counter.phase = "pending"
        t0 = time.perf_counter()
        batches = lease_due(runtime, now)
        t1 = time.perf_counter()
        lease_seconds += t1 - t0
        counter.move("pending", "lease" if batches else "final")
        if not batches:
            break
        lease_durations.append(t1 - t0)
        lease_sizes.append(sum(len(b.job_ids) for b in batches))
        counter.phase = "poll"
        for batch in batches:
            poll_jobs(batch.provider, batch.job_ids, runtime)
            poll_batches += 1
        poll_seconds += time.perf_counter() - t1
    seconds = time.perf_counter() - started
    process_cpu = time.process_time() - cpu_before
    postgres_cpu = _postgres_cpu_seconds(database) - pg_before
    machine_cpu = busy_seconds() - machine_before
    counter.phase = "other"
    return CycleResult(
        jobs=jobs,
        seconds=seconds,
        lease_seconds=lease_seconds,
        poll_seconds=poll_seconds,
        leases=len(lease_sizes),
        lease_sizes=lease_sizes,
        lease_durations=lease_durations,
        poll_batches=poll_batches,
        lease_sql=counter.get("lease"),
        poll_sql=counter.get("poll"),
        final_sql=counter.get("final"),
        process_cpu=process_cpu,
        postgres_cpu=postgres_cpu,
        machine_cpu=machine_cpu,
        check=check_jobs(engine, now),
    )


@dataclass
class SizeResult:
    jobs: int
    load_seconds: float
    expected_requests: int
    cycle: CycleResult
    floor: CycleResult
    plan: str = ""

    @property
    def ratio(self) -> float:
        return self.cycle.seconds / self.floor.seconds if self.floor.seconds > 0 else math.inf

    @property
    def problems(self) -> list[str]:
        found = []
        if self.cycle.upstream_requests != self.expected_requests:
            found.append(
                f"N={self.jobs}: {self.cycle.upstream_requests} upstream requests,"
                f" expected ceil(N / batch size) = {self.expected_requests}"
            )
        if self.cycle.upstream_ids != self.jobs:
            found.append(f"N={self.jobs}: {self.cycle.upstream_ids} task ids queried, expected N")
        for label, run in (("cycle", self.cycle), ("floor", self.floor)):
            if not run.check.ok(self.jobs):
                found.append(f"N={self.jobs} {label}: {run.check.describe()}")
        if self.floor.poll_batches != self.cycle.poll_batches:
            found.append(
                f"N={self.jobs}: floor ran {self.floor.poll_batches} poll batches,"
                f" cycle {self.cycle.poll_batches}"
            )
        return found


def bench_size(
    jobs: int,
    args: argparse.Namespace,
    engine: Engine,
    sandbox: SandboxServer,
    runtime: Runtime,
    counter: SqlCounter,
) -> SizeResult:
    started = time.perf_counter()
    job_ids = [uuid.uuid4() for _ in range(jobs)]
    task_ids = create_sandbox_tasks(sandbox.state, job_ids, sandbox.url)
    tasks_seconds = time.perf_counter() - started
    load_seconds = load_jobs(engine, job_ids, task_ids)
    print(
        f"  N={jobs}: {jobs} sandbox tasks in {tasks_seconds:.1f}s,"
        f" {jobs} jobs copied + vacuumed in {load_seconds:.1f}s",
        flush=True,
    )
    del job_ids, task_ids

    queries_before, ids_before = batch_stats(sandbox.state)
    upstream = TimedPolls(runtime.providers.get(PROVIDER))
    cycle = run_cycle(engine, with_adapter(runtime, upstream), counter, jobs)
    queries_after, ids_after = batch_stats(sandbox.state)
    cycle.upstream_requests = queries_after - queries_before
    cycle.upstream_ids = ids_after - ids_before
    cycle.upstream_seconds = sum(upstream.durations)
    print(f"  N={jobs}: cycle {cycle.seconds:.2f}s ({cycle.check.describe()})", flush=True)

    reset_jobs(engine)
    # Every job due again, statistics fresh: the state the cycle started from.
    plan = lease_plan(engine, counter.lease_select) if counter.lease_select else "?"
    local = LocalAnswers(runtime.providers.get(PROVIDER))
    floor = run_cycle(engine, with_adapter(runtime, local), counter, jobs)
    floor.upstream_requests = local.polls
    floor.upstream_ids = floor.check.polled_once
    if batch_stats(sandbox.state)[0] != queries_after:
        raise RuntimeError("the floor sent requests to the sandbox")
    print(f"  N={jobs}: floor {floor.seconds:.2f}s ({floor.check.describe()})", flush=True)
    return SizeResult(
        jobs=jobs,
        load_seconds=load_seconds,
        expected_requests=math.ceil(jobs / args.batch_size),
        cycle=cycle,
        floor=floor,
        plan=plan,
    )


# --------------------------------------------------------------------------- report


def _per(total: float, count: int) -> str:
    return f"{total / count:.1f}" if count else "-"


def print_table(results: Sequence[SizeResult]) -> None:
    header = (
        f"{'N':>7} {'leases':>6} {'requests':>13} {'SQL exec':>9} {'rows':>8}"
        f" {'exec/poll':>9} {'exec/lease':>10} {'cycle s':>8} {'floor s':>8}"
        f" {'cyc/flr':>7} {'jobs/s':>7} {'floor/s':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        c = r.cycle
        total = c.total_sql
        requests = f"{r.expected_requests}/{c.upstream_requests}"
        mark = "" if c.upstream_requests == r.expected_requests else "!"
        print(
            f"{r.jobs:>7} {c.leases:>6} {requests + mark:>13} {total.executes:>9}"
            f" {total.rows:>8} {_per(c.poll_sql.executes, c.poll_batches):>9}"
            f" {_per(c.lease_sql.executes, c.leases):>10} {c.seconds:>8.2f}"
            f" {r.floor.seconds:>8.2f} {r.ratio:>7.2f} {c.jobs_per_second:>7.0f}"
            f" {r.floor.jobs_per_second:>7.0f}"
        )
    print(
        "  requests = expected ceil(N / batch size) / counted by the sandbox;"
        " SQL exec = cursor executes (leases + polls + the final lease_due that finds nothing);"
        " rows = parameter sets (an executemany UPDATE of 50 rows = 1 exec, 50 rows)"
    )


def print_breakdown(results: Sequence[SizeResult], batch_size: int, lease_limit: int) -> None:
    print()
    print("where the time goes (seconds; upstream = adapter.poll: HTTP + sandbox + parsing):")
    header = (
        f"{'N':>7} {'run':>5} {'total':>7} {'lease':>7} {'poll':>7} {'upstream':>8}"
        f" {'lease ms first/last 10%':>24} {'py CPU':>7} {'pg CPU':>7} {'others':>7}"
    )
    print(header)
    for r in results:
        for label, run in (("cycle", r.cycle), ("floor", r.floor)):
            tenth = max(1, run.leases // 10)
            first_last = (
                f"{run.lease_ms(slice(0, tenth)):.1f} / {run.lease_ms(slice(-tenth, None)):.1f}"
            )
            upstream = f"{run.upstream_seconds:.2f}" if label == "cycle" else "-"
            print(
                f"{r.jobs:>7} {label:>5} {run.seconds:>7.2f} {run.lease_seconds:>7.2f}"
                f" {run.poll_seconds:>7.2f} {upstream:>8} {first_last:>24}"
                f" {run.process_cpu:>7.2f} {run.postgres_cpu:>7.2f}"
                f" {run.other_share:>7.0%}"
            )
    print(
        "  py CPU = this process (worker code + the sandbox thread); pg CPU = PostgreSQL;"
        f" others = CPU used by other processes meanwhile, share of {_cpus()} CPUs"
    )
    noisy = [r.jobs for r in results if max(r.cycle.other_share, r.floor.other_share) > NOISY]
    if noisy:
        print(
            f"  NOISY: other processes used more than {NOISY:.0%} of the machine during N ="
            f" {', '.join(map(str, noisy))}; those times (and ratios using them) are inflated"
        )
    print()
    print("lease_due's SELECT as PostgreSQL plans it (EXPLAIN, every job due, fresh statistics):")
    for r in results:
        print(f"  N={r.jobs}: {r.plan}")

    biggest = max(results, key=lambda r: r.jobs)
    c = biggest.cycle
    print()
    print(f"SQL of the cycle at N={biggest.jobs}, per step (cursor executes, by statement):")
    for tally, count, unit in (
        (c.lease_sql, c.leases, f"lease ({lease_limit} jobs, 1 lease_due call)"),
        (c.poll_sql, c.poll_batches, f"poll batch ({batch_size} jobs, 1 request)"),
    ):
        kinds = ", ".join(f"{kind} x{n / count:.2f}" for kind, n in sorted(tally.kinds.items()))
        print(
            f"  per {unit}: {kinds};"
            f" + BEGIN x{tally.begins / count:.2f}, COMMIT x{tally.commits / count:.2f},"
            f" pre-ping x{tally.pings / count:.2f}"
            f" -> {tally.round_trips / count:.1f} round trips, {tally.rows / count:.1f} rows"
        )
    if c.leases:
        both = c.lease_sql.merged(c.poll_sql)
        print(
            f"  per lease with its {c.poll_batches / c.leases:.0f} poll batches"
            f" ({sum(c.lease_sizes) / c.leases:.0f} jobs): {both.executes / c.leases:.1f}"
            f" executes, {both.round_trips / c.leases:.1f} round trips,"
            f" {both.rows / c.leases:.0f} rows = {both.rows / max(1, sum(c.lease_sizes)):.2f}"
            " statements per job (each executemany row is one UPDATE on the server)"
        )
    f = biggest.floor.total_sql
    t = c.total_sql
    same = (
        "identical"
        if (f.executes, f.rows, f.kinds) == (t.executes, t.rows, t.kinds)
        else "DIFFERENT"
    )
    print(
        f"  floor vs cycle SQL at N={biggest.jobs}: {same}"
        f" ({f.executes} vs {t.executes} executes, {f.rows} vs {t.rows} rows)"
    )


def print_scaling(results: Sequence[SizeResult]) -> None:
    by_size = {r.jobs: r for r in results}
    sizes = sorted(by_size)
    print()
    print(
        f"scaling (goal: t(10 N) / t(N) <= {LINEAR_GOAL:g}, i.e. linear; reported, not enforced):"
    )
    pairs = [(a, b) for a in sizes for b in sizes if b == 10 * a]
    if not pairs:
        pairs = list(itertools.pairwise(sizes))
    if not pairs:
        print("  (one size only: nothing to compare)")
    for small, large in sorted(pairs, key=lambda p: -p[1]):
        goal = LINEAR_GOAL * large / small / 10
        for label, t_large, t_small in (
            ("cycle", by_size[large].cycle.seconds, by_size[small].cycle.seconds),
            ("floor", by_size[large].floor.seconds, by_size[small].floor.seconds),
        ):
            ratio = t_large / t_small if t_small > 0 else math.inf
            verdict = "meets" if ratio <= goal else "MISSES"
            print(
                f"  {label}: t({large})/t({small}) = {ratio:.2f}  ({verdict} the goal <= {goal:g})"
            )
        cpu_large, cpu_small = (
            by_size[n].cycle.process_cpu + by_size[n].cycle.postgres_cpu for n in (large, small)
        )
        print(
            f"  cycle CPU seconds (this process + PostgreSQL; less sensitive to other load):"
            f" {cpu_large:.2f} / {cpu_small:.2f}"
            f" = {cpu_large / cpu_small if cpu_small > 0 else math.inf:.2f}"
        )


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def bench_environment(values: Mapping[str, str]) -> Iterator[None]:
    """Only these VARIFLOW_* variables (a developer's shell must not change the numbers)."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("VARIFLOW_")}
    for name in saved:
        if not name.startswith("VARIFLOW_BENCH_"):
            del os.environ[name]
    os.environ.update(values)
    try:
        yield
    finally:
        for name in [k for k in os.environ if k.startswith("VARIFLOW_")]:
            del os.environ[name]
        os.environ.update(saved)


@contextlib.contextmanager
def bench_runtime() -> Iterator[Runtime]:
    """The process's runtime, built once from the settings of the bench's environment
    as a worker builds its own, and installed as the current one; closed at the end."""
    runtime = runtimes.install(build_runtime(load_settings()))
    try:
        yield runtime
    finally:
        runtimes.uninstall()  # closes its engine and HTTP client


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    sizes = list(dict.fromkeys(args.sizes))
    print("== polling cycle benchmark (Piclaza, batched polling)")
    print(
        f"sizes {', '.join(map(str, sizes))}; batch size {args.batch_size}"
        f" (VARIFLOW_PICLAZA_BATCH_SIZE), lease limit {args.lease_limit}"
        f" (VARIFLOW_POLL_BATCH_LIMIT); {os.cpu_count()} CPUs shared by this process,"
        " the sandbox thread and PostgreSQL"
    )
    print(
        "upstream: the sandbox over real HTTP on 127.0.0.1, every task 'running'"
        " (jobs stay processing: duplicate answers, rescheduled with backoff)"
    )
    before, started = busy_seconds(), time.monotonic()
    time.sleep(1.0)  # a measurement window, not a wait for something
    background = (busy_seconds() - before) / ((time.monotonic() - started) * _cpus())
    print(f"machine busy before start: {background:.0%} of {_cpus()} CPUs (other processes)")
    db_name = f"variflow_bench_poll_{os.getpid()}"
    try:
        db_url = create_database(args.database_url, db_name)
    except Exception as exc:
        print(f"cannot create the bench database: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    engine = nullpool_engine(db_url)
    results: list[SizeResult] = []
    try:
        url = db_url.render_as_string(hide_password=False)
        upgrade(url)
        print(f"database: {db_name} (dropped at the end)", flush=True)
        with (
            SandboxServer(config=SandboxConfig(**SANDBOX_KNOBS)) as sandbox,
            tempfile.TemporaryDirectory(prefix="variflow-bench-poll-") as home,
        ):
            env = {
                **sandbox_env(sandbox.url),
                "VARIFLOW_HOME": home,
                "VARIFLOW_DATABASE_URL": url,
                "VARIFLOW_LOG_LEVEL": "WARNING",
                "VARIFLOW_PICLAZA_BATCH_SIZE": str(args.batch_size),
                "VARIFLOW_POLL_BATCH_LIMIT": str(args.lease_limit),
            }
            with bench_environment(env), bench_runtime() as runtime:
                counter = SqlCounter(runtime.db.engine)
                if args.warmup:
                    warm = bench_size(args.warmup, args, engine, sandbox, runtime, counter)
                    print(
                        f"  (warm-up, not reported: N={warm.jobs}"
                        f" cycle {warm.cycle.seconds:.2f}s, floor {warm.floor.seconds:.2f}s)",
                        flush=True,
                    )
                for jobs in sizes:
                    results.append(bench_size(jobs, args, engine, sandbox, runtime, counter))
    finally:
        engine.dispose()
        drop_database(args.database_url, db_name)

    print()
    print_table(results)
    print_breakdown(results, args.batch_size, args.lease_limit)
    print_scaling(results)
    problems = [p for r in results for p in r.problems]
    print()
    if problems:
        print("CHECKS FAILED:")
        for problem in problems:
            print(f"  {problem}")
        return 1
    print(
        "checks: upstream requests == ceil(N / batch size) and every job polled exactly once,"
        " in the cycle and in the floor, at every N"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
