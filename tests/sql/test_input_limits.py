"""Limits at the door (migration 20261201000100): what a signed-in user can put in the queue.

Each test reproduces one finding of the input audit as the app would send it (as
PostgREST runs an RPC: SET LOCAL ROLE plus JWT claims) and checks the clear error.
"""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest

from tests.sql.test_app_api import enqueue, expect_error
from tests.support.seed import as_role, create_chapter, create_story, create_user
from worker.migrate import apply_bootstrap, apply_migrations, migrations

DEEP = '{"x":' + "[" * 2000 + "]" * 2000 + "}"


async def jobs(conn: asyncpg.Connection) -> int:
    return await conn.fetchval("select count(*) from job_queue")


# -- 1. payloads the worker could not decode --------------------------------------------
async def test_the_crash_repro_is_refused_at_the_door(conn, alice) -> None:
    """The audit's one call that stopped every worker: refused, nothing queued."""
    async with as_role(conn, "authenticated", alice["user"]):
        await expect_error(
            conn.fetchval(
                "select enqueue_chapter_generation($1, $2::jsonb)", alice["chapter"], DEEP
            ),
            "PT400",
            "unknown key 'x'",
        )
    # The same depth inside an allowed key is refused as the wrong type.
    deep_genre = '{"genre":' + "[" * 2000 + "]" * 2000 + "}"
    async with as_role(conn, "authenticated", alice["user"]):
        await expect_error(
            conn.fetchval(
                "select enqueue_chapter_generation($1, $2::jsonb)", alice["chapter"], deep_genre
            ),
            "PT400",
            "p_options.genre must be text",
        )
    assert await jobs(conn) == 0


@pytest.mark.parametrize(
    "payload,needle",
    [
        ('"hello"', "must be a JSON object, not string"),
        ("[1, 2]", "must be a JSON object, not array"),
        ("42", "must be a JSON object, not number"),
        ("null", "must be a JSON object, not null"),
        (DEEP, "nested too deeply"),
        ('{"a": "' + "x" * 70_000 + '"}', "too large"),
    ],
    ids=["string", "array", "number", "json-null", "deep", "huge"],
)
async def test_every_path_into_the_queue_checks_the_payload(conn, payload, needle) -> None:
    async with as_role(conn, "service_role"):
        await expect_error(
            conn.fetchval("select enqueue_job('chapter_generation', $1::jsonb)", payload),
            "PT400",
            needle,
        )
    # A direct insert (an operator's SQL) and an update meet the same rule.
    await expect_error(
        conn.execute(
            "insert into job_queue (job_type, job_payload) values ('x', $1::jsonb)", payload
        ),
        "PT400",
        needle,
    )
    jid = await conn.fetchval("select enqueue_job('x', '{}'::jsonb)")
    await expect_error(
        conn.execute("update job_queue set job_payload = $1::jsonb where id = $2", payload, jid),
        "PT400",
        needle,
    )
    assert await jobs(conn) == 1


async def test_nesting_up_to_the_limit_is_accepted(conn) -> None:
    ok = '{"a":' + "[" * 31 + "]" * 31 + "}"
    too_deep = '{"a":' + "[" * 32 + "]" * 32 + "}"
    assert await conn.fetchval("select genworker_jsonb_depth($1::jsonb, 32)", ok) == 32
    assert await conn.fetchval("select genworker_jsonb_depth($1::jsonb, 32)", too_deep) == 33
    assert await conn.fetchval("select genworker_jsonb_depth('\"s\"'::jsonb, 32)") == 0
    await conn.fetchval("select enqueue_job('x', $1::jsonb)", ok)
    await expect_error(conn.fetchval("select enqueue_job('x', $1::jsonb)", too_deep), "PT400")


