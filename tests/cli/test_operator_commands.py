"""`genworker cancel|pause|resume --job` and `genworker show --chapter [--follow]` against a
real database, with SQL playing the worker's part so every step is under the test's control."""

from __future__ import annotations

import asyncio
import json
import sys

import asyncpg
import pytest

from tests.cli.test_cli import genworker
from tests.support.seed import create_chapter, create_story, create_user

WORKER = "cli-test-worker"
CEILING_S = 60  # generous: only a hung command hits it


@pytest.fixture
async def chapter_job(conn: asyncpg.Connection) -> dict[str, str]:
    user = await create_user(conn)
    story = await create_story(conn, user)
    chapter = await create_chapter(conn, story, user, 1, "The Door")
    job = str(await conn.fetchval("select admin_enqueue_chapter($1)", chapter))
    return {"chapter": chapter, "job": job}


async def job_status(conn: asyncpg.Connection, job: str) -> str:
    return await conn.fetchval("select status from job_queue where id = $1", job)


async def start_writing(conn: asyncpg.Connection, job: str) -> None:
    claimed = await conn.fetchrow("select * from claim_next_job_v3($1, null, null)", WORKER)
    assert str(claimed["job_id"]) == job
    await conn.fetchval("select start_chapter_generation($1, $2)", job, WORKER)


async def append(conn: asyncpg.Connection, job: str, offset: int, text: str, pct: int) -> None:
    assert await conn.fetchval(
        "select append_chapter_content($1, $2, $3, $4, $5, $6, null)",
        job,
        WORKER,
        offset,
        text,
        pct,
        f"writing {pct}%",
    )


async def finish(conn: asyncpg.Connection, job: str) -> None:
    assert await conn.fetchval("select finish_chapter($1, $2)", job, WORKER) is not None
    assert await conn.fetchval("select complete_job($1, $2, '{}')", job, WORKER)


# -- cancel / pause / resume -----------------------------------------------------------------


async def test_pause_resume_cancel(db_dsn: str, conn, chapter_job) -> None:
    env = {"DATABASE_URL": db_dsn}
    job = chapter_job["job"]
    proc = genworker("pause", "--job", job, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"job_id": job, "action": "pause", "status": "paused"}
    assert await job_status(conn, job) == "paused"

    proc = genworker("resume", "--job", job, env=env)
    assert json.loads(proc.stdout)["status"] == "pending"
    assert await job_status(conn, job) == "pending"

    await start_writing(conn, job)  # a processing job: its worker stops at the next heartbeat
    proc = genworker("cancel", "--job", job, env=env)
    assert json.loads(proc.stdout)["status"] == "cancelled"
    assert await conn.fetchval("select update_job_heartbeat($1, $2)", job, WORKER) is False
    chapter = await conn.fetchrow("select * from chapters where id = $1", chapter_job["chapter"])
    assert chapter["status"] == "cancelled"

    for action in ("cancel", "pause", "resume"):
        proc = genworker(action, "--job", job, env=env)
        assert proc.returncode == 1 and proc.stdout == ""
        [line] = proc.stderr.splitlines()
        assert line.startswith(f"genworker {action}: job {job} is cancelled: only ")
        assert line.endswith("nothing changed")


async def test_cancel_a_job_without_an_owner(db_dsn: str, conn) -> None:
    job = str(await conn.fetchval("select enqueue_job('noop')"))
    proc = genworker("cancel", "--job", job, env={"DATABASE_URL": db_dsn})
    assert proc.returncode == 0, proc.stderr
    assert await job_status(conn, job) == "cancelled"


@pytest.mark.parametrize("action", ["cancel", "pause", "resume"])
async def test_control_unknown_job(db_dsn: str, action: str) -> None:
    missing = "00000000-0000-4000-8000-0000000000aa"
    proc = genworker(action, "--job", missing, env={"DATABASE_URL": db_dsn})
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"genworker {action}: job {missing} not found"


# -- show --------------------------------------------------------------------------------------


