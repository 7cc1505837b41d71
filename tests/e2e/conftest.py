"""A running variflow: sandbox (in-process, so tests can turn its knobs), the webhook
app under gunicorn, a Celery worker and beat as real subprocesses, over real HTTP.

Two ways to get one:

- ``running_stack``: a stack of the test's own, for a test that needs settings no other
  test of its module has (given with ``configure`` before it is asked for);
- ``shared_stack`` (module-scoped) and ``on_shared_stack``: one stack started once for a
  module's tests (a stack takes seconds to start and stop, most of such a test's time).
  Its settings are the module's ``stack_settings`` and ``stack_sandbox_config``. Each test
  makes and looks at jobs of its own; the sandbox is reset to its first knobs before each
  test, and whatever a test left in flight is cancelled after it.
  ``shared_deployment`` starts one for other scopes (a class).
"""

from __future__ import annotations

import contextlib
import http.server
import io
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import create_engine, select, text

from sandbox.config import SandboxConfig
from sandbox.server import SandboxServer
from tests.conftest import Configure, use_environment
from worker.api import JobInfo, cancel_job, get_job
from worker.config import reset_settings
from worker.devstack import Stack, free_port, sandbox_env
from worker.jobs import NOT_TERMINAL
from worker.migrate import upgrade
from worker.models import Job
from worker.runtime import session_scope

# Short backoffs and intervals, so that retries, polls and the sweep happen within a test.
TIMINGS = {
    "VARIFLOW_SUBMIT_RETRY_BASE": "0.2",
    "VARIFLOW_SUBMIT_RETRY_CAP": "1.0",
    "VARIFLOW_POLL_INTERVAL": "0.3",
    "VARIFLOW_POLL_BACKOFF_START": "0.3",
    "VARIFLOW_POLL_BACKOFF_CAP": "2.0",
    "VARIFLOW_PIAPI_WEBHOOK_GRACE": "2.0",
    "VARIFLOW_SWEEP_INTERVAL": "1.0",
    "VARIFLOW_LOST_MESSAGE_GRACE": "2.0",
}
# A test's processes need not finish their work nor exit cleanly at teardown (the next
# stack starts on an emptied or new database, a queue of its own): what has not stopped
# after a second (gunicorn finishing its requests, a worker waiting on its pool) is
# killed.
STOP_TIMEOUT = 1.0


@dataclass
class RunningStack:
    sandbox: SandboxServer
    stack: Stack
    web_url: str
    backend: str

    def wait_for(
        self, predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition"
    ) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            self.stack.check_alive()
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:g}s waiting for {what}")
            time.sleep(0.05)

    def wait_terminal(self, job_id: object, timeout: float = 60.0) -> JobInfo:
        def terminal() -> JobInfo | None:
            job = get_job(job_id)  # type: ignore[arg-type]
            return job if job.is_terminal else None

        result: JobInfo = self.wait_for(terminal, timeout, f"job {job_id} to finish")
        return result


def start_processes(stack: Stack, web_port: int, concurrency: int = 4) -> str:
    """A Celery worker, beat and the web app; the worker and beat first, so that their
    start-up overlaps the web app's (only the web app's is waited for): the URL."""
    stack.start_worker(concurrency=concurrency)
    stack.start_beat()
    return stack.start_web(web_port, workers=1)


@pytest.fixture(params=["postgres", "sqlite"])
def backend(request: pytest.FixtureRequest, configure: Configure) -> str:
    if request.param == "postgres":
        request.getfixturevalue("pg_url")
        request.getfixturevalue("redis_url")
    else:
        request.getfixturevalue("sqlite_url")
    return str(request.param)


@pytest.fixture
def sandbox_config() -> SandboxConfig:
    return SandboxConfig(pending_seconds=0.2, processing_seconds=0.4, seed=7)


@pytest.fixture
def running_stack(
    backend: str, sandbox_config: SandboxConfig, configure: Configure, tmp_path: Path
) -> Iterator[RunningStack]:
    with SandboxServer(config=sandbox_config) as sandbox:
        web_port = free_port()
        web_url = f"http://127.0.0.1:{web_port}"
        configure(
            public_url=web_url,
            **{k.removeprefix("VARIFLOW_").lower(): v for k, v in TIMINGS.items()},
            **{k.removeprefix("VARIFLOW_").lower(): v for k, v in sandbox_env(sandbox.url).items()},
        )
        env = {k: v for k, v in os.environ.items() if k.startswith("VARIFLOW_")}
        with Stack(env, tmp_path / "logs", stop_timeout=STOP_TIMEOUT) as stack:
            start_processes(stack, web_port)
            yield RunningStack(sandbox, stack, web_url, backend)


# --- one stack for a module's tests ---------------------------------------------------


@dataclass
class SharedStack:
    running: RunningStack
    env: dict[str, str]  # what its processes were started with: a test on it takes it too


