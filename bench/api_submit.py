"""HTTP submit benchmark: ``POST /v1/jobs`` on the real app vs a bare Flask app answering 201.

    python bench/api_submit.py          # run by `make bench`

It prints numbers and exits 0 whether or not they are good; it exits non-zero only
when it could not measure (database or broker unreachable, a server did not start).

What runs, all on 127.0.0.1, started and stopped by the bench:

- a throwaway PostgreSQL database on the shared server (--admin-url), migrated with
  ``worker.migrate.upgrade``, with one API token (``worker.tokens.issue``, tenant
  ``bench``); dropped at the end, always;
- Redis as the broker (--broker-url), a queue of its own (``variflow_bench_api_<pid>``,
  VARIFLOW_QUEUE): every accepted job publishes its ``submit_job`` message there after
  its commit, as in a deployment. **No Celery worker runs**: nothing consumes the
  queue, the jobs stay ``queued`` and no provider is called. The bench counts the
  messages at the end (one per accepted job) and deletes the queue, always;
- the real app: gunicorn serving ``webhooks.wsgi:app`` as ``variflow serve`` does
  (``--config python:webhooks.gunicorn_conf``, gthread, 2 workers x 16 threads, the
  default of VARIFLOW_WEB_THREADS), log level warning and no access log (as
  bench/webhook_ingest.py; an access log line per request would be measured too);
- the bare app: ``bare_app`` below (Flask: parse the JSON body, answer 201 with a
  small job and a Location), under the very same gunicorn command line.

Each request is what a client of the API sends: ``POST /v1/jobs`` with
``Authorization: Bearer <token>``, a fresh ``Idempotency-Key`` (the Python client
always sends one) and a PiAPI job (origin_task_id, index, prompt) as JSON. The real app
checks the token, validates, writes the job and its first event, commits and publishes.

Measured, for the real app and then the bare one, after a warm-up:

1. closed loop: C connections, each sending its next request as soon as the previous
   answer came, for --step-seconds; C doubles (2, 4, 8, ...) until throughput stops
   growing by --growth; the best throughput is the saturating rate;
2. open loop at half the real app's saturating rate (the same rate for both apps):
   request g is scheduled at start + g / rate and its latency counted from that time,
   so a slow answer that delays later sends shows (no coordinated omission).

The load generator (--load-processes processes of keep-alive http.client connections)
shares the machine's CPUs with gunicorn and PostgreSQL: absolute numbers are a floor,
the ratio is the point. Prints, besides details:

    api submit: <jobs/s> vs bare <req/s> ratio <r>
    api submit p99 at <rate>/s: <ms> ms (bare <ms> ms)
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import multiprocessing as mp
import os
import queue as queue_mod
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.queues import Queue
from pathlib import Path

from _db import create_database, drop_database, nullpool_engine
from _gunicorn import GunicornServer, http_status, probe_healthz
from _machine import cpu_ticks
from celery import Celery
from flask import Flask, jsonify, request
from flask.typing import ResponseReturnValue
from sqlalchemy import text
from sqlalchemy.orm import Session

from worker import tokens
from worker.config import Settings
from worker.migrate import upgrade

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "bench"
HOST = "127.0.0.1"
DEFAULT_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379"
# Above this share of the machine busy before the bench, say that the numbers are noisy.
NOISY_SHARE = 0.10
PROMPT = "a lighthouse at dusk, oil painting"
# Gunicorn closes idle keep-alive connections; http.client notices on the next request.
_STALE_CONNECTION = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)
_MAX_ERROR_SAMPLES = 5


# --------------------------------------------------------------------------- the bare app

bare_app = Flask("bare_api")


@bare_app.post("/v1/jobs")
def bare_create_job() -> ResponseReturnValue:
    # Parse the body and answer a job-shaped 201, so that HTTP + WSGI + Flask + JSON are
    # on both sides and the ratio isolates what variflow adds.
    body = request.get_json(silent=True) or {}
    job_id = str(uuid.uuid4())
    job = {
        "id": job_id,
        "provider": body.get("provider"),
        "status": "queued",
        "input": body.get("input"),
    }
    return jsonify(job), 201, {"Location": f"/v1/jobs/{job_id}"}


# --------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    # `variflow serve`'s: gthread, 2 workers (its default) x VARIFLOW_WEB_THREADS threads
    # (the setting's default, not this shell's value: the bench sets it for the real app).
    parser.add_argument("--workers", type=int, default=2, help="gunicorn worker processes")
    parser.add_argument(
        "--threads",
        type=int,
        default=Settings.model_fields["web_threads"].default,
        help="gunicorn threads per worker (VARIFLOW_WEB_THREADS)",
    )
    parser.add_argument("--load-processes", type=int, default=2, help="load generator processes")
    parser.add_argument("--step-seconds", type=float, default=3.0, help="per closed-loop step")
    parser.add_argument(
        "--growth", type=float, default=0.05, help="a step must beat the best by this to go on"
    )
    parser.add_argument("--max-connections", type=int, default=64, help="closed-loop ceiling")
    parser.add_argument("--warmup-seconds", type=float, default=2.0)
    parser.add_argument("--open-seconds", type=float, default=6.0, help="open-loop duration")
    parser.add_argument(
        "--open-connections", type=int, default=32, help="open-loop connections (all processes)"
    )
    parser.add_argument(
        "--open-loop-fraction",
        type=float,
        default=0.5,
        help="open-loop rate as a fraction of the real app's saturating rate",
    )
    parser.add_argument(
        "--admin-url",
        default=os.environ.get("VARIFLOW_BENCH_ADMIN_URL", DEFAULT_ADMIN_URL),
        help="a PostgreSQL database to connect to for CREATE/DROP DATABASE "
        "(env VARIFLOW_BENCH_ADMIN_URL); the bench creates its own database",
    )
    parser.add_argument(
        "--broker-url",
        default=os.environ.get("VARIFLOW_BENCH_BROKER_URL", DEFAULT_BROKER_URL),
        help="the Redis broker (env VARIFLOW_BENCH_BROKER_URL); a queue of the bench's own",
    )
    parser.add_argument("--request-timeout", type=float, default=30.0, help="seconds")
    args = parser.parse_args(argv)
    if not args.broker_url.startswith(("redis://", "rediss://")):
        parser.error("--broker-url must be a Redis URL (redis://...)")
    for name in ("workers", "threads", "load_processes", "max_connections", "open_connections"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 < args.open_loop_fraction <= 1:
        parser.error("--open-loop-fraction must be in (0, 1]")
    return args


# --------------------------------------------------------------------------- load generator


@dataclass(frozen=True)
class Target:
    port: int
    token: str
    timeout: float


@dataclass
class ProcessResult:
    latencies: list[float] = field(default_factory=list)  # seconds, 201 answers
    lags: list[float] = field(default_factory=list)  # open loop: seconds sent after schedule
    sent: int = 0
    accepted: int = 0  # 201
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    reconnects: int = 0
    finished_wall: float = 0.0


@dataclass(frozen=True)
class LoadReport:
    connections: int
    sent: int
    accepted: int
    errors: int
    error_samples: list[str]
    reconnects: int
    seconds: float
    latencies: list[float]  # sorted
    lags: list[float]  # sorted; open loop only

    @property
    def throughput(self) -> float:
        """Accepted (201) requests per second."""
        return self.accepted / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, p: float) -> float:
        return _percentile(self.latencies, p)

    def lag_percentile(self, p: float) -> float:
        return _percentile(self.lags, p)


def _percentile(values: list[float], p: float) -> float:
    """Nearest rank, in seconds (NaN when there is nothing)."""
    if not values:
        return float("nan")
    rank = max(1, min(len(values), math.ceil(p / 100 * len(values))))
    return values[rank - 1]


class _Connection:
    """One keep-alive connection that reopens itself when the server closed it while idle."""

    def __init__(self, target: Target) -> None:
        self._target = target
        self._conn: http.client.HTTPConnection | None = None
        self.reconnects = 0

    def post(self, body: bytes, key: str) -> tuple[int, bytes]:
        headers = {
            "Content-Type": "application/json",
            "Authorization": f"Bearer {self._target.token}",
            "Idempotency-Key": key,
        }
        while True:
            reused = self._conn is not None
            if self._conn is None:
                self._conn = http.client.HTTPConnection(
                    HOST, self._target.port, timeout=self._target.timeout
                )
            try:
                self._conn.request("POST", "/v1/jobs", body=body, headers=headers)
                response = self._conn.getresponse()
                data = response.read()
            except _STALE_CONNECTION:
                self.close()
                if not reused:
                    raise  # a fresh connection failing is a real error
                # Safe to send again: the server closed an idle connection before reading,
                # and the Idempotency-Key would make a replay the same job anyway.
                self.reconnects += 1
                continue
            except BaseException:
                self.close()
                raise
            if response.will_close:
                self.close()
            return response.status, data

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _job_request(tag: str) -> tuple[bytes, str]:
    """A PiAPI job of its own (body, Idempotency-Key): every request is a new job."""
    body = {
        "provider": "piapi",
        "input": {"origin_task_id": f"bench-{tag}", "index": "1", "prompt": PROMPT},
    }
    return json.dumps(body).encode(), f"bench-{tag}"


def _thread_main(
    target: Target,
    index: int,
    total: int,
    start: float,
    stop: float,
    rate: float | None,
    result: ProcessResult,
    lock: threading.Lock,
) -> None:
    conn = _Connection(target)
    latencies: list[float] = []
    lags: list[float] = []
    sent = accepted = errors = 0
    samples: list[str] = []
    prefix = f"{os.getpid()}-{index}-{uuid.uuid4().hex[:6]}"
    delay = start - time.perf_counter()
    if delay > 0:
        time.sleep(delay)  # the common start of every thread
    try:
        for j in range(sys.maxsize):
            if rate is None:
                began = time.perf_counter()
                if began >= stop:
                    break
            else:
                began = start + (index + j * total) / rate
                if began >= stop:
                    break
                wait = began - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                lags.append(max(0.0, time.perf_counter() - began))
            body, key = _job_request(f"{prefix}-{j}")
            sent += 1
            try:
                status, answer = conn.post(body, key)
            except Exception as exc:
                errors += 1
                if len(samples) < _MAX_ERROR_SAMPLES:
                    samples.append(f"{type(exc).__name__}: {exc}")
                continue
            if status == 201:
                accepted += 1
                latencies.append(time.perf_counter() - began)
            else:
                errors += 1
                if len(samples) < _MAX_ERROR_SAMPLES:
                    samples.append(f"HTTP {status} {answer[:200]!r}")
    finally:
        conn.close()
    with lock:
        result.latencies.extend(latencies)
        result.lags.extend(lags)
        result.sent += sent
        result.accepted += accepted
        result.errors += errors
        result.error_samples.extend(samples[: _MAX_ERROR_SAMPLES - len(result.error_samples)])
        result.reconnects += conn.reconnects


def _process_main(
    out: Queue[ProcessResult],
    target: Target,
    indexes: list[int],
    total: int,
    rate: float | None,
    start_wall: float,
    seconds: float,
) -> None:
    # time.time() is the only clock processes share: convert once to perf_counter.
    start = time.perf_counter() + (start_wall - time.time())
    result = ProcessResult()
    lock = threading.Lock()
    threads = [
        threading.Thread(
            target=_thread_main,
            args=(target, i, total, start, start + seconds, rate, result, lock),
            daemon=True,
        )
        for i in indexes
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.finished_wall = time.time()
    out.put(result)


def run_load(
    target: Target, connections: int, processes: int, seconds: float, rate: float | None = None
) -> LoadReport:
    """``connections`` threads over ``processes`` processes (processes, not only threads:
    one Python process cannot drive a multi-worker server, the GIL would be the limit),
    closed loop (``rate`` None) or open loop at ``rate`` requests per second."""
    ctx = mp.get_context("fork")  # the children need nothing but their arguments
    out: Queue[ProcessResult] = ctx.Queue()
    start_wall = time.time() + 0.25  # a common start, so process start-up is not counted
    workers = []
    for p in range(min(processes, connections)):
        indexes = list(range(p, connections, processes))
        worker = ctx.Process(
            target=_process_main,
            args=(out, target, indexes, connections, rate, start_wall, seconds),
            daemon=True,
        )
        worker.start()
        workers.append(worker)
    results: list[ProcessResult] = []
    deadline = time.monotonic() + seconds + target.timeout + 60
    try:
        while len(results) < len(workers):
            try:
                results.append(out.get(timeout=1.0))
            except queue_mod.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError("the load generator did not finish") from None
                dead = [w for w in workers if w.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"load generator exited with {dead[0].exitcode}") from None
    finally:
        for worker in workers:
            worker.join(timeout=5)
            if worker.is_alive():
                worker.terminate()
    return LoadReport(
        connections=connections,
        sent=sum(r.sent for r in results),
        accepted=sum(r.accepted for r in results),
        errors=sum(r.errors for r in results),
        error_samples=[s for r in results for s in r.error_samples][:_MAX_ERROR_SAMPLES],
        reconnects=sum(r.reconnects for r in results),
        seconds=max(r.finished_wall for r in results) - start_wall,
        latencies=sorted(x for r in results for x in r.latencies),
        lags=sorted(x for r in results for x in r.lags),
    )


# --------------------------------------------------------------------------- gunicorn


def serve(
    name: str,
    app_spec: str,
    args: argparse.Namespace,
    env: dict[str, str],
    probe: Callable[[int], bool],
) -> GunicornServer:
    """One app under `variflow serve`'s gunicorn settings (the same for both apps)."""
    return GunicornServer(
        name,
        app_spec,
        workers=args.workers,
        threads=args.threads,
        env=env,
        probe=probe,
        config="python:webhooks.gunicorn_conf",
        pythonpath=BENCH_DIR,  # for api_submit:bare_app; nothing else is found there
    )


