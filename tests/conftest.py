"""Shared fixtures: a real PostgreSQL with the Supabase bootstrap and our migrations."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator

import asyncpg
import pytest

from tests.support.database import PgTestServer, start_server
from worker import logs
from worker.logs import setup_logging


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


@pytest.fixture
def json_logs(capsys: pytest.CaptureFixture[str]) -> Iterator[pytest.CaptureFixture[str]]:
    """The worker's own stdout handler (JSON lines), removed again afterwards."""
    setup_logging("INFO", "json")
    yield capsys
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_genworker_handler", False)]:
        root.removeHandler(handler)
    logs.bind_worker(None)
