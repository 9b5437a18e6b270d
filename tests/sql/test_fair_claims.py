"""Fair claims across users, the per-user processing cap and the batch claim (claim_jobs).

Both claim functions are exercised: ``claim_next_job_v3`` (one job, its fixed contract) and
``claim_jobs`` (up to N full rows in one statement).
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import asyncpg
import pytest

from tests.support.seed import claim, create_user, insert_jobs

NIL = "00000000-0000-0000-0000-000000000000"


async def user_jobs(
    conn: asyncpg.Connection,
    user: str | None,
    n: int,
    *,
    lane: str = "default",
    priority: int = 0,
    job_type: str = "noop",
) -> list[str]:
    """n pending jobs of one user, inserted in one statement (created_at in order)."""
    rows = await conn.fetch(
        "insert into job_queue (job_type, job_lane, priority, user_id, job_payload, created_at)"
        " select $1, $2, $3, $4, jsonb_build_object('n', g),"
        "        now() + make_interval(secs => g / 1000.0)"
        " from generate_series(1, $5) g returning id",
        job_type,
        lane,
        priority,
        user,
        n,
    )
    return [str(r["id"]) for r in rows]


@pytest.fixture(autouse=True)
async def _room_at_the_door(conn: asyncpg.Connection) -> None:
    """Issue 8's enqueue caps (50 active per user) would stop the backlogs these tests need."""
    await conn.execute(
        "update job_lanes set max_active_per_user = 100000,"
        " max_enqueued_per_user_per_hour = 10000000"
    )


async def set_caps(conn: asyncpg.Connection, *, processing: int, active: int = 100000) -> None:
    await conn.execute(
        "update job_lanes set max_processing_per_user = $1, max_active_per_user = $2,"
        " max_enqueued_per_user_per_hour = 10000000",
        processing,
        active,
    )


async def claim_batch(
    conn: asyncpg.Connection, worker: str, n: int, types=None, lanes=None
) -> list[asyncpg.Record]:
    return await conn.fetch("select * from claim_jobs($1, $2, $3, $4)", worker, types, lanes, n)


async def owner(conn: asyncpg.Connection, job_id) -> str | None:
    v = await conn.fetchval("select user_id from job_queue where id = $1", job_id)
    return None if v is None else str(v)


async def claim_one(conn: asyncpg.Connection, fn: str, worker: str):
    """The next job id through either claim function."""
    if fn == "v3":
        row = await claim(conn, worker)
        return None if row is None else str(row["job_id"])
    rows = await claim_batch(conn, worker, 1)
    return str(rows[0]["id"]) if rows else None


# -- fairness -----------------------------------------------------------------------------


@pytest.mark.parametrize("fn", ["v3", "claim_jobs"])
@pytest.mark.parametrize("complete_each", [False, True])
async def test_one_users_backlog_does_not_delay_another_user(
    conn: asyncpg.Connection, fn: str, complete_each: bool
) -> None:
    await set_caps(conn, processing=1000)
    a, b = await create_user(conn), await create_user(conn)
    await user_jobs(conn, a, 2000)
    # A is being served already (its state row exists) when B arrives.
    first = await claim_one(conn, fn, "w")
    assert await owner(conn, first) == a
    if complete_each:
        await conn.fetchval("select complete_job($1, 'w', '{}')", first)
    [b_job] = await user_jobs(conn, b, 1)
    got = []
    for _ in range(2):
        job = await claim_one(conn, fn, "w")
        got.append(job)
        if complete_each:
            assert await conn.fetchval("select complete_job($1, 'w', '{}')", job)
    assert b_job in got


@pytest.mark.parametrize("fn", ["v3", "claim_jobs"])
async def test_a_new_user_is_served_within_two_claims_on_a_fresh_queue(
    conn: asyncpg.Connection, fn: str
) -> None:
    """No state yet for either user: A's older backlog gets one claim, then B."""
    a, b = await create_user(conn), await create_user(conn)
    await user_jobs(conn, a, 2000)
    [b_job] = await user_jobs(conn, b, 1)
    got = [await claim_one(conn, fn, "w") for _ in range(2)]
    assert b_job in got


