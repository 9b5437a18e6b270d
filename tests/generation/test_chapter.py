"""The chapter pipeline end to end: real SDK → fake Gemini, real runner → real Postgres."""

from __future__ import annotations

import asyncio
import itertools
import json
from typing import Any

import asyncpg
import pytest

from tests.runtime.conftest import running, wait_until
from tests.support.database import PgTestServer
from tests.support.fake_gemini import (
    FakeGemini,
    blocked_prompt,
    disconnect_after,
    http_error,
    malformed_json,
    max_tokens,
    midstream_error,
    ok,
    safety,
    stall_after,
    truncate_after,
)
from tests.support.seed import as_role, chapter_job, install_progress_log
from tests.support.stores import open_store
from worker.generation.chapter import ChapterHandler, GenerationConfig
from worker.generation.gemini import GeminiModel
from worker.handlers import build_handlers
from worker.store import Store
from worker.store.postgres import PostgresTransport

MODEL = "gemini-test"
CONFIG = GenerationConfig(
    default_model=MODEL,
    allowed_models=[MODEL],
    flush_interval_s=0.05,
    flush_chars=300,
    section_retries=2,
    retry_pause_s=0.01,
    max_rate_limit_wait_s=5,
)
OPTIONS = {"sections": 3, "target_words": 600}
RETRIED = "status = 'pending' and retry_count = 1"


async def generate(
    store: Store,
    model: GeminiModel,
    conn: asyncpg.Connection,
    job: str,
    *,
    config: GenerationConfig = CONFIG,
    until: str = "status = 'completed'",
    **runner_opts: Any,
) -> None:
    handlers = build_handlers(ChapterHandler(model, config))
    async with running(store, handlers, **runner_opts):
        await wait_until(
            lambda: conn.fetchval(f"select {until} from job_queue where id = $1", job), timeout=60
        )


def section_texts(fake: FakeGemini) -> list[str]:
    """What the fake streamed for each successful section request, in order."""
    return [
        fake.expected_text(r.prompt) for r in fake.requests if "streamGenerateContent" in r.path
    ]


async def chapter_row(conn: asyncpg.Connection, chapter: str) -> asyncpg.Record:
    return await conn.fetchrow("select * from chapters where id = $1", chapter)


