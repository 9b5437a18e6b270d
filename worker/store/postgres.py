"""PostgresTransport: a direct asyncpg pool (used when DATABASE_URL is set).

Safe behind Supabase's transaction pooler (port 6543): no prepared-statement
cache and no LISTEN there. On a direct or session-mode connection a dedicated
connection LISTENs for new-job notifications so idle workers claim at once; the
poll stays as the fallback because a NOTIFY is only a hint (docs/supabase-platform.md §1).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import asyncpg

from worker.store.base import (
    InvalidInputError,
    StoreError,
    TransientStoreError,
    decode_json,
    error_from_code,
)
from worker.store.transport import FAIL_COLUMNS, FAIL_UPDATE

log = logging.getLogger(__name__)

CHANNEL = "genworker_jobs"

_CONNECTION_ERRORS = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.exceptions.InterfaceError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.InternalClientError,  # a pooled connection killed an instant before use
)


def _json_default(value: Any) -> Any:
    """Encode what supabase-py encodes (datetimes, UUIDs...) the same way, so both adapters
    store identical JSON."""
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


def _encode_json(value: Any) -> str:
    return json.dumps(value, default=_json_default, allow_nan=False)


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """Skip asyncpg's per-release RESET ALL/UNLISTEN round trip: the store sets no session
    state and LISTENs on its own connection, so it would only double every call's latency."""


def _plain(value: Any) -> Any:
    """UUIDs as strings, as the REST adapter returns them."""
    return str(value) if isinstance(value, uuid.UUID) else value


def is_transaction_pooler(dsn: str) -> bool:
    return urlsplit(dsn).port == 6543


def _call_sql(fn: str, params: Mapping[str, Any], *, select_star: bool) -> str:
    """``fn(name => $1, ...)`` in named notation; names are our own constants."""
    args = ", ".join(f"{name} => ${i}" for i, name in enumerate(params, start=1))
    return f"select * from public.{fn}({args})" if select_star else f"select public.{fn}({args})"


class PostgresTransport:
    name = "postgres"
    claim_batch_max = 1000

    def __init__(
        self,
        dsn: str,
        *,
        pool_size: int = 10,
        listen: bool | None = None,
        command_timeout: float = 15.0,
    ) -> None:
        self.dsn = dsn
        self.pool_size = pool_size
        self.pooler = is_transaction_pooler(dsn)
        self.listen = (not self.pooler) if listen is None else listen
        self.command_timeout = command_timeout
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._wake = asyncio.Event()
        self.notifications = 0

    async def open(self) -> None:
        self._pool = await asyncpg.create_pool(
            self.dsn,
            min_size=1,
            max_size=self.pool_size,
            init=self._init_connection,
            command_timeout=self.command_timeout,
            statement_cache_size=0 if self.pooler else 100,
            reset=_keep_session,
        )
        if self.listen:
            await self._start_listener()

    @staticmethod
    async def _init_connection(conn: asyncpg.Connection) -> None:
        for typ in ("json", "jsonb"):
            await conn.set_type_codec(
                typ, encoder=_encode_json, decoder=decode_json, schema="pg_catalog"
            )

    # -- LISTEN ---------------------------------------------------------------------
    async def _start_listener(self) -> None:
        try:
            conn = await asyncpg.connect(self.dsn, timeout=10)
            await conn.add_listener(CHANNEL, self._on_notify)
            conn.add_termination_listener(lambda _c: self._listener_lost())
            self._listener = conn
        except (*_CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
            log.warning("LISTEN unavailable, polling only: %s", exc)
            self._listener = None

    def _on_notify(self, *_args: Any) -> None:
        self.notifications += 1
        self._wake.set()

    def _listener_lost(self) -> None:
        if self._listener is None:  # closed by us
            return
        log.warning("LISTEN connection lost; polling until it is re-established")
        self._listener = None

    @property
    def listening(self) -> bool:
        return self._listener is not None and not self._listener.is_closed()

    async def wait_for_work(self, seconds: float) -> bool:
        if self.listen and not self.listening:
            await self._start_listener()  # re-arm after a database blip
        try:
            await asyncio.wait_for(self._wake.wait(), seconds)
            return True
        except TimeoutError:
            return False
        finally:
            self._wake.clear()

    # -- transport ----------------------------------------------------------------------
    async def _run(self, method: str, sql: str, *args: Any) -> Any:
        if self._pool is None:
            raise StoreError("PostgresTransport is not open")
        try:
            async with self._pool.acquire(timeout=self.command_timeout) as conn:
                return await getattr(conn, method)(sql, *args)
        except asyncpg.exceptions.DataError as exc:  # 22xxx, or an argument it cannot encode
            raise InvalidInputError(str(exc), code=exc.sqlstate) from exc
        except asyncpg.PostgresError as exc:
            raise error_from_code(exc.sqlstate, str(exc)) from exc
        except _CONNECTION_ERRORS as exc:
            raise TransientStoreError(f"{type(exc).__name__}: {exc}") from exc
        except ValueError as exc:  # NaN/inf in JSON: never sent, as over REST
            raise InvalidInputError(str(exc)) from exc

    async def value(self, fn: str, params: Mapping[str, Any]) -> Any:
        return _plain(
            await self._run("fetchval", _call_sql(fn, params, select_star=False), *params.values())
        )

    async def rows(self, fn: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        rows = await self._run("fetch", _call_sql(fn, params, select_star=True), *params.values())
        return [{k: _plain(v) for k, v in r.items()} for r in rows]

    async def column(self, fn: str, params: Mapping[str, Any]) -> list[Any]:
        rows = await self._run("fetch", _call_sql(fn, params, select_star=True), *params.values())
        return [_plain(r[0]) for r in rows]

    async def fail_update(self, job_id: str, worker_id: str, values: Mapping[str, Any]) -> int:
        assert set(values) <= set(FAIL_COLUMNS)
        status = await self._run(
            "execute",
            FAIL_UPDATE,
            job_id,
            worker_id,
            values["status"],
            values.get("retry_count"),
            values.get("scheduled_at"),
            values["error_details"],
        )
        return int(status.split()[-1])

    async def close(self) -> None:
        if self._listener is not None:
            listener, self._listener = self._listener, None
            try:
                await asyncio.wait_for(listener.close(), 5)
            except Exception:  # closing a dead connection must not block shutdown
                listener.terminate()
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                await asyncio.wait_for(pool.close(), 5)
            except Exception:
                pool.terminate()
