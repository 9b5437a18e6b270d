"""The runner against a real database: exactly once, slots, failures, lease loss, shutdown."""

from __future__ import annotations

import asyncio
import collections
import json
import random

import asyncpg
import pytest

from tests.runtime.conftest import running, wait_until
from tests.support.seed import create_chapter, create_story, create_user, insert_jobs
from tests.support.stores import ADAPTERS, open_store
from worker.errors import LeaseLost, PermanentJobError, RetryableJobError
from worker.handlers import noop
from worker.jobs import JobContext
from worker.runner import retry_delay


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_200_jobs_at_concurrency_50_complete_exactly_once(
    adapter: str, db_dsn: str, conn: asyncpg.Connection
) -> None:
    ids = await insert_jobs(conn, 200, job_type="work")
    runs: collections.Counter[str] = collections.Counter()
    active = 0
    peak = 0

    async def work(ctx: JobContext) -> dict:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        runs[ctx.job.id] += 1
        await asyncio.sleep(random.uniform(0.01, 0.1))
        active -= 1
        return {"n": ctx.job.job_payload["n"]}

    async with open_store(adapter, db_dsn) as store, running(store, {"work": work}) as runner:
        await wait_until(
            lambda: conn.fetchval(
                "select count(*) = 200 from job_queue where status = 'completed'"
            ),
            timeout=60,
        )
    assert sorted(runs) == sorted(ids) and set(runs.values()) == {1}
    assert 1 < peak <= 50
    results = await conn.fetch("select job_payload, job_result from job_queue")
    assert all(
        r["job_payload"] and json.loads(r["job_result"])["n"] == json.loads(r["job_payload"])["n"]
        for r in results
    )
    assert runner.metrics.completed.labels("work")._value.get() == 200


async def test_never_more_than_concurrency_in_flight(db_dsn: str, conn) -> None:
    """WORKER_CONCURRENCY bounds running handlers (a finished one frees its slot while its
    completion is recorded)."""
    await insert_jobs(conn, 12, job_type="slow")
    peak = running_now = 0

    async def slow(ctx: JobContext) -> dict:
        nonlocal peak, running_now
        running_now += 1
        peak = max(peak, running_now)
        await asyncio.sleep(0.2)
        running_now -= 1
        return {}

    async with (
        open_store("postgres", db_dsn) as store,
        running(store, {"slow": slow}, concurrency=3),
    ):
        await wait_until(
            lambda: conn.fetchval("select count(*) = 12 from job_queue where status = 'completed'")
        )
    assert peak == 3


async def test_unknown_type_fails_at_once(db_dsn: str, conn) -> None:
    [jid] = await insert_jobs(conn, 1, job_type="mystery")
    async with open_store("postgres", db_dsn) as store, running(store, {}):
        await wait_until(
            lambda: conn.fetchval("select status = 'failed' from job_queue where id = $1", jid)
        )
    job = await conn.fetchrow("select * from job_queue where id = $1", jid)
    details = json.loads(job["error_details"])
    assert job["retry_count"] == 0
    assert details["type"] == "unknown_job_type" and details["retryable"] is False
    assert "mystery" in details["message"] and details["worker_id"] == "test-worker"
    assert details["attempt"] == 1 and details["at"]


async def test_transient_error_retries_with_backoff_then_fails(db_dsn: str, conn) -> None:
    [jid] = await insert_jobs(conn, 1, job_type="flaky", max_retries=2)
    attempts: list[int] = []

    async def flaky(ctx: JobContext) -> dict:
        attempts.append(ctx.attempt)
        raise RetryableJobError(
            "Gemini 503",
            kind="model_unavailable",
            user_message="Gemini is unavailable; the chapter will be retried.",
        )

    async with open_store("postgres", db_dsn) as store, running(store, {"flaky": flaky}):
        await wait_until(
            lambda: conn.fetchval("select status = 'failed' from job_queue where id = $1", jid)
        )
    assert attempts == [1, 2, 3]
    job = await conn.fetchrow("select * from job_queue where id = $1", jid)
    assert job["retry_count"] == 2
    details = json.loads(job["error_details"])
    assert details["type"] == "model_unavailable" and details["retryable"] is True
    assert details["will_retry"] is False and details["attempt"] == 3
    events = await conn.fetch(
        "select from_status, to_status, details from job_events where job_id = $1 order by id", jid
    )
    retries = [
        json.loads(e["details"])["error"]
        for e in events
        if (e["from_status"], e["to_status"]) == ("processing", "pending")
    ]
    assert len(retries) == 2 and all(r["will_retry"] and r["retry_in_s"] > 0 for r in retries)
    # Retries promise a retry; the final failure tells the truth.
    assert all(r["user_message"].endswith("will be retried.") for r in retries)
    assert details["user_message"] == (
        "Gemini is unavailable. Generation stopped; you can start it again."
    )


