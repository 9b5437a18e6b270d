"""The Store contract: one behavioural suite, run against both adapters.

Every test takes the parametrized ``store`` fixture (tests/store/conftest.py), so each runs
once over the asyncpg transport and once over the REST one (supabase-py → PostgREST
gateway), against the same real database and migrations. ``conn`` is a superuser
connection on that database, used to seed and to check what really changed.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from tests.store._helpers import chapter_job, insert_job, new_id
from tests.support.seed import create_user
from worker.store.base import (
    ClaimedJob,
    ConflictError,
    ForbiddenError,
    InvalidInputError,
    Job,
    NotFoundError,
    RateLimitedError,
)
from worker.store.sqlapi import Store

A, B = "worker-a", "worker-b"


async def row(conn: asyncpg.Connection, job_id: str) -> dict[str, Any]:
    r = await conn.fetchrow("select * from job_queue where id = $1", job_id)
    assert r is not None
    d = dict(r)
    for key in ("error_details", "job_result", "job_payload"):
        if isinstance(d[key], str):
            d[key] = json.loads(d[key])
    return d


async def chapter(conn: asyncpg.Connection, chapter_id: str) -> dict[str, Any]:
    r = await conn.fetchrow("select * from chapters where id = $1", chapter_id)
    assert r is not None
    d = dict(r)
    for key in ("outline", "generation_state"):
        if isinstance(d[key], str):
            d[key] = json.loads(d[key])
    return d


def is_aware(value: Any) -> bool:
    return isinstance(value, datetime) and value.utcoffset() is not None


# -- shape ----------------------------------------------------------------------------------


async def test_name_says_which_transport(store: Store, request: pytest.FixtureRequest) -> None:
    """The start-up log line reports it; the Store takes it from its transport."""
    assert store.name == request.node.callspec.params["store"]


async def test_ping(store: Store) -> None:
    assert await store.ping() is None


# -- claim ----------------------------------------------------------------------------------


async def test_claim_returns_claimed_job_then_none(store: Store, conn) -> None:
    job = await insert_job(conn, payload={"n": 1, "nested": {"k": [1, 2]}})
    claimed = await store.claim(A, None, None)
    assert claimed == ClaimedJob(
        job_id=job, job_type="noop", job_payload={"n": 1, "nested": {"k": [1, 2]}}, retry_count=0
    )
    assert isinstance(claimed.job_id, str)
    assert await store.claim(A, None, None) is None
    r = await row(conn, job)
    assert (r["status"], r["worker_id"]) == ("processing", A)
    assert r["heartbeat_at"] is not None and r["started_at"] is not None


async def test_claim_on_empty_queue_is_none(store: Store) -> None:
    assert await store.claim(A, ["chapter_generation"], ["default"]) is None


async def test_claim_filters_by_type_and_lane(store: Store, conn) -> None:
    a = await insert_job(conn, job_type="a")
    b = await insert_job(conn, job_type="b")
    c = await insert_job(conn, job_type="c", lane="fast")
    assert await store.claim(A, ["zzz"], None) is None
    assert await store.claim(A, ["b"], ["fast"]) is None
    got_b = await store.claim(A, ["b"], None)
    assert got_b is not None and got_b.job_id == b and got_b.job_type == "b"
    got_c = await store.claim(A, None, ["fast"])
    assert got_c is not None and got_c.job_id == c
    assert await store.claim(A, ["a", "b", "c"], ["fast"]) is None
    # Empty lists mean "any", like None.
    got_a = await store.claim(A, [], [])
    assert got_a is not None and got_a.job_id == a


async def test_claim_orders_by_priority(store: Store, conn) -> None:
    await insert_job(conn, priority=0)
    high = await insert_job(conn, priority=5)
    claimed = await store.claim(A, None, None)
    assert claimed is not None and claimed.job_id == high


# -- batch claim (claim_jobs) ----------------------------------------------------------------


async def _claim_all(store: Store, worker: str, limit: int) -> list[ClaimedJob]:
    """Claim until the claim comes back empty (the REST transport takes one job per call)."""
    got: list[ClaimedJob] = []
    while batch := await store.claim_many(worker, None, None, limit):
        assert len(batch) <= min(limit, store.transport.claim_batch_max)
        got += batch
    return got


async def _users_jobs(conn, n_by_user: dict[str | None, int]) -> dict[str | None, list[str]]:
    return {
        u: [await insert_job(conn, user=u, payload={"i": i}) for i in range(n)]
        for u, n in n_by_user.items()
    }


async def test_claim_many_returns_full_rows_fair_and_capped(store: Store, conn) -> None:
    """Default cap 3 per user and lane; jobs without a user are not capped."""
    ua, ub = await create_user(conn), await create_user(conn)
    jobs = await _users_jobs(conn, {ua: 5, ub: 1, None: 2})
    claimed = await _claim_all(store, A, 10)
    assert sorted(c.job_id for c in claimed) == sorted(jobs[ua][:3] + jobs[ub] + jobs[None])
    for c in claimed:
        assert isinstance(c, ClaimedJob) and isinstance(c.job, Job) and c.payload_error is None
        assert isinstance(c.job_id, str) and c.job.id == c.job_id
        assert (c.job.status, c.job.worker_id, c.job.retry_count) == ("processing", A, 0)
        assert c.job_payload == c.job.job_payload and "i" in c.job_payload
        assert is_aware(c.job.started_at) and is_aware(c.job.extra["heartbeat_at"])
    by_user = {c.job.user_id for c in claimed if c.job is not None}
    assert by_user == {ua, ub, None}
    assert await store.claim_many(B, None, None, 10) == []  # ua is at its cap
    assert await store.complete(jobs[ua][0], A, {}) is True
    [next_a] = await store.claim_many(B, None, None, 10)
    assert next_a.job_id == jobs[ua][3] and next_a.job is not None
    assert next_a.job.user_id == ua


async def test_claim_many_filters_and_limit(store: Store, conn) -> None:
    await insert_job(conn, job_type="a", lane="fast")
    await insert_job(conn, job_type="b", lane="slow")
    await insert_job(conn, job_type="b", lane="slow")
    assert await store.claim_many(A, ["c"], None, 5) == []
    assert await store.claim_many(A, None, ["other"], 5) == []
    assert [c.job_type for c in await store.claim_many(A, ["b"], None, 1)] == ["b"]
    assert [c.job_type for c in await store.claim_many(A, None, ["fast"], 5)] == ["a"]
    assert [c.job_type for c in await store.claim_many(A, None, None, 5)] == ["b"]


@pytest.mark.parametrize("limit", [0, -1])
async def test_claim_many_rejects_a_bad_limit(store: Store, limit: int) -> None:
    with pytest.raises(InvalidInputError):
        await store.claim_many(A, None, None, limit)


def test_a_batch_row_that_cannot_be_read_keeps_its_id_and_error() -> None:
    jid = new_id()
    bad = ClaimedJob.from_full_row(
        {
            "id": jid,
            "job_type": "noop",
            "status": "processing",
            "job_payload": [1],
            "retry_count": 2,
        }
    )
    assert bad.job_id == jid and bad.job is None and bad.retry_count == 2
    assert bad.payload_error is not None and "JSON object" in bad.payload_error


async def test_complete_many_is_fenced_and_idempotent(store: Store, conn) -> None:
    ids = [await insert_job(conn) for _ in range(3)]
    assert len(await _claim_all(store, A, 3)) == 3
    await conn.execute("update job_queue set status = 'cancelled' where id = $1", ids[2])
    results = {j: {"n": k, "text": "é\u2028"} for k, j in enumerate(ids)}
    assert await store.complete_many(B, results) == set()
    assert await store.complete_many(A, results) == set(ids[:2])
    assert await store.complete_many(A, results) == set(ids[:2])  # a retry: same answer
    r = await row(conn, ids[1])
    assert r["status"] == "completed" and r["job_result"] == {"n": 1, "text": "é\u2028"}
    assert (await row(conn, ids[2]))["status"] == "cancelled"
    assert await store.complete_many(A, {}) == set()
    assert await store.complete_many(A, {new_id(): {}}) == set()


async def test_complete_many_rejects_a_bad_id(store: Store) -> None:
    with pytest.raises(InvalidInputError):
        await store.complete_many(A, {"not-a-uuid": {}})


async def test_user_load(store: Store, conn) -> None:
    ua = await create_user(conn)
    await _users_jobs(conn, {ua: 4, None: 1})
    await store.claim_many(A, None, None, 1)
    await store.claim_many(A, None, None, 1)
    load = await store.user_load(10)
    got = {(r["user_id"], r["job_lane"]): (r["processing"], r["pending"]) for r in load}
    assert got == {(ua, "default"): (1, 3), (None, "default"): (1, 0)}
    assert all(r["max_processing"] == 3 for r in load)
    assert len(await store.user_load(1)) == 1


# -- get_job --------------------------------------------------------------------------------


async def test_get_job_returns_the_full_row(store: Store, conn) -> None:
    cj = await chapter_job(conn)
    await store.claim(A, ["chapter_generation"], None)
    job = await store.get_job(cj.job)
    assert isinstance(job, Job)
    assert job.id == cj.job and isinstance(job.id, str)
    assert (job.job_type, job.job_lane, job.status, job.worker_id) == (
        "chapter_generation",
        "default",
        "processing",
        A,
    )
    assert job.user_id == cj.user and isinstance(job.user_id, str)
    assert job.job_payload == {"chapter_id": cj.chapter, "story_id": cj.story}
    assert (job.priority, job.retry_count, job.max_retries, job.lease_timeout_s) == (0, 0, 3, 60)
    assert job.error_details is None
    for ts in (job.scheduled_at, job.started_at, job.created_at):
        assert is_aware(ts)
    r = await row(conn, cj.job)
    assert job.started_at == r["started_at"] and job.created_at == r["created_at"]
    # The remaining columns travel in ``extra``.
    assert {
        "heartbeat_at",
        "completed_at",
        "job_result",
        "progress",
        "current_step",
        "idempotency_key",
        "updated_at",
    } <= set(job.extra)


async def test_get_job_unknown_id_is_none(store: Store) -> None:
    assert await store.get_job(new_id()) is None


async def test_get_job_without_user(store: Store, conn) -> None:
    jid = await insert_job(conn)
    job = await store.get_job(jid)
    assert job is not None and job.user_id is None and job.worker_id is None
    assert job.status == "pending" and job.job_payload == {}


@pytest.mark.parametrize("key", ["heartbeat_at", "completed_at", "updated_at"])
async def test_get_job_extra_timestamps_are_aware_datetimes(
    store: Store, conn, key: str, request: pytest.FixtureRequest
) -> None:
    """base.py promises "timestamps as aware datetimes, whatever the wire gave us"."""
    jid = await insert_job(conn)
    await store.claim(A, None, None)
    await store.complete(jid, A, {})
    job = await store.get_job(jid)
    assert job is not None
    assert is_aware(job.extra[key])


# -- heartbeats -----------------------------------------------------------------------------


async def test_heartbeat_only_for_the_holder(store: Store, conn) -> None:
    jid = await insert_job(conn)
    await store.claim(A, None, None)
    await conn.execute(
        "update job_queue set heartbeat_at = now() - interval '30 s' where id = $1", jid
    )
    before = (await row(conn, jid))["heartbeat_at"]
    assert await store.heartbeat(jid, A) is True
    assert (await row(conn, jid))["heartbeat_at"] > before
    assert await store.heartbeat(jid, B) is False
    assert await store.heartbeat(new_id(), A) is False


async def test_heartbeat_many_returns_only_held_ids(store: Store, conn) -> None:
    ids = [await insert_job(conn, job_type=t) for t in ("a", "a", "b")]
    await store.claim(A, ["a"], None)
    await store.claim(A, ["a"], None)
    await store.claim(B, ["b"], None)
    held = await store.heartbeat_many([*ids, new_id()], A)
    assert held == {ids[0], ids[1]}
    assert all(isinstance(i, str) for i in held)
    assert await store.heartbeat_many([ids[2]], A) == set()
    assert await store.heartbeat_many([], A) == set()
    await store.complete(ids[0], A, {})
    assert await store.heartbeat_many(ids, A) == {ids[1]}


async def test_heartbeat_stops_after_cancel(store: Store, conn) -> None:
    jid = await insert_job(conn)
    await store.claim(A, None, None)
    await conn.execute("update job_queue set status = 'cancelled' where id = $1", jid)
    assert await store.heartbeat(jid, A) is False
    assert await store.heartbeat_many([jid], A) == set()


# -- complete -------------------------------------------------------------------------------


async def test_complete_is_fenced_and_idempotent(store: Store, conn) -> None:
    jid = await insert_job(conn)
    await store.claim(A, None, None)
    assert await store.complete(jid, B, {"x": 1}) is False
    assert (await row(conn, jid))["status"] == "processing"
    assert await store.complete(jid, A, {"words": 1200, "usage": {"in": 3}}) is True
    r = await row(conn, jid)
    assert r["status"] == "completed" and r["completed_at"] is not None
    assert r["job_result"] == {"words": 1200, "usage": {"in": 3}}
    # A retried complete whose first attempt committed: still true, nothing changes.
    assert await store.complete(jid, A, {"words": 1}) is True
    assert (await row(conn, jid))["job_result"] == {"words": 1200, "usage": {"in": 3}}
    assert await store.complete(jid, B, {}) is False
    assert await store.complete(new_id(), A, {}) is False


# -- fail -----------------------------------------------------------------------------------


async def test_fail_retry_path(store: Store, conn) -> None:
    jid = await insert_job(conn)
    await store.claim(A, None, None)
    retry_at = datetime.now(UTC) + timedelta(seconds=120)
    details = {
        "type": "rate_limited",
        "message": "429",
        "will_retry": True,
        "attempt": 1,
        "retry_after_s": 30.5,
        "detail": {"quota": ["rpm"]},
    }
    ok = await store.fail(jid, A, error_details=details, retry_count=1, retry_at=retry_at)
    assert ok is True
    r = await row(conn, jid)
    assert (r["status"], r["retry_count"], r["worker_id"]) == ("pending", 1, None)
    assert abs((r["scheduled_at"] - retry_at).total_seconds()) < 0.001
    assert r["scheduled_at"] > datetime.now(UTC)
    assert r["completed_at"] is None
    job = await store.get_job(jid)
    assert job is not None and job.status == "pending" and job.retry_count == 1
    assert job.error_details == details and isinstance(job.error_details, dict)
    assert job.scheduled_at is not None and job.scheduled_at > datetime.now(UTC)
    # Not due yet, so not claimable.
    assert await store.claim(B, None, None) is None


async def test_fail_final_path(store: Store, conn) -> None:
    jid = await insert_job(conn)
    await store.claim(A, None, None)
    details = {"type": "invalid_request", "message": "bad prompt", "will_retry": False}
    assert await store.fail(jid, A, error_details=details, retry_count=1, retry_at=None) is True
    r = await row(conn, jid)
    assert r["status"] == "failed" and r["completed_at"] is not None
    assert r["error_details"] == details
    assert r["retry_count"] == 0  # the final path does not touch retry_count
    job = await store.get_job(jid)
    assert job is not None and job.status == "failed" and job.error_details == details
    assert await store.claim(A, None, None) is None


async def test_fail_by_non_owner_changes_nothing(store: Store, conn) -> None:
    jid = await insert_job(conn)
    await store.claim(A, None, None)
    before = await row(conn, jid)
    soon = datetime.now(UTC) + timedelta(seconds=5)
    assert await store.fail(jid, B, error_details={"m": 1}, retry_count=1, retry_at=soon) is False
    assert await store.fail(jid, B, error_details={"m": 1}, retry_count=1, retry_at=None) is False
    assert await store.fail(new_id(), A, error_details={}, retry_count=1, retry_at=None) is False
    after = await row(conn, jid)
    assert after == before


async def test_fail_after_complete_is_false(store: Store, conn) -> None:
    jid = await insert_job(conn)
    await store.claim(A, None, None)
    assert await store.complete(jid, A, {}) is True
    assert await store.fail(jid, A, error_details={"m": 1}, retry_count=1, retry_at=None) is False
    assert (await row(conn, jid))["status"] == "completed"


# -- release --------------------------------------------------------------------------------


async def test_release_hands_the_job_back(store: Store, conn) -> None:
    jid = await insert_job(conn)
    await store.claim(A, None, None)
    assert await store.release(jid, B) is False
    assert await store.release(jid, A) is True
    r = await row(conn, jid)
    assert (r["status"], r["worker_id"], r["retry_count"], r["current_step"]) == (
        "pending",
        None,
        0,
        "released",
    )
    assert await store.release(jid, A) is False
    again = await store.claim(B, None, None)
    assert again is not None and again.job_id == jid and again.retry_count == 0


async def test_release_worker_jobs(store: Store, conn) -> None:
    ids = [await insert_job(conn) for _ in range(3)]
    await store.claim(A, None, None)
    await store.claim(A, None, None)
    await store.claim(B, None, None)
    assert await store.release_worker_jobs(A) == 2
    assert await store.release_worker_jobs(A) == 0
    statuses = {
        r["status"]: r["n"]
        for r in await conn.fetch(
            "select status, count(*)::int as n from job_queue where id = any($1::uuid[])"
            " group by status",
            ids,
        )
    }
    assert statuses == {"pending": 2, "processing": 1}


# -- queue_stats ----------------------------------------------------------------------------


async def test_queue_stats_shape(store: Store, conn) -> None:
    empty = await store.queue_stats()
    assert empty["by_status"] == {} and empty["by_type"] == []
    assert empty["oldest_pending_age_s"] is None

    done = await insert_job(conn, job_type="a")
    await insert_job(conn, job_type="a")
    await insert_job(conn, job_type="b")
    await store.claim(A, ["a"], None)
    await store.complete(done, A, {})
    stats = await store.queue_stats()
    assert set(stats) == {
        "by_status",
        "by_type",
        "oldest_pending_age_s",
        "last_hour",
        "generated_at",
    }
    assert stats["by_status"] == {"pending": 2, "completed": 1}
    assert stats["by_type"] == [
        {"job_type": "a", "status": "completed", "count": 1},
        {"job_type": "a", "status": "pending", "count": 1},
        {"job_type": "b", "status": "pending", "count": 1},
    ]
    assert isinstance(stats["oldest_pending_age_s"], int | float)
    assert stats["oldest_pending_age_s"] >= 0
    assert stats["last_hour"]["completed"] == 1
    assert isinstance(stats["last_hour"]["avg_run_s"], int | float)
    assert isinstance(stats["generated_at"], str)


# -- chapter writes -------------------------------------------------------------------------


async def test_start_chapter_returns_the_context(store: Store, conn) -> None:
    cj = await chapter_job(conn)
    await store.claim(A, ["chapter_generation"], None)
    ctx = await store.start_chapter(cj.job, A, 10)
    assert isinstance(ctx, dict)
    assert ctx["chapter"]["id"] == cj.chapter and ctx["chapter"]["number"] == 2
    assert ctx["chapter"]["owner_id"] == cj.user
    assert ctx["chapter"]["content_length"] == 0 and ctx["chapter"]["content_tail"] == ""
    assert ctx["story"] == {
        "id": cj.story,
        "title": "Tides",
        "premise": "The sea keeps a ledger.",
        "preferences": {"genre": "mystery"},
    }
    assert ctx["previous"] == [{"number": 1, "title": "One", "tail": "xxxxxxxEND"}]
    ch = await chapter(conn, cj.chapter)
    assert (ch["status"], ch["current_step"]) == ("generating", "starting")


async def test_chapter_write_sequence(store: Store, conn) -> None:
    cj = await chapter_job(conn)
    await store.claim(A, ["chapter_generation"], None)
    assert await store.start_chapter(cj.job, A, 100) is not None

    outline = {"sections": [{"title": "Low tide"}, {"title": "High tide"}]}
    assert await store.save_outline(cj.job, A, "The Ledger", outline) is True
    ch = await chapter(conn, cj.chapter)
    assert ch["outline"] == outline and ch["title"] == "The Ledger" and ch["progress"] == 10

    text1 = "The water went out. "
    assert (
        await store.append_chapter(
            cj.job,
            A,
            offset=0,
            text=text1,
            progress=40,
            current_step="section 1/2: Low tide",
            checkpoint={"sections_done": 1, "content_length": len(text1)},
        )
        is True
    )
    # Re-sending the same append (the first response was lost) is a no-op, and true.
    assert (
        await store.append_chapter(
            cj.job, A, offset=0, text=text1, progress=40, current_step="section 1/2: Low tide"
        )
        is True
    )
    ch = await chapter(conn, cj.chapter)
    assert ch["progress"] == 40
    # The text lives in chapter_chunks until the chapter finishes.
    assert await conn.fetchval("select content from get_chapter_text($1)", cj.chapter) == text1
    assert ch["generation_state"] == {"sections_done": 1, "content_length": len(text1)}
    assert (await row(conn, cj.job))["progress"] == 40

    with pytest.raises(ConflictError) as err:
        await store.append_chapter(
            cj.job, A, offset=5, text="oops", progress=50, current_step="section 2/2"
        )
    assert err.value.code == "PT409" and not err.value.transient
    assert "offset mismatch" in str(err.value)
    assert await conn.fetchval("select content from get_chapter_text($1)", cj.chapter) == text1

    text2 = "Then it came back, all at once."
    assert (
        await store.append_chapter(
            cj.job,
            A,
            offset=len(text1),
            text=text2,
            progress=80,
            current_step="section 2/2: High tide",
        )
        is True
    )
    assert await store.rewind_chapter(cj.job, A, len(text1)) is True
    assert await conn.fetchval("select content from get_chapter_text($1)", cj.chapter) == text1
    with pytest.raises(ConflictError):
        await store.rewind_chapter(cj.job, A, len(text1) + 1)
    assert (
        await store.append_chapter(
            cj.job,
            A,
            offset=len(text1),
            text=text2,
            progress=80,
            current_step="section 2/2: High tide",
        )
        is True
    )

    words = await store.finish_chapter(cj.job, A)
    assert words == len((text1 + text2).split()) == 11
    assert isinstance(words, int) and not isinstance(words, bool)
    ch = await chapter(conn, cj.chapter)
    assert (ch["status"], ch["word_count"], ch["progress"]) == ("completed", 11, 100)
    assert ch["content"] == text1 + text2
    assert ch["generation_state"]["finished"] is True
    assert (await row(conn, cj.job))["progress"] == 99
    assert await store.complete(cj.job, A, {"word_count": words}) is True
    assert (await row(conn, cj.job))["progress"] == 100


async def test_start_chapter_resumes_from_the_checkpoint(store: Store, conn) -> None:
    cj = await chapter_job(conn)
    await store.claim(A, ["chapter_generation"], None)
    await store.start_chapter(cj.job, A, 100)
    await store.save_outline(cj.job, A, "T", {"sections": [1, 2]})
    await store.append_chapter(
        cj.job,
        A,
        offset=0,
        text="kept. ",
        progress=40,
        current_step="s1",
        checkpoint={"content_length": 6},
    )
    await store.append_chapter(cj.job, A, offset=6, text="partial", progress=50, current_step="s2")
    await store.release(cj.job, A)
    await store.claim(B, ["chapter_generation"], None)
    ctx = await store.start_chapter(cj.job, B, 3)
    assert ctx is not None
    assert ctx["chapter"]["content_length"] == 6 and ctx["chapter"]["content_tail"] == "t. "
    assert (await chapter(conn, cj.chapter))["content"] == "kept. "


async def test_finish_chapter_none_when_lease_lost(store: Store, conn) -> None:
    cj = await chapter_job(conn)
    await store.claim(A, ["chapter_generation"], None)
    assert await store.finish_chapter(cj.job, B) is None
    assert (await chapter(conn, cj.chapter))["status"] == "draft"
    assert await store.finish_chapter(cj.job, A) == 0


async def test_writes_by_a_rescued_worker_change_nothing(store: Store, conn) -> None:
    cj = await chapter_job(conn, lease_timeout_s=1)
    await store.claim(A, ["chapter_generation"], None)
    await store.start_chapter(cj.job, A, 100)
    await store.append_chapter(
        cj.job,
        A,
        offset=0,
        text="first. ",
        progress=20,
        current_step="s1",
        checkpoint={"content_length": 7},
    )
    await asyncio.sleep(1.1)
    rescued = await store.claim(B, ["chapter_generation"], None)
    assert rescued is not None and rescued.job_id == cj.job and rescued.retry_count == 1
    job_before, chapter_before = await row(conn, cj.job), await chapter(conn, cj.chapter)
    assert job_before["worker_id"] == B and job_before["error_details"]["type"] == "lease_expired"

    assert await store.heartbeat(cj.job, A) is False
    assert await store.heartbeat_many([cj.job], A) == set()
    assert await store.start_chapter(cj.job, A, 100) is None
    assert await store.save_outline(cj.job, A, "stale", {"x": 1}) is False
    assert (
        await store.append_chapter(
            cj.job, A, offset=7, text="stale", progress=90, current_step="stale"
        )
        is False
    )
    assert (
        await store.append_chapter(
            cj.job, A, offset=999, text="x", progress=90, current_step="stale"
        )
        is False
    )  # no conflict either
    assert await store.rewind_chapter(cj.job, A, 0) is False
    assert await store.finish_chapter(cj.job, A) is None
    assert await store.release(cj.job, A) is False
    assert (
        await store.fail(
            cj.job, A, error_details={"m": "stale"}, retry_count=2, retry_at=datetime.now(UTC)
        )
        is False
    )
    assert (
        await store.fail(cj.job, A, error_details={"m": "stale"}, retry_count=2, retry_at=None)
        is False
    )
    assert await store.complete(cj.job, A, {"stale": True}) is False
    assert await store.release_worker_jobs(A) == 0

    assert await row(conn, cj.job) == job_before
    assert await chapter(conn, cj.chapter) == chapter_before
    # The new holder carries on from the checkpoint.
    ctx = await store.start_chapter(cj.job, B, 100)
    assert ctx is not None and ctx["chapter"]["content_length"] == 0  # no outline yet
    assert await store.heartbeat(cj.job, B) is True


# -- errors map to the same StoreError subclasses -------------------------------------------


async def test_start_chapter_forbidden_when_user_does_not_own_chapter(store: Store, conn) -> None:
    cj = await chapter_job(conn)
    other = await insert_job(conn)  # noqa: F841 - a bystander job
    intruder = await conn.fetchval(
        "insert into auth.users (id, email) values (gen_random_uuid(), 'i@x') returning id"
    )
    await conn.execute("update job_queue set user_id = $1 where id = $2", intruder, cj.job)
    await store.claim(A, ["chapter_generation"], None)
    with pytest.raises(ForbiddenError) as err:
        await store.start_chapter(cj.job, A, 100)
    assert err.value.code == "PT403" and err.value.kind == "forbidden"
    assert (await chapter(conn, cj.chapter))["status"] == "draft"


async def test_chapter_writes_not_found_without_chapter(store: Store, conn) -> None:
    cj = await chapter_job(conn, link=False)
    await store.claim(A, ["chapter_generation"], None)
    with pytest.raises(NotFoundError) as err:
        await store.start_chapter(cj.job, A, 100)
    assert err.value.code == "PT404"
    with pytest.raises(NotFoundError):
        await store.append_chapter(cj.job, A, offset=0, text="x", progress=1, current_step="s")


async def test_invalid_input(store: Store) -> None:
    with pytest.raises(InvalidInputError) as err:
        await store.claim("", None, None)
    assert err.value.code == "PT400"
    with pytest.raises(InvalidInputError):
        await store.purge_finished(-1)


async def test_non_json_values_fail_the_same_way(
    store: Store, conn, request: pytest.FixtureRequest
) -> None:
    """NaN cannot be stored in jsonb: both adapters should say InvalidInputError."""
    jid = await insert_job(conn)
    await store.claim(A, None, None)
    with pytest.raises(InvalidInputError):
        await store.complete(jid, A, {"score": float("nan")})
    assert (await row(conn, jid))["status"] == "processing"


async def test_datetime_inside_json_is_stored_the_same_way(
    store: Store, conn, request: pytest.FixtureRequest
) -> None:
    """supabase-py encodes nested datetimes as ISO strings; asyncpg's json codec does not."""
    jid = await insert_job(conn)
    await store.claim(A, None, None)
    at = datetime(2026, 11, 22, 8, 0, tzinfo=UTC)
    assert await store.complete(jid, A, {"at": at}) is True
    assert (await row(conn, jid))["job_result"] == {"at": at.isoformat()}