@pytest.mark.parametrize("fn", ["v3", "claim_jobs"])
async def test_five_users_with_different_backlogs_interleave(
    conn: asyncpg.Connection, fn: str
) -> None:
    """Completing each job at once (nothing ever stays processing), the claims still rotate:
    every window of 5 claims serves 5 different users while all 5 have work."""
    await set_caps(conn, processing=1000)
    users = [await create_user(conn) for _ in range(5)]
    backlogs = [200, 50, 20, 10, 5]
    for u, n in zip(users, backlogs, strict=True):
        await user_jobs(conn, u, n)
    sequence = []
    for _ in range(25):  # while every user still has work
        job = await claim_one(conn, fn, "w")
        sequence.append(await owner(conn, job))
        assert await conn.fetchval("select complete_job($1, 'w', '{}')", job)
    for start in range(0, 25, 5):
        assert len(set(sequence[start : start + 5])) == 5, sequence
    # Then the users with work left go on rotating, the smallest backlog drops out first.
    rest = []
    for _ in range(20):
        job = await claim_one(conn, fn, "w")
        rest.append(await owner(conn, job))
        await conn.fetchval("select complete_job($1, 'w', '{}')", job)
    assert Counter(rest) == {u: 5 for u in users[:4]}


async def test_a_batch_deals_round_robin_across_users(conn: asyncpg.Connection) -> None:
    await set_caps(conn, processing=1000)
    users = [await create_user(conn) for _ in range(5)]
    for u, n in zip(users, [300, 40, 12, 3, 1], strict=True):
        await user_jobs(conn, u, n)
    rows = await claim_batch(conn, "w", 13)
    counts = Counter(str(r["user_id"]) for r in rows)
    assert counts == {users[0]: 3, users[1]: 3, users[2]: 3, users[3]: 3, users[4]: 1}
    # Within one user the order is kept: its oldest jobs first.
    mine = [r["job_payload"] for r in rows if str(r["user_id"]) == users[0]]
    assert sorted(json.loads(p)["n"] for p in mine) == [1, 2, 3]


async def test_jobs_without_a_user_are_one_group_among_users(conn: asyncpg.Connection) -> None:
    await set_caps(conn, processing=1000)
    a = await create_user(conn)
    await insert_jobs(conn, 500)  # no user
    await user_jobs(conn, a, 500)
    rows = await claim_batch(conn, "w", 10)
    counts = Counter(None if r["user_id"] is None else str(r["user_id"]) for r in rows)
    assert counts == {None: 5, a: 5}


async def test_a_lone_user_gets_every_free_slot_up_to_its_cap(conn: asyncpg.Connection) -> None:
    await set_caps(conn, processing=40)
    a = await create_user(conn)
    await user_jobs(conn, a, 100)
    assert len(await claim_batch(conn, "w", 25)) == 25
    assert len(await claim_batch(conn, "w", 25)) == 15  # the cap: 40 processing
    assert await claim_batch(conn, "w", 25) == []
    # Jobs without a user are never capped.
    await insert_jobs(conn, 60)
    assert len(await claim_batch(conn, "w", 100)) == 60


async def test_priority_wins_across_users_and_fairness_applies_within_it(
    conn: asyncpg.Connection,
) -> None:
    await set_caps(conn, processing=1000)
    a, b = await create_user(conn), await create_user(conn)
    low_a = await user_jobs(conn, a, 3, priority=0)
    high_b = await user_jobs(conn, b, 3, priority=5)
    rows = await claim_batch(conn, "w", 4)
    assert {str(r["id"]) for r in rows} == {*high_b, low_a[0]}


async def test_rescue_keeps_its_place_and_ignores_the_cap(conn: asyncpg.Connection) -> None:
    await set_caps(conn, processing=1)
    a = await create_user(conn)
    [stale] = await user_jobs(conn, a, 1)
    await conn.execute("update job_queue set lease_timeout_s = 1 where id = $1", stale)
    assert await claim_one(conn, "v3", "dead") == stale
    others = await user_jobs(conn, a, 2)
    await asyncio.sleep(1.2)
    # A is at its cap (the stale job still counts): only the rescue is handed out.
    rows = await claim_batch(conn, "w", 5)
    assert [str(r["id"]) for r in rows] == [stale]
    assert rows[0]["retry_count"] == 1 and rows[0]["worker_id"] == "w"
    assert await claim_batch(conn, "w", 5) == []
    assert await conn.fetchval("select complete_job($1, 'w', '{}')", stale)
    assert [str(r["id"]) for r in await claim_batch(conn, "w", 5)] == others[:1]


