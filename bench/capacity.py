"""Capacity admission under a burst: 2,000 jobs at once, with variflow's limits and without.

    python bench/capacity.py                 # 1,250 PiAPI + 620 Piclaza + 130 LemonData
    python bench/capacity.py --scale 0.25    # a quarter of each, for a quick look
    python bench/capacity.py --task-seconds 0.6 --scale 0.5   # fewer jobs a second

Run by ``make bench``. It prints numbers and exits 0 whatever they are; it exits 1 only
when it could not measure (a server unreachable, a process that died, jobs that stopped
moving for --stall-timeout seconds).

The provider side is the sandbox (its own process), with the limits of paid accounts
switched on (VARIFLOW_SANDBOX_*), the same in both runs:

- PiAPI: two API keys of 3 slots each; a task created while its key's slots are full
  waits upstream as ``staged`` (PiAPI queues, it does not refuse);
- Piclaza: one key of 5 slots; a create beyond them is refused (code 429);
- LemonData: one key, 120 requests a sliding minute; beyond, HTTP 429 with Retry-After;
- every task is pending 0.05 s and processing 0.15 s (d = 0.2 s, --task-seconds; LemonData
  answers its synchronous create after d).

The two runs, each on a deployment of its own (a fresh database, queue and sandbox; web,
one Celery worker of 4 processes, beat):

- ``capacity on``: variflow knows the limits: an accounts file with PiAPI accounts ``a``
  and ``b`` (``max_in_flight = 3`` each, and ``max_staged = 1``: one more job per key
  waits upstream, staged, to start the moment a slot frees), VARIFLOW_PICLAZA_MAX_IN_FLIGHT=5,
  VARIFLOW_LEMONDATA_REQUESTS_PER_MINUTE=120;
- ``capacity off``: the same accounts file without any limit, nothing else. (With two
  accounts and no limits, admission still chooses the account: see the per-key lines.)

The split of the 2,000 jobs: LemonData's rate makes its share slow (130 creates at 120 a
minute take 64.5 s however they are sent), so it gets 130 — just over one minute's
allowance, so that a burst without pacing exceeds the window — and PiAPI and Piclaza share
the rest, about 2:1, so that each provider's ideal time is about a minute or less. Both
runs take a few minutes in all. Submit retries are capped at 30 s (VARIFLOW_SUBMIT_RETRY_CAP;
the default is 120 s), so that refused creates are retried within the run.

Measured per run, from the first submit:

- ``rejected_upstream``: creates and requests the sandbox refused for a limit (429 rate
  limited, over concurrency, daily allowance), from its ``/_sandbox/stats``;
- ``failed``: jobs that did not end ``completed``;
- ``slot_utilisation``: for the slot-limited providers (PiAPI, Piclaza), the slot-seconds
  their upstream tasks actually ran over the slot-seconds their keys offered, each provider
  from the first submit until its last job ended: sum(mean running tasks x its time) /
  sum(slots x its time). Running tasks are the sandbox's own count (a task holds a slot
  from when it starts, or leaves PiAPI's staged line, until it ends), sampled every 0.1 s.
  100 % is every paid slot busy until the provider's work is done;
- ``makespan``: first submit -> the last job ended (any provider).

Printed with each run's details: how busy the machine's CPUs were over the same span, and
the CPU time of every process together per job. The burst asks ~50 jobs a second of the
machine while PiAPI and Piclaza both run; when the CPUs are near 100 % busy the run is
CPU-bound, and the utilisation and makespan measure the machine as much as admission.
Longer tasks (--task-seconds) ask fewer jobs a second for the same limits.

The ideal makespan the limits allow (printed with the results): every slot busy from the
first moment and the rate used from its first turn: PiAPI ceil(N/6) x d, Piclaza
ceil(N/5) x d, LemonData (N-1) x 0.5 s + d; the longest of the three.

Prints, after details:

    capacity on: rejected_upstream=<n> failed=<n> slot_utilisation=<pct> makespan=<s>
    capacity off: rejected_upstream=<n> failed=<n> slot_utilisation=<pct> makespan=<s>
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import redis
from _db import create_database, drop_database, nullpool_engine
from _machine import CLK_TCK, CpuTicks, cpu_ticks
from sqlalchemy import Engine, func, select, text

from sandbox.capacity import key_fingerprint
from sandbox.testing import png_bytes
from worker import runtime as runtimes
from worker.api import submit_variation
from worker.celery_app import app as celery
from worker.celery_app import build_runtime, reconfigure
from worker.config import load_settings
from worker.devstack import SANDBOX_KEY, Stack, free_port, sandbox_env
from worker.migrate import upgrade
from worker.models import Job

HOST = "127.0.0.1"
DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
TERMINAL = ("completed", "failed", "cancelled")
JOBS = {"piapi": 1250, "piclaza": 620, "lemondata": 130}
TASK_SECONDS = 0.2  # each sandbox task: a quarter pending, then processing (--task-seconds)
KEYS = {"a": "bench-piapi-key-a", "b": "bench-piapi-key-b"}
PIAPI_SLOTS_PER_KEY, PICLAZA_SLOTS, LEMONDATA_PER_MINUTE = 3, 5, 120
# PiAPI holds a task created beyond a key's slots as "staged" and starts it when a slot
# frees: one staged job per key means a slot's next job is already upstream.
PIAPI_STAGED_PER_KEY = 1
SLOTS = {"piapi": PIAPI_SLOTS_PER_KEY * len(KEYS), "piclaza": PICLAZA_SLOTS}
SANDBOX = {
    "VARIFLOW_SANDBOX_API_KEYS": ",".join([SANDBOX_KEY, *KEYS.values()]),
    "VARIFLOW_SANDBOX_IMAGES_PER_TASK": "1",
    "VARIFLOW_SANDBOX_SEED": "11",
    "VARIFLOW_SANDBOX_PIAPI_MAX_CONCURRENT": ",".join(
        f"{key}={PIAPI_SLOTS_PER_KEY}" for key in KEYS.values()
    ),
    "VARIFLOW_SANDBOX_PICLAZA_MAX_CONCURRENT": str(PICLAZA_SLOTS),
    "VARIFLOW_SANDBOX_LEMONDATA_REQUESTS_PER_MINUTE": str(LEMONDATA_PER_MINUTE),
}
# Every process of both runs (and this one, which submits).
SETTINGS = {
    "VARIFLOW_RESULT_STORE": "off",
    "VARIFLOW_LOG_LEVEL": "WARNING",
    "VARIFLOW_POLL_INTERVAL": "0.25",
    "VARIFLOW_POLL_BACKOFF_START": "0.25",
    "VARIFLOW_POLL_BACKOFF_CAP": "1",
    "VARIFLOW_SUBMIT_RETRY_CAP": "30",
}
LIMITS_ON = {
    "VARIFLOW_PICLAZA_MAX_IN_FLIGHT": str(PICLAZA_SLOTS),
    "VARIFLOW_LEMONDATA_REQUESTS_PER_MINUTE": str(LEMONDATA_PER_MINUTE),
}
PIAPI_PARAMS: dict[str, Any] = {
    "origin_task_id": "imagine-1",
    "index": "1",
    "prompt": "a queue of ducks",
}
SAMPLE_SECONDS = 0.1  # how often the sandbox's running tasks are read
MONITOR_SECONDS = 0.25  # how often the jobs that ended are counted
SUBMIT_THREADS = 4
WARMUP = 2  # jobs of each provider before a run's burst


class MeasurementError(RuntimeError):
    """The bench could not measure (not: a number was bad)."""


def accounts_toml(limited: bool) -> str:
    slots = (
        f"max_in_flight = {PIAPI_SLOTS_PER_KEY}\nmax_staged = {PIAPI_STAGED_PER_KEY}\n"
        if limited
        else ""
    )
    return "".join(
        f'[piapi.{name}]\napi_key_env = "BENCH_PIAPI_KEY_{name.upper()}"\n{slots}\n'
        for name in KEYS
    )


def task_timing(seconds: float) -> dict[str, str]:
    """The sandbox's task duration: a quarter pending, the rest processing."""
    return {
        "VARIFLOW_SANDBOX_PENDING_SECONDS": f"{seconds / 4:g}",
        "VARIFLOW_SANDBOX_PROCESSING_SECONDS": f"{seconds * 3 / 4:g}",
    }