# -- operators ------------------------------------------------------------------------------


async def _failed_job(store: Store, conn, job_type: str) -> str:
    jid = await insert_job(conn, job_type=job_type)
    claimed = await store.claim(A, [job_type], None)
    assert claimed is not None and claimed.job_id == jid
    assert await store.fail(jid, A, error_details={"m": "x"}, retry_count=1, retry_at=None)
    return jid


async def test_requeue_failed(store: Store, conn) -> None:
    a1 = await _failed_job(store, conn, "a")
    a2 = await _failed_job(store, conn, "a")
    b1 = await _failed_job(store, conn, "b")
    pending = await insert_job(conn, job_type="b")

    assert await store.requeue_failed(failed_after=datetime.now(UTC) + timedelta(hours=1)) == []
    assert await store.requeue_failed(job_ids=[b1, pending, new_id()]) == [b1]
    requeued = await store.requeue_failed(job_type="a", limit=1)
    assert len(requeued) == 1 and requeued[0] in (a1, a2)
    rest = await store.requeue_failed(failed_after=datetime.now(UTC) - timedelta(hours=1))
    assert rest == [({a1, a2} - set(requeued)).pop()]
    assert await store.requeue_failed() == []
    for jid in (a1, a2, b1):
        r = await row(conn, jid)
        assert (r["status"], r["retry_count"], r["error_details"], r["current_step"]) == (
            "pending",
            0,
            None,
            "requeued",
        )


