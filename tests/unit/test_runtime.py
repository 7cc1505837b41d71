"""The process's runtime: built once even when many threads ask at once, and never closed
under a thread that holds it."""

from __future__ import annotations

import threading

from tests.integration.test_submit_guarantees import at_once
from worker import runtime
from worker.celery_app import build_runtime, worker_runtime
from worker.config import load_settings
from worker.runtime import Runtime


def test_many_threads_asking_at_once_share_one_runtime() -> None:
    runtime.uninstall()
    settings = load_settings()
    built: list[Runtime] = []
    lock = threading.Lock()

    def build() -> Runtime:
        made = build_runtime(settings)
        with lock:
            built.append(made)
        return made

    got = at_once(8, lambda: runtime.ensure(build))

    assert len(built) == 1
    assert all(each is built[0] for each in got)
    assert not built[0].http.is_closed


def test_the_worker_runtime_is_installed_once() -> None:
    runtime.uninstall()

    got = at_once(8, worker_runtime)

    assert len({id(each) for each in got}) == 1
    assert runtime.installed() is got[0]
    assert not got[0].http.is_closed
