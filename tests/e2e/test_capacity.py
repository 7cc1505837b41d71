"""Provider capacity end to end: real Celery workers (two, of three processes each), the
webhook app under gunicorn, beat, PostgreSQL, Redis, and the sandbox enforcing each key's
limits and reporting what it saw (``/_sandbox/stats`` ``capacity``).

Two deployments, one per class, each started once for its tests (a deployment takes
seconds to start and stop, and the suite's time is short):

- **one account per provider**: PiAPI with 3 slots, Piclaza with 2 (and the sandbox's
  Piclaza refusing a third), LemonData with 2, a 3-second submit claim: the race, why
  jobs wait, a worker killed holding a slot;
- **an accounts file and rates**: PiAPI on two accounts of 2 slots each, Piclaza with 1
  slot (first in, first out), LemonData with a rate. Its sandbox runs on a clock 20 times
  faster than real time (:class:`FastClock`): LemonData's 60-second window is 3 real
  seconds there, so a few jobs are enough to exceed its limit unless variflow paces them.

Between tests the job tables and account states are emptied and the sandbox reset; each
test waits for its jobs to end.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, text

from sandbox.capacity import key_fingerprint
from sandbox.config import SandboxConfig
from sandbox.server import SandboxServer
from sandbox.testing import png_bytes
from tests.conftest import use_environment
from tests.e2e.conftest import TIMINGS as E2E_TIMINGS
from tests.e2e.conftest import RunningStack
from worker import capacity
from worker.api import JobInfo, cancel_job, get_job, submit_variation
from worker.celery_app import send_submit
from worker.devstack import SANDBOX_KEY, Stack, free_port, sandbox_env
from worker.job_stats import wait_reason_kind
from worker.models import utcnow
from worker.runtime import session_scope

pytestmark = [pytest.mark.e2e, pytest.mark.services]

PIAPI: dict[str, Any] = {"origin_task_id": "imagine-1", "index": "1", "prompt": "a slow loris"}
SPEED = 20.0  # the second deployment's sandbox clock: sandbox seconds per real second
KEY_A, KEY_B, BURST_KEY = "key-of-a", "key-of-b", "burst-key"
ACCOUNTS_TOML = """
[piapi.a]
api_key_env = "CAPACITY_TEST_KEY_A"
max_in_flight = 2

