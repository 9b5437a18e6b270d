"""Realtime cost of streaming one chapter: Broadcast deltas vs Postgres Changes, and WAL.

    .venv/bin/python bench/realtime_deltas.py                  # chapters of 5, 20 and 60 KB
    .venv/bin/python bench/realtime_deltas.py --sizes 5,20     # a shorter run
    .venv/bin/python bench/realtime_deltas.py --flush-ms 250   # another FLUSH_INTERVAL_MS

Each chapter is streamed on its own (one after the other, so the WAL of each is its own)
through the production worker: the real Runner, ChapterHandler with the default
FLUSH_INTERVAL_MS=1000 and FLUSH_CHARS=2000, the Store over PostgresTransport, and the
offline model paced at --chars-per-second (default 640, the pace
bench/chapter_stream.py's fake Gemini streams at, about 160 tokens/s). Five sections per
chapter. Per chapter it prints:

* messages: rows realtime.send inserted into realtime.messages for topic chapter:<id>,
  their rate over the chapter's run (claim to completion), and the most in any one second.
* Broadcast bytes per subscriber / text: the UTF-8 size of the WebSocket frame Realtime
  sends each subscriber for each of those rows ({"event":"broadcast","payload":{"event",
  "payload","type"},"ref","topic":"realtime:chapter:<id>"} with the row's payload,
  including the id realtime.send adds), summed, over the UTF-8 size of chapters.content.
* postgres_changes bytes of chapters / text: the changes logical decoding (test_decoding)
  produces for the chapters row during the run, each rebuilt as the postgres_changes
  frame Realtime sends a subscriber (columns with types, record, old_record with the
  primary key, commit timestamp); a TOASTed value the UPDATE did not change is absent,
  as it is for Realtime. Without test_decoding (the embedded server has none; Debian's
  PostgreSQL 15 has it and is used when present) a trigger sums the same frame built
  from each UPDATE's new row, leaving out content when unchanged and over 2 KB.
* the opt-in: the same for chapter_chunks INSERTs, i.e. what a subscriber following the
  text through Postgres Changes on the delta table would receive.
* WAL / text: pg_current_wal_lsn() difference over the chapter's run (everything the
  database wrote: chunks, realtime.messages, chapters, job_queue, heartbeats, indexes),
  over the text. The throwaway cluster runs with full_page_writes off.

Targets (exit 1 when one fails): Broadcast <= 1.5 x text at 20 and 60 KB;
postgres_changes on chapters <= 2 x text at 20 and 60 KB; WAL <= 4 x text at 60 KB;
at the default flush, at most one delta message per second per chapter: consecutive
deltas at least one second apart (the chapter's last one, written at once so the chapter
can finish, left out); the status messages of each chapter are counted and
printed separately.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import measure
from measure import log_problems, logs_to_file, running, say, throwaway_database

PG15 = Path("/usr/lib/postgresql/15/bin")
SECTIONS = 5
CHARS_PER_WORD = 6.1  # the offline model's English-like text, measured
SLOT = "bench_realtime"
TIMESTAMP = "2026-12-01T00:00:00.000000Z"  # fixed width stand-in for commit_timestamp
FALLBACK_LOG = """
create table bench_changes (chapter_id uuid, tbl text, frame_bytes bigint);
create function bench_log_change() returns trigger language plpgsql as $$
declare
  rec jsonb := to_jsonb(new);
begin
  if tg_table_name = 'chapters' and tg_op = 'UPDATE' and new.content = old.content
     and octet_length(new.content) > 2000 then
    rec := rec - 'content';
  end if;
  insert into bench_changes values (
    case when tg_table_name = 'chapters' then new.id else new.chapter_id end, tg_table_name,
    octet_length(rec::text) + %(overhead)s);
  return null;
end $$;
create trigger bench_log_change after update on chapters
  for each row execute function bench_log_change();
create trigger bench_log_change after insert on chapter_chunks
  for each row execute function bench_log_change();