def ideal_seconds(jobs: dict[str, int], task: float) -> dict[str, float]:
    """The earliest each provider's jobs can all have ended under the sandbox's limits."""
    return {
        "piapi": math.ceil(jobs["piapi"] / SLOTS["piapi"]) * task,
        "piclaza": math.ceil(jobs["piclaza"] / SLOTS["piclaza"]) * task,
        "lemondata": max(0, jobs["lemondata"] - 1) * 60 / LEMONDATA_PER_MINUTE + task,
    }


class CpuMeter:
    """The whole machine's CPU over a stretch of time (Linux's /proc/stat): how busy its
    CPUs were, the CPU time every process together spent, and the time the hypervisor
    took for other machines (steal). On a small machine the bench's burst is CPU-bound:
    then the makespan is the machine's, not admission's."""

    def __init__(self) -> None:
        self._start = self._read()

    @staticmethod
    def _read() -> CpuTicks | None:
        try:
            return cpu_ticks()
        except (OSError, ValueError, IndexError):
            return None

    def stop(self) -> CpuUse | None:
        """The CPU used since the meter started; None off Linux."""
        end = self._read()
        if self._start is None or end is None or end.total == self._start.total:
            return None
        total = end.total - self._start.total
        steal = end.steal - self._start.steal
        busy = end.busy - self._start.busy - steal
        return CpuUse(busy / total, busy / CLK_TCK, steal / total)


