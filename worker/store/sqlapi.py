"""``Store``: every database operation genworker performs, each one SQL function call.

Written once over a ``Transport`` (transport.py), so the asyncpg and the REST paths
send the same calls and one contract suite (tests/store) proves both. The SQL
function names and parameter names live in this one file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from worker.store.base import BudgetTake, ClaimedJob, Job, transport_retry
from worker.store.transport import Transport


class Store:
    """The operations the runner, the handlers and the CLI use, over one transport."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self.name = transport.name

    async def open(self) -> Store:
        await self.transport.open()
        return self

    async def close(self) -> None:
        await self.transport.close()

    async def wait_for_work(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True early when a new-job notification arrives."""
        return await self.transport.wait_for_work(seconds)

    # -- queue --------------------------------------------------------------------
    async def claim(
        self, worker_id: str, job_types: Sequence[str] | None, job_lanes: Sequence[str] | None
    ) -> ClaimedJob | None:
        """One job or None. Never retried: a claim is not idempotent."""
        rows = await self.transport.rows(
            "claim_next_job_v3",
            {
                "worker_id": worker_id,
                "job_types": list(job_types) if job_types else None,
                "job_lanes": list(job_lanes) if job_lanes else None,
            },
        )
        return ClaimedJob.from_row(rows[0]) if rows else None

    async def claim_many(
        self,
        worker_id: str,
        job_types: Sequence[str] | None,
        job_lanes: Sequence[str] | None,
        limit: int,
        default_model: str | None = None,
    ) -> list[ClaimedJob]:
        """Up to ``limit`` jobs (at most the transport's ``claim_batch_max``), fairly across
        users, each with its full row (``claim_jobs``). Chapter jobs whose model
        (``options.model``, else ``default_model``) is in a Gemini cool-down or out of its
        daily quota are left pending. Never retried: not idempotent."""
        limit = min(limit, self.transport.claim_batch_max)
        rows = await self.transport.rows(
            "claim_jobs",
            {
                "p_worker_id": worker_id,
                "p_job_types": list(job_types) if job_types else None,
                "p_job_lanes": list(job_lanes) if job_lanes else None,
                "p_limit": limit,
                "p_default_model": default_model,
            },
        )
        return [ClaimedJob.from_full_row(r) for r in rows]

    @transport_retry
    async def get_job(self, job_id: str) -> Job | None:
        """Step two of the claim: the full row."""
        rows = await self.transport.rows("get_job", {"p_job_id": job_id})
        return Job.from_row(rows[0]) if rows else None

    @transport_retry
    async def heartbeat(self, job_id: str, worker_id: str) -> bool:
        """False means stop: the lease was lost, or the job was cancelled or paused."""
        return bool(
            await self.transport.value(
                "update_job_heartbeat", {"p_job_id": job_id, "p_worker_id": worker_id}
            )
        )

    async def heartbeat_many(self, job_ids: Sequence[str], worker_id: str) -> set[str]:
        """Not retried here: the next tick is the retry, and /health must see failures now."""
        if not job_ids:
            return set()
        held = await self.transport.column(
            "heartbeat_jobs", {"p_worker_id": worker_id, "p_job_ids": list(job_ids)}
        )
        return {str(j) for j in held}

    @transport_retry
    async def complete(self, job_id: str, worker_id: str, result: Mapping[str, Any]) -> bool:
        return bool(
            await self.transport.value(
                "complete_job",
                {"p_job_id": job_id, "p_worker_id": worker_id, "p_job_result": dict(result)},
            )
        )

    @transport_retry
    async def complete_many(
        self, worker_id: str, results: Mapping[str, Mapping[str, Any]]
    ) -> set[str]:
        """Complete several jobs in one call (``complete_jobs``); the ids now completed by this
        worker. Idempotent, so retried: a repeated call returns the same ids."""
        if not results:
            return set()
        done = await self.transport.column(
            "complete_jobs",
            {
                "p_worker_id": worker_id,
                "p_results": [{"job_id": j, "result": dict(r)} for j, r in results.items()],
            },
        )
        return {str(j) for j in done}

    @transport_retry
    async def fail(
        self,
        job_id: str,
        worker_id: str,
        *,
        error_details: Mapping[str, Any],
        retry_count: int,
        retry_at: datetime | None,
    ) -> bool:
        values: dict[str, Any] = {"error_details": dict(error_details)}
        if retry_at is None:
            values["status"] = "failed"
        else:
            values.update(status="pending", retry_count=retry_count, scheduled_at=retry_at)
        return await self.transport.fail_update(job_id, worker_id, values) == 1

    @transport_retry
    async def release(self, job_id: str, worker_id: str) -> bool:
        return bool(
            await self.transport.value(
                "release_job", {"p_job_id": job_id, "p_worker_id": worker_id}
            )
        )

    @transport_retry
    async def release_worker_jobs(self, worker_id: str) -> int:
        return int(
            await self.transport.value("release_worker_jobs", {"p_worker_id": worker_id}) or 0
        )

    @transport_retry
    async def queue_stats(self) -> dict[str, Any]:
        return dict(await self.transport.value("queue_stats", {}) or {})

    @transport_retry
    async def user_load(self, limit: int = 10) -> list[dict[str, Any]]:
        """The busiest (user, lane) groups across all workers: processing and pending counts,
        the lane's cap and when a claim last served them (``user_load``)."""
        return await self.transport.rows("user_load", {"p_limit": limit})

    async def ping(self) -> None:
        await self.transport.value("queue_stats", {})

    # -- the fleet's Gemini budget ----------------------------------------------------------
    async def budget_take(self, model: str, tokens: int) -> BudgetTake:
        """Take one request and ``tokens`` (an estimate) of ``model``'s shared budget, or
        learn how long to wait. Not retried: a take is not idempotent (a lost answer
        costs one request of budget, never an overshoot)."""
        rows = await self.transport.rows(
            "gemini_budget_take", {"p_model": model, "p_tokens": int(tokens)}
        )
        return BudgetTake.from_row(rows[0])

    async def budget_settle(
        self,
        model: str,
        reserved: int,
        used: int,
        *,
        retry_after_s: float | None = None,
        daily: bool = False,
        reason: str | None = None,
    ) -> None:
        """Correct the reservation with the real usage; a 429's delay (``retry_after_s``)
        or daily exhaustion becomes the fleet's cool-down for ``model``."""
        await self.transport.value(
            "gemini_budget_settle",
            {
                "p_model": model,
                "p_reserved": int(reserved),
                "p_used": int(used),
                "p_retry_after_s": retry_after_s,
                "p_daily": daily,
                "p_reason": reason,
            },
        )

    @transport_retry
    async def budget_status(self) -> list[dict[str, Any]]:
        """Every model's budget and shared state (cool-down, daily exhaustion)."""
        return await self.transport.rows("gemini_budget_status", {})

    # -- chapter writes -------------------------------------------------------------
    @transport_retry
    async def start_chapter(
        self, job_id: str, worker_id: str, tail_chars: int
    ) -> dict[str, Any] | None:
        context: dict[str, Any] | None = await self.transport.value(
            "start_chapter_generation",
            {"p_job_id": job_id, "p_worker_id": worker_id, "p_tail_chars": tail_chars},
        )
        return context

    @transport_retry
    async def save_outline(
        self, job_id: str, worker_id: str, title: str, outline: Mapping[str, Any]
    ) -> bool:
        return bool(
            await self.transport.value(
                "save_chapter_outline",
                {
                    "p_job_id": job_id,
                    "p_worker_id": worker_id,
                    "p_title": title,
                    "p_outline": dict(outline),
                },
            )
        )

    @transport_retry
    async def append_chapter(
        self,
        job_id: str,
        worker_id: str,
        *,
        offset: int,
        text: str,
        progress: int,
        current_step: str | None,
        checkpoint: Mapping[str, Any] | None = None,
    ) -> bool:
        return bool(
            await self.transport.value(
                "append_chapter_content",
                {
                    "p_job_id": job_id,
                    "p_worker_id": worker_id,
                    "p_offset": offset,
                    "p_text": text,
                    "p_progress": progress,
                    "p_current_step": current_step,
                    "p_checkpoint": dict(checkpoint) if checkpoint is not None else None,
                },
            )
        )

    @transport_retry
    async def rewind_chapter(self, job_id: str, worker_id: str, length: int) -> bool:
        return bool(
            await self.transport.value(
                "rewind_chapter_content",
                {"p_job_id": job_id, "p_worker_id": worker_id, "p_length": length},
            )
        )

    @transport_retry
    async def finish_chapter(self, job_id: str, worker_id: str) -> int | None:
        """Mark the chapter completed; its word count, or None when the lease is lost."""
        words: int | None = await self.transport.value(
            "finish_chapter", {"p_job_id": job_id, "p_worker_id": worker_id}
        )
        return words

    # -- story memory (only where pgvector is: MissingFunctionError elsewhere) ----------
    @transport_retry
    async def chapter_embedding_source(self, job_id: str, worker_id: str) -> dict[str, Any] | None:
        """The chapter an embedding job is about, with its text and md5; None: lease lost."""
        source: dict[str, Any] | None = await self.transport.value(
            "chapter_embedding_source", {"p_job_id": job_id, "p_worker_id": worker_id}
        )
        return source

    @transport_retry
    async def replace_chapter_passages(
        self,
        job_id: str,
        worker_id: str,
        *,
        chapter_id: str,
        content_md5: str,
        model: str,
        passages: Sequence[Mapping[str, Any]],
    ) -> dict[str, Any] | None:
        """Delete and insert a chapter's passages in one transaction (so a retry after an
        unknown outcome is harmless). ``{"status": "stored" | "stale" | "missing", ...}``;
        None when the lease is lost."""
        result: dict[str, Any] | None = await self.transport.value(
            "replace_chapter_passages",
            {
                "p_job_id": job_id,
                "p_worker_id": worker_id,
                "p_chapter_id": chapter_id,
                "p_content_md5": content_md5,
                "p_model": model,
                "p_passages": [dict(p) for p in passages],
            },
        )
        return result

    @transport_retry
    async def story_memory_size(self, job_id: str, worker_id: str, model: str) -> int | None:
        """Passages of earlier chapters a chapter job could retrieve; None: lease lost."""
        size = await self.transport.value(
            "story_memory_size", {"p_job_id": job_id, "p_worker_id": worker_id, "p_model": model}
        )
        return None if size is None else int(size)

    @transport_retry
    async def match_story_passages(
        self,
        job_id: str,
        worker_id: str,
        *,
        query: Sequence[float],
        model: str,
        match_count: int,
        min_similarity: float,
        carried: Mapping[int, int],
    ) -> list[dict[str, Any]]:
        """The closest passages of the story's earlier chapters, best first."""
        return await self.transport.rows(
            "match_story_passages",
            {
                "p_job_id": job_id,
                "p_worker_id": worker_id,
                "p_query": list(query),
                "p_model": model,
                "p_match_count": match_count,
                "p_min_similarity": min_similarity,
                "p_carried": {str(k): v for k, v in carried.items()},
            },
        )

    async def enqueue_chapter_embeddings(
        self,
        story_id: str | None,
        *,
        only_missing: bool,
        model: str | None = None,
        limit: int = 1000,
    ) -> list[str]:
        """Backfill: embedding jobs for a story's chapters or every chapter missing them."""
        ids = await self.transport.column(
            "enqueue_chapter_embeddings",
            {
                "p_story_id": story_id,
                "p_only_missing": only_missing,
                "p_model": model,
                "p_limit": limit,
            },
        )
        return [str(i) for i in ids]

    # -- operators --------------------------------------------------------------------
    async def requeue_failed(
        self,
        job_ids: Sequence[str] | None = None,
        job_type: str | None = None,
        failed_after: datetime | None = None,
        limit: int = 1000,
    ) -> list[str]:
        ids = await self.transport.column(
            "requeue_failed_jobs",
            {
                "p_job_ids": list(job_ids) if job_ids else None,
                "p_job_type": job_type,
                "p_failed_after": failed_after,
                "p_limit": limit,
            },
        )
        return [str(i) for i in ids]

    async def purge_finished(self, older_than_days: int) -> int:
        return int(
            await self.transport.value(
                "purge_finished_jobs", {"p_older_than_days": older_than_days}
            )
            or 0
        )

    async def enqueue_chapter(
        self,
        chapter_id: str,
        options: Mapping[str, Any] | None = None,
        idempotency_key: str | None = None,
    ) -> str:
        """``admin_enqueue_chapter``: an operator enqueues on behalf of the chapter's owner."""
        return str(
            await self.transport.value(
                "admin_enqueue_chapter",
                {
                    "p_chapter_id": chapter_id,
                    "p_options": dict(options or {}),
                    "p_idempotency_key": idempotency_key,
                },
            )
        )

    async def enqueue_job(
        self,
        job_type: str,
        payload: Mapping[str, Any] | None = None,
        *,
        priority: int = 0,
        lane: str = "default",
        max_retries: int = 3,
        delay_s: float = 0.0,
    ) -> str:
        return str(
            await self.transport.value(
                "enqueue_job",
                {
                    "p_job_type": job_type,
                    "p_job_payload": dict(payload or {}),
                    "p_priority": priority,
                    "p_job_lane": lane,
                    "p_max_retries": max_retries,
                    "p_delay_s": delay_s,
                },
            )
        )

    async def control_job(self, job_id: str, action: str) -> bool:
        """``admin_cancel_job`` / ``admin_pause_job`` / ``admin_resume_job`` (any owner's job).

        False when the job is not in a state the action applies to (e.g. already finished).
        """
        if action not in ("cancel", "pause", "resume"):
            raise ValueError(f"unknown job action {action!r}")
        return bool(await self.transport.value(f"admin_{action}_job", {"p_job_id": job_id}))

    async def read_chapter(self, chapter_id: str, *, from_char: int = 0) -> dict[str, Any] | None:
        """``read_chapter``: one chapter's state and its text from character ``from_char``."""
        rows = await self.transport.rows(
            "read_chapter", {"p_chapter_id": chapter_id, "p_from": from_char}
        )
        return rows[0] if rows else None

    async def story_progress(
        self, story_id: str, *, with_content: bool = False
    ) -> list[dict[str, Any]]:
        return await self.transport.rows(
            "story_progress", {"p_story_id": story_id, "p_with_content": with_content}
        )

    # -- dashboard (operators) ----------------------------------------------------------
    async def dashboard_overview(self, recent_minutes: int = 15) -> dict[str, Any]:
        """queue_stats plus lanes, the last hour per minute and the workers seen recently."""
        return dict(
            await self.transport.value("dashboard_overview", {"p_recent_minutes": recent_minutes})
            or {}
        )

    async def dashboard_jobs(
        self,
        *,
        status: str | None = None,
        job_type: str | None = None,
        user_id: str | None = None,
        created_from: datetime | None = None,
        created_to: datetime | None = None,
        limit: int = 50,
        offset: int = 0,
    ) -> dict[str, Any]:
        """One page of jobs, newest first: ``{"jobs": [...], "has_more": bool}``."""
        return dict(
            await self.transport.value(
                "dashboard_jobs",
                {
                    "p_status": status,
                    "p_job_type": job_type,
                    "p_user_id": user_id,
                    "p_created_from": created_from,
                    "p_created_to": created_to,
                    "p_limit": limit,
                    "p_offset": offset,
                },
            )
            or {}
        )

    async def dashboard_job(self, job_id: str) -> dict[str, Any] | None:
        """A job with its events and chapter, or None when there is no such job.

        Payloads and errors arrive as text, whatever their depth (docs/dashboard.md §2).
        """
        detail: dict[str, Any] | None = await self.transport.value(
            "dashboard_job", {"p_job_id": job_id}
        )
        return detail

    async def dashboard_live(self) -> dict[str, Any]:
        """Jobs in flight with their chapter's progress (polled by the live view)."""
        return dict(await self.transport.value("dashboard_live", {}) or {})
