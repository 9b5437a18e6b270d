"""Story memory in SQL: the embedding job is queued on completion, passages are replaced
fenced and in one transaction, owners read only their own, retrieval looks only at earlier
chapters, and the migration creates nothing (and fails nothing) without pgvector."""

from __future__ import annotations

import json

import asyncpg
import pytest

from tests.support.memory import (
    basis,
    embedding_jobs,
    passages_json,
    require_memory,
    write_chapter,
)
from tests.support.seed import as_role, create_chapter, create_story, create_user
from worker.migrate import apply_bootstrap, apply_migrations, migrations

TEXT = "Oriel kept the brass astrolabe.\n\nThe tide came in.\n\nNobody spoke of the key."
CUT = [(0, 31), (33, 50), (52, 76)]


@pytest.fixture
async def memory(conn: asyncpg.Connection) -> None:
    await require_memory(conn)


async def claim_embedding(conn: asyncpg.Connection, worker: str = "embedder") -> str:
    row = await conn.fetchrow(
        "select * from claim_next_job_v3($1, array['chapter_embedding'], null)", worker
    )
    assert row is not None
    return str(row["job_id"])


async def store(conn, job, chapter, text=TEXT, cut=CUT, vectors=None, worker="embedder"):
    source = json.loads(await conn.fetchval("select chapter_embedding_source($1, $2)", job, worker))
    vectors = vectors or [basis((i, 1.0)) for i in range(len(cut))]
    result = await conn.fetchval(
        "select replace_chapter_passages($1, $2, $3, $4, 'm1', $5)",
        job,
        worker,
        chapter,
        source["content_md5"],
        passages_json(text, vectors, cut),
    )
    return json.loads(result) if result else None


async def story_with_chapter(conn):
    user = await create_user(conn)
    story = await create_story(conn, user)
    chapter, _ = await write_chapter(conn, story, user, 1, TEXT)
    return user, story, chapter


async def test_completing_a_chapter_queues_one_embedding_job(conn, memory) -> None:
    user, _story, chapter = await story_with_chapter(conn)
    [job] = await embedding_jobs(conn, chapter)
    assert (job["status"], job["job_lane"], str(job["user_id"])) == (
        "pending",
        "story_memory",
        user,
    )
    # A second completion while it waits reuses it (it reads the text when it runs).
    await conn.execute("update chapters set status = 'failed' where id = $1", chapter)
    await conn.execute("update chapters set status = 'completed' where id = $1", chapter)
    assert [j["id"] for j in await embedding_jobs(conn, chapter)] == [job["id"]]


async def test_a_failing_enqueue_never_fails_the_chapter(conn, memory) -> None:
    """The lane refuses every job (a cap of 1, already used): the chapter still completes."""
    user = await create_user(conn)
    story = await create_story(conn, user)
    await conn.execute(
        "update job_lanes set max_enqueued_per_user_per_hour = 1 where lane = 'story_memory'"
    )
    first, _ = await write_chapter(conn, story, user, 1, TEXT)
    second, _ = await write_chapter(conn, story, user, 2, TEXT)
    assert await conn.fetchval("select status from chapters where id = $1", second) == "completed"
    assert len(await embedding_jobs(conn, first)) == 1
    assert await embedding_jobs(conn, second) == []  # refused, with a WARNING
    # The operator's backfill is told why (it is not a chapter's transaction)...
    with pytest.raises(asyncpg.PostgresError) as err:
        await conn.fetch("select * from enqueue_chapter_embeddings($1, true)", story)
    assert err.value.sqlstate == "PT429"
    # ...and catches up once the cap allows it.
    await conn.execute(
        "update job_lanes set max_enqueued_per_user_per_hour = 100 where lane = 'story_memory'"
    )
    queued = await conn.fetch("select * from enqueue_chapter_embeddings($1, true)", story)
    assert len(queued) == 2  # the first one's waiting job is reused
    assert len(await embedding_jobs(conn, second)) == 1


async def test_backfill_queues_missing_chapters_and_reuses_waiting_jobs(conn, memory) -> None:
    _user, story, chapter = await story_with_chapter(conn)
    [waiting] = await embedding_jobs(conn, chapter)
    again = await conn.fetch("select * from enqueue_chapter_embeddings($1)", story)
    assert [r[0] for r in again] == [waiting["id"]]
    job = await claim_embedding(conn)
    assert (await store(conn, job, chapter))["status"] == "stored"
    assert await conn.fetch("select * from enqueue_chapter_embeddings(null, true)") == []
    assert len(await conn.fetch("select * from enqueue_chapter_embeddings(null, true, 'm2')")) == 1
    with pytest.raises(asyncpg.PostgresError) as err:
        await conn.fetch("select * from enqueue_chapter_embeddings(null, false)")
    assert err.value.sqlstate == "PT400"
    with pytest.raises(asyncpg.PostgresError) as err:
        await conn.fetch("select * from enqueue_chapter_embeddings(gen_random_uuid())")
    assert err.value.sqlstate == "PT404"