async def test_legacy_rows_that_break_the_rules_end_as_bad_payload(pg_server, tmp_path) -> None:
    """Rows queued before the door existed are failed by the migration, not handed out."""
    dsn = await pg_server.create_empty_database()
    conn = await asyncpg.connect(dsn)
    try:
        tmp = tmp_path
        for mig in migrations():
            if mig.version < "20261201000100":
                (tmp / mig.path.name).write_text(mig.sql())
        await apply_bootstrap(conn)
        await apply_migrations(conn, tmp)
        bad = await conn.fetchval(
            "insert into job_queue (job_type, job_payload) values ('chapter_generation', $1::jsonb)"
            " returning id",
            DEEP,
        )
        hello = await conn.fetchval(
            "insert into job_queue (job_type, job_payload, status)"
            " values ('chapter_generation', '\"hello\"', 'paused') returning id"
        )
        good = await conn.fetchval(
            "insert into job_queue (job_type, job_payload) values ('noop', '{}') returning id"
        )
        await apply_migrations(conn)
        rows = {
            r["id"]: r
            for r in await conn.fetch(
                "select id, status, error_details, retry_count from job_queue"
            )
        }
        for jid in (bad, hello):
            assert rows[jid]["status"] == "failed"
            assert json.loads(rows[jid]["error_details"])["type"] == "bad_payload"
            assert rows[jid]["retry_count"] == 0
        assert rows[good]["status"] == "pending"
    finally:
        await conn.close()
        await pg_server.drop_database(dsn)


# -- chapter options ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "options,needle",
    [
        ({"colour": "blue"}, "unknown key 'colour'"),
        ({"target_words": "1500"}, "p_options.target_words must be a whole number"),
        ({"target_words": 1500.5}, "p_options.target_words must be a whole number"),
        ({"target_words": 10**30}, "p_options.target_words must be a whole number"),
        ({"target_words": 50}, "from 200 to 8000"),
        ({"sections": True}, "p_options.sections must be a whole number"),
        ({"sections": 40}, "from 2 to 12"),
        ({"tense": "future"}, "p_options.tense"),
        ({"genre": "x" * 101}, "p_options.genre must be text of at most 100"),
        ({"genre": ["a"]}, "p_options.genre must be text"),
        ({"point_of_view": "x" * 61}, "at most 60"),
        ({"instructions": "x" * 2001}, "at most 2000"),
        ({"model": {"name": "x"}}, "p_options.model must be text"),
        ({"genre": "x" * 100, "tone": "y" * 100, **{f"k{i}": 1 for i in range(800)}}, "too large"),
    ],
)
async def test_chapter_options_are_checked_and_the_key_is_named(conn, alice, options, needle):
    async with as_role(conn, "authenticated", alice["user"]):
        await expect_error(
            conn.fetchval(
                "select enqueue_chapter_generation($1, $2)", alice["chapter"], json.dumps(options)
            ),
            "PT400",
            needle,
        )
    assert await jobs(conn) == 0


async def test_valid_options_nulls_and_unicode_are_accepted(conn, alice) -> None:
    options = {
        "target_words": 900,
        "sections": 3,
        "genre": "Mystère 🕵️‍♀️ نوار",
        "tone": None,
        "tense": "past",
        "instructions": "e\u0301 ﻿ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
    }
    jid = await enqueue(conn, alice["user"], alice["chapter"], options=options)
    stored = json.loads(
        await conn.fetchval("select job_payload -> 'options' from job_queue where id = $1", jid)
    )
    assert stored == options


async def test_nul_escapes_and_lone_surrogates_never_reach_the_queue(conn, alice) -> None:
    for raw in ('{"genre": "a\\u0000b"}', '{"genre": "\\ud800"}'):
        async with as_role(conn, "authenticated", alice["user"]):
            with pytest.raises(asyncpg.PostgresError) as err:
                await conn.fetchval(
                    "select enqueue_chapter_generation($1, $2::jsonb)", alice["chapter"], raw
                )
        assert err.value.sqlstate in ("22P05", "22P02")
    assert await jobs(conn) == 0


# -- 2. story preferences ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "preferences",
    [
        {"genre": "x" * 1_100_000},
        {"genre": "x" * 101},
        {"pov": "x" * 61},
        {"notes": "x" * 201},
        {"genre": {"nested": "object"}},
        {"genre": ["a", "b"]},
        {"Bad Key": "x"},
        {f"k{i}": 1 for i in range(33)},
    ],
    ids=["1.1MB", "genre101", "pov61", "other201", "object", "array", "key", "33keys"],
)
async def test_story_preferences_are_bounded(conn, alice, preferences) -> None:
    async with as_role(conn, "authenticated", alice["user"]):
        await expect_error(
            conn.execute(
                "update stories set preferences = $1 where id = $2",
                json.dumps(preferences),
                alice["story"],
            ),
            "23514",
            "stories_preferences_bounded",
        )
    async with as_role(conn, "authenticated", alice["user"]):
        await expect_error(
            conn.execute(
                "insert into stories (title, preferences) values ('t', $1)", json.dumps(preferences)
            ),
            "23514",
        )


