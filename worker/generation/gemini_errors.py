"""What each ending of a Gemini call means for the job: pure classification, no I/O.

Every status, in-stream error, finish reason, blocked prompt, transport exception and
silence becomes one ``worker.errors`` exception; the wire facts are in docs/gemini-wire.md.
"""

from __future__ import annotations

import re
from typing import Any

import aiohttp
import httpx
import httpx2
from google.genai import errors as genai_errors
from google.genai import types

from worker.errors import JobError, PermanentJobError, RetryableJobError
from worker.logs import redact

# Not our transport (aiohttp is), but an injected or future client may raise them.
_HTTPX_TRANSPORT = (httpx.TransportError, httpx2.TransportError)
_HTTPX_CONNECT = (httpx.ConnectError, httpx2.ConnectError)

DEFAULT_RETRY_AFTER_S = 30.0
DAILY_QUOTA_RETRY_AFTER_S = 3600.0

# Endings that mean "the model will not write this"; retrying the same prompt cannot help.
_BLOCKING_FINISH = frozenset(
    "SAFETY PROHIBITED_CONTENT BLOCKLIST SPII OTHER LANGUAGE IMAGE_SAFETY MODEL_ARMOR JAILBREAK"
    " RECITATION".split()
)
_NORMAL_FINISH = frozenset({"STOP", "MAX_TOKENS"})
_RETRYABLE_STATUS = frozenset({408, 429, 499})
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?)s\s*$")


def translate(
    exc: BaseException, *, received_chunks: int, request_timeout_s: float
) -> JobError | None:
    """Map an SDK or transport exception to a ``JobError``; ``None`` if unknown."""
    if isinstance(exc, genai_errors.APIError):
        return classify_api_error(exc, mid_stream=received_chunks > 0)
    if isinstance(
        exc, (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError, *_HTTPX_CONNECT)
    ):
        return RetryableJobError(
            redact(f"cannot connect to Gemini: {type(exc).__name__}: {exc}"),
            kind="model_unavailable",
            user_message="Gemini could not be reached; the chapter will be retried.",
        )
    if isinstance(exc, (aiohttp.ClientError, ConnectionError, *_HTTPX_TRANSPORT)):
        return RetryableJobError(
            redact(f"Gemini stream interrupted: {type(exc).__name__}: {exc}"),
            kind="stream_interrupted",
            user_message="The connection to Gemini dropped while writing; "
            "the chapter will be retried.",
            detail={"chunks_received": received_chunks},
        )
    if isinstance(exc, TimeoutError):  # aiohttp's total cap = request_timeout_s
        return RetryableJobError(
            f"Gemini request exceeded {request_timeout_s:g}s",
            kind="stream_timeout",
            user_message="Writing this section took too long; the chapter will be retried.",
        )
    if isinstance(exc, genai_errors.UnknownApiResponseError):
        return RetryableJobError(
            redact(f"unreadable Gemini stream: {exc}"),
            kind="stream_interrupted",
            user_message="Gemini sent a garbled response; the chapter will be retried.",
        )
    return None


def classify_api_error(exc: genai_errors.APIError, *, mid_stream: bool = False) -> JobError:
    """Classify an ``APIError`` (HTTP status or in-stream ``{"error": ...}``)."""
    code = int(exc.code or 0)
    status = str(exc.status or "")
    label = f"{code} {status}".strip()
    message = redact(f"Gemini error {label}: {exc.message or ''}".rstrip(": "))
    detail: dict[str, Any] = {"status_code": code, "status": status}
    if code == 429:
        retry_after = retry_delay_s(exc.details)
        quota_ids = quota_ids_of(exc.details)
        detail["quota_ids"] = quota_ids
        if is_quota_daily(quota_ids):
            return RetryableJobError(
                message,
                kind="rate_limited",
                retry_after=max(retry_after or 0.0, DAILY_QUOTA_RETRY_AFTER_S),
                user_message="The daily Gemini quota is used up; "
                "the chapter will be retried later.",
                detail=detail,
            )
        wait = retry_after if retry_after is not None else DEFAULT_RETRY_AFTER_S
        return RetryableJobError(
            message,
            kind="rate_limited",
            retry_after=wait,
            detail=detail,
            user_message=f"Gemini is busy (rate limit); the chapter will be retried "
            f"in about {wait:.0f} seconds.",
        )
    if code >= 500 or code in _RETRYABLE_STATUS:
        if mid_stream:
            return RetryableJobError(
                message,
                kind="stream_interrupted",
                detail=detail,
                user_message="Gemini failed while writing; the chapter will be retried.",
            )
        return RetryableJobError(
            message,
            kind="model_unavailable",
            detail=detail,
            user_message=f"Gemini is temporarily unavailable ({label}); "
            "the chapter will be retried.",
        )
    return PermanentJobError(
        message,
        kind="model_request_rejected",
        detail=detail,
        user_message=f"Gemini rejected the request ({label}). An operator needs to check "
        "the API key, model name or billing.",
    )


