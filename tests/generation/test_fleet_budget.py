"""The fleet budget end to end: the real SDK against the fake server's global quotas, the
budget in real PostgreSQL, two model instances standing for two worker processes."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.generation.test_chapter import CONFIG, MODEL, OPTIONS, RETRIED, generate
from tests.runtime.conftest import running, wait_until
from tests.support.fake_gemini import FakeGemini, http_error, start_fake_gemini
from tests.support.seed import chapter_job
from worker.errors import RetryableJobError
from worker.generation.budget import FleetBudget
from worker.generation.chapter import ChapterHandler
from worker.generation.gemini import GeminiModel, estimate_tokens
from worker.handlers import build_handlers
from worker.health import LoopMonitor, health_report
from worker.store import Store


def budgeted(fake: FakeGemini, store: Store, max_wait_s: float = 30.0) -> GeminiModel:
    return GeminiModel(
        api_key="test-key-123",
        base_url=fake.base_url,
        idle_timeout_s=10.0,
        request_timeout_s=60,
        budget=FleetBudget(store, max_wait_s=max_wait_s),
    )


@pytest.fixture
async def fleet(
    fake_gemini: FakeGemini, store: Store
) -> AsyncIterator[tuple[GeminiModel, GeminiModel]]:
    """Two model instances on one budget: what two worker processes are."""
    a, b = budgeted(fake_gemini, store), budgeted(fake_gemini, store)
    yield a, b
    await a.aclose()
    await b.aclose()


async def budget_row(conn: asyncpg.Connection, model: str = MODEL) -> asyncpg.Record:
    return await conn.fetchrow("select * from gemini_budgets where model = $1", model)


class RecordingBudget(FleetBudget):
    """The real budget, noting what each request reserved and what it settled."""

    def __init__(self, store: Store) -> None:
        super().__init__(store, max_wait_s=30.0)
        self.settled: list[tuple[int, int]] = []

    async def settle(self, reservation, used, error) -> None:  # type: ignore[no-untyped-def]
        spent = used.prompt_tokens + used.output_tokens + used.thoughts_tokens if used else 0
        self.settled.append((reservation.tokens, spent))
        await super().settle(reservation, used, error)


async def test_a_chapter_takes_and_settles_every_request(conn, store, fake_gemini) -> None:
    """Each request takes from the budget once, reserving its estimate, and settles the real
    usage the fake reported; the job result has every kind of token."""
    fake_gemini.cache_min_tokens = 40  # short test prompts: let the shared head be cached
    await conn.execute(
        "insert into gemini_budgets (model, rpm, tpm, burst_s) values ($1, 6000, 6000000, 30)",
        MODEL,
    )
    budget = RecordingBudget(store)
    model = GeminiModel(api_key="k", base_url=fake_gemini.base_url, budget=budget)
    _, _, job = await chapter_job(conn, options=OPTIONS, number=2)
    try:
        await generate(store, model, conn, job)
    finally:
        await model.aclose()
    row = await budget_row(conn)
    assert row["granted_requests"] == len(fake_gemini.requests) == 4
    real = [r.usage["totalTokenCount"] for r in fake_gemini.requests if r.usage]
    assert [used for _, used in budget.settled] == real
    estimates = [
        estimate_tokens(
            r.system or "", r.prompt, int(r.generation_config.get("maxOutputTokens", 1024))
        )
        for r in fake_gemini.requests
    ]
    assert [reserved for reserved, _ in budget.settled] == estimates
    assert all(reserved > used for reserved, used in budget.settled)  # estimates are caps
    result = json.loads(await conn.fetchval("select job_result from job_queue where id = $1", job))
    assert result["prompt_tokens"] + result["output_tokens"] == sum(real)
    assert result["cached_tokens"] > 0 and "thoughts_tokens" in result
    # The sections share the story, style and plan: the fake served that head from its cache.
    sections = [r for r in fake_gemini.requests if "streamGenerateContent" in r.path]
    assert all(r.cached_tokens > 0 for r in sections[1:])
    assert sum(r.cached_tokens for r in fake_gemini.requests) == result["cached_tokens"]


async def test_a_429_seen_by_one_instance_holds_back_the_other(
    conn, store, fleet, fake_gemini
) -> None:
    a, b = fleet
    fake_gemini.script(http_error(429, retry_delay="1.5s", quota_id="GenerateRequestsPerMinute"))
    with pytest.raises(RetryableJobError) as first:
        await a.outline(model=MODEL, system="s", prompt="plan")
    assert first.value.kind == "rate_limited"
    row = await budget_row(conn)
    assert row["cooldown_until"] is not None and row["rate_limited"] == 1
    assert "GenerateRequestsPerMinute" in row["cooldown_reason"]
    # The other instance never saw the 429: its next request waits for the cool-down. (The
    # cool-down left is read after t_call, so it can only understate the wait owed.)
    t_call = time.monotonic()
    left = await conn.fetchval(
        "select extract(epoch from cooldown_until - clock_timestamp())::float8"
        " from gemini_budgets where model = $1",
        MODEL,
    )
    await b.outline(model=MODEL, system="s", prompt="plan")
    second = fake_gemini.requests[-1]
    assert len(fake_gemini.requests) == 2 and second.rate_limited is None
    assert left > 0 and second.started_at - t_call >= left - 0.05  # it arrived after the end


async def test_a_cool_down_longer_than_the_wait_goes_back_to_the_queue(
    conn, store, fake_gemini
) -> None:
    model = budgeted(fake_gemini, store, max_wait_s=2.0)
    try:
        await store.budget_settle(MODEL, 0, 0, retry_after_s=600, reason="429 elsewhere")
        with pytest.raises(RetryableJobError) as raised:
            await model.outline(model=MODEL, system="s", prompt="plan")
        assert raised.value.kind == "rate_limited" and raised.value.retry_after > 500
        assert fake_gemini.requests == []  # nothing was sent into the cool-down
    finally:
        await model.aclose()


async def test_a_daily_429_stops_claims_for_that_model_with_a_health_reason(
    conn, store, fleet, fake_gemini
) -> None:
    fake_gemini.script(
        http_error(429, retry_delay="20s", quota_id="GenerateRequestsPerDayPerProjectPerModel")
    )
    _, _, first = await chapter_job(conn, options=OPTIONS)
    await generate(store, fleet[0], conn, first, until=RETRIED)
    details = json.loads(
        await conn.fetchval("select error_details from job_queue where id = $1", first)
    )
    assert details["type"] == "rate_limited" and details["retry_in_s"] >= 3600
    assert "daily Gemini quota" in details["user_message"]
    row = await budget_row(conn)
    assert row["daily_exhausted_until"] is not None
    assert "PerDay" in row["daily_reason"]

    # Another job for the same model is due now: no worker claims it, and /health says why.
    await conn.execute("update job_queue set scheduled_at = now() where id = $1", first)
    _, _, second = await chapter_job(conn, options=OPTIONS)
    budget = fleet[1].budget
    assert isinstance(budget, FleetBudget)
    handlers = build_handlers(ChapterHandler(fleet[1], CONFIG))
    async with running(store, handlers, default_model=MODEL) as runner:
        await wait_until(lambda: runner.claim_calls >= 3)
        await budget.refresh()
        code, body = health_report(runner, LoopMonitor(), budget)
    assert runner.claimed_jobs == 0
    statuses = await conn.fetch("select status from job_queue where id in ($1, $2)", first, second)
    assert {r["status"] for r in statuses} == {"pending"}
    assert code == 200 and body["status"] == "degraded"
    assert any(
        f"Gemini model {MODEL}: daily quota exhausted" in r and "not claimed" in r
        for r in body["reasons"]
    )
    assert len(fake_gemini.requests) == 1


async def test_budget_waits_queue_locally_not_in_the_database(conn, store, fake_gemini) -> None:
    """20 concurrent requests of one process against a small budget: every one is sent, and
    the database is asked about once per grant plus a few waits, not once per waiter."""
    await conn.execute(
        "insert into gemini_budgets (model, rpm, burst_s) values ($1, 600, 0.5)", MODEL
    )
    model = budgeted(fake_gemini, store)
    calls: list[str] = []
    take = store.budget_take

    async def counted(name: str, tokens: int):  # type: ignore[no-untyped-def]
        result = await take(name, tokens)
        calls.append(result.reason)
        return result

    store.budget_take = counted  # type: ignore[method-assign]
    try:
        await asyncio.gather(
            *(model.outline(model=MODEL, system="s", prompt=f"p{i}") for i in range(20))
        )
    finally:
        await model.aclose()
    row = await budget_row(conn)
    assert row["granted_requests"] == 20 == len(fake_gemini.requests)
    # One asker at a time sleeps the wait it was told, so each refusal is followed by a
    # grant: at most two takes per request (20 coroutines polling would make hundreds).
    assert calls.count("granted") == 20 and len(calls) <= 40
    assert "rpm" in calls  # the budget was the limit, not an idle bucket


# -- the fake server's own quotas ---------------------------------------------------------


async def test_the_fake_enforces_one_rpm_across_connections() -> None:
    fake = await start_fake_gemini(rpm=3)
    models = [GeminiModel(api_key="k", base_url=fake.base_url) for _ in range(2)]
    try:
        outcomes = await asyncio.gather(
            *(models[i % 2].outline(model=MODEL, system="s", prompt=f"p{i}") for i in range(5)),
            return_exceptions=True,
        )
        limited = [o for o in outcomes if isinstance(o, RetryableJobError)]
        assert len(limited) == 2 and len(fake.rate_limited) == 2
        assert all(e.kind == "rate_limited" and 0 < (e.retry_after or 0) <= 60 for e in limited)
        assert all("PerMinute" in q for e in limited for q in e.detail["quota_ids"])
    finally:
        for m in models:
            await m.aclose()
        await fake.close()


async def test_the_fake_enforces_tpm_and_rpd() -> None:
    fake = await start_fake_gemini(tpm=200, rpd=3)
    model = GeminiModel(api_key="k", base_url=fake.base_url)
    try:
        await model.outline(model=MODEL, system="s", prompt="x" * 400)  # ~100 + output
        with pytest.raises(RetryableJobError) as tpm:
            await model.outline(model=MODEL, system="s", prompt="y" * 400)
        assert "InputTokens" in tpm.value.detail["quota_ids"][0]
        await model.outline(model="other-model", system="s", prompt="z")
        await model.outline(model="other-model", system="s", prompt="z")
        await model.outline(model="other-model", system="s", prompt="z")
        with pytest.raises(RetryableJobError) as day:
            await model.outline(model="other-model", system="s", prompt="z")
        assert "PerDay" in day.value.detail["quota_ids"][0]
        assert day.value.retry_after >= 3600
    finally:
        await model.aclose()
        await fake.close()


async def test_the_fake_caches_a_repeated_prefix_only_past_its_minimum() -> None:
    fake = await start_fake_gemini(cache_min_tokens=100)
    model = GeminiModel(api_key="k", base_url=fake.base_url)
    head = "The story so far. " * 40  # 720 characters, about 180 tokens
    try:
        _, first = await model.outline(model=MODEL, system="sys", prompt=head + "one")
        _, again = await model.outline(model=MODEL, system="sys", prompt=head + "two")
        _, short = await model.outline(model=MODEL, system="sys", prompt=head[:300] + "x")
        _, other = await model.outline(model="another", system="sys", prompt=head + "one")
    finally:
        await model.aclose()
        await fake.close()
    assert first.cached_tokens == 0 and other.cached_tokens == 0
    assert 150 <= again.cached_tokens <= again.prompt_tokens
    assert short.cached_tokens == 0  # a 300-character shared prefix is under the minimum