[piapi.b]
api_key_env = "CAPACITY_TEST_KEY_B"
max_in_flight = 2
"""
# The e2e intervals (polls, retries and the sweep happen within a test), results not kept.
TIMINGS = {**E2E_TIMINGS, "VARIFLOW_RESULT_STORE": "off"}


# --------------------------------------------------------------------------- helpers


class FastClock:
    """Real time, run ``speed`` times faster (a ``sandbox.clock.Clock``).

    The sandbox's timer thread waits for the next timer on this clock's readings, which
    would be ``speed`` times too long in real time: listeners are told of a "jump" every
    few milliseconds so that it looks again.
    """

    def __init__(self, speed: float) -> None:
        self.speed = speed
        self._mono0 = time.monotonic()
        self._wall0 = time.time()
        self._listeners: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="fast-clock", daemon=True)
        self._ticker.start()

    def _elapsed(self) -> float:
        return (time.monotonic() - self._mono0) * self.speed

    def monotonic(self) -> float:
        return self._mono0 + self._elapsed()

    def time(self) -> float:
        return self._wall0 + self._elapsed()

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds / self.speed)

    def on_jump(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def _tick(self) -> None:
        while not self._stop.wait(0.005):
            for listener in list(self._listeners):
                listener()

    def close(self) -> None:
        self._stop.set()
        self._ticker.join(timeout=5)


@dataclass
class ImageServer:
    """PNG inputs over HTTP. ``/gated/...`` is answered only once the gate opens, so a
    worker can be caught holding a claim (and its slot) while it downloads."""

    server: http.server.ThreadingHTTPServer
    gate: threading.Event = field(default_factory=threading.Event)
    # (path, the client's port) of every request, in arrival order.
    requests: list[tuple[str, int]] = field(default_factory=list)

    def url(self, name: str, gated: bool = False) -> str:
        folder = "gated" if gated else "img"
        return f"http://127.0.0.1:{self.server.server_address[1]}/{folder}/{name}.png"

    def gated_clients(self) -> list[int]:
        return [port for path, port in list(self.requests) if path.startswith("/gated/")]


@pytest.fixture(scope="module")
def images() -> Iterator[ImageServer]:
    png = png_bytes(96, 96)
    holder: list[ImageServer] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            served = holder[0]
            served.requests.append((self.path, self.client_address[1]))
            if self.path.startswith("/gated/"):
                served.gate.wait(60)
            # The client may have been killed meanwhile: nothing to tell it then.
            with contextlib.suppress(OSError):
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    holder.append(ImageServer(server))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield holder[0]
    holder[0].gate.set()
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@dataclass
class Deployment:
    running: RunningStack
    env: dict[str, str]

    @property
    def sandbox(self) -> SandboxServer:
        return self.running.sandbox

    def wait_for(self, predicate: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
        return self.running.wait_for(predicate, timeout, what)

    def wait_all(self, jobs: list[JobInfo], timeout: float = 60.0) -> list[JobInfo]:
        ids = [job.id for job in jobs]

        def ended() -> list[JobInfo] | None:
            found = [get_job(i) for i in ids]
            return found if all(j.is_terminal for j in found) else None

        done: list[JobInfo] = self.wait_for(ended, f"{len(ids)} jobs to end", timeout)
        return done

    def capacity(self, provider: str, key: str = SANDBOX_KEY) -> dict[str, Any]:
        found: dict[str, Any] = self.sandbox.state.capacity_stats()[provider][key_fingerprint(key)]
        return found

    def worker_log(self) -> str:
        folder = self.running.stack.log_dir
        return "".join(p.read_text(errors="replace") for p in sorted(folder.glob("worker-*.log")))

    def worker_pids(self) -> set[int]:
        return {p.pid for name, p in self.running.stack.procs.items() if name.startswith("worker")}


@contextlib.contextmanager
def deployment(
    pg_url: str,
    redis_url: str,
    home: Path,
    sandbox: SandboxServer,
    settings: dict[str, str],
) -> Iterator[Deployment]:
    """Web, two workers and beat on ``sandbox``, with ``settings`` (VARIFLOW_* and the
    variables an accounts file names) over the defaults of these tests."""
    web_port = free_port()
    env = {
        "VARIFLOW_HOME": str(home),
        "VARIFLOW_DATABASE_URL": pg_url,
        "VARIFLOW_BROKER_URL": redis_url,
        "VARIFLOW_QUEUE": f"variflow-capacity-{uuid.uuid4().hex[:8]}",
        "VARIFLOW_PUBLIC_URL": f"http://127.0.0.1:{web_port}",
        **TIMINGS,
        **sandbox_env(sandbox.url),
        **settings,
    }
    # The developer's own VARIFLOW_* variables must not reach the processes.
    with pytest.MonkeyPatch.context() as patch:
        for name in os.environ:
            if name.startswith("VARIFLOW_") and "TEST" not in name:
                patch.delenv(name)
        stack = Stack(env, home / "logs")
        try:
            stack.start_web(web_port, workers=1)
            for n in (1, 2):
                stack.start(f"worker-{n}", _worker_argv(n))
            stack.start("beat", [*_celery(), "beat", "--loglevel", "INFO"])
            yield Deployment(
                RunningStack(sandbox, stack, env["VARIFLOW_PUBLIC_URL"], "postgres"), env
            )
        finally:
            _stop_together(stack)


def _celery() -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app"]


def _worker_argv(n: int) -> list[str]:
    return [
        *_celery(),
        "worker",
        "--concurrency",
        "3",
        "--loglevel",
        "INFO",
        "--without-gossip",
        "--without-mingle",
        "--hostname",
        f"capacity{n}-{os.getpid()}@%h",
    ]


def _stop_together(stack: Stack) -> None:
    # Every process is asked to stop first, then waited for: their shutdowns overlap.
    for proc in stack.procs.values():
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
    stack.stop()


def _use(deployed: Deployment, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This test process as one more process of ``deployed`` (it submits and reads jobs),
    on empty tables and a reset sandbox."""
    for name, value in deployed.env.items():
        monkeypatch.setenv(name, value)
    assert use_environment() is not None
    _empty(deployed)
    deployed.sandbox.state.reset()
    yield
    # The other tests of the session share the database, and pg_url does not empty
    # account_states: no pause or rate turn of these tests may reach them.
    _empty(deployed)


def _empty(deployed: Deployment) -> None:
    engine = create_engine(deployed.env["VARIFLOW_DATABASE_URL"])
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE jobs, job_events, job_inputs, account_states CASCADE"))
    engine.dispose()


