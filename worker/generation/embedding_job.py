"""The ``chapter_embedding`` handler: a completed chapter's passages, embedded and stored.

Queued by the database when a chapter completes (and by ``genworker embed``), so it is
retried, fenced and visible like any job, and never holds up the chapter itself. It reads
the chapter's text when it runs: a job that waited through a regeneration embeds the new
text, and one whose text changed while it ran stores nothing ("stale"; the completion of
the new text has queued the next job).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from worker.errors import LeaseLost
from worker.generation.embeddings import DIMENSIONS, Embedder
from worker.generation.passages import split_passages
from worker.jobs import JobContext

log = logging.getLogger(__name__)

JOB_TYPE = "chapter_embedding"


class ChapterEmbeddingHandler:
    """Registered for ``chapter_embedding``; one instance serves every slot."""

    def __init__(self, embedder: Embedder) -> None:
        self.embedder = embedder

    async def __call__(self, ctx: JobContext) -> dict[str, Any]:
        t0 = time.monotonic()
        job_id, worker = ctx.job.id, ctx.worker_id
        source = await ctx.store.chapter_embedding_source(job_id, worker)
        if source is None:
            raise LeaseLost("chapter_embedding_source refused: the lease was lost")
        status = str(source.get("status"))
        if status != "completed":
            # Deleted, or written again since: a later completion queues a new job.
            return {"chapter_id": source.get("chapter_id"), "skipped": f"chapter is {status}"}
        chapter_id = str(source["chapter_id"])
        text = str(source.get("content") or "")
        passages = split_passages(text)
        ctx.report(10, f"embedding {len(passages)} passages")
        vectors = (
            await self.embedder.embed([p.text for p in passages], "RETRIEVAL_DOCUMENT")
            if passages
            else []
        )
        result = await ctx.store.replace_chapter_passages(
            job_id,
            worker,
            chapter_id=chapter_id,
            content_md5=str(source["content_md5"]),
            model=self.embedder.model,
            passages=[
                {
                    "ordinal": p.ordinal,
                    "start_offset": p.start,
                    "end_offset": p.end,
                    "content": p.text,
                    "embedding": vector,
                }
                for p, vector in zip(passages, vectors, strict=True)
            ],
        )
        if result is None:
            raise LeaseLost("replace_chapter_passages refused: the lease was lost")
        if result.get("status") != "stored":
            log.info("chapter %s changed while it was embedded: nothing stored", chapter_id)
        return {
            "chapter_id": chapter_id,
            "status": result.get("status"),
            "passages": int(result.get("passages") or 0),
            "chars": len(text),
            "model": self.embedder.model,
            "dimensions": DIMENSIONS,
            "duration_s": round(time.monotonic() - t0, 3),
        }
