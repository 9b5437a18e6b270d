"""claim_next_job_v3: exactly once, ordering, filters, rescue, exhaustion, fencing."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import asyncpg

from tests.support.seed import (
    claim,
    create_chapter,
    create_story,
    create_user,
    fail,
    insert_jobs,
)
from worker.store.transport import FAIL_UPDATE


async def test_exactly_once_2000_jobs_16_claimers(db_dsn: str, conn: asyncpg.Connection) -> None:
    ids = await insert_jobs(conn, 2000)
    seen: list[str] = []

    async def claimer(n: int) -> None:
        c = await asyncpg.connect(db_dsn)
        try:
            while (row := await claim(c, f"w-{n}")) is not None:
                seen.append(str(row["job_id"]))
                assert await c.fetchval(
                    "select complete_job($1, $2, '{}')", row["job_id"], f"w-{n}"
                )
        finally:
            await c.close()

    await asyncio.gather(*(claimer(n) for n in range(16)))
    assert len(seen) == 2000
    assert sorted(seen) == sorted(ids)
    left = await conn.fetchval("select count(*) from job_queue where status <> 'completed'")
    assert left == 0


async def test_claim_returns_partial_row_and_sets_ownership(conn: asyncpg.Connection) -> None:
    [jid] = await insert_jobs(conn, 1, job_type="t")
    row = await claim(conn, "w-1")
    assert set(row.keys()) == {"job_id", "job_type", "job_payload", "retry_count"}
    assert str(row["job_id"]) == jid and row["job_type"] == "t" and row["retry_count"] == 0
    assert json.loads(row["job_payload"]) == {"n": 1}
    job = await conn.fetchrow("select * from job_queue where id = $1", jid)
    assert job["status"] == "processing" and job["worker_id"] == "w-1"
    assert job["heartbeat_at"] is not None and job["started_at"] is not None
    assert await claim(conn, "w-2") is None


async def test_insert_with_only_type_and_payload(conn: asyncpg.Connection) -> None:
    row = await conn.fetchrow(
        "insert into job_queue (job_type, job_payload) values ('x', '{}') returning *"
    )
    assert row["status"] == "pending" and row["job_lane"] == "default"
    assert row["max_retries"] == 3 and row["lease_timeout_s"] == 60 and row["priority"] == 0


async def test_priority_then_schedule_order(conn: asyncpg.Connection) -> None:
    low = await insert_jobs(conn, 1, priority=0)
    high = await insert_jobs(conn, 1, priority=10)
    mid = await insert_jobs(conn, 1, priority=5)
    got = [str((await claim(conn, "w"))["job_id"]) for _ in range(3)]
    assert got == high + mid + low


async def test_future_job_not_claimable(conn: asyncpg.Connection) -> None:
    await insert_jobs(conn, 1, delay_s=60)
    assert await claim(conn, "w") is None
    await conn.execute("update job_queue set scheduled_at = now() - interval '1 second'")
    assert await claim(conn, "w") is not None


async def test_type_and_lane_filters(conn: asyncpg.Connection) -> None:
    await insert_jobs(conn, 1, job_type="a", lane="fast")
    await insert_jobs(conn, 1, job_type="b", lane="slow")
    assert await claim(conn, "w", ["c"]) is None
    assert await claim(conn, "w", None, ["other"]) is None
    assert (await claim(conn, "w", ["b"]))["job_type"] == "b"
    assert (await claim(conn, "w", [], ["fast"]))["job_type"] == "a"  # empty array = any


async def test_retry_not_claimable_before_scheduled_at(conn: asyncpg.Connection) -> None:
    [jid] = await insert_jobs(conn, 1)
    await claim(conn, "w-1")
    details = json.dumps({"type": "transient", "retryable": True})
    later = await conn.fetchval("select now() + interval '1 hour'")
    assert await fail(conn, jid, "w-1", "pending", 1, later, details) == 1
    job = await conn.fetchrow("select * from job_queue where id = $1", jid)
    assert job["status"] == "pending" and job["retry_count"] == 1 and job["worker_id"] is None
    assert await claim(conn, "w-2") is None
    await conn.execute("update job_queue set scheduled_at = now() where id = $1", jid)
    assert (await claim(conn, "w-2"))["retry_count"] == 1


async def test_rescue_counts_a_retry_and_fences_the_stale_worker(conn: asyncpg.Connection) -> None:
    user = await create_user(conn)
    story = await create_story(conn, user)
    chapter = await create_chapter(conn, story, user)
    jid = await conn.fetchval(
        "insert into job_queue (job_type, job_payload, user_id, lease_timeout_s)"
        " values ('chapter_generation', '{}', $1, 1) returning id",
        user,
    )
    await conn.execute("update chapters set generation_job_id = $1 where id = $2", jid, chapter)
    assert (await claim(conn, "stale"))["job_id"] == jid
    assert await conn.fetchval("select start_chapter_generation($1, 'stale')", jid) is not None
    assert await conn.fetchval(
        "select append_chapter_content($1, 'stale', 0, 'Hello', 20, 's1')", jid
    )
    await asyncio.sleep(1.2)

    rescued = await claim(conn, "fresh")
    assert rescued["job_id"] == jid and rescued["retry_count"] == 1
    job = await conn.fetchrow("select * from job_queue where id = $1", jid)
    assert job["worker_id"] == "fresh"
    assert json.loads(job["error_details"])["type"] == "lease_expired"

    # The stale worker can change nothing any more.
    assert await conn.fetchval("select update_job_heartbeat($1, 'stale')", jid) is False
    assert await conn.fetchval("select complete_job($1, 'stale', '{}')", jid) is False
    assert (
        await conn.fetchval(
            "select append_chapter_content($1, 'stale', 5, ' world', 30, 's1')", jid
        )
        is False
    )
    assert await conn.fetchval("select save_chapter_outline($1, 'stale', 't', '{}')", jid) is False
    assert await conn.fetchval("select finish_chapter($1, 'stale')", jid) is None
    assert await conn.fetchval("select release_job($1, 'stale')", jid) is False
    assert await fail(conn, jid, "stale", "failed", 1, None, "{}") == 0
    assert await conn.fetchval("select start_chapter_generation($1, 'stale')", jid) is None
    ch = await conn.fetchrow("select content, progress from get_chapter_text($1)", chapter)
    assert ch["content"] == "Hello" and ch["progress"] == 20
    assert (await conn.fetchrow("select status from job_queue where id = $1", jid))[
        "status"
    ] == "processing"
    events = await conn.fetch(
        "select from_status, to_status, worker_id, details from job_events where job_id = $1"
        " order by id",
        jid,
    )
    assert [(e["from_status"], e["to_status"], e["worker_id"]) for e in events] == [
        (None, "pending", None),
        ("pending", "processing", "stale"),
        ("processing", "processing", "fresh"),
    ]
    assert json.loads(events[-1]["details"])["previous_worker"] == "stale"


async def test_exhausted_rescue_fails_the_job(conn: asyncpg.Connection) -> None:
    [jid] = await insert_jobs(conn, 1, lease_timeout_s=1, max_retries=1)
    await claim(conn, "w-1")
    await asyncio.sleep(1.2)
    assert (await claim(conn, "w-2"))["retry_count"] == 1
    await asyncio.sleep(1.2)
    assert await claim(conn, "w-3") is None
    job = await conn.fetchrow("select * from job_queue where id = $1", jid)
    assert job["status"] == "failed" and job["completed_at"] is not None
    details = json.loads(job["error_details"])
    assert details["type"] == "lease_expired" and details["retryable"] is False
    assert details["worker_id"] == "w-2" and "retries" in details["message"]


async def test_heartbeat_many_returns_only_held_jobs(conn: asyncpg.Connection) -> None:
    ids = await insert_jobs(conn, 3)
    for _ in ids:
        await claim(conn, "w-1")
    await conn.execute("update job_queue set status = 'cancelled' where id = $1", ids[0])
    held = await conn.fetch("select * from heartbeat_jobs('w-1', $1::uuid[])", ids)
    assert sorted(str(r[0]) for r in held) == sorted(ids[1:])
    assert await conn.fetch("select * from heartbeat_jobs('w-2', $1::uuid[])", ids) == []


async def test_complete_is_fenced_and_idempotent(conn: asyncpg.Connection) -> None:
    [jid] = await insert_jobs(conn, 1)
    await claim(conn, "w-1")
    assert await conn.fetchval("select complete_job($1, 'w-2', '{}')", jid) is False
    assert await conn.fetchval("select complete_job($1, 'w-1', '{\"ok\": 1}')", jid) is True
    assert await conn.fetchval("select complete_job($1, 'w-1', '{\"ok\": 1}')", jid) is True
    job = await conn.fetchrow("select * from job_queue where id = $1", jid)
    assert job["status"] == "completed" and job["progress"] == 100
    assert json.loads(job["job_result"]) == {"ok": 1} and job["completed_at"] is not None


async def test_release_keeps_attempts(conn: asyncpg.Connection) -> None:
    ids = await insert_jobs(conn, 2)
    await claim(conn, "w-1")
    await claim(conn, "w-1")
    assert await conn.fetchval("select release_job($1, 'w-1')", ids[0]) is True
    assert await conn.fetchval("select release_worker_jobs('w-1')") == 1
    rows = await conn.fetch("select status, retry_count, worker_id from job_queue")
    assert {(r["status"], r["retry_count"], r["worker_id"]) for r in rows} == {("pending", 0, None)}


async def test_invalid_transitions_rejected(conn: asyncpg.Connection) -> None:
    [jid] = await insert_jobs(conn, 1)
    await claim(conn, "w")
    await conn.fetchval("select complete_job($1, 'w', '{}')", jid)
    for target in ("processing", "pending", "failed"):
        try:
            await conn.execute("update job_queue set status = $2 where id = $1", jid, target)
        except asyncpg.PostgresError as exc:
            assert exc.sqlstate == "PT409"
            assert f"completed -> {target}" in str(exc)
        else:
            raise AssertionError(f"completed -> {target} was allowed")
    try:
        await conn.execute("insert into job_queue (job_type, status) values ('x', 'completed')")
    except asyncpg.PostgresError as exc:
        assert exc.sqlstate == "PT409"
    else:
        raise AssertionError("inserting a completed job was allowed")


async def test_job_events_are_append_only(conn: asyncpg.Connection) -> None:
    await insert_jobs(conn, 1)
    try:
        await conn.execute("update job_events set to_status = 'failed'")
    except asyncpg.PostgresError as exc:
        assert "append-only" in str(exc)
    else:
        raise AssertionError("job_events was updated")


async def test_claim_requires_worker_id(conn: asyncpg.Connection) -> None:
    try:
        await claim(conn, "")
    except asyncpg.PostgresError as exc:
        assert exc.sqlstate == "PT400"
    else:
        raise AssertionError("empty worker id accepted")


async def test_new_pending_job_notifies_listeners(db_dsn: str, conn: asyncpg.Connection) -> None:
    listener = await asyncpg.connect(db_dsn)
    got: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener("genworker_jobs", lambda *a: got.put_nowait(a[3]))
    try:
        await insert_jobs(conn, 3, job_type="wake")
        assert await asyncio.wait_for(got.get(), 5) == "wake"
    finally:
        await listener.close()


async def test_rescue_and_ready_jobs_compete_by_priority(conn: asyncpg.Connection) -> None:
    [stale] = await insert_jobs(conn, 1, lease_timeout_s=1, priority=0)
    await claim(conn, "dead")
    [urgent] = await insert_jobs(conn, 1, priority=5)
    [normal] = await insert_jobs(conn, 1, priority=0)
    await asyncio.sleep(1.2)
    got = [str((await claim(conn, "w"))["job_id"]) for _ in range(3)]
    assert got == [urgent, stale, normal]  # on a priority tie the rescue goes first


def test_readme_shows_the_failure_update_the_worker_sends() -> None:
    """The README's SQL copy of the failure UPDATE is FAIL_UPDATE, whitespace aside."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = re.findall(r"```sql\n(.*?)```", readme, flags=re.S)
    copies = [b for b in blocks if "update public.job_queue" in b]
    assert len(copies) == 1, "README has one SQL copy of the failure UPDATE"
    assert " ".join(copies[0].rstrip().rstrip(";").split()) == " ".join(FAIL_UPDATE.split())
