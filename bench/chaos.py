"""The fault run: jobs across the three providers while processes die and servers restart.

    make chaos                       # every scenario, 1,000 jobs each
    python bench/chaos.py --jobs 300 --scenarios kills,pg-restart

It starts everything it needs and touches no shared server: its own PostgreSQL
(initdb into a temporary folder, its own port), its own Redis, the sandbox (in
this process, so its ledger of tasks can be read), and, per scenario, the web
app (gunicorn), two Celery workers and beat as real subprocesses. First a run
without faults gives the baseline drain time; then each scenario runs the same
load with its faults and prints one line:

    chaos <name>: jobs=N terminal=N lost=L duplicate_creates=D paid_not_delivered=P drain_ratio=R

- lost: jobs not terminal when the run gave up waiting (10 x the baseline, at least 300 s);
- duplicate_creates: tasks the sandbox was asked to create twice for one job;
- paid_not_delivered: jobs that failed although the sandbox created their task and
  finished it successfully (the user paid and got nothing);
- drain_ratio: time from the first submit to the last job terminal, over the baseline's.

Scenarios: kills (a worker SIGKILLed 10 times, alternating a pool child and a
whole worker, which is then restarted), redis-flush (FLUSHALL mid-run),
redis-restart, pg-restart (`pg_ctl restart -m fast`), pg-stop (stopped for 20 s),
upstream-faults (20 % transient upstream errors, 30 % of webhooks dropped).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy import create_engine, func, select, text

from sandbox.config import SandboxConfig
from sandbox.server import SandboxServer
from worker import runtime as runtimes
from worker.api import submit_variation
from worker.celery_app import build_runtime, reconfigure
from worker.config import load_settings
from worker.devservers import PostgresServer, RedisServer
from worker.devstack import Stack, free_port, sandbox_env
from worker.migrate import upgrade
from worker.models import Job

SCENARIOS = ("kills", "redis-flush", "redis-restart", "pg-restart", "pg-stop", "upstream-faults")
TERMINAL = ("completed", "failed", "cancelled")
# Intervals of a deployment that wants quick recovery (printed with the results).
SETTINGS = {
    "VARIFLOW_SUBMIT_CLAIM_TTL": "15",
    "VARIFLOW_POLL_LEASE": "15",
    "VARIFLOW_SWEEP_INTERVAL": "5",
    "VARIFLOW_LOST_MESSAGE_GRACE": "10",
    "VARIFLOW_POLL_INTERVAL": "1",
    "VARIFLOW_POLL_BACKOFF_START": "1",
    "VARIFLOW_POLL_BACKOFF_CAP": "5",
    "VARIFLOW_PIAPI_WEBHOOK_GRACE": "10",
    "VARIFLOW_RESULT_STORE": "off",
    "VARIFLOW_ALLOW_PRIVATE_URLS": "true",
    "VARIFLOW_LOG_LEVEL": "WARNING",
}


@dataclass
class Result:
    name: str
    jobs: int
    terminal: int
    lost: int
    duplicate_creates: int
    paid_not_delivered: int
    drain_seconds: float

    def line(self, baseline: float) -> str:
        ratio = self.drain_seconds / baseline if baseline > 0 else float("nan")
        return (
            f"chaos {self.name}: jobs={self.jobs} terminal={self.terminal} lost={self.lost} "
            f"duplicate_creates={self.duplicate_creates} "
            f"paid_not_delivered={self.paid_not_delivered} drain_ratio={ratio:.2f}"
        )


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (30, 90, 160)).save(buffer, format="PNG")
    return buffer.getvalue()


class Run:
    """One scenario: a fresh database, broker and sandbox ledger; its own processes."""

    def __init__(self, args: argparse.Namespace, pg: PostgresServer, redis: RedisServer) -> None:
        self.args = args
        self.pg = pg
        self.redis = redis
        self.home = Path(tempfile.mkdtemp(prefix="variflow-chaos-"))
        self.web_port = free_port()
        self.sandbox = SandboxServer(
            config=SandboxConfig(
                pending_seconds=0.2,
                processing_seconds=0.4,
                seed=7,
                lemondata_mode="mixed",
                retry_after_seconds=1,
            )
        )
        self.stack: Stack | None = None
        self.env: dict[str, str] = {}
        self.workers: list[str] = []

    # --- the processes ---------------------------------------------------------------

    def start(self) -> None:
        self.sandbox.start()
        self.env = {
            **SETTINGS,
            "VARIFLOW_HOME": str(self.home),
            "VARIFLOW_DATABASE_URL": self.pg.url,
            "VARIFLOW_BROKER_URL": self.redis.url,
            "VARIFLOW_PUBLIC_URL": f"http://127.0.0.1:{self.web_port}",
            **sandbox_env(self.sandbox.url),
        }
        os.environ.update(self.env)
        settings = load_settings()
        runtimes.install(build_runtime(settings))
        reconfigure(settings)
        self.stack = Stack(self.env, self.home / "logs")
        self.stack.start_web(self.web_port, workers=2)
        for n in (1, 2):
            self.start_worker(n)
        self.stack.start_beat()

    def start_worker(self, n: int) -> None:
        assert self.stack is not None
        name = f"worker{n}"
        argv = [
            sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker",
            "--concurrency", "4", "--loglevel", "WARNING", "--without-gossip",
            "--without-mingle", "--hostname", f"chaos{n}-{os.getpid()}@%h",
        ]  # fmt: skip
        self.stack.start(name, argv)
        if name not in self.workers:
            self.workers.append(name)

    def stop(self) -> None:
        if self.stack is not None:
            self.stack.stop()
        self.sandbox.stop()
        runtimes.uninstall()

    # --- the load --------------------------------------------------------------------

    def submit(self, jobs: int) -> list[str]:
        """Submit like a careful application: an idempotency key per job, and a retry
        while variflow's database is away (a fault may land during the submits)."""
        image = png()
        ids: list[str] = []
        for n in range(jobs):
            key = f"chaos-{os.getpid()}-{n}"
            kind = n % 3
            fields: dict[str, Any]
            if kind == 0:
                provider = "piapi"
                fields = {"origin_task_id": f"o-{n}", "index": "1", "prompt": f"chaos {n}"}
            elif kind == 1:
                provider, fields = "piclaza", {"image": image}
            else:
                provider, fields = "lemondata", {"image": image, "n": 1, "size": "256x256"}
            deadline = time.monotonic() + 120
            while True:
                try:
                    job = submit_variation(provider, idempotency_key=key, **fields)
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            ids.append(str(job.id))
        return ids

    def counts(self) -> dict[str, int]:
        engine = create_engine(self.pg.url)
        try:
            with engine.connect() as conn:
                rows = conn.execute(select(Job.status, func.count()).group_by(Job.status))
                return {str(status): int(count) for status, count in rows}
        except Exception:
            return {}  # the database is down right now
        finally:
            engine.dispose()

    def wait_drained(self, jobs: int, timeout: float) -> float | None:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            counts = self.counts()
            if sum(counts.get(s, 0) for s in TERMINAL) >= jobs:
                return time.monotonic() - started
            time.sleep(0.5)
        return None

    def result(self, name: str, jobs: int, drained: float | None, timeout: float) -> Result:
        engine = create_engine(self.pg.url)
        with engine.connect() as conn:
            rows = conn.execute(select(Job.id, Job.provider, Job.status)).all()
        engine.dispose()
        statuses = {str(job_id): (provider, status) for job_id, provider, status in rows}
        stats = self.sandbox.state.stats()
        finished_ok = {
            task.correlation
            for task in self.sandbox.state.tasks()
            if task.decided_outcome == "completed" and not task.cancelled
        }
        paid_not_delivered = sum(
            1
            for job_id, (provider, status) in statuses.items()
            if status == "failed"
            and (f"variflow-{job_id}" if provider == "lemondata" else job_id) in finished_ok
        )
        terminal = sum(1 for _, status in statuses.values() if status in TERMINAL)
        return Result(
            name=name,
            jobs=jobs,
            terminal=terminal,
            lost=jobs - terminal,
            duplicate_creates=len(stats["duplicate_creates"]),
            paid_not_delivered=paid_not_delivered,
            drain_seconds=drained if drained is not None else timeout,
        )


