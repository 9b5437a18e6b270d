"""The peer queues for bench/queue_throughput.py --compare: pgqueuer and procrastinate.

Benchmark-only dependencies (``pip install -e '.[bench]'``), imported only here and only
when the side-by-side mode runs. Each peer drains the same number of no-op jobs from its
own tables in the same database as genworker; pgqueuer also gets the pickup-latency probe.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import timedelta
from typing import Any

import asyncpg


def quiet() -> None:
    """The peers log every job at INFO; keep their output out of the figures."""
    for name in ("pgqueuer", "procrastinate", "psycopg"):
        logging.getLogger(name).setLevel(logging.WARNING)


# -- pgqueuer ----------------------------------------------------------------------------------


async def pgqueuer_install(dsn: str) -> None:
    from pgqueuer import Queries
    from pgqueuer.db import AsyncpgDriver

    conn = await asyncpg.connect(dsn)
    try:
        queries = Queries(AsyncpgDriver(conn))
        if not await queries.schema_is_installed():
            await queries.install()
    finally:
        await conn.close()


async def pgqueuer_enqueue(dsn: str, n: int) -> None:
    from pgqueuer import Queries
    from pgqueuer.db import AsyncpgDriver

    conn = await asyncpg.connect(dsn)
    try:
        queries = Queries(AsyncpgDriver(conn))
        for start in range(0, n, 5000):
            k = min(5000, n - start)
            await queries.enqueue(["noop"] * k, [None] * k, [0] * k)
    finally:
        await conn.close()


async def pgqueuer_drain(dsn: str, n: int, batch_size: int, concurrency: int) -> float:
    """Seconds for one pgqueuer QueueManager (asyncpg) to drain ``n`` pre-enqueued jobs."""
    from pgqueuer import Queries, QueueManager
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.types import QueueExecutionMode

    conn = await asyncpg.connect(dsn)
    done = 0
    try:
        qm = QueueManager(Queries(AsyncpgDriver(conn)))

        @qm.entrypoint("noop")
        async def noop(_job: Any) -> None:
            nonlocal done
            done += 1

        t0 = time.monotonic()
        await qm.run(
            batch_size=batch_size,
            max_concurrent_tasks=concurrency,
            mode=QueueExecutionMode.drain,
            dequeue_timeout=timedelta(seconds=1),
        )
        elapsed = time.monotonic() - t0
    finally:
        await conn.close()
    if done != n:
        raise RuntimeError(f"pgqueuer ran {done} of {n} jobs")
    return elapsed


async def pgqueuer_pickup(
    dsn: str, n: int, gap_s: tuple[float, float], idle_s: float, batch_size: int, concurrency: int
) -> list[float]:
    """Seconds from each enqueue's commit to its handler starting, into an idle worker."""
    import random

    from pgqueuer import Queries, QueueManager
    from pgqueuer.db import AsyncpgDriver

    conn = await asyncpg.connect(dsn)
    producer = await asyncpg.connect(dsn)
    started: dict[int, float] = {}
    committed: dict[int, float] = {}
    all_started = asyncio.Event()
    try:
        qm = QueueManager(Queries(AsyncpgDriver(conn)))

        @qm.entrypoint("probe")
        async def probe(job: Any) -> None:
            started[int(job.id)] = time.time()
            if len(started) == n:
                all_started.set()

        task = asyncio.create_task(qm.run(batch_size=batch_size, max_concurrent_tasks=concurrency))
        await asyncio.sleep(idle_s)
        queries = Queries(AsyncpgDriver(producer))
        for _ in range(n):
            [job_id] = await queries.enqueue(["probe"], [None], [0])
            committed[int(job_id)] = time.time()
            await asyncio.sleep(random.uniform(*gap_s))
        try:
            await asyncio.wait_for(all_started.wait(), 60)
        except TimeoutError:
            pass  # reported below
        qm.shutdown.set()
        await asyncio.wait_for(task, 30)
    finally:
        await producer.close()
        await conn.close()
    if len(started) < n:
        raise RuntimeError(f"pgqueuer picked up {len(started)} of {n} probes")
    return [started[j] - committed[j] for j in committed]


# -- procrastinate -------------------------------------------------------------------------------


def _procrastinate_app(dsn: str) -> Any:
    import procrastinate

    app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo=dsn))

    @app.task(name="noop", queue="bench")
    async def noop() -> None:
        return None

    return app, noop


async def procrastinate_install(dsn: str) -> None:
    app, _ = _procrastinate_app(dsn)
    async with app.open_async():
        conn = await asyncpg.connect(dsn)
        try:
            installed = await conn.fetchval("select to_regclass('procrastinate_jobs') is not null")
        finally:
            await conn.close()
        if not installed:
            await app.schema_manager.apply_schema_async()


async def procrastinate_enqueue(dsn: str, n: int) -> None:
    app, noop = _procrastinate_app(dsn)
    async with app.open_async():
        for start in range(0, n, 5000):
            await noop.batch_defer_async(*([{}] * min(5000, n - start)))


async def procrastinate_drain(dsn: str, n: int, concurrency: int) -> float:
    """Seconds for one procrastinate worker to drain ``n`` pre-deferred jobs (wait=False)."""
    app, _ = _procrastinate_app(dsn)
    async with app.open_async():
        t0 = time.monotonic()
        await app.run_worker_async(
            queues=["bench"], concurrency=concurrency, wait=False, install_signal_handlers=False
        )
        elapsed = time.monotonic() - t0
    conn = await asyncpg.connect(dsn)
    try:
        left = await conn.fetchval(
            "select count(*) from procrastinate_jobs where status <> 'succeeded'"
        )
        await conn.execute("delete from procrastinate_jobs")
    finally:
        await conn.close()
    if left:
        raise RuntimeError(f"procrastinate left {left} of {n} jobs unfinished")
    return elapsed
