"""Story memory in the section prompt: passages of earlier chapters that bear on the
section about to be written, retrieved by meaning and given as delimited notes.

Memory is an aid, never a dependency. A chapter whose story has no passages yet (its first
chapters), a database without story memory (no pgvector: the SQL functions do not exist)
or a memory budget of 0 gets exactly today's prompts, with no embedding call. A failed
query embedding or retrieval costs that section its notes, with a warning, never the
chapter.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from worker.errors import JobError, LeaseLost
from worker.generation.embeddings import Embedder
from worker.generation.prompts import approx_tokens
from worker.jobs import JobContext
from worker.store.base import MissingFunctionError, StoreError

log = logging.getLogger(__name__)

NOTES_OPEN = "<story_so_far>"
NOTES_CLOSE = "</story_so_far>"
NOTES_HEADER = (
    "Story so far: passages from earlier chapters that may bear on this section. They are "
    "facts of the story: stay consistent with them, do not copy them."
)


@dataclass(frozen=True)
class MemoryConfig:
    top_k: int = 4
    min_similarity: float = 0.65
    max_tokens: int = 800  # 0 turns retrieval off


@dataclass(frozen=True)
class Recall:
    """What one section got: the notes block ('' for none) and what it holds."""

    notes: str = ""
    passages: int = 0
    tokens: int = 0


def section_query(bullet: str, chapter_title: str, instructions: str | None) -> str:
    """What the section is about: its outline bullet, then the chapter's premise (its
    title and the author's instructions for it)."""
    return "\n".join(part for part in (bullet, chapter_title, instructions or "") if part)


def format_notes(rows: Sequence[Mapping[str, Any]], max_tokens: int) -> Recall:
    """The passages, best first, as one delimited block of at most ``max_tokens``; a passage
    that does not fit is left out whole (a cut passage could cut a fact in two)."""
    fixed = approx_tokens(f"{NOTES_OPEN}\n{NOTES_HEADER}\n{NOTES_CLOSE}")
    budget = max_tokens - fixed
    kept: list[str] = []
    for row in rows:
        entry = f"[Chapter {row['chapter_number']}] {str(row['content']).strip()}"
        cost = approx_tokens(entry)
        if cost <= budget:
            kept.append(entry)
            budget -= cost
    if not kept:
        return Recall()
    notes = "\n".join([NOTES_OPEN, NOTES_HEADER, *kept, NOTES_CLOSE])
    return Recall(notes, len(kept), approx_tokens(notes))


class StoryMemory:
    """Shared by every chapter job of the process; ``for_chapter`` decides per chapter."""

    def __init__(self, embedder: Embedder | None, config: MemoryConfig) -> None:
        self.embedder = embedder
        self.config = config
        self._missing_logged = False

    async def for_chapter(self, ctx: JobContext) -> ChapterMemory | None:
        """A ``ChapterMemory`` when this chapter's story has passages to retrieve, else None."""
        if self.embedder is None or self.config.max_tokens <= 0:
            return None
        try:
            size = await ctx.store.story_memory_size(ctx.job.id, ctx.worker_id, self.embedder.model)
        except MissingFunctionError:
            if not self._missing_logged:
                self._missing_logged = True
                log.info("story memory is not installed in this database (no pgvector): off")
            return None
        except StoreError as exc:
            log.warning("story memory unavailable for this chapter: %s", exc)
            return None
        if size is None:
            raise LeaseLost("story_memory_size refused: the lease was lost")
        if size == 0:
            return None
        return ChapterMemory(self.embedder, self.config, ctx)


class ChapterMemory:
    """Retrieval for the sections of one chapter job."""

    def __init__(self, embedder: Embedder, config: MemoryConfig, ctx: JobContext) -> None:
        self.embedder = embedder
        self.config = config
        self.ctx = ctx
        self.passages = 0
        self.tokens = 0

    @property
    def max_tokens(self) -> int:
        return self.config.max_tokens

    async def recall(self, query: str, carried: Mapping[int, int]) -> Recall:
        """Notes for one section; ``carried`` maps a chapter number to the characters of its
        tail already in the prompt (those passages are not repeated)."""
        ctx = self.ctx
        try:
            [vector] = await self.embedder.embed([query], "RETRIEVAL_QUERY")
            rows = await ctx.store.match_story_passages(
                ctx.job.id,
                ctx.worker_id,
                query=vector,
                model=self.embedder.model,
                match_count=self.config.top_k,
                min_similarity=self.config.min_similarity,
                carried=carried,
            )
        except (JobError, StoreError) as exc:
            kind = exc.kind if isinstance(exc, JobError) else f"store_{exc.kind}"
            log.warning("story memory skipped for this section (%s): %s", kind, exc)
            return Recall()
        recall = format_notes(rows, self.config.max_tokens)
        self.passages += recall.passages
        self.tokens += recall.tokens
        return recall
