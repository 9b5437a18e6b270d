"""The dashboard's SQL functions (20261201005000_dashboard.sql) on real PostgreSQL.

Its actions use admin_*_job (tested in test_operator_controls.py) and requeue_failed_jobs.
"""

from __future__ import annotations

import json
import uuid

import asyncpg
import pytest

from tests.support.seed import FAIL_UPDATE, as_role, chapter_job, claim, insert_jobs

DASHBOARD_FUNCTIONS = (
    "dashboard_overview(integer)",
    "dashboard_jobs(text, text, uuid, timestamptz, timestamptz, integer, integer)",
    "dashboard_job(uuid)",
    "dashboard_live()",
)


async def value(conn: asyncpg.Connection, sql: str, *args: object) -> dict:
    return json.loads(await conn.fetchval(sql, *args))


@pytest.mark.parametrize("signature", DASHBOARD_FUNCTIONS)
async def test_operators_only(conn: asyncpg.Connection, signature: str) -> None:
    for role, allowed in (
        ("service_role", True),
        ("authenticated", False),
        ("anon", False),
        ("public", False),
    ):
        assert (
            await conn.fetchval(
                "select has_function_privilege($1, $2, 'execute')", role, f"public.{signature}"
            )
            is allowed
        ), role


async def test_app_users_cannot_call_them(conn: asyncpg.Connection) -> None:
    _, _, job = await chapter_job(conn)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with as_role(conn, "authenticated", str(uuid.uuid4())):
            await conn.fetchval("select dashboard_job($1)", job)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with as_role(conn, "anon"):
            await conn.fetchval("select dashboard_overview()")


async def test_overview(conn: asyncpg.Connection) -> None:
    await insert_jobs(conn, 2, job_type="a", lane="fast")
    await insert_jobs(conn, 1, job_type="b")
    done = (await claim(conn, "worker-1", ["b"]))["job_id"]
    await conn.fetchval("select complete_job($1, 'worker-1', '{}')", done)
    held = (await claim(conn, "worker-2", ["a"]))["job_id"]
    await conn.execute(
        "update job_queue set heartbeat_at = now() - interval '1 hour' where id = $1", held
    )
    o = await value(conn, "select dashboard_overview()")
    assert o["by_status"] == {"pending": 1, "processing": 1, "completed": 1}
    assert {"job_lane": "fast", "status": "pending", "count": 1} in o["by_lane"]
    assert {"job_lane": "default", "status": "completed", "count": 1} in o["by_lane"]
    assert o["last_hour_outcomes"] == {"completed": 1, "failed": 0, "cancelled": 0}
    assert len(o["completed_per_minute"]) == 60 and sum(o["completed_per_minute"]) == 1
    assert o["completed_per_minute"][0] == 1
    workers = {w["worker_id"]: w for w in o["workers"]}
    assert workers["worker-1"]["in_flight"] == 0 and workers["worker-1"]["finished_recently"] == 1
    assert workers["worker-2"]["in_flight"] == 1 and workers["worker-2"]["stale"] == 1
    assert o["oldest_pending_age_s"] >= 0 and o["last_hour"]["completed"] == 1


async def test_jobs_filters_and_pages(conn: asyncpg.Connection) -> None:
    user, _, chapter_job_id = await chapter_job(conn)
    ids = await insert_jobs(conn, 5, job_type="noop")
    row = await claim(conn, "w", ["noop"])
    await conn.fetch(FAIL_UPDATE, row["job_id"], "w", "failed", 3, None, '{"type": "boom"}')

    page = await value(conn, "select dashboard_jobs(p_limit => 4)")
    assert len(page["jobs"]) == 4 and page["has_more"] is True
    rest = await value(conn, "select dashboard_jobs(p_limit => 4, p_offset => 4)")
    assert len(rest["jobs"]) == 2 and rest["has_more"] is False
    seen = [j["id"] for j in page["jobs"] + rest["jobs"]]
    assert sorted(seen) == sorted([*ids, chapter_job_id])

    failed = await value(conn, "select dashboard_jobs(p_status => 'failed')")
    assert [(j["id"], j["error_type"]) for j in failed["jobs"]] == [(str(row["job_id"]), "boom")]
    mine = await value(conn, "select dashboard_jobs(p_user_id => $1)", user)
    assert [j["id"] for j in mine["jobs"]] == [chapter_job_id]
    typed = await value(conn, "select dashboard_jobs(p_job_type => 'chapter_generation')")
    assert [j["id"] for j in typed["jobs"]] == [chapter_job_id]
    future = await value(conn, "select dashboard_jobs(p_created_from => now() + interval '1 day')")
    assert future["jobs"] == []
    past = await value(conn, "select dashboard_jobs(p_created_to => now() + interval '1 day')")
    assert len(past["jobs"]) == 6


