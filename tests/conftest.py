"""Shared fixtures: a real PostgreSQL with the Supabase bootstrap and our migrations."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from tests.support.database import PgTestServer, start_server


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgTestServer]:
    server = start_server()
    yield server
    if server.cluster is not None:
        server.cluster.destroy()


@pytest.fixture
async def db_dsn(pg_server: PgTestServer) -> AsyncIterator[str]:
    """A fresh database (bootstrap + migrations applied) for this test only."""
    dsn = await pg_server.create_database()
    yield dsn
    await pg_server.drop_database(dsn)


@pytest.fixture
async def conn(db_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    """A superuser connection to the test database (the `postgres` role, as on Supabase)."""
    c = await asyncpg.connect(db_dsn)
    yield c
    await c.close()
