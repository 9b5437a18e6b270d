"""The fleet-wide Gemini budget (gemini_budget_take / gemini_budget_settle) on real PostgreSQL:
concurrent takers never get more than the bucket allows, settling corrects estimates, a 429
reported by one instance is a cool-down every instance sees, a daily-quota 429 lasts until
midnight Pacific, and the claim skips chapter jobs whose model cannot run."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from tests.support.seed import chapter_job

TAKE = "select g.*, clock_timestamp() as seen from gemini_budget_take($1, $2) g"
SETTLE = "select gemini_budget_settle($1, $2, $3, $4, $5, $6)"


async def budget(conn: asyncpg.Connection, model: str, **limits: float | None) -> None:
    cols = ", ".join(limits)
    vals = ", ".join(f"${i + 2}" for i in range(len(limits)))
    await conn.execute(
        f"insert into gemini_budgets (model, {cols}) values ($1, {vals})", model, *limits.values()
    )


async def test_concurrent_takers_never_get_more_than_the_bucket(db_dsn: str) -> None:
    """12 connections take as fast as they can for a while: over every window of the run,
    grants <= bucket size + refill rate x window (plus one for when a grant is observed)."""
    rpm, burst_s = 1200, 1.0
    setup = await asyncpg.connect(db_dsn)
    await budget(setup, "m-rpm", rpm=rpm, burst_s=burst_s)
    cap, rate = await setup.fetchrow("select cap, rate from gemini_bucket($1, $2)", rpm, burst_s)
    assert (cap, rate * 60) == (20.0, rpm - 20.0)  # burst + a minute's refill = the limit
    grants: list[datetime] = []
    refused: list[str] = []
    conns = [await asyncpg.connect(db_dsn) for _ in range(12)]
    start = await setup.fetchval("select clock_timestamp()")
    # The bucket starts empty: let it fill once so the burst is part of what is tested.
    await asyncio.sleep(burst_s * 60 / (rpm - cap) * cap + 0.2)

    async def taker(c: asyncpg.Connection) -> None:
        while len(grants) < 80:
            row = await c.fetchrow(TAKE, "m-rpm", 0)
            if row["granted"]:
                grants.append(row["seen"])
            else:
                refused.append(row["reason"])
                assert row["wait_s"] > 0

    try:
        await asyncio.wait_for(asyncio.gather(*(taker(c) for c in conns)), 120)
    finally:
        for c in conns:
            await c.close()
    end = await setup.fetchval("select clock_timestamp()")
    await setup.close()
    assert len(grants) >= 80
    assert refused and set(refused) == {"rpm"}
    grants.sort()
    # Every window that starts and ends at a grant: the bucket's bound holds.
    for i, first in enumerate(grants):
        for last in grants[i:]:
            window = (last - first).total_seconds()
            count = sum(1 for g in grants if first <= g <= last)
            assert count <= cap + rate * window + 1, (count, window)
    # And over the whole run, the refill since the start bounds the total.
    assert len(grants) <= rate * (end - start).total_seconds() + 1


async def test_settle_gives_back_or_takes_the_difference(conn: asyncpg.Connection) -> None:
    # tpm 60 with a 30 s burst: a 30-token bucket refilling 0.5 token/s (slow machines safe).
    await budget(conn, "m-tpm", tpm=60, burst_s=30)
    await conn.execute(
        "update gemini_budgets set token_level = 30, refilled_at = now() where model = 'm-tpm'"
    )
    assert (await conn.fetchrow(TAKE, "m-tpm", 25))["granted"]
    refused = await conn.fetchrow(TAKE, "m-tpm", 20)
    assert (refused["granted"], refused["reason"]) == (False, "tpm")
    assert refused["wait_s"] > 10
    # The request used 5 tokens, not the 25 reserved: 20 come back and the next take fits.
    await conn.execute(SETTLE, "m-tpm", 25, 5, None, False, None)
    assert (await conn.fetchrow(TAKE, "m-tpm", 20))["granted"]
    # This one used 80 tokens against 20 reserved: the bucket is in debt for about two minutes.
    await conn.execute(SETTLE, "m-tpm", 20, 80, None, False, None)
    debt = await conn.fetchrow(TAKE, "m-tpm", 1)
    assert (debt["granted"], debt["reason"]) == (False, "tpm")
    assert debt["wait_s"] > 60
    level = await conn.fetchval("select token_level from gemini_budgets where model = 'm-tpm'")
    assert level < -50


async def test_an_estimate_larger_than_the_bucket_waits_for_a_full_bucket(
    conn: asyncpg.Connection,
) -> None:
    await budget(conn, "m-big", tpm=60, burst_s=30)  # a 30-token bucket
    await conn.execute("update gemini_budgets set token_level = 29, refilled_at = now()")
    assert (await conn.fetchrow(TAKE, "m-big", 5000))["reason"] == "tpm"
    await conn.execute("update gemini_budgets set token_level = 30, refilled_at = now()")
    assert (await conn.fetchrow(TAKE, "m-big", 5000))["granted"]  # then it is in debt
    assert await conn.fetchval("select token_level from gemini_budgets") < -4900


async def test_a_cool_down_from_one_instance_is_seen_by_all(db_dsn: str) -> None:
    conns = [await asyncpg.connect(db_dsn) for _ in range(4)]
    try:
        await budget(conns[0], "m-cool", rpm=100000)
        # Three instances hit a 429 at once with different RetryInfo delays: the longest wins.
        before = await conns[3].fetchval("select clock_timestamp()")
        await asyncio.gather(
            *(
                c.execute(SETTLE, "m-cool", 100, 0, delay, False, f"429 retry in {delay}s")
                for c, delay in zip(conns[:3], (20.0, 45.0, 30.0), strict=True)
            )
        )
        rows = await asyncio.gather(*(c.fetchrow(TAKE, "m-cool", 10) for c in conns))
        assert {(r["granted"], r["reason"]) for r in rows} == {(False, "cooldown")}
        after = await conns[3].fetchval("select clock_timestamp()")
        [until] = {r["until"] for r in rows}
        # 45 s from the settles (between `before` and `after`), not 20 or 30: order only.
        assert before + timedelta(seconds=45) <= until <= after + timedelta(seconds=45)
        assert all(0 < r["wait_s"] <= 45 for r in rows)
        status = await conns[3].fetchrow("select * from gemini_budget_status()")
        assert status["cooldown_reason"] == "429 retry in 45.0s"
        assert status["rate_limited"] == 3
        # A 429 for a model nobody configured still becomes a shared cool-down.
        await conns[1].execute(SETTLE, "m-unset", 0, 0, 5.0, False, None)
        other = await conns[2].fetchrow(TAKE, "m-unset", 10)
        assert (other["granted"], other["reason"]) == (False, "cooldown")
        free = await conns[2].fetchrow(TAKE, "m-never-seen", 10)
        assert (free["granted"], free["reason"]) == (True, "unbudgeted")
    finally:
        for c in conns:
            await c.close()


async def test_a_daily_quota_429_lasts_until_midnight_pacific(conn: asyncpg.Connection) -> None:
    await conn.execute(SETTLE, "m-day", 10, 0, 53.0, True, "quota GenerateRequestsPerDay")
    row = await conn.fetchrow(TAKE, "m-day", 1)
    assert (row["granted"], row["reason"]) == (False, "daily_exhausted")
    pacific = row["until"].astimezone(ZoneInfo("America/Los_Angeles"))
    assert (pacific.hour, pacific.minute, pacific.second) == (0, 0, 0)
    now = datetime.now(ZoneInfo("America/Los_Angeles"))
    assert timedelta(0) < pacific - now <= timedelta(hours=25)
    status = await conn.fetchrow("select * from gemini_budget_status()")
    assert status["daily_reason"] == "quota GenerateRequestsPerDay"
    assert status["daily_exhausted_until"] == row["until"]


async def test_the_configured_requests_per_day_run_out(conn: asyncpg.Connection) -> None:
    await budget(conn, "m-rpd", rpd=3)
    assert [(await conn.fetchrow(TAKE, "m-rpd", 0))["granted"] for _ in range(3)] == [True] * 3
    assert (await conn.fetchrow(TAKE, "m-rpd", 0))["reason"] == "rpd"
    assert (await conn.fetchrow(TAKE, "m-rpd", 0))["reason"] == "daily_exhausted"


@pytest.mark.parametrize("model", [None, "", "m" * 201])
async def test_a_bad_model_name_is_refused(conn: asyncpg.Connection, model: str | None) -> None:
    with pytest.raises(asyncpg.PostgresError, match="p_model must be 1-200") as take:
        await conn.fetchrow(TAKE, model, 1)
    assert take.value.sqlstate == "PT400"
    with pytest.raises(asyncpg.PostgresError, match="p_model must be 1-200"):
        await conn.execute(SETTLE, model, 1, 1, None, False, None)


async def test_bad_numbers_are_bounded(conn: asyncpg.Connection) -> None:
    await budget(conn, "m-bounds", tpm=600000)
    await conn.execute(SETTLE, "m-bounds", -5, -7, 1e12, False, "x" * 5000)
    row = await conn.fetchrow(
        "select token_level, cooldown_until - now() as left, length(cooldown_reason) as n"
        " from gemini_budgets"
    )
    assert row["token_level"] == 0  # negative counts are zero, not a refund
    assert row["left"] <= timedelta(hours=1) and row["n"] == 300
    assert (await conn.fetchrow(TAKE, "m-bounds", -100))["reason"] == "cooldown"


async def test_claims_skip_chapter_jobs_whose_model_cannot_run(conn: asyncpg.Connection) -> None:
    await conn.execute("update job_lanes set max_processing_per_user = 100")
    _, _, blocked_named = await chapter_job(conn, options={"model": "gemini-3.5-flash-lite"})
    _, _, blocked_default = await chapter_job(conn)
    _, _, free_named = await chapter_job(conn, options={"model": "gemini-3.8-flash"})
    await conn.execute(SETTLE, "gemini-3.5-flash-lite", 0, 0, None, True, "daily quota")
    await conn.execute(SETTLE, "gemini-3.5-flash", 0, 0, 60.0, False, "429")
    got = await conn.fetch(
        "select id::text from claim_jobs('w1', null, null, 10, 'gemini-3.5-flash')"
    )
    assert [r["id"] for r in got] == [free_named]
    # Once the cool-down is over, the default model's job is claimed; the daily one is not.
    await conn.execute("update gemini_budgets set cooldown_until = now() - interval '1 second'")
    got = await conn.fetch(
        "select id::text from claim_jobs('w1', null, null, 10, 'gemini-3.5-flash')"
    )
    assert [r["id"] for r in got] == [blocked_default]
    assert await conn.fetchval("select status from job_queue where id = $1", blocked_named) == (
        "pending"
    )
    # A rescued job (expired lease) of a blocked model is not taken back either.
    await conn.execute(
        "update job_queue set heartbeat_at = now() - interval '1 hour' where id = $1",
        blocked_default,
    )
    await conn.execute("update gemini_budgets set cooldown_until = now() + interval '1 minute'")
    assert (
        await conn.fetch("select id from claim_jobs('w2', null, null, 10, 'gemini-3.5-flash')")
        == []
    )
    # The single claim does not know the worker's default model: it skips only jobs that
    # name a blocked model, so it rescues the unnamed job and leaves the daily-blocked one.
    row = await conn.fetchrow("select * from claim_next_job_v3('w3', null, null)")
    assert row is not None and str(row["job_id"]) == blocked_default
    assert await conn.fetchrow("select * from claim_next_job_v3('w3', null, null)") is None
