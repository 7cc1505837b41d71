"""End-to-end throughput: jobs through web, worker, beat and the sandbox, vs a Celery no-op.

    python bench/e2e_throughput.py                    # 2,000 PiAPI + 1,000 Piclaza jobs
    python bench/e2e_throughput.py --rss-jobs 10000   # and worker RSS over 10,000 more jobs

Run by ``make bench``. It prints numbers and exits 0 whether or not the goals
are met; it exits 1 only when it could not measure (a server unreachable, a
process that died, jobs that stopped moving for --stall-timeout seconds).

What runs, all on 127.0.0.1, started and stopped by the bench:

- a throwaway PostgreSQL database on the shared server (--admin-url), migrated
  with ``worker.migrate.upgrade``, dropped at the end;
- Redis as the broker (--broker-url), a queue of its own (``variflow_e2e_<pid>``,
  VARIFLOW_QUEUE), deleted at the end with the no-op's counter key;
- web: gunicorn serving ``webhooks.wsgi:app`` with ``--config
  python:webhooks.gunicorn_conf``, gthread, 2 workers x 4 threads, log level
  warning (bench/webhook_ingest.py's settings; no access log);
- worker: ``celery -A worker.celery_app worker --pool prefork --concurrency 2
  -Q <queue> --without-gossip --without-mingle --include _noop`` (bench/ on
  PYTHONPATH for bench/_noop.py, the no-op task);
- beat: ``celery -A worker.celery_app beat``, its schedule file in VARIFLOW_HOME
  (a temporary folder, removed at the end);
- the sandbox: ``python -m worker.cli sandbox`` (worker.devstack's), a process
  of its own so that it never waits for this one's GIL; each task is pending
  0.01 s and processing 0.01 s (VARIFLOW_SANDBOX_*), so the pipeline is
  measured, not the emulator; it sends PiAPI's webhooks to web
  (VARIFLOW_PUBLIC_URL), with its default 4 sender threads;
- the load generator, in this process: ``submit_variation()`` in a loop on one
  thread (PiAPI: origin_task_id, index "1", a prompt; Piclaza: a 64x64 PNG),
  every job at once by default (--in-flight caps the jobs not yet terminal),
  as the no-op's messages are all published at once.

Every process gets the settings of SETTINGS below (printed with the results):
result archiving off, log level WARNING, beat's ``poll_due`` every 0.5 s and a
first Piclaza poll 0.5 s after the submit (backoff 1.5x, capped at 2 s), so a
Piclaza job is polled about once; PiAPI keeps its 120 s webhook grace, so its
jobs end by webhook. Everything else is variflow's defaults.

Measured, after a warm-up (a few no-ops and jobs of each provider), in order:

1. no-op, right before each provider's run (so that both see the same
   machine): --noop-tasks messages of ``variflow.bench_noop`` published with
   variflow's Celery app (same broker, queue and serializer); the task does
   nothing but the ``INCR`` that counts it. tasks/s = tasks / (first publish ->
   counter reaching the total; the counter is read every 10 ms).
2. piapi, then piclaza: jobs/s = jobs / (first submit -> the last job terminal:
   completed, failed or cancelled), counted in the database with one COUNT every
   0.2 s. The run then also waits until every job is finalized (``finalized_at``
   set: the finalize_job task is done), so no run's leftover work spills into
   the next; both times are printed. ``ratio`` = jobs/s over the no-op's tasks/s.
3. with --rss-jobs N: N more jobs (PiAPI and Piclaza, 2:1, at most
   --rss-in-flight not terminal at a time, so the queue stays short and the
   sweep has nothing to repair), worker RSS sampled before (after the warm-up
   and the runs above) and after: the sum of VmRSS (/proc/<pid>/status) of the
   Celery worker's main process and its pool children.

CPU (``cpu_ms_per_job``): utime + stime from /proc of web (gunicorn master and
workers), worker (main and pool children), beat, and every PostgreSQL server
process (comm ``postgres``), plus the CPU of their exited and reaped children
(cutime + cstime: PostgreSQL backends that ended), from the first submit until
every job is finalized, over the jobs; beat's ticks and the sweep during the run
are counted. Not counted, and printed separately: the sandbox, this process
(the load generator; its PostgreSQL backends *are* counted, as the
application's inserts are part of a job, except the one of the bench's
monitoring connection, left out by pid) and Redis. PostgreSQL and Redis are
shared by the whole machine: nothing else should use them during the run (the
bench prints the other databases' sessions it sees), and the machine's busy
time not explained by the processes above is printed as "other processes".

Prints, besides details:

    e2e <provider>: <jobs/s> vs no-op <tasks/s> ratio <r> cpu_ms_per_job=<ms>
    rss worker: start=<MiB> end=<MiB> growth=<pct>%

The goals of issue 9: ratio >= 0.15 for PiAPI and >= 0.2 for Piclaza, CPU per
PiAPI job <= 12 ms; worker RSS growth over 10,000 jobs <= 10 %.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import resource
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import redis
from _db import create_database, drop_database, nullpool_engine
from _machine import CLK_TCK, busy_seconds
from _noop import NOOP_TASK
from PIL import Image
from sqlalchemy import Connection, func, select, text

from worker import runtime as runtimes
from worker.api import submit_variation
from worker.celery_app import app as celery
from worker.celery_app import build_runtime, reconfigure
from worker.config import load_settings
from worker.devstack import Stack, free_port, sandbox_env, wait_until_http_ok
from worker.migrate import upgrade
from worker.models import Job
from worker.runtime import Runtime

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "bench"
HOST = "127.0.0.1"
DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
TERMINAL = ("completed", "failed", "cancelled")
GOAL_RATIO = {"piapi": 0.15, "piclaza": 0.2}
GOAL_CPU_MS = {"piapi": 12.0}
GOAL_RSS_GROWTH = 10.0  # percent over 10,000 jobs
# Above this share of the CPUs used by others during a run, say that the numbers are noisy.
NOISY_SHARE = 0.10
JOB_POLL_SECONDS = 0.2  # how often the COUNT of terminal jobs is read
NOOP_POLL_SECONDS = 0.01  # how often the no-op counter is read (one Redis GET)
# The sandbox's knobs (sandbox/config.py): tasks end almost at once, results are small.
SANDBOX = {
    "VARIFLOW_SANDBOX_PENDING_SECONDS": "0.01",
    "VARIFLOW_SANDBOX_PROCESSING_SECONDS": "0.01",
    "VARIFLOW_SANDBOX_SEED": "9",
}
# The settings of every process (and of this one, which submits).
SETTINGS = {
    "VARIFLOW_RESULT_STORE": "off",
    "VARIFLOW_LOG_LEVEL": "WARNING",
    "VARIFLOW_POLL_INTERVAL": "0.5",
    "VARIFLOW_POLL_BACKOFF_START": "0.5",
    "VARIFLOW_POLL_BACKOFF_CAP": "2",
}
GUNICORN = [
    "-m", "gunicorn", "--config", "python:webhooks.gunicorn_conf", "--worker-class", "gthread",
    "--workers", "2", "--threads", "4", "--log-level", "warning",
]  # fmt: skip
# variflow's log lines ("<time> WARNING <logger>: ..."), gunicorn's ("[...] [ERROR] ...").
PROBLEM = re.compile(r"\d (WARNING|ERROR|CRITICAL) |\[(WARNING|ERROR|CRITICAL)\]|^Traceback")
# The sandbox's request lines (werkzeug), left out of the log tails.
REQUEST_LINE = re.compile(r'\] "(GET|POST|PUT|PATCH|DELETE|HEAD) ')
WARMUP = {"noop": 20, "piapi": 20, "piclaza": 20}


class MeasurementError(RuntimeError):
    """The bench could not measure (not: a goal was missed)."""


# --------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--piapi-jobs", type=int, default=2000, help="0 skips the PiAPI run")
    parser.add_argument("--piclaza-jobs", type=int, default=1000, help="0 skips the Piclaza run")
    parser.add_argument("--noop-tasks", type=int, default=5000, help="no-op tasks drained")
    parser.add_argument(
        "--rss-jobs",
        type=int,
        default=0,
        help="jobs of the worker RSS run (PiAPI and Piclaza 2:1); 0 skips it",
    )
    parser.add_argument(
        "--in-flight",
        type=int,
        default=0,
        help="most jobs submitted and not yet terminal in the e2e runs; 0 submits all at once",
    )
    parser.add_argument("--rss-in-flight", type=int, default=500, help="the same, for the RSS run")
    parser.add_argument(
        "--stall-timeout",
        type=float,
        # Beyond PiAPI's 120 s webhook grace: a lost webhook is repaired by a poll.
        default=180.0,
        help="give up when no job became terminal or finalized for this many seconds",
    )
    parser.add_argument(
        "--admin-url",
        default=os.environ.get("VARIFLOW_BENCH_ADMIN_URL", DEFAULT_ADMIN_URL),
        help="a PostgreSQL database to connect to for CREATE/DROP DATABASE"
        " (env VARIFLOW_BENCH_ADMIN_URL); the bench creates its own database",
    )
    parser.add_argument(
        "--broker-url",
        default=os.environ.get("VARIFLOW_BENCH_BROKER_URL", DEFAULT_BROKER_URL),
        help="the Redis broker (env VARIFLOW_BENCH_BROKER_URL); the bench uses a queue"
        " of its own, deleted at the end",
    )
    args = parser.parse_args(argv)
    if not args.broker_url.startswith(("redis://", "rediss://")):
        parser.error("--broker-url must be a Redis URL (redis://...)")
    for name in ("piapi_jobs", "piclaza_jobs", "noop_tasks", "rss_jobs", "in_flight"):
        if getattr(args, name) < 0:
            parser.error(f"--{name.replace('_', '-')} must not be negative")
    if args.rss_in_flight < 1:
        parser.error("--rss-in-flight must be at least 1")
    if (args.piapi_jobs or args.piclaza_jobs) and not args.noop_tasks:
        parser.error("the e2e runs need the no-op baseline: --noop-tasks must be at least 1")
    return args


def _redacted(url: str) -> str:
    # A URL may carry a password: never print it.
    return re.sub(r"//[^@/]*@", "//***@", url)


# --------------------------------------------------------------------------- /proc


@dataclass(frozen=True)
class Proc:
    ppid: int
    comm: str
    cpu: float  # seconds: own utime + stime, plus reaped children's (cutime + cstime)


def process_table() -> dict[int, Proc]:
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_text()
        except OSError:
            continue  # exited meanwhile
        comm = raw[raw.index("(") + 1 : raw.rindex(")")]
        rest = raw[raw.rindex(")") + 2 :].split()
        # proc(5): rest[1] ppid; rest[11..14] utime, stime, cutime, cstime (clock ticks).
        ticks = sum(int(v) for v in rest[11:15])
        table[int(entry.name)] = Proc(int(rest[1]), comm, ticks / CLK_TCK)
    return table


def tree(table: dict[int, Proc], root: int) -> set[int]:
    """``root`` and its live descendants."""
    children: dict[int, list[int]] = {}
    for pid, proc in table.items():
        children.setdefault(proc.ppid, []).append(pid)
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid in table and pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def _own_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread of this process
    return usage.ru_utime + usage.ru_stime


@dataclass(frozen=True)
class Cpu:
    """CPU seconds by group; a snapshot, or the difference of two."""

    web: float = 0.0
    worker: float = 0.0
    beat: float = 0.0
    postgres: float = 0.0
    # Not counted in cpu_ms_per_job:
    redis: float = 0.0
    sandbox: float = 0.0
    loadgen: float = 0.0  # this process
    machine: float = 0.0  # busy time of all CPUs (/proc/stat)
    wall: float = 0.0

    @classmethod
    def take(cls, roots: dict[str, int], exclude: set[int]) -> Cpu:
        table = process_table()
        values = {
            name: sum(table[pid].cpu for pid in tree(table, root) if pid not in exclude)
            for name, root in roots.items()
        }
        values["postgres"] = sum(
            p.cpu
            for pid, p in table.items()
            if p.comm.startswith("postgres") and pid not in exclude
        )
        values["redis"] = sum(p.cpu for p in table.values() if p.comm.startswith("redis-server"))
        values["loadgen"] = _own_cpu_seconds()
        values["machine"] = busy_seconds()
        values["wall"] = time.monotonic()
        return cls(**values)

    def __sub__(self, other: Cpu) -> Cpu:
        return Cpu(**{f.name: getattr(self, f.name) - getattr(other, f.name) for f in fields(self)})

    @property
    def counted(self) -> float:
        return self.web + self.worker + self.beat + self.postgres

    @property
    def other(self) -> float:
        """Busy time no process above explains: the kernel, whatever else runs here."""
        known = self.counted + self.redis + self.sandbox + self.loadgen
        return max(0.0, self.machine - known)

    def share(self, seconds: float) -> float:
        """CPU seconds as a fraction of the machine's capacity over the window."""
        capacity = self.wall * (os.cpu_count() or 1)
        return seconds / capacity if capacity > 0 else 0.0