async def test_permanent_error_fails_without_retry(db_dsn: str, conn) -> None:
    [jid] = await insert_jobs(conn, 1, job_type="bad")

    async def bad(ctx: JobContext) -> dict:
        raise PermanentJobError("sections must be 2..12", kind="bad_payload")

    async with open_store("postgres", db_dsn) as store, running(store, {"bad": bad}):
        await wait_until(
            lambda: conn.fetchval("select status = 'failed' from job_queue where id = $1", jid)
        )
    job = await conn.fetchrow("select retry_count, error_details from job_queue where id = $1", jid)
    assert job["retry_count"] == 0
    assert json.loads(job["error_details"])["message"] == "sections must be 2..12"


async def test_lost_lease_cancels_handler_and_stops_writes(db_dsn: str, conn) -> None:
    user = await create_user(conn)
    chapter = await create_chapter(conn, await create_story(conn, user), user)
    jid = await conn.fetchval(
        "insert into job_queue (job_type, job_payload, user_id) values"
        " ('writer', '{}', $1) returning id",
        user,
    )
    await conn.execute("update chapters set generation_job_id = $1 where id = $2", jid, chapter)
    stopped = asyncio.Event()

    async def writer(ctx: JobContext) -> dict:
        await ctx.store.start_chapter(ctx.job.id, ctx.worker_id, 100)
        offset = 0
        try:
            while True:
                if not await ctx.store.append_chapter(
                    ctx.job.id,
                    ctx.worker_id,
                    offset=offset,
                    text="x",
                    progress=20,
                    current_step="s",
                ):
                    raise LeaseLost("append refused")
                offset += 1
                await asyncio.sleep(0.02)
        finally:
            stopped.set()

    async with open_store("postgres", db_dsn) as store, running(store, {"writer": writer}):
        await wait_until(lambda: conn.fetchval("select genworker_chunks_length($1) > 5", chapter))
        await conn.execute("update job_queue set worker_id = 'thief' where id = $1", jid)
        stolen_at = await conn.fetchval("select genworker_chunks_length($1)", chapter)
        await asyncio.wait_for(stopped.wait(), 15)
        await asyncio.sleep(0.5)
        after = await conn.fetchval("select genworker_chunks_length($1)", chapter)
    # Whichever sees the theft first stops the handler: the fenced append (refused) or the
    # heartbeat (cancel); on a loaded machine either can win. No write lands after it.
    assert after == stolen_at
    job = await conn.fetchrow("select status, worker_id from job_queue where id = $1", jid)
    assert (job["status"], job["worker_id"]) == ("processing", "thief")


async def test_cancel_job_stops_a_running_handler(db_dsn: str, conn) -> None:
    [jid] = await insert_jobs(conn, 1, job_type="long")
    started = asyncio.Event()

    async def long(ctx: JobContext) -> dict:
        started.set()
        await asyncio.sleep(60)
        return {}

    async with open_store("postgres", db_dsn) as store, running(store, {"long": long}) as runner:
        await asyncio.wait_for(started.wait(), 5)
        await conn.execute("update job_queue set status = 'cancelled' where id = $1", jid)
        await wait_until(lambda: not runner.in_flight, timeout=60)
    assert await conn.fetchval("select status from job_queue where id = $1", jid) == "cancelled"


async def test_shutdown_releases_unfinished_jobs_without_using_attempts(db_dsn, conn) -> None:
    await insert_jobs(conn, 3, job_type="noop")
    await conn.execute("update job_queue set job_payload = '{\"sleep_s\": 30}'")
    async with (
        open_store("postgres", db_dsn) as store,
        running(store, {"noop": noop}, shutdown_grace_s=0.3) as runner,
    ):
        await wait_until(lambda: len(runner.in_flight) == 3)
    rows = await conn.fetch("select status, retry_count, worker_id from job_queue")
    assert {(r["status"], r["retry_count"], r["worker_id"]) for r in rows} == {("pending", 0, None)}
    assert runner.metrics.released.labels("noop")._value.get() == 3


async def test_shutdown_waits_for_jobs_within_grace(db_dsn, conn) -> None:
    await insert_jobs(conn, 2, job_type="noop")
    await conn.execute("update job_queue set job_payload = '{\"sleep_s\": 0.3}'")
    async with (
        open_store("postgres", db_dsn) as store,
        running(store, {"noop": noop}, shutdown_grace_s=5) as runner,
    ):
        await wait_until(lambda: len(runner.in_flight) == 2)
    assert await conn.fetchval("select count(*) from job_queue where status = 'completed'") == 2


async def test_startup_recovery_releases_own_jobs(db_dsn, conn) -> None:
    [jid] = await insert_jobs(conn, 1, job_type="noop")
    await conn.fetch("select * from claim_next_job_v3('test-worker', null, null)")
    async with open_store("postgres", db_dsn) as store, running(store, {"noop": noop}):
        await wait_until(
            lambda: conn.fetchval("select status = 'completed' from job_queue where id = $1", jid)
        )
    assert await conn.fetchval("select retry_count from job_queue where id = $1", jid) == 0


