"""Metrics from several processes of one scope add up in one scrape: independent
processes, forked children of a process that already counted (Celery prefork), and a real
multi-worker gunicorn with webhooks/gunicorn_conf.py, which starts its scope empty.
(A Celery worker's own scope and endpoint: test_worker_metrics.py.)"""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Configure
from webhooks import create_app
from worker import metrics

ROOT = Path(__file__).resolve().parents[2]

# One process's work: webhook deliveries, upstream calls and (below) nothing else.
CHILD = textwrap.dedent(
    """
    import sys
    from worker import metrics
    from worker.config import get_settings

    settings = get_settings()  # what a process's entry point does
    metrics.configure(settings.metrics_folder, settings.provider_names)
    n = int(sys.argv[1])
    for _ in range(n):
        metrics.count_webhook("piapi", "accepted")
        metrics.observe_upstream("piclaza", "poll", "ok", 0.2)
    print(metrics.get_metrics().folder)
    """
)


@pytest.fixture(autouse=True)
def _fresh_metrics() -> Iterator[None]:
    metrics.reset_metrics()
    yield
    metrics.reset_metrics()


def scrape_text(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape_app() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    app = create_app()
    app.testing = True
    answer = app.test_client().get("/metrics")
    assert answer.status_code == 200
    return scrape_text(answer.get_data(as_text=True))


ACCEPTED = (
    "variflow_webhook_deliveries_total",
    frozenset({("provider", "piapi"), ("outcome", "accepted")}),
)
POLLS = (
    "variflow_upstream_request_duration_seconds_count",
    frozenset({("provider", "piclaza"), ("operation", "poll")}),
)


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != metrics.MULTIPROC_ENV}
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def test_independent_processes_add_up(
    sqlite_url: str, tmp_path: Path, configure: Configure
) -> None:
    base = tmp_path / "metrics"
    folder = base / "web"  # processes that are not Celery workers: the web app's scope
    configure(metrics_dir=base)
    env = child_env(VARIFLOW_METRICS_DIR=str(base), VARIFLOW_HOME=str(tmp_path / "home"))
    children = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(n)],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in (3, 5)
    ]
    metrics.count_webhook("piapi", "accepted")  # and this process too
    pids = []
    for child in children:
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        assert out.strip() == str(folder.resolve())
        pids.append(child.pid)

    files = {p.name for p in folder.glob("counter_*.db")}
    assert {f"counter_{metrics.process_id(pid)}.db" for pid in [*pids, os.getpid()]} <= files
    samples = scrape_app()
    assert samples[ACCEPTED] == 1 + 3 + 5
    assert samples[POLLS] == 3 + 5


# Another container: its own host name, and the very pid of this test's process.
OTHER_CONTAINER = textwrap.dedent(
    """
    import os, socket, sys
    pid = int(sys.argv[1])
    os.getpid = lambda: pid
    socket.gethostname = lambda: "other_container"
    from worker import metrics
    from worker.config import get_settings

    settings = get_settings()  # what a process's entry point does
    metrics.configure(settings.metrics_folder, settings.provider_names)
    for _ in range(4):
        metrics.count_webhook("piapi", "accepted")
    print(metrics.process_id())
    """
)


