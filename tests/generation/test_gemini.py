"""GeminiModel through the real google-genai SDK and aiohttp against the wire-level fake."""

from __future__ import annotations

import asyncio
import gc
import json
import math
import socket
import time
from collections.abc import AsyncIterator

import pytest

from tests.support.fake_gemini import (
    Behaviour,
    FakeGemini,
    blocked_prompt,
    disconnect_after,
    finish_with,
    http_error,
    malformed_json,
    max_tokens,
    midstream_error,
    ok,
    safety,
    split_text,
    stall_after,
    truncate_after,
    unanswered_port,
)
from worker.errors import JobError, PermanentJobError, RetryableJobError, classify
from worker.generation.gemini import GeminiModel, GeminiSectionStream
from worker.generation.model import Outline, SectionStream, TextModel
from worker.logs import MASK

KEY = "AIzaFAKE-test-key-0123456789abcdef"
MODEL = "gemini-test"
SYSTEM = "You are a novelist."
PROMPT = "Write section 1 of the chapter."
DAILY = "GenerateRequestsPerDayPerProjectPerModel"


# Timeouts under test are set per test; the defaults are far above any delay a loaded machine
# adds, so a scripted fault (a 500, a disconnect) can never surface as a stall or a timeout.
STALL_S = 120.0  # a scripted silence that outlasts every test (the fake ends it on disconnect)
IDLE_S = 1.0  # the idle timeout of the stall tests


