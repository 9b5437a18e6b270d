"""Operations: queue stats, retention, requeue, and the claim's query plan."""

from __future__ import annotations

import json

import asyncpg
import pytest

from tests.support.seed import claim, create_user, fail, insert_jobs
from worker.devdb import find_pg_bin


async def test_queue_stats(conn: asyncpg.Connection) -> None:
    await insert_jobs(conn, 3, job_type="a")
    await insert_jobs(conn, 1, job_type="b")
    [done] = [str((await claim(conn, "w", ["b"]))["job_id"])]
    await conn.fetchval("select complete_job($1, 'w', '{}')", done)
    stats = json.loads(await conn.fetchval("select queue_stats()"))
    assert stats["by_status"] == {"pending": 3, "completed": 1}
    assert {"job_type": "a", "status": "pending", "count": 3} in stats["by_type"]
    assert stats["oldest_pending_age_s"] >= 0
    assert stats["last_hour"]["completed"] == 1 and stats["last_hour"]["p95_run_s"] >= 0


async def test_purge_finished_jobs(conn: asyncpg.Connection) -> None:
    ids = await insert_jobs(conn, 3)
    for _ in range(2):
        row = await claim(conn, "w")
        await conn.fetchval("select complete_job($1, 'w', '{}')", row["job_id"])
    await conn.execute(
        "update job_queue set completed_at = now() - interval '10 days' where status = 'completed'"
    )
    assert await conn.fetchval("select purge_finished_jobs(7)") == 2
    assert await conn.fetchval("select purge_finished_jobs(7)") == 0
    assert await conn.fetchval("select count(*) from job_queue") == 1
    assert (
        await conn.fetchval(
            "select count(*) from job_events where job_id = any($1::uuid[])", ids[:2]
        )
        <= 3
    )  # events of the purged jobs went with them


async def test_requeue_failed_jobs(conn: asyncpg.Connection) -> None:
    ids = await insert_jobs(conn, 2, job_type="x")
    for _ in ids:
        row = await claim(conn, "w")
        assert await fail(conn, row["job_id"], "w", "failed", 3, None, '{"type": "boom"}') == 1
    back = await conn.fetch("select * from requeue_failed_jobs(p_job_ids => $1::uuid[])", ids[:1])
    assert [str(r[0]) for r in back] == ids[:1]
    job = await conn.fetchrow("select * from job_queue where id = $1", ids[0])
    assert job["status"] == "pending" and job["retry_count"] == 0 and job["error_details"] is None
    assert len(await conn.fetch("select * from requeue_failed_jobs(p_job_type => 'x')")) == 1
    assert await conn.fetchval("select count(*) from job_queue where status = 'pending'") == 2


@pytest.mark.parametrize("analyzed", [False, True])
async def test_claim_plan_uses_an_index(conn: asyncpg.Connection, analyzed: bool) -> None:
    """100,000 finished jobs, 10,000 pending of one user plus a few of others: neither claim
    function scans the table, with planner statistics or without (a fresh burst), and in
    the cached generic plan as well as a custom one."""
    await conn.execute("set session_replication_role = replica")  # seed without triggers
    await conn.execute(
        "insert into job_queue (job_type, status, lease_timeout_s, completed_at)"
        " select 'done', 'completed', 60, now() from generate_series(1, 100000)"
    )
    users = [await create_user(conn) for _ in range(4)]
    await conn.execute(
        "insert into job_queue (job_type, user_id, lease_timeout_s)"
        " select 'noop', $1, 60 from generate_series(1, 10000)",
        users[0],
    )
    for u in users[1:]:
        await conn.execute(
            "insert into job_queue (job_type, user_id, lease_timeout_s)"
            " select 'noop', $1, 60 from generate_series(1, 3)",
            u,
        )
    await conn.execute("set session_replication_role = origin")
    await insert_jobs(conn, 1000)
    if analyzed:
        await conn.execute("analyze job_queue")
    for mode in ("force_custom_plan", "force_generic_plan"):
        await conn.execute(f"set plan_cache_mode = {mode}")
        for _ in range(3):
            for sql in (
                "select * from claim_next_job_v3('plan-guard', null, null)",
                "select * from claim_jobs('plan-guard', null, null, 25, 'gemini-3.5-flash')",
            ):
                async with conn.transaction():
                    assert await conn.fetch(sql)
                    seq = await conn.fetchval(
                        "select seq_scan from pg_stat_xact_user_tables where relname = 'job_queue'"
                    )
                    assert seq == 0, (mode, sql)
    plan = await _claim_plan(conn)
    if plan is not None:
        assert "job_queue_fair_idx" in plan, plan
        assert "Seq Scan on job_queue " not in plan, plan


async def _load_auto_explain(conn: asyncpg.Connection) -> bool:
    lib = find_pg_bin().parent / "lib" / "auto_explain.so"
    for name in ("auto_explain", str(lib)):
        try:
            await conn.execute(f"load '{name}'")
            return True
        except asyncpg.PostgresError:
            continue
    return False


async def _claim_plan(conn: asyncpg.Connection) -> str | None:
    """The plans of the claim's statements as the function really runs them (auto_explain,
    nested statements); None where the server has no auto_explain module (the seq_scan
    counters above still guard the plan there)."""
    notices: list[str] = []
    conn.add_log_listener(lambda _c, msg: notices.append(msg.message))
    if not await _load_auto_explain(conn):
        return None
    for setting in (
        "auto_explain.log_min_duration = 0",
        "auto_explain.log_nested_statements = on",
        "auto_explain.log_level = notice",
        "client_min_messages = notice",
    ):
        await conn.execute("set " + setting)
    async with conn.transaction():
        await conn.fetch(
            "select * from claim_jobs('plan-guard', null, null, 25, 'gemini-3.5-flash')"
        )
        await conn.execute("select 1")  # let the notices arrive
    return "\n".join(notices)


async def test_realtime_publication_has_chapters_and_jobs(conn: asyncpg.Connection) -> None:
    tables = {
        r["tablename"]
        for r in await conn.fetch(
            "select tablename from pg_publication_tables where pubname = 'supabase_realtime'"
        )
    }
    assert tables == {"chapters", "job_queue"}
    # Default replica identity: no REPLICA IDENTITY FULL on chapters (README "Database").
    assert (
        await conn.fetchval(
            "select relreplident::text from pg_class where oid = 'public.chapters'::regclass"
        )
        == "d"
    )


async def test_every_migration_ends_by_reloading_postgrest() -> None:
    from worker.migrate import migrations

    for mig in migrations():
        assert mig.sql().rstrip().endswith("notify pgrst, 'reload schema';"), mig.path.name