async def test_ordinary_preferences_are_accepted(conn, alice) -> None:
    prefs = {"genre": "noir", "tone": "wry", "pov": "first person", "tense": "past", "dark": True}
    async with as_role(conn, "authenticated", alice["user"]):
        await conn.execute(
            "update stories set preferences = $1 where id = $2", json.dumps(prefs), alice["story"]
        )
    stored = await conn.fetchval("select preferences from stories where id = $1", alice["story"])
    assert json.loads(stored) == prefs


# -- 3. per-user caps -----------------------------------------------------------------
async def chapters_for(conn, user: str, n: int) -> list[str]:
    story = await create_story(conn, user)
    return [await create_chapter(conn, story, user, i + 1) for i in range(n)]


async def test_active_jobs_per_user_are_capped_and_the_cap_lives_in_the_database(conn) -> None:
    await conn.execute("update job_lanes set max_active_per_user = 3 where lane = 'default'")
    user, other = await create_user(conn), await create_user(conn)
    chapters = await chapters_for(conn, user, 5)
    for ch in chapters[:3]:
        await enqueue(conn, user, ch)
    async with as_role(conn, "authenticated", user):
        message = await expect_error(
            conn.fetchval("select enqueue_chapter_generation($1)", chapters[3]),
            "PT429",
            "too many active jobs",
        )
    assert "at most 3" in message
    # Another user is not affected; a finished job frees a slot; a higher cap admits more.
    await enqueue(conn, other, (await chapters_for(conn, other, 1))[0])
    first = await conn.fetchval(
        "select id from job_queue where user_id = $1 order by created_at limit 1", user
    )
    async with as_role(conn, "authenticated", user):
        assert await conn.fetchval("select cancel_job($1)", first)
    await enqueue(conn, user, chapters[3])
    await conn.execute("update job_lanes set max_active_per_user = 4 where lane = 'default'")
    await enqueue(conn, user, chapters[4])


async def test_enqueues_per_hour_are_capped(conn) -> None:
    """Cancel-then-re-enqueue cannot regenerate without limit."""
    await conn.execute(
        "update job_lanes set max_enqueued_per_user_per_hour = 4 where lane = 'default'"
    )
    user = await create_user(conn)
    (chapter,) = await chapters_for(conn, user, 1)
    for _ in range(4):
        jid = await enqueue(conn, user, chapter)
        async with as_role(conn, "authenticated", user):
            await conn.fetchval("select cancel_job($1)", jid)
    async with as_role(conn, "authenticated", user):
        await expect_error(
            conn.fetchval("select enqueue_chapter_generation($1)", chapter),
            "PT429",
            "in the last hour",
        )


async def test_the_cap_holds_under_concurrent_enqueues(db_dsn, conn) -> None:
    await conn.execute("update job_lanes set max_active_per_user = 5 where lane = 'default'")
    user = await create_user(conn)
    chapters = await chapters_for(conn, user, 12)
    conns = [await asyncpg.connect(db_dsn) for _ in range(12)]
    try:

        async def one(c: asyncpg.Connection, chapter: str) -> str:
            try:
                await enqueue(c, user, chapter)
                return "ok"
            except asyncpg.PostgresError as exc:
                return exc.sqlstate

        outcomes = await asyncio.gather(
            *(one(c, ch) for c, ch in zip(conns, chapters, strict=True))
        )
    finally:
        await asyncio.gather(*(c.close() for c in conns))
    assert sorted(outcomes) == ["PT429"] * 7 + ["ok"] * 5
    assert await conn.fetchval("select count(*) from job_queue where user_id = $1", user) == 5


