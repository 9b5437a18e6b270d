"""The asyncpg transport only: LISTEN wake-ups, the transaction-pooler decision, listener
recovery."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import pytest

from tests.store._helpers import insert_job
from worker.store import Store
from worker.store import postgres as pg_module
from worker.store.postgres import CHANNEL, PostgresTransport, is_transaction_pooler

# As an operator would find it. Note that '%LISTEN%' also matches idle pool connections, whose
# last statement is asyncpg's reset ("... UNLISTEN *; RESET ALL;"), so those die too.
KILL_LISTENER = (
    "select bool_or(pg_terminate_backend(pid)) from pg_stat_activity"
    " where query ilike '%LISTEN%' and pid <> pg_backend_pid() and datname = current_database()"
)
LISTENERS = (
    "select count(*) from pg_stat_activity"
    " where query ilike 'LISTEN %' and pid <> pg_backend_pid() and datname = current_database()"
)


@pytest.fixture
def pg(postgres_store: Store) -> Store:
    """Short name for conftest's ``postgres_store``."""
    return postgres_store


async def until(predicate: Callable[[], bool], within: float = 15.0) -> None:
    """Poll a condition set by asyncpg callbacks (no event to wait on)."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


# -- LISTEN ---------------------------------------------------------------------------------


async def test_wait_for_work_wakes_soon_after_an_insert(
    pg: Store, conn: asyncpg.Connection
) -> None:
    assert pg.transport.listen and pg.transport.listening

    async def insert_later() -> None:
        await asyncio.sleep(0.2)
        await insert_job(conn)

    inserter = asyncio.create_task(insert_later())
    started = time.monotonic()
    assert await pg.wait_for_work(60.0) is True  # True: woken by the NOTIFY, not the timeout
    elapsed = time.monotonic() - started
    await inserter
    assert elapsed > 0.15  # it waited for the insert
    assert pg.transport.notifications >= 1
    assert await pg.claim("w", None, None) is not None


async def test_wait_for_work_times_out_without_work(pg: Store) -> None:
    started = time.monotonic()
    assert await pg.wait_for_work(0.3) is False
    assert time.monotonic() - started >= 0.29


async def test_a_notification_between_waits_is_not_lost(
    pg: Store, conn: asyncpg.Connection
) -> None:
    await insert_job(conn)
    await until(lambda: pg.transport.notifications >= 1)
    assert await pg.wait_for_work(60.0) is True  # the event was already set
    assert await pg.wait_for_work(0.2) is False  # and it was consumed


async def test_other_status_changes_do_not_wake(pg: Store, conn: asyncpg.Connection) -> None:
    jid = await insert_job(conn)
    await until(lambda: pg.transport.notifications >= 1)
    await pg.wait_for_work(0)
    await pg.claim("w", None, None)
    assert await pg.complete(jid, "w", {}) is True
    assert await pg.wait_for_work(0.3) is False


async def test_released_job_wakes_listeners(pg: Store, conn: asyncpg.Connection) -> None:
    jid = await insert_job(conn)
    await pg.claim("w", None, None)
    await pg.wait_for_work(0.05)  # drain the insert's notification
    assert await pg.release(jid, "w") is True
    assert await pg.wait_for_work(60.0) is True


async def test_listen_false_is_poll_only(db_dsn: str, conn: asyncpg.Connection) -> None:
    s = await Store(PostgresTransport(db_dsn, listen=False)).open()
    try:
        assert not s.transport.listening
        assert await conn.fetchval(LISTENERS) == 0
        await insert_job(conn)
        assert await s.wait_for_work(0.2) is False
        assert await s.claim("w", None, None) is not None
    finally:
        await s.close()


# -- the transaction-pooler decision (no server needed) --------------------------------------


@pytest.mark.parametrize(
    ("dsn", "pooler"),
    [
        ("postgresql://postgres.ref:pw@aws-0-eu-central-1.pooler.supabase.com:6543/postgres", True),
        ("postgres://u:p@localhost:6543/db?sslmode=require", True),
        (
            "postgresql://postgres.ref:pw@aws-0-eu-central-1.pooler.supabase.com:5432/postgres",
            False,
        ),
        ("postgresql://postgres:pw@db.ref.supabase.co:5432/postgres", False),
        ("postgresql://postgres:pw@db.ref.supabase.co/postgres", False),
        ("postgresql://u@localhost:65430/db", False),
    ],
)
def test_is_transaction_pooler(dsn: str, pooler: bool) -> None:
    assert is_transaction_pooler(dsn) is pooler
    store = PostgresTransport(dsn)
    assert store.pooler is pooler
    assert store.listen is (not pooler)


def test_explicit_listen_overrides_the_port() -> None:
    assert PostgresTransport("postgresql://u@h:6543/db", listen=True).listen is True
    assert PostgresTransport("postgresql://u@h:5432/db", listen=False).listen is False


async def test_pooler_open_has_no_statement_cache_and_no_listener(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: dict[str, Any] = {}

    async def fake_create_pool(dsn: str, **kwargs: Any) -> object:
        seen.update(kwargs, dsn=dsn)
        return object()

    async def no_connect(*_a: Any, **_k: Any) -> None:
        raise AssertionError("no LISTEN connection behind the transaction pooler")

    monkeypatch.setattr(pg_module.asyncpg, "create_pool", fake_create_pool)
    monkeypatch.setattr(pg_module.asyncpg, "connect", no_connect)
    store = PostgresTransport("postgresql://u:p@pooler.example:6543/postgres")
    await store.open()
    assert seen["statement_cache_size"] == 0
    assert not store.listening
    started = time.monotonic()
    assert await store.wait_for_work(0.05) is False  # plain sleep, never tries to LISTEN
    assert time.monotonic() - started >= 0.04

    seen.clear()
    direct = PostgresTransport("postgresql://u:p@db.example:5432/postgres", listen=False)
    await direct.open()
    assert seen["statement_cache_size"] == 100


# -- listener recovery ------------------------------------------------------------------------


async def test_killed_listener_is_re_established(pg: Store, conn: asyncpg.Connection) -> None:
    await pg.queue_stats()  # a used-and-released pool connection, for the kill to hit as well
    assert await conn.fetchval(LISTENERS) == 1
    old = pg.transport._listener
    assert await conn.fetchval(KILL_LISTENER) is True
    await until(lambda: not pg.transport.listening)

    # Meanwhile the pool (and so polling) is unaffected.
    jid = await insert_job(conn)
    claimed = await pg.claim("w", None, None)
    assert claimed is not None and claimed.job_id == jid
    assert await pg.complete(jid, "w", {}) is True

    # The next wait re-arms LISTEN on a new connection...
    assert await pg.wait_for_work(0.1) is False
    assert pg.transport.listening and pg.transport._listener is not old
    assert await conn.fetchval(LISTENERS) == 1

    # ...and notifications flow again.
    async def insert_later() -> None:
        await asyncio.sleep(0.1)
        await insert_job(conn)

    inserter = asyncio.create_task(insert_later())
    assert await pg.wait_for_work(60.0) is True
    await inserter


async def test_listener_unavailable_falls_back_to_polling(
    pg: Store, conn: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    await conn.fetchval(KILL_LISTENER)
    await until(lambda: not pg.transport.listening)

    async def refused(*_a: Any, **_k: Any) -> None:
        raise ConnectionRefusedError("connection refused")

    with monkeypatch.context() as m:
        m.setattr(pg_module.asyncpg, "connect", refused)
        assert await pg.wait_for_work(0.05) is False  # no exception, just a poll interval
        assert not pg.transport.listening
    assert await pg.wait_for_work(0.05) is False
    assert pg.transport.listening


async def test_notify_on_the_channel_wakes(pg: Store, conn: asyncpg.Connection) -> None:
    await conn.execute(f"notify {CHANNEL}, 'anything'")
    assert await pg.wait_for_work(60.0) is True


async def test_pool_recovers_after_its_connections_are_killed(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    s = await Store(PostgresTransport(db_dsn, listen=False)).open()
    try:
        await s.queue_stats()
        await conn.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity"
            " where datname = current_database() and pid <> pg_backend_pid()"
        )
        await asyncio.sleep(0.2)  # let asyncpg see the FATAL/EOF (see the race test below)
        assert await s.heartbeat(str(uuid.uuid4()), "w") is False
        jid = await insert_job(conn)
        claimed = await s.claim("w", None, None)
        assert claimed is not None and claimed.job_id == jid
    finally:
        await s.close()


@pytest.mark.parametrize(
    "exc",
    [
        ConnectionResetError("reset by peer"),
        TimeoutError(),
        asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed"),
        asyncpg.exceptions.InterfaceError("connection is closed"),
    ],
)
async def test_connection_errors_are_transient(
    pg: Store, monkeypatch: pytest.MonkeyPatch, exc: Exception
) -> None:
    calls = 0
    real = asyncpg.connection.Connection.fetchval

    async def flaky(self: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise exc
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(asyncpg.connection.Connection, "fetchval", flaky)
    assert await pg.heartbeat(str(uuid.uuid4()), "w") is False  # retried once, then answered
    assert calls == 2


async def test_connection_killed_just_before_use_is_transient(
    pg: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What asyncpg raises when a pooled connection is terminated an instant before it is used
    (reproduced with pg_terminate_backend and no delay): it must not escape StoreError."""
    calls = 0
    real = asyncpg.connection.Connection.fetchval

    async def killed(self: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise asyncpg.exceptions.InternalClientError(
                "cannot switch to state 11; another operation (2) is in progress"
            )
        return await real(self, *args, **kwargs)

    monkeypatch.setattr(asyncpg.connection.Connection, "fetchval", killed)
    assert await pg.heartbeat(str(uuid.uuid4()), "w") is False