@pytest.mark.parametrize(
    "call",
    [
        "dashboard_jobs(p_status => 'exploded')",
        "dashboard_jobs(p_limit => 0)",
        "dashboard_jobs(p_limit => 501)",
        "dashboard_jobs(p_offset => -1)",
        "dashboard_jobs(p_limit => null)",
    ],
)
async def test_jobs_rejects_bad_arguments(conn: asyncpg.Connection, call: str) -> None:
    with pytest.raises(asyncpg.PostgresError) as info:
        await conn.fetchval(f"select {call}")
    assert info.value.sqlstate == "PT400"


async def test_job_detail_with_chapter_and_events(conn: asyncpg.Connection) -> None:
    _, chapter, job = await chapter_job(conn)
    assert (await claim(conn, "w"))["job_id"] is not None
    await conn.fetchval("select start_chapter_generation($1, 'w', 100)", job)
    await conn.fetchval(
        "select append_chapter_content($1, 'w', 0, 'Once upon a time.', 40, 'section 1/2')", job
    )
    d = await value(conn, "select dashboard_job($1)", job)
    assert d["job"]["id"] == job and d["job"]["status"] == "processing"
    assert json.loads(d["job"]["payload_text"])["chapter_id"] == chapter
    assert "job_payload" not in d["job"] and d["job"]["error_details_text"] is None
    assert d["chapter"]["id"] == chapter and d["chapter"]["linked"] is True
    assert d["chapter"]["content"] == "Once upon a time." and d["chapter"]["progress"] == 40
    assert [(e["from_status"], e["to_status"]) for e in d["events"]] == [
        (None, "pending"),
        ("pending", "processing"),
    ]
    assert d["events_total"] == 2
    assert await conn.fetchval("select dashboard_job($1)", str(uuid.uuid4())) is None


async def test_job_detail_survives_a_deeply_nested_payload(conn: asyncpg.Connection) -> None:
    # Rows stored before the payload limits (20261201000100) may be any size and depth.
    await conn.execute("set session_replication_role = replica")  # seed past the checks
    deep = '{"x":' + "[" * 3000 + "]" * 3000 + "}"
    job = await conn.fetchval(
        "insert into job_queue (job_type, job_payload, lease_timeout_s)"
        " values ('noop', $1::text::jsonb, 60)"
        " returning id",
        deep,
    )
    d = await value(conn, "select dashboard_job($1)", job)  # json.loads of the envelope: fine
    assert d["job"]["payload_bytes"] >= 6000
    assert isinstance(d["job"]["payload_text"], str) and len(d["job"]["payload_text"]) <= 100000


async def test_live_lists_processing_jobs_with_chapter_progress(conn: asyncpg.Connection) -> None:
    _, chapter, job = await chapter_job(conn)
    await insert_jobs(conn, 1)
    assert str((await claim(conn, "w", ["chapter_generation"]))["job_id"]) == job
    await conn.fetchval("select start_chapter_generation($1, 'w', 100)", job)
    await conn.fetchval(
        "select append_chapter_content($1, 'w', 0, 'Héllo', 55, 'section 2/4')", job
    )
    live = await value(conn, "select dashboard_live()")
    [row] = live["jobs"]
    assert row["job_id"] == job and row["chapter_id"] == chapter and row["worker_id"] == "w"
    assert row["progress"] == 55 and row["current_step"] == "section 2/4"
    assert row["text_bytes"] == len("Héllo".encode()) and row["stale"] is False
