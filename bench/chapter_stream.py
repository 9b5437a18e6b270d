"""Chapter benchmark: 50 chapters at once against the fake Gemini server, at a realistic pace.

    .venv/bin/python bench/chapter_stream.py            # 50 chapters x 5 sections x ~600 words
    .venv/bin/python bench/chapter_stream.py --quick    # 10 chapters x 3 sections x ~300 words

The worker is the production assembly: the real Runner, the Store over asyncpg (LISTEN on),
ChapterHandler with the production defaults (FLUSH_INTERVAL_MS=1000,
FLUSH_CHARS=2000, HEARTBEAT_INTERVAL_S=10, GEMINI_* defaults) and GeminiModel, i.e.
the unmodified google-genai SDK over aiohttp, talking to tests/support/fake_gemini.py.

The fake server runs in a SUBPROCESS (this same script, ``--serve-fake``) so that
the CPU figure is the worker's own. The subprocess also hosts a byte-counting TCP
proxy between the worker and PostgreSQL, so "bytes sent to the database" is
measured on the wire (``--direct-db`` skips the proxy). PostgreSQL is a throwaway
LocalCluster on the same machine.

(the project's .venv has the dependencies; ``python3 dev.py test`` creates it). Exit
status 1 when a stated target fails or a chapter does not complete, 0 otherwise.

Figures (each target from the issue is printed with PASS/FAIL):

* CPU seconds per chapter: getrusage(RUSAGE_SELF) user+sys of this process (the
  worker) from Runner start to the last completion, divided by chapters; and the
  run's CPU/wall, target <= 0.5 core.
* Writes per chapter: UPDATEs of the chapter row, counted by a bench-only trigger
  (every row update, unconditionally), with the worker's own breakdown.
* Bytes to the database / final text bytes (UTF-8 of chapters.content), target
  <= 1.3: (a) payload: job_result['bytes_written'] (text + step + checkpoint of
  every append) + the outline JSON and title; (b) wire: every byte this process
  sent to PostgreSQL during the run (claims, heartbeats, protocol framing
  included), from the proxy.
* Job wall / stream time, target <= 1.02: job wall = completed_at - started_at
  (claim to complete_job, database clock); stream time = the sum over the job's
  sections of request arrival -> last byte written, as the fake server saw it.
  The outline call (a unary request, instant on the fake) counts as overhead;
  the ratio with it counted as model time is printed too.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import re
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import measure
from measure import (
    RssSampler,
    Targets,
    counter_value,
    cpu_s,
    log_problems,
    logs_to_file,
    pct,
    running,
    say,
    throwaway_database,
)

SCRIPT = str(Path(__file__).resolve())
MODEL = "gemini-3.5-flash"  # GEMINI_MODEL's default; the fake accepts any name
TAG = re.compile(r"Story title: Bench story (\d+)")
WRITE_LOG = """
create table bench_row_writes (row_id uuid, tbl text);
create function bench_log_row_write() returns trigger language plpgsql as $$
begin
  insert into bench_row_writes values (new.id, tg_table_name);
  return null;
end $$;
create trigger bench_log_row_write after update on chapters
  for each row execute function bench_log_row_write();
create trigger bench_log_row_write after update on job_queue
  for each row execute function bench_log_row_write();
"""


# == the subprocess: fake Gemini + byte-counting proxy =====================================


class FrontendMessages:
    """Splits one connection's client->server bytes into protocol messages, by type."""

    UNTYPED = (80877103, 80877104)  # SSLRequest, GSSENCRequest: the StartupMessage follows

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts
        self.buf = bytearray()
        self.untyped = True

    def feed(self, data: bytes) -> None:
        self.buf += data
        while True:
            if self.untyped:  # Int32 length, Int32 code, no type byte
                if len(self.buf) < 8:
                    return
                n = int.from_bytes(self.buf[:4], "big")
                code = int.from_bytes(self.buf[4:8], "big")
                kind = "startup"
            else:
                if len(self.buf) < 5:
                    return
                n = int.from_bytes(self.buf[1:5], "big") + 1
                kind = chr(self.buf[0])
            if len(self.buf) < n:
                return
            self.counts[kind] = self.counts.get(kind, 0) + n
            del self.buf[:n]
            if self.untyped and code not in self.UNTYPED:
                self.untyped = False


