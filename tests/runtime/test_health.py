"""The health server's documented JSON, over HTTP against a running runner."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.runtime.conftest import running, wait_until
from tests.support.seed import create_user, insert_jobs
from tests.support.stores import open_store
from worker.devdb import free_port
from worker.handlers import noop
from worker.health import LoopMonitor, health_report, start_health_server


@pytest.fixture
async def served(db_dsn, conn):  # type: ignore[no-untyped-def]
    await insert_jobs(conn, 2, job_type="noop")
    await conn.execute("update job_queue set job_payload = '{\"sleep_s\": 30}'")
    # One of the two belongs to a user: /status and /metrics show jobs per user.
    await conn.execute(
        "update job_queue set user_id = $1 where id = (select min(id::text)::uuid from job_queue)",
        await create_user(conn, "load@example.test"),
    )
    port = free_port()
    monitor = LoopMonitor()
    mon = asyncio.create_task(monitor.run())
    async with (
        open_store("postgres", db_dsn) as store,
        running(store, {"noop": noop}, shutdown_grace_s=0.1) as runner,
    ):
        site = await start_health_server(runner, monitor, "127.0.0.1", port)
        await wait_until(lambda: len(runner.in_flight) == 2)
        async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}") as http:
            yield http, runner
        await site.cleanup()
    mon.cancel()


async def test_health(served) -> None:
    http, _ = served
    async with http.get("/health") as resp:
        body = await resp.json()
    assert resp.status == 200
    assert body["status"] == "ok" and body["reasons"] == []
    assert body["worker_id"] == "test-worker" and body["in_flight"] == 2
    assert body["concurrency"] == 50 and body["uptime_s"] >= 0
    assert body["last_claim_at"] is not None and body["store"] == "postgres"
    assert set(body) >= {"loop_lag_s", "version"}


async def test_ready(served) -> None:
    http, _ = served
    async with http.get("/ready") as resp:
        assert resp.status == 200 and (await resp.json())["ready"] is True


async def test_status(served) -> None:
    http, _ = served
    async with http.get("/status") as resp:
        body = await resp.json()
    assert body["queue"]["by_status"] == {"processing": 2}
    assert len(body["in_flight"]) == 2
    job = body["in_flight"][0]
    assert job["job_type"] == "noop" and job["attempt"] == 1 and "progress" in job
    user = await _the_user(http)
    # This process's jobs per user, and the database-wide load of the busiest users.
    assert sorted(body["users_in_flight"], key=lambda u: u["user_id"]) == sorted(
        [{"user_id": user, "in_flight": 1}, {"user_id": "none", "in_flight": 1}],
        key=lambda u: u["user_id"],
    )
    load = {
        (u["user_id"], u["job_lane"]): (u["processing"], u["pending"]) for u in body["user_load"]
    }
    assert load == {(user, "default"): (1, 0), (None, "default"): (1, 0)}
    claims = body["claims"]
    assert claims["jobs"] == 2 and claims["calls"] >= 1 and claims["batch_max"] == 25
    assert 0 < claims["mean_batch"] <= 2


async def _the_user(http) -> str:  # type: ignore[no-untyped-def]
    async with http.get("/status") as resp:
        body = await resp.json()
    [user] = [u["user_id"] for u in body["user_load"] if u["user_id"] is not None]
    return str(user)


async def test_metrics(served) -> None:
    http, _ = served
    async with http.get("/metrics") as resp:
        text = await resp.text()
    assert resp.headers["Content-Type"].startswith("text/plain")
    assert 'genworker_jobs_claimed_total{job_type="noop"} 2.0' in text
    assert "genworker_jobs_in_flight 2.0" in text
    assert "genworker_claim_latency_seconds_bucket" in text
    user = await _the_user(http)
    assert f'genworker_user_jobs_in_flight{{user_id="{user}"}} 1.0' in text
    assert 'genworker_user_jobs_in_flight{user_id="none"} 1.0' in text
    # The two jobs came in one claim call of two.
    assert 'genworker_claim_batch_size_bucket{le="1.0"} ' in text
    assert "genworker_claim_batch_size_sum 2.0" in text
    # Queue-wide gauges for alerting, from queue_stats() at scrape time.
    assert 'genworker_queue_jobs{status="processing"} 2.0' in text
    assert 'genworker_queue_jobs{status="pending"} 0.0' in text
    assert "genworker_queue_oldest_pending_age_seconds 0.0" in text


async def test_queue_gauges_follow_the_queue(db_dsn, conn) -> None:  # type: ignore[no-untyped-def]
    from worker.metrics import Metrics
    from worker.runner import Runner, RunnerConfig

    await insert_jobs(conn, 3, job_type="noop")
    await conn.execute("update job_queue set scheduled_at = now() - interval '90 seconds'")
    async with open_store("postgres", db_dsn) as store:
        runner = Runner(store, RunnerConfig(worker_id="w"), {}, Metrics())
        port = free_port()
        site = await start_health_server(runner, LoopMonitor(), "127.0.0.1", port)
        try:
            async with aiohttp.ClientSession() as http:
                async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                    text = await resp.text()
        finally:
            await site.cleanup()
    assert 'genworker_queue_jobs{status="pending"} 3.0' in text
    [age] = [
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("genworker_queue_oldest_pending_age_seconds ")
    ]
    assert age >= 90


async def test_unhealthy_when_a_side_task_dies(served) -> None:
    http, runner = served
    runner.fatal = RuntimeError("heartbeat crashed")
    async with http.get("/health") as resp:
        body = await resp.json()
    assert resp.status == 503 and body["status"] == "unhealthy"
    assert "heartbeat crashed" in body["reasons"][0]
    runner.fatal = None


async def test_side_task_death_stops_the_runner(db_dsn) -> None:
    async with open_store("postgres", db_dsn) as store:

        async def broken_heartbeat() -> None:
            raise RuntimeError("boom")

        from worker.metrics import Metrics
        from worker.runner import Runner, RunnerConfig

        runner = Runner(store, RunnerConfig(worker_id="w", poll_interval_s=0.05), {}, Metrics())
        runner.heartbeat.run = broken_heartbeat  # type: ignore[method-assign]
        with pytest.raises(RuntimeError, match="side task failed"):
            await asyncio.wait_for(runner.run(), 10)
        code, body = health_report(runner, LoopMonitor())
        assert code == 503 and "boom" in body["reasons"][0]


def test_watchdog_exits_when_the_loop_is_blocked() -> None:
    """A process whose event loop is stuck exits by itself (code 70) so it gets restarted."""
    import subprocess
    import sys

    code = (
        "import asyncio, time\n"
        "from worker.health import LoopMonitor\n"
        "async def main():\n"
        "    m = LoopMonitor(every_s=0.1)\n"
        "    t = asyncio.create_task(m.run())\n"
        "    await asyncio.sleep(0.3)\n"
        "    m.start_watchdog(1.0)\n"
        "    time.sleep(30)  # a blocking call freezes the loop\n"
        "asyncio.run(main())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 70, proc.stderr
