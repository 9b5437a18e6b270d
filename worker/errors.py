"""The error taxonomy every job failure is reduced to.

A job fails in one of two ways: permanently (retrying cannot help: bad payload,
unknown job type, a safety block) or retryably (the world may be different next
time: Gemini 503, a dropped stream, a database blip). The runner turns either
into the structured ``error_details`` JSONB stored on the job.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from worker.store.base import BadJobRowError, StoreError


class JobError(Exception):
    """A failure the runner knows how to record.

    ``kind`` is a stable machine-readable tag (``bad_payload``, ``safety_block``...);
    ``user_message`` is what a reader of the chapter may see, never a stack trace.
    """

    retryable: bool = False
    kind: str = "job_error"

    def __init__(
        self,
        message: str,
        *,
        kind: str | None = None,
        user_message: str | None = None,
        retry_after: float | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if kind is not None:
            self.kind = kind
        self.user_message = user_message or message
        self.retry_after = retry_after
        self.detail = detail or {}


class PermanentJobError(JobError):
    """Retrying cannot help; the job fails at once without using its retries."""

    retryable = False
    kind = "permanent"


class RetryableJobError(JobError):
    """A transient failure; the job goes back to the queue with backoff."""

    retryable = True
    kind = "transient"


class LeaseLost(Exception):
    """This worker no longer owns the job (rescued, cancelled or paused): stop writing."""


@dataclass(frozen=True)
class Classified:
    kind: str
    message: str
    user_message: str
    retryable: bool
    retry_after: float | None
    detail: dict[str, Any]


# What a reader of the chapter is told for each kind of StoreError: only an outage is
# "briefly unavailable"; a missing or foreign chapter is said as such (never retried).
_STORE_USER_MESSAGES = {
    "unavailable": "The database was briefly unavailable; the chapter will be retried.",
    "not_found": "The chapter for this generation request no longer exists or is not linked to it.",
    "forbidden": "This generation request does not belong to the chapter's owner.",
    "error": "The chapter could not be saved, so generation stopped.",
}


def classify(exc: BaseException) -> Classified:
    """Reduce any exception to a ``Classified`` failure.

    Unknown exceptions are retryable: a bug that always raises still ends as a
    failed job once ``max_retries`` is used up, while a one-off glitch recovers.
    """
    if isinstance(exc, JobError):
        return Classified(
            exc.kind, exc.message, exc.user_message, exc.retryable, exc.retry_after, exc.detail
        )
    if isinstance(exc, BadJobRowError):
        return Classified(
            "bad_payload",
            str(exc),
            "The generation request was invalid and was not run.",
            False,
            None,
            {},
        )
    if isinstance(exc, StoreError):
        return Classified(
            "store_" + exc.kind,
            str(exc),
            _STORE_USER_MESSAGES.get(exc.kind, _STORE_USER_MESSAGES["error"]),
            exc.transient,
            None,
            {"code": exc.code} if exc.code else {},
        )
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return Classified(
            "timeout",
            f"timed out: {exc!s}" if str(exc) else "timed out",
            "Generation timed out; the chapter will be retried.",
            True,
            None,
            {},
        )
    return Classified(
        "internal",
        f"{type(exc).__name__}: {exc}",
        "An internal error interrupted generation; the chapter will be retried.",
        True,
        None,
        {},
    )


# A retry promise at the end of a user message ("...; the chapter will be retried in about
# 30 seconds."): kept only when the runner will in fact retry.
_RETRY_PROMISE = re.compile(r"[;,]?\s*the chapter will be retried[^.;]*\.?\s*$", re.IGNORECASE)


def outcome_message(user_message: str, *, will_retry: bool) -> str:
    """The user message, telling the truth about what happens next."""
    if will_retry:
        return user_message
    cause = _RETRY_PROMISE.sub("", user_message).rstrip(" .;,")
    if cause == user_message.rstrip(" .;,"):
        return user_message
    return f"{cause}. Generation stopped; you can start it again."


def error_details(
    failure: Classified,
    *,
    attempt: int,
    worker_id: str,
    will_retry: bool,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The JSONB stored in ``job_queue.error_details`` (documented in the README)."""
    details: dict[str, Any] = {
        "type": failure.kind,
        "message": failure.message[:2000],
        "user_message": outcome_message(failure.user_message, will_retry=will_retry)[:500],
        "retryable": failure.retryable,
        "will_retry": will_retry,
        "attempt": attempt,
        "worker_id": worker_id,
        "at": (now or datetime.now(UTC)).isoformat(),
    }
    if failure.retry_after is not None:
        details["retry_after_s"] = failure.retry_after
    if failure.detail:
        details["detail"] = failure.detail
    return details
