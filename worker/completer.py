"""Batched completion: jobs that finish while a completion call is in flight share the next one.

No linger and no timer: a lone job is completed at once with ``complete_job``; under load,
every job that finishes while a call is under way waits for it to return and then goes out
with the others in one ``complete_jobs`` call (group commit). Each caller learns for its own
job whether the completion held (False: the lease was lost, nothing was written).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from worker.metrics import Metrics
from worker.store import Store
from worker.store.base import TransientStoreError


class Completer:
    def __init__(self, store: Store, worker_id: str, metrics: Metrics, max_batch: int = 100):
        self.store = store
        self.worker_id = worker_id
        self.metrics = metrics
        self.max_batch = max_batch
        self._pending: dict[str, tuple[Mapping[str, Any], asyncio.Future[bool]]] = {}
        self._flushing = False
        self._task: asyncio.Task[None] | None = None

    async def complete(self, job_id: str, result: Mapping[str, Any]) -> bool:
        """Complete one job, batched with any others finishing now; raises the store's error."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        # Its caller may be gone (cancelled at shutdown): the outcome is still consumed.
        fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._pending[job_id] = (result, fut)
        if not self._flushing:
            self._flushing = True
            self._task = loop.create_task(self._flush(), name="complete-batch")
        # A caller cancelled meanwhile cancels only its own future: the call that carries
        # the batch is the flush task's, and it goes on for the others.
        return await fut

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch = dict(list(self._pending.items())[: self.max_batch])
                for job_id in batch:
                    del self._pending[job_id]
                await self._send(batch)
        finally:
            self._flushing = False

    async def _send(self, batch: dict[str, tuple[Mapping[str, Any], asyncio.Future[bool]]]) -> None:
        self.metrics.completion_batch_size.observe(len(batch))
        try:
            if len(batch) == 1:
                [(job_id, (result, _))] = batch.items()
                done = (
                    {job_id} if await self.store.complete(job_id, self.worker_id, result) else set()
                )
            else:
                done = await self.store.complete_many(
                    self.worker_id, {j: r for j, (r, _) in batch.items()}
                )
        except Exception as exc:
            if len(batch) > 1 and not isinstance(exc, TransientStoreError):
                # One job's result may be what the call was refused for: each job goes on
                # its own, so only that job sees the error (the call is idempotent).
                await asyncio.gather(*(self._send({j: v}) for j, v in batch.items()))
                return
            for _, fut in batch.values():
                if not fut.done():
                    fut.set_exception(exc)
            return
        for job_id, (_, fut) in batch.items():
            if not fut.done():
                fut.set_result(job_id in done)
