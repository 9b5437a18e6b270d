"""Dashboard fixtures: the real app over a real Store (asyncpg), driven by aiohttp's test client."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from worker.dashboard.app import build_app
from worker.store import Store
from worker.store.postgres import PostgresTransport

TOKEN = "dashboard-test-token-0123456789"


@asynccontextmanager
async def dashboard_client(
    dsn: str, *, token: str | None = None, **kwargs: Any
) -> AsyncIterator[TestClient]:
    store = await Store(PostgresTransport(dsn, pool_size=3, listen=False)).open()
    app = build_app(store, token=token, login_failure_delay_s=0, **kwargs)
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()
        await store.close()


@pytest.fixture
async def client(db_dsn: str) -> AsyncIterator[TestClient]:
    """The dashboard without a token (loopback use)."""
    async with dashboard_client(
        db_dsn, info={"app_env": "test", "store": "postgres", "database": "localhost"}
    ) as c:
        yield c


@pytest.fixture
async def token_client(db_dsn: str) -> AsyncIterator[TestClient]:
    """The dashboard with DASHBOARD_TOKEN set (login required)."""
    async with dashboard_client(db_dsn, token=TOKEN) as c:
        yield c


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, "no CSRF field on the page"
    return match.group(1)


@pytest.fixture
def csrf() -> Callable[[str], str]:
    return csrf_of
