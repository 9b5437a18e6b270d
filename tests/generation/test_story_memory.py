"""Story memory end to end: real runner, real SDK against the fake Gemini (generation and
embeddings), real PostgreSQL with pgvector; and the same worker on a database without it."""

from __future__ import annotations

import json
import random
from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import asyncpg
import pytest

from tests.runtime.conftest import running, wait_until
from tests.support.database import PgTestServer
from tests.support.fake_gemini import FakeGemini, http_error, ok, stall_after
from tests.support.memory import embedding_jobs, require_memory, write_chapter
from tests.support.seed import as_role, create_chapter, create_story, create_user
from worker.generation.chapter import ChapterHandler, GenerationConfig
from worker.generation.embedding_job import ChapterEmbeddingHandler
from worker.generation.gemini import GeminiModel
from worker.generation.gemini_embed import GeminiEmbedder
from worker.generation.memory import NOTES_CLOSE, NOTES_OPEN, MemoryConfig, StoryMemory
from worker.generation.passages import split_passages
from worker.handlers import build_handlers
from worker.migrate import apply_bootstrap, apply_migrations
from worker.store import Store
from worker.store.postgres import PostgresTransport

MODEL = "gemini-test"
CONFIG = GenerationConfig(
    default_model=MODEL,
    allowed_models=[MODEL],
    flush_interval_s=0.05,
    flush_chars=300,
    retry_pause_s=0.01,
)
MEMORY = MemoryConfig(top_k=3, min_similarity=0.15, max_tokens=600)
OPTIONS = {"sections": 3, "target_words": 300}

# Filler prose shares no word with the planted fact or the queries below.
VOCABULARY = (
    "river lantern harbor garden road winter letter window mountain village bell thread "
    "ember orchard bridge storm voice shadow morning quiet silver distant narrow patient "
    "hidden restless golden walked waited listened gathered folded watched carried"
).split()
FACT = (
    "Captain Idris Marrow hid the brass astrolabe beneath the chapel floor, wrapped in "
    "oilcloth, and swore the ferryman to silence. Only the keeper of the western light "
    "would ever know where it lay, and she had promised to forget."
)


def filler(seed: int, paragraphs: int) -> str:
    rng = random.Random(seed)
    return "\n\n".join(
        " ".join(rng.choice(VOCABULARY) for _ in range(40)).capitalize() + "."
        for _ in range(paragraphs)
    )


@pytest.fixture
async def model(fake_gemini: FakeGemini) -> AsyncIterator[GeminiModel]:
    m = GeminiModel(api_key="test-key-123", base_url=fake_gemini.base_url, idle_timeout_s=30.0)
    yield m
    await m.aclose()


def worker_handlers(model: GeminiModel, embedder: GeminiEmbedder) -> dict[str, Any]:
    return build_handlers(
        ChapterHandler(model, CONFIG, StoryMemory(embedder, MEMORY)),
        ChapterEmbeddingHandler(embedder),
    )


async def embed_all(store: Store, conn: asyncpg.Connection, handlers: dict[str, Any]) -> None:
    """Run the embedding jobs queued so far until none is left waiting."""
    async with running(store, handlers, job_types=["chapter_embedding"]):
        await wait_until(
            lambda: conn.fetchval(
                "select count(*) = 0 from job_queue where job_type = 'chapter_embedding'"
                " and status in ('pending', 'processing')"
            ),
            timeout=60,
        )


async def story_of_four(conn: asyncpg.Connection) -> tuple[str, str]:
    """Chapters 1-4 written; the fact is in chapter 1, followed by 3,000+ characters."""
    user = await create_user(conn)
    story = await create_story(conn, user, title="The Western Light", premise="A keeper.")
    await write_chapter(conn, story, user, 1, FACT + "\n\n" + filler(1, 12))
    for n in (2, 3, 4):
        await write_chapter(conn, story, user, n, filler(n, 8))
    return user, story


async def generate_chapter(
    store: Store,
    conn: asyncpg.Connection,
    handlers: dict[str, Any],
    user: str,
    story: str,
    number: int,
) -> tuple[str, str]:
    chapter = await create_chapter(conn, story, user, number)
    async with as_role(conn, "authenticated", user):
        job = str(
            await conn.fetchval(
                "select enqueue_chapter_generation($1, $2)", chapter, json.dumps(OPTIONS)
            )
        )
    async with running(store, handlers, job_types=["chapter_generation"]):
        await wait_until(
            lambda: conn.fetchval(
                "select status in ('completed', 'failed') from job_queue where id = $1", job
            ),
            timeout=60,
        )
    assert await conn.fetchval("select status from job_queue where id = $1", job) == "completed"
    return chapter, job


