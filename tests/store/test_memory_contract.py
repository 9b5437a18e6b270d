"""The story-memory operations of the Store, identically over both transports."""

from __future__ import annotations

import asyncpg
import pytest

from tests.support.memory import basis, require_memory, write_chapter
from tests.support.seed import as_role, create_chapter, create_story, create_user
from worker.store.base import ForbiddenError, InvalidInputError, MissingFunctionError
from worker.store.sqlapi import Store

TEXT = "Oriel kept the brass astrolabe.\n\nThe tide came in."


@pytest.fixture
async def story(conn: asyncpg.Connection) -> dict[str, str]:
    await require_memory(conn)
    user = await create_user(conn)
    story = await create_story(conn, user)
    chapter, _ = await write_chapter(conn, story, user, 1, TEXT)
    return {"user": user, "story": story, "chapter": chapter}


async def claim_embedding(store: Store, worker: str = "w") -> str:
    claimed = await store.claim(worker, ["chapter_embedding"], None)
    assert claimed is not None
    return claimed.job_id


def passages(vectors: list[list[float]]) -> list[dict[str, object]]:
    cut = [(0, 31), (33, 50)]
    return [
        {"ordinal": i, "start_offset": a, "end_offset": b, "content": TEXT[a:b], "embedding": v}
        for i, ((a, b), v) in enumerate(zip(cut, vectors, strict=False))
    ]


async def test_embedding_job_reads_stores_and_is_fenced(store: Store, conn, story) -> None:
    job = await claim_embedding(store)
    source = await store.chapter_embedding_source(job, "w")
    assert source is not None
    assert (source["chapter_id"], source["number"], source["status"], source["content"]) == (
        story["chapter"],
        1,
        "completed",
        TEXT,
    )
    assert await store.chapter_embedding_source(job, "other") is None
    vectors = [basis((0, 1.0)), basis((1, 1.0))]
    args = {"chapter_id": story["chapter"], "content_md5": source["content_md5"], "model": "m"}
    assert (
        await store.replace_chapter_passages(job, "other", passages=passages(vectors), **args)
        is None
    )
    assert await store.replace_chapter_passages(job, "w", passages=passages(vectors), **args) == {
        "status": "stored",
        "passages": 2,
    }
    stored = await conn.fetch("select ordinal, content, model from story_passages order by ordinal")
    assert [(r["ordinal"], r["content"], r["model"]) for r in stored] == [
        (0, "Oriel kept the brass astrolabe.", "m"),
        (1, "The tide came in.", "m"),
    ]
    with pytest.raises(InvalidInputError):
        await store.replace_chapter_passages(job, "w", passages=passages([[0.5] * 3]), **args)
    other = await create_chapter(conn, story["story"], story["user"], 9)
    with pytest.raises(ForbiddenError):
        await store.replace_chapter_passages(
            job, "w", passages=passages(vectors), **{**args, "chapter_id": other}
        )


async def test_retrieval_and_size_for_a_later_chapter(store: Store, conn, story) -> None:
    job = await claim_embedding(store)
    source = await store.chapter_embedding_source(job, "w")
    assert source is not None
    await store.replace_chapter_passages(
        job,
        "w",
        chapter_id=story["chapter"],
        content_md5=source["content_md5"],
        model="m",
        passages=passages([basis((0, 1.0)), basis((1, 1.0))]),
    )
    chapter2 = await create_chapter(conn, story["story"], story["user"], 2)
    async with as_role(conn, "authenticated", story["user"]):
        gen = await conn.fetchval("select enqueue_chapter_generation($1, '{}')", chapter2)
    claimed = await store.claim("g", ["chapter_generation"], None)
    assert claimed is not None and claimed.job_id == str(gen)
    assert await store.story_memory_size(str(gen), "g", "m") == 2
    assert await store.story_memory_size(str(gen), "x", "m") is None
    rows = await store.match_story_passages(
        str(gen),
        "g",
        query=basis((1, 0.8), (5, 0.6)),
        model="m",
        match_count=3,
        min_similarity=0.5,
        carried={},
    )
    assert [(r["chapter_number"], r["ordinal"], r["content"]) for r in rows] == [
        (1, 1, "The tide came in.")
    ]
    assert rows[0]["similarity"] == pytest.approx(0.8)
    assert (
        await store.match_story_passages(
            str(gen),
            "g",
            query=basis((1, 1.0)),
            model="m",
            match_count=3,
            min_similarity=0.5,
            carried={1: 20},
        )
        == []
    )


async def test_backfill(store: Store, conn, story) -> None:
    [waiting] = await store.enqueue_chapter_embeddings(story["story"], only_missing=False)
    assert await store.enqueue_chapter_embeddings(None, only_missing=True) == [waiting]
    with pytest.raises(InvalidInputError):
        await store.enqueue_chapter_embeddings(None, only_missing=False)


async def test_a_database_without_memory_answers_missing_function(store: Store, conn) -> None:
    """What the worker sees where the migration skipped story memory (no pgvector)."""
    await conn.execute(
        "drop function if exists story_memory_size(uuid, text, text);"
        "drop function if exists enqueue_chapter_embeddings(uuid, boolean, text, integer)"
    )
    await conn.execute("notify pgrst, 'reload schema'")
    with pytest.raises(MissingFunctionError):
        await store.story_memory_size("00000000-0000-0000-0000-000000000000", "w", "m")
    with pytest.raises(MissingFunctionError):
        await store.enqueue_chapter_embeddings(None, only_missing=True)
