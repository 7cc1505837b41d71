"""The no-op Celery task of bench/e2e_throughput.py, registered on variflow's own app.

The bench's worker loads it with ``--include _noop`` (bench/ on PYTHONPATH), so
the no-op is consumed by exactly the worker, broker, queue and task settings
(acks_late, prefetch 1, the task-context signals, ...) that the jobs' tasks are.

Its only work is what counting it needs: one Redis ``INCR`` of the key it is
given, on the broker's Redis, over a connection made once per pool child.
"""

from __future__ import annotations

import redis

from worker.celery_app import app

NOOP_TASK = "variflow.bench_noop"

_client: redis.Redis[bytes] | None = None


@app.task(name=NOOP_TASK)  # type: ignore[untyped-decorator]  # Celery ships no type hints
def noop(counter: str) -> None:
    """Do nothing; count the run in ``counter``."""
    global _client
    if _client is None:  # first run in this pool child: connect after the fork
        _client = redis.Redis.from_url(app.conf.broker_url)
    _client.incr(counter)
