"""Buffered, offset-idempotent chapter writes, at most one per flush interval.

Tokens are buffered and appended at most every ``flush_interval_s`` (or when
``flush_chars`` are waiting) — never one write per token. Each append becomes one
``chapter_chunks`` row and one Broadcast message to the chapter's readers, so the
interval is also the readers' message rate. A section's end does not break that rate:
its checkpoint is written at once only if the interval has passed (or it is the last
section); otherwise it rides with the next write, which a timer makes happen one
interval after the previous one even if the model is slow to start the next section.
The offset sent with each append makes a retried write harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
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
        self._pending: Mapping[str, Any] | None = None  # a checkpoint waiting for a write
        self._lock = asyncio.Lock()  # one write at a time (the timer's or the caller's)
        self._timer: asyncio.Task[None] | None = None
        self._timer_writing = False
        self._timer_error: BaseException | None = None
        self.writes = 0
        self.bytes_sent = 0

    @property
    def offset(self) -> int:
        """Length of the chapter including text not yet flushed."""
        return self.committed + self._buffered

    async def add(self, text: str, progress: int, step: str) -> None:
        self._raise_timer_error()
        text = text.replace("\x00", "")  # PostgreSQL text cannot hold NUL
        if text:
            self._buffer.append(text)
            self._buffered += len(text)
        self.progress = max(self.progress, progress)
        self.step = step
        if self._timer_writing:
            return  # the timer is writing right now; this text goes with the next write
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
        """Write everything buffered now, with ``checkpoint`` (or one still pending)."""
        await self._stop_timer()
        self._raise_timer_error()
        if progress is not None:
            self.progress = max(self.progress, progress)
        if step is not None:
            self.step = step
        if checkpoint is not None:
            self._pending = checkpoint
        async with self._lock:
            await self._write()

    async def checkpoint(
        self, checkpoint: Mapping[str, Any], *, progress: int, step: str, final: bool
    ) -> None:
        """A section ended at ``checkpoint['content_length']``: record it without writing
        twice within one interval (the last section's is written at once)."""
        elapsed = self.clock() - self._last_flush
        if final or elapsed >= self.flush_interval_s:
            await self.flush(progress=progress, step=step, checkpoint=checkpoint)
            return
        self._raise_timer_error()
        self.progress = max(self.progress, progress)
        self.step = step
        self._pending = checkpoint
        if self._timer is None:
            self._timer = asyncio.create_task(self._write_later(self.flush_interval_s - elapsed))

    async def rewind(self, length: int) -> None:
        """Drop everything after ``length`` (a section is retried from its start)."""
        await self._stop_timer()
        self._raise_timer_error()
        async with self._lock:
            if self.committed < length:  # the text before it is still buffered: keep it
                kept = "".join(self._buffer)[: length - self.committed]
                self._buffer[:] = [kept] if kept else []
                self._buffered = len(kept)
                return
            self._buffer.clear()
            self._buffered = 0
            if self.committed > length:
                if not await self.store.rewind_chapter(self.job_id, self.worker_id, length):
                    raise LeaseLost("chapter rewind refused: the lease was lost")
                self.writes += 1
                self.committed = length

    async def close(self) -> None:
        """Stop the timer. A checkpoint still pending (the job is failing or stopping right
        after a section ended) is written with the text up to it, best effort, so the
        finished section is kept for the retry."""
        await self._stop_timer()
        if self._pending is not None:
            with contextlib.suppress(Exception):
                await self.rewind(int(self._pending["content_length"]))
                async with self._lock:
                    await self._write()

    # -- internals -------------------------------------------------------------------

    async def _write(self) -> None:
        """One append (caller holds the lock). Text added meanwhile stays buffered."""
        checkpoint = self._pending
        if not self._buffered and checkpoint is None:
            return
        parts = len(self._buffer)
        text = "".join(self._buffer[:parts])
        step = self.step if self.step != self._sent_step else None  # only when it changes
        sent_step = self.step
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
        self._sent_step = sent_step
        if self._pending is checkpoint:
            self._pending = None
        self.writes += 1
        self.bytes_sent += (
            len(text.encode())
            + len((step or "").encode())
            + (len(json.dumps(checkpoint)) if checkpoint is not None else 0)
        )
        self.committed += len(text)
        del self._buffer[:parts]
        self._buffered -= len(text)
        self._last_flush = self.clock()

    async def _write_later(self, delay: float) -> None:
        try:
            await asyncio.sleep(max(delay, 0.0))
            left = self.flush_interval_s - (self.clock() - self._last_flush)
            if left > 0:  # the event loop may wake a timer a hair early
                await asyncio.sleep(left + 0.001)
            self._timer_writing = True
            async with self._lock:
                await self._write()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # raised to the handler at its next call
            self._timer_error = exc
        finally:
            self._timer_writing = False

    async def _stop_timer(self) -> None:
        """Cancel a timer still sleeping; one already writing finishes under the lock."""
        timer, self._timer = self._timer, None
        if timer is None or timer.done():
            return
        if self._timer_writing:
            with contextlib.suppress(Exception):
                await timer
            return
        timer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await timer

    def _raise_timer_error(self) -> None:
        if self._timer_error is not None:
            exc, self._timer_error = self._timer_error, None
            raise exc