async def test_purge_finished(store: Store, conn) -> None:
    old = await insert_job(conn)
    recent = await insert_job(conn)
    pending = await insert_job(conn)
    await store.claim(A, None, None)
    await store.claim(A, None, None)
    claimed = [
        r["id"]
        for r in await conn.fetch("select id::text from job_queue where status = 'processing'")
    ]
    assert set(claimed) == {old, recent}
    for jid in claimed:
        assert await store.complete(jid, A, {}) is True
    await conn.execute(
        "update job_queue set completed_at = now() - interval '10 days' where id = $1", old
    )
    assert await store.purge_finished(7) == 1
    assert await store.purge_finished(7) == 0
    left = {str(r["id"]) for r in await conn.fetch("select id from job_queue")}
    assert left == {recent, pending}
    assert await store.get_job(old) is None


async def test_ids_are_uuid_strings(store: Store, conn) -> None:
    jid = await insert_job(conn)
    claimed = await store.claim(A, None, None)
    assert claimed is not None and str(uuid.UUID(claimed.job_id)) == claimed.job_id == jid


async def test_enqueue_job(store: Store, conn) -> None:
    jid = await store.enqueue_job("noop", {"n": 7}, priority=3, lane="fast", max_retries=1)
    assert isinstance(jid, str) and str(uuid.UUID(jid)) == jid
    r = await row(conn, jid)
    assert (
        r["job_type"],
        r["job_payload"],
        r["priority"],
        r["job_lane"],
        r["max_retries"],
        r["status"],
    ) == ("noop", {"n": 7}, 3, "fast", 1, "pending")
    later = await store.enqueue_job("noop", delay_s=60)
    assert (await row(conn, later))["scheduled_at"] > datetime.now(UTC) + timedelta(seconds=50)
    claimed = await store.claim(A, None, ["fast"])
    assert claimed is not None and claimed.job_id == jid
    assert await store.claim(A, None, None) is None  # the delayed one is not due


