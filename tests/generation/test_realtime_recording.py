"""Records the Broadcast messages a real chapter run produces, for the JavaScript client's tests.

The real Runner, ChapterHandler and Store (PostgreSQL transport) write a chapter through the SQL
functions; every row realtime.send put in realtime.messages for the chapter's topic is
written to clients/js/fixtures/<name>.json with the final chapters.content. The run is
deterministic (offline model, flushes by size only), so re-recording rewrites the same
bytes. `node --test clients/js/` replays them (and adds duplicates and gaps).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from types import TracebackType
from typing import Any

import asyncpg

from tests.runtime.conftest import running, wait_until
from tests.support.seed import chapter_job
from worker.generation.chapter import ChapterHandler, GenerationConfig
from worker.generation.model import Outline, Usage
from worker.generation.offline import OfflineModel
from worker.handlers import build_handlers
from worker.store import Store
from worker.store.postgres import PostgresTransport

FIXTURES = Path(__file__).resolve().parents[2] / "clients" / "js" / "fixtures"
FIXED_CHAPTER = "00000000-0000-4000-8000-00000000c0de"
OPTIONS = {"sections": 3, "target_words": 200}
# Size-only flushes (the interval never elapses): the same deltas on every run.
CONFIG = GenerationConfig(
    default_model="offline",
    allowed_models=["offline"],
    flush_interval_s=3600,
    flush_chars=90,
    retry_pause_s=0.01,
)


class UnicodeModel:
    """The offline model with non-ASCII text (accents, an astral emoji) in its stream, so
    offsets are exercised as characters, not bytes or UTF-16 units. With ``hang_in``, the
    stream of that section (1-based call count) stops for good after ``hang_after`` chunks,
    as a worker that dies mid-section."""

    name = "offline"

    def __init__(self, *, hang_in: int | None = None, hang_after: int = 0) -> None:
        self.inner = OfflineModel(chunk_delay_s=0, words_per_section=45)
        self.hang_in = hang_in
        self.hang_after = hang_after
        self.hanging = asyncio.Event()
        self.calls = 0

    async def outline(self, *, model: str, system: str, prompt: str) -> tuple[Outline, Usage]:
        return await self.inner.outline(model=model, system=system, prompt=prompt)

    def stream_section(self, *, model: str, system: str, prompt: str, max_output_tokens: int):  # type: ignore[no-untyped-def]
        self.calls += 1
        inner = self.inner.stream_section(
            model=model, system=system, prompt=prompt, max_output_tokens=max_output_tokens
        )
        hang = self.hang_after if self.calls == self.hang_in else None
        return _Stream(inner, hang, self.hanging)

    def open(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


class _Stream:
    def __init__(self, inner: Any, hang_after: int | None, hanging: asyncio.Event) -> None:
        self.inner = inner
        self.hang_after = hang_after
        self.hanging = hanging
        self.sent = 0

    @property
    def usage(self) -> Usage:
        return self.inner.usage

    @property
    def finish_reason(self) -> str | None:
        return self.inner.finish_reason

    async def __aenter__(self) -> _Stream:
        return self

    async def __aexit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> str:
        if self.hang_after is not None and self.sent >= self.hang_after:
            self.hanging.set()
            await asyncio.Event().wait()  # never returns: the worker is "killed" here
        chunk = await self.inner.__anext__()
        self.sent += 1
        return chunk.replace("the ", "thé ").replace("sea", "sea 🌊").replace("door", "dœr")


async def recorded(conn: asyncpg.Connection, chapter: str) -> dict[str, Any]:
    """The chapter's realtime.messages rows in insertion order, ids made stable."""
    rows = await conn.fetch(
        "select topic, extension, event, private, payload from realtime.messages"
        " where topic = $1 order by inserted_at, ctid",
        f"chapter:{chapter}",
    )
    messages = []
    for i, r in enumerate(rows, 1):
        payload = json.loads(r["payload"])
        assert "id" in payload  # realtime.send adds one; clients ignore it
        payload["id"] = f"00000000-0000-4000-8000-{i:012d}"
        messages.append(
            {
                "topic": f"chapter:{FIXED_CHAPTER}",
                "extension": r["extension"],
                "event": r["event"],
                "private": r["private"],
                "payload": payload,
            }
        )
    final = await conn.fetchrow("select content, status from chapters where id = $1", chapter)
    return {
        "chapter_id": FIXED_CHAPTER,
        "messages": messages,
        "final": {"status": final["status"], "content": final["content"]},
    }


def write_fixture(name: str, data: dict[str, Any]) -> None:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    text = json.dumps(data, ensure_ascii=False, indent=1) + "\n"
    (FIXTURES / f"{name}.json").write_text(text, encoding="utf-8")


async def test_record_a_plain_run(conn: asyncpg.Connection, db_dsn: str) -> None:
    _, chapter, job = await chapter_job(conn, options=OPTIONS)
    store = await Store(PostgresTransport(db_dsn)).open()
    try:
        async with running(store, build_handlers(ChapterHandler(UnicodeModel(), CONFIG))):
            await wait_until(
                lambda: conn.fetchval(
                    "select status = 'completed' from job_queue where id = $1", job
                )
            )
    finally:
        await store.close()
    data = await recorded(conn, chapter)
    events = [m["event"] for m in data["messages"]]
    assert events[0] == "status" and events[-1] == "status" and "rewind" not in events
    assert events.count("delta") >= 6
    assert "🌊" in data["final"]["content"] and data["final"]["status"] == "completed"
    write_fixture("plain", data)


async def test_record_a_rescue_with_a_rewind(conn: asyncpg.Connection, db_dsn: str) -> None:
    _, chapter, job = await chapter_job(conn, options=OPTIONS)
    store = await Store(PostgresTransport(db_dsn)).open()
    doomed_model = UnicodeModel(hang_in=2, hang_after=7)
    try:
        handlers = build_handlers(ChapterHandler(doomed_model, CONFIG))
        async with running(store, handlers, worker_id="doomed") as doomed:
            await asyncio.wait_for(doomed_model.hanging.wait(), 20)
            # "kill -9": the task dies without a word to the database.
            for entry in doomed.in_flight.values():
                entry.stop_reason = "killed"
                entry.task.cancel()
            await wait_until(lambda: not doomed.in_flight)
        partial = await conn.fetchval(
            "select genworker_chunks_length(id) - (generation_state->>'content_length')::int"
            " from chapters where id = $1",
            chapter,
        )
        assert partial > 0  # part of section 2 reached readers before the kill
        await conn.execute(
            "update job_queue set heartbeat_at = now() - interval '1 hour' where id = $1", job
        )
        handlers = build_handlers(ChapterHandler(UnicodeModel(), CONFIG))
        async with running(store, handlers, worker_id="rescuer"):
            await wait_until(
                lambda: conn.fetchval(
                    "select status = 'completed' from job_queue where id = $1", job
                )
            )
    finally:
        await store.close()
    assert await conn.fetchval("select retry_count from job_queue where id = $1", job) == 1
    data = await recorded(conn, chapter)
    rewinds = [m for m in data["messages"] if m["event"] == "rewind"]
    assert len(rewinds) == 1
    assert data["final"]["status"] == "completed"
    write_fixture("rescue", data)