async def test_happy_path_text_progress_and_writes(conn, store, model, fake_gemini) -> None:
    await install_progress_log(conn)
    _, chapter, job = await chapter_job(conn, options=OPTIONS, number=2)
    await generate(store, model, conn, job)

    row = await chapter_row(conn, chapter)
    sections = section_texts(fake_gemini)
    assert len(sections) == 3
    assert row["content"] == "\n\n".join(sections)
    assert row["status"] == "completed" and row["progress"] == 100
    assert row["word_count"] == len(row["content"].split())
    outline = json.loads(row["outline"])
    assert len(outline["bullets"]) == 3 and row["title"] == outline["title"]
    assert json.loads(row["generation_state"])["sections_done"] == 3

    log = await conn.fetch(
        "select * from test_progress_log where chapter_id = $1 order by id", chapter
    )
    progress = [r["progress"] for r in log]
    assert progress == sorted(progress) and progress[-1] == 100
    assert 10 in progress and max(p for p in progress if p < 100) == 95
    steps = [r["current_step"] for r in log]
    assert any(s.startswith("section 2/3: ") for s in steps)
    # Buffered: far fewer appends than streamed chunks, each one row of chapter_chunks;
    # the chapters row gets the text once, when the chapter finishes.
    appends = await conn.fetchval(
        "select count(*) from chapter_chunks where chapter_id = $1", chapter
    )
    chunks = sum(len(t) // fake_gemini.chunk_chars + 1 for t in sections)
    assert 3 <= appends < chunks
    lengths = [r["content_length"] for r in log]
    assert set(lengths) == {0, len(row["content"])} and lengths[-1] == len(row["content"])
    assert sum(1 for a, b in itertools.pairwise(lengths) if a != b) == 1

    result = json.loads(await conn.fetchval("select job_result from job_queue where id = $1", job))
    assert result["chapter_id"] == chapter and result["sections"] == 3
    assert result["words"] == row["word_count"] and result["model"] == MODEL
    assert result["output_tokens"] > 0 and result["prompt_tokens"] > 0
    # Previous chapter's tail reached the prompt: the context is built from the story.
    assert "The end of chapter 1." in fake_gemini.requests[0].prompt


async def test_chapter_through_the_rest_adapter(db_dsn, conn, model, fake_gemini) -> None:
    """The same pipeline over supabase-py and the PostgREST gateway: identical text."""
    _, chapter, job = await chapter_job(conn, options=OPTIONS)
    async with open_store("supabase", db_dsn) as rest:
        await generate(rest, model, conn, job)
    row = await chapter_row(conn, chapter)
    assert row["status"] == "completed"
    assert row["content"] == "\n\n".join(section_texts(fake_gemini))
    gateway = rest.gateway  # type: ignore[attr-defined]
    assert gateway.count("rpc/append_chapter_content") >= 3
    assert gateway.count("rpc/complete_job") == 1


@pytest.mark.parametrize(
    "fault",
    [
        http_error(503),
        disconnect_after(2),
        stall_after(2, 120.0),
        truncate_after(2),
        midstream_error(2),
    ],
    ids=["503", "disconnect", "stall", "truncated", "midstream-error"],
)
async def test_transient_stream_faults_retry_the_section_without_duplicates(
    conn, store, model, fake_gemini, fault
) -> None:
    _, chapter, job = await chapter_job(conn, options=OPTIONS)
    fake_gemini.script(ok(), ok(), fault)  # outline, section 1, then section 2 breaks
    await generate(store, model, conn, job)
    row = await chapter_row(conn, chapter)
    streamed = section_texts(fake_gemini)
    assert len(streamed) == 4  # section 2 was requested twice
    assert streamed[1] == streamed[2]  # same prompt: the retry starts the section afresh
    assert row["content"] == "\n\n".join([streamed[0], streamed[2], streamed[3]])
    assert await conn.fetchval("select retry_count from job_queue where id = $1", job) == 0
    assert fake_gemini.open_streams == 0


async def test_429_waits_for_retry_info_delay(conn, store, model, fake_gemini) -> None:
    _, chapter, job = await chapter_job(conn, options=OPTIONS)
    fake_gemini.script(ok(), http_error(429, retry_delay="0.4s"))
    await generate(store, model, conn, job)
    stream_reqs = [r for r in fake_gemini.requests if "streamGenerateContent" in r.path]
    gap = stream_reqs[1].started_at - stream_reqs[0].started_at
    assert gap >= 0.4
    assert (await chapter_row(conn, chapter))["status"] == "completed"


async def test_long_rate_limit_fails_the_job_as_retryable(conn, store, model, fake_gemini) -> None:
    _, chapter, job = await chapter_job(conn, options=OPTIONS)
    fake_gemini.script(http_error(429, retry_delay="3600s"))
    await generate(store, model, conn, job, until=RETRIED)
    details = json.loads(
        await conn.fetchval("select error_details from job_queue where id = $1", job)
    )
    assert details["type"] == "rate_limited" and details["retryable"] is True
    assert details["retry_in_s"] >= 3600
    row = await chapter_row(conn, chapter)
    assert row["status"] == "queued" and row["current_step"].startswith("retrying")


async def test_persistent_outage_fails_retryable_after_section_retries(
    conn, store, model, fake_gemini
) -> None:
    _, chapter, job = await chapter_job(conn, options=OPTIONS)
    fake_gemini.script(ok(), ok(), *[http_error(503)] * 3)
    await generate(store, model, conn, job, until=RETRIED)
    job_row = await conn.fetchrow("select * from job_queue where id = $1", job)
    assert job_row["retry_count"] == 1
    assert json.loads(job_row["error_details"])["type"] == "model_unavailable"
    state = json.loads((await chapter_row(conn, chapter))["generation_state"])
    assert state["sections_done"] == 1  # the checkpoint survives for the retry


@pytest.mark.parametrize(
    "fault,kind",
    [
        (safety(2), "safety_block"),
        (safety(1, "RECITATION"), "recitation"),
    ],
    ids=["safety", "recitation"],
)
async def test_safety_endings_fail_permanently_with_a_readable_message(
    conn, store, model, fake_gemini, fault, kind
) -> None:
    _, chapter, job = await chapter_job(conn, options=OPTIONS)
    fake_gemini.script(ok(), fault)
    await generate(store, model, conn, job, until="status = 'failed'")
    job_row = await conn.fetchrow("select * from job_queue where id = $1", job)
    details = json.loads(job_row["error_details"])
    assert details["type"] == kind and details["retryable"] is False
    assert job_row["retry_count"] == 0
    row = await chapter_row(conn, chapter)
    assert row["status"] == "failed" and "Try changing the premise" in row["error_message"]
    assert "test-key-123" not in json.dumps(details)


async def test_blocked_prompt_fails_permanently(conn, store, model, fake_gemini) -> None:
    _, chapter, job = await chapter_job(conn, options=OPTIONS)
    fake_gemini.script(blocked_prompt())
    await generate(store, model, conn, job, until="status = 'failed'")
    assert (await chapter_row(conn, chapter))["error_message"]
    details = json.loads(
        await conn.fetchval("select error_details from job_queue where id = $1", job)
    )
    assert details["type"] == "safety_block"


async def test_max_tokens_closes_the_section_and_goes_on(conn, store, model, fake_gemini) -> None:
    _, chapter, job = await chapter_job(conn, options=OPTIONS)
    fake_gemini.script(ok(), max_tokens(2))
    await generate(store, model, conn, job)
    row = await chapter_row(conn, chapter)
    assert row["status"] == "completed"
    assert len(section_texts(fake_gemini)) == 3


async def test_malformed_outline_is_retried(conn, store, model, fake_gemini) -> None:
    _, chapter, job = await chapter_job(conn, options=OPTIONS)
    fake_gemini.script(malformed_json())
    await generate(store, model, conn, job)
    assert (await chapter_row(conn, chapter))["status"] == "completed"
    outline_calls = [r for r in fake_gemini.requests if r.path.endswith(":generateContent")]
    assert len(outline_calls) == 2


@pytest.mark.parametrize(
    "payload_options,needle",
    [
        ({"sections": 40}, "options.sections"),
        ({"target_words": 50}, "options.target_words"),
        ({"model": "gpt-5"}, "not allowed"),
        ({"tense": "future"}, "options.tense"),
        ({"instructions": "x" * 2500}, "at most 2000"),
        ({"colour": "blue"}, "unknown option"),
    ],
    ids=["sections", "words", "model", "tense", "instructions", "unknown"],
)
async def test_bad_payload_fails_before_any_model_call(
    conn, store, model, fake_gemini, payload_options, needle
) -> None:
    # The enqueue RPC rejects these at the door (tests/sql/test_input_limits.py); the
    # worker still validates a payload that reached the queue another way.
    _, chapter, job = await chapter_job(conn)
    await conn.execute(
        "update job_queue set job_payload = jsonb_set(job_payload, '{options}', $1::jsonb)"
        " where id = $2",
        json.dumps(payload_options),
        job,
    )
    await generate(store, model, conn, job, until="status = 'failed'")
    details = json.loads(
        await conn.fetchval("select error_details from job_queue where id = $1", job)
    )
    assert details["type"] == "bad_payload" and needle in details["message"]
    assert needle in (await chapter_row(conn, chapter))["error_message"]
    assert fake_gemini.requests == []


async def test_cancel_stops_the_stream_and_keeps_text(conn, store, model, fake_gemini) -> None:
    user, chapter, job = await chapter_job(conn, options=OPTIONS)
    fake_gemini.default = ok(delay_s=0.1, chunk_chars=20)
    handlers = build_handlers(ChapterHandler(model, CONFIG))
    async with running(store, handlers, heartbeat_interval_s=0.2) as runner:
        await wait_until(lambda: conn.fetchval("select genworker_chunks_length($1) > 100", chapter))
        async with as_role(conn, "authenticated", user):
            assert await conn.fetchval("select cancel_job($1)", job)
        await wait_until(lambda: not runner.in_flight, timeout=60)
        requests_then = len(fake_gemini.requests)
        kept = (await chapter_row(conn, chapter))["content"]
        await asyncio.sleep(0.4)
        assert await fake_gemini.wait_idle()
    assert fake_gemini.open_streams == 0 and len(fake_gemini.requests) == requests_then
    row = await chapter_row(conn, chapter)
    assert row["status"] == "cancelled" and row["content"] == kept and len(kept) > 100


async def run_uninterrupted(pg_server: PgTestServer, model: GeminiModel) -> str:
    """The same chapter in a second database, never interrupted: the reference text."""
    dsn = await pg_server.create_database()
    conn = await asyncpg.connect(dsn)
    store = await Store(PostgresTransport(dsn)).open()
    try:
        _, chapter, job = await chapter_job(conn, options=OPTIONS)
        await generate(store, model, conn, job)
        return (await chapter_row(conn, chapter))["content"]
    finally:
        await store.close()
        await conn.close()
        await pg_server.drop_database(dsn)


async def test_pause_and_resume_continue_at_the_next_section(
    conn, store, model, fake_gemini, pg_server
) -> None:
    reference = await run_uninterrupted(pg_server, model)
    fake_gemini.reset()
    user, chapter, job = await chapter_job(conn, options=OPTIONS)
    fake_gemini.default = ok(delay_s=0.05, chunk_chars=20)
    handlers = build_handlers(ChapterHandler(model, CONFIG))
    async with running(store, handlers, heartbeat_interval_s=0.2) as runner:
        await wait_until(
            lambda: conn.fetchval(
                "select (generation_state->>'sections_done')::int = 1 and status = 'generating'"
                " and genworker_chunks_length(id) > (generation_state->>'content_length')::int + 40"
                " from chapters where id = $1",
                chapter,
            )
        )
        async with as_role(conn, "authenticated", user):
            assert await conn.fetchval("select pause_job($1)", job)
        await wait_until(lambda: not runner.in_flight, timeout=60)
        paused = await chapter_row(conn, chapter)
        assert paused["status"] == "paused"
        async with as_role(conn, "authenticated", user):
            assert await conn.fetchval("select resume_job($1)", job)
        await wait_until(
            lambda: conn.fetchval("select status = 'completed' from job_queue where id = $1", job),
            timeout=60,
        )
    row = await chapter_row(conn, chapter)
    assert row["content"] == reference
    assert await conn.fetchval("select retry_count from job_queue where id = $1", job) == 0
    outline_calls = [r for r in fake_gemini.requests if r.path.endswith(":generateContent")]
    assert len(outline_calls) == 1  # the outline was not bought twice


async def test_kill_and_rescue_mid_section_gives_the_same_text(
    conn, store, model, fake_gemini, pg_server
) -> None:
    reference = await run_uninterrupted(pg_server, model)
    fake_gemini.reset()
    _, chapter, job = await chapter_job(conn, options=OPTIONS, lease_timeout_s=1)
    fake_gemini.default = ok(delay_s=0.05, chunk_chars=20)
    handlers = build_handlers(ChapterHandler(model, CONFIG))
    async with running(store, handlers, worker_id="doomed", heartbeat_interval_s=0.2) as doomed:
        await wait_until(
            lambda: conn.fetchval(
                "select (generation_state->>'sections_done')::int = 1"
                " and genworker_chunks_length(id) > (generation_state->>'content_length')::int + 40"
                " from chapters where id = $1",
                chapter,
            )
        )
        # "kill -9": the task dies without a word to the database.
        for entry in doomed.in_flight.values():
            entry.stop_reason = "killed"
            entry.task.cancel()
        await wait_until(lambda: not doomed.in_flight, timeout=60)
    assert await conn.fetchval("select status from job_queue where id = $1", job) == "processing"
    await generate(store, model, conn, job, worker_id="rescuer")
    row = await chapter_row(conn, chapter)
    assert row["content"] == reference
    job_row = await conn.fetchrow("select * from job_queue where id = $1", job)
    assert job_row["retry_count"] == 1 and job_row["worker_id"] == "rescuer"
    assert json.loads(job_row["job_result"])["resumed_at_section"] == 1