# -- 5. idempotency keys ---------------------------------------------------------------
async def test_an_idempotency_key_reused_on_another_chapter_is_refused(conn, alice) -> None:
    first = await enqueue(conn, alice["user"], alice["chapter"], key="k1")
    assert await enqueue(conn, alice["user"], alice["chapter"], key="k1") == first
    other = await create_chapter(conn, alice["story"], alice["user"], 2)
    async with as_role(conn, "authenticated", alice["user"]):
        await expect_error(
            conn.fetchval("select enqueue_chapter_generation($1, '{}', 'k1')", other),
            "PT409",
            "already used for another chapter",
        )
    assert await conn.fetchval("select status from chapters where id = $1", other) == "draft"


async def test_concurrent_reuse_of_one_key_never_surfaces_a_constraint_violation(
    db_dsn, conn, alice
) -> None:
    chapters = [alice["chapter"]] + [
        await create_chapter(conn, alice["story"], alice["user"], n) for n in (2, 3, 4)
    ]
    conns = [await asyncpg.connect(db_dsn) for _ in range(8)]
    try:

        async def one(c: asyncpg.Connection, chapter: str) -> tuple[str, str]:
            try:
                return "ok", await enqueue(c, alice["user"], chapter, key="race")
            except asyncpg.PostgresError as exc:
                return exc.sqlstate, chapter

        outcomes = await asyncio.gather(*(one(c, chapters[i % 4]) for i, c in enumerate(conns)))
    finally:
        await asyncio.gather(*(c.close() for c in conns))
    assert {state for state, _ in outcomes} <= {"ok", "PT409"}
    job_ids = {value for state, value in outcomes if state == "ok"}
    assert len(job_ids) == 1  # every success is the same job
    assert await conn.fetchval("select count(*) from job_queue") == 1


# -- 7. honest, uniform messages -------------------------------------------------------
async def test_every_app_rpc_answers_a_missing_sub_the_same_way(conn, alice) -> None:
    jid = await enqueue(conn, alice["user"], alice["chapter"])
    messages = set()
    for sql, arg in (
        ("select enqueue_chapter_generation($1)", alice["chapter"]),
        ("select cancel_job($1)", jid),
        ("select pause_job($1)", jid),
        ("select resume_job($1)", jid),
    ):
        async with as_role(conn, "authenticated", None):
            messages.add(await expect_error(conn.fetchval(sql, arg), "42501", "sign in first"))
    assert len(messages) == 1


async def test_null_arguments_name_the_missing_argument(conn, alice) -> None:
    async with as_role(conn, "authenticated", alice["user"]):
        await expect_error(
            conn.fetchval("select enqueue_chapter_generation(null, null, null)"),
            "PT400",
            "p_chapter_id is required",
        )
    for sql, needle in (
        ("select admin_enqueue_chapter(null)", "p_chapter_id is required"),
        ("select enqueue_job(null)", "p_job_type is required"),
        ("select enqueue_job('x', '{}', 0, 'default', 3, 'NaN')", "p_delay_s"),
    ):
        async with as_role(conn, "service_role"):
            await expect_error(conn.fetchval(sql), "PT400", needle)


async def test_deleting_a_story_cancels_its_generation_with_a_reason(conn, alice) -> None:
    jid = await enqueue(conn, alice["user"], alice["chapter"])
    await conn.execute(
        "update job_queue set status = 'processing', worker_id = 'w1', heartbeat_at = now()"
        " where id = $1",
        jid,
    )
    async with as_role(conn, "authenticated", alice["user"]):
        assert await conn.execute("delete from stories where id = $1", alice["story"]) == "DELETE 1"
    job = await conn.fetchrow("select status, error_details from job_queue where id = $1", jid)
    assert job["status"] == "cancelled"
    details = json.loads(job["error_details"])
    assert details["type"] == "cancelled" and "chapter was deleted" in details["message"]
    # The worker's next fenced write or heartbeat sees it is no longer the owner.
    assert await conn.fetchval("select update_job_heartbeat($1, 'w1')", jid) is False


async def test_a_user_still_cannot_delete_a_chapter_being_generated(conn, alice) -> None:
    jid = await enqueue(conn, alice["user"], alice["chapter"])
    async with as_role(conn, "authenticated", alice["user"]):
        assert await conn.execute("delete from chapters where id = $1", alice["chapter"]) == (
            "DELETE 0"
        )
    assert await conn.fetchval("select status from job_queue where id = $1", jid) == "pending"
