"""Buffered, offset-idempotent chapter writes.

Tokens are buffered and appended at most every ``flush_interval_s`` or
``flush_chars``, and at each section end — never one write per token. Every write
carries text and progress together (an UPDATE that leaves a large ``content``
untouched reaches Realtime subscribers without it: docs/supabase-platform.md §4).
The offset sent with each append makes a retried write harmless.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

from worker.errors import LeaseLost
from worker.store import Store


class ChapterWriter:
    def __init__(
        self,
        store: Store,
        job_id: str,
        worker_id: str,
        *,
        offset: int,
        flush_interval_s: float,
        flush_chars: int,
        progress: int = 0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.job_id = job_id
        self.worker_id = worker_id
        self.committed = offset  # characters the database holds
        self.flush_interval_s = flush_interval_s
        self.flush_chars = flush_chars
        self.clock = clock
        self._buffer: list[str] = []
        self._buffered = 0
        self._last_flush = clock()
        self.progress = progress
        self.step = ""
        self._sent_step: str | None = None
        self.writes = 0
        self.bytes_sent = 0

    @property
    def offset(self) -> int:
        """Length of the chapter including text not yet flushed."""
        return self.committed + self._buffered

    async def add(self, text: str, progress: int, step: str) -> None:
        text = text.replace("\x00", "")  # PostgreSQL text cannot hold NUL
        if text:
            self._buffer.append(text)
            self._buffered += len(text)
        self.progress = max(self.progress, progress)
        self.step = step
        if (
            self._buffered >= self.flush_chars
            or self.clock() - self._last_flush >= self.flush_interval_s
        ):
            await self.flush()

    async def flush(
        self,
        *,
        progress: int | None = None,
        step: str | None = None,
        checkpoint: Mapping[str, Any] | None = None,
    ) -> None:
        if progress is not None:
            self.progress = max(self.progress, progress)
        if step is not None:
            self.step = step
        if not self._buffered and checkpoint is None:
            return
        text = "".join(self._buffer)
        step = self.step if self.step != self._sent_step else None  # only when it changes
        ok = await self.store.append_chapter(
            self.job_id,
            self.worker_id,
            offset=self.committed,
            text=text,
            progress=self.progress,
            current_step=step,
            checkpoint=checkpoint,
        )
        if not ok:
            raise LeaseLost("chapter append refused: the lease was lost")
        self._sent_step = self.step
        self.writes += 1
        self.bytes_sent += (
            len(text.encode())
            + len((step or "").encode())
            + (len(json.dumps(checkpoint)) if checkpoint is not None else 0)
        )
        self.committed += len(text)
        self._buffer.clear()
        self._buffered = 0
        self._last_flush = self.clock()

    async def rewind(self, length: int) -> None:
        """Drop everything after ``length`` (a section is retried from its start)."""
        self._buffer.clear()
        self._buffered = 0
        if self.committed > length:
            if not await self.store.rewind_chapter(self.job_id, self.worker_id, length):
                raise LeaseLost("chapter rewind refused: the lease was lost")
            self.writes += 1
            self.committed = length