async def test_enqueue_chapter_on_behalf_of_its_owner(store: Store, conn) -> None:
    cj = await chapter_job(conn, link=False)
    jid = await store.enqueue_chapter(cj.chapter, {"target_words": 900}, idempotency_key="k-1")
    assert isinstance(jid, str) and jid != cj.job
    r = await row(conn, jid)
    assert (r["job_type"], str(r["user_id"]), r["idempotency_key"]) == (
        "chapter_generation",
        cj.user,
        "k-1",
    )
    assert r["job_payload"]["options"] == {"target_words": 900}
    assert await store.enqueue_chapter(cj.chapter, idempotency_key="k-1") == jid
    ch = await chapter(conn, cj.chapter)
    assert (str(ch["generation_job_id"]), ch["status"]) == (jid, "queued")
    with pytest.raises(ConflictError):  # an active job already exists
        await store.enqueue_chapter(cj.chapter)
    with pytest.raises(NotFoundError):
        await store.enqueue_chapter(new_id())


async def test_story_progress(store: Store, conn, request: pytest.FixtureRequest) -> None:
    cj = await chapter_job(conn)
    rows = await store.story_progress(cj.story)
    assert [r["number"] for r in rows] == [1, 2]
    assert rows[1]["content"] is None and rows[0]["content_length"] == 53
    assert (await store.story_progress(cj.story, with_content=True))[0]["content"].endswith("END")
    assert rows[1]["chapter_id"] == cj.chapter and rows[1]["job_id"] == cj.job