def probe_bare(port: int) -> bool:
    return http_status(port, "POST", "/v1/jobs", b"{}") == 201


# --------------------------------------------------------------------------- running


@dataclass
class AppResult:
    name: str
    steps: list[LoadReport]
    open_loop: LoadReport
    rate: float
    accepted: int  # 201s over every run, warm-up included

    @property
    def saturation(self) -> LoadReport:
        return max(self.steps, key=lambda r: r.throughput)


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f}"


def _line(label: str, report: LoadReport) -> str:
    errors = f", {report.errors} ERRORS" if report.errors else ""
    lag = f", send lag p99 {_ms(report.lag_percentile(99))} ms" if report.lags else ""
    return (
        f"  {label:<18} {report.accepted} accepted in {report.seconds:.2f} s = "
        f"{report.throughput:,.0f}/s  p50 {_ms(report.percentile(50))} ms  "
        f"p99 {_ms(report.percentile(99))} ms{lag}{errors}"
    )


def _print_errors(report: LoadReport) -> None:
    for sample in report.error_samples:
        print(f"    error: {sample}", flush=True)


def saturate(target: Target, args: argparse.Namespace) -> list[LoadReport]:
    """Closed loop with 2, 4, 8, ... connections until throughput stops growing: at least
    as many connections as gunicorn has threads (fewer cannot keep them all busy), then
    until two steps in a row fail to beat the best by --growth (one may be noise)."""
    steps: list[LoadReport] = []
    server_threads = args.workers * args.threads
    connections = 2
    flat = 0
    while connections <= args.max_connections:
        report = run_load(target, connections, args.load_processes, args.step_seconds)
        print(_line(f"closed, {connections} conn.", report), flush=True)
        _print_errors(report)
        best = max((s.throughput for s in steps), default=0.0)
        steps.append(report)
        flat = flat + 1 if report.throughput < best * (1 + args.growth) else 0
        if flat >= 2 and connections >= server_threads:
            break
        connections *= 2
    return steps