def rss_mib(root: int) -> float:
    """Resident memory of ``root`` and its descendants (VmRSS), MiB."""
    total_kib = 0
    for pid in tree(process_table(), root):
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        if match:
            total_kib += int(match.group(1))
    return total_kib / 1024


# --------------------------------------------------------------------------- the database


class JobMonitor:
    """Counts jobs on one persistent connection (its backend is left out of the CPU)."""

    def __init__(self, url: str) -> None:
        self._engine = nullpool_engine(url, isolation_level="AUTOCOMMIT")
        self._conn: Connection = self._engine.connect()
        self.backend_pid = int(self._conn.execute(text("SELECT pg_backend_pid()")).scalar_one())

    def counts(self, since: datetime, provider: str | None) -> tuple[int, int]:
        """(terminal, finalized) among the jobs created since ``since``."""
        query = select(
            func.count().filter(Job.status.in_(TERMINAL)),
            func.count().filter(Job.finalized_at.is_not(None)),
        ).where(Job.created_at >= since)
        if provider is not None:
            query = query.where(Job.provider == provider)
        terminal, finalized = self._conn.execute(query).one()
        return int(terminal), int(finalized)

    def outcomes(self, since: datetime, provider: str | None) -> Counter[str]:
        """Jobs created since ``since`` by ``status`` (and ``error_code`` when failed)."""
        query = (
            select(Job.status, Job.error_code, func.count())
            .where(Job.created_at >= since)
            .group_by(Job.status, Job.error_code)
        )
        if provider is not None:
            query = query.where(Job.provider == provider)
        found: Counter[str] = Counter()
        for status, code, count in self._conn.execute(query):
            found[f"{status}:{code}" if code else str(status)] += int(count)
        return found

    def other_sessions(self, own: str) -> int:
        """Client sessions of the PostgreSQL server on databases other than ``own``."""
        query = text(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE backend_type = 'client backend' AND datname IS DISTINCT FROM :own"
            " AND pid <> pg_backend_pid()"
        )
        return int(self._conn.execute(query, {"own": own}).scalar_one())

    def close(self) -> None:
        self._conn.close()
        self._engine.dispose()