async def test_show_state_and_text(db_dsn: str, conn, chapter_job) -> None:
    env = {"DATABASE_URL": db_dsn}
    job = chapter_job["job"]
    await start_writing(conn, job)
    text = "The lamp turned. Ünïcode 🌊 and a\nsecond line."
    await append(conn, job, 0, text, 40)
    proc = genworker("show", "--chapter", chapter_job["chapter"], env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == text + "\n"  # the text alone on stdout
    state = proc.stderr.strip()
    assert "chapter 1 'The Door': generating" in state and "40%" in state
    assert f"job {job} (processing)" in state

    proc = genworker("show", "--chapter", chapter_job["chapter"], "--json", env=env)
    row = json.loads(proc.stdout)
    assert row["content"] == text and row["progress"] == 40 and row["job_status"] == "processing"


async def test_show_unknown_chapter(db_dsn: str) -> None:
    missing = "00000000-0000-4000-8000-0000000000bb"
    for extra in ([], ["--follow"]):
        proc = genworker("show", "--chapter", missing, *extra, env={"DATABASE_URL": db_dsn})
        assert proc.returncode == 1
        assert proc.stderr.strip() == f"genworker show: chapter {missing} not found"


async def follow(db_dsn: str, chapter: str) -> asyncio.subprocess.Process:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUPABASE_", "DATABASE_"))}
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker",
        "show",
        "--chapter",
        chapter,
        "--follow",
        "--interval",
        "0.05",
        env={**env, "DATABASE_URL": db_dsn},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def read_exactly(proc: asyncio.subprocess.Process, n: int) -> str:
    assert proc.stdout is not None
    data = await asyncio.wait_for(proc.stdout.readexactly(n), CEILING_S)
    return data.decode()


async def test_follow_streams_until_completed(db_dsn: str, conn, chapter_job) -> None:
    job = chapter_job["job"]
    proc = await follow(db_dsn, chapter_job["chapter"])
    await start_writing(conn, job)
    parts = ["First part. ", "Second — part 🌊. ", "Third part."]
    printed, offset = "", 0
    for i, part in enumerate(parts):
        await append(conn, job, offset, part, 30 * (i + 1))
        offset += len(part)
        printed += await read_exactly(proc, len(part.encode()))  # each part arrives in order
    await finish(conn, job)
    out, err = await asyncio.wait_for(proc.communicate(), CEILING_S)
    assert proc.returncode == 0, err.decode()
    assert printed + out.decode() == "".join(parts) + "\n"
    states = err.decode()
    assert "generating" in states and states.rstrip().endswith(f"job {job} (completed)]")


async def test_follow_announces_a_rewound_section(db_dsn: str, conn, chapter_job) -> None:
    job = chapter_job["job"]
    proc = await follow(db_dsn, chapter_job["chapter"])
    await start_writing(conn, job)
    await append(conn, job, 0, "A draft that is dropped.", 40)
    first = await read_exactly(proc, len("A draft that is dropped."))
    assert await conn.fetchval("select rewind_chapter_content($1, $2, 0)", job, WORKER)
    assert proc.stderr is not None
    seen = ""
    while "cut back" not in seen:  # the follower has noticed the shorter text
        line = await asyncio.wait_for(proc.stderr.readline(), CEILING_S)
        assert line, "show --follow ended early"
        seen += line.decode()
    await append(conn, job, 0, "The kept text.", 90)
    await finish(conn, job)
    out, err = await asyncio.wait_for(proc.communicate(), CEILING_S)
    assert proc.returncode == 0, err.decode()
    assert first == "A draft that is dropped." and out.decode() == "The kept text.\n"
    assert "cut back to 0 characters" in seen


async def test_follow_ends_with_the_failure(db_dsn: str, conn, chapter_job) -> None:
    from tests.support.seed import FAIL_UPDATE

    job = chapter_job["job"]
    proc = await follow(db_dsn, chapter_job["chapter"])
    await start_writing(conn, job)
    details = {"type": "safety_block", "user_message": "The model refused this chapter."}
    await conn.execute(FAIL_UPDATE, job, WORKER, "failed", 0, None, json.dumps(details))
    _out, err = await asyncio.wait_for(proc.communicate(), CEILING_S)
    assert proc.returncode == 1
    last = err.decode().strip().splitlines()[-1]
    assert last == (
        f"genworker show: chapter {chapter_job['chapter']} failed: The model refused this chapter."
    )
    assert "Traceback" not in err.decode()
