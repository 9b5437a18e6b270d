"""What every store transport shares: the errors, the row types and the retry policy.

Ids travel as strings and timestamps as aware datetimes, whatever the wire gave us.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, TypeVar

from tenacity import retry, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter


class StoreError(Exception):
    """A database call failed. ``transient`` says whether retrying may help."""

    kind = "error"
    transient = False

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class TransientStoreError(StoreError):
    """Connection refused/reset, timeouts, 502/503/504, serialization failures."""

    kind = "unavailable"
    transient = True


class ConflictError(StoreError):
    """The row is not in the state the call expects (offset mismatch, bad transition)."""

    kind = "conflict"


class ForbiddenError(StoreError):
    """Ownership or privilege check failed."""

    kind = "forbidden"


class NotFoundError(StoreError):
    """The row or the function does not exist (PGRST202: run the migrations)."""

    kind = "not_found"


class MissingFunctionError(NotFoundError):
    """The SQL function does not exist here: a migration not applied, or an optional part
    (story memory without pgvector) that this database does not have."""


class InvalidInputError(StoreError):
    """The database rejected an argument."""

    kind = "invalid"


class RateLimitedError(StoreError):
    """A per-user cap in the database refused the call (PT429); retrying now will not help."""

    kind = "rate_limited"


# SQLSTATEs and PostgREST codes (docs/supabase-platform.md §2), mapped once for both transports.
_TRANSIENT = {
    "PGRST000",
    "PGRST001",
    "PGRST002",
    "PGRST003",
    "40001",
    "40P01",
    "57014",
    "57P01",
    "57P02",
    "57P03",
    "53300",
    "08000",
    "08001",
    "08003",
    "08004",
    "08006",
    "502",
    "503",
    "504",
    "520",
}
_BY_CODE: dict[str, type[StoreError]] = {
    "PT409": ConflictError,
    "23505": ConflictError,
    "PT403": ForbiddenError,
    "42501": ForbiddenError,
    "PT404": NotFoundError,
    "PGRST202": MissingFunctionError,
    "42883": MissingFunctionError,
    "PT400": InvalidInputError,
    "PT429": RateLimitedError,
    "22023": InvalidInputError,
    "22P02": InvalidInputError,
    "23514": InvalidInputError,
    "P0001": InvalidInputError,
}


def error_from_code(code: str | None, message: str) -> StoreError:
    """Map a SQLSTATE / PostgREST code to the matching ``StoreError`` subclass."""
    code = code or ""
    if code in _TRANSIENT or code.startswith("08"):
        return TransientStoreError(message, code=code)
    return _BY_CODE.get(code, StoreError)(message, code=code)


def _as_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _as_dt(value: Any) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(str(value))


@dataclass(frozen=True)
class BudgetTake:
    """One answer of ``gemini_budget_take``: granted, or how long to wait and why
    ('rpm', 'tpm', 'rpd', 'cooldown', 'daily_exhausted'; ``until`` for the last two)."""

    granted: bool
    wait_s: float
    reason: str
    until: datetime | None

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> BudgetTake:
        return cls(
            granted=bool(row["granted"]),
            wait_s=max(0.0, float(row["wait_s"] or 0.0)),
            reason=str(row["reason"]),
            until=_as_dt(row.get("until")),
        )


class BadJobRowError(StoreError):
    """A claimed job's row cannot be read (its payload, most often): that job fails as
    ``bad_payload`` on its first attempt; it is never an error of the claim loop."""

    kind = "bad_payload"


@dataclass(frozen=True)
class Undecodable:
    """A JSON value the decoder refused (too deep, malformed): kept, not raised, so the
    job that carries it can be failed by id instead of stopping whoever decoded it."""

    error: str


def decode_json(text: str | bytes) -> Any:
    """``json.loads`` that returns ``Undecodable`` instead of raising (used as a codec)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        return Undecodable(f"{type(exc).__name__}: {str(exc)[:200]}")


