"""A running variflow: sandbox (in-process, so tests can turn its knobs), the webhook
app under gunicorn and a Celery worker as real subprocesses, over real HTTP."""

from __future__ import annotations

import contextlib
import http.server
import io
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from sandbox.config import SandboxConfig
from sandbox.server import SandboxServer
from tests.conftest import Configure
from worker.api import JobInfo, get_job
from worker.devstack import Stack, free_port, sandbox_env


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
        # Short backoffs and intervals, so that retries, polls and the sweep
        # happen within a test.
        configure(
            public_url=web_url,
            submit_retry_base=0.2,
            submit_retry_cap=1.0,
            poll_interval=0.3,
            poll_backoff_start=0.3,
            poll_backoff_cap=2.0,
            piapi_webhook_grace=2.0,
            sweep_interval=1.0,
            lost_message_grace=2.0,
            **{k.removeprefix("VARIFLOW_").lower(): v for k, v in sandbox_env(sandbox.url).items()},
        )
        env = {k: v for k, v in os.environ.items() if k.startswith("VARIFLOW_")}
        # A test's processes need not finish their work at teardown: what has not
        # wound down after a few seconds (a worker waiting on its pool) is killed.
        with Stack(env, tmp_path / "logs", stop_timeout=4.0) as stack:
            stack.start_web(web_port, workers=1)
            stack.start_worker(concurrency=4)
            stack.start_beat()
            yield RunningStack(sandbox, stack, web_url, backend)


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