def test_retry_delay_is_exponential_jittered_and_capped() -> None:
    for n in range(12):
        d = retry_delay(n, 5, 600)
        cap = min(600, 5 * 2**n)
        assert cap / 2 <= d <= cap
    assert retry_delay(0, 5, 600, server_hint_s=53) == 53


async def test_a_claim_cut_by_shutdown_is_released(db_dsn: str, conn) -> None:
    """Stopping while a claim request is in flight must not strand the claimed jobs."""
    ids = await insert_jobs(conn, 3, job_type="noop")
    async with open_store("postgres", db_dsn) as store:
        real_claim = store.claim_many
        entered = asyncio.Event()

        async def slow_claim(*args):  # type: ignore[no-untyped-def]
            claimed = await real_claim(*args)  # committed in the database...
            if claimed:
                entered.set()
                await asyncio.sleep(0.3)  # ...but the answer is still on its way at shutdown
            return claimed

        store.claim_many = slow_claim  # type: ignore[method-assign]
        async with running(store, {"noop": noop}):
            await asyncio.wait_for(entered.wait(), 60)
    jobs = await conn.fetch("select status, retry_count, worker_id from job_queue")
    assert len(ids) == 3
    assert [tuple(j) for j in jobs] == [("pending", 0, None)] * 3


# -- batches ------------------------------------------------------------------------------------


def _histogram(hist) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(count, sum) of an unlabelled prometheus histogram."""
    samples = {s.name: s.value for m in hist.collect() for s in m.samples}
    return next(v for k, v in samples.items() if k.endswith("_count")), next(
        v for k, v in samples.items() if k.endswith("_sum")
    )


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_claims_ask_for_the_free_slots_and_completions_go_in_batches(
    adapter: str, db_dsn: str, conn
) -> None:
    """Concurrency 10, batch max 4: every claim asks for min(free slots, 4); 40 no-op jobs
    finishing together are completed in fewer calls than jobs, each exactly once."""
    ids = await insert_jobs(conn, 40, job_type="noop")
    asked: list[int] = []
    async with open_store(adapter, db_dsn) as store:
        real = store.claim_many

        async def spy(worker_id, types, lanes, limit, *rest):  # type: ignore[no-untyped-def]
            asked.append(limit)
            return await real(worker_id, types, lanes, limit, *rest)

        store.claim_many = spy  # type: ignore[method-assign]
        async with running(store, {"noop": noop}, concurrency=10, claim_batch_max=4) as runner:
            await wait_until(
                lambda: conn.fetchval(
                    "select count(*) = 40 from job_queue where status = 'completed'"
                ),
                timeout=60,
            )
            calls, completed = _histogram(runner.metrics.completion_batch_size)
            claims, claimed = _histogram(runner.metrics.claim_batch_size)
    # Over REST a claim answer carries one job (supabase.py): the runner asks for one, and
    # a batch of one is a full batch (it claims again at once, not after the poll wait).
    limit = 4 if adapter == "postgres" else 1
    assert runner.config.claim_batch_max == limit
    assert asked[0] == limit and all(1 <= n <= limit for n in asked)
    assert claimed == 40 and claims >= 10
    assert completed == 40 and 1 <= calls <= 40
    if adapter == "postgres":  # over REST each claim answer carries one job (supabase.py)
        assert calls < 40
    events = await conn.fetch(
        "select job_id::text, count(*) filter (where to_status = 'processing') as p,"
        " count(*) filter (where to_status = 'completed') as c"
        " from job_events group by job_id"
    )
    assert {e["job_id"]: (e["p"], e["c"]) for e in events} == {i: (1, 1) for i in ids}


async def test_a_capped_user_is_claimed_again_as_soon_as_a_local_job_frees_its_slot(
    db_dsn: str, conn
) -> None:
    """Cap 2 for one user with 6 jobs: the runner never holds more than 2 of them and
    finishes all 6 without waiting for a notification (there is none for a freed cap)."""
    await conn.execute("update job_lanes set max_processing_per_user = 2")
    user = await create_user(conn)
    ids = await insert_jobs(conn, 6, job_type="noop")
    await conn.execute(
        "update job_queue set user_id = $1, job_payload = '{\"sleep_s\": 0.05}'", user
    )
    most = 0

    async def watched(ctx: JobContext):  # type: ignore[no-untyped-def]
        nonlocal most
        most = max(most, len(runner.in_flight))
        return await noop(ctx)

    async with open_store("postgres", db_dsn) as store:
        # A poll far longer than the test's ceiling: only a freed local slot can wake it.
        async with running(
            store, {"noop": watched}, poll_interval_s=60, poll_max_interval_s=60
        ) as runner:
            await wait_until(
                lambda: conn.fetchval(
                    "select count(*) = 6 from job_queue where status = 'completed'"
                ),
                timeout=60,
            )
    assert most == 2
    done = await conn.fetch("select id::text from job_queue where status = 'completed'")
    assert sorted(r["id"] for r in done) == sorted(ids)
