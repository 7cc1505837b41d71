"""An app under gunicorn for the HTTP benches (webhook_ingest.py, api_submit.py): started
with the settings a bench names, ready when its probe says so, stopped gracefully."""

from __future__ import annotations

import http.client
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from worker.devstack import free_port

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
READY_TIMEOUT = 30.0


class GunicornServer:
    """``app_spec`` under gthread gunicorn (``workers`` x ``threads``) on a free port.

    ``config``: a gunicorn ``--config`` (``variflow serve`` uses
    ``python:webhooks.gunicorn_conf``); ``pythonpath``: where a bare app is found.
    """

    def __init__(
        self,
        name: str,
        app_spec: str,
        *,
        workers: int,
        threads: int,
        env: dict[str, str],
        probe: Callable[[int], bool],
        pythonpath: Path | None = None,
        config: str | None = None,
    ) -> None:
        self.name = name
        self.port = free_port()
        self._probe = probe
        self.command = [sys.executable, "-m", "gunicorn"]
        if config is not None:
            self.command += ["--config", config]
        self.command += [
            "--worker-class",
            "gthread",
            "--workers",
            str(workers),
            "--threads",
            str(threads),
            "--bind",
            f"{HOST}:{self.port}",
            "--log-level",
            "warning",
        ]
        if pythonpath is not None:
            self.command += ["--pythonpath", str(pythonpath)]
        self.command.append(app_spec)
        self._env = {**os.environ, **env}
        self._log: IO[bytes] = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def start(self) -> None:
        self.process = subprocess.Popen(
            self.command, cwd=REPO, env=self._env, stdout=self._log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name}: gunicorn exited with {self.process.returncode}:\n{self.log()}"
                )
            if self._probe(self.port):
                return
            time.sleep(0.05)  # poll interval, not a guess at start-up time
        raise RuntimeError(f"{self.name}: not ready after {READY_TIMEOUT:.0f} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        self._log.seek(0)
        return self._log.read().decode(errors="replace")[-4000:]

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: gunicorn's graceful shutdown
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


def http_status(port: int, method: str, path: str, body: bytes | None = None) -> int:
    """The status of one request (0 when nothing answers yet)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=2)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        response.read()
        return response.status
    except OSError:
        return 0
    finally:
        conn.close()


def probe_healthz(port: int) -> bool:
    # /healthz answers 200 only once the app is imported and the database answers.
    return http_status(port, "GET", "/healthz") == 200
