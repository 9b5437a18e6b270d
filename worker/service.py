"""Assembles one worker process from Settings: store, model, runner, health server, signals.

Exit codes: 0 after a clean shutdown (SIGTERM/SIGINT), 1 when a side task died or
the store could not be opened (the platform restarts the process); a second
signal exits at once with 128 + signal number.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from worker.config import Settings
from worker.generation.budget import FleetBudget
from worker.generation.chapter import ChapterHandler, GenerationConfig
from worker.generation.embedding_job import ChapterEmbeddingHandler
from worker.generation.embeddings import Embedder
from worker.generation.memory import MemoryConfig, StoryMemory
from worker.generation.model import RequestBudget, TextModel
from worker.handlers import build_handlers
from worker.health import WATCHDOG_LIMIT_S, LoopMonitor, start_health_server
from worker.logs import bind_worker
from worker.metrics import Metrics
from worker.runner import Runner, RunnerConfig
from worker.store import Store

log = logging.getLogger("worker")


async def open_store(settings: Settings) -> Store:
    """Over asyncpg when DATABASE_URL is set, else over REST (poll-only)."""
    if settings.store_kind == "postgres":
        from worker.store.postgres import PostgresTransport

        assert settings.database_url
        pool_size = min(20, settings.worker_concurrency + 2)
        return await Store(PostgresTransport(settings.database_url, pool_size=pool_size)).open()
    from worker.store.supabase import SupabaseTransport

    assert settings.supabase_url and settings.supabase_service_role_key
    return await Store(
        SupabaseTransport(
            settings.supabase_url,
            settings.supabase_service_role_key,
            concurrency=settings.worker_concurrency,
        )
    ).open()


def build_model(
    settings: Settings, *, offline_delay_s: float = 0.03, budget: RequestBudget | None = None
) -> TextModel:
    if settings.generation_provider == "offline":
        from worker.generation.offline import OfflineModel

        return OfflineModel(chunk_delay_s=offline_delay_s)
    from worker.generation.gemini import GeminiModel

    return GeminiModel(
        api_key=settings.gemini_api_key or "",
        base_url=settings.gemini_base_url,
        connect_timeout_s=settings.gemini_connect_timeout_s,
        idle_timeout_s=settings.gemini_idle_timeout_s,
        request_timeout_s=settings.gemini_request_timeout_s,
        max_concurrent_streams=settings.gemini_max_concurrent_streams,
        requests_per_minute=settings.gemini_requests_per_minute or None,
        thinking_level=None
        if settings.gemini_thinking_level == "default"
        else settings.gemini_thinking_level.upper(),
        budget=budget,
    )


def build_embedder(settings: Settings) -> Embedder:
    """Story memory's embedder: Gemini's, or hashed word features with the offline model."""
    if settings.generation_provider == "offline":
        from worker.generation.embeddings import HashedEmbedder

        return HashedEmbedder()
    from worker.generation.gemini_embed import GeminiEmbedder

    return GeminiEmbedder(
        api_key=settings.gemini_api_key or "",
        model=settings.gemini_embedding_model,
        base_url=settings.gemini_base_url,
        connect_timeout_s=settings.gemini_connect_timeout_s,
        request_timeout_s=min(settings.gemini_request_timeout_s, 120.0),
    )


def memory_config(settings: Settings) -> MemoryConfig:
    return MemoryConfig(
        top_k=settings.memory_top_k,
        min_similarity=settings.memory_min_similarity,
        max_tokens=settings.memory_max_tokens,
    )


def runner_config(settings: Settings) -> RunnerConfig:
    return RunnerConfig(
        worker_id=settings.worker_id,
        concurrency=settings.worker_concurrency,
        claim_batch_max=settings.claim_batch_max,
        job_types=settings.job_types,
        job_lanes=settings.job_lanes,
        # Offline workers are not held back by a Gemini cool-down.
        default_model=settings.gemini_model if settings.generation_provider == "gemini" else None,
        poll_interval_s=settings.poll_interval_ms / 1000,
        poll_max_interval_s=settings.poll_max_interval_ms / 1000,
        heartbeat_interval_s=settings.heartbeat_interval_s,
        max_retries=settings.max_retries,
        retry_base_s=settings.retry_base_s,
        retry_max_s=settings.retry_max_s,
        shutdown_grace_s=settings.shutdown_grace_s,
    )


def generation_config(settings: Settings) -> GenerationConfig:
    return GenerationConfig(
        default_model=settings.gemini_model,
        allowed_models=settings.gemini_allowed_models,
        flush_interval_s=settings.flush_interval_ms / 1000,
        flush_chars=settings.flush_chars,
        section_retries=settings.gemini_section_retries,
        max_rate_limit_wait_s=settings.gemini_max_rate_limit_wait_s,
        tail_chars=settings.context_tail_chars,
        context_max_tokens=settings.context_max_tokens,
    )


def install_exception_hooks(loop: asyncio.AbstractEventLoop) -> None:
    """Unhandled errors anywhere are logged with their context, never lost."""

    def loop_handler(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        log.error(
            "unhandled error in event loop: %s",
            context.get("message"),
            exc_info=exc,
            extra={
                "context": {
                    k: repr(v) for k, v in context.items() if k not in ("exception", "message")
                }
            },
        )

    def sys_hook(tp: type[BaseException], value: BaseException, tb: Any) -> None:
        log.critical("uncaught exception", exc_info=(tp, value, tb))

    loop.set_exception_handler(loop_handler)
    sys.excepthook = sys_hook


def install_signal_handlers(loop: asyncio.AbstractEventLoop, stop: Callable[[], None]) -> None:
    received: list[int] = []

    def on_signal(signum: int) -> None:
        if received:
            log.warning("second signal %s: exiting at once", signal.Signals(signum).name)
            os._exit(128 + signum)
        received.append(signum)
        log.info(
            "%s received: stopping claims, draining in-flight jobs", signal.Signals(signum).name
        )
        stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)


class Worker:
    """The running process: built by ``start()``, torn down by ``close()``."""

    def __init__(
        self,
        settings: Settings,
        *,
        model: TextModel | None = None,
        embedder: Embedder | None = None,
    ) -> None:
        self.settings = settings
        self._model = model
        self._embedder = embedder
        self.metrics = Metrics()
        self.store: Store | None = None
        self.model: TextModel | None = None
        self.embedder: Embedder | None = None
        self.runner: Runner | None = None
        self.budget: FleetBudget | None = None
        self.monitor = LoopMonitor()
        self._health: Any = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> Runner:
        s = self.settings
        bind_worker(s.worker_id)
        self.store = await open_store(s)
        if s.generation_provider == "gemini" and s.gemini_shared_budget == "on":
            self.budget = FleetBudget(
                self.store, max_wait_s=s.gemini_max_rate_limit_wait_s, metrics=self.metrics
            )
            self._tasks.append(asyncio.create_task(self.budget.watch(), name="budget-watch"))
        self.model = self._model or build_model(s, budget=self.budget)
        self.model.open()
        self.embedder = self._embedder or build_embedder(s)
        self.embedder.open()
        memory = StoryMemory(self.embedder, memory_config(s))
        handlers = build_handlers(
            ChapterHandler(self.model, generation_config(s), memory),
            ChapterEmbeddingHandler(self.embedder),
        )
        self.runner = Runner(self.store, runner_config(s), handlers, self.metrics)
        self._tasks.append(asyncio.create_task(self.monitor.run(), name="loop-monitor"))
        self.monitor.start_watchdog(WATCHDOG_LIMIT_S)
        try:
            self._health = await start_health_server(
                self.runner, self.monitor, s.health_host, s.health_port, budget=self.budget
            )
        except OSError as exc:
            log.error("health server could not bind %s:%s: %s", s.health_host, s.health_port, exc)
            raise
        log.info(
            "worker started",
            extra={"settings": s.safe_dict(), "store": self.store.name, "model": self.model.name},
        )
        return self.runner

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._health is not None:
            await self._health.cleanup()
        if self.model is not None:
            await self.model.aclose()
        if self.embedder is not None:
            await self.embedder.aclose()
        if self.store is not None:
            await self.store.close()


async def serve(settings: Settings) -> int:
    """`genworker run`: work until SIGTERM/SIGINT, then drain and exit."""
    loop = asyncio.get_running_loop()
    install_exception_hooks(loop)
    worker = Worker(settings)
    try:
        runner = await worker.start()
    except Exception as exc:
        log.critical("could not start: %s", exc)
        await worker.close()
        return 1
    install_signal_handlers(loop, runner.stop)
    code = 0
    try:
        await runner.run()
    except Exception as exc:
        log.critical("worker stopped on a fatal error: %s", exc)
        code = 1
    finally:
        await worker.close()
    log.info("worker exited", extra={"exit_code": code})
    return code
