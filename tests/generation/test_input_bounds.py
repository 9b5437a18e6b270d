"""Issue 8, findings 2 and 6: a megabyte of one user's text reaches neither the model nor the logs.

Both rows are "legacy": written past the database's limits (the payload trigger and the
stories check constraint are switched off as superuser), as rows stored before those
limits existed would be. The worker's own caps are what is under test.
"""

from __future__ import annotations

import json
import re

import asyncpg
import pytest

from tests.generation.test_chapter import CONFIG, generate
from tests.support.fake_gemini import FakeGemini
from tests.support.seed import as_role, chapter_job, create_chapter, create_story, create_user
from worker.generation.gemini import GeminiModel
from worker.store import Store

MB = 1_048_576
LINE_LIMIT = 20_000
# What a message or a log line may quote of one user value (payload.shown keeps 60
# characters, a log field 1,000): far below the value itself.
QUOTE_LIMIT = 1_000


def longest_run(text: str, char: str) -> int:
    return max((len(m) for m in re.findall(f"{re.escape(char)}+", text)), default=0)


async def test_a_megabyte_target_words_fails_as_bad_payload_and_is_never_echoed(
    conn: asyncpg.Connection,
    store: Store,
    model: GeminiModel,
    fake_gemini: FakeGemini,
    json_logs: pytest.CaptureFixture[str],
) -> None:
    _, chapter, job = await chapter_job(conn)
    huge = "8" * MB  # a number as a string, a megabyte long
    async with conn.transaction():
        await conn.execute("alter table job_queue disable trigger job_queue_check_payload")
        await conn.execute(
            "update job_queue set job_payload = jsonb_set(job_payload, '{options}',"
            " jsonb_build_object('target_words', $1::text)) where id = $2",
            huge,
            job,
        )
        await conn.execute("alter table job_queue enable trigger job_queue_check_payload")
    assert await conn.fetchval(
        "select octet_length(job_payload::text) > $1 from job_queue where id = $2", MB, job
    )
    await generate(store, model, conn, job, until="status = 'failed'")

    row = await conn.fetchrow("select retry_count, error_details from job_queue where id = $1", job)
    details = json.loads(row["error_details"])
    assert row["retry_count"] == 0
    assert details["type"] == "bad_payload" and details["will_retry"] is False
    assert "options.target_words must be a whole number" in details["message"]
    assert 0 < longest_run(details["message"], "8") <= QUOTE_LIMIT
    assert len(json.dumps(details)) <= 4_000
    error_message = await conn.fetchval("select error_message from chapters where id = $1", chapter)
    assert error_message and longest_run(error_message, "8") <= QUOTE_LIMIT
    assert fake_gemini.requests == []  # refused before any model call

    lines = json_logs.readouterr().out.splitlines()
    assert any(f'"job_id": "{job}"' in line and "bad_payload" in line for line in lines)
    for line in lines:
        assert len(line) <= LINE_LIMIT
        assert longest_run(line, "8") <= QUOTE_LIMIT


async def test_megabyte_story_preferences_do_not_reach_the_model(
    conn: asyncpg.Connection, store: Store, model: GeminiModel, fake_gemini: FakeGemini
) -> None:
    """The issue measured ~1.1 million characters in every Gemini request from one genre."""
    await conn.execute("alter table stories drop constraint stories_preferences_bounded")
    user = await create_user(conn)
    huge = {
        "genre": "G" * 1_100_000,
        "tone": "T" * 200_000,
        "pov": "P" * 200_000,
        "tense": "S" * 200_000,
        "audience": "A" * 200_000,
    }
    story = await create_story(conn, user, preferences=huge)
    chapter = await create_chapter(conn, story, user)
    async with as_role(conn, "authenticated", user):
        job = str(
            await conn.fetchval(
                "select enqueue_chapter_generation($1, $2)",
                chapter,
                json.dumps({"sections": 3, "target_words": 600}),
            )
        )
    await generate(store, model, conn, job, config=CONFIG)

    assert await conn.fetchval("select status from chapters where id = $1", chapter) == (
        "completed"
    )
    requests = fake_gemini.requests
    assert len(requests) == 4  # the outline and three sections
    for request in requests:
        size = len(json.dumps(request.body))
        assert size < 6_000, size
        prompt = request.prompt
        # Each preference is used, within the job option's cap (genre 100, pov 60, tense 20).
        assert f"Genre: {'G' * 100}\n" in prompt and "G" * 101 not in prompt
        assert "T" * 101 not in prompt and "A" * 101 not in prompt
        assert "P" * 61 not in prompt and "S" * 21 not in prompt
