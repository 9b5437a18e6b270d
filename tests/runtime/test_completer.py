"""Batched completion: jobs finishing together share one call, and still each learn their
own outcome when the call fails because of one job's result."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.seed import insert_jobs
from tests.support.stores import ADAPTERS, open_store
from worker.completer import Completer
from worker.metrics import Metrics
from worker.store import StoreError


@pytest.mark.parametrize("adapter", ADAPTERS)
async def test_a_result_the_database_refuses_fails_only_its_own_job(
    adapter: str, db_dsn: str, conn
) -> None:
    await insert_jobs(conn, 4)
    async with open_store(adapter, db_dsn) as store:
        claimed = []
        while len(claimed) < 4:
            claimed += await store.claim_many("w", None, None, 4)
        ids = [c.job.id for c in claimed]
        completer = Completer(store, "w", Metrics())
        results = [{"n": i} for i in range(4)]
        results[2] = {"n": float("nan")}  # not JSON: the store refuses the whole call
        outcomes = await asyncio.gather(
            *(completer.complete(j, r) for j, r in zip(ids, results, strict=True)),
            return_exceptions=True,
        )
    assert [o for i, o in enumerate(outcomes) if i != 2] == [True, True, True]
    assert isinstance(outcomes[2], (StoreError, ValueError))
    rows = await conn.fetch("select id::text, status from job_queue")
    assert {r["id"]: r["status"] for r in rows} == {
        j: ("processing" if i == 2 else "completed") for i, j in enumerate(ids)
    }