@dataclass(frozen=True)
class CpuUse:
    busy: float  # share of the machine's CPU time spent running processes
    seconds: float  # CPU-seconds they spent, all processes together
    steal: float  # share taken by the hypervisor for other machines


# --------------------------------------------------------------------------- measuring


class Sampler(threading.Thread):
    """Reads the sandbox's running tasks per provider every SAMPLE_SECONDS."""

    def __init__(self, sandbox_url: str) -> None:
        super().__init__(name="sampler", daemon=True)
        self._client = httpx.Client(base_url=sandbox_url, timeout=10)
        self._halt = threading.Event()
        self.samples: list[tuple[float, dict[str, int]]] = []
        self.errors = 0

    def run(self) -> None:
        while not self._halt.wait(SAMPLE_SECONDS):
            try:
                capacity = self._client.get("/_sandbox/stats").json()["capacity"]
            except (httpx.HTTPError, ValueError, KeyError):
                self.errors += 1
                continue
            running = {p: sum(k["running"] for k in keys.values()) for p, keys in capacity.items()}
            self.samples.append((time.monotonic(), running))

    def mean_running(self, provider: str, start: float, end: float) -> float:
        values = [r.get(provider, 0) for t, r in self.samples if start <= t <= end]
        return sum(values) / len(values) if values else 0.0

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)
        self._client.close()