async def test_cap_is_per_lane_and_read_from_job_lanes(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "insert into job_lanes (lane, max_processing_per_user, max_active_per_user)"
        " values ('chapters', 2, 1000)"
    )
    await conn.execute("update job_lanes set max_processing_per_user = 1 where lane = 'default'")
    a = await create_user(conn)
    await user_jobs(conn, a, 10, lane="chapters")
    await user_jobs(conn, a, 10, lane="default")
    rows = await claim_batch(conn, "w", 20)
    assert Counter(r["job_lane"] for r in rows) == {"chapters": 2, "default": 1}
    await conn.execute("update job_lanes set max_processing_per_user = 4 where lane = 'chapters'")
    assert Counter(r["job_lane"] for r in await claim_batch(conn, "w", 20)) == {"chapters": 2}


async def test_cap_holds_under_8_concurrent_claimers(db_dsn: str, conn: asyncpg.Connection) -> None:
    """8 claimers, 4 users (3 capped at 3, jobs without a user uncapped): after every claim
    the claimer checks, in its own transaction, that no user has more than 3 processing."""
    await set_caps(conn, processing=3)
    users = [await create_user(conn) for _ in range(3)]
    for u in users:
        await user_jobs(conn, u, 60)
    await insert_jobs(conn, 60)
    total = 240
    seen: list[str] = []
    violations: list[tuple[str, int]] = []
    max_seen: Counter[str] = Counter()

    async def claimer(n: int) -> None:
        c = await asyncpg.connect(db_dsn)
        try:
            idle = 0
            while len(seen) < total and idle < 200:
                rows = await claim_batch(c, f"w-{n}", 1 + n % 4)
                counts = await c.fetch(
                    "select user_id::text as u, count(*) as n from job_queue"
                    " where status = 'processing' and user_id is not null group by user_id"
                )
                for r in counts:
                    max_seen[r["u"]] = max(max_seen[r["u"]], r["n"])
                    if r["n"] > 3:
                        violations.append((r["u"], r["n"]))
                if not rows:
                    idle += 1
                    await asyncio.sleep(0.01)
                    continue
                idle = 0
                seen.extend(str(r["id"]) for r in rows)
                await asyncio.sleep(0.002 * (n % 3))  # hold the jobs a little
                for r in rows:
                    assert await c.fetchval("select complete_job($1, $2, '{}')", r["id"], f"w-{n}")
        finally:
            await c.close()

    await asyncio.gather(*(claimer(n) for n in range(8)))
    assert violations == []
    assert len(seen) == total and len(set(seen)) == total
    assert all(max_seen[u] >= 1 for u in users)  # the check really saw processing jobs


