"""Seed helpers for the store tests (superuser SQL, like tests/support/seed.py)."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

import asyncpg

from tests.support.seed import create_chapter, create_story, create_user


@dataclass
class ChapterJob:
    """A chapter-generation job linked to chapter 2 of a story (chapter 1 has content)."""

    job: str
    chapter: str
    story: str
    user: str


async def insert_job(
    conn: asyncpg.Connection,
    *,
    job_type: str = "noop",
    lane: str = "default",
    payload: dict[str, Any] | None = None,
    user: str | None = None,
    lease_timeout_s: int | None = None,
    max_retries: int = 3,
    priority: int = 0,
) -> str:
    return str(
        await conn.fetchval(
            "insert into job_queue (job_type, job_lane, job_payload, user_id, lease_timeout_s,"
            " max_retries, priority) values ($1, $2, $3::jsonb, $4, $5, $6, $7) returning id",
            job_type,
            lane,
            json.dumps(payload if payload is not None else {}),
            user,
            lease_timeout_s,
            max_retries,
            priority,
        )
    )


async def chapter_job(
    conn: asyncpg.Connection, *, lease_timeout_s: int | None = None, link: bool = True
) -> ChapterJob:
    user = await create_user(conn)
    story = await create_story(conn, user, title="Tides", premise="The sea keeps a ledger.")
    prev = await create_chapter(conn, story, user, 1, "One")
    await conn.execute("update chapters set content = $1 where id = $2", "x" * 50 + "END", prev)
    chapter = await create_chapter(conn, story, user, 2)
    job = await insert_job(
        conn,
        job_type="chapter_generation",
        payload={"chapter_id": chapter, "story_id": story},
        user=user,
        lease_timeout_s=lease_timeout_s,
    )
    if link:
        await conn.execute("update chapters set generation_job_id = $1 where id = $2", job, chapter)
    return ChapterJob(job, chapter, story, user)


def new_id() -> str:
    return str(uuid.uuid4())
