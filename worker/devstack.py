"""Start and stop variflow's processes for local runs: the demo, `variflow dev`, tests.

Each process runs in its own session so that stopping it also stops its
children (gunicorn and Celery workers fork).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from worker.providers import registered

SANDBOX_KEY = "sandbox-key"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until_http_ok(
    url: str, timeout: float = 30.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process for {url} exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout:g}s ({last})")


def sandbox_env(sandbox_url: str) -> dict[str, str]:
    """Point every provider at a sandbox."""
    env = {}
    for provider in registered():
        env[f"VARIFLOW_{provider.upper()}_BASE_URL"] = f"{sandbox_url}/{provider}"
        env[f"VARIFLOW_{provider.upper()}_API_KEY"] = SANDBOX_KEY
    env["VARIFLOW_ALLOW_PRIVATE_URLS"] = "true"
    return env


@dataclass
class Stack:
    """A set of child processes sharing one environment."""

    env: Mapping[str, str]
    log_dir: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    # How long stop() lets the processes wind down (a Celery worker finishing its
    # tasks) before killing them.
    stop_timeout: float = 15.0
    _logs: list[IO[bytes]] = field(default_factory=list)

    def start(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = (self.log_dir / f"{name}.log").open("ab")
        self._logs.append(log)
        proc = subprocess.Popen(
            argv,
            env={**os.environ, **self.env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs[name] = proc
        return proc

    def start_sandbox(self, port: int) -> str:
        url = f"http://127.0.0.1:{port}"
        proc = self.start("sandbox", [*_variflow(), "sandbox", "--port", str(port)])
        wait_until_http_ok(f"{url}/_sandbox/config", proc=proc)
        return url

    def start_web(self, port: int, workers: int = 2) -> str:
        url = f"http://127.0.0.1:{port}"
        argv = [*_variflow(), "serve", "--port", str(port), "--workers", str(workers)]
        proc = self.start("web", argv)
        wait_until_http_ok(f"{url}/healthz", proc=proc)
        return url

    def start_worker(self, concurrency: int = 2) -> None:
        self.start(
            "worker",
            [
                *_celery(),
                "worker",
                "--concurrency",
                str(concurrency),
                "--loglevel",
                "INFO",
                "--without-gossip",
                "--without-mingle",
                "--hostname",
                f"variflow-{os.getpid()}@%h",
            ],
        )

    def start_beat(self) -> None:
        self.start("beat", [*_celery(), "beat", "--loglevel", "INFO"])

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {proc.returncode}; see {self.log_dir / name}.log"
                )

    def stop(self, name: str | None = None, timeout: float | None = None) -> None:
        """Stop one process, or all: each is asked to stop (SIGTERM to its group) at
        once, then waited for together, for ``timeout`` (default ``stop_timeout``)
        seconds in all before what is left is killed — the processes wind down side
        by side, not one after another."""
        names = [name] if name else list(reversed(self.procs))
        stopping = []
        for each in names:
            proc = self.procs.pop(each, None)
            if proc is None or proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            stopping.append(proc)
        deadline = time.monotonic() + (self.stop_timeout if timeout is None else timeout)
        for proc in stopping:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if name is None:
            for log in self._logs:
                log.close()
            self._logs.clear()

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()


def _variflow() -> list[str]:
    return [sys.executable, "-m", "worker.cli"]


def _celery() -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "worker.celery_app"]
