"""The app's RPCs and row level security, run as PostgREST runs them (SET LOCAL ROLE + claims)."""

from __future__ import annotations

import json

import asyncpg
import pytest

from tests.support.seed import as_role, claim, create_user


@pytest.fixture
async def bob(conn: asyncpg.Connection) -> str:
    return await create_user(conn, "bob@example.test")


async def enqueue(
    conn: asyncpg.Connection,
    user: str,
    chapter: str,
    key: str | None = None,
    options: dict | None = None,
) -> str:
    async with as_role(conn, "authenticated", user):
        return str(
            await conn.fetchval(
                "select enqueue_chapter_generation($1, $2, $3)",
                chapter,
                json.dumps(options or {"target_words": 900}),
                key,
            )
        )


async def expect_error(coro, sqlstate: str, text: str = "") -> str:
    try:
        await coro
    except asyncpg.PostgresError as exc:
        assert exc.sqlstate == sqlstate, (exc.sqlstate, str(exc))
        assert text in str(exc)
        return str(exc)
    raise AssertionError(f"expected SQLSTATE {sqlstate}")


async def test_enqueue_creates_job_and_queues_chapter(conn, alice) -> None:
    jid = await enqueue(conn, alice["user"], alice["chapter"], options={"target_words": 1200})
    job = await conn.fetchrow("select * from job_queue where id = $1", jid)
    assert job["job_type"] == "chapter_generation" and str(job["user_id"]) == alice["user"]
    payload = json.loads(job["job_payload"])
    assert payload == {
        "chapter_id": alice["chapter"],
        "story_id": alice["story"],
        "user_id": alice["user"],
        "options": {"target_words": 1200},
    }
    ch = await conn.fetchrow("select * from chapters where id = $1", alice["chapter"])
    assert ch["status"] == "queued" and str(ch["generation_job_id"]) == jid


async def test_enqueue_is_idempotent_by_key(conn, alice) -> None:
    first = await enqueue(conn, alice["user"], alice["chapter"], key="k-1")
    again = await enqueue(conn, alice["user"], alice["chapter"], key="k-1")
    assert first == again
    assert await conn.fetchval("select count(*) from job_queue") == 1


async def test_enqueue_rejects_a_second_active_job(conn, alice) -> None:
    jid = await enqueue(conn, alice["user"], alice["chapter"])
    msg = await expect_error(
        enqueue(conn, alice["user"], alice["chapter"], key="other"),
        "PT409",
        "already has an active generation job",
    )
    assert jid in msg


async def test_cancel_pending_and_processing(conn, alice) -> None:
    jid = await enqueue(conn, alice["user"], alice["chapter"])
    async with as_role(conn, "authenticated", alice["user"]):
        assert await conn.fetchval("select cancel_job($1)", jid) is True
    assert await conn.fetchval("select status from job_queue where id = $1", jid) == "cancelled"
    assert (
        await conn.fetchval("select status from chapters where id = $1", alice["chapter"])
        == "cancelled"
    )
    assert await claim(conn, "w") is None

    jid2 = await enqueue(conn, alice["user"], alice["chapter"])
    assert (await claim(conn, "w"))["job_id"] is not None
    async with as_role(conn, "authenticated", alice["user"]):
        assert await conn.fetchval("select cancel_job($1)", jid2) is True
        assert await conn.fetchval("select cancel_job($1)", jid2) is False
    assert await conn.fetchval("select update_job_heartbeat($1, 'w')", jid2) is False


async def test_pause_and_resume_keep_attempts_and_checkpoint(conn, alice) -> None:
    jid = await enqueue(conn, alice["user"], alice["chapter"])
    await claim(conn, "w")
    await conn.fetchval("select start_chapter_generation($1, 'w')", jid)
    await conn.fetchval("select save_chapter_outline($1, 'w', 'T', '{\"bullets\": [\"a\"]}')", jid)
    await conn.fetchval(
        "select append_chapter_content($1, 'w', 0, 'Done.', 50, 's',"
        ' \'{"sections_done": 1, "content_length": 5}\')',
        jid,
    )
    async with as_role(conn, "authenticated", alice["user"]):
        assert await conn.fetchval("select pause_job($1)", jid) is True
    assert await conn.fetchval("select update_job_heartbeat($1, 'w')", jid) is False
    assert await claim(conn, "w2") is None
    ch = await conn.fetchrow("select * from chapters where id = $1", alice["chapter"])
    assert ch["status"] == "paused" and json.loads(ch["generation_state"])["sections_done"] == 1
    async with as_role(conn, "authenticated", alice["user"]):
        assert await conn.fetchval("select resume_job($1)", jid) is True
    job = await claim(conn, "w2")
    assert job["job_id"] is not None and job["retry_count"] == 0
    assert (
        await conn.fetchval("select content from chapters where id = $1", alice["chapter"])
        == "Done."
    )


