"""The job types this worker knows, by name.

``noop`` completes at once (or after ``sleep_s``): an operator's smoke test and
the benchmark's unit of work. ``chapter_generation`` is the product; ``chapter_embedding``
keeps its story memory.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from worker.errors import PermanentJobError
from worker.jobs import Handler, JobContext


async def noop(ctx: JobContext) -> Mapping[str, Any]:
    sleep_s = ctx.job.job_payload.get("sleep_s", 0)
    if not isinstance(sleep_s, int | float) or not 0 <= sleep_s <= 3600:
        raise PermanentJobError(
            f"noop: sleep_s must be 0..3600 seconds, got {sleep_s!r}", kind="bad_payload"
        )
    if sleep_s:
        await asyncio.sleep(sleep_s)
    return {"ok": True, "slept_s": sleep_s}


def build_handlers(chapter: Handler | None, embedding: Handler | None = None) -> dict[str, Handler]:
    handlers: dict[str, Handler] = {"noop": noop}
    if chapter is not None:
        from worker.generation.chapter import JOB_TYPE

        handlers[JOB_TYPE] = chapter
    if embedding is not None:
        from worker.generation.embedding_job import JOB_TYPE as EMBEDDING

        handlers[EMBEDDING] = embedding
    return handlers