@contextlib.contextmanager
def shared_deployment(
    request: pytest.FixtureRequest,
    backend: str,
    settings: Mapping[str, str],
    sandbox_config: SandboxConfig,
    home: Path,
) -> Iterator[SharedStack]:
    """A stack on ``backend`` ("postgres": the session's database, emptied first, and
    Redis on a queue of its own; "sqlite": a database and broker under ``home``), with
    the timings above and ``settings`` (VARIFLOW_* and what they name) over them."""
    env = {"VARIFLOW_HOME": str(home / "home")}
    if backend == "postgres":
        database: str = request.getfixturevalue("pg_server_url")
        empty_database(database)
        env["VARIFLOW_BROKER_URL"] = request.getfixturevalue("redis_server_url")
        env["VARIFLOW_QUEUE"] = f"variflow-test-{uuid.uuid4().hex[:8]}"
    else:  # the broker: the embedded one, in VARIFLOW_HOME
        database = f"sqlite:///{home / 'variflow.db'}"
        upgrade(database)
    env["VARIFLOW_DATABASE_URL"] = database
    with SandboxServer(config=sandbox_config) as sandbox:
        web_port = free_port()
        web_url = f"http://127.0.0.1:{web_port}"
        env |= {"VARIFLOW_PUBLIC_URL": web_url, **TIMINGS, **sandbox_env(sandbox.url), **settings}
        # The children inherit os.environ under env: a developer's VARIFLOW_* must not
        # leak into them (tests/conftest.py isolates each test the same way).
        with pytest.MonkeyPatch.context() as patch:
            for name in [n for n in os.environ if n.startswith("VARIFLOW_") and "TEST" not in n]:
                patch.delenv(name)
            stack = Stack(env, home / "logs", stop_timeout=STOP_TIMEOUT)
            try:
                start_processes(stack, web_port)
            except BaseException:
                stack.stop()
                raise
        with stack:
            yield SharedStack(RunningStack(sandbox, stack, web_url, backend), env)


def empty_database(database_url: str) -> None:
    """What earlier tests left must not be swept by this stack's beat (nor a lease of a
    beat killed by one of them keep this one waiting)."""
    engine = create_engine(database_url)
    with engine.begin() as conn:
        tables = "jobs, job_events, job_inputs, api_tokens, account_states"
        conn.execute(text(f"TRUNCATE {tables}, beat_leases, beat_entries CASCADE"))
    engine.dispose()


def use_shared(shared: SharedStack, monkeypatch: pytest.MonkeyPatch) -> Iterator[RunningStack]:
    """This test on ``shared``: this process takes the stack's settings (it submits and
    reads jobs as one more of its processes), on a sandbox reset to its first knobs.
    What the test left in flight (it failed midway) is cancelled after it, so that the
    next test finds the worker idle."""
    for name, value in shared.env.items():
        monkeypatch.setenv(name, value)
    reset_settings()  # get_settings() reads them again
    assert use_environment() is not None
    shared.running.sandbox.state.reset()
    yield shared.running
    with session_scope() as session:
        unfinished = list(session.scalars(select(Job.id).where(Job.status.in_(NOT_TERMINAL))))
    for job_id in unfinished:
        cancel_job(job_id, "left in flight by a test that ended")


@pytest.fixture(scope="module", params=["postgres", "sqlite"])
def stack_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def stack_settings() -> dict[str, str]:
    """Settings of the module's shared stack over the timings (a module overrides this)."""
    return {}


@pytest.fixture(scope="module")
def stack_sandbox_config() -> SandboxConfig:
    return SandboxConfig(pending_seconds=0.2, processing_seconds=0.4, seed=7)


@pytest.fixture(scope="module")
def shared_stack(
    request: pytest.FixtureRequest,
    stack_backend: str,
    stack_settings: dict[str, str],
    stack_sandbox_config: SandboxConfig,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[SharedStack]:
    home = tmp_path_factory.mktemp(f"stack-{stack_backend}")
    with shared_deployment(
        request, stack_backend, stack_settings, stack_sandbox_config, home
    ) as shared:
        yield shared


@pytest.fixture
def on_shared_stack(
    shared_stack: SharedStack, monkeypatch: pytest.MonkeyPatch
) -> Iterator[RunningStack]:
    yield from use_shared(shared_stack, monkeypatch)


@contextlib.contextmanager
def serving_png(png: bytes) -> Iterator[str]:
    """``png`` served over HTTP on loopback while the block runs: its URL."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(png)))
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/input.png"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def image_url() -> Iterator[str]:
    """A square PNG served over HTTP on loopback: an input image given by URL."""
    buffer = io.BytesIO()
    Image.new("RGB", (128, 128), (30, 160, 90)).save(buffer, format="PNG")
    with serving_png(buffer.getvalue()) as url:
        yield url
