"""The dashboard's store operations: same answers over asyncpg and over REST."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest

from tests.store._helpers import chapter_job, insert_job
from worker.store import Store
from worker.store.base import InvalidInputError


async def test_overview_and_live(store: Store, conn) -> None:
    cj = await chapter_job(conn)
    await insert_job(conn, lane="bulk")
    assert (await store.claim("w-1", ["chapter_generation"], None)).job_id == cj.job
    await store.start_chapter(cj.job, "w-1", 100)
    assert await store.append_chapter(
        cj.job, "w-1", offset=0, text="It began.", progress=30, current_step="section 1/3"
    )
    overview = await store.dashboard_overview()
    assert overview["by_status"] == {"pending": 1, "processing": 1}
    assert {"job_lane": "bulk", "status": "pending", "count": 1} in overview["by_lane"]
    assert [(w["worker_id"], w["in_flight"]) for w in overview["workers"]] == [("w-1", 1)]
    live = await store.dashboard_live()
    [row] = live["jobs"]
    assert (row["job_id"], row["chapter_id"], row["progress"]) == (cj.job, cj.chapter, 30)
    assert row["current_step"] == "section 1/3" and row["text_bytes"] == len("It began.")


async def test_jobs_page_filters(store: Store, conn) -> None:
    cj = await chapter_job(conn)
    other = await insert_job(conn)
    page = await store.dashboard_jobs(limit=1)
    assert len(page["jobs"]) == 1 and page["has_more"] is True
    mine = await store.dashboard_jobs(user_id=cj.user, status="pending")
    assert [j["id"] for j in mine["jobs"]] == [cj.job] and mine["has_more"] is False
    later = datetime.now(UTC) + timedelta(hours=1)
    assert (await store.dashboard_jobs(created_from=later))["jobs"] == []
    assert {j["id"] for j in (await store.dashboard_jobs(created_to=later))["jobs"]} == {
        cj.job,
        other,
    }
    with pytest.raises(InvalidInputError):
        await store.dashboard_jobs(status="nonsense")


async def test_job_detail(store: Store, conn) -> None:
    cj = await chapter_job(conn)
    detail = await store.dashboard_job(cj.job)
    assert detail is not None
    assert detail["job"]["id"] == cj.job and detail["chapter"]["id"] == cj.chapter
    assert [e["to_status"] for e in detail["events"]] == ["pending"]
    assert await store.dashboard_job(str(uuid.uuid4())) is None
