"""The worker's fenced, offset-idempotent chapter writes."""

from __future__ import annotations

import json

import asyncpg
import pytest

from tests.support.seed import claim, create_user, fail


async def append(conn, job, offset, text, progress=20, step="section 1/2: x", checkpoint=None):
    return await conn.fetchval(
        "select append_chapter_content($1, 'w', $2, $3, $4, $5, $6)",
        job,
        offset,
        text,
        progress,
        step,
        json.dumps(checkpoint) if checkpoint else None,
    )


async def test_start_returns_context(conn, running) -> None:
    ctx = json.loads(
        await conn.fetchval("select start_chapter_generation($1, 'w', 10)", running["job"])
    )
    assert ctx["chapter"]["id"] == running["chapter"] and ctx["chapter"]["number"] == 2
    assert ctx["story"]["title"] == "Tides"
    assert ctx["previous"] == [{"number": 1, "title": "One", "tail": "xxxxxxxEND"}]
    assert (
        await conn.fetchval("select status from chapters where id = $1", running["chapter"])
        == "generating"
    )


async def test_start_rechecks_ownership(conn, running) -> None:
    other = await create_user(conn)
    await conn.execute("update job_queue set user_id = $1 where id = $2", other, running["job"])
    with pytest.raises(asyncpg.PostgresError) as err:
        await conn.fetchval("select start_chapter_generation($1, 'w')", running["job"])
    assert err.value.sqlstate == "PT403"


async def test_append_is_idempotent_by_offset(conn, running) -> None:
    job = running["job"]
    assert await append(conn, job, 0, "Once upon") is True
    assert await append(conn, job, 9, " a time", progress=30) is True
    assert await append(conn, job, 9, " a time", progress=30) is True  # a retried request
    row = await conn.fetchrow(
        "select content, progress, current_step from get_chapter_text($1)", running["chapter"]
    )
    assert row["content"] == "Once upon a time" and row["progress"] == 30
    assert row["current_step"] == "section 1/2: x"
    with pytest.raises(asyncpg.PostgresError) as err:
        await append(conn, job, 3, "zzz")
    assert err.value.sqlstate == "PT409" and "offset mismatch" in str(err.value)
    with pytest.raises(asyncpg.PostgresError):
        await append(conn, job, 99, "zzz")
    assert (
        await conn.fetchval("select content from get_chapter_text($1)", running["chapter"])
        == "Once upon a time"
    )


async def test_progress_never_goes_backwards(conn, running) -> None:
    await append(conn, running["job"], 0, "a", progress=40)
    await append(conn, running["job"], 1, "b", progress=35)
    assert (
        await conn.fetchval("select progress from chapters where id = $1", running["chapter"]) == 40
    )
    assert await conn.fetchval("select progress from job_queue where id = $1", running["job"]) == 40


async def test_resume_cuts_partial_section_back_to_checkpoint(conn, running) -> None:
    job = running["job"]
    await conn.fetchval(
        "select save_chapter_outline($1, 'w', 'Tide Two', $2)",
        job,
        json.dumps({"title": "Tide Two", "bullets": ["a", "b"]}),
    )
    await append(
        conn, job, 0, "Section one.", checkpoint={"sections_done": 1, "content_length": 12}
    )
    await append(conn, job, 12, "\n\nHalf of sec")
    # The worker dies; the job is released and claimed again.
    assert await conn.fetchval("select release_job($1, 'w')", job)
    await claim(conn, "w")
    ctx = json.loads(await conn.fetchval("select start_chapter_generation($1, 'w')", job))
    assert ctx["chapter"]["content_length"] == 12
    assert ctx["chapter"]["generation_state"]["sections_done"] == 1
    assert ctx["chapter"]["outline"]["bullets"] == ["a", "b"]
    ch = await conn.fetchrow(
        "select content, title from chapters where id = $1", running["chapter"]
    )
    assert ch["content"] == "Section one." and ch["title"] == "Tide Two"


async def test_rewind_and_finish(conn, running) -> None:
    job = running["job"]
    await append(conn, job, 0, "One two three")
    assert await conn.fetchval("select rewind_chapter_content($1, 'w', 7)", job) is True
    with pytest.raises(asyncpg.PostgresError):
        await conn.fetchval("select rewind_chapter_content($1, 'w', 99)", job)
    await append(conn, job, 7, " four five")
    assert await conn.fetchval("select finish_chapter($1, 'w')", job) == 4
    ch = await conn.fetchrow("select * from chapters where id = $1", running["chapter"])
    assert ch["content"] == "One two four five" and ch["word_count"] == 4
    assert ch["status"] == "completed" and ch["progress"] == 100


async def test_failure_update_marks_chapter_failed(conn, running) -> None:
    details = {"type": "safety_block", "user_message": "Blocked by safety filters."}
    assert await fail(conn, running["job"], "w", "failed", None, None, json.dumps(details)) == 1
    ch = await conn.fetchrow(
        "select status, error_message from chapters where id = $1", running["chapter"]
    )
    assert ch["status"] == "failed" and ch["error_message"] == "Blocked by safety filters."
    job = await conn.fetchrow(
        "select status, completed_at from job_queue where id = $1", running["job"]
    )
    assert job["status"] == "failed" and job["completed_at"] is not None
