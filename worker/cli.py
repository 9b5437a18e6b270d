"""`genworker`: run the worker, try the demo, and operate the queue.

Every command reads its configuration from the environment (and `.env`); a bad
configuration prints one message listing every problem and exits 2. Any other expected
failure is one line on stderr naming what to do: exit 2 for a wrong command line, 1 for
a failure while running (see worker/cli_errors.py); ``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import traceback
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

from worker import __version__

if TYPE_CHECKING:  # imported lazily at run time: `genworker --help` stays fast
    from worker.store import Store
    from worker.store.base import Job

_T = TypeVar("_T")

COMMANDS = (
    "run",
    "demo",
    "enqueue",
    "status",
    "show",
    "cancel",
    "pause",
    "resume",
    "requeue",
    "migrate",
    "dashboard",
    "embed",
)


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


async def _with_store(fn: Callable[[Store], Awaitable[_T]]) -> _T:
    settings = _settings("store")
    from worker.cli_errors import connection_failed, where
    from worker.service import open_store

    target = where(settings.database_url or settings.supabase_url or "")
    try:
        store = await open_store(settings)
    except Exception as exc:
        if isinstance(exc, OSError | TimeoutError) or hasattr(exc, "sqlstate"):
            raise connection_failed(target, exc) from exc
        raise
    try:
        return await fn(store)
    finally:
        await store.close()


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_enqueue(args: argparse.Namespace) -> int:
    from worker.cli_errors import CommandFailed, detail
    from worker.store.base import ConflictError

    options = args.options or {}

    async def go(store: Store) -> str:
        if args.chapter:
            try:
                return await store.enqueue_chapter(args.chapter, options, args.idempotency_key)
            except ConflictError as exc:
                active = _ACTIVE_JOB.search(str(exc))
                if not active:
                    raise
                raise CommandFailed(
                    f"{detail(exc)}: cancel it with `genworker cancel --job {active.group(1)}`"
                    ", or wait for it to finish"
                ) from exc
        return await store.enqueue_job(args.type, options, priority=args.priority, lane=args.lane)

    if not args.chapter and not args.type:
        raise UsageError("give --chapter ID or --type TYPE")
    _print({"job_id": asyncio.run(_with_store(go))})
    return 0


def cmd_status(_args: argparse.Namespace) -> int:
    _print(asyncio.run(_with_store(lambda s: s.queue_stats())))
    return 0


def cmd_requeue(args: argparse.Namespace) -> int:
    if not (args.ids or args.type or args.since or args.all):
        raise UsageError("give job ids, --type, --since or --all")
    ids = asyncio.run(
        _with_store(lambda s: s.requeue_failed(args.ids or None, args.type, args.since, args.limit))
    )
    _print({"requeued": ids, "count": len(ids)})
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    """Queue chapter_embedding jobs: a story's chapters, or every chapter missing them."""
    from worker.cli_errors import CommandFailed
    from worker.generation.embeddings import HashedEmbedder
    from worker.store.base import MissingFunctionError

    if bool(args.story) == bool(args.all_missing):
        raise UsageError("give --story ID or --all-missing (one of them)")
    settings = _settings("store")
    offline = settings.generation_provider == "offline"
    model = HashedEmbedder.model if offline else settings.gemini_embedding_model

    async def go(store: Store) -> list[str]:
        return await store.enqueue_chapter_embeddings(
            args.story, only_missing=args.all_missing, model=model, limit=args.limit
        )

    try:
        ids = asyncio.run(_with_store(go))
    except MissingFunctionError:
        raise CommandFailed(
            "story memory is not installed in this database (pgvector is not available "
            'there); see README "Story memory"'
        ) from None
    _print({"queued": ids, "count": len(ids)})
    return 0


# What each control applies to, for the message when it does not (SQL: genworker_control_job).
_CONTROLS = {
    "cancel": ("cancelled", "pending, processing or paused"),
    "pause": ("paused", "pending or processing"),
    "resume": ("resumed", "paused"),
}


