"""Proof across hosts: variflow on several machines that share no disk, one of them lost.

Five hosts on one LAN, each a Linux network namespace (tests/netns_support.py):

    services  PostgreSQL, Redis, an S3-compatible store (moto's server) and the
              provider sandbox: servers of this test's own, bound to the LAN address
    web       `variflow serve` (gunicorn): the /v1 API, provider webhooks, results, /metrics
    worker1   a Celery worker (its own /metrics) and a beat
    worker2   the same
    client    the application: calls the API, and serves input images

Every variflow process has its own VARIFLOW_HOME (a folder of its own) and
reaches the others only over the LAN. Jobs of every provider are submitted;
while both workers hold some of them (LemonData jobs fetching an input image
that the client holds back, so no create call is in flight: that outcome would
be unknown by design, never sent again), every process of the worker host whose
beat leads is killed at once. Every job must still complete (the sweep, sent by
the other host's beat once it has taken the lease, hands the lost host's jobs to
the surviving worker), every result be served by the web host out of the object
store, and each live host answer a Prometheus scrape of its own.
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import shutil
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from tests.conftest import REQUIRE_SERVICES
from tests.netns_support import (
    REDIS_PORT,
    S3_PORT,
    SANDBOX_PORT,
    Host,
    ImageServer,
    Lan,
    NamespacesUnavailable,
    can_connect,
    check_available,
    postgres_url,
    remove_stale,
    start_postgres,
    start_redis,
    start_s3,
    start_sandbox,
    wait_listening,
    wait_until,
)
from worker import tokens
from worker.beat_leader import Liveness, liveness_file
from worker.devstack import sandbox_env
from worker.migrate import upgrade

pytestmark = [pytest.mark.e2e, pytest.mark.services]

PYTHON = sys.executable
WEB_PORT = 8000
WORKER_METRICS_PORT = 9100
BUCKET = "variflow-results"
TERMINAL = {"completed", "failed", "cancelled"}
AWS = {
    "AWS_ACCESS_KEY_ID": "netns-test",  # moto accepts any credentials
    "AWS_SECRET_ACCESS_KEY": "netns-test",
    "AWS_REGION": "us-east-1",
}
# Short claims, leases and sweeps, so that a lost host's work is taken over within seconds.
QUICK = {
    "VARIFLOW_SUBMIT_CLAIM_TTL": "3",
    "VARIFLOW_POLL_LEASE": "3",
    "VARIFLOW_SWEEP_INTERVAL": "1",
    "VARIFLOW_LOST_MESSAGE_GRACE": "2",
    "VARIFLOW_POLL_INTERVAL": "0.5",
    "VARIFLOW_POLL_BACKOFF_START": "0.5",
    "VARIFLOW_POLL_BACKOFF_CAP": "2",
    "VARIFLOW_PIAPI_WEBHOOK_GRACE": "5",
    "VARIFLOW_SUBMIT_RETRY_BASE": "0.2",
    "VARIFLOW_SUBMIT_RETRY_CAP": "1",
    "VARIFLOW_BEAT_LEASE_TTL": "3",
}


def png(size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), (40, 120, 200)).save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass
class Fleet:
    lan: Lan
    web: Host
    workers: tuple[Host, Host]
    client: Host
    homes: Path  # each host's VARIFLOW_HOME is homes/<host name>
    s3_endpoint: str
    images: ImageServer
    # Used only through client.call, so that their sockets are the client host's.
    http: httpx.Client  # the API's, with the token
    plain: httpx.Client  # anything else (presigned URLs carry their own authorization)

    @property
    def web_url(self) -> str:
        return f"http://{self.web.address}:{WEB_PORT}"

    def alive(self) -> None:
        for host in self.lan.hosts.values():
            host.check_alive()

    def beat_leads(self, host: Host) -> bool:
        """Whether the beat on ``host`` led at its last check of the lease (its health record)."""
        record = Liveness.read(liveness_file(self.homes / host.name))
        return record is not None and record.leading

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return self.client.call(lambda: self.http.request(method, url, **kwargs))

    def submit(self, provider: str, job_input: dict[str, Any]) -> str:
        body = {"provider": provider, "input": job_input}
        response = self.request("POST", f"{self.web_url}/v1/jobs", json=body)
        assert response.status_code == 201, response.text
        job_id: str = response.json()["id"]
        return job_id

    def job(self, job_id: str, wait: int = 0) -> dict[str, Any]:
        url = f"{self.web_url}/v1/jobs/{job_id}"
        response = self.request("GET", url, params={"wait": wait} if wait else None)
        assert response.status_code == 200, response.text
        job: dict[str, Any] = response.json()
        return job

    def wait_terminal(self, job_id: str, timeout: float = 60) -> dict[str, Any]:
        def terminal() -> dict[str, Any] | None:
            job = self.job(job_id, wait=5)  # held by the web app until the job ends
            return job if job["status"] in TERMINAL else None

        return wait_until(terminal, f"job {job_id} to end", timeout, alive=self.alive)

    def events(self, job_id: str) -> list[dict[str, Any]]:
        response = self.request("GET", f"{self.web_url}/v1/jobs/{job_id}/events")
        assert response.status_code == 200, response.text
        events: list[dict[str, Any]] = response.json()["data"]
        return events


def prepare_database(url: str) -> str:
    """Migrate the database at ``url`` and issue an admin API token: its secret."""
    upgrade(url)
    engine = create_engine(url)
    try:
        with Session(engine) as session, session.begin():
            _, secret = tokens.issue(session, "proof", admin=True)
    finally:
        engine.dispose()
    return secret


def make_bucket(endpoint: str) -> None:
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=AWS["AWS_REGION"],
        aws_access_key_id=AWS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=AWS["AWS_SECRET_ACCESS_KEY"],
    )
    s3.create_bucket(Bucket=BUCKET)


def child_env(home: Path, extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without a developer's VARIFLOW_*/AWS_* variables."""
    base = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("VARIFLOW_", "AWS_"))
    }
    return {**base, "VARIFLOW_HOME": str(home), **extra}


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    try:
        check_available()
        remove_stale()
    except NamespacesUnavailable as exc:
        hint = " (VARIFLOW_REQUIRE_SERVICES=1)" if REQUIRE_SERVICES else ""
        pytest.fail(f"cannot build hosts with network namespaces: {exc}{hint}", pytrace=False)
    with contextlib.ExitStack() as cleanup:  # undone last to first, whatever failed
        # PostgreSQL runs as its own user: its folder cannot be under root's tmp_path.
        pg_folder = Path(tempfile.mkdtemp(prefix="variflow-netns-pg-"))
        cleanup.callback(shutil.rmtree, pg_folder, ignore_errors=True)
        lan = cleanup.enter_context(Lan(tmp_path / "logs"))
        services = lan.add_host("services")
        web = lan.add_host("web")
        worker1 = lan.add_host("worker1")
        worker2 = lan.add_host("worker2")
        client = lan.add_host("client")

        # What starts on its own goes first; web and workers load their code while
        # initdb runs (they reach the database only when work comes); beat (it takes
        # its lease in the database) once the schema is there.
        broker_url = start_redis(services)
        s3_endpoint = start_s3(services, PYTHON)
        sandbox_url = start_sandbox(
            services,
            PYTHON,
            {
                "VARIFLOW_SANDBOX_PENDING_SECONDS": "0.2",
                "VARIFLOW_SANDBOX_PROCESSING_SECONDS": "1.0",
                "VARIFLOW_SANDBOX_IMAGES_PER_TASK": "1",
                "VARIFLOW_SANDBOX_SEED": "7",
            },
        )
        database_url = postgres_url(services)
        settings = {
            **QUICK,
            **sandbox_env(sandbox_url),
            **AWS,
            "AWS_ENDPOINT_URL": s3_endpoint,
            "VARIFLOW_DATABASE_URL": database_url,
            "VARIFLOW_BROKER_URL": broker_url,
            "VARIFLOW_PUBLIC_URL": f"http://{web.address}:{WEB_PORT}",
            "VARIFLOW_RESULT_STORE": f"s3://{BUCKET}/proof",
            "VARIFLOW_WORKER_METRICS_PORT": str(WORKER_METRICS_PORT),
        }
        homes = tmp_path / "homes"

        def env(host: Host, **extra: str) -> dict[str, str]:
            return child_env(homes / host.name, {**settings, **extra})

        wait_listening(services, [REDIS_PORT])  # Celery would back off for seconds
        serve = [PYTHON, "-m", "worker.cli", "serve", "--workers", "1"]
        web.start("web", serve, env(web, VARIFLOW_HOST=web.address, VARIFLOW_PORT=str(WEB_PORT)))
        for worker in (worker1, worker2):
            celery_worker = [
                PYTHON, "-m", "celery", "-A", "worker.celery_app", "worker",
                "--concurrency", "2", "--loglevel", "INFO", "--without-gossip",
                "--without-mingle", "--hostname", f"variflow@{worker.name}",
            ]  # fmt: skip
            worker.start("worker", celery_worker, env(worker))

        start_postgres(services, pg_folder)
        # The operator's one-off steps, from the client host: the schema and an API token.
        token = client.call(lambda: prepare_database(database_url))
        beat = [PYTHON, "-m", "celery", "-A", "worker.celery_app", "beat", "--loglevel", "INFO"]
        for worker in (worker1, worker2):
            worker.start("beat", beat, env(worker))

        wait_listening(services, [S3_PORT])
        client.call(lambda: make_bucket(s3_endpoint))
        images = ImageServer(client, png(128))
        cleanup.callback(images.close)
        http = cleanup.enter_context(
            httpx.Client(headers={"Authorization": f"Bearer {token}"}, timeout=30)
        )
        plain = cleanup.enter_context(httpx.Client(timeout=30))
        fleet = Fleet(lan, web, (worker1, worker2), client, homes, s3_endpoint, images, http, plain)
        wait_listening(services, [SANDBOX_PORT])
        wait_until(
            lambda: can_reach(fleet, f"{fleet.web_url}/healthz"),
            "the web host to answer",
            60,
            alive=fleet.alive,
        )
        for worker in fleet.workers:  # a worker serves /metrics once it has started
            wait_listening(worker, [WORKER_METRICS_PORT])
        yield fleet