# --------------------------------------------------------------------------- the processes


class Deployment:
    """The sandbox, web, worker and beat as subprocesses (worker.devstack.Stack: each in a
    session of its own), with the environment ``env``; their logs in ``log_dir``."""

    def __init__(self, env: dict[str, str], log_dir: Path, sandbox_port: int) -> None:
        self.stack = Stack(env, log_dir)
        self.sandbox_port = sandbox_port
        self.sandbox_url = f"http://{HOST}:{sandbox_port}"

    def start(self, web_port: int, queue: str, hostname: str) -> None:
        self.stack.start_sandbox(self.sandbox_port)
        web = self.stack.start(
            "web", [sys.executable, *GUNICORN, "--bind", f"{HOST}:{web_port}", "webhooks.wsgi:app"]
        )
        wait_until_http_ok(f"http://{HOST}:{web_port}/healthz", proc=web)
        celery_cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_app"]
        self.stack.start(
            "worker",
            [
                *celery_cmd, "worker", "--pool", "prefork", "--concurrency", "2", "-Q", queue,
                "--without-gossip", "--without-mingle", "--include", "_noop",
                "--loglevel", "WARNING", "--hostname", hostname,
            ],
        )  # fmt: skip
        self.stack.start("beat", [*celery_cmd, "beat", "--loglevel", "WARNING"])

    def pid(self, name: str) -> int:
        return self.stack.procs[name].pid

    @property
    def roots(self) -> dict[str, int]:
        return {name: self.pid(name) for name in ("web", "worker", "beat", "sandbox")}

    def check_alive(self) -> None:
        for name, proc in self.stack.procs.items():
            if proc.poll() is not None:
                raise MeasurementError(f"{name} exited with {proc.returncode} (its log below)")

    def log(self, name: str) -> Path:
        return self.stack.log_dir / f"{name}.log"

    def tail(self, name: str, lines: int = 25) -> str:
        try:
            text_ = self.log(name).read_text(errors="replace")
        except OSError:
            return ""
        kept = [line for line in text_.splitlines() if not REQUEST_LINE.search(line)]
        return "\n".join(kept[-lines:])

    def problems(self, name: str) -> list[str]:
        """The log's WARNING, ERROR and CRITICAL lines and tracebacks (not Celery's banner)."""
        try:
            lines = self.log(name).read_text(errors="replace").splitlines()
        except OSError:
            return []
        return [line for line in lines if PROBLEM.search(line)]

    def stop(self) -> None:
        for proc in self.stack.procs.values():
            if proc.poll() is not None:
                # The leader is gone (Stack.stop skips it), its children may not be:
                # each process runs in a session of its own, whose group id is its pid.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGTERM)
        self.stack.stop()


