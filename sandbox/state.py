"""The sandbox's memory: tasks, knobs, counters and the webhook plan of each task.

One re-entrant lock guards everything, including the seeded RNG, so a given
seed and a given sequence of calls always decide the same outcomes and faults.
Blueprints call the methods below; tests use the accessors at the end
(``tasks()``, ``task_by_correlation()``, ``update_config()``, ``stats()``,
``reset()``).

Webhooks (PiAPI only): each status change of a task with a webhook endpoint is
one delivery, fired by the delivery engine's timer at the moment of the change
(pending right at creation, possibly before the create answer reaches the
client). The deliveries of one task go out one at a time in order, a retried
one holding back the later ones, so the default order is the natural one even
under load; different tasks are delivered in parallel. The drop / duplicate /
reorder knobs are applied per status change: a duplicate follows its original,
and with ``webhook_reorder`` non-terminal deliveries are held and sent after
the terminal one, newest first (terminal, processing, pending). A task that
waits for a slot (PiAPI ``staged``) sends ``staged`` at creation and the rest
from the moment it gets its slot.

Capacity (``sandbox.capacity``): every task is enrolled in its key's account,
which decides when it starts; every read settles the account first, and a timer
settles it when a running task ends while another waits, so a staged task's
webhooks go out on time even if nobody polls. Every time comes from ``clock``
(``sandbox.clock``), which tests may replace.
"""

from __future__ import annotations

import functools
import json
import random
import threading
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from sandbox.capacity import (
    Account,
    Capacity,
    Holder,
    Moment,
    RateVerdict,
    key_fingerprint,
    limits_for,
)
from sandbox.clock import SYSTEM_CLOCK, Clock
from sandbox.config import SandboxConfig
from sandbox.delivery import DeliveryAttempt, DeliveryEngine, RetryPolicy, WebhookDelivery
from sandbox.faults import Fault, FaultKind, decide
from sandbox.images import ImageStore
from sandbox.piapi_envelope import envelope_data
from sandbox.tasks import Provider, Status, Task, TaskSnapshot, TaskView

PROVIDERS: tuple[Provider, ...] = ("piapi", "piclaza", "lemondata")
ATTEMPT_LOG_LIMIT = 10_000

FAILURE_MESSAGES = (
    "generation failed: the request was rejected by content moderation",
    "generation failed: upstream worker timed out",
    "generation failed: internal error while rendering the image",
)

CancelResult = Literal["canceled", "not_pending", "not_found"]
# Statuses in which a task has not reached the provider's worker and can be cancelled.
CANCELLABLE = ("staged", "pending")


@dataclass
class _WebhookPlan:
    endpoint: str
    secret: str | None
    # Deliveries held back by webhook_reorder until the terminal one exists.
    held: list[WebhookDelivery] = field(default_factory=list)
    # Deliveries waiting for the one in flight to succeed or give up.
    outbox: deque[WebhookDelivery] = field(default_factory=deque)
    sending: bool = False
    closed: bool = False


@dataclass(frozen=True)
class NewTask:
    """What a blueprint knows when it asks for a task to be created."""

    provider: Provider
    correlation: str
    request: dict[str, Any]
    public_base: str
    result_count: int
    image_size: int
    with_grid: bool = False
    webhook_endpoint: str | None = None
    webhook_secret: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    # The key that asked; its capacity is used. "" when a test creates tasks directly.
    api_key: str = ""


def _new_counters() -> dict[str, Counter[str]]:
    return {
        "by_route": Counter(),
        "by_status": Counter(),
        "creates": Counter(),
        "faults": Counter(),
        "webhooks": Counter(),
        "piclaza_batch": Counter(),
    }