def section_prompts(fake: FakeGemini) -> list[str]:
    return [r.prompt for r in fake.requests if r.action == "streamGenerateContent"]


def outline(title: str, *bullets: str) -> Any:
    return ok(json.dumps({"title": title, "bullets": list(bullets)}))


def head(prompt: str) -> str:
    """The part of a section prompt before anything that changes from section to section."""
    ends = [prompt.find(m) for m in (NOTES_OPEN, "The chapter so far ends with", "Write section")]
    return prompt[: min(e for e in ends if e >= 0)]


def notes_of(prompt: str) -> str:
    if NOTES_OPEN not in prompt:
        return ""
    return prompt[prompt.index(NOTES_OPEN) : prompt.index(NOTES_CLOSE) + len(NOTES_CLOSE)]


async def test_a_fact_from_chapter_one_reaches_a_section_of_chapter_five(
    conn, store, model, embedder, fake_gemini
) -> None:
    await require_memory(conn)
    handlers = worker_handlers(model, embedder)
    user, story = await story_of_four(conn)
    await embed_all(store, conn, handlers)
    assert await conn.fetchval("select count(distinct chapter_number) from story_passages") == 4

    fake_gemini.reset()
    fake_gemini.script(
        outline(
            "The Chapel",
            "Nadia searches the chapel for the brass astrolabe",
            "Zoltan juggles oranges for coins at the fair",
            "Quince pastries cool on the sill",
        )
    )
    _chapter, job = await generate_chapter(store, conn, handlers, user, story, 5)

    first, second, third = section_prompts(fake_gemini)
    notes = notes_of(first)
    assert "Idris Marrow hid the brass astrolabe" in notes
    assert "[Chapter 1]" in notes
    # The tail alone would not carry it: outside the notes, the prompt does not have it,
    # though it does carry the tails of chapters 1 to 4.
    without_notes = first.replace(notes, "")
    assert "Idris" not in without_notes and "astrolabe" in without_notes  # the plan's bullet
    assert all(f"Chapter {n}: Chapter {n}" in without_notes for n in (1, 2, 3, 4))
    # Stable head first, the part that changes per section last.
    assert first.index("Chapter plan:") < first.index(NOTES_OPEN) < first.index("Write section 1")
    assert head(first) == head(second) == head(third) and "Chapter plan:" in head(first)
    # Sections with nothing related get nothing.
    assert NOTES_OPEN not in second and NOTES_OPEN not in third
    # Each section embedded its query as a query.
    queries = [r.body["requests"][0] for r in fake_gemini.embed_requests]
    assert [q["taskType"] for q in queries] == ["RETRIEVAL_QUERY"] * 3
    assert queries[0]["content"]["parts"][0]["text"].startswith(
        "Nadia searches the chapel for the brass astrolabe\nThe Chapel"
    )
    result = json.loads(await conn.fetchval("select job_result from job_queue where id = $1", job))
    assert result["memory_passages"] >= 1 and 0 < result["memory_tokens"] <= 3 * 600


async def test_nothing_relevant_adds_nothing(conn, store, model, embedder, fake_gemini) -> None:
    await require_memory(conn)
    handlers = worker_handlers(model, embedder)
    user, story = await story_of_four(conn)
    await embed_all(store, conn, handlers)
    fake_gemini.reset()
    fake_gemini.script(
        outline(
            "Elsewhere Entirely",
            "Nadia boards the midnight train to Vienna",
            "Zoltan juggles oranges for coins at the fair",
            "Quince pastries cool on the sill",
        )
    )
    _chapter, job = await generate_chapter(store, conn, handlers, user, story, 5)
    prompts = section_prompts(fake_gemini)
    assert len(prompts) == 3 and not any(NOTES_OPEN in p for p in prompts)
    assert len(fake_gemini.embed_requests) == 3  # it looked, and found nothing close enough
    result = json.loads(await conn.fetchval("select job_result from job_queue where id = $1", job))
    assert (result["memory_passages"], result["memory_tokens"]) == (0, 0)