def cmd_control(args: argparse.Namespace) -> int:
    """cancel | pause | resume: any user's job, as an operator."""
    from worker.cli_errors import CommandFailed

    action = args.command

    async def go(store: Store) -> tuple[bool, Job | None]:
        changed = await store.control_job(args.job, action)
        return changed, await store.get_job(args.job)

    changed, job = asyncio.run(_with_store(go))
    status = job.status if job is not None else "gone"
    if not changed:
        done, applies_to = _CONTROLS[action]
        raise CommandFailed(
            f"job {args.job} is {status}: only {applies_to} jobs can be {done}; nothing changed"
        )
    _print({"job_id": args.job, "action": action, "status": status})
    return 0


def _state_line(ch: dict[str, Any]) -> str:
    step = ch.get("current_step") or ""
    parts = [
        f"chapter {ch['number']} {(ch['title'] or '')[:120]!r}: {ch['status']}",
        f"{ch['progress']}%",
        *([step] if step and step != ch["status"] else []),
        f"{ch['word_count']} words",
        f"job {ch['job_id']} ({ch['job_status']})" if ch.get("job_id") else "no job yet",
    ]
    line = ", ".join(parts)
    if ch.get("error_message"):
        line += f"; error: {ch['error_message'][:300]}"
    return line


def _chapter_outcome(ch: dict[str, Any]) -> int:
    from worker.cli_errors import CommandFailed

    if ch["status"] in ("failed", "cancelled"):
        reason = f": {ch['error_message'][:300]}" if ch.get("error_message") else ""
        raise CommandFailed(f"chapter {ch['chapter_id']} {ch['status']}{reason}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """State on stderr, text on stdout: `genworker show --chapter ID > chapter.md` keeps the
    text alone, and a terminal shows both."""
    from worker.cli_errors import CommandFailed

    async def go(store: Store) -> int:
        if args.follow:
            return await _follow(store, args.chapter, args.interval)
        ch = await store.read_chapter(args.chapter)
        if ch is None:
            raise CommandFailed(f"chapter {args.chapter} not found")
        if args.json:
            _print(ch)
            return 0
        print(_state_line(ch), file=sys.stderr, flush=True)
        if ch["content"]:
            print(ch["content"])
        return 0

    return asyncio.run(_with_store(go))


async def _follow(store: Store, chapter_id: str, interval: float) -> int:
    """Print the text as it is written, until the chapter reaches a terminal state.

    Each poll asks only for the characters after the ones already printed. A section
    retried from its start shortens the text; that is announced and printing goes on
    from the new end.
    """
    from worker.cli_errors import CommandFailed
    from worker.demo import TERMINAL

    offset, last_state, ends_with_newline = 0, "", True
    while True:
        ch = await store.read_chapter(chapter_id, from_char=offset)
        if ch is None:
            raise CommandFailed(f"chapter {chapter_id} not found")
        if ch["content_length"] < offset:
            print(
                f"\n[the text was cut back to {ch['content_length']} characters: a section is "
                "being written again]",
                file=sys.stderr,
                flush=True,
            )
            offset = ch["content_length"]
            continue
        state = _state_line(ch)
        if state != last_state:
            print(("" if ends_with_newline else "\n") + f"[{state}]", file=sys.stderr, flush=True)
            last_state = state
            if ch["status"] == "draft" and not ch.get("job_id"):
                print(
                    f"[waiting: enqueue it with `genworker enqueue --chapter {chapter_id}`]",
                    file=sys.stderr,
                    flush=True,
                )
        text = ch["content"] or ""
        if text:
            sys.stdout.write(text)
            sys.stdout.flush()
            offset += len(text)
            ends_with_newline = text.endswith("\n")
        if ch["status"] in TERMINAL:
            if not ends_with_newline:
                print()
            return _chapter_outcome(ch)
        await asyncio.sleep(interval)


def cmd_dashboard(args: argparse.Namespace) -> int:
    import os

    overrides = {"DASHBOARD_HOST": args.host, "DASHBOARD_PORT": args.port}
    os.environ.update({k: str(v) for k, v in overrides.items() if v is not None})
    settings = _settings("dashboard")
    _logging(settings)
    from worker.dashboard.app import serve

    return asyncio.run(serve(settings, host=settings.dashboard_host, port=settings.dashboard_port))


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
    from worker.config import Invalid, postgres_url

    try:
        postgres_url(dsn)
    except Invalid as exc:
        raise UsageError(f"DATABASE_URL {exc}") from None
    from worker.cli_errors import CommandFailed, connection_failed, detail, where
    from worker.migrate import (
        MigrationFailed,
        apply_bootstrap,
        apply_migrations,
        is_supabase_like,
        pending_migrations,
    )

    async def go() -> list[str]:
        import asyncpg

        try:
            conn = await asyncpg.connect(dsn, statement_cache_size=0, timeout=15)
        except (OSError, TimeoutError, asyncpg.PostgresError) as exc:
            raise connection_failed(where(dsn), exc) from exc
        try:
            if args.bootstrap and not args.dry_run:
                await apply_bootstrap(conn)
            pending = await pending_migrations(conn)
            if pending and not args.bootstrap and not await is_supabase_like(conn):
                raise UsageError(
                    "this database lacks what Supabase provides (the auth schema and the "
                    "anon/authenticated/service_role roles): on plain PostgreSQL run "
                    "`genworker migrate --bootstrap`"
                )
            if args.dry_run:
                return [m.path.name for m in pending]
            try:
                files = {m.version: m.path.name for m in pending}
                return [files[version] for version in await apply_migrations(conn)]
            except MigrationFailed as exc:
                raise CommandFailed(
                    f"migration {exc.migration.path.name} failed and was rolled back "
                    f"({detail(exc.__cause__ or exc)}); the ones before it are applied"
                ) from exc
        finally:
            await conn.close()

    names = asyncio.run(go())
    _print({"pending" if args.dry_run else "applied": names})
    return 0


# -- arguments: checked before anything connects, so a typo costs nothing -------------------
_ACTIVE_JOB = re.compile(r"active generation job ([0-9a-f-]{36})")


class UsageError(Exception):
    """The command line is wrong: one line, exit 2."""


class Parser(argparse.ArgumentParser):
    """argparse, but a mistake is one line naming the help to read (exit 2)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def _shown(text: str) -> str:
    return repr(text if len(text) <= 60 else text[:57] + "...")


def uuid_arg(text: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a uuid: {_shown(text)} (expected e.g. 00000000-0000-4000-8000-00000000c001)"
        ) from None


def json_object_arg(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError as exc:
        msg = getattr(exc, "msg", "invalid")
        raise argparse.ArgumentTypeError(
            f"not valid JSON ({msg} at character {getattr(exc, 'pos', '?')}); quote it for "
            """the shell, e.g. '{"target_words": 1200}'"""
        ) from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(
            f"must be a JSON object, e.g. '{{\"sections\": 3}}', not {type(value).__name__}"
        )
    return value


def since_arg(text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not an ISO date or time: {_shown(text)} (e.g. 2026-11-22 or "
            "2026-11-22T09:00:00+00:00)"
        ) from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, not {_shown(text)}")
    return value


def interval_arg(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0.05 <= value <= 60:
        raise argparse.ArgumentTypeError(f"must be 0.05 to 60 seconds, not {_shown(text)}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = Parser(
        prog="genworker",
        description="A Supabase job-queue worker that streams Gemini "
        "chapters into Postgres. Configuration comes from the environment (see .env.example). "
        "Exit codes: 0 done, 1 failed while running, 2 wrong command line or configuration, "
        "130 Ctrl-C.",
    )
    p.add_argument("--version", action="version", version=f"genworker {__version__}")
    p.add_argument(
        "--debug", action="store_true", help="show the traceback of a failure (for bug reports)"
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

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
    enq.add_argument("--chapter", type=uuid_arg, help="chapter id (uuid)")
    enq.add_argument("--type", help="job type, e.g. noop")
    enq.add_argument(
        "--options",
        type=json_object_arg,
        help="JSON object: chapter options or the job payload, e.g. '{\"target_words\": 1200}'",
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
    mig.add_argument(
        "--dry-run",
        action="store_true",
        help="list the pending migration files and change nothing (not even --bootstrap)",
    )
    mig.set_defaults(fn=cmd_migrate)

    rq = sub.add_parser(
        "requeue",
        help="send failed jobs back to the queue",
        description="Failed jobs go back to pending with their retries reset "
        "and their checkpoint kept, by id or by filter.",
    )
    rq.add_argument("ids", nargs="*", type=uuid_arg, help="job ids")
    rq.add_argument("--type", help="only this job type")
    rq.add_argument(
        "--since",
        type=since_arg,
        help="only jobs failed at or after this ISO date/time (UTC unless it names a zone)",
    )
    rq.add_argument("--all", action="store_true", help="every failed job (up to --limit)")
    rq.add_argument(
        "--limit", type=positive_int, default=1000, help="at most this many (default 1000)"
    )
    rq.set_defaults(fn=cmd_requeue)

    emb = sub.add_parser(
        "embed",
        help="queue story-memory embedding jobs for existing chapters",
        description="Queue chapter_embedding jobs: every completed chapter of one story "
        "(--story, e.g. after changing GEMINI_EMBEDDING_MODEL), or every completed chapter "
        "without current passages (--all-missing). A job already waiting is reused.",
    )
    emb.add_argument("--story", type=uuid_arg, help="story id (uuid)")
    emb.add_argument("--all-missing", action="store_true", help="every chapter missing passages")
    emb.add_argument(
        "--limit", type=positive_int, default=1000, help="at most this many (default 1000)"
    )
    emb.set_defaults(fn=cmd_embed)

    for action, what in (
        ("cancel", "cancel a pending, processing or paused job (its chapter keeps its text)"),
        ("pause", "pause a pending or processing job (it keeps its checkpoint)"),
        ("resume", "put a paused job back in the queue (no attempt used)"),
    ):
        ctl = sub.add_parser(
            action,
            help=what.split(" (")[0],
            description=f"As an operator, {what}; any user's job. A processing job's "
            "worker stops at its next heartbeat. Exit 1 when the job is not in a state "
            "this applies to.",
        )
        ctl.add_argument("--job", type=uuid_arg, required=True, help="job id (uuid)")
        ctl.set_defaults(fn=cmd_control)

    show = sub.add_parser(
        "show",
        help="a chapter's state, progress and text (--follow: live)",
        description="Print a chapter's state and progress (stderr) and its text so far "
        "(stdout). With --follow, print the text as it is written until the chapter "
        "completes (exit 0), fails or is cancelled (exit 1).",
    )
    show.add_argument("--chapter", type=uuid_arg, required=True, help="chapter id (uuid)")
    show.add_argument(
        "--follow", "-f", action="store_true", help="stream the text until a final state"
    )
    show.add_argument(
        "--interval",
        type=interval_arg,
        default=0.5,
        help="seconds between looks with --follow (default 0.5)",
    )
    show.add_argument("--json", action="store_true", help="the whole row as JSON (not --follow)")
    show.set_defaults(fn=cmd_show)

    dash = sub.add_parser(
        "dashboard",
        help="the operator web dashboard (127.0.0.1:10001 by default)",
        description="Serve the queue dashboard: overview, jobs, job detail, live progress, "
        "and confirmed cancel/pause/resume/retry. Binds DASHBOARD_HOST (127.0.0.1); any "
        "other address requires DASHBOARD_TOKEN.",
    )
    dash.add_argument("--host", help="overrides DASHBOARD_HOST")
    dash.add_argument("--port", type=int, help="overrides DASHBOARD_PORT")
    dash.set_defaults(fn=cmd_dashboard)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    prog = f"genworker {args.command}"
    try:
        return int(args.fn(args) or 0)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except UsageError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"{prog}: {exc} (see `{prog} --help`)", file=sys.stderr)
        return 2
    except Exception as exc:
        from worker.cli_errors import EXIT_RUNTIME, detail, explain

        if args.debug:
            traceback.print_exc()
        failure = explain(exc)
        if failure is None:
            print(
                f"{prog}: unexpected error {type(exc).__name__}: {detail(exc)} (run "
                f"`genworker --debug {args.command} ...` for the traceback and report it)",
                file=sys.stderr,
            )
            return EXIT_RUNTIME
        print(f"{prog}: {failure}", file=sys.stderr)
        return failure.code


if __name__ == "__main__":
    raise SystemExit(main())