@dataclass
class Result:
    mode: str
    jobs: dict[str, int]
    submit_seconds: float
    makespan: float
    ends: dict[str, float]  # per provider: first submit -> its last job ended
    outcomes: Counter[str]
    refused: Counter[str]  # by provider and kind
    utilisation: dict[str, float]  # per slot-limited provider
    keys: dict[str, dict[str, Any]] = field(default_factory=dict)  # per-key sandbox stats
    creates_by_key: Counter[str] = field(default_factory=Counter)
    refill: dict[str, float] = field(default_factory=dict)  # median refill gap per provider
    cpu: CpuUse | None = None

    @property
    def rejected(self) -> int:
        return sum(self.refused.values())

    @property
    def failed(self) -> int:
        return sum(self.jobs.values()) - self.outcomes.get("completed", 0)

    @property
    def slot_utilisation(self) -> float:
        used = sum(self.utilisation[p] * SLOTS[p] * self.ends[p] for p in SLOTS)
        offered = sum(SLOTS[p] * self.ends[p] for p in SLOTS)
        return used / offered if offered else 0.0

    def line(self) -> str:
        return (
            f"capacity {self.mode}: rejected_upstream={self.rejected} failed={self.failed}"
            f" slot_utilisation={self.slot_utilisation:.1%} makespan={self.makespan:.1f}s"
        )

    def details(self, ideal: dict[str, float]) -> list[str]:
        outcomes = " ".join(f"{k}={v}" for k, v in sorted(self.outcomes.items()))
        lines = [f"  {sum(self.jobs.values())} jobs submitted in {self.submit_seconds:.1f} s;"]
        lines[0] += f" {outcomes}"
        for provider, n in self.jobs.items():
            refused = {
                k.split(":")[1]: v for k, v in self.refused.items() if k.startswith(f"{provider}:")
            }
            used = f", slots busy {self.utilisation[provider]:.1%}" if provider in SLOTS else ""
            if provider in self.refill and self.mode == "on":  # off: creates never wait
                used += f", median refill gap {self.refill[provider] * 1000:.0f} ms"
            lines.append(
                f"  {provider}: {n} jobs ended after {self.ends[provider]:.1f} s"
                f" (ideal {ideal[provider]:.1f} s){used}; refused upstream"
                f" {sum(refused.values())} {refused or ''}".rstrip()
            )
        if self.cpu is not None:
            per_job = self.cpu.seconds / sum(self.jobs.values()) * 1000
            steal = (
                f", {self.cpu.steal:.0%} stolen by the hypervisor" if self.cpu.steal >= 0.01 else ""
            )
            lines.append(
                f"  machine: {os.cpu_count()} CPUs {self.cpu.busy:.0%} busy from the first submit"
                f" to the last end{steal}; {per_job:.0f} ms of CPU per job (every process:"
                " variflow, PostgreSQL, Redis, the sandbox, this bench)"
            )
        for label, stats in self.keys.items():
            lines.append(
                f"    key {label}: {self.creates_by_key[label]} tasks created,"
                f" high water {stats['high_water']} running"
                f" (limit {stats['limits']}), {stats['staged_total']} staged upstream"
            )
        return lines


def fingerprints() -> dict[str, str]:
    """Sandbox fingerprint -> a readable label of the key."""
    labels = {key_fingerprint(key): f"piapi/{name}" for name, key in KEYS.items()}
    labels[key_fingerprint(SANDBOX_KEY)] = "sandbox-key"
    return labels


# --------------------------------------------------------------------------- one run


@contextlib.contextmanager
def deployment(
    mode: str, args: argparse.Namespace, home: Path, base_env: dict[str, str]
) -> Iterator[tuple[Stack, str, str]]:
    """A database, a queue, the sandbox, web, a worker and beat for one run; this process
    configured as one more of its processes. Yields the stack, the sandbox URL, the DB URL."""
    name = f"variflow_capacity_{mode}_{os.getpid()}"
    url = create_database(args.admin_url, name).render_as_string(hide_password=False)
    accounts = home / "accounts.toml"
    accounts.write_text(accounts_toml(limited=mode == "on"))
    sandbox_port, web_port = free_port(), free_port()
    env = {
        **SETTINGS,
        **SANDBOX,
        **task_timing(args.task_seconds),
        **sandbox_env(f"http://{HOST}:{sandbox_port}"),
        **(LIMITS_ON if mode == "on" else {}),
        "VARIFLOW_HOME": str(home),
        "VARIFLOW_DATABASE_URL": url,
        "VARIFLOW_BROKER_URL": args.broker_url,
        "VARIFLOW_QUEUE": name,
        "VARIFLOW_PUBLIC_URL": f"http://{HOST}:{web_port}",
        "VARIFLOW_ACCOUNTS_FILE": str(accounts),
        **{f"BENCH_PIAPI_KEY_{n.upper()}": key for n, key in KEYS.items()},
    }
    # Each run starts from the environment the bench was given: no limit of the other run.
    os.environ.clear()
    os.environ.update(base_env)
    os.environ.update(env)
    stack = Stack(env, home / "logs")
    configured = False
    try:
        upgrade(url)
        settings = load_settings()
        runtimes.install(build_runtime(settings))
        reconfigure(settings)
        configured = True
        sandbox_url = stack.start_sandbox(sandbox_port)
        stack.start_web(web_port, workers=2)
        celery_cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_app"]
        stack.start(
            "worker",
            [
                *celery_cmd, "worker", "--pool", "prefork", "--concurrency", "4",
                "--without-gossip", "--without-mingle", "--loglevel", "WARNING",
                "--hostname", f"{name}@%h",
            ],
        )  # fmt: skip
        stack.start("beat", [*celery_cmd, "beat", "--loglevel", "WARNING"])
        yield stack, sandbox_url, url
    finally:
        for proc in stack.procs.values():  # every process asked at once: shutdowns overlap
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGTERM)
        stack.stop()
        runtimes.uninstall()
        if configured:
            with contextlib.suppress(Exception), celery.connection_for_write() as conn:
                bound = celery.amqp.queues[name].bind(conn.default_channel)
                bound.declare()
                bound.delete()
        drop_database(args.admin_url, name)