def pid_of_client(port: int, server_port: int) -> int:
    """The process holding the client end of a loopback TCP connection (from /proc)."""
    inode = None
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote = (int(address.rsplit(":", 1)[1], 16) for address in fields[1:3])
        if (local, remote) == (port, server_port):
            inode = fields[9]
    assert inode is not None, f"no connection from port {port}"
    for fd in Path("/proc").glob("[0-9]*/fd/*"):
        with contextlib.suppress(OSError):
            if str(fd.readlink()) == f"socket:[{inode}]":
                return int(fd.parent.parent.name)
    raise AssertionError(f"no process holds the connection from port {port}")


def parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def events_saying(job_id: object, message: str) -> int:
    return sum(e.message == message for e in get_job(job_id).events)  # type: ignore[arg-type]


def events_starting(job_id: object, prefix: str) -> int:
    events = get_job(job_id).events  # type: ignore[arg-type]
    return sum((e.message or "").startswith(prefix) for e in events)


def creation_order(deployed: Deployment, provider: str, jobs: dict[str, JobInfo]) -> list[str]:
    """The names of ``jobs`` in the order the sandbox created their tasks."""
    prefix = "variflow-" if provider == "lemondata" else ""
    names = {f"{prefix}{job.id}": name for name, job in jobs.items()}
    tasks = [t for t in deployed.sandbox.state.tasks() if t.provider == provider]
    return [names[t.correlation] for t in tasks if t.correlation in names]


# --------------------------------------------------------------------------- one account each


@pytest.fixture(scope="class")
def single(
    pg_server_url: str,
    redis_server_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Deployment]:
    config = SandboxConfig(
        pending_seconds=0.2,
        processing_seconds=0.4,
        seed=7,
        # PiAPI's slots are left unlimited in the sandbox: its high-water mark then
        # shows how many tasks variflow itself ran at once (a limit would queue them).
        piclaza_max_concurrent={SANDBOX_KEY: 2},
    )
    settings = {
        "VARIFLOW_PIAPI_MAX_IN_FLIGHT": "3",
        "VARIFLOW_PICLAZA_MAX_IN_FLIGHT": "2",
        # LemonData downloads its input before the create: a worker can hold a slot
        # without having sent anything (the killed-worker test).
        "VARIFLOW_LEMONDATA_MAX_IN_FLIGHT": "2",
        "VARIFLOW_SUBMIT_CLAIM_TTL": "3",
    }
    home = tmp_path_factory.mktemp("capacity-single")
    with (
        SandboxServer(config=config) as sandbox,
        deployment(pg_server_url, redis_server_url, home, sandbox, settings) as deployed,
    ):
        yield deployed