def bench_app(
    server: GunicornServer, token: str, args: argparse.Namespace, rate: float | None
) -> AppResult:
    """Warm up, find the saturating rate, then an open loop at ``rate`` (default: the
    given fraction of this app's own saturating rate)."""
    print(f"\n== {server.name}: {' '.join(server.command[1:])}", flush=True)
    started = time.monotonic()
    server.start()
    print(f"  ready in {time.monotonic() - started:.2f} s (polled readiness)", flush=True)
    target = Target(server.port, token, args.request_timeout)
    # Warm-up: every worker process imports, connects its pool, fills caches.
    warmup = run_load(target, 8, args.load_processes, args.warmup_seconds)
    print(_line("warm-up", warmup), flush=True)
    steps = saturate(target, args)
    best = max(steps, key=lambda r: r.throughput)
    rate = rate if rate is not None else best.throughput * args.open_loop_fraction
    open_loop = run_load(
        target, args.open_connections, args.load_processes, args.open_seconds, rate
    )
    print(_line(f"open {rate:,.0f}/s", open_loop), flush=True)
    _print_errors(open_loop)
    accepted = warmup.accepted + sum(s.accepted for s in steps) + open_loop.accepted
    return AppResult(server.name, steps, open_loop, rate, accepted)


# --------------------------------------------------------------------------- database, broker


