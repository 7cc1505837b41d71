"""Every process makes the folders it uses, at start, on any backend.

On PostgreSQL + Redis nothing else makes VARIFLOW_HOME (the embedded defaults do:
the SQLite file's folder, the filesystem broker's folder), so each process is started
here from a home that does not exist: Celery beat (its health record), a Celery worker
(the results and metrics folders) and the web app (the metrics folder, and the results
folder it serves when archiving is on).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Configure
from webhooks import create_app
from worker.celery_app import build_runtime
from worker.config import load_settings
from worker.devstack import Stack

STARTUP_TIMEOUT = 60.0


def wait_for(check: Callable[[], Any], what: str, stack: Stack, log: Path) -> Any:
    """Poll ``check`` until it is truthy, failing at once if a process died."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        value = check()
        if value:
            return value
        try:
            stack.check_alive()
        except RuntimeError as exc:
            raise AssertionError(f"{exc}:\n{_tail(log)}") from None
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}:\n{_tail(log)}")
        time.sleep(0.05)


def _tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:] if log.exists() else "(no log)"


@pytest.fixture
def fresh_home(pg_url: str, redis_url: str, configure: Configure, tmp_path: Path) -> Path:
    """PostgreSQL + Redis, and a VARIFLOW_HOME that does not exist yet."""
    home = tmp_path / "fresh-home"
    configure(
        home=str(home),
        # beat: no tick is due while the test runs (nothing is sent); its loop logs
        # "Waking up" at DEBUG once the schedule is open.
        poll_interval=3600,
        sweep_interval=3600,
        log_level="DEBUG",
    )
    assert not home.exists()
    return home


@pytest.fixture
def stack(fresh_home: Path, tmp_path: Path) -> Iterator[Stack]:
    env = {k: v for k, v in os.environ.items() if k.startswith("VARIFLOW_")}
    with Stack(env, tmp_path / "logs") as processes:
        yield processes


@pytest.mark.services
def test_beat_starts_without_its_home_and_keeps_running(
    fresh_home: Path, stack: Stack, tmp_path: Path
) -> None:
    log = tmp_path / "logs" / "beat.log"
    stack.start_beat()

    wait_for(lambda: "beat: Waking up" in _tail(log), "beat's loop", stack, log)
    assert list(fresh_home.glob("beat/*.json")), list(fresh_home.iterdir())
    assert "FileNotFoundError" not in _tail(log)
    stack.check_alive()
    stack.stop("beat")


@pytest.mark.services
def test_a_worker_makes_its_results_and_metrics_folders_at_start(
    fresh_home: Path, stack: Stack, tmp_path: Path
) -> None:
    log = tmp_path / "logs" / "worker.log"
    stack.start_worker(concurrency=1)

    wait_for(lambda: " ready." in _tail(log), "the worker to be ready", stack, log)
    assert (fresh_home / "results").is_dir()
    assert (fresh_home / "metrics").is_dir()
    stack.stop("worker")


@pytest.mark.parametrize("result_store", ["", "off"])
def test_the_web_app_makes_its_folders_when_created(tmp_path: Path, result_store: str) -> None:
    home = tmp_path / "web-home"
    # PostgreSQL's engine connects lazily: nothing here needs the server.
    settings = load_settings(
        home=home,
        database_url="postgresql+psycopg://variflow@127.0.0.1:1/variflow",
        broker_url="redis://127.0.0.1:1/0",
        result_store=result_store,
    )
    runtime = build_runtime(settings)
    try:
        create_app(settings, runtime=runtime)
    finally:
        runtime.close()

    assert (home / "metrics").is_dir()
    assert (home / "results").is_dir() is (result_store != "off")