def scrape(fleet: Fleet, url: str) -> defaultdict[tuple[str, str], float]:
    """The samples of a Prometheus scrape, summed by (sample name, provider label)."""
    response = fleet.request("GET", url)
    assert response.status_code == 200, (url, response.status_code)
    totals: defaultdict[tuple[str, str], float] = defaultdict(float)
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            totals[(sample.name, sample.labels.get("provider", ""))] += sample.value
    return totals


def can_reach(fleet: Fleet, url: str) -> bool:
    try:
        return fleet.request("GET", url).status_code == 200
    except httpx.TransportError:
        return False


def test_jobs_of_every_provider_survive_losing_a_worker_host(fleet: Fleet) -> None:
    started = time.monotonic()
    image_b64 = base64.b64encode(png()).decode()
    before = [
        fleet.submit("piapi", {"origin_task_id": "origin-1", "index": "1", "prompt": "a fox"}),
        fleet.submit("piapi", {"origin_task_id": "origin-2", "index": "2", "prompt": "a cat"}),
        fleet.submit("piclaza", {"image_b64": image_b64}),
        fleet.submit("piclaza", {"image_url": f"{fleet.images.base_url}/open/in.png"}),
    ]
    # Their create calls are done (a create cut off by the kill would be failed as unknown,
    # by design); they are in flight at the providers.
    wait_until(
        lambda: all(fleet.job(j)["status"] != "queued" for j in before),
        "the first jobs to be accepted by their providers",
        alive=fleet.alive,
    )
    # LemonData jobs whose input image the client holds back: each worker is caught
    # mid-task on some of them (two slots each, prefetch 1: neither can take all four).
    held = [
        fleet.submit(
            "lemondata", {"image_url": f"{fleet.images.base_url}/held/{n}.png", "size": "256x256"}
        )
        for n in range(4)
    ]
    wait_until(
        lambda: all(fleet.images.held_by(w.address) for w in fleet.workers),
        "both workers to be holding a job",
        alive=fleet.alive,
    )
    # The host lost is the one whose beat leads: scheduled work (polls, the sweep that
    # gives its jobs to the other worker) must go on from the standby beat.
    leader = wait_until(
        lambda: next((w for w in fleet.workers if fleet.beat_leads(w)), None),
        "a beat to lead",
        alive=fleet.alive,
    )
    survivor = next(w for w in fleet.workers if w is not leader)
    in_hand = fleet.images.held_by(leader.address)

    leader.power_off()
    killed_at = time.monotonic()
    fleet.images.release()
    after = [
        fleet.submit("piapi", {"origin_task_id": "origin-3", "index": "3", "prompt": "an owl"}),
        fleet.submit("piclaza", {"image_b64": image_b64}),
        fleet.submit("lemondata", {"image_b64": image_b64, "size": "256x256"}),
    ]

    jobs = {job_id: fleet.wait_terminal(job_id) for job_id in before + held + after}
    recovered_in = time.monotonic() - killed_at
    failed = {j: job["error"] for j, job in jobs.items() if job["status"] != "completed"}
    assert not failed, f"jobs that did not complete: {failed}"
    assert fleet.beat_leads(survivor), "the standby beat did not take the lease"

    # The jobs the lost host held were released by the sweep when their claims lapsed,
    # and the survivor fetched their input again and finished them.
    lost_with_host = [held[int(path.split("/")[-1].removesuffix(".png"))] for path in in_hand]
    for job_id in lost_with_host:
        sources = {event["source"] for event in fleet.events(job_id)}
        assert "sweep" in sources, f"job {job_id} of the lost host was not released by the sweep"
    taken_over = fleet.images.held_by(survivor.address)
    assert all(path in taken_over for path in in_hand), (in_hand, taken_over)

    # Every result is served by the web host out of the object store: a redirect to a
    # presigned URL of the S3 server, whose bytes are the image.
    for job_id in jobs:
        response = fleet.request("GET", f"{fleet.web_url}/v1/jobs/{job_id}/results/0")
        assert response.status_code == 302, (job_id, response.status_code, response.text)
        location = response.headers["location"]
        assert location.startswith(fleet.s3_endpoint + "/"), location
        image = fleet.client.call(lambda: fleet.plain.get(location))  # noqa: B023
        assert image.status_code == 200, image.text
        assert image.content.startswith(b"\x89PNG"), image.content[:16]

    # Each live host answers a Prometheus scrape of its own (the web host counted the
    # sandbox's webhooks, the survivor its calls to providers); the lost host answers nothing.
    web_samples = scrape(fleet, f"{fleet.web_url}/metrics")
    assert web_samples[("variflow_webhook_deliveries_total", "piapi")] > 0, web_samples
    worker_samples = scrape(fleet, f"http://{survivor.address}:{WORKER_METRICS_PORT}/metrics")
    for provider in ("piapi", "piclaza", "lemondata"):
        assert worker_samples[("variflow_upstream_requests_total", provider)] > 0, worker_samples
    assert not fleet.client.call(lambda: can_connect(leader.address, WORKER_METRICS_PORT))

    print(
        f"across hosts: {len(jobs)} jobs completed; {leader.name} (leading beat) lost with "
        f"{len(lost_with_host)} in hand, all done {recovered_in:.1f}s later; "
        f"{time.monotonic() - started:.1f}s from the first submit"
    )
