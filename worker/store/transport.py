"""The transport port: the few primitives a ``Store`` needs from a database connection.

``Store`` (sqlapi.py) writes every operation once in terms of these calls; a transport
only says how to reach PostgreSQL: asyncpg directly (postgres.py) or PostgREST through
supabase-py (supabase.py). Adding a transport means implementing this, nothing more.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

# The one statement the worker sends that is not a function call: the fenced failure
# UPDATE (README "Database"). The REST transport sends the same update as a PATCH with the
# same three filters; the SQL suite runs this very text. $4/$5 NULL keep the old values.
FAIL_UPDATE = """\
update public.job_queue set status = $3, retry_count = coalesce($4, retry_count),
       scheduled_at = coalesce($5, scheduled_at), error_details = $6
 where id = $1 and worker_id = $2 and status = 'processing'"""
FAIL_COLUMNS = ("status", "retry_count", "scheduled_at", "error_details")


class Transport(Protocol):
    """Calls SQL functions by name with named parameters; maps failures to StoreErrors."""

    name: str
    # Most jobs one claim answer may carry (Store.claim_many clamps to it).
    claim_batch_max: int

    async def open(self) -> None: ...

    async def value(self, fn: str, params: Mapping[str, Any]) -> Any:
        """Call a function returning one value (scalar or jsonb)."""

    async def rows(self, fn: str, params: Mapping[str, Any]) -> list[dict[str, Any]]:
        """Call a SETOF / TABLE function returning rows."""

    async def column(self, fn: str, params: Mapping[str, Any]) -> list[Any]:
        """Call a SETOF <scalar> function."""

    async def fail_update(self, job_id: str, worker_id: str, values: Mapping[str, Any]) -> int:
        """``FAIL_UPDATE`` with ``values`` (keys from FAIL_COLUMNS); rows changed, 0 or 1."""

    async def wait_for_work(self, seconds: float) -> bool:
        """Sleep up to ``seconds``; True when a new-job notification cut it short."""

    async def close(self) -> None: ...
