"""How fast one thread submits jobs: ``submit_variation()`` against its floor.

    python bench/submit_rate.py             # 2,000 calls each, PostgreSQL + Redis

The floor is what any submit must do: one Core INSERT of the job row, a
COMMIT, and ``apply_async`` of the ``submit_job`` message, on the same
database and broker, from the same thread. ``submit_variation()`` adds
validation of the input, the job's first event and the idempotency and
deadline rules. Both run in this process against a throwaway PostgreSQL
database and a Redis queue of their own (deleted at the end); nothing
consumes the queue. The two run alternately in rounds so that a change of
machine load hits both alike, and the figure is the total of the rounds.

Prints:

    submit: submit_variation <n>/s vs Core INSERT + commit + apply_async <n>/s ratio <r>

The goal of issue 9: ratio >= 0.7.
"""

from __future__ import annotations

import argparse
import os
import time
import uuid
from collections.abc import Callable
from datetime import timedelta

from _inprocess import in_process
from sqlalchemy import Engine, create_engine, insert

from worker.api import submit_variation
from worker.celery_app import SUBMIT_JOB
from worker.celery_app import app as celery
from worker.jobs import JOBS
from worker.models import utcnow
from worker.states import JobStatus

ADMIN_URL = os.environ.get(
    "VARIFLOW_BENCH_ADMIN_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("VARIFLOW_BENCH_BROKER_URL", "redis://127.0.0.1:6379/0")
GOAL = 0.7


def floor_submit(engine: Engine) -> Callable[[int], None]:
    """The least a submit does: INSERT the row, COMMIT, publish the message."""

    def run(i: int) -> None:
        now = utcnow()
        job_id = uuid.uuid4()
        with engine.begin() as conn:
            conn.execute(
                insert(JOBS).values(
                    id=job_id,
                    provider="piapi",
                    status=JobStatus.QUEUED.value,
                    params={"origin_task_id": f"o-{i}", "index": "1", "prompt": "rate"},
                    progress=0,
                    submit_attempts=0,
                    poll_attempts=0,
                    deadline=now + timedelta(hours=1),
                    created_at=now,
                    updated_at=now,
                )
            )
        celery.send_task(SUBMIT_JOB, args=(str(job_id),), kwargs={"provider": "piapi"})

    return run


def variflow_submit(i: int) -> None:
    submit_variation("piapi", origin_task_id=f"o-{i}", index="1", prompt="rate")


def timed(run: Callable[[int], None], start: int, calls: int) -> float:
    began = time.perf_counter()
    for i in range(start, start + calls):
        run(i)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=2000, help="calls of each, in total")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    with in_process("variflow_submit") as (url, _rt):
        floor_engine = create_engine(url, pool_size=1)
        try:
            ours, base, calls, load = compare(floor_submit(floor_engine), args.calls, args.rounds)
        finally:
            floor_engine.dispose()
    print(f"submit rate on PostgreSQL + Redis; load average {load[0]:.2f} {load[1]:.2f}")
    print(
        f"submit: submit_variation {ours:.0f}/s vs Core INSERT + commit + apply_async "
        f"{base:.0f}/s ratio {ours / base:.2f}  (one thread, {calls} calls each; goal >= {GOAL})"
    )


def compare(
    floor: Callable[[int], None], calls: int, rounds: int
) -> tuple[float, float, int, tuple[float, float, float]]:
    """Calls per second of submit_variation and of the floor, alternating in rounds."""
    per_round = max(1, calls // rounds)
    # Warm both paths (connections, compiled statements, the broker connection).
    timed(floor, 0, 50)
    timed(variflow_submit, 0, 50)
    spent = {"floor": 0.0, "variflow": 0.0}
    load = os.getloadavg()
    for r in range(rounds):
        start = 100 + r * per_round
        spent["floor"] += timed(floor, start, per_round)
        spent["variflow"] += timed(variflow_submit, start, per_round)
    done = per_round * rounds
    return done / spent["variflow"], done / spent["floor"], done, load


if __name__ == "__main__":
    main()