async def test_passages_are_stored_with_offsets_and_replaced(conn, memory) -> None:
    _user, _story, chapter = await story_with_chapter(conn)
    job = await claim_embedding(conn)
    assert await store(conn, job, chapter) == {"status": "stored", "passages": 3}
    rows = await conn.fetch(
        "select ordinal, start_offset, end_offset, content from story_passages"
        " where chapter_id = $1 order by ordinal",
        chapter,
    )
    assert [(r["start_offset"], r["end_offset"]) for r in rows] == CUT
    assert rows[0]["content"] == "Oriel kept the brass astrolabe."
    # The same job again (a retried call): the set is replaced, not duplicated.
    assert await store(conn, job, chapter, cut=CUT[:2]) == {"status": "stored", "passages": 2}
    assert (
        await conn.fetchval("select count(*) from story_passages where chapter_id = $1", chapter)
        == 2
    )


async def test_a_worker_that_lost_the_lease_writes_nothing(conn, memory) -> None:
    _user, _story, chapter = await story_with_chapter(conn)
    job = await claim_embedding(conn, "old")
    source = json.loads(await conn.fetchval("select chapter_embedding_source($1, 'old')", job))
    # Rescued by another worker.
    await conn.execute(
        "update job_queue set heartbeat_at = now() - interval '1 hour' where id = $1", job
    )
    assert await claim_embedding(conn, "new") == job
    result = await conn.fetchval(
        "select replace_chapter_passages($1, 'old', $2, $3, 'm1', $4)",
        job,
        chapter,
        source["content_md5"],
        passages_json(TEXT, [basis((0, 1.0))], CUT[:1]),
    )
    assert result is None
    assert await conn.fetchval("select chapter_embedding_source($1, 'old')", job) is None
    assert await conn.fetchval("select count(*) from story_passages") == 0


async def test_regeneration_drops_passages_and_a_stale_job_writes_nothing(conn, memory) -> None:
    user, story, chapter = await story_with_chapter(conn)
    job = await claim_embedding(conn)
    assert (await store(conn, job, chapter))["status"] == "stored"
    assert await conn.fetchval("select complete_job($1, 'embedder', '{}')", job)
    # The user regenerates: the old text is gone, so are its passages.
    async with as_role(conn, "authenticated", user):
        await conn.fetchval("select enqueue_chapter_generation($1, '{}')", chapter)
    assert await conn.fetchval("select count(*) from story_passages") == 0
    # A job that read the old text cannot store it once the chapter changed.
    source_md5 = await conn.fetchval("select md5($1::text)", TEXT)
    old = await conn.fetchval(
        "insert into job_queue (job_type, job_lane, job_payload) values ('chapter_embedding',"
        " 'story_memory', jsonb_build_object('chapter_id', $1::uuid)) returning id",
        chapter,
    )
    assert await claim_embedding(conn) == str(old)
    stale = await conn.fetchval(
        "select replace_chapter_passages($1, 'embedder', $2, $3, 'm1', $4)",
        old,
        chapter,
        source_md5,
        passages_json(TEXT, [basis((0, 1.0))], CUT[:1]),
    )
    assert json.loads(stale) == {"status": "stale", "passages": 0}
    # The new text completes: a new job, and its passages replace nothing stale.
    claimed = await conn.fetchrow(
        "select * from claim_next_job_v3('writer', array['chapter_generation'], null)"
    )
    new_text = "A different chapter now.\n\nWith other words."
    gen = claimed["job_id"]
    await conn.fetchval("select start_chapter_generation($1, 'writer')", gen)
    await conn.fetchval(
        "select append_chapter_content($1, 'writer', 0, $2, 90, 'w', null)", gen, new_text
    )
    await conn.fetchval("select finish_chapter($1, 'writer')", gen)
    pending = [j for j in await embedding_jobs(conn, chapter) if j["status"] == "pending"]
    assert len(pending) == 1
    job2 = await claim_embedding(conn)
    assert (await store(conn, job2, chapter, text=new_text, cut=[(0, 24), (26, 43)]))[
        "status"
    ] == "stored"
    assert [
        r["content"]
        for r in await conn.fetch("select content from story_passages order by ordinal")
    ] == ["A different chapter now.", "With other words."]
    assert await conn.fetchval("select count(*) from chapters where story_id = $1", story) == 1


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        (lambda p: p[0].update(embedding=[0.1] * 5), "768"),
        (lambda p: p[0].update(embedding=[0.5] * 768), "unit length"),
        (lambda p: p[0].update(content="not the text"), "chapter text at its offsets"),
        (lambda p: p[0].update(start_offset=-1), "offsets"),
        (lambda p: p[0].update(ordinal="1; drop table x"), "ordinal"),
        (lambda p: p.append("x"), "not an object"),
    ],
)
async def test_bad_passages_are_refused_whole(conn, memory, mutate, fragment) -> None:
    _user, _story, chapter = await story_with_chapter(conn)
    job = await claim_embedding(conn)
    source = json.loads(await conn.fetchval("select chapter_embedding_source($1, 'embedder')", job))
    passages = json.loads(passages_json(TEXT, [basis((0, 1.0))], CUT[:1]))
    mutate(passages)
    with pytest.raises(asyncpg.PostgresError) as err:
        await conn.fetchval(
            "select replace_chapter_passages($1, 'embedder', $2, $3, 'm1', $4)",
            job,
            chapter,
            source["content_md5"],
            json.dumps(passages),
        )
    assert err.value.sqlstate == "PT400" and fragment in str(err.value)
    assert await conn.fetchval("select count(*) from story_passages") == 0


