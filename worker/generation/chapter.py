"""The chapter_generation handler: context → outline → one stream per section → finish.

Resumable: after each section a checkpoint records sections done, content length
and tokens used. A retried, rescued or resumed job cuts any partial section
(start_chapter_generation does it in SQL) and continues at the next section, so
the final text has every section exactly once and paid-for tokens are not bought
again.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type

from worker.errors import JobError, LeaseLost, PermanentJobError, RetryableJobError
from worker.generation.memory import ChapterMemory, StoryMemory, section_query
from worker.generation.model import Outline, TextModel, Usage
from worker.generation.payload import ChapterOptions, parse_payload
from worker.generation.prompts import SYSTEM, carried_tails, outline_prompt, section_prompt
from worker.generation.writer import ChapterWriter
from worker.jobs import JobContext

log = logging.getLogger(__name__)

JOB_TYPE = "chapter_generation"
OUTLINE_PROGRESS = 10
SECTIONS_END_PROGRESS = 95
CHARS_PER_WORD = 6


@dataclass(frozen=True)
class GenerationConfig:
    default_model: str
    allowed_models: Sequence[str]
    flush_interval_s: float = 1.0
    flush_chars: int = 2000
    section_retries: int = 2
    max_rate_limit_wait_s: float = 120.0
    tail_chars: int = 2000
    context_max_tokens: int = 6000
    retry_pause_s: float = 1.0


def section_progress(index: int, total: int, fraction: float) -> int:
    """10 → 95 across the sections; within one, by characters against its expected length."""
    span = SECTIONS_END_PROGRESS - OUTLINE_PROGRESS
    return int(OUTLINE_PROGRESS + span * (index + min(max(fraction, 0.0), 0.98)) / total)


def _usage_of(state: Mapping[str, Any]) -> Usage:
    u = state.get("usage") or {}
    return Usage(
        int(u.get("prompt_tokens", 0)),
        int(u.get("output_tokens", 0)),
        int(u.get("thoughts_tokens", 0)),
        int(u.get("cached_tokens", 0)),
    )


class ChapterHandler:
    """Registered for ``chapter_generation``; one instance serves every slot."""

    def __init__(
        self, model: TextModel, config: GenerationConfig, memory: StoryMemory | None = None
    ) -> None:
        self.model = model
        self.config = config
        self.memory = memory

    async def __call__(self, ctx: JobContext) -> dict[str, Any]:
        t0 = time.monotonic()
        cfg = self.config
        payload = parse_payload(
            ctx.job.job_payload,
            job_user_id=ctx.job.user_id,
            default_model=cfg.default_model,
            allowed_models=cfg.allowed_models,
        )
        opts = payload.options
        job_id, worker = ctx.job.id, ctx.worker_id
        start = await ctx.store.start_chapter(job_id, worker, cfg.tail_chars)
        if start is None:
            raise LeaseLost("start_chapter_generation refused: the lease was lost")
        chapter = start["chapter"]
        if chapter["id"] != payload.chapter_id:
            raise PermanentJobError(
                f"payload chapter {payload.chapter_id} is not the job's chapter {chapter['id']}",
                kind="bad_payload",
                user_message="The generation request named another chapter.",
            )
        state: dict[str, Any] = dict(chapter.get("generation_state") or {})
        usage = resumed_usage = _usage_of(state)

        memory = await self.memory.for_chapter(ctx) if self.memory is not None else None
        # Memory's budget comes out of the context's, once per chapter: the outline and every
        # section then begin with the same stable head (Gemini's implicit prefix caching).
        context_tokens = max(0, cfg.context_max_tokens - (memory.max_tokens if memory else 0))
        outline, usage = await self._outline(ctx, start, opts, chapter, usage, context_tokens)
        total = len(outline.bullets)
        done = int(state.get("sections_done", 0)) if chapter.get("outline") else 0
        writer = ChapterWriter(
            ctx.store,
            job_id,
            worker,
            offset=int(chapter["content_length"]),
            flush_interval_s=cfg.flush_interval_s,
            flush_chars=cfg.flush_chars,
            progress=section_progress(done, total, 0.0) if done else OUTLINE_PROGRESS,
        )
        tail = str(chapter.get("content_tail") or "")
        words_per_section = max(50, opts.target_words // total)
        try:
            for index in range(done, total):
                tail, usage = await self._section(
                    ctx,
                    writer,
                    start,
                    opts,
                    outline,
                    index,
                    tail,
                    words_per_section,
                    usage,
                    context_tokens,
                    memory,
                )
                checkpoint = {
                    "sections_done": index + 1,
                    "content_length": writer.offset,
                    "usage": asdict(usage),
                    "sections_total": total,
                }
                await writer.checkpoint(
                    checkpoint,
                    progress=section_progress(index + 1, total, 0.0),
                    step=f"section {index + 1}/{total} done",
                    final=index + 1 == total,
                )
                ctx.report(writer.progress, writer.step)
        finally:
            await writer.close()
            ctx.metrics.chapter_writes.inc(writer.writes)
            ctx.metrics.chapter_bytes.inc(writer.bytes_sent)
        words = await ctx.store.finish_chapter(job_id, worker)
        if words is None:
            raise LeaseLost("finish_chapter refused: the lease was lost")
        ctx.report(100, "completed")
        # This attempt's tokens (the checkpoint's earlier attempts were counted by them).
        for kind, n in (
            ("prompt", usage.prompt_tokens - resumed_usage.prompt_tokens),
            ("cached", usage.cached_tokens - resumed_usage.cached_tokens),
            ("output", usage.output_tokens - resumed_usage.output_tokens),
            ("thoughts", usage.thoughts_tokens - resumed_usage.thoughts_tokens),
        ):
            ctx.metrics.model_tokens.labels(opts.model, kind).inc(max(n, 0))
        result: dict[str, Any] = {
            "chapter_id": payload.chapter_id,
            "words": words,
            "sections": total,
            "model": opts.model,
            "prompt_tokens": usage.prompt_tokens,
            "cached_tokens": usage.cached_tokens,
            "output_tokens": usage.output_tokens,
            "thoughts_tokens": usage.thoughts_tokens,
            "duration_s": round(time.monotonic() - t0, 3),
            "resumed_at_section": done,
            "writes": writer.writes,
            "bytes_written": writer.bytes_sent,
        }
        if memory is not None:
            result["memory_passages"] = memory.passages
            result["memory_tokens"] = memory.tokens
        return result

    async def _outline(
        self,
        ctx: JobContext,
        start: Mapping[str, Any],
        opts: ChapterOptions,
        chapter: Mapping[str, Any],
        usage: Usage,
        context_tokens: int,
    ) -> tuple[Outline, Usage]:
        """The saved outline of an earlier attempt, or a new one (bought once per chapter)."""
        saved = chapter.get("outline") or {}
        if saved.get("bullets"):
            return Outline(str(saved.get("title", "")), [str(b) for b in saved["bullets"]]), usage
        ctx.report(1, "outline")
        prompt = outline_prompt(start, opts, context_tokens)
        async for attempt in self._retrying("outline"):
            with attempt:
                outline, used = await self.model.outline(
                    model=opts.model, system=SYSTEM, prompt=prompt
                )
        usage = usage + used
        bullets = [b.strip() for b in outline.bullets if b.strip()][: opts.sections]
        if len(bullets) < 2:
            raise RetryableJobError(
                f"the outline had {len(bullets)} usable bullet(s)",
                kind="model_output_invalid",
                user_message="The model returned an unusable outline.",
            )
        outline = Outline(outline.title.strip() or str(chapter.get("title") or ""), bullets)
        ok = await ctx.store.save_outline(
            ctx.job.id, ctx.worker_id, outline.title, {"title": outline.title, "bullets": bullets}
        )
        if not ok:
            raise LeaseLost("save_chapter_outline refused: the lease was lost")
        ctx.report(OUTLINE_PROGRESS, "outline")
        return outline, usage

    def _retrying(self, what: str) -> AsyncRetrying:
        """Retries of one model call inside the job: ``section_retries`` of them, after a
        short jittered pause or a 429's RetryInfo delay. A wait longer than
        ``max_rate_limit_wait_s`` is not taken here: the job-level retry waits instead of
        holding a slot. The last error is re-raised as it is."""

        def pause(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            if (
                isinstance(exc, RetryableJobError)
                and exc.kind == "rate_limited"
                and exc.retry_after
            ):
                return exc.retry_after
            return self.config.retry_pause_s * state.attempt_number * random.uniform(0.5, 1.0)

        def give_up(state: RetryCallState) -> bool:
            n, cfg = state.attempt_number, self.config
            return n > cfg.section_retries or state.upcoming_sleep > cfg.max_rate_limit_wait_s

        def announce(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            kind, message = (exc.kind, exc.message) if isinstance(exc, JobError) else ("?", "")
            n, delay = state.attempt_number, state.upcoming_sleep
            log.warning("%s failed (%s), retry %d in %.1fs: %s", what, kind, n, delay, message)

        return AsyncRetrying(
            retry=retry_if_exception_type(RetryableJobError),
            wait=pause,
            stop=give_up,
            before_sleep=announce,
            reraise=True,
        )

    async def _section(
        self,
        ctx: JobContext,
        writer: ChapterWriter,
        start: Mapping[str, Any],
        opts: ChapterOptions,
        outline: Outline,
        index: int,
        tail: str,
        words: int,
        usage: Usage,
        context_tokens: int,
        memory: ChapterMemory | None,
    ) -> tuple[str, Usage]:
        total = len(outline.bullets)
        step = f"section {index + 1}/{total}: {outline.bullets[index]}"[:160]
        expected_chars = words * CHARS_PER_WORD
        section_start = writer.offset
        notes = ""
        if memory is not None:
            query = section_query(outline.bullets[index], outline.title, opts.instructions)
            notes = (await memory.recall(query, carried_tails(start, context_tokens))).notes
        prompt = section_prompt(
            start,
            opts,
            outline.title,
            outline.bullets,
            index,
            tail[-self.config.tail_chars :],
            words,
            context_tokens,
            memory_notes=notes,
        )
        async for attempt in self._retrying(f"section {index + 1}"):
            with attempt:
                if attempt.retry_state.attempt_number > 1:
                    await writer.rewind(section_start)  # a retry starts the section afresh
                written, section_tail = 0, tail
                stream = self.model.stream_section(
                    model=opts.model,
                    system=SYSTEM,
                    prompt=prompt,
                    max_output_tokens=max(512, words * 3),
                )
                try:
                    async with stream as s:
                        async for delta in s:
                            if not delta:
                                continue
                            if written == 0 and section_start > 0:
                                delta = "\n\n" + delta.lstrip("\n")
                            written += len(delta)
                            section_tail = (section_tail + delta)[-self.config.tail_chars :]
                            progress = section_progress(index, total, written / expected_chars)
                            await writer.add(delta, progress, step)
                            ctx.report(writer.progress, step)
                finally:
                    usage = usage + stream.usage  # a broken stream may still have been billed
        if stream.finish_reason == "MAX_TOKENS":
            log.info("section %d hit MAX_TOKENS; closing it and going on", index + 1)
        return section_tail, usage
