"""Operator job controls and the chapter read (migration 20261201003000): who may call what,
and one set of rules shared with the app's owner-only cancel/pause/resume."""

from __future__ import annotations

import json

import asyncpg
import pytest

from tests.support.seed import as_role, claim, create_chapter, create_story, create_user

ADMIN = ("admin_cancel_job", "admin_pause_job", "admin_resume_job")


@pytest.fixture
async def owned_job(conn: asyncpg.Connection) -> dict[str, str]:
    user = await create_user(conn)
    chapter = await create_chapter(conn, await create_story(conn, user), user)
    job = str(await conn.fetchval("select admin_enqueue_chapter($1)", chapter))
    return {"user": user, "chapter": chapter, "job": job}


async def status(conn: asyncpg.Connection, job: str) -> str:
    return await conn.fetchval("select status from job_queue where id = $1", job)


async def expect_sqlstate(coro, sqlstate: str) -> str:
    try:
        await coro
    except asyncpg.PostgresError as exc:
        assert exc.sqlstate == sqlstate, (exc.sqlstate, str(exc))
        return str(exc)
    raise AssertionError(f"expected SQLSTATE {sqlstate}")


async def test_operator_pauses_resumes_and_cancels_any_users_job(conn, owned_job) -> None:
    job = owned_job["job"]
    async with as_role(conn, "service_role"):
        assert await conn.fetchval("select admin_resume_job($1)", job) is False  # not paused
        assert await conn.fetchval("select admin_pause_job($1)", job) is True
    assert await status(conn, job) == "paused"
    assert await claim(conn, "w") is None
    async with as_role(conn, "service_role"):
        assert await conn.fetchval("select admin_resume_job($1)", job) is True
    assert await status(conn, job) == "pending"
    assert (await claim(conn, "w"))["retry_count"] == 0  # a resume uses no attempt
    async with as_role(conn, "service_role"):
        assert await conn.fetchval("select admin_cancel_job($1)", job) is True
        assert await conn.fetchval("select admin_cancel_job($1)", job) is False
        assert await conn.fetchval("select admin_pause_job($1)", job) is False
    assert await status(conn, job) == "cancelled"
    assert await conn.fetchval("select update_job_heartbeat($1, 'w')", job) is False
    chapter = await conn.fetchrow("select * from chapters where id = $1", owned_job["chapter"])
    assert chapter["status"] == "cancelled"


async def test_operator_controls_jobs_without_an_owner(conn) -> None:
    job = str(await conn.fetchval("select enqueue_job('noop')"))
    async with as_role(conn, "service_role"):
        assert await conn.fetchval("select admin_cancel_job($1)", job) is True
    assert await status(conn, job) == "cancelled"


async def test_unknown_job_is_not_found(conn) -> None:
    for fn in ADMIN:
        async with as_role(conn, "service_role"):
            msg = await expect_sqlstate(
                conn.fetchval(f"select {fn}('00000000-0000-4000-8000-000000000000')"), "PT404"
            )
        assert "not found" in msg


@pytest.mark.parametrize("role", ["anon", "authenticated"])
async def test_users_cannot_call_operator_functions(conn, owned_job, role: str) -> None:
    for call in [*(f"select {fn}($1)" for fn in ADMIN), "select * from read_chapter($1)"]:
        arg = owned_job["chapter"] if "read_chapter" in call else owned_job["job"]
        async with as_role(conn, role, owned_job["user"]):
            await expect_sqlstate(conn.fetchval(call, arg), "42501")
    assert await status(conn, owned_job["job"]) == "pending"


@pytest.mark.parametrize("role", ["anon", "authenticated", "service_role"])
async def test_nobody_calls_the_shared_body(conn, owned_job, role: str) -> None:
    async with as_role(conn, role, owned_job["user"]):
        await expect_sqlstate(
            conn.fetchval("select genworker_control_job($1, null, 'cancel')", owned_job["job"]),
            "42501",
        )


async def test_app_controls_stay_owner_only(conn, owned_job) -> None:
    other = await create_user(conn)
    async with as_role(conn, "authenticated", other):
        await expect_sqlstate(conn.fetchval("select cancel_job($1)", owned_job["job"]), "PT404")
    async with as_role(conn, "authenticated"):  # no sub claim: not an operator
        await expect_sqlstate(conn.fetchval("select cancel_job($1)", owned_job["job"]), "42501")
    async with as_role(conn, "service_role"):  # the app's functions are not the operator's
        await expect_sqlstate(conn.fetchval("select cancel_job($1)", owned_job["job"]), "42501")
    async with as_role(conn, "authenticated", owned_job["user"]):
        assert await conn.fetchval("select pause_job($1)", owned_job["job"]) is True
        assert await conn.fetchval("select resume_job($1)", owned_job["job"]) is True
        assert await conn.fetchval("select cancel_job($1)", owned_job["job"]) is True
    assert await status(conn, owned_job["job"]) == "cancelled"


async def test_read_chapter_from_an_offset(conn, owned_job) -> None:
    job = owned_job["job"]
    await claim(conn, "w")
    await conn.fetchval("select start_chapter_generation($1, 'w')", job)
    await conn.fetchval(
        "select append_chapter_content($1, 'w', 0, $2, 40, 'writing section 1/2', null)",
        job,
        "Héllo 🌊 sea.",
    )
    async with as_role(conn, "service_role"):
        whole = await conn.fetchrow("select * from read_chapter($1)", owned_job["chapter"])
        tail = await conn.fetchrow("select * from read_chapter($1, 6)", owned_job["chapter"])
        past = await conn.fetchrow("select * from read_chapter($1, 500)", owned_job["chapter"])
        negative = await conn.fetchrow("select * from read_chapter($1, -3)", owned_job["chapter"])
        missing = await conn.fetch(
            "select * from read_chapter('00000000-0000-4000-8000-000000000000')"
        )
    assert whole["content"] == "Héllo 🌊 sea." and whole["content_length"] == 12
    assert whole["status"] == "generating" and whole["progress"] == 40
    assert whole["job_status"] == "processing" and str(whole["job_id"]) == job
    assert (
        tail["content"] == "🌊 sea."
        and past["content"] == ""
        and negative["content"] == whole["content"]
    )
    assert missing == []


async def test_controls_are_recorded_in_job_events(conn, owned_job) -> None:
    async with as_role(conn, "service_role"):
        await conn.fetchval("select admin_pause_job($1)", owned_job["job"])
        await conn.fetchval("select admin_cancel_job($1)", owned_job["job"])
    moves = await conn.fetch(
        "select from_status, to_status from job_events where job_id = $1 order by id",
        owned_job["job"],
    )
    assert [(m["from_status"], m["to_status"]) for m in moves] == [
        (None, "pending"),
        ("pending", "paused"),
        ("paused", "cancelled"),
    ]
    assert json.loads(await conn.fetchval("select queue_stats()"))["by_status"] == {"cancelled": 1}
