"""Gemini error and finish-reason classification, unit by unit: no server, no SDK call.

The wire-level tests (test_gemini.py) prove the same kinds arrive through the real SDK;
these pin every branch of the mapping, including ones the fake cannot easily provoke.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import aiohttp
import httpx
import pytest
from google.genai import errors as genai_errors
from google.genai import types

from worker.errors import PermanentJobError, RetryableJobError, classify
from worker.generation.gemini_errors import (
    DAILY_QUOTA_RETRY_AFTER_S,
    DEFAULT_RETRY_AFTER_S,
    classify_api_error,
    outline_finish,
    quota_ids_of,
    retry_delay_s,
    section_finish,
    stalled,
    translate,
    truncated,
)
from worker.logs import MASK, register_secret

KEY = "AIzaUNIT-test-key-abcdefghijklmnopqrstuv"
RETRY_INFO = "type.googleapis.com/google.rpc.RetryInfo"
QUOTA_FAILURE = "type.googleapis.com/google.rpc.QuotaFailure"
CONNECTION: Any = SimpleNamespace(host="gemini.test", port=443, ssl=True)  # aiohttp's key


def api_error(code: int, status: str, message: str = "m", details: Any = None) -> Any:
    body: dict[str, Any] = {"code": code, "status": status, "message": message}
    if details is not None:
        body["details"] = details
    return genai_errors.APIError(code, {"error": body})


def chunk(finish: str | None = None, block: str | None = None) -> types.GenerateContentResponse:
    candidate = types.Candidate(finish_reason=finish) if finish else types.Candidate()
    feedback = types.GenerateContentResponsePromptFeedback(block_reason=block) if block else None
    return types.GenerateContentResponse(candidates=[candidate], prompt_feedback=feedback)


def test_retry_delay_parsing() -> None:
    def body(delay: str) -> dict[str, object]:
        info = {"@type": RETRY_INFO, "retryDelay": delay}
        return {"error": {"code": 429, "details": [info]}}

    assert retry_delay_s(body("53s")) == 53.0
    assert retry_delay_s(body("1.5s")) == 1.5
    assert retry_delay_s(body("0s")) == 0.0
    assert retry_delay_s(body("soon")) is None
    assert retry_delay_s([body("4s")]) == 4.0  # one-element array form
    assert retry_delay_s({"error": {"code": 429}}) is None
    assert retry_delay_s(None) is None


def test_429_honours_retry_info_and_defaults_without_it() -> None:
    hinted = classify_api_error(
        api_error(429, "RESOURCE_EXHAUSTED", details=[{"@type": RETRY_INFO, "retryDelay": "7s"}])
    )
    assert isinstance(hinted, RetryableJobError)
    assert (hinted.kind, hinted.retry_after) == ("rate_limited", 7.0)
    bare = classify_api_error(api_error(429, "RESOURCE_EXHAUSTED"))
    assert (bare.kind, bare.retry_after) == ("rate_limited", DEFAULT_RETRY_AFTER_S)


def test_a_daily_quota_waits_at_least_an_hour() -> None:
    violation = {"quotaId": "GenerateRequestsPerDayPerProjectPerModel"}
    details = [
        {"@type": QUOTA_FAILURE, "violations": [violation]},
        {"@type": RETRY_INFO, "retryDelay": "20s"},
    ]
    assert quota_ids_of({"error": {"details": details}}) == [violation["quotaId"]]
    error = classify_api_error(api_error(429, "RESOURCE_EXHAUSTED", details=details))
    assert error.kind == "rate_limited" and error.retry_after == DAILY_QUOTA_RETRY_AFTER_S
    assert error.detail["quota_ids"] == ["GenerateRequestsPerDayPerProjectPerModel"]


@pytest.mark.parametrize(
    ("code", "status", "mid_stream", "kind", "cls"),
    [
        (503, "UNAVAILABLE", False, "model_unavailable", RetryableJobError),
        (500, "INTERNAL", False, "model_unavailable", RetryableJobError),
        (500, "INTERNAL", True, "stream_interrupted", RetryableJobError),
        (408, "DEADLINE_EXCEEDED", False, "model_unavailable", RetryableJobError),
        (499, "CANCELLED", False, "model_unavailable", RetryableJobError),
        (400, "INVALID_ARGUMENT", False, "model_request_rejected", PermanentJobError),
        (403, "PERMISSION_DENIED", True, "model_request_rejected", PermanentJobError),
        (404, "NOT_FOUND", False, "model_request_rejected", PermanentJobError),
    ],
)
def test_status_codes(code: int, status: str, mid_stream: bool, kind: str, cls: type) -> None:
    error = classify_api_error(api_error(code, status), mid_stream=mid_stream)
    assert type(error) is cls and error.kind == kind
    assert error.detail == {"status_code": code, "status": status}
    assert f"{code} {status}" in error.message


def test_the_api_key_never_reaches_a_message() -> None:
    register_secret(KEY)
    error = classify_api_error(api_error(400, "INVALID_ARGUMENT", f"API key not valid: {KEY}"))
    assert KEY not in error.message and MASK in error.message
    failure = classify(error)
    assert KEY not in failure.message


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (aiohttp.ClientConnectorError(CONNECTION, OSError(111, "refused")), "model_unavailable"),
        (aiohttp.ConnectionTimeoutError(), "model_unavailable"),
        (httpx.ConnectError("refused"), "model_unavailable"),
        (aiohttp.ServerDisconnectedError(), "stream_interrupted"),
        (aiohttp.ClientPayloadError("broken"), "stream_interrupted"),
        (ConnectionResetError(), "stream_interrupted"),
        (httpx.ReadError("reset"), "stream_interrupted"),
        (TimeoutError(), "stream_timeout"),
        (genai_errors.UnknownApiResponseError("garbled"), "stream_interrupted"),
    ],
)
def test_transport_exceptions(exc: BaseException, kind: str) -> None:
    error = translate(exc, received_chunks=2, request_timeout_s=600)
    assert isinstance(error, RetryableJobError) and error.kind == kind


def test_unknown_exceptions_are_left_alone() -> None:
    assert translate(KeyError("ours"), received_chunks=0, request_timeout_s=600) is None
    assert translate(ValueError("ours"), received_chunks=0, request_timeout_s=600) is None


@pytest.mark.parametrize("finish", [None, "STOP", "MAX_TOKENS"])
def test_normal_section_endings(finish: str | None) -> None:
    assert section_finish(chunk(finish)) == finish


@pytest.mark.filterwarnings("ignore:A_REASON_FROM_THE_FUTURE is not a valid FinishReason")
@pytest.mark.parametrize(
    ("finish", "kind", "cls"),
    [
        ("SAFETY", "safety_block", PermanentJobError),
        ("PROHIBITED_CONTENT", "safety_block", PermanentJobError),
        ("BLOCKLIST", "safety_block", PermanentJobError),
        ("SPII", "safety_block", PermanentJobError),
        ("OTHER", "safety_block", PermanentJobError),
        ("RECITATION", "recitation", PermanentJobError),
        ("MALFORMED_FUNCTION_CALL", "model_output_invalid", RetryableJobError),
        ("A_REASON_FROM_THE_FUTURE", "model_output_invalid", RetryableJobError),
    ],
)
def test_abnormal_section_endings(finish: str, kind: str, cls: type) -> None:
    with pytest.raises(cls) as info:
        section_finish(chunk(finish))
    assert info.value.kind == kind


def test_a_blocked_prompt_is_permanent_and_named() -> None:
    with pytest.raises(PermanentJobError) as info:
        section_finish(chunk(block="PROHIBITED_CONTENT"))
    assert info.value.kind == "safety_block"
    assert "(PROHIBITED_CONTENT)" in info.value.user_message


def test_outline_endings() -> None:
    outline_finish(chunk())
    outline_finish(chunk("STOP"))
    with pytest.raises(RetryableJobError) as info:
        outline_finish(chunk("MAX_TOKENS"))  # a cut outline is not valid JSON
    assert info.value.kind == "model_output_invalid"
    with pytest.raises(PermanentJobError):
        outline_finish(chunk("SAFETY"))


def test_silence_and_truncation_count_the_chunks() -> None:
    stall = stalled(90, 3)
    assert stall.kind == "stream_stalled" and stall.detail == {"chunks_received": 3}
    assert "90s" in stall.message
    cut = truncated(4)
    assert cut.kind == "stream_truncated" and cut.detail == {"chunks_received": 4}
