"""Streamed text as append-only deltas, Broadcast from the database, Realtime Authorization."""

from __future__ import annotations

import json
from typing import Any

import asyncpg
import pytest

from tests.sql.test_chapter_writes import append
from tests.support.database import PgTestServer, with_database
from tests.support.seed import as_role, claim, claimed_chapter, create_user, fail
from worker.migrate import apply_bootstrap, apply_migrations


async def messages(conn: asyncpg.Connection, chapter: str) -> list[dict[str, Any]]:
    rows = await conn.fetch(
        "select event, payload, private, extension from realtime.messages where topic = $1"
        " order by inserted_at, ctid",
        f"chapter:{chapter}",
    )
    out = []
    for r in rows:
        assert r["private"] is True and r["extension"] == "broadcast"
        payload = json.loads(r["payload"])
        payload.pop("id")  # realtime.send adds one
        out.append({"event": r["event"], **payload})
    return out


async def test_append_inserts_one_chunk_and_broadcasts_it(conn, running) -> None:
    job, chapter = running["job"], running["chapter"]
    before = await conn.fetchval("select xmin::text from chapters where id = $1", chapter)
    assert await append(conn, job, 0, "Once upon", step="section 1/2: x") is True
    after_milestone = await conn.fetchval("select xmin::text from chapters where id = $1", chapter)
    assert after_milestone != before  # a new step is a milestone: the row moves
    assert await conn.fetchval(
        "select append_chapter_content($1, 'w', 9, ' a time', 30, null, null)", job
    )
    # Not a milestone: the chapters row is not written at all.
    assert await conn.fetchval("select xmin::text from chapters where id = $1", chapter) == (
        after_milestone
    )
    chunks = await conn.fetch(
        "select seq, text from chapter_chunks where chapter_id = $1 order by seq", chapter
    )
    assert [(r["seq"], r["text"]) for r in chunks] == [(0, "Once upon"), (9, " a time")]
    assert await conn.fetchval("select content from chapters where id = $1", chapter) == ""
    deltas = [m for m in await messages(conn, chapter) if m["event"] == "delta"]
    assert deltas == [
        {"event": "delta", "offset": 0, "text": "Once upon", "progress": 20,
         "step": "section 1/2: x"},
        {"event": "delta", "offset": 9, "text": " a time", "progress": 30},
    ]  # fmt: skip


async def test_resent_append_adds_no_chunk_and_no_message(conn, running) -> None:
    job, chapter = running["job"], running["chapter"]
    await append(conn, job, 0, "Héllo 👋 ")
    n = len(await messages(conn, chapter))
    assert await append(conn, job, 0, "Héllo 👋 ") is True
    assert len(await messages(conn, chapter)) == n
    assert await conn.fetchval("select count(*) from chapter_chunks") == 1
    with pytest.raises(asyncpg.PostgresError) as err:
        await append(conn, job, 0, "Other text")
    assert err.value.sqlstate == "PT409"


async def test_rewind_deletes_past_the_offset_and_sends_rewind(conn, running) -> None:
    job, chapter = running["job"], running["chapter"]
    await append(conn, job, 0, "abcdef")
    await append(conn, job, 6, "ghij")
    # Cut inside the first chunk: it is shortened, the second goes.
    assert await conn.fetchval("select rewind_chapter_content($1, 'w', 4)", job) is True
    chunks = await conn.fetch(
        "select seq, text from chapter_chunks where chapter_id = $1 order by seq", chapter
    )
    assert [(r["seq"], r["text"]) for r in chunks] == [(0, "abcd")]
    assert (await messages(conn, chapter))[-1] == {"event": "rewind", "length": 4}
    await append(conn, job, 4, "XY")
    assert await conn.fetchval("select content from get_chapter_text($1)", chapter) == "abcdXY"


async def test_rescue_rewinds_the_partial_section_for_readers(conn, running) -> None:
    job, chapter = running["job"], running["chapter"]
    await conn.fetchval(
        "select save_chapter_outline($1, 'w', 'T', $2)", job, json.dumps({"bullets": ["a", "b"]})
    )
    await append(conn, job, 0, "One.", checkpoint={"sections_done": 1, "content_length": 4})
    await append(conn, job, 4, " Half")
    await conn.execute("update job_queue set heartbeat_at = now() - interval '1 hour'")
    assert (await claim(conn, "w2"))["retry_count"] == 1
    ctx = json.loads(await conn.fetchval("select start_chapter_generation($1, 'w2')", job))
    assert ctx["chapter"]["content_length"] == 4 and ctx["chapter"]["content_tail"] == "One."
    events = await messages(conn, chapter)
    assert {"event": "rewind", "length": 4} in events
    assert events[-1]["event"] == "status" and events[-1]["status"] == "generating"
    assert await conn.fetchval("select content from get_chapter_text($1)", chapter) == "One."