# --------------------------------------------------------------------------- the runs


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (30, 90, 160)).save(buffer, format="PNG")
    return buffer.getvalue()


def makers(rt: Runtime) -> dict[str, Callable[[int], Any]]:
    image = png()
    return {
        "piapi": lambda i: submit_variation(
            "piapi", runtime=rt, origin_task_id=f"e2e-{i}", index="1", prompt="e2e throughput"
        ),
        "piclaza": lambda i: submit_variation("piclaza", runtime=rt, image=image),
    }


def mixed(makers: dict[str, Callable[[int], Any]]) -> Callable[[int], Any]:
    """PiAPI and Piclaza jobs, 2:1, interleaved."""
    piapi, piclaza = makers["piapi"], makers["piclaza"]
    return lambda i: piclaza(i) if i % 3 == 2 else piapi(i)


class Submitter(threading.Thread):
    """The load generator: submits ``n`` jobs, keeping at most ``window`` not terminal."""

    def __init__(self, make: Callable[[int], Any], n: int, window: int) -> None:
        super().__init__(name="submitter", daemon=True)
        self._make, self._n, self._window = make, n, window
        self.terminal = 0  # updated by the monitoring loop
        self.submitted = 0
        self.finished_at: float | None = None
        self.error: BaseException | None = None
        self._cancelled = threading.Event()

    def run(self) -> None:
        try:
            for i in range(self._n):
                while self._window and self.submitted - self.terminal >= self._window:
                    if self._cancelled.wait(0.01):
                        return
                if self._cancelled.is_set():
                    return
                self._make(i)
                self.submitted += 1
            self.finished_at = time.monotonic()
        except BaseException as exc:
            self.error = exc

    def cancel(self) -> None:
        self._cancelled.set()