def retry_delay_s(details: Any) -> float | None:
    """Seconds from a ``google.rpc.RetryInfo`` ``retryDelay`` such as ``"53s"`` or ``"1.5s"``."""
    for item in _error_details(details):
        if str(item.get("@type", "")).endswith("google.rpc.RetryInfo"):
            match = _DURATION.match(str(item.get("retryDelay", "")))
            if match:
                return float(match.group(1))
    return None


def quota_ids_of(details: Any) -> list[str]:
    """The ``quotaId`` of every ``google.rpc.QuotaFailure`` violation."""
    ids: list[str] = []
    for item in _error_details(details):
        for violation in item.get("violations") or []:
            if isinstance(violation, dict) and violation.get("quotaId"):
                ids.append(str(violation["quotaId"]))
    return ids


def is_quota_daily(quota_ids: list[str]) -> bool:
    """A per-day quota resets at midnight Pacific: retrying within minutes is pointless."""
    return any("PerDay" in quota_id for quota_id in quota_ids)


def _error_details(body: Any) -> list[dict[str, Any]]:
    """``error.details`` of a parsed error body (an object or a one-element array)."""
    if isinstance(body, list) and body:
        body = body[0]
    if not isinstance(body, dict):
        return []
    error = body.get("error", body)
    items = error.get("details") if isinstance(error, dict) else None
    return [item for item in items or [] if isinstance(item, dict)]


def enum_value(value: Any) -> str | None:
    """SDK enums may be pseudo-members for unknown strings; compare ``.value``."""
    if value is None:
        return None
    return str(getattr(value, "value", value))


def raise_if_blocked(response: types.GenerateContentResponse) -> None:
    """Raise ``PermanentJobError`` for a blocked prompt or a safety-type finish reason."""
    feedback = response.prompt_feedback
    block = enum_value(feedback.block_reason) if feedback else None
    if block:
        raise PermanentJobError(
            f"Gemini blocked the prompt (blockReason {block})",
            kind="safety_block",
            user_message="The model declined to write this section because the request was "
            f"flagged by Gemini's safety filters ({block}). "
            "Try changing the premise or instructions.",
            detail={"block_reason": block},
        )
    candidate = response.candidates[0] if response.candidates else None
    finish = enum_value(candidate.finish_reason) if candidate else None
    if finish == "RECITATION":
        raise PermanentJobError(
            "Gemini stopped: finishReason RECITATION",
            kind="recitation",
            user_message="The model stopped because the text too closely repeated existing "
            "published material (RECITATION). Try changing the premise or instructions.",
            detail={"finish_reason": finish},
        )
    if finish in _BLOCKING_FINISH:
        raise PermanentJobError(
            f"Gemini stopped: finishReason {finish}",
            kind="safety_block",
            user_message="The model declined to write this section because it was flagged by "
            f"Gemini's safety filters ({finish}). Try changing the premise or instructions.",
            detail={"finish_reason": finish},
        )


def invalid_output(message: str) -> RetryableJobError:
    return RetryableJobError(
        message,
        kind="model_output_invalid",
        user_message="Gemini returned an unusable response; the chapter will be retried.",
    )


def stalled(idle_timeout_s: float, chunks: int) -> RetryableJobError:
    return RetryableJobError(
        f"no Gemini chunk for {idle_timeout_s:g}s after {chunks} chunks",
        kind="stream_stalled",
        user_message="Gemini stopped sending text; the chapter will be retried.",
        detail={"chunks_received": chunks},
    )


def truncated(chunks: int) -> RetryableJobError:
    return RetryableJobError(
        f"Gemini stream ended without a finish reason after {chunks} chunks",
        kind="stream_truncated",
        user_message="Gemini's response ended early; the chapter will be retried.",
        detail={"chunks_received": chunks},
    )


def section_finish(chunk: types.GenerateContentResponse) -> str | None:
    """The chunk's finish reason, if any; raise for every ending but STOP and MAX_TOKENS."""
    raise_if_blocked(chunk)
    candidate = chunk.candidates[0] if chunk.candidates else None
    finish = enum_value(candidate.finish_reason) if candidate else None
    if finish is not None and finish not in _NORMAL_FINISH:
        raise invalid_output(f"section ended with finishReason {finish}")
    return finish


def outline_finish(response: types.GenerateContentResponse) -> None:
    """Raise unless the outline call ended normally (STOP, or no reason given)."""
    raise_if_blocked(response)
    candidate = response.candidates[0] if response.candidates else None
    finish = enum_value(candidate.finish_reason) if candidate else None
    if finish is not None and finish != "STOP":
        raise invalid_output(f"outline ended with finishReason {finish}")
