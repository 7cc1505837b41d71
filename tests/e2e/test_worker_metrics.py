"""A Celery worker serves its own /metrics on VARIFLOW_WORKER_METRICS_PORT: the samples
its prefork children recorded, summed; the web app on the same VARIFLOW_HOME serves its
own and the database gauges, never the worker's. A restarted worker starts its counters
from zero (a counter reset to Prometheus), and a port in use stops it at start-up."""

from __future__ import annotations

import functools
import io
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from sandbox.config import SandboxConfig
from sandbox.server import SandboxServer
from tests.conftest import Configure
from tests.e2e.conftest import STOP_TIMEOUT
from worker.api import JobInfo, get_job, submit_variation
from worker.devstack import Stack, free_port, sandbox_env

pytestmark = pytest.mark.e2e

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

NODE = "metrics-test@%h"  # Celery expands %h: the folder is worker/metrics-test@<host>
REQUESTS = "variflow_upstream_requests_total"
TERMINAL = "variflow_jobs_terminal_total"
LEMONDATA_CREATES = {"provider": "lemondata", "operation": "create", "outcome": "ok"}
COMPLETED = {"provider": "lemondata", "status": "completed"}
# What the web app reads from the database when scraped (worker/job_stats.py, webhooks/metrics.py).
DATABASE_GAUGES = ("variflow_jobs", "variflow_polling_lag_seconds", "variflow_jobs_waiting")


def worker_argv() -> list[str]:
    # Each task in a fresh child: the samples of several processes, most of them exited.
    return [
        *(sys.executable, "-m", "celery", "-A", "worker.celery_app", "worker"),
        *("--concurrency", "2", "--max-tasks-per-child", "1", "--loglevel", "INFO"),
        *("--without-gossip", "--without-mingle", "--hostname", NODE),
    ]


def scrape(url: str) -> Samples | None:
    """The samples at ``url``; None while nothing listens there."""
    try:
        answer = httpx.get(url, timeout=5)
    except httpx.TransportError:
        return None
    assert answer.status_code == 200, answer.text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(answer.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, labels: dict[str, str]) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def database_gauges(samples: Samples) -> set[str]:
    return {n for n in names(samples) if n in DATABASE_GAUGES or n.startswith("variflow_account_")}


def wait_until(stack: Stack, predicate: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + 90
    while True:
        result = predicate()
        if result:
            return result
        stack.check_alive()
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


def run_jobs(stack: Stack, count: int) -> None:
    jobs = [submit_variation("lemondata", image=png(), n=1, size="256x256") for _ in range(count)]
    for job in jobs:
        done = wait_until(stack, functools.partial(ended, job.id), "a job's end")
        assert done.status == "completed", done.error_message


def ended(job_id: uuid.UUID) -> JobInfo | None:
    job = get_job(job_id)
    return job if job.is_terminal else None


def writers(folder: Path) -> set[str]:
    """The processes (host-pid) that wrote counters in ``folder``."""
    return {p.stem.removeprefix("counter_") for p in folder.glob("counter_*.db")}


@pytest.fixture
def sandbox(configure: Configure) -> Iterator[SandboxServer]:
    with SandboxServer(config=SandboxConfig(seed=7)) as server:
        configure(
            **{k.removeprefix("VARIFLOW_").lower(): v for k, v in sandbox_env(server.url).items()}
        )
        yield server


def test_a_worker_serves_its_childrens_samples_and_the_web_app_only_its_own(
    sqlite_url: str, sandbox: SandboxServer, tmp_path: Path
) -> None:
    metrics_port, web_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k.startswith("VARIFLOW_")}
    env["VARIFLOW_WORKER_METRICS_PORT"] = str(metrics_port)
    env["VARIFLOW_WORKER_METRICS_HOST"] = "127.0.0.1"
    worker_url = f"http://127.0.0.1:{metrics_port}/metrics"
    home = Path(env["VARIFLOW_HOME"])
    with Stack(env, tmp_path / "logs", stop_timeout=STOP_TIMEOUT) as stack:
        stack.start("worker", worker_argv())  # first: its start-up overlaps the web app's
        web_url = stack.start_web(web_port, workers=1)  # the same VARIFLOW_HOME
        wait_until(stack, lambda: scrape(worker_url) is not None, "the worker's /metrics")

        run_jobs(stack, 2)
        samples = wait_until(
            stack,
            lambda: (s := scrape(worker_url)) and value(s, TERMINAL, COMPLETED) == 2 and s,
            "2 terminal jobs at the worker's /metrics",
        )
        assert value(samples, REQUESTS, LEMONDATA_CREATES) == 2
        # Its own samples only: the gauges read from the database are the web app's.
        assert not database_gauges(samples)
        [folder] = (home / "metrics" / "worker").glob("metrics-test@*")
        first_run = writers(folder)
        assert len(first_run) >= 2  # a fresh child per task: summed over several processes

        web = scrape(f"{web_url}/metrics")
        assert web is not None
        assert value(web, "variflow_jobs", {"status": "completed"}) == 2
        assert database_gauges(web) >= {*DATABASE_GAUGES, "variflow_account_in_flight"}
        assert not {n for n in names(web) if n.startswith((REQUESTS, TERMINAL))}
        assert not writers(home / "metrics" / "web") & first_run

        # A restart empties the worker's folder: its counters start again from zero.
        # A clean stop, as an operator's restart (the stack's short stop_timeout is
        # for the teardown): up to Stack's default 15 s.
        stack.stop("worker", timeout=15.0)
        stack.start("worker", worker_argv())
        wait_until(stack, lambda: scrape(worker_url) is not None, "the restarted worker's /metrics")
        samples = scrape(worker_url)
        assert samples is not None
        assert not {n for n in names(samples) if n.startswith((REQUESTS, TERMINAL))}
        assert not writers(folder) & first_run
        run_jobs(stack, 1)
        wait_until(
            stack,
            lambda: (s := scrape(worker_url)) and value(s, TERMINAL, COMPLETED) == 1,
            "1 terminal job after the restart",
        )


def test_a_worker_stops_at_start_when_its_metrics_port_is_in_use(
    sqlite_url: str, tmp_path: Path
) -> None:
    env = {**os.environ, "VARIFLOW_WORKER_METRICS_HOST": "127.0.0.1"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env["VARIFLOW_WORKER_METRICS_PORT"] = str(port)
        done = subprocess.run(
            worker_argv(), env=env, capture_output=True, text=True, timeout=120, check=False
        )
    assert done.returncode != 0
    assert f"cannot serve the worker's metrics on 127.0.0.1:{port}" in done.stderr
    assert "Address already in use" in done.stderr
    assert "VARIFLOW_WORKER_METRICS_PORT" in done.stderr
    assert "ready." not in done.stderr + done.stdout