# -- limits at the door (migration 20261201000100), as each adapter reports them ---------------
@pytest.mark.parametrize(
    "options,needle",
    [
        ({"colour": "blue"}, "unknown key 'colour'"),
        ({"sections": "5"}, "p_options.sections must be a whole number"),
        ({"genre": "x" * 101}, "p_options.genre must be text of at most 100"),
    ],
)
async def test_bad_chapter_options_are_an_invalid_input_naming_the_key(
    store: Store, conn, options, needle
) -> None:
    cj = await chapter_job(conn, link=False)
    with pytest.raises(InvalidInputError) as err:
        await store.enqueue_chapter(cj.chapter, options)
    assert err.value.code == "PT400" and needle in str(err.value)
    assert await conn.fetchval("select count(*) from job_queue where user_id = $1", cj.user) == 1


@pytest.mark.parametrize("payload", [["a", "list"], "hello", {"a": "x" * 70_000}])
async def test_a_payload_that_is_not_a_small_object_is_refused(store: Store, conn, payload) -> None:
    before = await conn.fetchval("select count(*) from job_queue")
    with pytest.raises(InvalidInputError) as err:
        await store.transport.value("enqueue_job", {"p_job_type": "noop", "p_job_payload": payload})
    assert err.value.code == "PT400" and "job_payload" in str(err.value)
    assert await conn.fetchval("select count(*) from job_queue") == before


