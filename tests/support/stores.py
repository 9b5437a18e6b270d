"""Open the Store over either transport on a test database (REST through the PostgREST gateway)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from tests.support.postgrest_gateway import make_token, start_gateway
from worker.store import Store
from worker.store.postgres import PostgresTransport
from worker.store.supabase import SupabaseTransport

JWT_SECRET = "test-jwt-secret-with-at-least-32-characters!"
ADAPTERS = ("postgres", "supabase")


@asynccontextmanager
async def open_store(kind: str, dsn: str, *, concurrency: int = 50) -> AsyncIterator[Store]:
    if kind == "postgres":
        store = await Store(PostgresTransport(dsn, pool_size=min(20, concurrency + 2))).open()
        try:
            yield store
        finally:
            await store.close()
        return
    gateway = await start_gateway(dsn, JWT_SECRET)
    rest = await Store(
        SupabaseTransport(
            gateway.url, make_token(JWT_SECRET, "service_role"), concurrency=concurrency
        )
    ).open()
    rest.gateway = gateway  # type: ignore[attr-defined]
    try:
        yield rest
    finally:
        await rest.close()
        await gateway.close()
