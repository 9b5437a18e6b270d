"""The fleet's shared Gemini budget, as seen from one process (docs/gemini-budget.md).

Before each Gemini request the model takes one request and an estimate of its tokens
from the model's budget in PostgreSQL (``gemini_budget_take``, atomic across every
instance); after it, the real ``usage_metadata`` settles the estimate and a 429 becomes a
cool-down every instance honours (``gemini_budget_settle``). Within a process the
requests for one model queue on a lock, so one coroutine at a time asks the database and
sleeps the wait it is told: the database sees about one take per request granted, not
one per waiting coroutine.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from worker.errors import JobError, RetryableJobError
from worker.generation.gemini_errors import is_quota_daily
from worker.generation.model import Reservation, Usage
from worker.metrics import Metrics
from worker.store.base import StoreError
from worker.store.sqlapi import Store

log = logging.getLogger(__name__)

MAX_POLL_S = 5.0  # re-ask at least this often: a settle elsewhere may have given tokens back
DAILY = ("daily_exhausted", "rpd")


@dataclass(frozen=True)
class Blocked:
    """A model this process knows cannot run now, for /health and /status."""

    reason: str  # 'daily_exhausted' | 'cooldown'
    until: datetime
    detail: str


class FleetBudget:
    """``RequestBudget`` over the store's ``gemini_budget_take`` / ``gemini_budget_settle``."""

    def __init__(
        self, store: Store, *, max_wait_s: float = 120.0, metrics: Metrics | None = None
    ) -> None:
        self.store = store
        self.max_wait_s = max_wait_s
        self.metrics = metrics
        self.blocked: dict[str, Blocked] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def reserve(self, model: str, tokens: int) -> Reservation:
        started = time.monotonic()
        deadline = started + self.max_wait_s
        lock = self._locks.setdefault(model, asyncio.Lock())
        try:
            async with asyncio.timeout(self.max_wait_s):
                await lock.acquire()
        except TimeoutError:
            raise self._too_long(model, "rpm", self.max_wait_s, None) from None
        try:
            while True:
                take = await self.store.budget_take(model, tokens)
                if take.granted:
                    if self.metrics is not None:
                        self.metrics.budget_wait_seconds.labels(model).observe(
                            time.monotonic() - started
                        )
                    return Reservation(model, tokens)
                if take.reason in DAILY:
                    until = take.until or datetime.now(UTC)
                    self.blocked[model] = Blocked("daily_exhausted", until, take.reason)
                    raise RetryableJobError(
                        f"the daily Gemini quota of {model} is used up until {until.isoformat()}",
                        kind="quota_exhausted",
                        retry_after=max(take.wait_s, 1.0),
                        user_message="The daily Gemini quota is used up; the chapter will be "
                        "retried after the daily reset (midnight Pacific time).",
                        detail={"model": model, "until": until.isoformat()},
                    )
                if take.reason == "cooldown" and take.until is not None:
                    self.blocked[model] = Blocked("cooldown", take.until, "429 from Gemini")
                if time.monotonic() + take.wait_s > deadline:
                    raise self._too_long(model, take.reason, take.wait_s, take.until)
                # A little jitter so the fleet's waiters do not ask in lockstep.
                await asyncio.sleep(min(take.wait_s, MAX_POLL_S) * random.uniform(1.0, 1.1))
        finally:
            lock.release()

    def _too_long(
        self, model: str, reason: str, wait_s: float, until: datetime | None
    ) -> RetryableJobError:
        return RetryableJobError(
            f"the shared Gemini budget of {model} has no room for {wait_s:.0f}s ({reason})",
            kind="rate_limited",
            retry_after=max(wait_s, 1.0),
            user_message="Gemini's shared rate limit is reached; the chapter will be retried "
            f"in about {max(wait_s, 1.0):.0f} seconds.",
            detail={
                "model": model,
                "budget": reason,
                **({"until": until.isoformat()} if until else {}),
            },
        )

    async def settle(
        self, reservation: Reservation, used: Usage | None, error: BaseException | None
    ) -> None:
        """Never raises: a lost settle costs budget accuracy, not the job."""
        retry_after: float | None = None
        daily = False
        reason: str | None = None
        if isinstance(error, JobError) and error.kind == "rate_limited":
            quota_ids = [str(q) for q in error.detail.get("quota_ids") or []]
            daily = is_quota_daily(quota_ids)
            retry_after = None if daily else (error.retry_after or 0.0)
            reason = (f"Gemini 429 RESOURCE_EXHAUSTED ({', '.join(quota_ids) or 'no quotaId'})")[
                :300
            ]
            if self.metrics is not None:
                self.metrics.model_rate_limited.labels(reservation.model).inc()
        spent = used.total_tokens if used else 0
        try:
            await self.store.budget_settle(
                reservation.model,
                reservation.tokens,
                spent,
                retry_after_s=retry_after,
                daily=daily,
                reason=reason,
            )
        except StoreError as exc:
            log.warning("could not settle the Gemini budget of %s: %s", reservation.model, exc)

    async def refresh(self) -> None:
        """Re-read every model's shared state (another instance may have hit a limit)."""
        now = datetime.now(UTC)
        blocked: dict[str, Blocked] = {}
        for row in await self.store.budget_status():
            model = str(row["model"])
            if row.get("daily_exhausted_until"):
                until = _as_dt(row["daily_exhausted_until"])
                blocked[model] = Blocked("daily_exhausted", until, str(row.get("daily_reason")))
            elif row.get("cooldown_until"):
                until = _as_dt(row["cooldown_until"])
                blocked[model] = Blocked("cooldown", until, str(row.get("cooldown_reason")))
        self.blocked = {m: b for m, b in blocked.items() if b.until > now}

    async def watch(self, every_s: float = 15.0) -> None:
        """Refresh forever (a side task); a failed read keeps the last state."""
        while True:
            try:
                await self.refresh()
            except StoreError as exc:
                log.debug("budget status read failed: %s", exc)
            await asyncio.sleep(every_s)

    def reasons(self) -> list[str]:
        """/health lines for the models that cannot run now."""
        now = datetime.now(UTC)
        return [
            f"Gemini model {model}: "
            + (
                "daily quota exhausted"
                if b.reason == "daily_exhausted"
                else "in a shared rate-limit cool-down"
            )
            + f" until {b.until.isoformat()} ({b.detail}); its chapter jobs are not claimed"
            for model, b in sorted(self.blocked.items())
            if b.until > now
        ]


def _as_dt(value: object) -> datetime:
    if isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))