"""


class PacedSizedModel:
    """The offline model, with each chapter's section length chosen by its story title
    ("Bench <KB> KB") and chunks paced to a characters-per-second rate."""

    name = "offline"

    def __init__(self, chars_per_second: float) -> None:
        from worker.generation.offline import OfflineModel

        self._offline = OfflineModel
        self.delay = 30 / chars_per_second  # chunks of 20-40 characters
        self.models: dict[int, Any] = {}

    def _model(self, prompt: str) -> Any:
        kb = int(re.search(r"Bench (\d+) KB", prompt).group(1))  # type: ignore[union-attr]
        if kb not in self.models:
            words = int(kb * 1024 / CHARS_PER_WORD / SECTIONS)
            self.models[kb] = self._offline(
                chunk_delay_s=self.delay, words_per_section=words, max_words_per_section=words
            )
        return self.models[kb]

    async def outline(self, *, model: str, system: str, prompt: str) -> Any:
        return await self._model(prompt).outline(model=model, system=system, prompt=prompt)

    def stream_section(self, *, model: str, system: str, prompt: str, max_output_tokens: int):  # type: ignore[no-untyped-def]
        return self._model(prompt).stream_section(
            model=model, system=system, prompt=prompt, max_output_tokens=max_output_tokens
        )

    def open(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


# == postgres_changes frames from test_decoding ============================================

_COLUMN = re.compile(r"(\w+)\[([^\]]+)\]:('(?:[^']|'')*'|\S+)", re.DOTALL)
_HEAD = re.compile(r"^table public\.(\w+): (INSERT|UPDATE|DELETE): ")


def _value(kind: str, raw: str) -> Any:
    if raw == "null":
        return None
    if raw.startswith("'"):
        raw = raw[1:-1].replace("''", "'")
    if kind in ("integer", "bigint", "smallint"):
        return int(raw)
    if kind == "boolean":
        return raw == "true"
    if kind == "jsonb":
        return json.loads(raw)
    return raw


def changes_frame(table: str, op: str, body: str, topic: str) -> tuple[str | None, int]:
    """(row id, bytes of the postgres_changes frame) for one test_decoding line."""
    columns, record = [], {}
    for name, kind, raw in _COLUMN.findall(body):
        columns.append(
            {"name": name, "type": kind.replace("timestamp with time zone", "timestamptz")}
        )
        if raw != "unchanged-toast-datum":
            record[name] = _value(kind, raw)
    key = "id" if table == "chapters" else "chapter_id"
    old = {"id": record.get("id")} if table == "chapters" and op == "UPDATE" else {}
    frame = {
        "event": "postgres_changes",
        "payload": {
            "data": {
                "columns": columns,
                "commit_timestamp": TIMESTAMP,
                "errors": None,
                "old_record": old,
                "record": record,
                "schema": "public",
                "table": table,
                "type": op,
            },
            "ids": [12345678],
        },
        "ref": None,
        "topic": topic,
    }
    return record.get(key), len(
        json.dumps(frame, ensure_ascii=False, separators=(",", ":")).encode()
    )


async def flush_wal(admin: Any) -> None:
    """Logical decoding reads only flushed WAL, and the cluster runs synchronous_commit=off:
    commit one WAL-writing transaction synchronously, which flushes everything before it."""
    await admin.execute(
        "set synchronous_commit to on; select pg_logical_emit_message(true, 'bench', 'flush')"
    )


async def decoded_changes(admin: Any) -> dict[tuple[str, str], list[int]]:
    """Consume the slot: frame sizes per (table, row id) for chapters and chapter_chunks."""
    await flush_wal(admin)
    out: dict[tuple[str, str], list[int]] = {}
    rows = await admin.fetch(
        "select data from pg_logical_slot_get_changes($1, null, null, 'include-xids', '0')", SLOT
    )
    for r in rows:
        m = _HEAD.match(r["data"])
        if not m or m.group(1) not in ("chapters", "chapter_chunks"):
            continue
        table, op = m.group(1), m.group(2)
        if (table, op) not in (("chapters", "UPDATE"), ("chapter_chunks", "INSERT")):
            continue
        row_id, size = changes_frame(
            table, op, r["data"][m.end() :], "realtime:chapter:" + "0" * 36
        )
        if row_id is not None:
            out.setdefault((table, row_id), []).append(size)
    return out


def broadcast_frame_bytes(topic: str, event: str, payload: str) -> int:
    """The WebSocket frame one subscriber receives for one realtime.messages row."""
    frame = (
        '{"event":"broadcast","payload":{"event":' + json.dumps(event) + ',"payload":'
        + json.dumps(json.loads(payload), ensure_ascii=False, separators=(",", ":"))
        + ',"type":"broadcast"},"ref":null,"topic":' + json.dumps("realtime:" + topic) + "}"
    )  # fmt: skip
    return len(frame.encode())


# == the run ================================================================================


async def stream_one(
    admin: Any, store: Any, handlers: Any, kb: int, args: argparse.Namespace
) -> dict[str, Any]:
    from tests.support.seed import chapter_job
    from worker.runner import RunnerConfig

    _, chapter, job = await chapter_job(
        admin, options={"sections": SECTIONS, "target_words": 200 * SECTIONS}
    )
    await admin.execute(
        "update stories s set title = $1 from chapters c where c.id = $2 and s.id = c.story_id",
        f"Bench {kb} KB",
        chapter,
    )
    if args.decoding:
        await flush_wal(admin)
        await admin.fetch("select 1 from pg_logical_slot_get_changes($1, null, null)", SLOT)
    wal0 = await admin.fetchval("select pg_current_wal_lsn()")
    config = RunnerConfig(worker_id=f"bench-realtime-{kb}", concurrency=4, heartbeat_interval_s=10)
    t0 = time.monotonic()
    async with running(store, handlers, config):
        while await admin.fetchval("select status from job_queue where id = $1", job) not in (
            "completed",
            "failed",
        ):
            if time.monotonic() - t0 > args.timeout:
                raise TimeoutError(f"the {kb} KB chapter did not finish in time")
            await asyncio.sleep(0.1)
    wal = await admin.fetchval("select pg_wal_lsn_diff(pg_current_wal_lsn(), $1::pg_lsn)", wal0)
    row = await admin.fetchrow(
        "select c.status, octet_length(c.content) as bytes, char_length(c.content) as chars,"
        " extract(epoch from j.completed_at - j.started_at) as run_s"
        " from chapters c join job_queue j on j.id = c.generation_job_id where c.id = $1",
        chapter,
    )
    topic = f"chapter:{chapter}"
    msgs = await admin.fetch(
        "select event, payload::text as payload, inserted_at from realtime.messages"
        " where topic = $1 order by inserted_at",
        topic,
    )
    broadcast = sum(broadcast_frame_bytes(topic, m["event"], m["payload"]) for m in msgs)
    # Closest two deltas, leaving out the chapter's last one (written at once, so that the
    # chapter can finish): inserted_at is each append's transaction start.
    delta_at = [m["inserted_at"] for m in msgs if m["event"] == "delta"]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(delta_at[:-1])]
    if args.decoding:
        changes = await decoded_changes(admin)
        chapters_frames = changes.get(("chapters", chapter), [])
        chunk_frames = changes.get(("chapter_chunks", chapter), [])
    else:
        sizes = await admin.fetch(
            "select tbl, frame_bytes from bench_changes where chapter_id = $1", chapter
        )
        chapters_frames = [r["frame_bytes"] for r in sizes if r["tbl"] == "chapters"]
        chunk_frames = [r["frame_bytes"] for r in sizes if r["tbl"] == "chapter_chunks"]
    return {
        "kb": kb,
        "status": row["status"],
        "bytes": row["bytes"],
        "chars": row["chars"],
        "run_s": float(row["run_s"]),
        "messages": len(msgs),
        "events": Counter(m["event"] for m in msgs),
        "min_gap": min(gaps, default=float("inf")),
        "broadcast": broadcast,
        "chapters_updates": len(chapters_frames),
        "chapters_bytes": sum(chapters_frames),
        "chunk_inserts": len(chunk_frames),
        "chunk_bytes": sum(chunk_frames),
        "wal": int(wal),
    }


async def run(args: argparse.Namespace) -> int:
    measure.repo_on_path()
    if not os.environ.get("PG_BIN") and (PG15 / "postgres").exists():
        os.environ["PG_BIN"] = str(PG15)  # Debian's build ships test_decoding
    import asyncpg

    from worker.generation.chapter import ChapterHandler, GenerationConfig
    from worker.handlers import build_handlers
    from worker.store import Store
    from worker.store.postgres import PostgresTransport

    results = []
    async with throwaway_database() as (cluster, admin, server_version):
        # Autovacuum's ANALYZE of a freshly created cluster rewrites catalog statistics at
        # random moments (over 100 KB of WAL in one chapter's window): off for the run.
        await admin.execute("alter system set autovacuum = off")
        await admin.execute("select pg_reload_conf()")
        try:
            await admin.execute(
                f"select pg_create_logical_replication_slot('{SLOT}', 'test_decoding')"
            )
            args.decoding = True
        except asyncpg.PostgresError as exc:  # no test_decoding in this build
            say(f"test_decoding unavailable ({type(exc).__name__}); using the row-size trigger")
            args.decoding = False
            overhead = 700  # the frame around the record: columns with types, envelope
            await admin.execute(FALLBACK_LOG % {"overhead": overhead})
        say(
            f"PostgreSQL {server_version}; worker: Runner + ChapterHandler"
            " + Store(PostgresTransport),"
            f" FLUSH_INTERVAL_MS={args.flush_ms}, FLUSH_CHARS={args.flush_chars},"
            f" offline model at {args.chars_per_second:g} chars/s, {SECTIONS} sections"
        )
        store = await Store(PostgresTransport(cluster.dsn(), pool_size=6, listen=True)).open()
        model = PacedSizedModel(args.chars_per_second)
        gen = GenerationConfig(
            default_model="offline",
            allowed_models=("offline",),
            flush_interval_s=args.flush_ms / 1000,
            flush_chars=args.flush_chars,
        )
        handlers = build_handlers(ChapterHandler(model, gen))
        try:
            with logs_to_file("INFO") as log_path:
                for kb in args.sizes:
                    say(f"Streaming the {kb} KB chapter ...")
                    results.append(await stream_one(admin, store, handlers, kb, args))
        finally:
            await store.close()
            if args.decoding:
                await admin.execute(f"select pg_drop_replication_slot('{SLOT}')")
        problems, first = log_problems(log_path)
        log_path.unlink()
    return report(args, results, problems, first)


def report(
    args: argparse.Namespace, results: list[dict[str, Any]], problems: int, first: list[str]
) -> int:
    method = "test_decoding" if args.decoding else "row-size trigger"
    say("")
    say(
        f"{'chapter':>9} {'text B':>8} {'msgs':>5} {'deltas':>6} {'deltas/s':>8}"
        f" {'msgs/s':>6} {'gap s':>6} {'Broadcast':>9} {'pg_changes':>10} {'updates':>7}"
        f" {'chunks':>7} {'WAL':>6}"
    )
    checks: list[tuple[str, float, float]] = []  # (what, measured, ceiling)
    default_flush = args.flush_ms == 1000 and args.flush_chars == 2000
    for r in results:
        text = r["bytes"]
        b, c = r["broadcast"] / text, r["chapters_bytes"] / text
        k, w = r["chunk_bytes"] / text, r["wal"] / text
        deltas = r["events"].get("delta", 0)
        say(
            f"{r['kb']:>6} KB {text:>8,} {r['messages']:>5} {deltas:>6}"
            f" {deltas / r['run_s']:>8.2f} {r['messages'] / r['run_s']:>6.2f}"
            f" {r['min_gap']:>6.3f} {b:>8.2f}x {c:>9.2f}x {r['chapters_updates']:>7}"
            f" {k:>6.2f}x {w:>5.2f}x"
        )
        if not default_flush:
            continue
        if r["kb"] >= 20:
            checks.append((f"Broadcast bytes per subscriber / text at {r['kb']} KB", b, 1.5))
            checks.append((f"postgres_changes bytes of chapters / text at {r['kb']} KB", c, 2.0))
        if r["kb"] >= 60:
            checks.append((f"WAL / text at {r['kb']} KB", w, 4.0))
        if default_flush:
            # At most one per second: consecutive deltas at least a second apart. Written as
            # "1 / closest gap <= 1" so every check reads measured <= ceiling.
            checks.append(
                (f"deltas per second (1 / closest gap) at {r['kb']} KB", 1 / r["min_gap"], 1.0)
            )
    say("")
    say(
        "columns: msgs = all Broadcast messages (deltas + rewinds + status events); deltas/s and"
        " msgs/s over the chapter's run (claim to completion); gap = closest two consecutive"
        " deltas, the chapter's last one left out (it is written at once so the chapter can"
        " finish); Broadcast, pg_changes (Postgres Changes on chapters, one row per"
        f" UPDATE, measured with {method}), chunks (the opt-in: Postgres Changes on"
        " chapter_chunks) are bytes one subscriber receives / UTF-8 bytes of the final text;"
        " WAL = pg_current_wal_lsn() difference / text"
    )
    say(
        "messages by event: "
        + "; ".join(
            f"{r['kb']} KB " + ", ".join(f"{e} {n}" for e, n in sorted(r["events"].items()))
            for r in results
        )
    )
    say(f"worker log lines at WARNING or above: {problems}")
    for line in first:
        say("  " + line)
    if not default_flush:
        say("targets not checked: they are stated for the default flush (1000 ms, 2000 chars)")
    failed = [r["kb"] for r in results if r["status"] != "completed"]
    for kb in failed:
        say(f"FAIL: the {kb} KB chapter did not complete")
    for what, value, ceiling in checks:
        say(f"target {what}: {value:.2f} <= {ceiling:g}  {'PASS' if value <= ceiling else 'FAIL'}")
    return 1 if failed or any(v > c for _, v, c in checks) else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="5,20,60", help="chapter sizes in KB, comma-separated")
    parser.add_argument("--flush-ms", type=int, default=1000, help="FLUSH_INTERVAL_MS")
    parser.add_argument("--flush-chars", type=int, default=2000, help="FLUSH_CHARS")
    parser.add_argument("--chars-per-second", type=float, default=640.0, help="model pace")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per chapter")
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
