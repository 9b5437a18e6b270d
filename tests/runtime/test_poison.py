"""Issue 8, finding 1: one job's payload cannot stop a worker (the crash repro, end to end).

A "legacy" poison row is one stored before the payload trigger existed: the test turns
``job_queue_check_payload`` off as superuser, inserts it ahead of a valid chapter job, and
turns the trigger back on. The app's own path (the enqueue RPC, as a signed-in user over
asyncpg and over the real supabase-py client) refuses the same input at the door.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import asyncpg
import pytest
from postgrest.exceptions import APIError
from supabase import AsyncClientOptions, acreate_client

from tests.runtime.conftest import running, wait_until
from tests.runtime.test_process import worker_env, worker_process
from tests.support.postgrest_gateway import make_token, start_gateway
from tests.support.seed import as_role, chapter_job, create_chapter, create_story, create_user
from tests.support.stores import JWT_SECRET, open_store
from worker.generation.chapter import ChapterHandler, GenerationConfig
from worker.generation.offline import OfflineModel
from worker.handlers import build_handlers

pytestmark = pytest.mark.slow

# The repro, as SQL: 2,000 levels (PostgreSQL stores up to 10,000; Python's JSON
# decoder stops near 1,000).
DEEP_SQL = "('{\"x\":' || repeat('[', 2000) || repeat(']', 2000) || '}')::jsonb"
POISONS = {"deep": DEEP_SQL, "not_an_object": "'\"hello\"'::jsonb"}
SMALL = {"sections": 2, "target_words": 200}
MAX_LINE = 20_000


async def insert_legacy_poison(conn: asyncpg.Connection, payload_sql: str, **cols: Any) -> str:
    """A chapter_generation row the door would refuse, stored as if before the door existed."""
    names = ", ".join(["job_type", "job_payload", "priority", *cols])
    values = ", ".join(
        ["'chapter_generation'", payload_sql, "10", *(f"${i + 1}" for i in range(len(cols)))]
    )
    async with conn.transaction():
        await conn.execute("alter table job_queue disable trigger job_queue_check_payload")
        job = await conn.fetchval(
            f"insert into job_queue ({names}) values ({values}) returning id", *cols.values()
        )
        await conn.execute("alter table job_queue enable trigger job_queue_check_payload")
    # The trigger is back: the same payload is refused now.
    with pytest.raises(asyncpg.PostgresError) as refused:
        await conn.execute(
            "insert into job_queue (job_type, job_payload)"
            f" values ('chapter_generation', {payload_sql})"
        )
    assert refused.value.sqlstate == "PT400"
    return str(job)


async def job_row(conn: asyncpg.Connection, job: str) -> asyncpg.Record:
    return await conn.fetchrow(
        "select status, retry_count, error_details, started_at, completed_at"
        " from job_queue where id = $1",
        job,
    )


@pytest.mark.parametrize("poison", sorted(POISONS))
async def test_worker_process_survives_a_legacy_poison_row(
    db_dsn: str, conn: asyncpg.Connection, poison: str
) -> None:
    """The issue's crash loop, in one run of a real worker process: it stays up, fails the
    poison once as bad_payload, and completes the valid job queued behind it."""
    _, chapter, valid = await chapter_job(conn, options=SMALL)
    bad = await insert_legacy_poison(conn, POISONS[poison])
    with worker_process(worker_env(db_dsn, WORKER_ID=f"poison-{poison}")) as proc:
        await wait_until(
            lambda: conn.fetchval(
                "select count(*) = 2 from job_queue where status in ('completed', 'failed')"
                " and job_type <> 'chapter_embedding'"  # story memory's job for the chapter
            ),
            timeout=60,
        )
        alive = proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 20)
        output = proc.stdout.read().decode()  # type: ignore[union-attr]
    assert alive, output[-5000:]
    assert code == 0, output[-5000:]

    row = await job_row(conn, bad)
    details = json.loads(row["error_details"])
    assert (row["status"], row["retry_count"]) == ("failed", 0), details
    assert details["type"] == "bad_payload" and details["retryable"] is False
    assert details["will_retry"] is False and details["attempt"] == 1
    assert "payload cannot be read" in details["message"]
    assert "retried" not in details["user_message"]
    # Queued behind it (lower priority), and done once the poison was out of the way.
    ok = await job_row(conn, valid)
    assert ok["status"] == "completed" and ok["retry_count"] == 0
    assert row["started_at"] <= ok["started_at"]
    assert await conn.fetchval("select status from chapters where id = $1", chapter) == (
        "completed"
    )
    # Exactly one attempt at the poison, and the process said why in a bounded line.
    events = await conn.fetch("select to_status from job_events where job_id = $1 order by id", bad)
    assert [e["to_status"] for e in events].count("processing") == 1
    lines = output.splitlines()
    assert all(len(line) <= MAX_LINE for line in lines)
    records = [json.loads(line) for line in lines if line.startswith("{")]
    assert any(
        r.get("job_id") == bad and "bad_payload" in r["msg"] and r["level"] == "ERROR"
        for r in records
    ), output[-5000:]
    assert not any(r["level"] == "CRITICAL" for r in records)
    assert "Traceback" not in output


@contextmanager
def recursion_limit(limit: int) -> Iterator[None]:
    """supabase-js (the app) sends any depth; Python's json needs room to build the same body."""
    before = sys.getrecursionlimit()
    sys.setrecursionlimit(limit)
    try:
        yield
    finally:
        sys.setrecursionlimit(before)


