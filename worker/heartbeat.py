"""One task beats every in-flight job of the process, in one round trip per tick.

A job missing from the answer is no longer ours (rescued after a stall, cancelled
or paused by its owner): its handler is cancelled at once, within one interval
of the change, and stops writing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable

from worker.metrics import Metrics
from worker.store import Store, StoreError

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(
        self,
        store: Store,
        worker_id: str,
        interval_s: float,
        *,
        job_ids: Callable[[], Iterable[str]],
        on_lost: Callable[[str], None],
        metrics: Metrics,
        on_result: Callable[[BaseException | None], None] = lambda _e: None,
    ) -> None:
        self.store = store
        self.worker_id = worker_id
        self.interval_s = interval_s
        self._job_ids = job_ids
        self._on_lost = on_lost
        self._on_result = on_result
        self.metrics = metrics
        self.consecutive_failures = 0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            await self.beat()

    async def beat(self) -> None:
        ids = list(self._job_ids())
        if not ids:
            return
        try:
            held = await self.store.heartbeat_many(ids, self.worker_id)
        except StoreError as exc:
            # Keep going: a database blip shorter than the lease loses nothing, and a
            # longer one is answered by the first successful beat (jobs not held).
            self.consecutive_failures += 1
            self._on_result(exc)
            self.metrics.heartbeat_failures.inc()
            log.warning("heartbeat failed (%d in a row): %s", self.consecutive_failures, exc)
            return
        self.consecutive_failures = 0
        self._on_result(None)
        for job_id in ids:
            if job_id not in held:
                self._on_lost(job_id)
