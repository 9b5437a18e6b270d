"""SupabaseTransport: the same SQL functions over PostgREST with the supabase-py async client.

One client per process on an httpx client we build ourselves: HTTP/1.1 (HTTP/2
connections to PostgREST have known stale-stream failures, docs/supabase-platform.md §3),
a pool sized to the concurrency and explicit timeouts. Poll-only: PostgREST
offers no LISTEN. supabase-py raises ``postgrest.APIError`` for any non-2xx
body and raw httpx exceptions for transport failures; both become StoreErrors.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import httpx
from postgrest.exceptions import APIError
from supabase import AsyncClient, AsyncClientOptions, acreate_client

from worker.store.base import (
    InvalidInputError,
    StoreError,
    TransientStoreError,
    error_from_code,
)


def build_http_client(concurrency: int, *, timeout_s: float = 15.0) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        http2=False,
        timeout=httpx.Timeout(timeout_s, connect=5.0, pool=10.0),
        limits=httpx.Limits(
            max_connections=concurrency + 4,
            max_keepalive_connections=min(concurrency + 4, 20),
            keepalive_expiry=30.0,
        ),
    )


def _is_uuid(text: str) -> bool:
    try:
        uuid.UUID(text)
    except ValueError:
        return False
    return True


def _jsonable(params: Mapping[str, Any]) -> dict[str, Any]:
    """supabase-py json-encodes with allow_nan=False; make datetimes ISO up front."""
    return {k: (v.isoformat() if isinstance(v, datetime) else v) for k, v in params.items()}


class SupabaseTransport:
    name = "supabase"
    # One job per claim answer: supabase-py decodes a response whole, so a row it cannot
    # decode (a legacy too-deep payload) would hide every job claimed with it until their
    # leases lapse; alone, it costs only itself. Still claim_jobs: full row, no get_job.
    claim_batch_max = 1

    def __init__(
        self,
        url: str,
        service_role_key: str,
        *,
        concurrency: int = 50,
        timeout_s: float = 15.0,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.url = url
        self._key = service_role_key
        self._http = http or build_http_client(concurrency, timeout_s=timeout_s)
        self._client: AsyncClient | None = None

    async def open(self) -> None:
        self._client = await acreate_client(
            self.url, self._key, options=AsyncClientOptions(httpx_client=self._http)
        )

    @property
    def client(self) -> AsyncClient:
        if self._client is None:
            raise RuntimeError("SupabaseTransport is not open")
        return self._client

    async def _execute(self, builder: Any) -> Any:
        try:
            data = (await builder.execute()).data
        except APIError as exc:
            code = exc.code or ""
            raise error_from_code(str(code), exc.message or str(exc)) from exc
        except (httpx.TransportError, json.JSONDecodeError) as exc:
            raise TransientStoreError(f"{type(exc).__name__}: {exc}") from exc
        except RecursionError as exc:  # the database bounds payload depth; never fatal here
            raise StoreError("a Data API answer was nested too deeply to decode") from exc
        except ValueError as exc:  # supabase-py refuses NaN/inf before sending
            raise InvalidInputError(str(exc)) from exc
        if isinstance(data, str) and not _is_uuid(data):
            # A 2xx page that is not JSON (a proxy, a wrong SUPABASE_URL). Our functions
            # return text only as a uuid, so anything else is never a real answer.
            raise TransientStoreError("non-JSON response from the Data API")
        return data

    async def value(self, fn: str, params: Mapping[str, Any]) -> Any:
        return await self._execute(self.client.rpc(fn, _jsonable(params)))

    async def rows(self, fn: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        return list(await self._execute(self.client.rpc(fn, _jsonable(params))) or [])

    async def column(self, fn: str, params: Mapping[str, Any]) -> list[Any]:
        return list(await self._execute(self.client.rpc(fn, _jsonable(params))) or [])

    async def fail_update(self, job_id: str, worker_id: str, values: Mapping[str, Any]) -> int:
        """FAIL_UPDATE as a PATCH: job_queue?id=eq.<job>&worker_id=eq.<w>&status=eq.processing."""
        rows = await self._execute(
            self.client.table("job_queue")
            .update(_jsonable(values))
            .eq("id", job_id)
            .eq("worker_id", worker_id)
            .eq("status", "processing")
        )
        return len(rows or [])

    async def wait_for_work(self, seconds: float) -> bool:
        """Poll only: PostgREST has no LISTEN."""
        await asyncio.sleep(seconds)
        return False

    async def close(self) -> None:
        await self._http.aclose()