async def test_the_outline_shares_the_sections_head_when_memory_cuts_the_context(
    conn, store, model, embedder, fake_gemini
) -> None:
    """Memory's notes take their budget from the story context once per chapter, so the
    outline call begins with the same story head as every section (prefix caching)."""
    await require_memory(conn)
    tight = replace(CONFIG, context_max_tokens=MEMORY.max_tokens + 300)
    handlers = build_handlers(
        ChapterHandler(model, tight, StoryMemory(embedder, MEMORY)),
        ChapterEmbeddingHandler(embedder),
    )
    user, story = await story_of_four(conn)
    await embed_all(store, conn, handlers)
    fake_gemini.reset()
    fake_gemini.script(outline("The Chapel", "Nadia searches the chapel", "Quince pastries"))
    await generate_chapter(store, conn, handlers, user, story, 5)
    [plan] = [r.prompt for r in fake_gemini.requests if r.action == "generateContent"]
    sections = section_prompts(fake_gemini)
    story_head = plan.split("Plan chapter 5")[0]
    assert len(sections) == 2 and "Earlier chapters" in story_head
    assert all(p.split("Chapter title:")[0] == story_head for p in sections)


async def test_first_chapters_are_written_exactly_as_without_memory(
    conn, store, model, embedder, fake_gemini
) -> None:
    """No passages yet: no embedding call and the very prompts of a worker without memory."""
    await require_memory(conn)
    user = await create_user(conn)
    story = await create_story(conn, user)
    fake_gemini.script(outline("One", "A", "B", "C"))
    await generate_chapter(store, conn, worker_handlers(model, embedder), user, story, 1)
    with_memory = section_prompts(fake_gemini)
    assert fake_gemini.embed_requests == []

    other = await create_story(conn, user)
    fake_gemini.reset()
    fake_gemini.script(outline("One", "A", "B", "C"))
    plain = build_handlers(ChapterHandler(model, CONFIG))
    await generate_chapter(store, conn, plain, user, other, 1)
    assert section_prompts(fake_gemini) == with_memory


async def test_embedding_retries_429_and_5xx_and_never_touches_the_chapter(
    conn, store, embedder, fake_gemini
) -> None:
    await require_memory(conn)
    user = await create_user(conn)
    story = await create_story(conn, user)
    chapter, _ = await write_chapter(conn, story, user, 1, FACT + "\n\n" + filler(7, 3))
    [job] = await embedding_jobs(conn, chapter)
    fake_gemini.script(http_error(429, retry_delay="0.2s"), http_error(503))
    handlers = build_handlers(None, ChapterEmbeddingHandler(embedder))
    async with running(store, handlers, job_types=["chapter_embedding"]):
        await wait_until(
            lambda: conn.fetchval(
                "select status = 'completed' from job_queue where id = $1", job["id"]
            ),
            timeout=60,
        )
    row = await conn.fetchrow("select * from job_queue where id = $1", job["id"])
    assert row["retry_count"] == 2
    events = await conn.fetch(
        "select details -> 'error' ->> 'type' as type from job_events"
        " where job_id = $1 and details ? 'error' order by id",
        job["id"],
    )
    errors = [e["type"] for e in events]
    assert errors == ["rate_limited", "model_unavailable"]
    result = json.loads(row["job_result"])
    assert result["status"] == "stored" and result["passages"] == 4
    assert len(fake_gemini.embed_requests) == 3
    chapter_row = await conn.fetchrow("select * from chapters where id = $1", chapter)
    assert (chapter_row["status"], chapter_row["error_message"]) == ("completed", None)


async def test_a_rejected_embedding_fails_its_job_not_the_chapter(
    conn, store, embedder, fake_gemini
) -> None:
    await require_memory(conn)
    user = await create_user(conn)
    story = await create_story(conn, user)
    chapter, _ = await write_chapter(conn, story, user, 1, filler(3, 2))
    [job] = await embedding_jobs(conn, chapter)
    fake_gemini.script(http_error(400, message="API key not valid. Please pass a valid API key."))
    handlers = build_handlers(None, ChapterEmbeddingHandler(embedder))
    async with running(store, handlers, job_types=["chapter_embedding"]):
        await wait_until(
            lambda: conn.fetchval(
                "select status = 'failed' from job_queue where id = $1", job["id"]
            ),
            timeout=60,
        )
    details = json.loads(
        await conn.fetchval("select error_details from job_queue where id = $1", job["id"])
    )
    assert details["type"] == "model_request_rejected" and not details["will_retry"]
    assert "story memory" in details["user_message"].lower()
    chapter_row = await conn.fetchrow("select * from chapters where id = $1", chapter)
    assert (chapter_row["status"], chapter_row["error_message"]) == ("completed", None)
    assert await conn.fetchval("select count(*) from story_passages") == 0


