"""Story-memory helpers for tests: is it installed here, chapters written through the real
worker functions, and vectors with a known geometry."""

from __future__ import annotations

import json
import math

import asyncpg
import pytest

from tests.support.seed import as_role, create_chapter

DIMS = 768
SKIP_REASON = (
    "story memory is not installed on this PostgreSQL: the vector extension (pgvector) is "
    "not available here (for Debian's PostgreSQL 15 install postgresql-15-pgvector); the "
    "migration skipped it, as it must"
)


async def memory_installed(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval("select to_regclass('public.story_passages') is not null"))


async def require_memory(conn: asyncpg.Connection) -> None:
    if not await memory_installed(conn):
        pytest.skip(SKIP_REASON)


def basis(*weights: tuple[int, float]) -> list[float]:
    """A unit vector with the given (index, weight) components."""
    v = [0.0] * DIMS
    for i, w in weights:
        v[i] = w
    norm = math.sqrt(sum(x * x for x in v)) or 1.0
    return [x / norm for x in v]


async def write_chapter(
    conn: asyncpg.Connection,
    story: str,
    user: str,
    number: int,
    text: str,
    *,
    worker: str = "writer",
    chapter: str | None = None,
) -> tuple[str, str]:
    """Create (or regenerate) a chapter and complete it through the worker's own functions,
    as a generation job would: (chapter id, generation job id)."""
    chapter = chapter or await create_chapter(conn, story, user, number, f"Chapter {number}")
    async with as_role(conn, "authenticated", user):
        job = str(await conn.fetchval("select enqueue_chapter_generation($1, '{}')", chapter))
    claimed = await conn.fetchrow(
        "select * from claim_next_job_v3($1, array['chapter_generation'], null)", worker
    )
    assert claimed is not None and str(claimed["job_id"]) == job
    assert await conn.fetchval("select start_chapter_generation($1, $2)", job, worker)
    assert await conn.fetchval(
        "select append_chapter_content($1, $2, 0, $3, 90, 'writing', null)", job, worker, text
    )
    assert await conn.fetchval("select finish_chapter($1, $2)", job, worker) is not None
    assert await conn.fetchval("select complete_job($1, $2, '{}')", job, worker)
    return chapter, job


async def embedding_jobs(conn: asyncpg.Connection, chapter: str) -> list[asyncpg.Record]:
    return list(
        await conn.fetch(
            "select * from job_queue where job_type = 'chapter_embedding'"
            " and job_payload ->> 'chapter_id' = $1 order by created_at",
            chapter,
        )
    )


def passages_json(text: str, vectors: list[list[float]], cut: list[tuple[int, int]]) -> str:
    """The p_passages argument of replace_chapter_passages for the given cuts of ``text``."""
    return json.dumps(
        [
            {
                "ordinal": i,
                "start_offset": a,
                "end_offset": b,
                "content": text[a:b],
                "embedding": vec,
            }
            for i, ((a, b), vec) in enumerate(zip(cut, vectors, strict=True))
        ]
    )
