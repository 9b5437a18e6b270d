"""Fleet budget benchmark: 3 worker processes x concurrency 50 against one Gemini quota.

The fake Gemini server (tests/support/fake_gemini.py, in this process) enforces one global
quota of Q requests per minute (and a token quota) across every connection, over a sliding
minute, and answers 429 RESOURCE_EXHAUSTED with RetryInfo past it, as the real API does.
Three real worker processes (``python -m worker run``: Runner, ChapterHandler, GeminiModel
over the google-genai SDK, a throwaway PostgreSQL) write short chapters against it, with
a backlog deep enough that the quota, not the work, is the limit. Three runs:

* ``shared``: the fleet budget in PostgreSQL set to Q (gemini_budgets), each process's own
  GEMINI_REQUESTS_PER_MINUTE at Q (a local safety cap that never binds);
* ``per-process Q/3``: GEMINI_SHARED_BUDGET=off, each process limited to Q/3 on its own;
* ``per-process Q``: GEMINI_SHARED_BUDGET=off, each process limited to Q (the overshoot
  that three instances, or a deploy overlap, produce).

Figures (per run, over a measured window after a warm-up, at the fake server): requests
answered and 429s, throughput as a share of Q, chapters completed, the budget's database
calls and their latency (from the worker's /metrics), the cached share of prompt tokens.

Targets (the ``shared`` run; exit 1 when one fails): 429s < 1 % of requests, throughput
>= 90 % of Q.

    .venv/bin/python bench/fleet_budget.py                 # Q = 600 RPM, 60 s windows
    .venv/bin/python bench/fleet_budget.py --quota 900 --window 45 --only shared
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from typing import Any

import measure
from measure import Targets, say, throwaway_database

MODEL = "gemini-3.5-flash"
WORKERS = 3
CONCURRENCY = 50
SECTIONS = 3
PREMISE_CHARS = 18_000  # the story context passes Gemini's 4,096-token caching minimum


@dataclass
class Run:
    name: str
    shared: bool
    local_rpm: int


@dataclass
class Result:
    name: str
    answered: int
    limited: int
    window_s: float
    chapters: int
    takes: float
    mean_wait_s: float | None
    cached_share: float
    quota: int

    @property
    def throughput_share(self) -> float:
        return self.answered * 60.0 / self.window_s / self.quota

    @property
    def limited_share(self) -> float:
        total = self.answered + self.limited
        return self.limited / total if total else 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def enqueue(admin: Any, n: int) -> None:
    """n chapters, each in its own story with a long premise, enqueued as the app does."""
    from tests.support.seed import chapter_job

    premise = ("The lantern keeper walks the harbour wall at dusk and counts the ships. " * 300)[
        :PREMISE_CHARS
    ]
    for i in range(n):
        _, chapter, _ = await chapter_job(
            admin, options={"sections": SECTIONS, "target_words": 200}
        )
        await admin.execute(
            "update stories s set title = $1, premise = $2 from chapters c"
            " where c.id = $3 and s.id = c.story_id",
            f"Bench story {i:05d}",
            premise,
            chapter,
        )


async def reset_queue(admin: Any, quota: int, tpm: int, shared: bool) -> None:
    await admin.execute(
        "truncate public.job_queue, public.chapters, public.stories,"
        " public.job_queue_user_state, public.gemini_budgets cascade"
    )
    await admin.execute(
        "update job_lanes set max_active_per_user = 100000,"
        " max_enqueued_per_user_per_hour = 10000000"
    )
    if shared:
        await admin.execute(
            "insert into gemini_budgets (model, rpm, tpm) values ($1, $2, $3)", MODEL, quota, tpm
        )


def worker_env(dsn: str, base_url: str, i: int, run: Run, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GEMINI_", "SUPABASE_"))}
    env.update(
        APP_ENV="development",
        DATABASE_URL=dsn,
        GENERATION_PROVIDER="gemini",
        GEMINI_API_KEY="bench-not-a-real-key",
        GEMINI_BASE_URL=base_url,
        GEMINI_MODEL=MODEL,
        GEMINI_SHARED_BUDGET="on" if run.shared else "off",
        GEMINI_REQUESTS_PER_MINUTE=str(run.local_rpm),
        GEMINI_MAX_CONCURRENT_STREAMS=str(CONCURRENCY),
        GEMINI_THINKING_LEVEL="default",
        WORKER_CONCURRENCY=str(CONCURRENCY),
        WORKER_ID=f"bench-fleet-{i}",
        HEALTH_CHECK_PORT=str(port),
        SHUTDOWN_GRACE_S="2",
        LOG_LEVEL="ERROR",
        LOG_FORMAT="json",
        PYTHONPATH=str(measure.ROOT),
    )
    return env


async def scrape(port: int) -> str:
    import aiohttp

    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as resp,
    ):
        return await resp.text()


def metric_sum(text: str, name: str, model: str | None = None) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and (model is None or f'model="{model}"' in line):
            total += float(line.rsplit(" ", 1)[1])
    return total


async def one_run(
    args: argparse.Namespace, run: Run, cluster: Any, admin: Any
) -> tuple[Result, list[str]]:
    from tests.support.fake_gemini import start_fake_gemini

    tpm = args.tpm
    await reset_queue(admin, args.quota, tpm, run.shared)
    say(f"[{run.name}] enqueueing {args.chapters} chapters ...")
    await enqueue(admin, args.chapters)
    fake = await start_fake_gemini(
        rpm=args.quota,
        tpm=tpm,
        default_words=args.words,
        chunk_chars=60,
        chunks_per_second=args.chunks_per_second,
        outline_bullets=SECTIONS,
    )
    ports = [free_port() for _ in range(WORKERS)]
    procs: list[asyncio.subprocess.Process] = []
    errors: list[str] = []
    try:
        for i, port in enumerate(ports):
            procs.append(
                await asyncio.create_subprocess_exec(
                    sys.executable,
                    "-m",
                    "worker",
                    "run",
                    env=worker_env(cluster.dsn(), fake.base_url, i, run, port),
                    cwd=str(measure.ROOT),
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=asyncio.subprocess.PIPE,
                )
            )
        deadline = time.monotonic() + 90
        while True:  # every worker serves /health and the first requests have arrived
            up = 0
            for port in ports:
                with contextlib.suppress(OSError):
                    await scrape(port)
                    up += 1
            if up == len(ports) and fake.requests:
                break
            if time.monotonic() > deadline or any(p.returncode is not None for p in procs):
                raise RuntimeError("the workers did not start")
            await asyncio.sleep(0.5)
        say(f"[{run.name}] workers up; warm-up {args.warmup:g} s, then {args.window:g} s measured")
        await asyncio.sleep(args.warmup)
        before = [await scrape(p) for p in ports]
        t0 = time.monotonic()
        done0 = await admin.fetchval("select count(*) from job_queue where status = 'completed'")
        await asyncio.sleep(args.window)
        t1 = time.monotonic()
        done1 = await admin.fetchval("select count(*) from job_queue where status = 'completed'")
        after = [await scrape(p) for p in ports]
        waiting = await admin.fetchval(
            "select count(*) from job_queue where status in ('pending', 'processing')"
        )
        if waiting < WORKERS * CONCURRENCY:  # some slots had nothing to do
            errors.append(f"{run.name}: the backlog ran out; enqueue more (--chapters)")
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                _, err = await asyncio.wait_for(p.communicate(), 60)
            except TimeoutError:
                p.kill()
                err = b""
            if p.returncode not in (0, -signal.SIGTERM):
                errors.append(f"{run.name}: a worker exited {p.returncode}: {err[-300:]!r}")
        await fake.close()

    window = [r for r in fake.requests if t0 <= r.started_at < t1]
    answered = [r for r in window if not r.rate_limited and r.usage]
    limited = [r for r in window if r.rate_limited]
    prompt = sum(r.usage["promptTokenCount"] for r in answered if r.usage)
    cached = sum(r.cached_tokens for r in answered)
    takes = sum(
        metric_sum(a, "genworker_budget_wait_seconds_count")
        - metric_sum(b, "genworker_budget_wait_seconds_count")
        for a, b in zip(after, before, strict=True)
    )
    wait_sum = sum(
        metric_sum(a, "genworker_budget_wait_seconds_sum")
        - metric_sum(b, "genworker_budget_wait_seconds_sum")
        for a, b in zip(after, before, strict=True)
    )
    return (
        Result(
            name=run.name,
            answered=len(answered),
            limited=len(limited),
            window_s=t1 - t0,
            chapters=int(done1 - done0),
            takes=takes,
            mean_wait_s=(wait_sum / takes) if takes else None,
            cached_share=cached / prompt if prompt else 0.0,
            quota=args.quota,
        ),
        errors,
    )


async def budget_call_latency(admin: Any, n: int = 2000) -> tuple[float, float]:
    """One take + one settle, back to back, on an unlimited model: ms per pair (p50, p99)."""
    await admin.execute(
        "insert into gemini_budgets (model, rpm, tpm)"
        " values ('latency-probe', 10000000, 10000000000)"
    )
    times = []
    for _ in range(n):
        t = time.perf_counter()
        await admin.fetchrow("select * from gemini_budget_take('latency-probe', 500)")
        await admin.execute("select gemini_budget_settle('latency-probe', 500, 400)")
        times.append((time.perf_counter() - t) * 1000)
    return measure.pct(times, 50), measure.pct(times, 99)


async def run(args: argparse.Namespace) -> int:
    measure.repo_on_path()
    runs = [
        Run("shared", True, args.quota),
        Run("per-process Q/3", False, args.quota // WORKERS),
        Run("per-process Q", False, args.quota),
    ]
    if args.only:
        runs = [r for r in runs if r.name.split()[0] == args.only or r.name == args.only]
    results: list[Result] = []
    errors: list[str] = []
    async with throwaway_database() as (cluster, admin, version):
        say(f"PostgreSQL {version}; quota Q = {args.quota} RPM, {args.tpm:,} TPM on {MODEL}")
        for r in runs:
            result, errs = await one_run(args, r, cluster, admin)
            results.append(result)
            errors.extend(errs)
        await admin.execute("truncate public.gemini_budgets")
        p50, p99 = await budget_call_latency(admin)
    targets = Targets()
    say("")
    say(
        f"{WORKERS} worker processes x concurrency {CONCURRENCY}, quota Q = {args.quota} RPM, "
        f"measured {args.window:g} s after {args.warmup:g} s warm-up"
    )
    say(
        f"{'run':<18} {'answered':>8} {'429s':>6} {'429 %':>7} {'RPM':>7} {'of Q':>7} "
        f"{'chapters':>8} {'cached':>7}"
    )
    for r in results:
        say(
            f"{r.name:<18} {r.answered:>8} {r.limited:>6} {r.limited_share * 100:>6.2f}% "
            f"{r.answered * 60 / r.window_s:>7.0f} {r.throughput_share * 100:>6.1f}% "
            f"{r.chapters:>8} {r.cached_share * 100:>6.1f}%"
        )
    say("")
    say(
        f"budget calls: take + settle on PostgreSQL, one client: p50 {p50:.2f} ms, p99 {p99:.2f} ms"
    )
    for r in results:
        if r.takes:
            say(
                f"[{r.name}] {r.takes:.0f} budget takes granted in the window "
                f"({r.takes / r.window_s:.1f}/s), mean wait for the budget "
                f"{r.mean_wait_s or 0:.1f} s"
            )
    shared = next((r for r in results if r.name == "shared"), None)
    if shared is not None:
        say(
            f"target: shared 429s < 1 %: {shared.limited_share * 100:.2f}% "
            f"{targets.check('shared 429 share', shared.limited_share < 0.01)}"
        )
        say(
            f"target: shared throughput >= 90 % of Q: {shared.throughput_share * 100:.1f}% "
            f"{targets.check('shared throughput', shared.throughput_share >= 0.9)}"
        )
    for e in errors:
        say(f"problem: {e}")
        targets.check(e, False)
    return targets.exit_code()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quota", type=int, default=600, help="Q: requests per minute (600)")
    p.add_argument("--tpm", type=int, default=20_000_000, help="tokens per minute (20M)")
    p.add_argument("--window", type=float, default=60.0, help="measured seconds (60)")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds before measuring (5)")
    p.add_argument("--chapters", type=int, default=0, help="backlog per run (default: enough)")
    p.add_argument("--words", type=int, default=20, help="words the fake writes per answer")
    p.add_argument("--chunks-per-second", type=float, default=20.0)
    p.add_argument("--only", choices=["shared", "per-process", "per-process Q/3", "per-process Q"])
    args = p.parse_args()
    if not args.chapters:
        # (1 outline + SECTIONS) requests per chapter, 1.5x the quota's worth of work.
        # Every slot busy, plus 1.5x the quota's worth of chapters ((1 + SECTIONS) requests).
        args.chapters = WORKERS * CONCURRENCY + int(
            args.quota * (args.window + args.warmup + 20) / 60 / (SECTIONS + 1) * 1.5
        )
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