@dataclass
class Bench:
    args: argparse.Namespace
    deployment: Deployment
    monitor: JobMonitor
    broker: redis.Redis[bytes]
    counter_key: str
    makers: dict[str, Callable[[int], Any]]

    def cpu(self) -> Cpu:
        return Cpu.take(self.deployment.roots, {self.monitor.backend_pid})

    def sandbox_stats(self) -> dict[str, Any]:
        response = httpx.get(f"{self.deployment.sandbox_url}/_sandbox/stats", timeout=10)
        response.raise_for_status()
        stats: dict[str, Any] = response.json()
        return stats

    def noop(self, n: int) -> tuple[float, Cpu]:
        """Publish ``n`` no-ops, wait until the worker ran them all: (seconds, CPU used)."""
        self.broker.delete(self.counter_key)
        cpu_before = self.cpu()
        started = time.monotonic()
        for _ in range(n):
            celery.send_task(NOOP_TASK, args=(self.counter_key,))
        last, last_change = 0, time.monotonic()
        while True:
            done = int(self.broker.get(self.counter_key) or 0)
            now = time.monotonic()
            if done >= n:
                return now - started, self.cpu() - cpu_before
            if done != last:
                last, last_change = done, now
            elif now - last_change > self.args.stall_timeout:
                raise MeasurementError(f"no-op: {done}/{n} ran, none for {now - last_change:.0f} s")
            self.deployment.check_alive()
            time.sleep(NOOP_POLL_SECONDS)

    def jobs(self, provider: str | None, n: int, window: int) -> JobsRun:
        """Submit ``n`` jobs (``provider`` None: PiAPI and Piclaza 2:1) and wait until
        every one is terminal, then finalized."""
        make = mixed(self.makers) if provider is None else self.makers[provider]
        since = datetime.now(UTC) - timedelta(milliseconds=1)
        stats_before = self.sandbox_stats()
        cpu_before = self.cpu()
        submitter = Submitter(make, n, window)
        started = time.monotonic()
        submitter.start()
        terminal_at: float | None = None
        last, last_change = (-1, -1), started
        try:
            while True:
                terminal, finalized = self.monitor.counts(since, provider)
                now = time.monotonic()
                submitter.terminal = terminal
                if submitter.error is not None:
                    raise MeasurementError(
                        f"submitting failed after {submitter.submitted} jobs: "
                        f"{type(submitter.error).__name__}: {submitter.error}"
                    ) from submitter.error
                if terminal >= n and terminal_at is None:
                    terminal_at = now
                if finalized >= n:
                    break
                if (terminal, finalized) != last:
                    last, last_change = (terminal, finalized), now
                elif now - last_change > self.args.stall_timeout:
                    raise MeasurementError(
                        f"{provider or 'mixed'}: {submitter.submitted}/{n} submitted,"
                        f" {terminal} terminal, {finalized} finalized; nothing moved for"
                        f" {now - last_change:.0f} s"
                    )
                self.deployment.check_alive()
                time.sleep(JOB_POLL_SECONDS)
        finally:
            submitter.cancel()
            submitter.join(timeout=30)
        finalized_at = time.monotonic()
        cpu = self.cpu() - cpu_before
        assert terminal_at is not None and submitter.finished_at is not None
        return JobsRun(
            provider=provider or "mixed",
            jobs=n,
            submit_seconds=submitter.finished_at - started,
            terminal_seconds=terminal_at - started,
            finalized_seconds=finalized_at - started,
            cpu=cpu,
            outcomes=self.monitor.outcomes(since, provider),
            sandbox=_stats_delta(stats_before, self.sandbox_stats()),
        )