async def test_a_job_cannot_write_another_chapters_passages(conn, memory) -> None:
    _user, _story, first = await story_with_chapter(conn)
    other_user = await create_user(conn)
    other_story = await create_story(conn, other_user)
    second, _ = await write_chapter(conn, other_story, other_user, 1, TEXT)
    job = await claim_embedding(conn)
    mine = await conn.fetchval(
        "select job_payload ->> 'chapter_id' from job_queue where id = $1", job
    )
    target = second if mine == first else first
    md5 = await conn.fetchval("select md5($1::text)", TEXT)
    with pytest.raises(asyncpg.PostgresError) as err:
        await conn.fetchval(
            "select replace_chapter_passages($1, 'embedder', $2, $3, 'm1', $4)",
            job,
            target,
            md5,
            passages_json(TEXT, [basis((0, 1.0))], CUT[:1]),
        )
    assert err.value.sqlstate == "PT403"
    assert await conn.fetchval("select count(*) from story_passages") == 0


async def test_owners_read_only_their_own_passages(conn, memory) -> None:
    a, _story_a, chapter_a = await story_with_chapter(conn)
    b = await create_user(conn)
    story_b = await create_story(conn, b)
    chapter_b, _ = await write_chapter(conn, story_b, b, 1, TEXT)
    stored = set()
    for _ in range(2):
        job = await claim_embedding(conn)
        payload_chapter = await conn.fetchval(
            "select job_payload ->> 'chapter_id' from job_queue where id = $1", job
        )
        assert (await store(conn, job, payload_chapter))["status"] == "stored"
        stored.add(payload_chapter)
    assert stored == {chapter_a, chapter_b}
    async with as_role(conn, "authenticated", b):
        seen = await conn.fetch("select chapter_id, owner_id from story_passages")
        assert {str(r["chapter_id"]) for r in seen} == {chapter_b}
        assert (
            await conn.fetchval(
                "select count(*) from story_passages where chapter_id = $1", chapter_a
            )
            == 0
        )
    async with as_role(conn, "authenticated", a):
        assert {
            str(r["chapter_id"]) for r in await conn.fetch("select chapter_id from story_passages")
        } == {chapter_a}
    async with as_role(conn, "anon"):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.fetch("select * from story_passages")
    for sql in (
        "delete from story_passages",
        "update story_passages set content = 'x'",
        "insert into story_passages (chapter_id, ordinal) values (gen_random_uuid(), 0)",
        "select * from match_story_passages(gen_random_uuid(), 'w', '[]', 'm1')",
        "select * from enqueue_chapter_embeddings(null, true)",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with as_role(conn, "authenticated", b):
                await conn.execute(sql)


async def generating(conn, story, user, number):
    chapter = await create_chapter(conn, story, user, number)
    async with as_role(conn, "authenticated", user):
        job = await conn.fetchval("select enqueue_chapter_generation($1, '{}')", chapter)
    await conn.fetchrow("select * from claim_next_job_v3('gen', array['chapter_generation'], null)")
    return str(job)


async def test_retrieval_looks_only_at_earlier_chapters_of_the_story(conn, memory) -> None:
    user = await create_user(conn)
    story = await create_story(conn, user)
    chapters = {}
    for n in (1, 2, 4):
        chapters[n], _ = await write_chapter(conn, story, user, n, TEXT)
        job = await claim_embedding(conn)
        vectors = [basis((n, 1.0)), basis((n, 0.6), (100, 0.8)), basis((200, 1.0))]
        assert (await store(conn, job, chapters[n], vectors=vectors))["status"] == "stored"
    job3 = await generating(conn, story, user, 3)

    async def match(query, k=4, threshold=0.5, carried=None, worker="gen"):
        rows = await conn.fetch(
            "select * from match_story_passages($1, $2, $3, 'm1', $4, $5, $6)",
            job3,
            worker,
            json.dumps(query),
            k,
            threshold,
            json.dumps(carried or {}),
        )
        return [(r["chapter_number"], r["ordinal"], round(r["similarity"], 3)) for r in rows]

    assert await conn.fetchval("select story_memory_size($1, 'gen', 'm1')", job3) == 6
    assert await conn.fetchval("select story_memory_size($1, 'gen', 'm2')", job3) == 0
    assert await conn.fetchval("select story_memory_size($1, 'other', 'm1')", job3) is None
    # Chapter 4 is later: never retrieved, however close.
    assert await match(basis((4, 1.0))) == []
    assert await match(basis((2, 1.0))) == [(2, 0, 1.0), (2, 1, 0.6)]
    assert await match(basis((2, 1.0)), k=1) == [(2, 0, 1.0)]
    assert await match(basis((2, 1.0)), threshold=0.9) == [(2, 0, 1.0)]
    assert await match(basis((100, 1.0))) == [(1, 1, 0.8), (2, 1, 0.8)]
    # Passage 2 of each chapter lies inside a carried tail of 30 characters: left out.
    assert await match(basis((200, 1.0))) == [(1, 2, 1.0), (2, 2, 1.0)]
    assert await match(basis((200, 1.0)), carried={"2": 30}) == [(1, 2, 1.0)]
    assert await match(basis((200, 1.0)), carried={"1": 30, "2": "x"}) == [(2, 2, 1.0)]
    # The same answers through the HNSW index (the path of stories over 20,000 passages).
    await conn.execute("set genworker.memory_exact_max = 0")
    try:
        assert await match(basis((2, 1.0))) == [(2, 0, 1.0), (2, 1, 0.6)]
        assert await match(basis((100, 1.0))) == [(1, 1, 0.8), (2, 1, 0.8)]
        assert await match(basis((200, 1.0)), carried={"2": 30}) == [(1, 2, 1.0)]
        assert await match(basis((4, 1.0))) == []
    finally:
        await conn.execute("reset genworker.memory_exact_max")
    # A worker that does not hold the job gets nothing.
    assert await match(basis((2, 1.0)), worker="other") == []
    for bad in ([0.1] * 3, {"a": 1}, [0.5] * 768):
        with pytest.raises(asyncpg.PostgresError) as err:
            await match(bad)
        assert err.value.sqlstate == "PT400"
    with pytest.raises(asyncpg.PostgresError) as err:
        await match(basis((2, 1.0)), k=0)
    assert err.value.sqlstate == "PT400"


async def test_without_pgvector_the_migration_creates_nothing_and_chapters_complete(
    pg_server,
) -> None:
    """The guarded path, on any server: the memory part is skipped (as where pgvector is
    absent), every migration applies, and a chapter completes with no embedding job."""
    dsn = await pg_server.create_empty_database()
    conn = await asyncpg.connect(dsn)
    notices: list[str] = []
    conn.add_log_listener(lambda _c, m: notices.append(m.message))
    try:
        await conn.execute("set genworker.story_memory = 'off'")
        await apply_bootstrap(conn)
        assert await apply_migrations(conn) == [m.version for m in migrations()]
        assert any("story memory skipped" in n for n in notices)
        assert await conn.fetchval("select to_regclass('public.story_passages')") is None
        assert (
            await conn.fetchval(
                "select count(*) from pg_proc where proname in"
                " ('match_story_passages', 'replace_chapter_passages', 'chapters_story_memory')"
            )
            == 0
        )
        user = await create_user(conn)
        story = await create_story(conn, user)
        chapter, _job = await write_chapter(conn, story, user, 1, TEXT)
        assert await conn.fetchval("select status from chapters where id = $1", chapter) == (
            "completed"
        )
        assert (
            await conn.fetchval(
                "select count(*) from job_queue where job_type = 'chapter_embedding'"
            )
            == 0
        )
    finally:
        await conn.close()
        await pg_server.drop_database(dsn)