class TestOneAccountPerProvider:
    @pytest.fixture(autouse=True)
    def _on(self, single: Deployment, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        yield from _use(single, monkeypatch)

    def test_a_burst_never_runs_more_than_the_slots_and_fills_them(
        self, single: Deployment, images: ImageServer
    ) -> None:
        piapi = [submit_variation("piapi", **PIAPI) for _ in range(30)]
        piclaza = [submit_variation("piclaza", image=images.url(f"p{i}")) for i in range(10)]

        done = single.wait_all(piapi + piclaza, timeout=90)

        assert [j.status for j in done] == ["completed"] * 40, [j.error_message for j in done]
        assert [j.waiting_reason for j in done] == [None] * 40
        used = single.capacity("piapi")
        assert used["high_water"] == 3  # never more, and the slots were used
        assert used["refused"] == {"rate_limited": 0, "over_concurrency": 0, "daily_allowance": 0}
        claza = single.capacity("piclaza")
        assert claza["high_water"] <= 2
        assert claza["refused"]["over_concurrency"] == 0
        stats = single.sandbox.state.stats()
        assert stats["creates"]["piapi"] == 30 and stats["creates"]["piclaza"] == 10
        assert stats["duplicate_creates"] == []
        # A queue formed, and each job that waited for a slot said so once: whether
        # "3/3 in flight on piapi/main" or "earlier jobs go first", one wait for a slot.
        said = [events_starting(job.id, "waiting for a slot: ") for job in piapi]
        worst = piapi[said.index(max(said))]
        story = [(e.at.time().isoformat(), e.message) for e in get_job(worst.id).events]
        assert max(said) == 1 and sum(said) >= 1, story
        with session_scope() as session:
            assert capacity.usage_by_account(session, "piapi", utcnow())["main"].in_flight == 0

    def test_a_queued_job_says_once_why_it_waits_however_often_it_is_retried(
        self, single: Deployment
    ) -> None:
        reason = "waiting for a slot: 3/3 in flight on piapi/main"
        single.sandbox.state.update_config(pending_seconds=60.0)
        holders = [submit_variation("piapi", **PIAPI) for _ in range(3)]
        single.wait_for(
            lambda: all(get_job(h.id).status == "submitted" for h in holders), "3 in flight"
        )
        single.sandbox.state.update_config(pending_seconds=0.2)  # tasks created from now on
        job = submit_variation("piapi", **PIAPI)
        single.wait_for(lambda: get_job(job.id).waiting_reason == reason, "the job to wait")

        # Its submit message again and again, as wakes, retries and the sweep send it.
        for _ in range(4):
            send_submit(job.id, "piapi")
        line = f"job {job.id} waits: {reason}"
        single.wait_for(lambda: single.worker_log().count(line) >= 5, "5 admission decisions")

        waiting = get_job(job.id)
        assert waiting.status == "queued"
        assert waiting.waiting_reason == reason
        assert events_saying(job.id, reason) == 1
        for holder in holders:
            cancel_job(holder.id)
        done = single.running.wait_terminal(job.id)
        assert done.status == "completed", done.error_message
        assert done.waiting_reason is None
        assert events_saying(job.id, reason) == 1

    def test_a_worker_killed_while_holding_a_slot_does_not_leak_it(
        self, single: Deployment, images: ImageServer
    ) -> None:
        """Two LemonData jobs take both slots and hang downloading their input; the worker
        processes holding them are killed. Their claims lapse after the 3-second TTL, so
        the slots count free again: the jobs are taken again, and all the others run."""
        images.gate.clear()
        try:
            held = [
                submit_variation("lemondata", image=images.url(f"x{i}", gated=True))
                for i in range(2)
            ]
            ports = single.wait_for(
                lambda: images.gated_clients() if len(images.gated_clients()) == 2 else None,
                "both downloads to hang",
            )
            queued = [submit_variation("lemondata", image=images.url(f"y{i}")) for i in range(3)]
            # Each waits for a slot: asked by admission ("2/2 in flight"), or, once one
            # waits, joining the line behind it at submission ("earlier jobs go first").
            single.wait_for(
                lambda: all(
                    wait_reason_kind(get_job(q.id).waiting_reason) == "slot" for q in queued
                ),
                "the others to wait",
            )
            assert get_job(queued[0].id).waiting_reason == (
                "waiting for a slot: 2/2 in flight on lemondata/main"
            )
            victims = {pid_of_client(port, images.server.server_address[1]) for port in ports}
            # Pool processes of the deployment's workers, not anything else.
            assert {parent_of(pid) for pid in victims} <= single.worker_pids()
            for pid in victims:
                os.kill(pid, signal.SIGKILL)
        finally:
            images.gate.set()

        done = single.wait_all(held + queued)

        assert [j.status for j in done] == ["completed"] * 5, [j.error_message for j in done]
        for job in held:  # taken again once the dead worker's claim had lapsed
            messages = [e.message or "" for e in get_job(job.id).events]
            assert "claimed for submission (attempt 2)" in messages, messages
        assert single.capacity("lemondata")["high_water"] <= 2
        stats = single.sandbox.state.stats()
        assert stats["creates"]["lemondata"] == 5 and stats["duplicate_creates"] == []


# --------------------------------------------------------------------------- accounts and rates


@pytest.fixture(scope="class")
def accounts(
    pg_server_url: str,
    redis_server_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Deployment]:
    clock = FastClock(SPEED)
    # Sandbox seconds: 10 of them are half a real second.
    config = SandboxConfig(
        api_keys=[SANDBOX_KEY, KEY_A, KEY_B, BURST_KEY],
        pending_seconds=3.0,
        processing_seconds=7.0,
        seed=11,
        # 3 requests a (sandbox) minute: 3 in any 3 real seconds, 60 a real minute.
        lemondata_requests_per_minute={"*": 3},
    )
    home = tmp_path_factory.mktemp("capacity-accounts")
    accounts_file = home / "accounts.toml"
    accounts_file.write_text(ACCOUNTS_TOML)
    settings = {
        "VARIFLOW_ACCOUNTS_FILE": str(accounts_file),
        "CAPACITY_TEST_KEY_A": KEY_A,
        "CAPACITY_TEST_KEY_B": KEY_B,
        "VARIFLOW_PICLAZA_MAX_IN_FLIGHT": "1",
        # One create every 1.33 s: 3 of them span 2.67 s, the 4th comes 4 s after the
        # 1st, a second more than the sandbox's 3-second window (room for jitter).
        "VARIFLOW_LEMONDATA_REQUESTS_PER_MINUTE": "45",
    }
    try:
        with (
            SandboxServer(config=config, clock=clock) as sandbox,
            deployment(pg_server_url, redis_server_url, home, sandbox, settings) as deployed,
        ):
            yield deployed
    finally:
        clock.close()


class TestAccountsFileAndRates:
    @pytest.fixture(autouse=True)
    def _on(self, accounts: Deployment, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        yield from _use(accounts, monkeypatch)

    def test_two_accounts_of_a_provider_share_its_jobs_each_within_its_slots(
        self, accounts: Deployment
    ) -> None:
        jobs = [submit_variation("piapi", **PIAPI) for _ in range(12)]

        done = accounts.wait_all(jobs)

        assert [j.status for j in done] == ["completed"] * 12, [j.error_message for j in done]
        keys = {"a": key_fingerprint(KEY_A), "b": key_fingerprint(KEY_B)}
        assert {j.account for j in done} == {"a", "b"}
        for job in done:  # created (and followed) with its own account's key
            task = accounts.sandbox.state.task(job.upstream_task_id or "")
            assert task is not None and task.key_fingerprint == keys[job.account or ""]
        for key in (KEY_A, KEY_B):
            used = accounts.capacity("piapi", key)
            assert 1 <= used["high_water"] <= 2
            assert used["refused"] == {
                "rate_limited": 0,
                "over_concurrency": 0,
                "daily_allowance": 0,
            }
        assert SANDBOX_KEY not in {
            t.key_fingerprint for t in accounts.sandbox.state.tasks() if t.provider == "piapi"
        }

    def test_lemondata_creates_are_paced_under_the_providers_request_rate(
        self, accounts: Deployment
    ) -> None:
        # Unpaced, the sandbox refuses the 4th request inside its window: the test can fail.
        burst = [
            httpx.get(
                f"{accounts.sandbox.url}/lemondata/v1/tasks/none",
                headers={"Authorization": f"Bearer {BURST_KEY}"},
            ).status_code
            for _ in range(4)
        ]
        assert burst[-1] == 429 and 429 not in burst[:-1], burst

        jobs = [submit_variation("lemondata", image=png_bytes(64, 64)) for _ in range(5)]
        done = accounts.wait_all(jobs)

        assert [j.status for j in done] == ["completed"] * 5, [j.error_message for j in done]
        used = accounts.capacity("lemondata")
        assert used["refused"]["rate_limited"] == 0
        assert accounts.sandbox.state.stats()["creates"]["lemondata"] == 5

    def test_jobs_are_created_upstream_first_in_first_out_and_priority_jumps_the_queue(
        self, accounts: Deployment
    ) -> None:
        """Piclaza has one slot. A takes it with a task that would run for minutes; B, C, D
        and then E (priority 10) wait. When A ends (cancelled), E goes, then B, C, D."""
        state = accounts.sandbox.state
        state.update_config(pending_seconds=10_000.0)
        jobs = {"A": submit_variation("piclaza", image=png_bytes())}
        accounts.wait_for(lambda: get_job(jobs["A"].id).status == "submitted", "A to run")
        state.update_config(pending_seconds=3.0)  # the tasks created from now on
        for name in "BCD":
            jobs[name] = submit_variation("piclaza", image=png_bytes())
        jobs["E"] = submit_variation("piclaza", image=png_bytes(), priority=10)
        accounts.wait_for(
            lambda: all(get_job(jobs[n].id).waiting_reason for n in "BCDE"), "B to E to wait"
        )
        waiting = get_job(jobs["B"].id)
        assert waiting.status == "queued"
        assert waiting.waiting_reason == "waiting for a slot: 1/1 in flight on piclaza/main"

        cancel_job(jobs["A"].id)
        done = accounts.wait_all(list(jobs.values()))

        statuses = [j.status for j in done]
        assert statuses == ["cancelled"] + ["completed"] * 4, [j.error_message for j in done]
        assert creation_order(accounts, "piclaza", jobs) == ["A", "E", "B", "C", "D"]