def issue_token(db_url: str) -> str:
    engine = nullpool_engine(db_url)
    try:
        with Session(engine) as session, session.begin():
            return tokens.issue(session, "bench", "bench")[1]
    finally:
        engine.dispose()


def count_jobs(db_url: str) -> tuple[int, int]:
    """(jobs, job events) in the bench's database."""
    engine = nullpool_engine(db_url)
    try:
        with engine.connect() as conn:
            jobs = conn.scalar(text("SELECT count(*) FROM jobs")) or 0
            events = conn.scalar(text("SELECT count(*) FROM job_events")) or 0
        return int(jobs), int(events)
    finally:
        engine.dispose()


def broker_app(broker_url: str, queue: str) -> Celery:
    """A Celery app whose default queue is declared as variflow's app declares it, so
    deleting it here deletes what the real app published to."""
    return Celery(
        "variflow-bench",
        set_as_current=False,
        broker=broker_url,
        config_source={"task_default_queue": queue, "broker_connection_timeout": 3},
    )


def delete_queue(broker: Celery) -> int:
    """Purge and delete the bench's queue; the number of messages it held."""
    with broker.connection_for_write() as conn:
        bound = broker.amqp.queues[broker.conf.task_default_queue].bind(conn.default_channel)
        bound.declare()
        count = int(bound.purge() or 0)
        bound.delete()
    return count