async def own_chapter(conn: asyncpg.Connection) -> tuple[str, str]:
    user = await create_user(conn)
    chapter = await create_chapter(conn, await create_story(conn, user), user)
    return user, chapter


async def assert_nothing_queued(conn: asyncpg.Connection, chapter: str) -> None:
    assert await conn.fetchval("select count(*) from job_queue") == 0
    row = await conn.fetchrow(
        "select status, generation_job_id from chapters where id = $1", chapter
    )
    assert (row["status"], row["generation_job_id"]) == ("draft", None)


async def test_the_repro_call_is_refused_at_the_door_as_authenticated(
    conn: asyncpg.Connection,
) -> None:
    user, chapter = await own_chapter(conn)
    with pytest.raises(asyncpg.PostgresError) as err:
        async with as_role(conn, "authenticated", user):
            await conn.fetchval(f"select enqueue_chapter_generation($1, {DEEP_SQL})", chapter)
    assert err.value.sqlstate == "PT400"
    assert "unknown key 'x'" in str(err.value)  # names the offending key
    # The same depth under a documented key is refused for its type, not stored.
    with pytest.raises(asyncpg.PostgresError) as err:
        async with as_role(conn, "authenticated", user):
            await conn.fetchval(
                "select enqueue_chapter_generation($1, jsonb_build_object('genre',"
                " (repeat('[', 2000) || repeat(']', 2000))::jsonb))",
                chapter,
            )
    assert err.value.sqlstate == "PT400" and "p_options.genre" in str(err.value)
    # The operator path: a non-object or too-deep payload is refused there too.
    for payload_sql, needle in (
        ("'\"hello\"'::jsonb", "must be a JSON object, not string"),
        (DEEP_SQL, "nested too deeply"),
    ):
        with pytest.raises(asyncpg.PostgresError) as err:
            async with as_role(conn, "service_role"):
                await conn.fetchval(f"select enqueue_job('chapter_generation', {payload_sql})")
        assert err.value.sqlstate == "PT400" and needle in str(err.value)
    await assert_nothing_queued(conn, chapter)