def test_processes_of_two_containers_with_one_pid_do_not_share_a_file(
    sqlite_url: str, tmp_path: Path, configure: Configure
) -> None:
    """A folder on a volume that containers mount: they share it, not their pid spaces."""
    base = tmp_path / "metrics"
    folder = base / "web"
    configure(metrics_dir=base)
    metrics.count_webhook("piapi", "accepted")
    env = child_env(VARIFLOW_METRICS_DIR=str(base), VARIFLOW_HOME=str(tmp_path / "home"))
    done = subprocess.run(
        [sys.executable, "-c", OTHER_CONTAINER, str(os.getpid())],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert done.stdout.strip() == f"other-container-{os.getpid()}"
    assert (folder / f"counter_other-container-{os.getpid()}.db").exists()
    assert (folder / f"counter_{metrics.process_id()}.db").exists()
    assert scrape_app()[ACCEPTED] == 1 + 4


def _count_in_child(n: int, results: Any) -> None:
    for _ in range(n):
        metrics.count_webhook("piapi", "accepted")
    results.put(os.getpid())


def test_forked_children_of_a_counting_parent_add_up(
    sqlite_url: str, tmp_path: Path, configure: Configure
) -> None:
    """Celery prefork: the parent may have counted before forking its pool."""
    configure(metrics_dir=tmp_path / "m")
    metrics.count_webhook("piapi", "accepted")
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    children = [context.Process(target=_count_in_child, args=(n, results)) for n in (2, 4)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=60)
        assert child.exitcode == 0
    child_pids = {results.get(timeout=10) for _ in children}
    assert {f"counter_{metrics.process_id(pid)}.db" for pid in child_pids} <= {
        p.name for p in (tmp_path / "m" / "web").glob("counter_*.db")
    }
    assert scrape_app()[ACCEPTED] == 1 + 2 + 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = predicate()
        except httpx.TransportError:
            result = None
        if result:
            return result
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_gunicorn_workers_add_up_and_survive_a_worker_exit(sqlite_url: str, tmp_path: Path) -> None:
    """The serve command's gunicorn with --config python:webhooks.gunicorn_conf; its
    master starts the web scope empty, so a dead pid of an earlier run is not summed."""
    port = free_port()
    base = tmp_path / "gunicorn-metrics"
    folder = base / "web"
    earlier_run = write_not_found_counter(folder, pid=999_999, value=7)
    env = child_env(
        VARIFLOW_HOME=str(tmp_path / "home"),
        VARIFLOW_DATABASE_URL=sqlite_url,
        VARIFLOW_METRICS_DIR=str(base),
    )
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--config",
            "python:webhooks.gunicorn_conf",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "2",
            "--worker-class",
            "gthread",
            "--threads",
            "2",
            "webhooks.wsgi:app",
        ],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def not_found() -> float:
            # A fresh connection each time: requests land on either worker.
            text = httpx.get(f"{url}/metrics", timeout=5).text
            return scrape_text(text).get(
                (
                    "variflow_webhook_deliveries_total",
                    frozenset({("provider", "piapi"), ("outcome", "not_found")}),
                ),
                0.0,
            )

        wait_until(lambda: httpx.get(f"{url}/healthz", timeout=5).status_code == 200)
        assert not earlier_run.exists()
        for _ in range(20):
            answer = httpx.post(f"{url}/webhooks/piapi/not-a-uuid", json={}, timeout=5)
            assert answer.status_code == 404
        writers = {p.name for p in folder.glob("counter_*.db")}
        assert writers
        assert all(not_found() == 20 for _ in range(10))

        # A worker exits: the master replaces it (child_exit runs) and counts are kept.
        worker_pid = int(next(iter(writers)).removesuffix(".db").rsplit("-", 1)[1])
        live_gauges = write_live_gauge(folder, worker_pid)
        assert scrape_text(httpx.get(f"{url}/metrics", timeout=5).text)[LIVE] == 1
        os.kill(worker_pid, signal.SIGTERM)
        wait_until(lambda: not_found() == 20 and _worker_replaced(server.pid, worker_pid))
        assert not live_gauges.exists()  # child_exit: mark_process_dead in the master
        assert LIVE not in scrape_text(httpx.get(f"{url}/metrics", timeout=5).text)
        httpx.post(f"{url}/webhooks/piapi/not-a-uuid", json={}, timeout=5)
        assert wait_until(lambda: not_found() == 21)
    finally:
        server.send_signal(signal.SIGTERM)
        _, err = server.communicate(timeout=30)
    assert "Traceback" not in err, err


LIVE = ("variflow_test_live", frozenset[tuple[str, str]]())


def write_not_found_counter(folder: Path, pid: int, value: float) -> Path:
    """The counter file a web worker ``pid`` of an earlier run would leave behind."""
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    folder.mkdir(parents=True)
    path = folder / f"counter_{metrics.process_id(pid)}.db"
    name = "variflow_webhook_deliveries"
    key = mmap_key(name, f"{name}_total", ["provider", "outcome"], ["piapi", "not_found"], "")
    file = MmapedDict(str(path))
    file.write_value(key, value, 0.0)
    file.close()
    return path


def write_live_gauge(folder: Path, pid: int) -> Path:
    """The file a "livesum" gauge of process ``pid`` would leave (variflow has none yet)."""
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    path = folder / f"gauge_livesum_{metrics.process_id(pid)}.db"
    file = MmapedDict(str(path))
    file.write_value(mmap_key(LIVE[0], LIVE[0], [], [], "a live gauge"), 1.0, 0.0)
    file.close()
    return path


def _worker_replaced(master: int, dead: int) -> bool:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return len(children) == 2 and str(dead) not in children