def _redacted(url: str) -> str:
    return re.sub(r"//[^@/]*@", "//***@", url)  # a URL may carry a password


# --------------------------------------------------------------------------- machine


def machine_busy(seconds: float = 1.0) -> float:
    """The share of the machine's CPUs busy over ``seconds`` (others' work, before we start)."""
    before = cpu_ticks()
    time.sleep(seconds)  # a measurement window, not a wait for something
    after = cpu_ticks()
    return (after.busy - before.busy) / max(1, after.total - before.total)


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    print("== HTTP API submit benchmark (POST /v1/jobs)")
    busy = machine_busy()
    print(
        f"machine: {os.cpu_count()} CPUs, {busy:.0%} busy before start (other processes),"
        f" load average {os.getloadavg()[0]:.2f}; the load generator, gunicorn, PostgreSQL"
        " and Redis share them, so absolute numbers are a floor"
    )
    print(
        f"gunicorn (both apps): --config python:webhooks.gunicorn_conf, gthread,"
        f" {args.workers} workers x {args.threads} threads, bound to {HOST}; no access log"
    )
    queue = f"variflow_bench_api_{os.getpid()}"
    broker = broker_app(args.broker_url, queue)
    try:
        with broker.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1)
    except Exception as exc:
        print(f"cannot reach the broker {_redacted(args.broker_url)}: {exc}", file=sys.stderr)
        return 2
    print(
        f"broker: Redis at {_redacted(args.broker_url)}, queue {queue}: each accepted job"
        " publishes submit_job there; no worker consumes it (deleted at the end)"
    )
    db_name = f"variflow_bench_api_{os.getpid()}"
    db_url = create_database(args.admin_url, db_name).render_as_string(hide_password=False)
    home = tempfile.mkdtemp(prefix="variflow-bench-api-")
    servers: list[GunicornServer] = []
    queue_deleted = False
    try:
        print(f"database: {db_name} (dropped at the end)")
        upgrade(db_url)
        token = issue_token(db_url)
        env = {
            "VARIFLOW_HOME": home,
            "VARIFLOW_DATABASE_URL": db_url,
            "VARIFLOW_BROKER_URL": args.broker_url,
            "VARIFLOW_QUEUE": queue,
            "VARIFLOW_LOG_LEVEL": "WARNING",
            "VARIFLOW_PIAPI_API_KEY": "bench-key",  # configured; never called (no worker)
            "VARIFLOW_WEB_THREADS": str(args.threads),  # what the app knows of its threads
        }
        real_server = serve("variflow /v1", "webhooks.wsgi:app", args, env, probe_healthz)
        servers.append(real_server)
        real = bench_app(real_server, token, args, None)
        real_log = real_server.log()
        real_server.stop()
        jobs, events = count_jobs(db_url)
        published = delete_queue(broker)
        queue_deleted = True

        bare_server = serve("bare Flask", "api_submit:bare_app", args, env, probe_bare)
        servers.append(bare_server)
        bare = bench_app(bare_server, token, args, real.rate)
        bare_log = bare_server.log()
        bare_server.stop()

        print("\n== results")
        for result in (real, bare):
            sat = result.saturation
            print(
                f"  {result.name:<12} saturation {sat.throughput:,.0f}/s with"
                f" {sat.connections} connections (p99 {_ms(sat.percentile(99))} ms);"
                f" open loop {result.open_loop.throughput:,.0f}/s achieved of"
                f" {result.rate:,.0f}/s offered, p99 {_ms(result.open_loop.percentile(99))} ms"
            )
        verdict = "OK" if jobs == published == events == real.accepted else "MISMATCH"
        print(
            f"  stored and published: {jobs} jobs, {events} events, {published} submit_job"
            f" messages for {real.accepted} accepted requests - {verdict}"
        )
        for name, log in (("variflow /v1", real_log), ("bare Flask", bare_log)):
            problems = [line for line in log.splitlines() if "Traceback" in line or "ERROR" in line]
            if problems:
                print(f"  {name}: gunicorn log has {len(problems)} error lines, e.g. {problems[0]}")
        load = os.getloadavg()
        print(f"  load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        if busy > NOISY_SHARE:
            print(
                f"note: other processes kept {busy:.0%} of the CPUs busy before the bench:"
                " the numbers are noisy, compare them on a quiet machine"
            )
        ratio = real.saturation.throughput / bare.saturation.throughput
        print()
        print(
            f"api submit: {real.saturation.throughput:.0f} vs bare"
            f" {bare.saturation.throughput:.0f} ratio {ratio:.2f}"
        )
        print(
            f"api submit p99 at {real.rate:.0f}/s: {_ms(real.open_loop.percentile(99))} ms"
            f" (bare {_ms(bare.open_loop.percentile(99))} ms)"
        )
    finally:
        for server in servers:
            server.stop()
        drop_database(args.admin_url, db_name)
        shutil.rmtree(home, ignore_errors=True)
        if not queue_deleted:
            try:
                delete_queue(broker)
            except Exception as exc:
                print(f"could not delete the queue {queue}: {exc}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