def _stats_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, int]:
    return {
        "http": after["requests"]["total"] - before["requests"]["total"],
        "creates": sum(after["creates"].values()) - sum(before["creates"].values()),
        "webhooks": after["webhooks"]["attempted"] - before["webhooks"]["attempted"],
        "webhooks_failed": after["webhooks"]["failed"] - before["webhooks"]["failed"],
        "batch_queries": after["piclaza_batch"]["queries"] - before["piclaza_batch"]["queries"],
    }


@dataclass(frozen=True)
class JobsRun:
    provider: str
    jobs: int
    submit_seconds: float
    terminal_seconds: float
    finalized_seconds: float
    cpu: Cpu
    outcomes: Counter[str]
    sandbox: dict[str, int]

    @property
    def rate(self) -> float:
        return self.jobs / self.terminal_seconds

    def cpu_ms(self, seconds: float) -> float:
        return seconds * 1000 / self.jobs

    def details(self) -> list[str]:
        c = self.cpu
        per = self.cpu_ms
        s, n = self.sandbox, self.jobs
        outcomes = " ".join(f"{k}={v}" for k, v in sorted(self.outcomes.items()))
        lines = [
            f"  {self.provider}: {self.jobs} jobs submitted in {self.submit_seconds:.1f} s,"
            f" all terminal after {self.terminal_seconds:.1f} s ({self.rate:.1f} jobs/s),"
            f" all finalized after {self.finalized_seconds:.1f} s; {outcomes}",
            f"    CPU ms/job: web {per(c.web):.2f} + worker {per(c.worker):.2f} + beat"
            f" {per(c.beat):.2f} + PostgreSQL {per(c.postgres):.2f} = {per(c.counted):.2f};"
            f" not counted: sandbox {per(c.sandbox):.2f}, load generator {per(c.loadgen):.2f},"
            f" Redis {per(c.redis):.2f}",
            f"    machine: {c.share(c.machine):.0%} of {os.cpu_count()} CPUs busy, other processes"
            f" {c.share(c.other):.0%}",
            f"    sandbox per job: {s['http'] / n:.2f} requests, {s['creates'] / n:.2f} creates,"
            f" {s['webhooks'] / n:.2f} webhooks sent"
            f" ({s['webhooks_failed']} failed), {s['batch_queries']} Piclaza batch queries",
        ]
        not_completed = self.jobs - self.outcomes.get("completed", 0)
        if not_completed:
            lines.append(
                f"  ERROR {self.provider}: {not_completed} of {self.jobs} jobs did not complete"
                f" ({outcomes})"
            )
        return lines