def reset_servers(pg: PostgresServer, redis: RedisServer) -> None:
    if not pg.is_up():
        pg.start()
    if not redis.is_up():
        redis.start()
    redis.flushall()
    engine = create_engine(pg.url)
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE jobs, job_events, job_inputs CASCADE"))
    engine.dispose()


# --- the faults ----------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    done = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in done.stdout.split()]


def kills(run: Run, period: float, stop: threading.Event) -> None:
    """10 SIGKILLs: odd ones a pool child (Celery starts another), even ones a whole worker
    (main process and children, as a container dies), started again at once."""
    assert run.stack is not None
    for n in range(10):
        if stop.wait(period):
            return
        name = run.workers[n % len(run.workers)]
        proc = run.stack.procs.get(name)
        if proc is None:
            continue
        if n % 2 == 0:
            children = _children(proc.pid)
            if children:
                os.kill(children[0], signal.SIGKILL)
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            run.stack.procs.pop(name, None)
            run.start_worker(int(name.removeprefix("worker")))


def redis_flush(run: Run, delay: float, stop: threading.Event) -> None:
    if not stop.wait(delay):
        run.redis.flushall()


def redis_restart(run: Run, delay: float, stop: threading.Event) -> None:
    if not stop.wait(delay):
        run.redis.restart()


