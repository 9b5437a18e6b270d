"""Fixtures for the Store contract: one ``store`` fixture, parametrized over both adapters.

- ``store["postgres"]``: ``Store(PostgresTransport(db_dsn))`` (asyncpg pool + LISTEN).
- ``store["supabase"]``: ``Store(SupabaseTransport(...))``, the real supabase-py client
  talking to the test PostgREST gateway (``tests/support/postgrest_gateway.py``) over the
  same database, with a service_role JWT as its key.

Retry waits (tenacity in ``transport_retry`` and supabase-py's own GET retry) are set to zero,
so retry tests count requests instead of sleeping.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import postgrest._async.request_builder as postgrest_rb
import pytest
import tenacity

from tests.support.postgrest_gateway import Gateway, make_token, start_gateway
from worker.store import Store
from worker.store.postgres import PostgresTransport
from worker.store.supabase import SupabaseTransport

JWT_SECRET = "store-contract-secret-at-least-32-bytes-long"
ADAPTERS = ("postgres", "supabase")


@pytest.fixture(autouse=True)
def _no_retry_waits(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Keep every retry, drop every wait: tenacity's backoff and supabase-py's 1/2/4 s GET retry."""
    for name in dir(Store):
        retrying = getattr(getattr(Store, name, None), "retry", None)
        if isinstance(retrying, tenacity.BaseRetrying):
            monkeypatch.setattr(retrying, "wait", tenacity.wait_none())
    monkeypatch.setattr(postgrest_rb, "get_retry_delay", lambda _attempt: 0)
    yield


@pytest.fixture
async def gateway(db_dsn: str) -> AsyncIterator[Gateway]:
    """The PostgREST-semantics gateway over this test's database."""
    gw = await start_gateway(db_dsn, JWT_SECRET)
    try:
        yield gw
    finally:
        await gw.close()


@pytest.fixture
def service_key() -> str:
    return make_token(JWT_SECRET, "service_role")


@pytest.fixture
async def postgres_store(db_dsn: str) -> AsyncIterator[Store]:
    s = await Store(PostgresTransport(db_dsn)).open()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture
async def supabase_store(gateway: Gateway, service_key: str) -> AsyncIterator[Store]:
    rest = SupabaseTransport(gateway.url, service_key, concurrency=4, timeout_s=10.0)
    s = await Store(rest).open()
    try:
        yield s
    finally:
        await s.close()


@pytest.fixture(params=ADAPTERS)
def store(request: pytest.FixtureRequest) -> Store:
    """An open store of either adapter over this test's database (``db_dsn``); closed after.

    A sync selector: pytest-asyncio cannot resolve an async fixture by name from inside
    another async fixture, but can from here.
    """
    return request.getfixturevalue(f"{request.param}_store")