def _goal(met: bool) -> str:
    return "met" if met else "NOT met"


def e2e_line(run: JobsRun, noop_rate: float) -> str:
    ratio = run.rate / noop_rate
    cpu = run.cpu_ms(run.cpu.counted)
    goals = [f"ratio >= {GOAL_RATIO[run.provider]}: {_goal(ratio >= GOAL_RATIO[run.provider])}"]
    if run.provider in GOAL_CPU_MS:
        limit = GOAL_CPU_MS[run.provider]
        goals.append(f"cpu_ms_per_job <= {limit:g}: {_goal(cpu <= limit)}")
    return (
        f"e2e {run.provider}: {run.rate:.1f} vs no-op {noop_rate:.1f} ratio {ratio:.3f}"
        f" cpu_ms_per_job={cpu:.2f}  (goal {'; '.join(goals)})"
    )


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def _step(label: str) -> Iterator[None]:
    started = time.monotonic()
    print(f"{label} ...", end=" ", flush=True)
    try:
        yield
    except BaseException:
        print("failed", flush=True)
        raise
    print(f"{time.monotonic() - started:.1f} s", flush=True)


def run(args: argparse.Namespace, bench: Bench) -> None:
    worker_pid = bench.deployment.pid("worker")
    with _step("warm-up: " + ", ".join(f"{n} {what}" for what, n in WARMUP.items())):
        bench.noop(WARMUP["noop"])
        for provider in ("piapi", "piclaza"):
            bench.jobs(provider, WARMUP[provider], 0)
    print(f"worker RSS after the warm-up: {rss_mib(worker_pid):.1f} MiB", flush=True)

    lines = []
    others: list[float] = []  # the share of the CPUs other processes used, per run
    for provider, n in (("piapi", args.piapi_jobs), ("piclaza", args.piclaza_jobs)):
        if not n:
            continue
        # The no-op right before each provider's run: both see the same machine.
        tasks = args.noop_tasks
        seconds, cpu = bench.noop(tasks)
        noop_rate = tasks / seconds
        print(
            f"  no-op: {tasks} tasks in {seconds:.2f} s ({noop_rate:.1f} tasks/s);"
            f" CPU ms/task: worker {cpu.worker * 1000 / tasks:.2f},"
            f" Redis {cpu.redis * 1000 / tasks:.2f}; machine {cpu.share(cpu.machine):.0%}"
            f" busy, other processes {cpu.share(cpu.other):.0%}",
            flush=True,
        )
        result = bench.jobs(provider, n, args.in_flight)
        print("\n".join(result.details()), flush=True)
        lines.append(e2e_line(result, noop_rate))
        others += [cpu.share(cpu.other), result.cpu.share(result.cpu.other)]
    for line in lines:
        print(line, flush=True)

    if args.rss_jobs:
        start = rss_mib(worker_pid)
        result = bench.jobs(None, args.rss_jobs, args.rss_in_flight)
        end = rss_mib(worker_pid)
        print("\n".join(result.details()), flush=True)
        others.append(result.cpu.share(result.cpu.other))
        growth = (end - start) / start * 100
        print(
            f"rss worker: start={start:.1f} end={end:.1f} growth={growth:.1f}%"
            f"  ({args.rss_jobs} jobs in {result.finalized_seconds:.0f} s;"
            f" goal <= {GOAL_RSS_GROWTH:g}% over 10,000 jobs: {_goal(growth <= GOAL_RSS_GROWTH)})",
            flush=True,
        )
    if others and max(others) > NOISY_SHARE:
        print(
            f"note: other processes used up to {max(others):.0%} of the CPUs during a run:"
            " the figures are noisy, compare them on a quiet machine"
        )


