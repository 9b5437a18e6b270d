"""`genworker`: run the worker, try the demo, and operate the queue.

Every command reads its configuration from the environment (and `.env`); a bad
configuration prints one message listing every problem and exits 2.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from worker import __version__

if TYPE_CHECKING:  # imported lazily at run time: `genworker --help` stays fast
    from worker.store import Store

COMMANDS = ("run", "demo", "enqueue", "status", "migrate", "requeue")


def _settings(scope: str = "worker") -> Any:
    from worker.config import ConfigError, load_settings

    try:
        return load_settings(scope=scope)  # type: ignore[arg-type]
    except ConfigError as exc:
        print(f"genworker: configuration error\n{exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _logging(settings: Any) -> None:
    from worker.logs import bind_worker, setup_logging

    bind_worker(settings.worker_id)  # every line, from the first, names the process
    setup_logging(settings.log_level, settings.log_format)


def cmd_run(_args: argparse.Namespace) -> int:
    settings = _settings()
    _logging(settings)
    from worker.service import serve

    return asyncio.run(serve(settings))


def cmd_demo(args: argparse.Namespace) -> int:
    from pathlib import Path

    from worker.demo import run_demo

    return asyncio.run(
        run_demo(
            short=args.short,
            chapters=args.chapters,
            port=args.port,
            keep=args.keep,
            output=Path(args.output),
        )
    )


async def _with_store(fn: Callable[[Any], Any]) -> Any:
    settings = _settings("store")
    from worker.service import open_store

    store = await open_store(settings)
    try:
        return await fn(store)
    finally:
        await store.close()


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_enqueue(args: argparse.Namespace) -> int:
    options = json.loads(args.options) if args.options else {}

    async def go(store: Store) -> str:
        if args.chapter:
            return await store.enqueue_chapter(args.chapter, options, args.idempotency_key)
        return await store.enqueue_job(args.type, options, priority=args.priority, lane=args.lane)

    if not args.chapter and not args.type:
        print("genworker enqueue: give --chapter ID or --type TYPE", file=sys.stderr)
        return 2
    _print({"job_id": asyncio.run(_with_store(go))})
    return 0


def cmd_status(_args: argparse.Namespace) -> int:
    _print(asyncio.run(_with_store(lambda s: s.queue_stats())))
    return 0


def cmd_requeue(args: argparse.Namespace) -> int:
    if not (args.ids or args.type or args.since or args.all):
        print("genworker requeue: give job ids, --type, --since or --all", file=sys.stderr)
        return 2
    since = datetime.fromisoformat(args.since) if args.since else None
    ids = asyncio.run(
        _with_store(lambda s: s.requeue_failed(args.ids or None, args.type, since, args.limit))
    )
    _print({"requeued": ids, "count": len(ids)})
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    import os

    from dotenv import load_dotenv

    load_dotenv()
    dsn = args.database_url or os.environ.get("DATABASE_URL")
    if not dsn:
        print(
            "genworker: configuration error\nDATABASE_URL: required for migrate; expected "
            "postgresql://user:password@host:5432/postgres (a direct or session-pooler "
            "connection)",
            file=sys.stderr,
        )
        return 2
    from worker.migrate import apply_bootstrap, apply_migrations, pending_migrations

    async def go() -> list[str]:
        import asyncpg

        conn = await asyncpg.connect(dsn, statement_cache_size=0)
        try:
            if args.bootstrap:
                await apply_bootstrap(conn)
            if args.dry_run:
                return [m.version for m in await pending_migrations(conn)]
            return await apply_migrations(conn)
        finally:
            await conn.close()

    versions = asyncio.run(go())
    _print({"pending" if args.dry_run else "applied": versions})
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="genworker",
        description="A Supabase job-queue worker that streams Gemini "
        "chapters into Postgres. Configuration comes from the environment (see .env.example).",
    )
    p.add_argument("--version", action="version", version=f"genworker {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser(
        "run",
        help="run the production worker until SIGTERM",
        description="Claim and run jobs until SIGTERM/SIGINT, then drain for "
        "SHUTDOWN_GRACE_S and release what is left. Serves /health, /ready, "
        "/status and /metrics on HEALTH_CHECK_PORT.",
    )
    run.set_defaults(fn=cmd_run)

    demo = sub.add_parser(
        "demo",
        help="embedded Postgres + real worker + live progress",
        description="Start an embedded PostgreSQL, apply the migrations, "
        "seed a demo story and run the real worker on its chapters with "
        "live progress bars. Uses the offline model unless GEMINI_API_KEY "
        "is set. Ctrl-C stops cleanly: chapters are handed back, the database is "
        "stopped and its folder removed. Exit codes: 0 every chapter completed, "
        "1 a chapter failed, 130 interrupted by Ctrl-C.",
    )
    demo.add_argument("--short", action="store_true", help="small chapters (for CI)")
    demo.add_argument(
        "--chapters",
        type=int,
        default=3,
        choices=(1, 2, 3),
        help="how many chapters to write (default 3)",
    )
    demo.add_argument(
        "--port", type=int, default=None, help="health port (default HEALTH_CHECK_PORT or 10000)"
    )
    demo.add_argument(
        "--keep",
        action="store_true",
        help="after the chapters, keep the worker and database up and print DATABASE_URL "
        "so the other commands can be tried against it (until Ctrl-C, which then exits 0)",
    )
    demo.add_argument(
        "--output", default="demo-output", help="folder for the text (default demo-output)"
    )
    demo.set_defaults(fn=cmd_demo)

    enq = sub.add_parser(
        "enqueue",
        help="enqueue a chapter (or any) job as an operator",
        description="Enqueue a chapter_generation job on behalf of the "
        "chapter's owner (--chapter), or a job of any type (--type).",
    )
    enq.add_argument("--chapter", help="chapter id (uuid)")
    enq.add_argument("--type", help="job type, e.g. noop")
    enq.add_argument(
        "--options",
        help="JSON: chapter options or the job payload, e.g. '{\"target_words\": 1200}'",
    )
    enq.add_argument("--idempotency-key", help="same key, same job")
    enq.add_argument("--priority", type=int, default=0, help="higher runs first")
    enq.add_argument("--lane", default="default", help="job lane")
    enq.set_defaults(fn=cmd_enqueue)

    st = sub.add_parser(
        "status",
        help="queue statistics as JSON",
        description="Counts by status and type, oldest pending age, run time "
        "average and p95 over the last hour.",
    )
    st.set_defaults(fn=cmd_status)

    mig = sub.add_parser(
        "migrate",
        help="apply supabase/migrations to DATABASE_URL",
        description="Apply pending migrations, recording them in "
        "supabase_migrations.schema_migrations as the Supabase CLI does.",
    )
    mig.add_argument("--database-url", help="overrides DATABASE_URL")
    mig.add_argument(
        "--bootstrap",
        action="store_true",
        help="first create what Supabase provides (roles, auth schema, "
        "publication): for plain PostgreSQL only",
    )
    mig.add_argument("--dry-run", action="store_true", help="list pending migrations only")
    mig.set_defaults(fn=cmd_migrate)

    rq = sub.add_parser(
        "requeue",
        help="send failed jobs back to the queue",
        description="Failed jobs go back to pending with their retries reset "
        "and their checkpoint kept, by id or by filter.",
    )
    rq.add_argument("ids", nargs="*", help="job ids")
    rq.add_argument("--type", help="only this job type")
    rq.add_argument("--since", help="only jobs failed at or after this ISO time")
    rq.add_argument("--all", action="store_true", help="every failed job (up to --limit)")
    rq.add_argument("--limit", type=int, default=1000, help="at most this many (default 1000)")
    rq.set_defaults(fn=cmd_requeue)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
