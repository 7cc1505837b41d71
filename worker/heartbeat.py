"""Keeping a claim or a lease alive while its holder works.

A worker that holds a job (a submit claim during a create that may take two
minutes, a poll lease during a batch) renews it every ``interval`` seconds
from a background thread, so the expiry can be short: a dead worker's jobs
are picked up again soon after it dies, instead of after the longest call
any provider may make.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)


@contextmanager
def heartbeat(renew: Callable[[], object], interval: float, what: str) -> Iterator[None]:
    """Call ``renew`` every ``interval`` seconds until the block ends.

    A failing renewal is logged and tried again at the next beat (the database
    may be restarting); the holder's work goes on either way.
    """
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval):
            try:
                renew()
            except Exception as exc:  # never let the heartbeat kill the work it guards
                log.warning("could not renew %s (%s: %s)", what, type(exc).__name__, exc)

    thread = threading.Thread(target=beat, name=f"heartbeat {what}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=interval + 5)