def delete_queue(name: str) -> None:
    """Delete the bench's queue with its bindings: declared on this connection first, so
    that kombu's Redis transport also drops the binding keys the worker made."""
    with celery.connection_for_write() as conn:
        bound = celery.amqp.queues[name].bind(conn.default_channel)
        bound.declare()
        bound.delete()


def report_logs(deployment: Deployment) -> None:
    for name in ("web", "worker", "beat"):
        lines = deployment.problems(name)
        if lines:
            print(f"{name} log: {len(lines)} warning/error lines, e.g. {lines[0][:300]}")
        else:
            print(f"{name} log: no warning or error")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wall = time.monotonic()
    load = os.getloadavg()
    print(
        f"e2e throughput on PostgreSQL + Redis; load average {load[0]:.2f} {load[1]:.2f}"
        f" {load[2]:.2f}; {os.cpu_count()} CPUs",
        flush=True,
    )
    pid = os.getpid()
    name = f"variflow_e2e_{pid}"
    home = Path(tempfile.mkdtemp(prefix="variflow-e2e-"))
    broker = redis.Redis.from_url(args.broker_url, socket_connect_timeout=3)
    counter_key = f"{name}_noop_done"
    deployment: Deployment | None = None
    monitor: JobMonitor | None = None
    created = configured = failed = False
    try:
        try:
            broker.ping()
            url = create_database(args.admin_url, name).render_as_string(hide_password=False)
            created = True
            upgrade(url)
        except Exception as exc:
            print(f"cannot set up: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        sandbox_port, web_port = free_port(), free_port()
        env = {
            **SETTINGS,
            "VARIFLOW_HOME": str(home),
            "VARIFLOW_DATABASE_URL": url,
            "VARIFLOW_BROKER_URL": args.broker_url,
            "VARIFLOW_QUEUE": name,
            "VARIFLOW_PUBLIC_URL": f"http://{HOST}:{web_port}",
            **SANDBOX,
            **sandbox_env(f"http://{HOST}:{sandbox_port}"),
            "PYTHONPATH": os.pathsep.join(
                p for p in (str(BENCH_DIR), os.environ.get("PYTHONPATH", "")) if p
            ),
        }
        os.environ.update(env)
        settings = load_settings()
        rt = runtimes.install(build_runtime(settings))
        reconfigure(settings)
        configured = True
        print(
            f"database {name} on {_redacted(args.admin_url)} (dropped at the end);"
            f" broker {_redacted(args.broker_url)}, queue {name} (deleted at the end)"
        )
        print("settings: " + " ".join(f"{k}={v}" for k, v in SETTINGS.items()))
        print("sandbox: " + " ".join(f"{k}={v}" for k, v in SANDBOX.items()))
        print(
            f"web: gunicorn {' '.join(GUNICORN[2:])}; worker: prefork, concurrency 2; beat",
            flush=True,
        )
        monitor = JobMonitor(url)
        deployment = Deployment(env, home / "logs", sandbox_port)
        with _step("starting the sandbox, web, worker, beat"):
            deployment.start(web_port, name, f"e2e-{pid}@%h")
        others = monitor.other_sessions(name)
        if others:
            print(f"note: {others} other session(s) on this PostgreSQL server: CPU is noisy")
        bench = Bench(args, deployment, monitor, broker, counter_key, makers(rt))
        run(args, bench)
        others = monitor.other_sessions(name)
        if others:
            print(f"note: {others} other session(s) on this PostgreSQL server at the end")
        report_logs(deployment)
    except Exception as exc:
        failed = True
        print(f"could not measure: {type(exc).__name__}: {exc}", file=sys.stderr)
        if deployment is not None:
            for proc in ("sandbox", "web", "worker", "beat"):
                print(f"--- {proc} log (tail) ---\n{deployment.tail(proc)}", file=sys.stderr)
    finally:
        if deployment is not None:
            deployment.stop()
        if monitor is not None:
            monitor.close()
        runtimes.uninstall()
        if configured:  # else the app's broker is not the bench's
            with contextlib.suppress(Exception):
                delete_queue(name)
        with contextlib.suppress(Exception):
            broker.delete(counter_key)
        broker.close()
        if created:
            drop_database(args.admin_url, name)
        shutil.rmtree(home, ignore_errors=True)
    load = os.getloadavg()
    print(
        f"total wall time {time.monotonic() - wall:.0f} s; load average at the end"
        f" {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