def submit_all(jobs: dict[str, int]) -> None:
    """Every job at once (a few threads), the providers interleaved."""
    image = png_bytes(64, 64)
    makers: dict[str, Callable[[], object]] = {
        "piapi": lambda: submit_variation("piapi", **PIAPI_PARAMS),
        "piclaza": lambda: submit_variation("piclaza", image=image),
        "lemondata": lambda: submit_variation("lemondata", image=image),
    }
    total = sum(jobs.values())
    order: list[str] = []
    sent = Counter[str]()
    for i in range(total):  # each provider's jobs spread evenly over the submissions
        provider = max(jobs, key=lambda p: (jobs[p] * (i + 1) / total - sent[p], jobs[p]))
        sent[provider] += 1
        order.append(provider)
    with ThreadPoolExecutor(SUBMIT_THREADS) as pool:
        for future in [pool.submit(makers[p]) for p in order]:
            future.result()


def warm_up(engine: Engine, sandbox_url: str, stack: Stack) -> None:
    """A few jobs of each provider before the burst, so that it finds every process
    started and connected; then forgotten (rows deleted, the sandbox's counters reset)."""
    ids = [
        submit_variation(provider, **params).id
        for _ in range(WARMUP)
        for provider, params in (
            ("piapi", PIAPI_PARAMS),
            ("piclaza", {"image": png_bytes(64, 64)}),
            ("lemondata", {"image": png_bytes(64, 64)}),
        )
    ]
    deadline = time.monotonic() + 120
    query = select(func.count()).where(Job.id.in_(ids), Job.status.in_(TERMINAL))
    while True:
        with engine.connect() as conn:
            if conn.execute(query).scalar_one() == len(ids):
                break
        for name, proc in stack.procs.items():
            if proc.poll() is not None:
                raise MeasurementError(f"{name} exited with {proc.returncode} during the warm-up")
        if time.monotonic() > deadline:
            raise MeasurementError("the warm-up jobs did not end within 120 s")
        time.sleep(MONITOR_SECONDS)
    with engine.connect() as conn:
        conn.execute(text("TRUNCATE jobs, job_events, job_inputs CASCADE"))
    httpx.post(f"{sandbox_url}/_sandbox/reset", json={"keep_config": True}, timeout=30)


