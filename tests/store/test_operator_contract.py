"""Store contract for the operator commands (`genworker cancel|pause|resume|show`): the same
behaviour over PostgresStore and SupabaseStore (the ``store`` fixture runs both)."""

from __future__ import annotations

import pytest

from tests.store._helpers import chapter_job, insert_job
from worker.store.base import NotFoundError
from worker.store.sqlapi import SqlFunctionStore


async def test_control_job_pause_resume_cancel(store: SqlFunctionStore, conn) -> None:
    job = await insert_job(conn)
    assert await store.control_job(job, "resume") is False
    assert await store.control_job(job, "pause") is True
    assert (await store.get_job(job)).status == "paused"  # type: ignore[union-attr]
    assert await store.control_job(job, "resume") is True
    assert await store.control_job(job, "cancel") is True
    assert await store.control_job(job, "cancel") is False
    assert (await store.get_job(job)).status == "cancelled"  # type: ignore[union-attr]


async def test_control_job_unknown_job(store: SqlFunctionStore) -> None:
    with pytest.raises(NotFoundError):
        await store.control_job("00000000-0000-4000-8000-000000000000", "cancel")


async def test_control_job_rejects_other_actions(store: SqlFunctionStore) -> None:
    with pytest.raises(ValueError):
        await store.control_job("00000000-0000-4000-8000-000000000000", "delete")


async def test_read_chapter(store: SqlFunctionStore, conn) -> None:
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