class CountingProxy:
    """A TCP relay to PostgreSQL that counts bytes each way, and client messages by type."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.up = self.down = self.connections = 0
        self.by_type: dict[str, int] = {}
        self.port = 0
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def reset(self) -> None:
        self.up = self.down = 0
        self.by_type.clear()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        messages = FrontendMessages(self.by_type)
        await asyncio.gather(
            self._pipe(reader, up_writer, messages), self._pipe(up_reader, writer, None)
        )

    async def _pipe(
        self,
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        messages: FrontendMessages | None,
    ) -> None:
        try:
            while data := await src.read(1 << 16):
                if messages is not None:
                    self.up += len(data)
                    messages.feed(data)
                else:
                    self.down += len(data)
                dst.write(data)
                await dst.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                dst.close()


async def serve_fake(cfg: dict[str, Any]) -> None:
    """Child process: serve the fake and the proxy; answer commands on stdin, one per line."""
    measure.repo_on_path()
    from tests.support.fake_gemini import FakeGemini

    ended: dict[int, float] = {}

    class TimedFake(FakeGemini):
        """Records when each response was fully written (the fake's own end of a stream)."""

        async def _stream(self, request: Any, record: Any, b: Any) -> Any:
            try:
                return await super()._stream(request, record, b)
            finally:
                ended[id(record)] = time.monotonic()

        async def _unary(self, request: Any, record: Any, b: Any) -> Any:
            try:
                return await super()._unary(request, record, b)
            finally:
                ended[id(record)] = time.monotonic()

    fake = await TimedFake(
        chunks_per_second=cfg["chunks_per_second"],
        chunk_chars=cfg["chunk_chars"],
        default_words=cfg["default_words"],
        outline_bullets=cfg["outline_bullets"],
    ).start()
    proxy = CountingProxy(cfg["pg_port"]) if cfg["pg_port"] else None
    if proxy is not None:
        await proxy.start()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    def reply(obj: dict[str, Any]) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"base_url": fake.base_url, "proxy_port": proxy.port if proxy else None})
    cpu0 = cpu_s()
    try:
        while line := await reader.readline():
            command = line.decode().strip()
            if command == "reset":
                fake.reset()
                ended.clear()
                if proxy is not None:
                    proxy.reset()
                cpu0 = cpu_s()
                reply({"ok": True})
            elif command == "stats":
                requests = []
                for r in fake.requests:
                    m = TAG.search(r.prompt)
                    requests.append(
                        {
                            "tag": int(m.group(1)) if m else None,
                            "action": r.action,
                            "start": r.started_at,
                            "end": ended.get(id(r)),
                            "chunks": r.chunks_sent,
                            "chars": len(r.text_sent),
                            "completed": r.completed,
                            "disconnected": r.client_disconnected,
                        }
                    )
                reply(
                    {
                        "requests": requests,
                        "max_open_streams": fake.max_open_streams,
                        "cpu_s": cpu_s() - cpu0,
                        "proxy": (
                            {
                                "up": proxy.up,
                                "down": proxy.down,
                                "connections": proxy.connections,
                                "by_type": proxy.by_type,
                            }
                            if proxy
                            else None
                        ),
                    }
                )
            elif command == "quit":
                break
    finally:
        await fake.close()
        if proxy is not None:
            await proxy.close()