async def test_the_per_user_cap_is_a_clear_rate_limit_error(store: Store, conn) -> None:
    cj = await chapter_job(conn, link=False)
    await conn.execute("update job_lanes set max_active_per_user = 1 where lane = 'default'")
    with pytest.raises(RateLimitedError) as err:
        await store.enqueue_chapter(cj.chapter)
    assert err.value.code == "PT429" and "too many active jobs" in str(err.value)


# -- operator commands (genworker cancel|pause|resume, show) -------------------------------


async def test_control_job_pause_resume_cancel(store: Store, conn) -> None:
    job = await insert_job(conn)
    assert await store.control_job(job, "resume") is False
    assert await store.control_job(job, "pause") is True
    assert (await store.get_job(job)).status == "paused"  # type: ignore[union-attr]
    assert await store.control_job(job, "resume") is True
    assert await store.control_job(job, "cancel") is True
    assert await store.control_job(job, "cancel") is False
    assert (await store.get_job(job)).status == "cancelled"  # type: ignore[union-attr]


async def test_control_job_unknown_job(store: Store) -> None:
    with pytest.raises(NotFoundError):
        await store.control_job("00000000-0000-4000-8000-000000000000", "cancel")


async def test_control_job_rejects_other_actions(store: Store) -> None:
    with pytest.raises(ValueError):
        await store.control_job("00000000-0000-4000-8000-000000000000", "delete")