@dataclass(frozen=True)
class ClaimedJob:
    """A claimed job: what ``claim_next_job_v3`` returns (part of the row), or a row of the
    batch claim ``claim_jobs``, which also carries the full ``job`` (no get_job needed).

    ``payload_error`` is set when the row came back but could not be read: the runner
    then fails the job as ``bad_payload`` instead of running it.
    """

    job_id: str
    job_type: str
    job_payload: dict[str, Any]
    retry_count: int
    payload_error: str | None = None
    job: Job | None = None

    @classmethod
    def from_full_row(cls, row: Mapping[str, Any]) -> ClaimedJob:
        """A ``claim_jobs`` row; a row that cannot be read keeps its id and its error."""
        if row.get("id") is None:
            raise StoreError("claim returned a row without id")
        try:
            job = Job.from_row(row)
        except BadJobRowError as exc:
            return cls(
                job_id=str(row["id"]),
                job_type=str(row.get("job_type") or "unknown"),
                job_payload={},
                retry_count=_int_or_zero(row.get("retry_count")),
                payload_error=str(exc)[:400],
            )
        return cls(job.id, job.job_type, job.job_payload, job.retry_count, job=job)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> ClaimedJob:
        if row.get("job_id") is None:
            raise StoreError("claim returned a row without job_id")
        job_id = str(row["job_id"])
        try:
            return cls(
                job_id=job_id,
                job_type=str(row["job_type"]),
                job_payload=_json_obj(row.get("job_payload")),
                retry_count=int(row.get("retry_count") or 0),
            )
        except Exception as exc:  # anything wrong with this row belongs to this job
            return cls(
                job_id=job_id,
                job_type=str(row.get("job_type") or "unknown"),
                job_payload={},
                retry_count=_int_or_zero(row.get("retry_count")),
                payload_error=f"{type(exc).__name__}: {str(exc)[:300]}",
            )


@dataclass(frozen=True)
class Job:
    """The full ``job_queue`` row (step two of the claim)."""

    id: str
    job_type: str
    job_lane: str
    status: str
    priority: int
    job_payload: dict[str, Any]
    retry_count: int
    max_retries: int
    worker_id: str | None
    user_id: str | None
    lease_timeout_s: int
    scheduled_at: datetime | None = None
    started_at: datetime | None = None
    created_at: datetime | None = None
    error_details: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> Job:
        """The full row; ``BadJobRowError`` (never anything else) when it cannot be read."""
        try:
            return cls._from_row(row)
        except Exception as exc:
            raise BadJobRowError(
                f"job {row.get('id')} could not be read: {type(exc).__name__}: {str(exc)[:300]}"
            ) from exc

    @classmethod
    def _from_row(cls, row: Mapping[str, Any]) -> Job:
        known = _JOB_FIELDS
        return cls(
            id=str(row["id"]),
            job_type=row["job_type"],
            job_lane=row.get("job_lane") or "default",
            status=row["status"],
            priority=int(row.get("priority") or 0),
            job_payload=_json_obj(row.get("job_payload")),
            retry_count=int(row.get("retry_count") or 0),
            max_retries=int(row.get("max_retries") or 0),
            worker_id=row.get("worker_id"),
            user_id=_as_str(row.get("user_id")),
            lease_timeout_s=int(row.get("lease_timeout_s") or 60),
            scheduled_at=_as_dt(row.get("scheduled_at")),
            started_at=_as_dt(row.get("started_at")),
            created_at=_as_dt(row.get("created_at")),
            error_details=_json_obj(row.get("error_details")) if row.get("error_details") else None,
            extra={
                k: _as_dt(v) if k.endswith("_at") else v for k, v in row.items() if k not in known
            },
        )


_JOB_FIELDS = frozenset(f for f in Job.__dataclass_fields__ if f != "extra")


def _int_or_zero(value: Any) -> int:
    try:
        return int(value or 0)
    except (TypeError, ValueError):
        return 0


def _json_obj(value: Any) -> dict[str, Any]:
    """A decoded JSON object, or ValueError saying why not (both transports decode)."""
    if value is None:
        return {}
    if isinstance(value, Undecodable):
        raise ValueError(f"payload is not valid JSON ({value.error})")
    if not isinstance(value, dict):
        raise ValueError(f"payload must be a JSON object, not {type(value).__name__}")
    return value


_Call = TypeVar("_Call", bound=Callable[..., Awaitable[Any]])


def transport_retry(fn: _Call) -> _Call:
    """Retry an *idempotent* store call on transient errors (never the claim).

    Every write the worker repeats is fenced and idempotent by construction
    (offset appends, fenced complete/fail/release), so a retry after an unknown
    outcome cannot duplicate anything.
    """
    return retry(
        retry=retry_if_exception_type(TransientStoreError),
        stop=stop_after_attempt(4),
        wait=wait_exponential_jitter(initial=0.2, max=3.0),
        reraise=True,
    )(fn)