async def test_stopping_materialises_content_and_finish_carries_the_text(conn, running) -> None:
    job, chapter, user = running["job"], running["chapter"], running["user"]
    await append(conn, job, 0, "Kept text.")
    async with as_role(conn, "authenticated", user):
        assert await conn.fetchval("select pause_job($1)", job)
    row = await conn.fetchrow("select content, status from chapters where id = $1", chapter)
    assert (row["content"], row["status"]) == ("Kept text.", "paused")
    status = (await messages(conn, chapter))[-1]
    assert status == {"event": "status", "status": "paused", "progress": 20, "step": "paused",
                      "length": 10}  # fmt: skip
    async with as_role(conn, "authenticated", user):
        assert await conn.fetchval("select resume_job($1)", job)
    await claim(conn, "w")
    await conn.fetchval("select start_chapter_generation($1, 'w')", job)  # no outline: from 0
    assert await conn.fetchval("select content from chapters where id = $1", chapter) == ""
    await append(conn, job, 0, "Fresh start.")
    assert await conn.fetchval("select finish_chapter($1, 'w')", job) == 2
    row = await conn.fetchrow("select content, status from chapters where id = $1", chapter)
    assert (row["content"], row["status"]) == ("Fresh start.", "completed")
    assert (await messages(conn, chapter))[-1]["status"] == "completed"


async def test_failure_keeps_the_text_and_a_new_job_starts_empty(conn, running) -> None:
    job, chapter, user = running["job"], running["chapter"], running["user"]
    await append(conn, job, 0, "Partial.")
    details = json.dumps({"type": "safety_block", "user_message": "Blocked."})
    assert await fail(conn, job, "w", "failed", 0, None, details) == 1
    row = await conn.fetchrow("select * from chapters where id = $1", chapter)
    assert (row["content"], row["status"], row["error_message"]) == (
        "Partial.",
        "failed",
        "Blocked.",
    )
    assert (await messages(conn, chapter))[-1]["error_message"] == "Blocked."
    async with as_role(conn, "authenticated", user):
        await conn.fetchval("select enqueue_chapter_generation($1)", chapter)
    assert await conn.fetchval("select count(*) from chapter_chunks") == 0
    assert await conn.fetchval("select content from get_chapter_text($1)", chapter) == ""
    # Readers still showing the old text are told it is gone.
    assert (await messages(conn, chapter))[-1] == {
        "event": "status", "status": "queued", "progress": 0, "step": "queued", "length": 0
    }  # fmt: skip


