"""Seed data and role switching for tests that talk SQL directly."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from worker.store.transport import FAIL_UPDATE


async def create_user(conn: asyncpg.Connection, email: str | None = None) -> str:
    uid = str(uuid.uuid4())
    await conn.execute(
        "insert into auth.users (id, email) values ($1, $2)",
        uid,
        email or f"{uid[:8]}@example.test",
    )
    return uid


async def create_story(
    conn: asyncpg.Connection,
    owner: str,
    *,
    title: str = "The Lighthouse",
    premise: str = "A keeper finds a door under the lamp.",
    preferences: dict[str, Any] | None = None,
) -> str:
    return str(
        await conn.fetchval(
            "insert into stories (owner_id, title, premise, preferences) values ($1, $2, $3, $4)"
            " returning id",
            owner,
            title,
            premise,
            json.dumps(preferences or {"genre": "mystery"}),
        )
    )


async def create_chapter(
    conn: asyncpg.Connection, story: str, owner: str, number: int = 1, title: str = ""
) -> str:
    return str(
        await conn.fetchval(
            "insert into chapters (story_id, owner_id, number, title) values ($1, $2, $3, $4)"
            " returning id",
            story,
            owner,
            number,
            title,
        )
    )


async def insert_jobs(
    conn: asyncpg.Connection,
    n: int,
    *,
    job_type: str = "noop",
    lane: str = "default",
    priority: int = 0,
    lease_timeout_s: int | None = None,
    max_retries: int = 3,
    delay_s: float = 0.0,
) -> list[str]:
    rows = await conn.fetch(
        "insert into job_queue (job_type, job_lane, priority, job_payload, lease_timeout_s,"
        " max_retries, scheduled_at)"
        " select $1, $2, $3, jsonb_build_object('n', g), $4, $5,"
        "        now() + make_interval(secs => $6)"
        " from generate_series(1, $7) g returning id",
        job_type,
        lane,
        priority,
        lease_timeout_s,
        max_retries,
        delay_s,
        n,
    )
    return [str(r["id"]) for r in rows]


@asynccontextmanager
async def as_role(
    conn: asyncpg.Connection, role: str, sub: str | None = None
) -> AsyncIterator[asyncpg.Connection]:
    """Run as PostgREST would for a request with this JWT: one transaction, SET LOCAL ROLE."""
    claims = {"role": role, **({"sub": sub} if sub else {})}
    async with conn.transaction():
        await conn.execute(f"set local role {role}")
        await conn.execute("select set_config('request.jwt.claims', $1, true)", json.dumps(claims))
        yield conn


async def claim(
    conn: asyncpg.Connection,
    worker: str,
    types: list[str] | None = None,
    lanes: list[str] | None = None,
) -> asyncpg.Record | None:
    return await conn.fetchrow("select * from claim_next_job_v3($1, $2, $3)", worker, types, lanes)


async def fail(
    conn: asyncpg.Connection,
    job_id: str,
    worker: str,
    status: str,
    retry_count: int | None,
    scheduled_at: Any,
    details: str,
) -> int:
    """Run the very failure UPDATE the worker sends (``FAIL_UPDATE``); the rows changed."""
    result = await conn.execute(
        FAIL_UPDATE, job_id, worker, status, retry_count, scheduled_at, details
    )
    return int(result.split()[-1])


async def chapter_job(
    conn: asyncpg.Connection,
    *,
    options: dict[str, Any] | None = None,
    number: int = 1,
    lease_timeout_s: int | None = None,
) -> tuple[str, str, str]:
    """A user, story and chapter, enqueued as the app does: (user, chapter, job)."""
    user = await create_user(conn)
    story = await create_story(conn, user)
    for n in range(1, number):
        prev = await create_chapter(conn, story, user, n, f"Chapter {n}")
        await conn.execute(
            "update chapters set content = $1, status = 'completed' where id = $2",
            f"The end of chapter {n}.",
            prev,
        )
    chapter = await create_chapter(conn, story, user, number)
    async with as_role(conn, "authenticated", user):
        job = str(
            await conn.fetchval(
                "select enqueue_chapter_generation($1, $2)", chapter, json.dumps(options or {})
            )
        )
    if lease_timeout_s is not None:
        await conn.execute(
            "update job_queue set lease_timeout_s = $1 where id = $2", lease_timeout_s, job
        )
    return user, chapter, job


PROGRESS_LOG = """
create table test_progress_log (
  id bigserial primary key, at timestamptz default clock_timestamp(), chapter_id uuid,
  progress int, content_length int, status text, current_step text);
create function test_log_progress() returns trigger language plpgsql as $$
begin
  if new.content is distinct from old.content or new.progress is distinct from old.progress
     or new.status is distinct from old.status then
    insert into test_progress_log (chapter_id, progress, content_length, status, current_step)
    values (new.id, new.progress, char_length(new.content), new.status, new.current_step);
  end if;
  return null;
end $$;
create trigger test_log_progress after update on chapters
  for each row execute function test_log_progress();
"""


async def install_progress_log(conn: asyncpg.Connection) -> None:
    """Test-only: record every chapter change, to assert progress and write counts."""
    await conn.execute(PROGRESS_LOG)


async def claimed_chapter(conn: asyncpg.Connection) -> dict[str, str]:
    """A chapter (after a finished chapter 1) whose generation job worker 'w' has claimed."""
    user = await create_user(conn)
    story = await create_story(conn, user, title="Tides")
    prev = await create_chapter(conn, story, user, 1, "One")
    await conn.execute("update chapters set content = $1 where id = $2", "x" * 50 + "END", prev)
    chapter = await create_chapter(conn, story, user, 2)
    jid = await conn.fetchval(
        "insert into job_queue (job_type, job_payload, user_id) values"
        " ('chapter_generation', '{}', $1) returning id",
        user,
    )
    await conn.execute("update chapters set generation_job_id = $1 where id = $2", jid, chapter)
    await claim(conn, "w")
    return {"job": str(jid), "chapter": chapter, "user": user, "story": story}