async def test_read_chapter(store: Store, conn) -> None:
    cj = await chapter_job(conn)
    await conn.execute(
        "update chapters set content = $1, progress = 30 where id = $2",
        "Tide 🌊 rising.",
        cj.chapter,
    )
    whole = await store.read_chapter(cj.chapter)
    assert whole is not None
    assert whole["content"] == "Tide 🌊 rising." and whole["content_length"] == 14
    assert whole["progress"] == 30 and whole["job_id"] == cj.job
    assert whole["job_status"] == "pending" and whole["chapter_id"] == cj.chapter
    tail = await store.read_chapter(cj.chapter, from_char=5)
    assert tail is not None and tail["content"] == "🌊 rising."
    assert await store.read_chapter("00000000-0000-4000-8000-000000000000") is None


# -- the fleet's Gemini budget -------------------------------------------------------------


async def test_budget_take_settle_and_status(store: Store, conn) -> None:
    from worker.store.base import BudgetTake

    free = await store.budget_take("m-unset", 100)
    assert free == BudgetTake(granted=True, wait_s=0.0, reason="unbudgeted", until=None)
    await conn.execute("insert into gemini_budgets (model, rpm, burst_s) values ('m-c', 60, 1)")
    await conn.execute("update gemini_budgets set request_level = 1, refilled_at = now()")
    assert (await store.budget_take("m-c", 10)).granted
    empty = await store.budget_take("m-c", 10)
    assert (empty.granted, empty.reason) == (False, "rpm") and empty.wait_s > 0
    await store.budget_settle("m-c", 10, 7, retry_after_s=30.0, reason="429 from Gemini")
    cool = await store.budget_take("m-c", 10)
    assert (cool.granted, cool.reason) == (False, "cooldown") and is_aware(cool.until)
    await store.budget_settle("m-d", 0, 0, daily=True, reason="PerDay quota")
    status = {r["model"]: r for r in await store.budget_status()}
    assert status["m-c"]["cooldown_reason"] == "429 from Gemini" and status["m-c"]["rpm"] == 60
    assert status["m-d"]["daily_reason"] == "PerDay quota"
    assert status["m-d"]["daily_exhausted_until"] is not None
    with pytest.raises(InvalidInputError):
        await store.budget_take("", 1)


async def test_claim_many_leaves_jobs_whose_model_cannot_run(store: Store, conn) -> None:
    blocked = await chapter_job(conn)
    await store.budget_settle("gemini-blocked", 0, 0, retry_after_s=600)
    assert await store.claim_many(A, None, None, 10, "gemini-blocked") == []
    claimed = await store.claim_many(A, None, None, 10, "gemini-free")
    assert [c.job_id for c in claimed] == [blocked.job]
