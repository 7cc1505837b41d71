"""Load generator for bench/webhook_ingest.py: processes x threads, keep-alive http.client.

Processes, not just threads, because one Python process cannot drive a
multi-worker server: the GIL would make the generator the bottleneck. Each
thread owns one keep-alive connection and a fixed list of deliveries, sent in
order, so the deliveries of one job (processing before completed) keep their
order while different jobs interleave across connections.

Two modes:

- closed loop (``rate=None``): every thread sends its next delivery as soon as
  the previous answer arrived; throughput at saturation is deliveries / wall time.
- open loop (``rate=R``): delivery number g (a global index, dealt round-robin
  over the threads) is *scheduled* at start + g / R. Latency is measured from
  the scheduled time, not from the moment it was actually sent, so a slow
  answer that delays the next send shows up in the numbers instead of silently
  lowering the offered load (coordinated omission).
"""

from __future__ import annotations

import http.client
import math
import multiprocessing as mp
import queue as queue_mod
import resource
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.queues import Queue

# Gunicorn closes idle keep-alive connections (2 s by default); http.client
# only notices on the next request. Those errors mean "reconnect", not "failed".
_STALE_CONNECTION = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)
_MAX_ERROR_SAMPLES = 5


@dataclass(frozen=True)
class Delivery:
    """One webhook POST, fully encoded before the run so encoding costs nothing during it."""

    path: str
    secret: str
    body: bytes


@dataclass
class ProcessResult:
    latencies: list[float] = field(default_factory=list)  # seconds, successful answers
    lags: list[float] = field(default_factory=list)  # open loop: seconds sent after schedule
    sent: int = 0
    errors: int = 0
    error_samples: list[str] = field(default_factory=list)
    reconnects: int = 0
    finished_wall: float = 0.0
    cpu_seconds: float = 0.0


