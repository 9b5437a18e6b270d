"""Assembles the dashboard: its own store, the guard, templates, routes; serves until a signal.

The dashboard is a process of its own (``genworker dashboard``), never part of a worker: it
reads the database through the same configuration and SQL functions, and a worker keeps
running whatever happens to it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

from worker.config import Settings, where
from worker.dashboard.security import (
    LOGIN_FAILURE_DELAY_S,
    Guard,
    guard_middleware,
    headers_middleware,
)
from worker.dashboard.views import GUARD, INFO, STORE, TEMPLATES, add_routes, make_templates
from worker.store import Store

log = logging.getLogger("worker.dashboard")
STATIC = Path(__file__).with_name("static")


def build_app(
    store: Store,
    *,
    token: str | None,
    info: dict[str, str] | None = None,
    login_failure_delay_s: float = LOGIN_FAILURE_DELAY_S,
) -> web.Application:
    """The aiohttp application over an open store (the caller closes it)."""
    guard = Guard(token, failure_delay_s=login_failure_delay_s)
    app = web.Application(
        middlewares=[headers_middleware, guard_middleware(guard)], client_max_size=64 * 1024
    )
    app[STORE] = store
    app[GUARD] = guard
    app[TEMPLATES] = make_templates()
    app[INFO] = dict(info or {})
    add_routes(app)
    app.router.add_static("/static/", STATIC)
    return app


def describe(settings: Settings) -> dict[str, str]:
    """What the page footer shows about where it is looking: never a password or key."""
    if settings.store_kind == "postgres" and settings.database_url:
        shown = where(settings.database_url)
    else:
        shown = urlsplit(settings.supabase_url or "").hostname or "?"
    return {"app_env": settings.app_env, "store": settings.store_kind, "database": shown}


async def open_dashboard_store(settings: Settings) -> Store:
    """A small store of the configured kind: a few connections and no LISTEN."""
    if settings.store_kind == "postgres":
        from worker.store.postgres import PostgresTransport

        assert settings.database_url
        return await Store(
            PostgresTransport(settings.database_url, pool_size=4, listen=False)
        ).open()
    from worker.store.supabase import SupabaseTransport

    assert settings.supabase_url and settings.supabase_service_role_key
    return await Store(
        SupabaseTransport(settings.supabase_url, settings.supabase_service_role_key, concurrency=4)
    ).open()


async def serve(settings: Settings, *, host: str, port: int) -> int:
    """Serve until SIGINT/SIGTERM; 0 after a clean stop."""
    store = await open_dashboard_store(settings)
    runner = web.AppRunner(
        build_app(store, token=settings.dashboard_token, info=describe(settings)),
        access_log=None,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        login = "token login" if settings.dashboard_token else "no login (loopback only)"
        log.info("dashboard on http://%s:%d/ (%s)", host, port, login)
        print(f"genworker dashboard: http://{host}:{port}/ ({login}); Ctrl-C stops it", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()
        await store.close()
    return 0