async def test_a_worker_that_loses_the_lease_mid_embedding_writes_nothing(
    conn, store, embedder, fake_gemini
) -> None:
    await require_memory(conn)
    user = await create_user(conn)
    story = await create_story(conn, user)
    chapter, _ = await write_chapter(conn, story, user, 1, filler(5, 3))
    [job] = await embedding_jobs(conn, chapter)
    fake_gemini.script(stall_after(0, 3.0))
    handlers = build_handlers(None, ChapterEmbeddingHandler(embedder))
    async with running(store, handlers, job_types=["chapter_embedding"]) as runner:
        await wait_until(lambda: fake_gemini.in_flight == 1, timeout=60)
        # Another worker rescued the job while this one waited on Gemini.
        await conn.execute(
            "update job_queue set worker_id = 'rescuer', heartbeat_at = now() where id = $1",
            job["id"],
        )
        await wait_until(
            lambda: runner.metrics.registry.get_sample_value(
                "genworker_leases_lost_total", {"job_type": "chapter_embedding"}
            ),
            timeout=60,
        )
        assert await fake_gemini.wait_idle(30)
    row = await conn.fetchrow("select status, worker_id from job_queue where id = $1", job["id"])
    assert (row["status"], row["worker_id"]) == ("processing", "rescuer")
    assert await conn.fetchval("select count(*) from story_passages") == 0


async def test_a_regenerated_chapter_replaces_its_passages(
    conn, store, model, embedder, fake_gemini
) -> None:
    await require_memory(conn)
    handlers = worker_handlers(model, embedder)
    user = await create_user(conn)
    story = await create_story(conn, user)
    chapter, _ = await write_chapter(conn, story, user, 1, FACT + "\n\n" + filler(9, 4))
    await embed_all(store, conn, handlers)
    assert await conn.fetchval("select count(*) from story_passages where content = $1", FACT) == 1

    fake_gemini.script(outline("Again", "A new beginning", "A new middle", "A new end"))
    async with as_role(conn, "authenticated", user):
        job = await conn.fetchval(
            "select enqueue_chapter_generation($1, $2)", chapter, json.dumps(OPTIONS)
        )
    assert await conn.fetchval("select count(*) from story_passages") == 0  # old text gone
    async with running(store, handlers):
        await wait_until(
            lambda: conn.fetchval(
                "select count(*) = 1 from job_queue where job_type = 'chapter_embedding'"
                " and status = 'completed' and job_payload ->> 'chapter_id' = $1"
                " and completed_at > (select completed_at from job_queue where id = $2)",
                chapter,
                job,
            ),
            timeout=60,
        )
    content = await conn.fetchval("select content from chapters where id = $1", chapter)
    stored = await conn.fetch(
        "select start_offset, end_offset, content from story_passages where chapter_id = $1"
        " order by ordinal",
        chapter,
    )
    assert [(r["start_offset"], r["end_offset"], r["content"]) for r in stored] == [
        (p.start, p.end, p.text) for p in split_passages(content)
    ]
    assert FACT not in content


async def test_the_worker_runs_unchanged_on_a_database_without_pgvector(
    pg_server: PgTestServer, model, embedder, fake_gemini
) -> None:
    """The migration skipped story memory (as where pgvector is absent): chapters are
    written as before, with no embedding call and no embedding job."""
    dsn = await pg_server.create_empty_database()
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute("set genworker.story_memory = 'off'")
        await apply_bootstrap(conn)
        await apply_migrations(conn)
        await conn.execute("reset genworker.story_memory")
        assert await conn.fetchval("select to_regclass('public.story_passages')") is None
        user = await create_user(conn)
        story = await create_story(conn, user)
        await write_chapter(conn, story, user, 1, FACT + "\n\n" + filler(1, 12))
        store = await Store(PostgresTransport(dsn)).open()
        try:
            fake_gemini.script(
                outline("The Chapel", "Nadia searches the chapel for the brass astrolabe", "B")
            )
            _chapter, job = await generate_chapter(
                store, conn, worker_handlers(model, embedder), user, story, 2
            )
        finally:
            await store.close()
        assert fake_gemini.embed_requests == []
        assert not any(NOTES_OPEN in p for p in section_prompts(fake_gemini))
        result = json.loads(
            await conn.fetchval("select job_result from job_queue where id = $1", job)
        )
        assert "memory_passages" not in result
        assert (
            await conn.fetchval(
                "select count(*) from job_queue where job_type = 'chapter_embedding'"
            )
            == 0
        )
    finally:
        await conn.close()
        await pg_server.drop_database(dsn)
