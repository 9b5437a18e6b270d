"""Queue benchmark: no-op jobs through the real Runner and the Store over asyncpg.

    .venv/bin/python bench/queue_throughput.py            # 5,000 jobs + 2 x 200 latency probes
    .venv/bin/python bench/queue_throughput.py --quick    # a smaller run (about 20 s)
    .venv/bin/python bench/queue_throughput.py --compare  # side by side with pgqueuer and
                                                          # procrastinate (the bench extra)

(the project's .venv has the dependencies; ``python3 dev.py test`` creates it; the peers of
``--compare`` come with ``.venv/bin/pip install -e '.[bench]'``). Without ``--compare`` it
states no target, so it exits 0 unless the run itself fails.

What it measures, on a throwaway local PostgreSQL (LocalCluster, same machine):

1. Throughput: ``--jobs`` no-op jobs are inserted in one statement, then a Runner
   (concurrency 50, heartbeat 10 s) is started; jobs/s = jobs / (time from
   ``Runner.run()`` to the last ``complete_job``).
2. Claim-to-start latency into an IDLE worker: the worker is left idle for
   ``--idle-s``, then ``--latency-jobs`` jobs are inserted one at a time (own
   transaction each, as an app would) at random ``--gap-ms`` intervals. Latency =
   wall-clock time the handler starts - the job's ``created_at``. Run twice: with
   LISTEN/NOTIFY (``listen=True``) and polling only (``listen=False``) with the
   production poll settings (POLL_INTERVAL_MS=1000, POLL_MAX_INTERVAL_MS=5000).
3. Peak RSS of this process (ru_maxrss, and psutil samples when installed).

``--compare`` instead drains the same number of no-op jobs with genworker (concurrency 50,
claim batch 25), pgqueuer (its best configuration: batch size 25, max_concurrent_tasks 50)
and procrastinate (concurrency 50) on the same database, ``--rounds`` times in rotating
order, with fsync and synchronous_commit ON (``--no-durable`` to leave them off); prints
jobs/s, worker CPU and PostgreSQL CPU per job for each and the ratios; then the pickup
latency (handler start - enqueue commit) into an idle LISTENing worker, genworker and
pgqueuer. Exits 1 when a target fails: genworker's drain >= 1.0x pgqueuer's (medians of
the rounds) and genworker's pickup p50 <= pgqueuer's.

Logging is set up as in production (JSON lines at INFO, ``--log-level``) but
written to a temporary file; warnings and errors are counted and shown.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import asyncpg
import measure
from measure import (
    PgCpu,
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

from worker.handlers import noop
from worker.jobs import JobContext
from worker.runner import RunnerConfig
from worker.store import Store
from worker.store.postgres import PostgresTransport

# -- measuring -------------------------------------------------------------------------


def histogram_mean(hist: Any) -> tuple[float, int]:
    total = count = 0.0
    for m in hist.collect():
        for s in m.samples:
            if s.name.endswith("_sum"):
                total += s.value
            elif s.name.endswith("_count"):
                count += s.value
    return (total / count if count else 0.0), int(count)


# -- the worker ------------------------------------------------------------------------


def runner_config(args: argparse.Namespace, worker_id: str) -> RunnerConfig:
    return RunnerConfig(
        worker_id=worker_id,
        concurrency=args.concurrency,
        claim_batch_max=args.claim_batch,
        poll_interval_s=args.poll_interval,
        poll_max_interval_s=args.poll_max,
        heartbeat_interval_s=args.heartbeat,
    )


async def wait_for(predicate: Any, timeout: float, what: str) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


# -- phases ----------------------------------------------------------------------------


async def throughput(
    args: argparse.Namespace,
    dsn: str,
    admin: asyncpg.Connection,
    analyze: bool,
    pg: PgCpu | None = None,
) -> dict[str, Any]:
    from tests.support.seed import insert_jobs

    t = time.monotonic()
    ids = await insert_jobs(admin, args.jobs, job_type="noop")
    insert_s = time.monotonic() - t
    if analyze:
        await admin.execute("analyze job_queue")
    store = await Store(PostgresTransport(dsn, pool_size=args.pool_size, listen=True)).open()
    worker_id = f"bench-tput-{'analyzed' if analyze else 'fresh'}"
    try:
        pg0 = pg.total() if pg else 0.0
        cpu0, t0 = cpu_s(), time.monotonic()
        async with running(store, {"noop": noop}, runner_config(args, worker_id)) as runner:
            done = runner.metrics.completed.labels("noop")
            await wait_for(lambda: counter_value(done) >= args.jobs, args.timeout, "all jobs")
            elapsed = time.monotonic() - t0
            cpu = cpu_s() - cpu0
            pg_cpu = pg.total() - pg0 if pg else 0.0
            claim_mean, claims = histogram_mean(runner.metrics.claim_seconds)
            claim_batch, _ = histogram_mean(runner.metrics.claim_batch_size)
            done_batch, done_calls = histogram_mean(runner.metrics.completion_batch_size)
            failed = counter_value(runner.metrics.failed) + counter_value(runner.metrics.retried)
    finally:
        await store.close()
    row = await admin.fetchrow(
        "select count(*) filter (where status = 'completed') as completed,"
        " extract(epoch from max(completed_at) - min(started_at)) as db_span"
        " from job_queue where id = any($1::uuid[])",
        ids,
    )
    if row["completed"] != args.jobs or failed:
        raise RuntimeError(
            f"throughput run: {row['completed']} of {args.jobs} completed, "
            f"{failed} failed or retried"
        )
    return {
        "jobs": args.jobs,
        "elapsed_s": elapsed,
        "jobs_per_s": args.jobs / elapsed,
        "db_span_s": float(row["db_span"]),
        "cpu_s": cpu,
        "pg_cpu_s": pg_cpu,
        "insert_s": insert_s,
        "claim_mean_ms": claim_mean * 1000,
        "claims": claims,
        "claim_batch": claim_batch,
        "done_batch": done_batch,
        "done_calls": done_calls,
        "analyze": analyze,
    }


async def calibrate(dsn: str, n: int = 1000) -> float:
    """CPU microseconds this process spends on one asyncpg round trip ('select 1')."""
    conn = await asyncpg.connect(dsn)
    try:
        await conn.fetchval("select 1")
        cpu0 = cpu_s()
        for _ in range(n):
            await conn.fetchval("select 1")
        return (cpu_s() - cpu0) / n * 1e6
    finally:
        await conn.close()


async def latency(
    args: argparse.Namespace, dsn: str, admin: asyncpg.Connection, listen: bool
) -> dict[str, Any]:
    from tests.support.seed import insert_jobs

    started: dict[str, float] = {}

    async def timed_noop(ctx: JobContext) -> Any:
        started[ctx.job.id] = time.time()
        return await noop(ctx)

    mode = "listen" if listen else "poll"
    transport = PostgresTransport(dsn, pool_size=args.pool_size, listen=listen)
    store = await Store(transport).open()
    if listen and not transport.listening:
        raise RuntimeError("LISTEN connection did not come up")
    lo, hi = args.gap_ms
    ids: list[str] = []
    committed: dict[str, float] = {}
    try:
        async with running(
            store, {"noop": timed_noop}, runner_config(args, f"bench-{mode}")
        ) as runner:
            await asyncio.sleep(args.idle_s)  # let the claim loop go idle (backed off)
            for _ in range(args.latency_jobs):
                (job_id,) = await insert_jobs(admin, 1, job_type="noop")
                committed[job_id] = time.time()
                ids.append(job_id)
                await asyncio.sleep(random.uniform(lo, hi) / 1000)
            done = runner.metrics.completed.labels("noop")
            await wait_for(lambda: counter_value(done) >= len(ids), args.timeout, f"{mode} jobs")
    finally:
        await store.close()
    rows = await admin.fetch("select id::text, created_at from job_queue where id = any($1)", ids)
    created = {r["id"]: r["created_at"].timestamp() for r in rows}
    lat = [started[i] - created[i] for i in ids]  # in enqueue order
    from_commit = [started[i] - committed[i] for i in ids]
    return {
        "mode": mode,
        "n": len(lat),
        "p50_ms": pct(lat, 50) * 1000,
        "p95_ms": pct(lat, 95) * 1000,
        "max_ms": max(lat) * 1000,
        "first_ms": lat[0] * 1000,
        "mean_ms": statistics.fmean(lat) * 1000,
        "commit_p50_ms": pct(from_commit, 50) * 1000,
        "commit_p95_ms": pct(from_commit, 95) * 1000,
        "from_commit": from_commit,
        "notifications": transport.notifications,
    }


# -- main ------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--quick", action="store_true", help="smaller run: 1,000 jobs, 50 latency probes, 2 s idle"
    )
    p.add_argument("--jobs", type=int, default=None, help="throughput jobs (default 5000)")
    p.add_argument(
        "--latency-jobs",
        type=int,
        default=None,
        help="jobs enqueued one at a time per latency run (default 200)",
    )
    p.add_argument(
        "--gap-ms",
        type=float,
        nargs=2,
        default=(20.0, 50.0),
        metavar=("MIN", "MAX"),
        help="random interval between latency jobs (default 20 50)",
    )
    p.add_argument(
        "--idle-s",
        type=float,
        default=None,
        help="idle time before the latency probes start (default 10: the poll "
        "backoff reaches its 5 s ceiling after about 8 s)",
    )
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument(
        "--pool-size",
        type=int,
        default=20,
        help="asyncpg pool size (production: min(20, concurrency + 2))",
    )
    p.add_argument("--poll-interval", type=float, default=1.0, help="POLL_INTERVAL_MS / 1000")
    p.add_argument("--poll-max", type=float, default=5.0, help="POLL_MAX_INTERVAL_MS / 1000")
    p.add_argument("--heartbeat", type=float, default=10.0, help="HEARTBEAT_INTERVAL_S")
    p.add_argument("--log-level", default="INFO", help="worker log level (production: INFO)")
    p.add_argument("--timeout", type=float, default=120.0, help="per-phase timeout, seconds")
    p.add_argument(
        "--stats",
        choices=("fresh", "analyzed", "both"),
        default="both",
        help="throughput with the planner statistics as enqueued (a burst into a "
        "table autovacuum has not analyzed yet), after ANALYZE, or both",
    )
    p.add_argument("--skip-latency", action="store_true", help="throughput only")
    p.add_argument(
        "--claim-batch", type=int, default=25, help="CLAIM_BATCH_MAX: jobs per claim call"
    )
    p.add_argument(
        "--compare",
        action="store_true",
        help="side by side with pgqueuer and procrastinate (the bench extra)",
    )
    p.add_argument("--rounds", type=int, default=3, help="--compare: interleaved rounds")
    p.add_argument(
        "--no-durable",
        dest="durable",
        action="store_false",
        help="--compare: leave fsync and synchronous_commit off (LocalCluster's defaults)",
    )
    p.add_argument("--peer-batch", type=int, default=25, help="--compare: pgqueuer batch_size")
    args = p.parse_args(argv)
    if args.gap_ms[0] > args.gap_ms[1] or args.gap_ms[0] < 0:
        p.error("--gap-ms: MIN must be >= 0 and <= MAX")
    quick = args.quick
    args.jobs = args.jobs or (1000 if quick else 5000)
    args.latency_jobs = args.latency_jobs or (50 if quick else 200)
    args.idle_s = args.idle_s if args.idle_s is not None else (2.0 if quick else 10.0)
    return args


async def run(args: argparse.Namespace) -> int:
    measure.repo_on_path()
    if args.compare:
        return await compare(args)
    rss = RssSampler()
    async with throwaway_database() as (cluster, admin, server_version):
        dsn = cluster.dsn()
        calib_us = await calibrate(dsn)
        rss.start()
        with logs_to_file(args.log_level) as log_path:
            tput = []
            for analyze in {"fresh": (False,), "analyzed": (True,), "both": (False, True)}[
                args.stats
            ]:
                say(
                    f"Throughput: {args.jobs} no-op jobs, concurrency {args.concurrency}"
                    f"{', after ANALYZE' if analyze else ', planner stats as enqueued'} ..."
                )
                tput.append(await throughput(args, dsn, admin, analyze))
            lat = []
            if not args.skip_latency:
                for listen in (True, False):
                    say(
                        f"Latency ({'LISTEN' if listen else 'poll only'}): idle "
                        f"{args.idle_s:g} s, then {args.latency_jobs} jobs one at a time ..."
                    )
                    lat.append(await latency(args, dsn, admin, listen))
        await rss.stop()
        problems, first = log_problems(log_path)
        log_path.unlink()
    report(args, tput, lat, rss, server_version, calib_us, problems, first)
    return 0


def report(
    args: argparse.Namespace,
    tput: list[dict[str, Any]],
    lat: list[dict[str, Any]],
    rss: RssSampler,
    server_version: str,
    calib_us: float,
    problems: int,
    first: list[str],
) -> None:
    lines = [
        f"$ .venv/bin/python bench/queue_throughput.py {' '.join(sys.argv[1:])}".rstrip(),
        f"machine: {os.cpu_count()} CPU, Python {platform.python_version()}, PostgreSQL "
        f"{server_version.split()[0]} on the SAME machine (LocalCluster: loopback TCP, "
        "fsync=off, synchronous_commit=off)",
        f"calibration: one asyncpg round trip ('select 1') costs {calib_us:.0f} us of this "
        "process's CPU on this machine",
        f"worker: real Runner + Store over asyncpg, concurrency {args.concurrency}, pool "
        f"{args.pool_size}, heartbeat {args.heartbeat:g} s, logs {args.log_level} JSON "
        "(to a file)",
        "",
    ]
    for t in tput:
        stats = "after ANALYZE job_queue" if t["analyze"] else "stats as enqueued (no ANALYZE)"
        lines += [
            f"throughput   {t['jobs_per_s']:,.0f} jobs/s  [{stats}] {t['jobs']:,} pre-enqueued "
            f"no-op jobs, all completed in {t['elapsed_s']:.2f} s",
            f"             worker CPU {t['cpu_s'] / t['jobs'] * 1e6:,.0f} us/job "
            f"({t['cpu_s'] / t['elapsed_s']:.2f} cores); claim call mean "
            f"{t['claim_mean_ms']:.2f} ms x {t['claims']:,} claim calls (one at a time, up to "
            f"{args.claim_batch} jobs each)",
        ]
    for r in lat:
        label = (
            "LISTEN/NOTIFY"
            if r["mode"] == "listen"
            else f"poll only ({args.poll_interval:g} s, max {args.poll_max:g} s)"
        )
        lines.append(
            f"claim->start {label:<26} p50 {r['p50_ms']:7.1f} ms  p95 {r['p95_ms']:7.1f} ms  "
            f"max {r['max_ms']:7.1f} ms  first job {r['first_ms']:7.1f} ms"
        )
        lines.append(
            f"{'':13}{'(from the insert commit instead:':<26} p50 "
            f"{r['commit_p50_ms']:7.1f} ms  p95 {r['commit_p95_ms']:7.1f} ms)"
        )
    if lat:
        lines.append(
            f"             ({lat[0]['n']} jobs per mode, one insert each at random "
            f"{args.gap_ms[0]:g}-{args.gap_ms[1]:g} ms gaps into a worker idle for "
            f"{args.idle_s:g} s; handler start wall clock - created_at)"
        )
    psutil_part = f"; psutil sampled peak {rss.peak / 2**20:.1f} MB" if rss.peak else ""
    lines.append(
        f"peak RSS     {RssSampler.maxrss_mb():.1f} MB (ru_maxrss, whole process){psutil_part}"
    )
    lines.append(f"worker log lines at WARNING or above: {problems}")
    lines += [f"  {line}" for line in first]
    say("")
    say("---- README block " + "-" * 62)
    say("```")
    for line in lines:
        say(line)
    say("```")


# -- side by side -----------------------------------------------------------------------------


async def compare(args: argparse.Namespace) -> int:
    """genworker, pgqueuer and procrastinate drain the same no-op jobs, interleaved."""
    import peers

    peers.quiet()
    async with throwaway_database() as (cluster, admin, server_version):
        dsn = cluster.dsn()
        if args.durable:
            await admin.execute("alter system set fsync = on")
            await admin.execute("alter system set synchronous_commit = on")
            await admin.execute("select pg_reload_conf()")
        pg = PgCpu(cluster.datadir)
        await peers.pgqueuer_install(dsn)
        await peers.procrastinate_install(dsn)
        runs: dict[str, list[dict[str, float]]] = {n: [] for n in PEERS}
        with logs_to_file(args.log_level) as log_path:
            for r in range(args.rounds):
                order = PEERS[r % len(PEERS) :] + PEERS[: r % len(PEERS)]
                for name in order:
                    say(f"round {r + 1}/{args.rounds}: {name} drains {args.jobs:,} no-op jobs ...")
                    runs[name].append(await drain(name, args, dsn, admin, pg))
            lat: dict[str, list[float]] = {}
            if not args.skip_latency:
                say(f"pickup latency: genworker, {args.latency_jobs} probes ...")
                g = await latency(args, dsn, admin, True)
                lat["genworker"] = g["from_commit"]
                say(f"pickup latency: pgqueuer, {args.latency_jobs} probes ...")
                lat["pgqueuer"] = await peers.pgqueuer_pickup(
                    dsn,
                    args.latency_jobs,
                    (args.gap_ms[0] / 1000, args.gap_ms[1] / 1000),
                    args.idle_s,
                    args.peer_batch,
                    args.concurrency,
                )
        problems, first = log_problems(log_path)
        log_path.unlink()
    return compare_report(args, runs, lat, server_version, problems, first)


PEERS = ["genworker", "pgqueuer", "procrastinate"]


async def drain(
    name: str, args: argparse.Namespace, dsn: str, admin: asyncpg.Connection, pg: PgCpu
) -> dict[str, float]:
    import peers

    if name == "genworker":
        t = await throughput(args, dsn, admin, False, pg)
        await admin.execute("delete from job_queue")  # keep every round's table alike
        say(
            f"  {t['jobs_per_s']:,.0f} jobs/s; {t['claims']} claims of {t['claim_batch']:.1f} "
            f"jobs, {t['done_calls']} completion calls of {t['done_batch']:.1f} on average"
        )
        return {"jobs_per_s": t["jobs_per_s"], "cpu_s": t["cpu_s"], "pg_cpu_s": t["pg_cpu_s"]}
    if name == "pgqueuer":
        await peers.pgqueuer_enqueue(dsn, args.jobs)
    else:
        await peers.procrastinate_enqueue(dsn, args.jobs)
    pg0, cpu0 = pg.total(), cpu_s()
    if name == "pgqueuer":
        elapsed = await peers.pgqueuer_drain(dsn, args.jobs, args.peer_batch, args.concurrency)
    else:
        elapsed = await peers.procrastinate_drain(dsn, args.jobs, args.concurrency)
    await asyncio.sleep(0.5)  # the peer's closed backends are reaped: their CPU is counted
    return {
        "jobs_per_s": args.jobs / elapsed,
        "cpu_s": cpu_s() - cpu0,
        "pg_cpu_s": pg.total() - pg0,
    }


def compare_report(
    args: argparse.Namespace,
    runs: dict[str, list[dict[str, float]]],
    lat: dict[str, list[float]],
    server_version: str,
    problems: int,
    first: list[str],
) -> int:
    med = {n: statistics.median(r["jobs_per_s"] for r in rs) for n, rs in runs.items()}
    lines = [
        f"$ .venv/bin/python bench/queue_throughput.py {' '.join(sys.argv[1:])}".rstrip(),
        f"machine: {os.cpu_count()} CPU, Python {platform.python_version()}, PostgreSQL "
        f"{server_version.split()[0]} on the same machine (loopback TCP, fsync "
        f"{'ON, synchronous_commit ON' if args.durable else 'off, synchronous_commit off'})",
        f"{args.jobs:,} pre-enqueued no-op jobs per drain, one worker process each, "
        f"{args.rounds} interleaved rounds (rotating order); median (min-max) jobs/s",
        f"genworker: Runner + Store over asyncpg, concurrency {args.concurrency}, claim batch "
        f"{args.claim_batch}, pool {args.pool_size}; pgqueuer: QueueManager (asyncpg), "
        f"batch_size {args.peer_batch}, max_concurrent_tasks {args.concurrency}; procrastinate: "
        f"psycopg, concurrency {args.concurrency}",
        "",
        f"{'':14}{'jobs/s':>8}  {'(min-max)':<15}{'worker CPU/job':>15}{'PG CPU/job':>12}",
    ]
    for name, rs in runs.items():
        lo, hi = min(r["jobs_per_s"] for r in rs), max(r["jobs_per_s"] for r in rs)
        cpu = statistics.median(r["cpu_s"] for r in rs) / args.jobs * 1e6
        pgc = statistics.median(r["pg_cpu_s"] for r in rs) / args.jobs * 1e6
        lines.append(
            f"{name:<14}{med[name]:>8,.0f}  {f'({lo:,.0f}-{hi:,.0f})':<15}"
            f"{cpu:>12,.0f} us{pgc:>9,.0f} us"
        )
    targets = Targets()
    ratio = med["genworker"] / med["pgqueuer"]
    lines += [
        "",
        f"genworker / pgqueuer      {ratio:.2f}x   (target >= 1.00x: "
        f"{targets.check('drain >= pgqueuer', ratio >= 1.0)})",
        f"genworker / procrastinate {med['genworker'] / med['procrastinate']:.2f}x",
    ]
    if lat:
        p50 = {n: pct(v, 50) * 1000 for n, v in lat.items()}
        for n, v in lat.items():
            lines.append(
                f"pickup {n:<10} p50 {p50[n]:6.1f} ms  p95 {pct(v, 95) * 1000:6.1f} ms  "
                f"max {max(v) * 1000:6.1f} ms  ({len(v)} probes, handler start - enqueue "
                "commit, idle LISTENing worker)"
            )
        verdict = targets.check("pickup p50 <= pgqueuer", p50["genworker"] <= p50["pgqueuer"])
        lines.append(
            f"pickup p50 genworker <= pgqueuer: {verdict} "
            f"({p50['genworker']:.1f} vs {p50['pgqueuer']:.1f} ms)"
        )
    lines.append(f"genworker log lines at WARNING or above: {problems}")
    lines += [f"  {line}" for line in first]
    say("")
    say("---- README block " + "-" * 62)
    say("```")
    for line in lines:
        say(line)
    say("```")
    return targets.exit_code()


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