class SandboxState:
    def __init__(self, config: SandboxConfig | None = None, *, clock: Clock | None = None) -> None:
        self.clock: Clock = clock if clock is not None else SYSTEM_CLOCK
        self._lock = threading.RLock()
        self._initial_config = config if config is not None else SandboxConfig()
        self._config = self._initial_config
        self._rng = random.Random(self._config.seed)
        self._tasks: dict[str, Task] = {}
        self._webhooks: dict[str, _WebhookPlan] = {}
        self._create_counts: Counter[tuple[str, str]] = Counter()
        self._duplicates: list[str] = []
        self._counters = _new_counters()
        self._attempts: list[DeliveryAttempt] = []
        self._capacity = Capacity()
        self.images = ImageStore()
        self._delivery = DeliveryEngine(self._retry_policy, self._record_attempt, self.clock)

    # -- knobs ----------------------------------------------------------------

    @property
    def config(self) -> SandboxConfig:
        """The knobs in force. Treat as read-only: change them with ``update_config``."""
        with self._lock:
            return self._config

    def update_config(self, **knobs: object) -> SandboxConfig:
        """Apply a partial update; unknown knobs raise ``KeyError``, bad values ``ValueError``."""
        with self._lock:
            self._config = self._config.updated(knobs)
            if "seed" in knobs:
                self._rng = random.Random(self._config.seed)
            # A raised limit frees slots now: staged tasks must not wait for a read.
            self._settle_all()
            return self._config

    def reset(self, *, keep_config: bool = False) -> None:
        """Forget tasks, files, counters and pending webhooks; restore the initial knobs."""
        with self._lock:
            if not keep_config:
                self._config = self._initial_config
            self._rng = random.Random(self._config.seed)
            self._tasks.clear()
            self._webhooks.clear()
            self._create_counts.clear()
            self._duplicates.clear()
            self._counters = _new_counters()
            self._attempts.clear()
            self._capacity.clear()
            self._delivery.clear()
            self.images.clear()

    def close(self) -> None:
        """Stop the webhook delivery threads (they restart if used again)."""
        self._delivery.stop()

    # -- decisions taken per request --------------------------------------------

    def decide_fault(self) -> Fault | None:
        with self._lock:
            fault = decide(self._config, self._rng)
            if fault is not None:
                self._counters["faults"][fault.kind.value] += 1
            return fault

    def choose_lemondata_sync(self) -> bool:
        with self._lock:
            mode = self._config.lemondata_mode
            if mode == "mixed":
                return self._rng.random() < 0.5
            return mode == "sync"

    def record_request(self, route: str, status: int) -> None:
        with self._lock:
            self._counters["by_route"][route] += 1
            self._counters["by_status"][str(status)] += 1

    def record_batch_query(self, id_count: int) -> None:
        with self._lock:
            self._counters["piclaza_batch"]["queries"] += 1
            self._counters["piclaza_batch"]["ids"] += id_count

    def count_request(self, provider: Provider, api_key: str) -> RateVerdict | None:
        """Count one request of ``api_key`` against its rate limit; None if it has none."""
        with self._lock:
            limits = limits_for(self._config, provider, api_key)
            if limits.requests_per_minute is None:
                return None
            account = self._capacity.account(provider, api_key)
            return account.count_request(self._now(), limits)

    # -- tasks --------------------------------------------------------------

    def create_task(self, spec: NewTask) -> Task:
        """Create a task whose outcome is decided now; returns the (shared) task.

        Raises ``sandbox.capacity.CapacityRefused`` (and creates nothing) when a limit of
        the key refuses it.
        """
        with self._lock:
            config = self._config
            now = self._now()
            account = self._capacity.account(spec.provider, spec.api_key)
            limits = limits_for(config, spec.provider, spec.api_key)
            self._settle(account, now)
            account.check(now, limits)
            failed = config.fail_rate > 0 and self._rng.random() < config.fail_rate
            error_message = self._rng.choice(FAILURE_MESSAGES) if failed else ""
            task_id = self._new_task_id(spec.provider)
            files: list[str] = []
            grid: str | None = None
            if not failed:
                files = [f"{task_id}-{i}.png" for i in range(1, spec.result_count + 1)]
                for name in files:
                    self.images.register(name, spec.image_size)
                if spec.with_grid:
                    grid = f"{task_id}-grid.png"
                    self.images.register(grid, spec.image_size * 2)
            count = self._count_create(spec.provider, spec.correlation)
            task = Task(
                provider=spec.provider,
                task_id=task_id,
                correlation=spec.correlation,
                outcome="failed" if failed else "completed",
                error_message=error_message,
                created_at=now.wall,
                created_mono=now.mono,
                pending_seconds=config.pending_seconds,
                processing_seconds=config.processing_seconds,
                public_base=spec.public_base,
                request=spec.request,
                result_files=files,
                grid_file=grid,
                create_count=count,
                extra=dict(spec.extra),
                api_key=spec.api_key,
            )
            self._tasks[task_id] = task
            self._counters["creates"][spec.provider] += 1
            account.enroll(task, now, limits)
            if spec.webhook_endpoint:
                self._plan_webhooks(task, spec.webhook_endpoint, spec.webhook_secret)
            self._arm_wake(account)
            return task

    def lookup(self, provider: Provider, task_id: str) -> tuple[Task, TaskView] | None:
        """The task and its current view, or None if unknown to that provider."""
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None or task.provider != provider:
                return None
            now = self._now()
            self._settle(self._account_of(task), now)
            return task, task.view(now.mono)

    def cancel(self, provider: Provider, task_id: str) -> CancelResult:
        """Cancel a task that is staged or pending (see ``CANCELLABLE``)."""
        with self._lock:
            found = self.lookup(provider, task_id)
            if found is None:
                return "not_found"
            task, current = found
            if current.status not in CANCELLABLE:
                return "not_pending"
            now = self._now()
            task.cancelled_mono = now.mono
            task.cancelled_at = now.wall
            account = self._account_of(task)
            limits = limits_for(self._config, account.provider, account.api_key)
            self._started(account.cancelled(task, now, limits))
            if task_id in self._webhooks:
                self._fire_status_change(task_id, "failed", cancelled=True)
            self._arm_wake(account)
            return "canceled"

    # -- capacity -------------------------------------------------------------

    def _now(self) -> Moment:
        return Moment(self.clock.monotonic(), self.clock.time())

    def _account_of(self, task: Task) -> Account:
        return self._capacity.account(task.provider, task.api_key)

    def _settle(self, account: Account, now: Moment) -> None:
        limits = limits_for(self._config, account.provider, account.api_key)
        self._started(account.settle(now, limits))
        self._arm_wake(account)

    def _settle_all(self) -> Moment:
        now = self._now()
        for account in self._capacity.accounts():
            self._settle(account, now)
        return now

    def _started(self, holders: list[Holder]) -> None:
        """Tasks that left the staged line: their lifecycle webhooks start now."""
        for holder in holders:
            task = self._tasks.get(holder.task_id)
            if task is not None and task.task_id in self._webhooks:
                self._schedule_lifecycle(task)

    def _arm_wake(self, account: Account) -> None:
        """Settle ``account`` when its next slot frees, if a staged task waits for one."""
        due = account.next_release()
        if due is None or (account.wake_at is not None and account.wake_at <= due):
            return
        account.wake_at = due
        self._delivery.call_at(due, functools.partial(self._wake, account))

    def _wake(self, account: Account) -> None:
        with self._lock:
            if not self._capacity.is_current(account):  # forgotten by a reset
                return
            account.wake_at = None
            self._settle(account, self._now())

    def _new_task_id(self, provider: Provider) -> str:
        # Ids look like each provider's and never collide across providers.
        if provider == "lemondata":
            return f"task_{uuid.uuid4().hex}"
        return str(uuid.uuid4())

    def _count_create(self, provider: Provider, correlation: str) -> int:
        if not correlation:
            return 1
        key = (provider, correlation)
        self._create_counts[key] += 1
        count = self._create_counts[key]
        if count == 2:
            self._duplicates.append(correlation)
        return count

    # -- webhooks -------------------------------------------------------------

    def _plan_webhooks(self, task: Task, endpoint: str, secret: str | None) -> None:
        self._webhooks[task.task_id] = _WebhookPlan(endpoint=endpoint, secret=secret)
        if task.start_mono is None:
            self._delivery.call_at(
                task.created_mono,
                functools.partial(self._fire_status_change, task.task_id, "staged"),
            )
        else:
            self._schedule_lifecycle(task)

    def _schedule_lifecycle(self, task: Task) -> None:
        """The status changes of a task that has its slot, each at its moment."""
        start, end = task.start_mono, task.end_mono
        assert start is not None and end is not None  # it has a slot
        task_id = task.task_id
        changes: list[tuple[float, Status]] = [
            (start, "pending"),
            (start + task.pending_seconds, "processing"),
            (end, task.outcome),
        ]
        for when, status in changes:
            self._delivery.call_at(
                when, functools.partial(self._fire_status_change, task_id, status)
            )

    def _fire_status_change(self, task_id: str, status: Status, *, cancelled: bool = False) -> None:
        with self._lock:
            task = self._tasks.get(task_id)
            plan = self._webhooks.get(task_id)
            if task is None or plan is None or plan.closed:
                return
            view = task.view_for(status, cancelled=cancelled)
            plan.closed = view.terminal
            body = {"timestamp": int(self.clock.time()), "data": envelope_data(task, view)}
            delivery = WebhookDelivery(
                task_id=task_id,
                status=view.status,
                endpoint=plan.endpoint,
                body=json.dumps(body).encode(),
                secret=plan.secret,
            )
            counters = self._counters["webhooks"]
            counters["status_changes"] += 1
            config = self._config
            batch: list[WebhookDelivery] = []
            if config.webhook_drop_rate > 0 and self._rng.random() < config.webhook_drop_rate:
                counters["dropped"] += 1
            else:
                batch.append(delivery)
                if (
                    config.webhook_duplicate_rate > 0
                    and self._rng.random() < config.webhook_duplicate_rate
                ):
                    counters["duplicated"] += 1
                    batch.append(replace(delivery, copy=1))
            if config.webhook_reorder and not view.terminal:
                plan.held.extend(batch)
                return
            if view.terminal:
                batch.extend(reversed(plan.held))
                plan.held.clear()
            plan.outbox.extend(batch)
            if not plan.sending:
                self._send_next(task_id)

    def _send_next(self, task_id: str) -> None:
        """Send the task's next waiting delivery; called again when that one is final."""
        with self._lock:
            plan = self._webhooks.get(task_id)
            if plan is None:  # forgotten by a reset
                return
            if not plan.outbox:
                plan.sending = False
                return
            plan.sending = True
            delivery = plan.outbox.popleft()
            self._delivery.send(delivery, then=functools.partial(self._send_next, task_id))

    def _retry_policy(self) -> RetryPolicy:
        config = self.config
        return RetryPolicy(
            attempts=config.webhook_retry_attempts,
            base_seconds=config.webhook_retry_base_seconds,
            timeout_seconds=config.webhook_timeout_seconds,
        )

    def _record_attempt(self, attempt: DeliveryAttempt, final: bool) -> None:
        with self._lock:
            counters = self._counters["webhooks"]
            counters["attempted"] += 1
            if attempt.ok:
                counters["succeeded"] += 1
            else:
                counters["failed"] += 1
                if final:
                    counters["gave_up"] += 1
            if len(self._attempts) < ATTEMPT_LOG_LIMIT:
                self._attempts.append(attempt)

    # -- accessors for tests and /_sandbox ----------------------------------------

    def tasks(self) -> list[TaskSnapshot]:
        with self._lock:
            now = self._settle_all()
            return [task.snapshot(now.mono) for task in self._tasks.values()]

    def task(self, task_id: str) -> TaskSnapshot | None:
        with self._lock:
            task = self._tasks.get(task_id)
            if task is None:
                return None
            now = self._now()
            self._settle(self._account_of(task), now)
            return task.snapshot(now.mono)

    def tasks_by_correlation(
        self, correlation: str, provider: str | None = None
    ) -> list[TaskSnapshot]:
        return [
            snapshot
            for snapshot in self.tasks()
            if snapshot.correlation == correlation
            and (provider is None or snapshot.provider == provider)
        ]

    def task_by_correlation(
        self, correlation: str, provider: str | None = None
    ) -> TaskSnapshot | None:
        """The latest task created for ``correlation`` (see ``stats()['duplicate_creates']``)."""
        matches = self.tasks_by_correlation(correlation, provider)
        return matches[-1] if matches else None

    def webhook_attempts(self) -> list[DeliveryAttempt]:
        with self._lock:
            return list(self._attempts)

    def capacity_stats(self) -> dict[str, dict[str, Any]]:
        """Per provider, per key fingerprint: limits, running, high-water mark, staged, refusals."""
        with self._lock:
            now = self._settle_all()
            report: dict[str, dict[str, Any]] = {provider: {} for provider in PROVIDERS}
            for account in self._capacity.accounts():
                limits = limits_for(self._config, account.provider, account.api_key)
                fingerprint = key_fingerprint(account.api_key)
                report[account.provider][fingerprint] = account.stats(now, limits)
            return report

    def stats(self) -> dict[str, Any]:
        with self._lock:
            c = self._counters
            webhook_keys = (
                "status_changes",
                "attempted",
                "succeeded",
                "failed",
                "gave_up",
                "dropped",
                "duplicated",
            )
            return {
                "requests": {
                    "by_route": dict(c["by_route"]),
                    "by_status": dict(c["by_status"]),
                    "total": sum(c["by_route"].values()),
                },
                "tasks": len(self._tasks),
                "creates": {p: c["creates"][p] for p in PROVIDERS},
                "duplicate_creates": list(self._duplicates),
                "faults": {kind.value: c["faults"][kind.value] for kind in FaultKind},
                "webhooks": {key: c["webhooks"][key] for key in webhook_keys},
                "piclaza_batch": {
                    "queries": c["piclaza_batch"]["queries"],
                    "ids": c["piclaza_batch"]["ids"],
                },
                "capacity": self.capacity_stats(),
            }