def run_once(mode: str, args: argparse.Namespace, base_env: dict[str, str]) -> Result:
    jobs = {p: max(1, round(n * args.scale)) for p, n in JOBS.items()}
    home = Path(tempfile.mkdtemp(prefix=f"variflow-capacity-{mode}-"))
    try:
        with deployment(mode, args, home, base_env) as (stack, sandbox_url, url):
            return _measure(mode, jobs, args, stack, sandbox_url, url)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _measure(
    mode: str,
    jobs: dict[str, int],
    args: argparse.Namespace,
    stack: Stack,
    sandbox_url: str,
    url: str,
) -> Result:
    engine = nullpool_engine(url, isolation_level="AUTOCOMMIT")
    warm_up(engine, sandbox_url, stack)
    sampler = Sampler(sandbox_url)
    total = sum(jobs.values())
    ends: dict[str, float] = {}
    try:
        sampler.start()
        meter = CpuMeter()
        started = time.monotonic()
        submitter = threading.Thread(target=submit_all, args=(jobs,), name="submitter")
        submitter.start()
        submitted_at: float | None = None
        last_change, last_count = started, -1
        while len(ends) < len(jobs):
            time.sleep(MONITOR_SECONDS)
            now = time.monotonic()
            if submitted_at is None and not submitter.is_alive():
                submitted_at = now
            with engine.connect() as conn:
                rows = conn.execute(
                    select(Job.provider, func.count())
                    .where(Job.status.in_(TERMINAL))
                    .group_by(Job.provider)
                ).all()
            ended = {str(p): int(n) for p, n in rows}
            for provider, n in jobs.items():
                if provider not in ends and ended.get(provider, 0) >= n and submitted_at:
                    ends[provider] = now - started
            count = sum(ended.values())
            if count != last_count:
                last_change, last_count = now, count
            elif now - last_change > args.stall_timeout:
                raise MeasurementError(
                    f"capacity {mode}: {count}/{total} jobs ended; nothing moved for"
                    f" {now - last_change:.0f} s"
                )
            for name, proc in stack.procs.items():
                if proc.poll() is not None:
                    raise MeasurementError(f"{name} exited with {proc.returncode}")
        makespan = max(ends.values())
        cpu = meter.stop()
        submitter.join()
    finally:
        sampler.stop()
    utilisation = {p: sampler.mean_running(p, started, started + ends[p]) / SLOTS[p] for p in SLOTS}
    with engine.connect() as conn:
        outcomes: Counter[str] = Counter()
        for status, code, n in conn.execute(
            select(Job.status, Job.error_code, func.count()).group_by(Job.status, Job.error_code)
        ):
            outcomes[f"{status}:{code}" if code else str(status)] += int(n)
        timings = conn.execute(
            select(Job.provider, Job.account, Job.submitted_at, Job.completed_at).where(
                Job.status == "completed", Job.provider.in_(list(SLOTS))
            )
        ).all()
    engine.dispose()
    refill = refill_gaps([(str(p), str(a), s, e) for p, a, s, e in timings])
    stats = httpx.get(f"{sandbox_url}/_sandbox/stats", timeout=30).json()
    tasks = httpx.get(f"{sandbox_url}/_sandbox/tasks", timeout=60).json()["tasks"]
    labels = fingerprints()
    refused: Counter[str] = Counter()
    keys: dict[str, dict[str, Any]] = {}
    for provider, by_key in stats["capacity"].items():
        for fingerprint, used in by_key.items():
            for kind, n in used["refused"].items():
                refused[f"{provider}:{kind}"] += int(n)
            label = labels.get(fingerprint, fingerprint)
            keys[label if provider == "piapi" else provider] = used
    creates: Counter[str] = Counter()
    for task in tasks:
        label = labels.get(task["key_fingerprint"], task["key_fingerprint"])
        creates[label if task["provider"] == "piapi" else task["provider"]] += 1
    return Result(
        mode=mode,
        jobs=jobs,
        submit_seconds=(submitted_at or started) - started,
        makespan=makespan,
        ends=ends,
        outcomes=outcomes,
        refused=Counter({k: v for k, v in refused.items() if v}),
        utilisation=utilisation,
        keys=keys,
        creates_by_key=creates,
        refill=refill,
        cpu=cpu,
    )


