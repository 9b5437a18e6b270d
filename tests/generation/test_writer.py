"""ChapterWriter's cadence against the real store: one append per flush interval at most,
section checkpoints that ride with the next write, rewinds that keep earlier text."""

from __future__ import annotations

import json

import asyncpg
import pytest

from tests.runtime.conftest import wait_until
from tests.support.seed import claimed_chapter
from worker.errors import LeaseLost
from worker.generation.writer import ChapterWriter
from worker.store import Store


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def job(conn: asyncpg.Connection) -> dict[str, str]:
    ids = await claimed_chapter(conn)
    await conn.fetchval("select start_chapter_generation($1, 'w')", ids["job"])
    return ids


async def chunks(conn: asyncpg.Connection, chapter: str) -> list[tuple[int, str]]:
    rows = await conn.fetch(
        "select seq, text from chapter_chunks where chapter_id = $1 order by seq", chapter
    )
    return [(r["seq"], r["text"]) for r in rows]


async def state(conn: asyncpg.Connection, chapter: str) -> dict:
    raw = await conn.fetchval("select generation_state from chapters where id = $1", chapter)
    return json.loads(raw)


def writer(store: Store, job: dict[str, str], clock: Clock, interval: float = 1.0):
    return ChapterWriter(
        store, job["job"], "w", offset=0, flush_interval_s=interval, flush_chars=1000, clock=clock
    )


async def test_a_section_end_inside_the_interval_rides_with_the_next_write(
    conn, store, job
) -> None:
    clock = Clock()
    w = writer(store, job, clock, interval=3600)  # the timer never fires in this test
    await w.add("One. ", 20, "section 1/2: a")
    await w.checkpoint(
        {"sections_done": 1, "content_length": w.offset}, progress=50, step="s1 done", final=False
    )
    assert await chunks(conn, job["chapter"]) == []  # nothing written yet
    clock.now = 3600.0
    await w.add("Two", 60, "section 2/2: b")  # the interval passed: one write, both sections
    assert await chunks(conn, job["chapter"]) == [(0, "One. Two")]
    assert await state(conn, job["chapter"]) == {"sections_done": 1, "content_length": 5}
    await w.checkpoint(
        {"sections_done": 2, "content_length": w.offset}, progress=95, step="done", final=True
    )
    assert await state(conn, job["chapter"]) == {"sections_done": 2, "content_length": 8}
    await w.close()
    assert w.writes == 2


async def test_the_timer_writes_a_pending_checkpoint_when_the_model_is_slow(
    conn, store, job
) -> None:
    w = writer(store, job, Clock(), interval=0.05)  # elapsed stays 0: the timer waits 0.05 s
    await w.add("One. ", 20, "section 1/2: a")
    await w.checkpoint(
        {"sections_done": 1, "content_length": 5}, progress=50, step="x", final=False
    )
    await wait_until(lambda: chunks(conn, job["chapter"]), timeout=60)
    assert await chunks(conn, job["chapter"]) == [(0, "One. ")]
    assert (await state(conn, job["chapter"]))["sections_done"] == 1
    await w.close()


async def test_a_rewind_keeps_the_buffered_text_before_it(conn, store, job) -> None:
    clock = Clock()
    w = writer(store, job, clock, interval=3600)
    await w.add("Section one. ", 20, "section 1/2: a")
    await w.checkpoint(
        {"sections_done": 1, "content_length": 13}, progress=50, step="x", final=False
    )
    await w.add("Broken sec", 60, "section 2/2: b")
    await w.rewind(13)  # the second section failed before anything was written
    assert w.offset == 13
    await w.add("Good.", 60, "section 2/2: b")
    await w.checkpoint(
        {"sections_done": 2, "content_length": 18}, progress=95, step="y", final=True
    )
    assert await chunks(conn, job["chapter"]) == [(0, "Section one. Good.")]
    await w.close()


async def test_close_saves_a_pending_checkpoint_with_its_text_only(conn, store, job) -> None:
    w = writer(store, job, Clock(), interval=3600)
    await w.add("Done part. ", 20, "section 1/2: a")
    await w.checkpoint(
        {"sections_done": 1, "content_length": 11}, progress=50, step="x", final=False
    )
    await w.add("half of the next", 60, "section 2/2: b")
    await w.close()  # the job is failing: the finished section must survive
    assert await chunks(conn, job["chapter"]) == [(0, "Done part. ")]
    assert (await state(conn, job["chapter"]))["sections_done"] == 1


async def test_a_timer_write_refused_reaches_the_handler(conn, store, job) -> None:
    w = writer(store, job, Clock(), interval=0.05)
    await w.add("One. ", 20, "section 1/2: a")
    await conn.execute("update job_queue set worker_id = 'thief' where id = $1", job["job"])
    await w.checkpoint(
        {"sections_done": 1, "content_length": 5}, progress=50, step="x", final=False
    )
    await wait_until(lambda: w._timer is not None and w._timer.done(), timeout=60)
    with pytest.raises(LeaseLost):
        await w.add("more", 60, "section 2/2: b")
    await w.close()
    assert await chunks(conn, job["chapter"]) == []
