"""`genworker embed`: backfill story memory for existing chapters."""

from __future__ import annotations

import json

import asyncpg

from tests.cli.test_cli import genworker
from tests.support.memory import require_memory, write_chapter
from tests.support.seed import create_story, create_user


async def test_embed_story_and_all_missing(db_dsn: str, conn: asyncpg.Connection) -> None:
    await require_memory(conn)
    user = await create_user(conn)
    story = await create_story(conn, user)
    first, _ = await write_chapter(conn, story, user, 1, "A chapter.\n\nOf two paragraphs.")
    second, _ = await write_chapter(conn, story, user, 2, "Another one.")
    # The completions queued their jobs; drop them to backfill from nothing.
    await conn.execute("delete from job_queue where job_type = 'chapter_embedding'")
    env = {"DATABASE_URL": db_dsn, "GENERATION_PROVIDER": "offline"}

    proc = genworker("embed", "--story", story, env=env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["count"] == 2
    payloads = await conn.fetch(
        "select job_payload ->> 'chapter_id' as c, job_lane from job_queue"
        " where id = any($1::uuid[])",
        out["queued"],
    )
    assert {r["c"] for r in payloads} == {first, second}
    assert {r["job_lane"] for r in payloads} == {"story_memory"}
    # Waiting jobs are reused, not duplicated.
    again = json.loads(genworker("embed", "--all-missing", env=env).stdout)
    assert sorted(again["queued"]) == sorted(out["queued"])


def test_embed_usage_errors_exit_2() -> None:
    for args in ((), ("--story", "x", "--all-missing"), ("--story", "not-a-uuid")):
        proc = genworker("embed", *args, env={"DATABASE_URL": "postgresql://u@127.0.0.1:1/x"})
        assert proc.returncode == 2, args
        assert len(proc.stderr.strip().splitlines()) == 1 and "genworker embed:" in proc.stderr


async def test_embed_without_story_memory_is_one_line_and_exit_1(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    await conn.execute(
        "drop function if exists enqueue_chapter_embeddings(uuid, boolean, text, integer)"
    )
    proc = genworker("embed", "--all-missing", env={"DATABASE_URL": db_dsn})
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "genworker embed: story memory is not installed in this database (pgvector is not "
        'available there); see README "Story memory"'
    ]


async def test_embed_unknown_story_exit_1(db_dsn: str, conn: asyncpg.Connection) -> None:
    await require_memory(conn)
    proc = genworker(
        "embed", "--story", "00000000-0000-0000-0000-000000000000", env={"DATABASE_URL": db_dsn}
    )
    assert proc.returncode == 1
    assert "not found" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
