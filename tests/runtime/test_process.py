"""The worker as the platform runs it: a subprocess, SIGTERM, kill -9, and a database outage."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp
import asyncpg
import pytest

from tests.runtime.conftest import running, wait_until
from tests.support.database import PgTestServer
from tests.support.seed import chapter_job, insert_jobs
from worker.config import load_settings
from worker.devdb import free_port
from worker.generation.chapter import ChapterHandler
from worker.generation.offline import OfflineModel
from worker.handlers import build_handlers, noop
from worker.health import LoopMonitor, start_health_server
from worker.service import generation_config
from worker.store import Store
from worker.store.postgres import PostgresTransport

pytestmark = pytest.mark.slow


def worker_env(dsn: str, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SUPABASE_", "GEMINI_", "DATABASE_", "WORKER_"))
    }
    env.update(
        DATABASE_URL=dsn,
        GENERATION_PROVIDER="offline",
        APP_ENV="test",
        HEALTH_CHECK_PORT=str(free_port()),
        HEARTBEAT_INTERVAL_S="0.5",
        POLL_INTERVAL_MS="100",
        POLL_MAX_INTERVAL_MS="300",
        SHUTDOWN_GRACE_S="1",
        LOG_FORMAT="json",
        LOG_LEVEL="INFO",
        RETRY_BASE_S="0.2",
        RETRY_MAX_S="1",
    )
    env.update(extra)
    return env


@contextmanager
def worker_process(env: dict[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "run"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


async def test_sigterm_releases_in_flight_jobs_and_exits_0(db_dsn: str, conn) -> None:
    await insert_jobs(conn, 3, job_type="noop")
    await conn.execute("update job_queue set job_payload = '{\"sleep_s\": 60}'")
    secret = "AIzaSyTEST-never-log-this-key-0123456789"
    with worker_process(worker_env(db_dsn, GEMINI_API_KEY=secret, LOG_LEVEL="DEBUG")) as proc:
        await wait_until(
            lambda: conn.fetchval("select count(*) = 3 from job_queue where status = 'processing'")
        )
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 20)
        output = proc.stdout.read().decode()  # type: ignore[union-attr]
    assert code == 0, output
    rows = await conn.fetch("select status, retry_count, worker_id from job_queue")
    assert {(r["status"], r["retry_count"], r["worker_id"]) for r in rows} == {("pending", 0, None)}
    lines = [json.loads(line) for line in output.splitlines() if line.startswith("{")]
    assert any("released" in rec["msg"] for rec in lines)
    assert all("worker_id" in rec for rec in lines)
    assert any("settings" in rec for rec in lines)  # the start-up line lists the settings
    assert secret not in output


async def reference_text(pg_server: PgTestServer, env: dict[str, str], options: dict) -> str:
    """The same chapter written without interruption, in-process, in another database."""
    dsn = await pg_server.create_database()
    conn = await asyncpg.connect(dsn)
    store = await Store(PostgresTransport(dsn)).open()
    try:
        _, chapter, job = await chapter_job(conn, options=options)
        settings = load_settings({**env, "DATABASE_URL": dsn}, dotenv=False)
        handlers = build_handlers(
            ChapterHandler(OfflineModel(chunk_delay_s=0), generation_config(settings))
        )
        async with running(store, handlers):
            await wait_until(
                lambda: conn.fetchval(
                    "select status = 'completed' from job_queue where id = $1", job
                ),
                timeout=60,
            )
        return await conn.fetchval("select content from chapters where id = $1", chapter)
    finally:
        await store.close()
        await conn.close()
        await pg_server.drop_database(dsn)


async def test_kill_9_mid_chapter_is_rescued_by_a_second_worker(
    pg_server: PgTestServer, db_dsn: str, conn
) -> None:
    options = {"sections": 3, "target_words": 900}
    reference = await reference_text(pg_server, worker_env(db_dsn), options)
    _, chapter, job = await chapter_job(conn, options=options, lease_timeout_s=2)
    with worker_process(worker_env(db_dsn, WORKER_ID="victim", FLUSH_INTERVAL_MS="100")) as a:
        await wait_until(
            lambda: conn.fetchval(
                "select coalesce((generation_state->>'sections_done')::int, 0) >= 1"
                " and genworker_chunks_length(id) > (generation_state->>'content_length')::int"
                " from chapters where id = $1",
                chapter,
            ),
            timeout=120,
        )
        a.kill()  # SIGKILL: no release, no final write
        a.wait(10)
    assert await conn.fetchval("select status from job_queue where id = $1", job) == "processing"
    with worker_process(worker_env(db_dsn, WORKER_ID="rescuer")):
        await wait_until(
            lambda: conn.fetchval("select status = 'completed' from job_queue where id = $1", job),
            timeout=60,
        )
    row = await conn.fetchrow("select * from job_queue where id = $1", job)
    assert row["worker_id"] == "rescuer" and row["retry_count"] == 1
    result = json.loads(row["job_result"])
    assert result["resumed_at_section"] >= 1 and result["sections"] == 3
    ch = await conn.fetchrow("select content, status from chapters where id = $1", chapter)
    assert ch["status"] == "completed"
    assert ch["content"] == reference  # every section once, none cut or doubled


async def test_config_error_is_one_message_and_exit_2() -> None:
    env = {
        "PATH": os.environ.get("PATH", ""),
        "WORKER_CONCURRENCY": "lots",
        "SUPABASE_URL": "not-a-url",
    }
    proc = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "worker", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    assert proc.returncode == 2
    err = proc.stderr
    for name in (
        "WORKER_CONCURRENCY",
        "SUPABASE_URL",
        "SUPABASE_SERVICE_ROLE_KEY",
        "GEMINI_API_KEY",
    ):
        assert name in err, err
    assert err.count("configuration error") == 1 and "Traceback" not in err


async def test_database_outage_is_survived(pg_server: PgTestServer, db_dsn: str) -> None:
    if pg_server.cluster is None:
        pytest.skip("needs the suite's own cluster (TEST_DATABASE_URL is set)")
    conn = await asyncpg.connect(db_dsn)
    ids = await insert_jobs(conn, 30, job_type="noop", lease_timeout_s=3)
    await conn.execute("update job_queue set job_payload = '{\"sleep_s\": 0.3}'")
    await conn.close()
    port = free_port()
    store = await Store(PostgresTransport(db_dsn, pool_size=8, command_timeout=3)).open()
    monitor = LoopMonitor()
    mon = asyncio.create_task(monitor.run())
    try:
        async with running(
            store, {"noop": noop}, concurrency=5, heartbeat_interval_s=0.5
        ) as runner:
            health = await start_health_server(runner, monitor, "127.0.0.1", port)
            async with aiohttp.ClientSession() as http:
                await asyncio.sleep(0.8)
                await asyncio.to_thread(pg_server.cluster.stop, "immediate")
                try:
                    await asyncio.sleep(3)
                    async with http.get(f"http://127.0.0.1:{port}/health") as resp:
                        body = await resp.json()
                    assert resp.status == 200 and body["status"] == "degraded", body
                    assert body["reasons"]
                finally:
                    await asyncio.to_thread(pg_server.cluster.start)
                conn = await asyncpg.connect(db_dsn)
                try:
                    await wait_until(
                        lambda: conn.fetchval(
                            "select count(*) = 30 from job_queue where status = 'completed'"
                        ),
                        timeout=60,
                    )
                finally:
                    await conn.close()
                await wait_until(lambda: runner.consecutive_store_errors == 0, timeout=120)
                async with http.get(f"http://127.0.0.1:{port}/health") as resp:
                    assert (await resp.json())["status"] == "ok"
            await health.cleanup()
    finally:
        mon.cancel()
        await store.close()
    conn = await asyncpg.connect(db_dsn)
    try:
        done = await conn.fetch("select id from job_queue where status = 'completed'")
        assert sorted(str(r["id"]) for r in done) == sorted(ids)
    finally:
        await conn.close()