async def test_batch_claim_exactly_once_under_concurrency(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    """2,000 jobs of 6 groups, 16 claimers taking batches of 1..25: every job exactly once."""
    await set_caps(conn, processing=100000)
    users = [await create_user(conn) for _ in range(5)]
    ids = await insert_jobs(conn, 500)
    for u in users:
        ids += await user_jobs(conn, u, 300)
    seen: list[str] = []

    async def claimer(n: int) -> None:
        c = await asyncpg.connect(db_dsn)
        try:
            while rows := await claim_batch(c, f"w-{n}", 1 + (n * 7) % 25):
                seen.extend(str(r["id"]) for r in rows)
                done = await c.fetch(
                    "select * from complete_jobs($1, $2::jsonb)",
                    f"w-{n}",
                    json.dumps([{"job_id": str(r["id"]), "result": {"n": n}} for r in rows]),
                )
                assert len(done) == len(rows)
        finally:
            await c.close()

    await asyncio.gather(*(claimer(n) for n in range(16)))
    assert len(seen) == len(ids)
    assert sorted(seen) == sorted(ids)
    assert await conn.fetchval("select count(*) from job_queue where status <> 'completed'") == 0
    # The audit trail: exactly one pending->processing and one processing->completed per job.
    events = await conn.fetch(
        "select from_status, to_status, count(*) as n from job_events"
        " where from_status is not null group by 1, 2"
    )
    assert {(e["from_status"], e["to_status"]): e["n"] for e in events} == {
        ("pending", "processing"): len(ids),
        ("processing", "completed"): len(ids),
    }


# -- the batch claim's contract ---------------------------------------------------------------


async def test_claim_jobs_returns_full_rows_and_sets_ownership(conn: asyncpg.Connection) -> None:
    ids = await insert_jobs(conn, 3, job_type="t")
    rows = await claim_batch(conn, "w-1", 2)
    assert [str(r["id"]) for r in rows] == ids[:2]
    for r in rows:
        assert r["status"] == "processing" and r["worker_id"] == "w-1"
        assert r["heartbeat_at"] is not None and r["started_at"] is not None
        assert r["job_type"] == "t" and r["lease_timeout_s"] == 60
    cols = await conn.fetch(
        "select column_name from information_schema.columns where table_name = 'job_queue'"
    )
    assert set(rows[0].keys()) == {c["column_name"] for c in cols}


async def test_claim_jobs_filters_and_schedule(conn: asyncpg.Connection) -> None:
    await insert_jobs(conn, 2, job_type="a", lane="fast")
    await insert_jobs(conn, 2, job_type="b", lane="slow")
    await insert_jobs(conn, 2, job_type="a", delay_s=60)
    assert await claim_batch(conn, "w", 10, ["c"]) == []
    assert await claim_batch(conn, "w", 10, None, ["other"]) == []
    assert {r["job_type"] for r in await claim_batch(conn, "w", 10, ["b"])} == {"b"}
    rows = await claim_batch(conn, "w", 10, [], ["fast"])
    assert len(rows) == 2 and {r["job_lane"] for r in rows} == {"fast"}
    assert await claim_batch(conn, "w", 10) == []  # the delayed ones are not due


@pytest.mark.parametrize("bad", [0, -1, 1001, None])
async def test_claim_jobs_rejects_a_bad_limit(conn: asyncpg.Connection, bad) -> None:
    with pytest.raises(asyncpg.PostgresError) as err:
        await claim_batch(conn, "w", bad)
    assert err.value.sqlstate == "PT400"


@pytest.mark.parametrize("worker", ["", None])
async def test_claim_jobs_requires_a_worker_id(conn: asyncpg.Connection, worker) -> None:
    with pytest.raises(asyncpg.PostgresError) as err:
        await claim_batch(conn, worker, 1)
    assert err.value.sqlstate == "PT400"


async def test_claims_record_when_each_group_was_served(conn: asyncpg.Connection) -> None:
    a = await create_user(conn)
    await user_jobs(conn, a, 2)
    await insert_jobs(conn, 3)
    await claim_batch(conn, "w", 5)
    state = {
        (str(r["user_key"]), r["job_lane"]): r["claims"]
        for r in await conn.fetch("select * from job_queue_user_state")
    }
    assert state == {(a, "default"): 2, (NIL, "default"): 3}


async def test_user_load_reports_the_busiest_users(conn: asyncpg.Connection) -> None:
    await set_caps(conn, processing=1000)
    a, b = await create_user(conn), await create_user(conn)
    await user_jobs(conn, a, 5)
    await user_jobs(conn, b, 2)
    await claim_batch(conn, "w", 4)
    rows = await conn.fetch("select * from user_load(10)")
    got = {str(r["user_id"]): (r["processing"], r["pending"]) for r in rows}
    assert got == {a: (2, 3), b: (2, 0)}
    assert len(await conn.fetch("select * from user_load(1)")) == 1


# -- batched completion ---------------------------------------------------------------------


async def test_complete_jobs_is_fenced_and_idempotent(conn: asyncpg.Connection) -> None:
    ids = await insert_jobs(conn, 3)
    await claim_batch(conn, "w-1", 3)
    await conn.execute("update job_queue set status = 'cancelled' where id = $1", ids[2])
    payload = json.dumps([{"job_id": i, "result": {"i": k}} for k, i in enumerate(ids)])
    assert await conn.fetch("select * from complete_jobs('w-2', $1::jsonb)", payload) == []
    done = await conn.fetch("select * from complete_jobs('w-1', $1::jsonb)", payload)
    assert sorted(str(r[0]) for r in done) == sorted(ids[:2])
    again = await conn.fetch("select * from complete_jobs('w-1', $1::jsonb)", payload)
    assert sorted(str(r[0]) for r in again) == sorted(ids[:2])
    rows = {
        str(r["id"]): r
        for r in await conn.fetch("select * from job_queue where id = any($1::uuid[])", ids)
    }
    assert json.loads(rows[ids[1]]["job_result"]) == {"i": 1}
    assert rows[ids[0]]["status"] == "completed" and rows[ids[0]]["progress"] == 100
    assert rows[ids[2]]["status"] == "cancelled"
    # One completion event per job, not one per call.
    n = await conn.fetchval(
        "select count(*) from job_events"
        " where to_status = 'completed' and job_id = any($1::uuid[])",
        ids,
    )
    assert n == 2


@pytest.mark.parametrize(
    "bad",
    [
        "{}",
        "null",
        '"x"',
        "[1]",
        '[{"result": {}}]',
        '[{"job_id": 5}]',
        '[{"job_id": "not-a-uuid"}]',
        '[{"job_id": "00000000-0000-0000-0000-00000000000\u00e9"}]',
    ],
)
async def test_complete_jobs_rejects_bad_input_clearly(conn: asyncpg.Connection, bad) -> None:
    with pytest.raises(asyncpg.PostgresError) as err:
        await conn.fetch("select * from complete_jobs('w', $1::jsonb)", bad)
    assert err.value.sqlstate == "PT400"
    assert "complete_jobs" in str(err.value)


async def test_complete_jobs_rejects_duplicates_and_huge_batches(conn: asyncpg.Connection) -> None:
    [jid] = await insert_jobs(conn, 1)
    dup = json.dumps([{"job_id": jid}, {"job_id": jid}])
    with pytest.raises(asyncpg.PostgresError, match="twice"):
        await conn.fetch("select * from complete_jobs('w', $1::jsonb)", dup)
    huge = json.dumps([{"job_id": NIL}] * 1001)
    with pytest.raises(asyncpg.PostgresError, match="at most 1000"):
        await conn.fetch("select * from complete_jobs('w', $1::jsonb)", huge)


# -- the audit trail, per statement -------------------------------------------------------------


async def test_audit_rows_are_the_same_as_before(conn: asyncpg.Connection) -> None:
    ids = await insert_jobs(conn, 2)
    await claim_batch(conn, "w-1", 2)
    await conn.execute("update job_queue set heartbeat_at = now()")  # no event
    await conn.fetch(
        "select * from complete_jobs('w-1', $1::jsonb)", json.dumps([{"job_id": ids[0]}])
    )
    events = await conn.fetch(
        "select job_id::text, from_status, to_status, worker_id, details from job_events"
        " where job_id = $1 order by id",
        ids[0],
    )
    assert [(e["from_status"], e["to_status"], e["worker_id"]) for e in events] == [
        (None, "pending", None),
        ("pending", "processing", "w-1"),
        ("processing", "completed", "w-1"),
    ]
    assert json.loads(events[0]["details"]) == {"job_type": "noop", "lane": "default"}
    assert json.loads(events[1]["details"]) == {"retry_count": 0}


async def test_one_notification_per_job_type_per_statement(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    listener = await asyncpg.connect(db_dsn)
    got: asyncio.Queue[str] = asyncio.Queue()
    await listener.add_listener("genworker_jobs", lambda *a: got.put_nowait(a[3]))
    try:
        await insert_jobs(conn, 50, job_type="wake")
        await insert_jobs(conn, 1, job_type="other")
        assert await asyncio.wait_for(got.get(), 5) == "wake"
        assert await asyncio.wait_for(got.get(), 5) == "other"
        await asyncio.sleep(0.2)
        assert got.empty()
    finally:
        await listener.close()


async def test_only_the_claims_own_transaction_skips_the_commit_flush(
    conn: asyncpg.Connection,
) -> None:
    """claim_jobs commits without waiting for its WAL flush (README: why that is safe); the
    setting is local to its transaction, and completions stay durable."""
    await conn.execute("set synchronous_commit = on")
    ids = await insert_jobs(conn, 1)
    async with conn.transaction():
        await claim_batch(conn, "w", 1)
        assert await conn.fetchval("show synchronous_commit") == "off"
    assert await conn.fetchval("show synchronous_commit") == "on"
    async with conn.transaction():
        await conn.fetch(
            "select * from complete_jobs('w', $1::jsonb)", json.dumps([{"job_id": ids[0]}])
        )
        assert await conn.fetchval("show synchronous_commit") == "on"