class FakeProcess:
    """The parent's handle on the ``--serve-fake`` subprocess (one JSON line per answer)."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.base_url = ""
        self.proxy_port: int | None = None

    @classmethod
    async def start(cls, cfg: dict[str, Any]) -> FakeProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            SCRIPT,
            "--serve-fake",
            json.dumps(cfg),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            limit=2**26,
        )
        fake = cls(proc)
        try:
            hello = await fake._read(timeout=60)
        except BaseException:
            await fake.close()
            raise
        fake.base_url, fake.proxy_port = hello["base_url"], hello["proxy_port"]
        return fake

    async def _read(self, timeout: float = 30) -> dict[str, Any]:  # noqa: ASYNC109
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            raise RuntimeError("the fake Gemini subprocess exited")
        return json.loads(line)

    async def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        await self.proc.stdin.drain()
        return await self._read()

    async def close(self) -> None:
        if self.proc.returncode is not None:
            return
        assert self.proc.stdin is not None
        with contextlib.suppress(Exception):
            self.proc.stdin.write(b"quit\n")
            await self.proc.stdin.drain()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()  # our own child, by its handle
            await self.proc.wait()


# == measuring helpers =====================================================================


def postgres_cpu_s(datadir: Path) -> float | None:
    """User+sys CPU of the postmaster and its current children (psutil), or None."""
    try:
        import psutil

        pid = int((datadir / "postmaster.pid").read_text().split()[0])
        main = psutil.Process(pid)
        total = 0.0
        for p in (main, *main.children(recursive=True)):
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total
    except Exception:  # optional figure: psutil missing or no permission
        return None


# == the benchmark =========================================================================


async def enqueue(admin: Any, n: int, options: dict[str, Any]) -> dict[str, int]:
    """n chapters enqueued as the app does, each in its own story (tagged in the title)."""
    from tests.support.seed import chapter_job

    jobs: dict[str, int] = {}
    for i in range(n):
        _, chapter, job = await chapter_job(admin, options=options)
        await admin.execute(
            "update stories s set title = $1 from chapters c where c.id = $2 and s.id = c.story_id",
            f"Bench story {i:04d}",
            chapter,
        )
        jobs[job] = i
    return jobs


async def run(args: argparse.Namespace) -> int:
    measure.repo_on_path()
    from worker.generation.chapter import ChapterHandler, GenerationConfig
    from worker.generation.gemini import GeminiModel
    from worker.handlers import build_handlers
    from worker.runner import RunnerConfig
    from worker.store import Store
    from worker.store.postgres import PostgresTransport

    rss = RssSampler()
    async with throwaway_database() as (cluster, admin, server_version):
        dsn = cluster.dsn()
        say(
            f"Starting the fake Gemini server (subprocess): {args.chunks_per_second:g} "
            f"chunks/s x {args.chunk_chars} chars, {args.words_per_section} words/section"
        )
        fake = await FakeProcess.start(
            {
                "chunks_per_second": args.chunks_per_second,
                "chunk_chars": args.chunk_chars,
                "default_words": args.words_per_section,
                "outline_bullets": args.sections,
                "pg_port": None if args.direct_db else cluster.port,
            }
        )
        try:
            options = {
                "sections": args.sections,
                "target_words": args.sections * args.words_per_section,
            }
            say(f"Enqueueing {args.chapters} chapters {options} ...")
            jobs = await enqueue(admin, args.chapters, options)
            await admin.execute(WRITE_LOG)
            worker_dsn = (
                dsn
                if args.direct_db
                else f"postgresql://{cluster.user}@127.0.0.1:{fake.proxy_port}/postgres"
            )

            transport = PostgresTransport(
                worker_dsn, pool_size=min(20, args.concurrency + 2), listen=True
            )
            store = await Store(transport).open()
            model = GeminiModel(
                api_key="bench-not-a-real-key",
                base_url=fake.base_url,
                connect_timeout_s=10.0,
                idle_timeout_s=90.0,
                request_timeout_s=600.0,
                max_concurrent_streams=50,
                requests_per_minute=args.rpm or None,
            )
            gen = GenerationConfig(
                default_model=MODEL,
                allowed_models=(MODEL,),
                flush_interval_s=args.flush_interval,
                flush_chars=args.flush_chars,
            )
            handlers = build_handlers(ChapterHandler(model, gen))
            config = RunnerConfig(
                worker_id="bench-chapters",
                concurrency=args.concurrency,
                heartbeat_interval_s=args.heartbeat,
            )
            rss.start()
            wal0 = await admin.fetchval("select pg_current_wal_lsn()")
            pg_cpu0 = postgres_cpu_s(cluster.datadir)
            try:
                with logs_to_file(args.log_level) as log_path:
                    say(
                        f"Running {args.chapters} chapters at once (concurrency "
                        f"{args.concurrency}) ..."
                    )
                    await fake.ask("reset")
                    cpu0, t0 = cpu_s(), time.monotonic()
                    async with running(store, handlers, config) as runner:
                        m = runner.metrics
                        deadline = t0 + args.timeout
                        while counter_value(m.completed) + counter_value(m.failed) < len(jobs):
                            if time.monotonic() > deadline:
                                raise TimeoutError("chapters did not finish in time")
                            await asyncio.sleep(0.05)
                        wall = time.monotonic() - t0
                        cpu = cpu_s() - cpu0
                        retried = counter_value(m.retried)
                    pg_cpu1 = postgres_cpu_s(cluster.datadir)
                    fake_stats = await fake.ask("stats")
            finally:
                await model.aclose()
                await store.close()
            await rss.stop()
            wal_bytes = await admin.fetchval(
                "select pg_wal_lsn_diff(pg_current_wal_lsn(), $1::pg_lsn)::bigint", wal0
            )
            problems, first = log_problems(log_path)
            log_path.unlink()
            db = await collect(admin, jobs)
        finally:
            await fake.close()
    pg_cpu = pg_cpu1 - pg_cpu0 if pg_cpu0 is not None and pg_cpu1 is not None else None
    targets = Targets()
    report(
        args,
        targets,
        server_version=server_version,
        wall=wall,
        cpu=cpu,
        retried=retried,
        pg_cpu=pg_cpu,
        wal_bytes=int(wal_bytes),
        db=db,
        fake=fake_stats,
        rss=rss,
        problems=problems,
        first=first,
    )
    if not all(j["status"] == "completed" for j in db["jobs"].values()):
        targets.failed.append("every chapter completed")
    return targets.exit_code()


async def collect(admin: Any, jobs: dict[str, int]) -> dict[str, Any]:
    rows = await admin.fetch(
        "select j.id::text as job_id, j.status, j.job_result::text as result, j.error_details::text"
        " as error, extract(epoch from j.completed_at - j.started_at) as wall,"
        " c.id as chapter_id, char_length(c.content) as chars, octet_length(c.content) as bytes,"
        " c.word_count, octet_length(coalesce(c.outline::text, '')) as outline_bytes,"
        " octet_length(c.title) as title_bytes,"
        " (select count(*) from bench_row_writes w where w.row_id = c.id) as chapter_writes,"
        " (select count(*) from bench_row_writes w where w.row_id = j.id) as job_writes"
        " from job_queue j join chapters c on c.generation_job_id = j.id"
        " where j.id = any($1::uuid[])",
        list(jobs),
    )
    out: dict[str, dict[str, Any]] = {}
    for r in rows:
        d = dict(r)
        d["result"] = json.loads(d["result"]) if d["result"] else {}
        d["wall"] = float(d["wall"]) if d["wall"] is not None else None
        d["tag"] = jobs[d["job_id"]]
        out[d["job_id"]] = d
    return {"jobs": out}


def report(
    args: argparse.Namespace,
    targets: Targets,
    *,
    server_version: str,
    wall: float,
    cpu: float,
    retried: float,
    pg_cpu: float | None,
    wal_bytes: int,
    db: dict[str, Any],
    fake: dict[str, Any],
    rss: RssSampler,
    problems: int,
    first: list[str],
) -> None:
    jobs = list(db["jobs"].values())
    done = [j for j in jobs if j["status"] == "completed"]
    n = len(jobs)
    text_bytes = sum(j["bytes"] for j in done)
    text_chars = sum(j["chars"] for j in done)
    words = sum(j["word_count"] for j in done)

    by_tag: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for r in fake["requests"]:
        if r["tag"] is not None and r["end"] is not None:
            by_tag[r["tag"]].append(r)
    streams = [r for r in fake["requests"] if r["action"] == "streamGenerateContent"]
    chunks = sum(r["chunks"] for r in streams)
    floor = sum(max(0, r["chunks"] - 1) / args.chunks_per_second for r in streams)

    ratios, walls, models, gaps, stream_time = [], [], [], [], []
    for j in done:
        reqs = sorted(by_tag.get(j["tag"], []), key=lambda r: r["start"])
        sections = sum(
            r["end"] - r["start"] for r in reqs if r["action"] == "streamGenerateContent"
        )
        if not sections or j["wall"] is None:
            continue
        walls.append(j["wall"])
        stream_time.append(sections)
        models.append(sum(r["end"] - r["start"] for r in reqs))
        ratios.append(j["wall"] / sections)
        gaps += [b["start"] - a["end"] for a, b in itertools.pairwise(reqs)]
    agg_ratio = sum(walls) / sum(stream_time) if stream_time else float("nan")
    model_ratio = sum(walls) / sum(models) if models else float("nan")
    overhead = statistics.fmean(walls) - statistics.fmean(stream_time)

    payload = sum(
        j["result"].get("bytes_written", 0) + j["outline_bytes"] + j["title_bytes"] for j in done
    )
    payload_ratio = payload / text_bytes if text_bytes else float("nan")
    proxy = fake.get("proxy")
    wire_ratio = proxy["up"] / text_bytes if proxy and text_bytes else None

    chapter_writes = [j["chapter_writes"] for j in done]
    job_writes = [j["job_writes"] for j in done]
    appends = [j["result"].get("writes", 0) for j in done]
    cores = cpu / wall
    cpu_per_chapter = cpu / n

    lines = [
        f"$ .venv/bin/python bench/chapter_stream.py {' '.join(sys.argv[1:])}".rstrip(),
        f"machine: {os.cpu_count()} CPU, Python {platform.python_version()}, PostgreSQL "
        f"{server_version.split()[0]} on the SAME machine (LocalCluster: loopback TCP, "
        "fsync=off, synchronous_commit=off); fake Gemini in a subprocess",
        f"worker: real Runner + ChapterHandler + GeminiModel (google-genai SDK, aiohttp), "
        f"concurrency {args.concurrency}, FLUSH_INTERVAL {args.flush_interval:g} s, "
        f"FLUSH_CHARS {args.flush_chars}, heartbeat {args.heartbeat:g} s, "
        f"GEMINI_REQUESTS_PER_MINUTE {args.rpm}, logs {args.log_level} JSON (to a file)",
        f"load: {n} chapters at once x {args.sections} sections x ~{args.words_per_section} "
        f"words; fake paces {args.chunks_per_second:g} chunks/s x {args.chunk_chars} chars "
        f"(~{args.chunks_per_second * args.chunk_chars / 4:.0f} tokens/s per stream), "
        f"{fake['max_open_streams']} streams open at peak",
        f"result: {len(done)}/{n} completed, {retried:g} retries, {words:,} words, "
        f"{text_chars:,} chars ({text_bytes:,} bytes), {chunks:,} chunks streamed, "
        f"run wall {wall:.1f} s",
        "",
        f"CPU per chapter     {cpu_per_chapter:.3f} s  (worker process user+sys "
        f"{cpu:.2f} s / {n}; {cpu / max(chunks, 1) * 1e6:.0f} us per streamed chunk)",
        f"CPU / wall          {cores:.2f} cores over the {wall:.1f} s run   target <= 0.5  "
        f"{targets.check('CPU/wall', cores <= 0.5)}",
        f"peak RSS            {RssSampler.maxrss_mb():.1f} MB (ru_maxrss)"
        + (f"; psutil sampled peak {rss.peak / 2**20:.1f} MB" if rss.peak else ""),
        f"writes per chapter  {statistics.fmean(chapter_writes):.1f} chapter-row UPDATEs "
        f"(trigger count; max {max(chapter_writes)}) = start 1 + outline 1 + "
        f"{statistics.fmean(appends):.1f} appends incl. {args.sections} section checkpoints"
        " + finish 1",
        f"                    job_queue row UPDATEs: {statistics.fmean(job_writes):.1f} per "
        "chapter (claim, milestone steps in chapter writes, heartbeats, complete)",
        f"bytes / text        payload {payload_ratio:.3f}  target <= 1.3  "
        f"{targets.check('payload/text', payload_ratio <= 1.3)}  (job_result bytes_written = "
        "text + step + "
        "checkpoint of each append, + outline JSON + title)",
    ]
    if wire_ratio is not None:
        lines.append(
            f"                    wire    {wire_ratio:.3f}  target <= 1.3  "
            f"{targets.check('wire/text', wire_ratio <= 1.3)}  ({proxy['up']:,} bytes this "
            "process sent to "
            "PostgreSQL during the run, all calls and protocol framing)"
        )
    else:
        lines.append("                    wire    not measured (--direct-db)")
    if proxy:
        kb = {k: v / 1024 for k, v in proxy["by_type"].items()}
        lines.append(
            f"                    wire by message: Bind {kb.get('B', 0):,.0f} KB (parameters: "
            f"text, ids, steps, checkpoints), Parse {kb.get('P', 0):,.0f} KB, Execute+Sync+"
            f"Describe {kb.get('E', 0) + kb.get('S', 0) + kb.get('D', 0):,.0f} KB, Query "
            f"{kb.get('Q', 0):,.0f} KB, startup {kb.get('startup', 0):,.0f} KB; "
            f"{proxy['connections']} connections"
        )
    lines += [
        f"wall / stream time  {agg_ratio:.4f}  target <= 1.02  "
        f"{targets.check('wall/stream', agg_ratio <= 1.02)}  "
        f"(sum of job walls {sum(walls):.1f} s / sum of section streams "
        f"{sum(stream_time):.1f} s; per chapter p50 {pct(ratios, 50):.4f}, "
        f"max {max(ratios):.4f})",
        f"                    stream = request arrival -> last byte written, fake side "
        f"(pacing floor {floor:.1f} s); with the outline call counted as model time "
        f"{model_ratio:.4f}",
        f"                    mean overhead {overhead:.3f} s per chapter; gap between a "
        f"chapter's model calls p50 {pct(gaps, 50) * 1000:.1f} ms,"
        f" max {max(gaps) * 1000:.1f} ms",
        f"other               fake+proxy subprocess CPU {fake['cpu_s']:.2f} s"
        + (f"; PostgreSQL CPU {pg_cpu:.2f} s" if pg_cpu is not None else "")
        + f"; WAL {wal_bytes / 2**20:.1f} MB = {wal_bytes / max(text_bytes, 1):.1f} x text "
        "(incl. the bench trigger's inserts)",
        f"worker log lines at WARNING or above: {problems}",
    ]
    lines += [f"  {line}" for line in first]
    failed = [j for j in jobs if j["status"] != "completed"]
    for j in failed[:3]:
        lines.append(f"  job {j['job_id']} {j['status']}: {(j['error'] or '')[:200]}")
    say("")
    say("---- README block " + "-" * 62)
    say("```")
    for line in lines:
        say(line)
    say("```")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--serve-fake", metavar="JSON", help=argparse.SUPPRESS)
    p.add_argument(
        "--quick", action="store_true", help="smaller run: 10 chapters x 3 sections x ~300 words"
    )
    p.add_argument("--chapters", type=int, default=None, help="chapters at once (default 50)")
    p.add_argument("--sections", type=int, default=None, help="sections per chapter (default 5)")
    p.add_argument(
        "--words-per-section",
        type=int,
        default=None,
        help="words the fake streams per section (default 600)",
    )
    p.add_argument(
        "--chunks-per-second", type=float, default=20.0, help="pace of every stream (default 20)"
    )
    p.add_argument(
        "--chunk-chars",
        type=int,
        default=32,
        help="characters per chunk (default 32: 20 x 32 chars/s ~ 160 tokens/s)",
    )
    p.add_argument("--concurrency", type=int, default=50, help="WORKER_CONCURRENCY")
    p.add_argument("--flush-interval", type=float, default=1.0, help="FLUSH_INTERVAL_MS / 1000")
    p.add_argument("--flush-chars", type=int, default=2000, help="FLUSH_CHARS")
    p.add_argument("--heartbeat", type=float, default=10.0, help="HEARTBEAT_INTERVAL_S")
    p.add_argument(
        "--rpm",
        type=int,
        default=600,
        help="GEMINI_REQUESTS_PER_MINUTE (production default 600; 0 = none)",
    )
    p.add_argument(
        "--direct-db",
        action="store_true",
        help="connect straight to PostgreSQL (no byte-counting proxy)",
    )
    p.add_argument("--log-level", default="INFO", help="worker log level (production: INFO)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds for the whole run")
    args = p.parse_args(argv)
    quick = args.quick
    args.chapters = args.chapters or (10 if quick else 50)
    args.sections = args.sections or (3 if quick else 5)
    args.words_per_section = args.words_per_section or (300 if quick else 600)
    if not 2 <= args.sections <= 12:
        p.error("--sections must be 2..12 (the payload's limits)")
    if not 200 <= args.sections * args.words_per_section <= 8000:
        p.error("--sections x --words-per-section must be 200..8000 (options.target_words)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_fake:
        asyncio.run(serve_fake(json.loads(args.serve_fake)))
        return 0
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