async def test_other_user_cannot_see_or_touch(conn, alice, bob) -> None:
    jid = await enqueue(conn, alice["user"], alice["chapter"])
    async with as_role(conn, "authenticated", bob):
        assert await conn.fetch("select * from chapters") == []
        assert await conn.fetch("select * from stories") == []
        assert await conn.fetch("select * from job_queue") == []
        assert await conn.fetch("select * from job_events") == []
    await expect_error(enqueue(conn, bob, alice["chapter"]), "PT404", "not found")
    for fn in ("cancel_job", "pause_job", "resume_job"):
        async with as_role(conn, "authenticated", bob):
            await expect_error(conn.fetchval(f"select {fn}($1)", jid), "PT404")
    assert await conn.fetchval("select status from job_queue where id = $1", jid) == "pending"
    async with as_role(conn, "authenticated", alice["user"]):
        assert len(await conn.fetch("select * from chapters")) == 1
        assert len(await conn.fetch("select * from job_queue")) == 1
        assert len(await conn.fetch("select * from job_events")) == 1


WORKER_CALLS = [
    "select * from claim_next_job_v3('w', null, null)",
    "select update_job_heartbeat(gen_random_uuid(), 'w')",
    "select complete_job(gen_random_uuid(), 'w', '{}')",
    "select release_job(gen_random_uuid(), 'w')",
    "select append_chapter_content(gen_random_uuid(), 'w', 0, 'x', 1, 's')",
    "select start_chapter_generation(gen_random_uuid(), 'w')",
    "select queue_stats()",
    "select purge_finished_jobs(1)",
    "select * from requeue_failed_jobs()",
]


@pytest.mark.parametrize("call", WORKER_CALLS)
async def test_users_cannot_call_worker_functions(conn, bob, call) -> None:
    for role, sub in (("authenticated", bob), ("anon", None)):
        async with conn.transaction():
            await conn.execute(f"set local role {role}")
            await conn.execute(
                "select set_config('request.jwt.claims', $1, true)",
                json.dumps({"role": role, "sub": sub}),
            )
            await expect_error(conn.fetch(call), "42501", "permission denied")


async def test_anon_can_do_nothing(conn, alice) -> None:
    async with conn.transaction():
        await conn.execute("set local role anon")
        await expect_error(conn.fetch("select * from chapters"), "42501")
    async with conn.transaction():
        await conn.execute("set local role anon")
        await expect_error(
            conn.fetchval("select enqueue_chapter_generation($1)", alice["chapter"]), "42501"
        )
    async with conn.transaction():
        await conn.execute("set local role anon")
        await expect_error(conn.execute("insert into stories (title) values ('x')"), "42501")


async def test_users_never_write_generation_fields(conn, alice) -> None:
    async with as_role(conn, "authenticated", alice["user"]):
        await conn.execute("update chapters set title = 'Renamed' where id = $1", alice["chapter"])
    for column, value in (
        ("content", "'hacked'"),
        ("progress", "100"),
        ("status", "'completed'"),
        ("generation_state", "'{}'"),
    ):
        async with conn.transaction():
            await conn.execute("set local role authenticated")
            await conn.execute(
                "select set_config('request.jwt.claims', $1, true)",
                json.dumps({"role": "authenticated", "sub": alice["user"]}),
            )
            await expect_error(conn.execute(f"update chapters set {column} = {value}"), "42501")
    async with conn.transaction():
        await conn.execute("set local role authenticated")
        await expect_error(
            conn.execute("insert into job_queue (job_type, job_payload) values ('x', '{}')"),
            "42501",
        )
    assert (
        await conn.fetchval("select title from chapters where id = $1", alice["chapter"])
        == "Renamed"
    )


async def test_user_creates_own_story_and_chapter_only(conn, alice, bob) -> None:
    async with as_role(conn, "authenticated", bob):
        sid = await conn.fetchval("insert into stories (title) values ('Mine') returning id")
        await conn.execute("insert into chapters (story_id, number) values ($1, 1)", sid)
    async with conn.transaction():
        await conn.execute("set local role authenticated")
        await conn.execute(
            "select set_config('request.jwt.claims', $1, true)",
            json.dumps({"role": "authenticated", "sub": bob}),
        )
        # Bob cannot hang a chapter on Alice's story: the (story, owner) key does not exist.
        await expect_error(
            conn.execute("insert into chapters (story_id, number) values ($1, 9)", alice["story"]),
            "23503",
        )