@dataclass(frozen=True)
class LoadReport:
    sent: int
    errors: int
    error_samples: list[str]
    reconnects: int
    seconds: float
    latencies: list[float]  # sorted, seconds
    lags: list[float]  # sorted, seconds; open loop only
    loadgen_cpu_seconds: float

    @property
    def throughput(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0

    def percentile(self, p: float) -> float:
        """Nearest-rank latency percentile in seconds (NaN when nothing answered)."""
        return _percentile(self.latencies, p)

    def lag_percentile(self, p: float) -> float:
        """How late the generator itself sent (open loop): high means it was starved of CPU."""
        return _percentile(self.lags, p)


def _percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    rank = max(1, min(len(values), math.ceil(p / 100 * len(values))))
    return values[rank - 1]


class _Connection:
    """One keep-alive connection that reopens itself when the server closed it while idle."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self._host, self._port, self._timeout = host, port, timeout
        self._conn: http.client.HTTPConnection | None = None
        self.reconnects = 0

    def post(self, delivery: Delivery) -> tuple[int, bytes]:
        while True:
            reused = self._conn is not None
            if self._conn is None:
                self._conn = http.client.HTTPConnection(self._host, self._port, self._timeout)
            try:
                self._conn.request(
                    "POST",
                    delivery.path,
                    body=delivery.body,
                    headers={
                        "Content-Type": "application/json",
                        "x-webhook-secret": delivery.secret,
                    },
                )
                response = self._conn.getresponse()
                data = response.read()
            except _STALE_CONNECTION:
                self.close()
                if not reused:
                    raise  # a fresh connection failing is a real error
                # Retrying is safe: the server closed an idle connection before
                # reading anything, and deliveries are idempotent anyway.
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


def _thread_main(
    host: str,
    port: int,
    timeout: float,
    deliveries: list[Delivery],
    thread_index: int,
    total_threads: int,
    rate: float | None,
    start: float,
    result: ProcessResult,
    lock: threading.Lock,
) -> None:
    conn = _Connection(host, port, timeout)
    latencies: list[float] = []
    lags: list[float] = []
    errors = 0
    samples: list[str] = []
    # Wait for the common start (perf_counter clock), so all threads begin together.
    delay = start - time.perf_counter()
    if delay > 0:
        time.sleep(delay)
    try:
        for j, delivery in enumerate(deliveries):
            if rate is None:
                began = time.perf_counter()
            else:
                began = start + (thread_index + j * total_threads) / rate
                wait = began - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                lags.append(max(0.0, time.perf_counter() - began))
            try:
                status, body = conn.post(delivery)
            except Exception as exc:
                errors += 1
                if len(samples) < _MAX_ERROR_SAMPLES:
                    samples.append(f"{delivery.path}: {type(exc).__name__}: {exc}")
                continue
            latencies.append(time.perf_counter() - began)
            if status != 200:
                errors += 1
                if len(samples) < _MAX_ERROR_SAMPLES:
                    samples.append(f"{delivery.path}: HTTP {status} {body[:200]!r}")
    finally:
        conn.close()
    with lock:
        result.latencies.extend(latencies)
        result.lags.extend(lags)
        result.sent += len(deliveries)
        result.errors += errors
        result.error_samples.extend(samples[: _MAX_ERROR_SAMPLES - len(result.error_samples)])
        result.reconnects += conn.reconnects


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _process_main(
    out: Queue[ProcessResult],
    host: str,
    port: int,
    timeout: float,
    thread_lists: list[list[Delivery]],
    first_thread_index: int,
    total_threads: int,
    rate: float | None,
    start_wall: float,
) -> None:
    # time.time() is the only clock shared by processes; convert once to perf_counter.
    start = time.perf_counter() + (start_wall - time.time())
    cpu_before = _cpu_seconds()
    result = ProcessResult()
    lock = threading.Lock()
    threads = [
        threading.Thread(
            target=_thread_main,
            args=(
                host,
                port,
                timeout,
                deliveries,
                first_thread_index + i,
                total_threads,
                rate,
                start,
                result,
                lock,
            ),
            daemon=True,
        )
        for i, deliveries in enumerate(thread_lists)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.finished_wall = time.time()
    result.cpu_seconds = _cpu_seconds() - cpu_before
    out.put(result)


def run_load(
    host: str,
    port: int,
    thread_lists: list[list[Delivery]],
    processes: int,
    *,
    rate: float | None = None,
    timeout: float = 30.0,
) -> LoadReport:
    """Send every list of ``thread_lists`` on its own thread, spread over ``processes``."""
    total_threads = len(thread_lists)
    per_process = -(-total_threads // processes)
    # fork: the children need nothing but the prebuilt deliveries, and start in
    # milliseconds (the parent has no threads and uses NullPool, so no shared sockets).
    ctx = mp.get_context("fork")
    out: Queue[ProcessResult] = ctx.Queue()
    # A common start a moment ahead, so process start-up is not counted.
    start_wall = time.time() + 0.25
    workers = []
    for p in range(processes):
        first = p * per_process
        chunk = thread_lists[first : first + per_process]
        if not chunk:
            continue
        worker = ctx.Process(
            target=_process_main,
            args=(out, host, port, timeout, chunk, first, total_threads, rate, start_wall),
            daemon=True,
        )
        worker.start()
        workers.append(worker)

    results: list[ProcessResult] = []
    # Generous bound: a hung server must fail the bench, not hang it forever.
    deadline = time.monotonic() + 600
    try:
        while len(results) < len(workers):
            try:
                results.append(out.get(timeout=1.0))
            except queue_mod.Empty:
                if time.monotonic() > deadline:
                    raise TimeoutError("load generator did not finish within 600 s") from None
                dead = [w for w in workers if w.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(
                        f"load generator process exited with code {dead[0].exitcode}"
                    ) from None
    finally:
        for worker in workers:
            worker.join(timeout=5)
            if worker.is_alive():
                worker.terminate()

    latencies = sorted(lat for r in results for lat in r.latencies)
    samples = [s for r in results for s in r.error_samples][:_MAX_ERROR_SAMPLES]
    return LoadReport(
        sent=sum(r.sent for r in results),
        errors=sum(r.errors for r in results),
        error_samples=samples,
        reconnects=sum(r.reconnects for r in results),
        seconds=max(r.finished_wall for r in results) - start_wall,
        latencies=latencies,
        lags=sorted(lag for r in results for lag in r.lags),
        loadgen_cpu_seconds=sum(r.cpu_seconds for r in results),
    )