def pg_restart(run: Run, delay: float, stop: threading.Event) -> None:
    if not stop.wait(delay):
        run.pg.restart()


def pg_stop(run: Run, delay: float, stop: threading.Event) -> None:
    if not stop.wait(delay):
        run.pg.stop()
        time.sleep(20)  # the fault itself: the database is away for 20 s
        run.pg.start()


def upstream_faults(run: Run, delay: float, stop: threading.Event) -> None:
    run.sandbox.state.update_config(transient_error_rate=0.2, webhook_drop_rate=0.3)


Fault = Callable[[Run, float, threading.Event], None]
FAULTS: dict[str, Fault] = {
    "kills": kills,
    "redis-flush": redis_flush,
    "redis-restart": redis_restart,
    "pg-restart": pg_restart,
    "pg-stop": pg_stop,
    "upstream-faults": upstream_faults,
}


def run_once(
    name: str, args: argparse.Namespace, pg: PostgresServer, redis: RedisServer, baseline: float
) -> Result:
    reset_servers(pg, redis)
    run = Run(args, pg, redis)
    try:
        run.start()
        stop = threading.Event()
        fault: threading.Thread | None = None
        if name != "baseline":
            # Faults land while the load drains: spread over the baseline's drain time.
            when = baseline / 11 if name == "kills" else baseline / 3
            fault = threading.Thread(target=FAULTS[name], args=(run, when, stop), daemon=True)
        timeout = max(300.0, 10 * baseline) if baseline else 900.0
        started = time.monotonic()
        if fault is not None:
            fault.start()
        ids = run.submit(args.jobs)
        drained = run.wait_drained(len(ids), timeout - (time.monotonic() - started))
        if drained is not None:
            drained = time.monotonic() - started
        stop.set()
        if fault is not None:
            fault.join(60)
        if not pg.is_up():
            pg.start()
        return run.result(name, len(ids), drained, timeout)
    finally:
        run.stop()


def main() -> None:
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # the sandbox's request lines
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=1000, help="jobs per scenario")
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"comma-separated: {','.join(SCENARIOS)}"
    )
    args = parser.parse_args()
    chosen = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(SCENARIOS))
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    load = os.getloadavg()
    print(f"chaos: {args.jobs} jobs per scenario; load average {load[0]:.2f} {load[1]:.2f}")
    print("settings: " + " ".join(f"{k}={v}" for k, v in SETTINGS.items()))
    with PostgresServer() as pg, RedisServer() as redis:
        upgrade(pg.url)
        print(f"postgresql: {pg.url} (own instance); redis: {redis.url} (own instance)")
        base = run_once("baseline", args, pg, redis, 0.0)
        print(f"chaos baseline: jobs={base.jobs} terminal={base.terminal} lost={base.lost} "
              f"drain={base.drain_seconds:.1f}s", flush=True)  # fmt: skip
        for name in chosen:
            result = run_once(name, args, pg, redis, base.drain_seconds)
            print(result.line(base.drain_seconds), f"(drain {result.drain_seconds:.1f}s)",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