def refill_gaps(rows: list[tuple[str, str, datetime | None, datetime | None]]) -> dict[str, float]:
    """Per slot-limited provider, the median time from a job's end (as variflow saw it) to
    the create that took its slot on the same account: with S slots, the k-th create after
    the first S needs the (k - S)-th end. The latency admission adds to each slot's cycle."""
    by_account: dict[tuple[str, str], tuple[list[datetime], list[datetime]]] = {}
    for provider, account, started, ended in rows:
        if started is None or ended is None:
            continue
        starts, ends = by_account.setdefault((provider, account), ([], []))
        starts.append(started)
        ends.append(ended)
    gaps: dict[str, list[float]] = {}
    for (provider, _), (starts, ends) in by_account.items():
        slots = PIAPI_SLOTS_PER_KEY if provider == "piapi" else PICLAZA_SLOTS
        starts.sort()
        ends.sort()
        gaps.setdefault(provider, []).extend(
            (starts[k] - ends[k - slots]).total_seconds() for k in range(slots, len(starts))
        )
    return {p: statistics.median(g) for p, g in gaps.items() if g}


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--scale", type=float, default=1.0, help="a share of the 2,000 jobs of each provider"
    )
    parser.add_argument(
        "--task-seconds",
        type=float,
        default=TASK_SECONDS,
        help="how long each sandbox task runs (the issue: a few hundred ms); longer tasks"
        " ask fewer jobs a second of the machine",
    )
    parser.add_argument(
        "--stall-timeout",
        type=float,
        default=120.0,
        help="give up when no job ended for this many seconds (beyond the 30 s retry cap)",
    )
    parser.add_argument(
        "--admin-url",
        default=os.environ.get("VARIFLOW_BENCH_ADMIN_URL", DEFAULT_ADMIN_URL),
        help="a PostgreSQL database to connect to for CREATE/DROP DATABASE"
        " (env VARIFLOW_BENCH_ADMIN_URL); each run creates its own database",
    )
    parser.add_argument(
        "--broker-url",
        default=os.environ.get("VARIFLOW_BENCH_BROKER_URL", DEFAULT_BROKER_URL),
        help="the Redis broker (env VARIFLOW_BENCH_BROKER_URL); each run uses a queue"
        " of its own, deleted at the end",
    )
    args = parser.parse_args(argv)
    if not 0 < args.scale <= 1:
        parser.error("--scale must be in (0, 1]")
    if not 0 < args.task_seconds <= 60:
        parser.error("--task-seconds must be in (0, 60]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    wall = time.monotonic()
    load = os.getloadavg()
    print(
        f"capacity admission on PostgreSQL + Redis; load average {load[0]:.2f} {load[1]:.2f}"
        f" {load[2]:.2f}; {os.cpu_count()} CPUs",
        flush=True,
    )
    jobs = {p: max(1, round(n * args.scale)) for p, n in JOBS.items()}
    ideal = ideal_seconds(jobs, args.task_seconds)
    print(
        f"sandbox: PiAPI 2 keys x {PIAPI_SLOTS_PER_KEY} slots (staged beyond), Piclaza"
        f" {PICLAZA_SLOTS} slots (refused beyond), LemonData {LEMONDATA_PER_MINUTE} requests"
        f" a minute (429 beyond); tasks {args.task_seconds:g} s",
        flush=True,
    )
    print("settings: " + " ".join(f"{k}={v}" for k, v in SETTINGS.items()), flush=True)
    base_env = {
        k: v for k, v in os.environ.items() if not k.startswith(("VARIFLOW_", "BENCH_PIAPI_"))
    }
    try:
        redis.Redis.from_url(args.broker_url, socket_connect_timeout=3).ping()
    except Exception as exc:
        print(f"cannot set up: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    results = []
    for mode in ("on", "off"):
        began = time.monotonic()
        print(f"capacity {mode}: {sum(jobs.values())} jobs {dict(jobs)} ...", flush=True)
        try:
            result = run_once(mode, args, base_env)
        except Exception as exc:
            print(f"could not measure: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        print("\n".join(result.details(ideal)), flush=True)
        print(f"  (run took {time.monotonic() - began:.0f} s)", flush=True)
        results.append(result)
    print(
        f"ideal: makespan={max(ideal.values()):.1f}s (piapi {ideal['piapi']:.1f} s, piclaza"
        f" {ideal['piclaza']:.1f} s, lemondata {ideal['lemondata']:.1f} s): every slot busy"
        " from the first moment, each rate used from its first turn"
    )
    for result in results:
        print(result.line(), flush=True)
    load = os.getloadavg()
    print(
        f"total wall time {time.monotonic() - wall:.0f} s; load average at the end"
        f" {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