def make_model(fake: FakeGemini, **overrides: object) -> GeminiModel:
    kwargs: dict[str, object] = {
        "api_key": KEY,
        "base_url": fake.base_url,
        "connect_timeout_s": 10.0,
        "idle_timeout_s": 30.0,
        "request_timeout_s": 60.0,
        "max_concurrent_streams": 4,
    }
    kwargs.update(overrides)
    return GeminiModel(**kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def gemini(fake_gemini: FakeGemini) -> AsyncIterator[GeminiModel]:
    model = make_model(fake_gemini)
    yield model
    await model.aclose()


async def collect(
    model: GeminiModel, prompt: str = PROMPT, max_output_tokens: int = 256
) -> tuple[str, GeminiSectionStream]:
    async with model.stream_section(
        model=MODEL, system=SYSTEM, prompt=prompt, max_output_tokens=max_output_tokens
    ) as stream:
        deltas = [delta async for delta in stream]
    assert all(isinstance(d, str) and d for d in deltas)
    return "".join(deltas), stream


def assert_key_hidden(exc: JobError) -> None:
    failure = classify(exc)
    for text in (str(exc), repr(exc), exc.user_message, json.dumps(exc.detail), failure.message):
        assert KEY not in text


async def assert_no_open_streams(fake: FakeGemini, model: GeminiModel) -> None:
    assert await fake.wait_idle(), "the fake still serves a request"
    assert fake.open_streams == 0
    connector = model._sdk_client.session.connector if model._sdk_client.session else None
    if connector is not None:  # aiohttp's checked-out connections (a private, stable attribute)
        assert not connector._acquired


# -- happy paths --------------------------------------------------------------------


async def test_stream_joins_text_keeps_last_usage_and_finishes_stop(
    fake_gemini: FakeGemini, gemini: GeminiModel
) -> None:
    fake_gemini.thoughts_tokens = 12
    fake_gemini.script(ok(chunks=5))
    text, stream = await collect(gemini)

    expected = fake_gemini.expected_text(PROMPT)
    assert text == expected
    assert stream.finish_reason == "STOP"
    record = fake_gemini.requests[-1]
    assert record.chunks_sent == 5
    # The last running total, not a sum over the five chunks.
    assert stream.usage.output_tokens == math.ceil(len(expected) / 4)
    assert stream.usage.prompt_tokens == record.usage["promptTokenCount"]
    assert stream.usage.thoughts_tokens == 12
    await assert_no_open_streams(fake_gemini, gemini)


async def test_models_satisfy_the_protocols(gemini: GeminiModel) -> None:
    assert isinstance(gemini, TextModel)
    assert gemini.name == "gemini"
    stream = gemini.stream_section(model=MODEL, system=SYSTEM, prompt=PROMPT, max_output_tokens=8)
    assert isinstance(stream, SectionStream)


async def test_max_tokens_is_a_normal_end(fake_gemini: FakeGemini, gemini: GeminiModel) -> None:
    fake_gemini.script(max_tokens(2))
    text, stream = await collect(gemini)
    assert stream.finish_reason == "MAX_TOKENS"
    assert text == fake_gemini.requests[-1].text_sent
    assert text and fake_gemini.expected_text(PROMPT).startswith(text)


async def test_stall_shorter_than_idle_timeout_is_fine(
    fake_gemini: FakeGemini, gemini: GeminiModel
) -> None:
    fake_gemini.script(stall_after(2, 0.1))
    text, stream = await collect(gemini)
    assert text == fake_gemini.expected_text(PROMPT)
    assert stream.finish_reason == "STOP"


async def test_outline_parses_structured_json(fake_gemini: FakeGemini, gemini: GeminiModel) -> None:
    outline, usage = await gemini.outline(model=MODEL, system=SYSTEM, prompt=PROMPT)
    expected = fake_gemini.expected_outline(PROMPT)
    assert outline == Outline(title=expected["title"], bullets=expected["bullets"])
    assert usage.output_tokens > 0 and usage.prompt_tokens > 0

    record = fake_gemini.requests[-1]
    assert record.path == f"/v1/models/{MODEL}:generateContent"
    assert record.generation_config["responseMimeType"] == "application/json"
    schema = record.generation_config["responseSchema"]
    assert set(schema["properties"]) == {"title", "bullets"}
    assert record.system == SYSTEM


# -- wire shape and transport -------------------------------------------------------


async def test_stream_request_headers_and_body(
    fake_gemini: FakeGemini, gemini: GeminiModel
) -> None:
    await collect(gemini, max_output_tokens=321)
    record = fake_gemini.requests[-1]
    assert record.method == "POST"
    assert record.path == f"/v1/models/{MODEL}:streamGenerateContent"
    assert record.query == {"alt": "sse"}
    assert record.headers["x-goog-api-key"] == KEY
    assert record.headers["content-type"] == "application/json"
    assert record.headers["user-agent"].startswith("google-genai-sdk/")
    assert record.headers["x-server-timeout"] == "60"  # request_timeout_s, whole seconds
    assert record.body["contents"] == [{"parts": [{"text": PROMPT}], "role": "user"}]
    assert record.body["systemInstruction"]["parts"] == [{"text": SYSTEM}]
    assert record.generation_config["maxOutputTokens"] == 321
    assert "thinkingConfig" not in record.generation_config
    assert "continuation" not in json.dumps(record.body).lower()  # never sent on the wire


async def test_thinking_level_is_sent(fake_gemini: FakeGemini) -> None:
    model = make_model(fake_gemini, thinking_level="LOW")
    try:
        await collect(model)
    finally:
        await model.aclose()
    thinking = fake_gemini.requests[-1].generation_config["thinkingConfig"]
    assert "LOW" in thinking.values()


async def test_transport_is_our_injected_aiohttp_session(
    fake_gemini: FakeGemini, gemini: GeminiModel
) -> None:
    await collect(gemini)
    api_client = gemini._sdk()._api_client
    assert api_client._use_aiohttp()
    assert api_client._http_options.aiohttp_client is gemini._sdk_client.session
    assert not api_client._aiohttp_sessions  # the SDK built no unbounded session of its own
    assert gemini._sdk_client.session is not None
    assert gemini._sdk_client.session.connector is not None
    assert gemini._sdk_client.session.connector.limit == gemini.max_concurrent_streams + 4

    session = gemini._sdk_client.session
    await gemini.aclose()
    assert session.closed
    await gemini.aclose()  # idempotent


async def test_connection_refused_fails_fast_without_hidden_retry() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    model = GeminiModel(api_key=KEY, base_url=f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(RetryableJobError) as info:
            await collect(model)
    finally:
        await model.aclose()
    assert info.value.kind == "model_unavailable"
    assert_key_hidden(info.value)


async def test_a_dropped_connection_is_not_retried_inside_the_sdk() -> None:
    """The SDK's implicit retry (1-10 s sleep, then again) is off: the job-level retry owns
    retries. Counted, not timed: with it on, the error would surface after a second connection."""
    connections = 0

    async def drop(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        writer.close()

    server = await asyncio.start_server(drop, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    model = GeminiModel(api_key=KEY, base_url=f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(RetryableJobError):
            await collect(model)
    finally:
        await model.aclose()
        server.close()
        await server.wait_closed()
    assert connections == 1


async def test_connect_timeout_applies() -> None:
    with unanswered_port() as port:
        model = GeminiModel(
            api_key=KEY,
            base_url=f"http://127.0.0.1:{port}",
            connect_timeout_s=0.3,
            idle_timeout_s=60,
            request_timeout_s=60,
        )
        try:
            with pytest.raises(RetryableJobError) as info:
                await collect(model)
        finally:
            await model.aclose()
    # The connect timeout, not the 60 s request cap (that one would be a stream_timeout).
    assert info.value.kind == "model_unavailable"
    assert "cannot connect to Gemini" in str(info.value)


# -- fault classification -----------------------------------------------------------

FAULTS: list[tuple[str, Behaviour, type[JobError], str, float | None]] = [
    (
        "429 retryDelay 53s",
        http_error(429, retry_delay="53s"),
        RetryableJobError,
        "rate_limited",
        53.0,
    ),
    (
        "429 retryDelay 1.5s",
        http_error(429, retry_delay="1.5s"),
        RetryableJobError,
        "rate_limited",
        1.5,
    ),
    ("429 no RetryInfo", http_error(429), RetryableJobError, "rate_limited", 30.0),
    (
        "429 daily quota",
        http_error(429, retry_delay="20s", quota_id=DAILY),
        RetryableJobError,
        "rate_limited",
        3600.0,
    ),
    ("500", http_error(500), RetryableJobError, "model_unavailable", None),
    ("503", http_error(503), RetryableJobError, "model_unavailable", None),
    ("504", http_error(504), RetryableJobError, "model_unavailable", None),
    ("408", http_error(408), RetryableJobError, "model_unavailable", None),
    ("400", http_error(400), PermanentJobError, "model_request_rejected", None),
    ("401", http_error(401), PermanentJobError, "model_request_rejected", None),
    ("403", http_error(403), PermanentJobError, "model_request_rejected", None),
    ("404", http_error(404), PermanentJobError, "model_request_rejected", None),
    ("hard drop", disconnect_after(2), RetryableJobError, "stream_interrupted", None),
    ("hard drop at once", disconnect_after(0), RetryableJobError, "stream_interrupted", None),
    ("clean truncation", truncate_after(2), RetryableJobError, "stream_truncated", None),
    ("empty stream", truncate_after(0), RetryableJobError, "stream_truncated", None),
    ("mid-stream 500", midstream_error(2), RetryableJobError, "stream_interrupted", None),
    ("mid-stream 503", midstream_error(1, 503), RetryableJobError, "stream_interrupted", None),
    ("error as first event", midstream_error(0, 503), RetryableJobError, "model_unavailable", None),
    ("safety", safety(2), PermanentJobError, "safety_block", None),
    ("prohibited", finish_with("PROHIBITED_CONTENT"), PermanentJobError, "safety_block", None),
    ("blocklist", finish_with("BLOCKLIST"), PermanentJobError, "safety_block", None),
    ("spii", finish_with("SPII"), PermanentJobError, "safety_block", None),
    ("other", finish_with("OTHER"), PermanentJobError, "safety_block", None),
    ("language", finish_with("LANGUAGE"), PermanentJobError, "safety_block", None),
    ("recitation", finish_with("RECITATION"), PermanentJobError, "recitation", None),
    ("blocked prompt", blocked_prompt(), PermanentJobError, "safety_block", None),
    (
        "malformed response",
        finish_with("MALFORMED_RESPONSE"),
        RetryableJobError,
        "model_output_invalid",
        None,
    ),
]


@pytest.mark.parametrize(
    ("behaviour", "error_type", "kind", "retry_after"),
    [pytest.param(*case[1:], id=case[0]) for case in FAULTS],
)
async def test_stream_faults_are_classified(
    fake_gemini: FakeGemini,
    gemini: GeminiModel,
    behaviour: Behaviour,
    error_type: type[JobError],
    kind: str,
    retry_after: float | None,
) -> None:
    fake_gemini.script(behaviour)
    with pytest.raises(JobError) as info:
        await collect(gemini)
    exc = info.value
    assert type(exc) is error_type
    assert exc.kind == kind
    assert exc.retryable is (error_type is RetryableJobError)
    assert exc.retry_after == retry_after
    assert exc.user_message and "Traceback" not in exc.user_message
    assert_key_hidden(exc)
    await assert_no_open_streams(fake_gemini, gemini)
    # The model is still usable afterwards.
    fake_gemini.reset()
    text, _ = await collect(gemini)
    assert text == fake_gemini.expected_text(PROMPT)


async def test_safety_message_is_readable(fake_gemini: FakeGemini, gemini: GeminiModel) -> None:
    fake_gemini.script(safety(1), blocked_prompt("PROHIBITED_CONTENT"))
    with pytest.raises(PermanentJobError) as info:
        await collect(gemini)
    assert info.value.user_message == (
        "The model declined to write this section because it was flagged by Gemini's safety "
        "filters (SAFETY). Try changing the premise or instructions."
    )
    with pytest.raises(PermanentJobError) as info:
        await collect(gemini)
    assert "(PROHIBITED_CONTENT)" in info.value.user_message


@pytest.mark.parametrize("chunks_first", [1, 0], ids=["mid-stream", "before-the-first-chunk"])
async def test_idle_stall_is_cut_by_the_idle_timeout(
    fake_gemini: FakeGemini, chunks_first: int
) -> None:
    model = make_model(fake_gemini, idle_timeout_s=IDLE_S)
    fake_gemini.script(stall_after(chunks_first, STALL_S))
    started = time.monotonic()
    try:
        with pytest.raises(RetryableJobError) as info:
            await collect(model)
        elapsed = time.monotonic() - started
        # Cut by the idle timer (the silence would end the stream cleanly, as a truncation),
        # and not before it: a lower bound, which a slow machine can only make truer.
        assert info.value.kind == "stream_stalled"
        assert elapsed >= IDLE_S * 0.9
        await assert_no_open_streams(fake_gemini, model)
    finally:
        await model.aclose()
    assert fake_gemini.requests[-1].client_disconnected


async def test_request_timeout_caps_the_whole_stream(fake_gemini: FakeGemini) -> None:
    model = make_model(fake_gemini, idle_timeout_s=30.0, request_timeout_s=1.0)
    fake_gemini.script(ok(chunks=240, delay_s=0.25))  # 60 s in all, no gap over 0.25 s
    try:
        with pytest.raises(RetryableJobError) as info:
            await collect(model)
        # Cut by the 1 s cap: uncut, the stream would end normally after 60 s, no error.
        assert info.value.kind == "stream_timeout"
        assert "exceeded 1s" in str(info.value)
        await assert_no_open_streams(fake_gemini, model)
    finally:
        await model.aclose()


async def test_outline_invalid_output_is_retryable(
    fake_gemini: FakeGemini, gemini: GeminiModel
) -> None:
    cases = [
        malformed_json(),
        ok(text=""),
        ok(text="[1, 2]"),
        ok(text='{"title": "T"}'),
        ok(text='{"title": "T", "bullets": []}'),
        ok(text='{"title": "T", "bullets": ["", "  "]}'),
        max_tokens(1),
    ]
    fake_gemini.script(*cases)
    for _ in cases:
        with pytest.raises(RetryableJobError) as info:
            await gemini.outline(model=MODEL, system=SYSTEM, prompt=PROMPT)
        assert info.value.kind == "model_output_invalid"


async def test_outline_errors_are_classified(fake_gemini: FakeGemini, gemini: GeminiModel) -> None:
    fake_gemini.script(
        http_error(429, retry_delay="7s"),
        http_error(404),
        blocked_prompt(),
        finish_with("SAFETY"),
        http_error(503),
    )
    expected = [
        ("rate_limited", 7.0),
        ("model_request_rejected", None),
        ("safety_block", None),
        ("safety_block", None),
        ("model_unavailable", None),
    ]
    for kind, retry_after in expected:
        with pytest.raises(JobError) as info:
            await gemini.outline(model=MODEL, system=SYSTEM, prompt=PROMPT)
        assert (info.value.kind, info.value.retry_after) == (kind, retry_after)
        assert_key_hidden(info.value)


async def test_api_key_is_never_in_error_messages(
    fake_gemini: FakeGemini, gemini: GeminiModel
) -> None:
    # Even if the service echoed the key, our messages must not carry it.
    fake_gemini.script(
        http_error(400, message=f"API key not valid: {KEY}. Please pass a valid API key."),
        midstream_error(1),
    )
    with pytest.raises(PermanentJobError) as info:
        await collect(gemini)
    assert "400 INVALID_ARGUMENT" in info.value.message
    assert MASK in info.value.message
    assert_key_hidden(info.value)
    with pytest.raises(RetryableJobError) as retry_info:
        await collect(gemini)
    assert_key_hidden(retry_info.value)


# -- closing streams: cancellation, early exits, leaks ------------------------------


async def test_cancelling_the_consumer_closes_the_stream(
    fake_gemini: FakeGemini, gemini: GeminiModel
) -> None:
    fake_gemini.script(ok(chunks=50, delay_s=0.05))
    first = asyncio.Event()

    async def consume() -> None:
        async with gemini.stream_section(
            model=MODEL, system=SYSTEM, prompt=PROMPT, max_output_tokens=256
        ) as stream:
            async for _ in stream:
                first.set()

    task = asyncio.create_task(consume())
    await first.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_no_open_streams(fake_gemini, gemini)
    record = fake_gemini.requests[-1]
    assert record.client_disconnected and not record.completed
    assert record.chunks_sent < 50


async def test_cancel_during_loop_body_closes_the_stream(
    fake_gemini: FakeGemini, gemini: GeminiModel
) -> None:
    fake_gemini.script(ok(chunks=50, delay_s=0.02))
    first = asyncio.Event()

    async def consume() -> None:
        async with gemini.stream_section(
            model=MODEL, system=SYSTEM, prompt=PROMPT, max_output_tokens=256
        ) as stream:
            async for _ in stream:
                first.set()
                await asyncio.sleep(10)  # e.g. a slow database write

    task = asyncio.create_task(consume())
    await first.wait()
    await asyncio.sleep(0.1)  # let chunks pile up in the client's buffer
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await assert_no_open_streams(fake_gemini, gemini)
    assert fake_gemini.requests[-1].client_disconnected


async def test_exception_in_loop_body_propagates_and_closes(
    fake_gemini: FakeGemini, gemini: GeminiModel
) -> None:
    fake_gemini.script(ok(chunks=50, delay_s=0.02))

    class DbWriteFailed(Exception):
        pass

    with pytest.raises(DbWriteFailed):
        async with gemini.stream_section(
            model=MODEL, system=SYSTEM, prompt=PROMPT, max_output_tokens=256
        ) as stream:
            async for _ in stream:
                raise DbWriteFailed
    await assert_no_open_streams(fake_gemini, gemini)


async def test_no_connection_leak_after_30_early_exits(fake_gemini: FakeGemini) -> None:
    model = make_model(fake_gemini, max_concurrent_streams=2)  # connector limit: 6

    async def break_early(model: GeminiModel) -> None:
        async with model.stream_section(
            model=MODEL, system=SYSTEM, prompt=PROMPT, max_output_tokens=256
        ) as stream:
            async for _ in stream:
                break

    async def raise_in_body(model: GeminiModel) -> None:
        async with model.stream_section(
            model=MODEL, system=SYSTEM, prompt=PROMPT, max_output_tokens=256
        ) as stream:
            async for _ in stream:
                raise KeyError("db")

    async def cancel_mid_stream(model: GeminiModel) -> None:
        first = asyncio.Event()  # cancel once a chunk arrived: the request surely went out

        async def consume() -> None:
            async with model.stream_section(
                model=MODEL, system=SYSTEM, prompt=PROMPT, max_output_tokens=256
            ) as stream:
                async for _ in stream:
                    first.set()

        task = asyncio.create_task(consume())
        async with asyncio.timeout(30):
            await first.wait()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    scenarios = [
        (ok(chunks=30, delay_s=0.01), break_early),
        (ok(chunks=30), break_early),  # everything already buffered
        (ok(chunks=30, delay_s=0.01), raise_in_body),
        (ok(chunks=30, delay_s=0.01), cancel_mid_stream),
        (disconnect_after(1), collect),
        (midstream_error(1), collect),
        (safety(1), collect),
        (truncate_after(1), collect),
        (blocked_prompt(), collect),
        (http_error(503), collect),
    ]
    gc.disable()  # releasing connections must not depend on the garbage collector
    try:
        for i in range(30):
            behaviour, run = scenarios[i % len(scenarios)]
            fake_gemini.script(behaviour)
            try:
                await run(model)
            except (JobError, KeyError):
                pass
        async with asyncio.timeout(30):  # a leaked pool would hang here
            text, stream = await collect(model)
        assert text == fake_gemini.expected_text(PROMPT)
        assert stream.finish_reason == "STOP"
        await assert_no_open_streams(fake_gemini, model)
        assert len(fake_gemini.requests) == 31
    finally:
        gc.enable()
        await model.aclose()


async def test_concurrent_stream_limit_is_respected(fake_gemini: FakeGemini) -> None:
    model = make_model(fake_gemini, max_concurrent_streams=2)
    fake_gemini.default = ok(chunks=4, delay_s=0.05)
    try:
        results = await asyncio.gather(*(collect(model, prompt=f"p{i}") for i in range(5)))
    finally:
        await model.aclose()
    assert [text for text, _ in results] == [fake_gemini.expected_text(f"p{i}") for i in range(5)]
    assert fake_gemini.max_open_streams == 2
    assert len(fake_gemini.requests) == 5


async def test_cancel_while_waiting_for_a_slot_frees_nothing_twice(
    fake_gemini: FakeGemini,
) -> None:
    model = make_model(fake_gemini, max_concurrent_streams=1)
    fake_gemini.script(ok(chunks=4, delay_s=0.5))  # "a" holds the one slot for 2 s
    try:
        running = asyncio.create_task(collect(model, prompt="a"))
        async with asyncio.timeout(30):
            while fake_gemini.open_streams == 0:  # noqa: ASYNC110 (no event to wait on)
                await asyncio.sleep(0.01)
        waiting = asyncio.create_task(collect(model, prompt="b"))
        await asyncio.sleep(0.05)  # "b" queues for the slot "a" holds
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)
        await running
        await asyncio.gather(collect(model, prompt="c"), collect(model, prompt="d"))
    finally:
        await model.aclose()
    assert fake_gemini.max_open_streams == 1
    assert [r.prompt for r in fake_gemini.requests] == ["a", "c", "d"]


async def test_requests_per_minute_limit(fake_gemini: FakeGemini) -> None:
    # 240 RPM = a burst of 40, then 4 per second: the 41st and 42nd wait ~0.25 s each.
    model = make_model(fake_gemini, requests_per_minute=240)
    started = time.monotonic()
    try:
        await asyncio.gather(
            *(model.outline(model=MODEL, system=SYSTEM, prompt=PROMPT) for _ in range(42))
        )
    finally:
        await model.aclose()
    assert time.monotonic() - started >= 0.4
    assert len(fake_gemini.requests) == 42


async def test_iterating_without_async_with_is_an_error(gemini: GeminiModel) -> None:
    stream = gemini.stream_section(model=MODEL, system=SYSTEM, prompt=PROMPT, max_output_tokens=8)
    with pytest.raises(RuntimeError, match="async with"):
        await stream.__anext__()


def test_fake_split_text_is_lossless() -> None:
    text = "abcdefghij" * 7
    assert "".join(split_text(text, chunks=6)) == text
    assert len(split_text(text, chunks=6)) == 6
    assert "".join(split_text(text, chunk_chars=9)) == text


async def test_open_builds_the_client_before_the_first_call(fake_gemini: FakeGemini) -> None:
    model = make_model(fake_gemini)
    try:
        model.open()
        client = model._sdk_client.client
        assert client is not None
        await model.outline(model=MODEL, system="s", prompt="Sections: 3")
        assert model._sdk_client.client is client  # the first call reused it
    finally:
        await model.aclose()