async def test_readers_see_only_their_own_text(conn, running) -> None:
    job, chapter, user = running["job"], running["chapter"], running["user"]
    await append(conn, job, 0, "Private words.")
    other = await create_user(conn)
    async with as_role(conn, "authenticated", user):
        row = await conn.fetchrow("select * from get_chapter_text($1)", chapter)
        assert (row["content"], row["content_length"], row["status"]) == (
            "Private words.",
            14,
            "generating",
        )
        assert await conn.fetchval("select count(*) from chapter_chunks") == 1
    async with as_role(conn, "authenticated", other):
        assert await conn.fetch("select * from get_chapter_text($1)", chapter) == []
        assert await conn.fetchval("select count(*) from chapter_chunks") == 0
    for role, sql in (
        ("anon", "select * from chapter_chunks"),
        ("anon", "select * from get_chapter_text('00000000-0000-0000-0000-000000000000')"),
        ("authenticated", "insert into chapter_chunks values (gen_random_uuid(), 0, 'x')"),
        ("authenticated", f"select genworker_cut_chapter('{chapter}', 0)"),
        ("authenticated", f"select genworker_broadcast('{chapter}', 'delta', '{{}}')"),
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with as_role(conn, role, user):
                await conn.fetch(sql)


async def realtime_can_read(
    conn: asyncpg.Connection, topic: str, user: str, *, rls: bool = True
) -> bool:
    """Realtime's join-time check, step by step: in one transaction insert a probe message
    for the topic, become the subscriber (role and JWT claims, realtime.topic set), select
    the probe back under row level security, roll back."""
    tx = conn.transaction()
    await tx.start()
    try:
        if not rls:
            await conn.execute("alter table realtime.messages disable row level security")
        probe = await conn.fetchval(
            "insert into realtime.messages (topic, extension, private, payload)"
            " values ($1, 'broadcast', true, '{}') returning id",
            topic,
        )
        claims = {"sub": user, "role": "authenticated", "aud": "authenticated"}
        await conn.execute("set local role authenticated")
        for key, value in (
            ("realtime.topic", topic),
            ("request.jwt.claims", json.dumps(claims)),
            ("request.jwt.claim.sub", user),
            ("request.jwt.claim.role", "authenticated"),
        ):
            await conn.execute("select set_config($1, $2, true)", key, value)
        seen = await conn.fetchval(
            "select count(*) from realtime.messages where id = $1 and extension = 'broadcast'",
            probe,
        )
        return seen == 1
    finally:
        await tx.rollback()


async def test_realtime_authorization_lets_only_the_owner_join(conn, running) -> None:
    chapter, owner = running["chapter"], running["user"]
    other = await create_user(conn)
    topic = f"chapter:{chapter}"
    assert await realtime_can_read(conn, topic, owner) is True
    assert await realtime_can_read(conn, topic, other) is False
    assert await realtime_can_read(conn, f"chapter:{other}", owner) is False
    assert await realtime_can_read(conn, "chapter:not-a-uuid", owner) is False
    # Control: without row level security the same probe does reach the other user, so
    # the False above is the policy's doing.
    assert await realtime_can_read(conn, topic, other, rls=False) is True
    assert await conn.fetchval(
        "select relrowsecurity from pg_class where oid = 'realtime.messages'::regclass"
    )
    # Users cannot send on the topic (no INSERT policy): only the database does.
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with as_role(conn, "authenticated", owner):
            await conn.execute(
                "insert into realtime.messages (topic, extension, payload) values"
                " ($1, 'broadcast', '{}')",
                topic,
            )


async def test_a_failing_send_never_undoes_the_append(conn, running) -> None:
    job, chapter = running["job"], running["chapter"]
    await conn.execute(
        "alter table realtime.messages add constraint test_refuse check (event <> 'delta')"
    )
    warnings: list[str] = []
    conn.add_log_listener(lambda _c, msg: warnings.append(str(msg)))
    assert await append(conn, job, 0, "Still written.") is True
    assert await conn.fetchval("select content from get_chapter_text($1)", chapter) == (
        "Still written."
    )
    assert any("WarnSendingBroadcastMessage" in w for w in warnings)


async def test_migrations_apply_and_stream_without_realtime(pg_server: PgTestServer) -> None:
    """Plain PostgreSQL (no realtime schema): migrations apply, appends skip the send."""
    conn = await asyncpg.connect(pg_server.admin_dsn)
    try:
        await conn.execute("drop database if exists genworker_norealtime with (force)")
        await conn.execute("create database genworker_norealtime")
    finally:
        await conn.close()
    dsn = with_database(pg_server.admin_dsn, "genworker_norealtime")
    db = await asyncpg.connect(dsn)
    try:
        await apply_bootstrap(db)
        await db.execute("drop schema realtime cascade")
        await apply_migrations(db)
        fixture = await claimed_chapter(db)
        await append(db, fixture["job"], 0, "No Realtime here.")
        assert await db.fetchval("select finish_chapter($1, 'w')", fixture["job"]) == 3
        assert await db.fetchval(
            "select content from chapters where id = $1", fixture["chapter"]
        ) == ("No Realtime here.")
        assert await db.fetchval("select to_regnamespace('realtime')") is None
    finally:
        await db.close()
        conn = await asyncpg.connect(pg_server.admin_dsn)
        try:
            await conn.execute("drop database if exists genworker_norealtime with (force)")
        finally:
            await conn.close()


async def test_a_role_that_may_not_add_the_realtime_policy_still_migrates(pg_server) -> None:
    """realtime.messages is Realtime's table: where the migrating role may not add a policy
    to it, the migration warns with the statement to run instead of failing the deploy."""
    owner = "genworker_rt_owner"
    admin = await asyncpg.connect(pg_server.admin_dsn)
    try:
        await admin.execute(
            f"do $$ begin if not exists (select 1 from pg_roles where rolname = '{owner}') then"
            f" create role {owner} login nosuperuser; end if; end $$"
        )
    finally:
        await admin.close()
    dsn = await pg_server.create_empty_database(owner=owner)
    try:
        platform = await asyncpg.connect(dsn)
        try:
            await platform.execute(f"set genworker.migration_owner = '{owner}'")
            await apply_bootstrap(platform)
        finally:
            await platform.close()
        db = await asyncpg.connect(dsn, user=owner)
        notes: list[asyncpg.PostgresLogMessage] = []
        db.add_log_listener(lambda _c, msg: notes.append(msg))
        try:
            await apply_migrations(db)
        finally:
            await db.close()
        warned = [n for n in notes if "Realtime Authorization policy" in str(n)]
        assert len(warned) == 1
        assert "create policy genworker_chapter_topic_owner_read" in (warned[0].hint or "")
        platform = await asyncpg.connect(dsn)
        try:  # fails closed: no policy, so no user can read a chapter topic
            assert not await platform.fetchval(
                "select exists (select 1 from pg_policies where schemaname = 'realtime')"
            )
        finally:
            await platform.close()
    finally:
        await pg_server.drop_database(dsn)


async def test_story_progress_shows_the_streamed_text(conn, running) -> None:
    await append(conn, running["job"], 0, "Growing…")
    rows = await conn.fetch("select * from story_progress($1, true)", running["story"])
    mine = next(r for r in rows if str(r["chapter_id"]) == running["chapter"])
    assert (mine["content_length"], mine["content"]) == (8, "Growing…")
    first = next(r for r in rows if r["number"] == 1)  # no chunks: the row's content
    assert first["content_length"] == 53 and first["content"].endswith("END")
