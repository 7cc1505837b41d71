"""The Procfile, run the way a Procfile platform runs it.

honcho runs `release`, then starts `web`, `flower`, `worker` and `beat` against
PostgreSQL and Redis with the configuration in an env file, from a VARIFLOW_HOME that
does not exist yet (each process makes the folders it uses); a job submitted through
the CLI (`honcho run variflow submit ...`) completes, with the provider's webhook
arriving at the `web` process; Flower answers only with its basic auth.

The module's tests share one honcho (its start is most of their time): neither stops
nor changes a process, and each waits for what it needs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from sandbox.config import SandboxConfig
from sandbox.server import SandboxServer
from tests.e2e.conftest import empty_database
from worker.devstack import free_port, sandbox_env

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
PROCFILE = ROOT / "Procfile"
BIN = Path(sys.executable).parent
HONCHO = BIN / "honcho"
FLOWER_USER, FLOWER_PASSWORD = "ops", "procfile-flower-pw"
# honcho gives each process type its own PORT: the first type the base port, the
# next one the base port + 100, and so on.
HONCHO_PORT_STEP = 100
STARTUP_TIMEOUT = 60.0
JOB_TIMEOUT = 60.0
# `web` first and `flower` second: they get the base port and the base port + 100.
PROCESSES = ("web", "flower", "worker", "beat")


def _port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _free_base_port() -> int:
    """A free port P with P + 100 free too: `web` gets P and `flower` P + 100."""
    for _ in range(100):
        port = free_port()
        if port + HONCHO_PORT_STEP <= 65535 and _port_is_free(port + HONCHO_PORT_STEP):
            return port
    raise RuntimeError("no free pair of ports 100 apart")


def _wait_for(
    check: Callable[[], Any], timeout: float, what: str, alive: Callable[[], None]
) -> Any:
    """Poll `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = check()
        except httpx.HTTPError as exc:
            value, last = None, exc
        if value:
            return value
        alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for {what} ({last})")
        time.sleep(0.1)


# --- processes: what honcho started, and making sure none is left behind -----------------


def _stat(pid: int) -> tuple[int, str, int] | None:
    """(parent pid, state, start time) of a process, or None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), fields[0], int(fields[19])


def _descendants(root: int) -> dict[int, int]:
    """Every process below `root`, as pid -> start time (start time tells reused pids)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children.setdefault(stat[0], []).append(int(entry.name))
    found: dict[int, int] = {}
    todo = [root]
    while todo:
        for pid in children.get(todo.pop(), []):
            if (stat := _stat(pid)) is not None:
                found[pid] = stat[2]
                todo.append(pid)
    return found


def _still_running(procs: dict[int, int]) -> list[int]:
    running = []
    for pid, started in procs.items():
        stat = _stat(pid)
        if stat is not None and stat[2] == started and stat[1] != "Z":
            running.append(pid)
    return running


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return "?"


@dataclass
class ProcfileStack:
    honcho: subprocess.Popen[bytes]
    log: Path
    env_file: Path
    env: dict[str, str]
    home: Path
    web_url: str
    flower_url: str
    sandbox: SandboxServer

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def check_alive(self) -> None:
        if self.honcho.poll() is not None:
            raise AssertionError(
                f"honcho exited with {self.honcho.returncode}:\n{self.output()[-4000:]}"
            )

    def wait_for(
        self, check: Callable[[], Any], what: str, timeout: float = STARTUP_TIMEOUT
    ) -> Any:
        return _wait_for(check, timeout, what, self.check_alive)

    def run(self, *argv: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
        """A one-off command with the app's environment, the Procfile way: `honcho run`."""
        return subprocess.run(
            [str(HONCHO), "run", "-e", str(self.env_file), "--", *argv],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )


def _stop(honcho: subprocess.Popen[bytes]) -> None:
    """SIGTERM honcho (it stops its children) and check that every process is gone."""
    if honcho.poll() is not None:
        # honcho already stopped everything it started, or died without doing so:
        # its children live in sessions of their own, and would be found by nobody.
        honcho.wait()
        return
    procs = _descendants(honcho.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(honcho.pid, signal.SIGTERM)
    try:
        honcho.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(honcho.pid, signal.SIGKILL)
        honcho.wait()
    deadline = time.monotonic() + 15
    while (left := _still_running(procs)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        described = [f"{pid}: {_cmdline(pid)}" for pid in left]
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        raise AssertionError("processes left behind after honcho stopped:\n" + "\n".join(described))


@pytest.fixture(scope="module")
def procfile_stack(
    pg_server_url: str, redis_server_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ProcfileStack]:
    empty_database(pg_server_url)
    tmp_path = tmp_path_factory.mktemp("procfile")
    config = SandboxConfig(pending_seconds=0.2, processing_seconds=0.4, seed=11)
    with SandboxServer(config=config) as sandbox:
        base_port = _free_base_port()
        web_url = f"http://127.0.0.1:{base_port}"
        flower_url = f"http://127.0.0.1:{base_port + HONCHO_PORT_STEP}"
        # The app's configuration lives in an env file, as in a honcho deployment:
        # the session's database, a queue of the module's own, the public URL of
        # `web`, the providers pointed at the sandbox, Flower's credentials.
        # A home nothing has made yet: on PostgreSQL + Redis no folder exists before
        # the processes start.
        home = tmp_path / "procfile-home"
        app_env = dict(
            VARIFLOW_DATABASE_URL=pg_server_url,
            VARIFLOW_BROKER_URL=redis_server_url,
            VARIFLOW_QUEUE=f"variflow-test-{uuid.uuid4().hex[:8]}",
            VARIFLOW_HOME=str(home),
            VARIFLOW_PUBLIC_URL=web_url,
            VARIFLOW_FLOWER_BASIC_AUTH=f"{FLOWER_USER}:{FLOWER_PASSWORD}",
            **sandbox_env(sandbox.url),
        )
        env_file = tmp_path / "procfile.env"
        env_file.write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in app_env.items()))
        # honcho's own environment: no VARIFLOW_* (the env file is the only source),
        # and the venv's `variflow` and `celery` first on PATH.
        env = {k: v for k, v in os.environ.items() if not k.startswith("VARIFLOW_")}
        env.pop("PORT", None)
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        common = ["-f", str(PROCFILE), "-e", str(env_file), "--no-colour"]

        release = subprocess.run(
            [str(HONCHO), "start", *common, "release"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert release.returncode == 0, release.stdout + release.stderr
        assert "database at revision head" in release.stdout
        assert not home.exists(), "the processes must start without VARIFLOW_HOME"

        log = tmp_path / "honcho.log"
        with log.open("wb") as out:
            honcho = subprocess.Popen(
                [str(HONCHO), "start", *common, "-p", str(base_port), *PROCESSES],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            yield ProcfileStack(honcho, log, env_file, env, home, web_url, flower_url, sandbox)
        finally:
            _stop(honcho)


def _status(stack: ProcfileStack, job_id: str) -> dict[str, Any]:
    result = stack.run("variflow", "status", job_id, "--json")
    assert result.returncode in (0, 1), result.stdout + result.stderr  # 1: the job failed
    job: dict[str, Any] = json.loads(result.stdout)
    return job


def _finished(stack: ProcfileStack, job_id: str) -> dict[str, Any] | None:
    job = _status(stack, job_id)
    return job if job["status"] in ("completed", "failed", "cancelled") else None


def _get(url: str, expect: int | None = None, **kwargs: Any) -> httpx.Response | None:
    """The response (with status `expect`, when given), or None."""
    response = httpx.get(url, timeout=5, **kwargs)
    return response if expect is None or response.status_code == expect else None


def test_procfile_processes_run_a_job_end_to_end(procfile_stack: ProcfileStack) -> None:
    stack = procfile_stack

    health = stack.wait_for(lambda: _get(f"{stack.web_url}/healthz", 200), "web's /healthz")
    assert health.json() == {"status": "ok", "database": "ok"}
    # beat wrote its health record (under VARIFLOW_HOME) and runs (honcho would stop
    # everything if it had died); web and worker made the folders they use.
    stack.wait_for(lambda: list(stack.home.glob("beat/*.json")), "beat's lease check")
    stack.wait_for(lambda: (stack.home / "results").is_dir(), "the results folder")
    stack.wait_for(lambda: (stack.home / "metrics").is_dir(), "the metrics folder")

    submitted = stack.run(
        "variflow",
        "submit",
        "piapi",
        "--origin-task-id",
        "procfile-imagine-1",
        "--index",
        "1",
        "--prompt",
        "a lighthouse at dusk, deployed from a Procfile",
    )
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    job_id = submitted.stdout.strip()
    uuid.UUID(job_id)  # the job id, alone on stdout

    job = stack.wait_for(
        lambda: _finished(stack, job_id), f"job {job_id} to finish", timeout=JOB_TIMEOUT
    )

    assert job["status"] == "completed", job
    assert job["result_urls"]
    image = httpx.get(job["result_urls"][0], timeout=10)
    assert image.status_code == 200
    assert image.content.startswith(b"\x89PNG")
    # The provider called back at VARIFLOW_PUBLIC_URL: the `web` process got it.
    assert any(e["source"] == "webhook" for e in job["events"]), job["events"]


def test_procfile_flower_requires_its_basic_auth(procfile_stack: ProcfileStack) -> None:
    stack = procfile_stack

    anonymous = stack.wait_for(lambda: _get(f"{stack.flower_url}/"), "Flower to answer")
    assert anonymous.status_code == 401
    wrong = httpx.get(f"{stack.flower_url}/", auth=(FLOWER_USER, "wrong"), timeout=30)
    assert wrong.status_code == 401
    page = httpx.get(f"{stack.flower_url}/", auth=(FLOWER_USER, FLOWER_PASSWORD), timeout=30)
    assert page.status_code == 200
    assert "Flower" in page.text
    metrics = httpx.get(
        f"{stack.flower_url}/metrics", auth=(FLOWER_USER, FLOWER_PASSWORD), timeout=30
    )
    assert metrics.status_code == 200
    assert "flower_" in metrics.text