async def test_the_repro_call_is_refused_through_supabase_py(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    """The app's real client: the door answers PostgREST's error with code PT400."""
    user, chapter = await own_chapter(conn)
    deep: Any = []
    for _ in range(1999):
        deep = [deep]
    gateway = await start_gateway(db_dsn, JWT_SECRET)
    try:
        anon = make_token(JWT_SECRET, "anon")
        client = await acreate_client(
            gateway.url,
            anon,
            options=AsyncClientOptions(
                headers={"Authorization": f"Bearer {make_token(JWT_SECRET, 'authenticated', user)}"}
            ),
        )
        with recursion_limit(12_000), pytest.raises(APIError) as err:
            await client.rpc(
                "enqueue_chapter_generation", {"p_chapter_id": chapter, "p_options": {"x": deep}}
            ).execute()
        assert err.value.code == "PT400", err.value
        assert "unknown key" in (err.value.message or "")
        service = await acreate_client(gateway.url, make_token(JWT_SECRET, "service_role"))
        with pytest.raises(APIError) as err:
            await service.rpc(
                "enqueue_job", {"p_job_type": "chapter_generation", "p_job_payload": "hello"}
            ).execute()
        assert err.value.code == "PT400" and "JSON object" in (err.value.message or "")
    finally:
        await gateway.close()
    await assert_nothing_queued(conn, chapter)


GEN = GenerationConfig(
    default_model="offline",
    allowed_models=["offline"],
    flush_interval_s=0.05,
    flush_chars=2000,
    section_retries=0,
    retry_pause_s=0.01,
    max_rate_limit_wait_s=1,
)


async def test_rest_store_claim_loop_survives_a_not_an_object_poison(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    """Over the Data API the non-object row decodes, so it fails at once as on asyncpg."""
    _, _, valid = await chapter_job(conn, options=SMALL)
    bad = await insert_legacy_poison(conn, POISONS["not_an_object"])
    handlers = build_handlers(ChapterHandler(OfflineModel(chunk_delay_s=0), GEN))
    async with open_store("supabase", db_dsn) as store, running(store, handlers) as runner:
        await wait_until(
            lambda: conn.fetchval(
                "select count(*) = 2 from job_queue where status in ('completed', 'failed')"
                " and job_type <> 'chapter_embedding'"  # story memory's job for the chapter
            ),
            timeout=60,
        )
        assert runner.side_tasks_alive
    row = await job_row(conn, bad)
    details = json.loads(row["error_details"])
    assert (row["status"], row["retry_count"], details["type"]) == ("failed", 0, "bad_payload")
    assert (await job_row(conn, valid))["status"] == "completed"
    assert runner.fatal is None
    assert runner.metrics.failed.labels("chapter_generation", "bad_payload")._value.get() == 1


async def test_rest_store_claim_loop_survives_a_too_deep_poison(
    db_dsn: str, conn: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    """What does happen over the Data API to a row too deep for supabase-py to decode.

    The claim commits in the database but its answer cannot be decoded, so the worker never
    learns the job's id: that claim counts as a store error and the loop backs off and goes
    on (the valid job completes). The poison is not failed at once: its lease lapses and the
    next claim's sweep ends it as ``lease_expired`` once its retries are used (none here).
    The database's payload trigger is what keeps such rows out of the queue.
    """
    _, _, valid = await chapter_job(conn, options=SMALL)
    bad = await insert_legacy_poison(conn, POISONS["deep"], lease_timeout_s=1, max_retries=0)
    caplog.set_level(logging.WARNING, logger="worker.runner")
    handlers = build_handlers(ChapterHandler(OfflineModel(chunk_delay_s=0), GEN))
    async with open_store("supabase", db_dsn) as store, running(store, handlers) as runner:
        await wait_until(
            lambda: conn.fetchval(
                "select status = 'completed' from job_queue where id = $1", valid
            ),
            timeout=60,
        )
        await wait_until(
            lambda: conn.fetchval("select status = 'failed' from job_queue where id = $1", bad),
            timeout=60,
        )
        assert runner.side_tasks_alive
    assert runner.fatal is None
    # Counted as a failed claim (a StoreError saying why), not as an unexpected loop error.
    assert runner.metrics.store_errors.labels("claim")._value.get() >= 1
    assert runner.metrics.claim_loop_errors._value.get() == 0
    assert any(
        r.name == "worker.runner" and "nested too deeply to decode" in r.getMessage()
        for r in caplog.records
    )
    row = await job_row(conn, bad)
    details = json.loads(row["error_details"])
    assert (row["status"], row["retry_count"]) == ("failed", 0)
    assert details["type"] == "lease_expired" and details["worker_id"] == "test-worker"
