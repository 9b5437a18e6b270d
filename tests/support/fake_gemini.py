"""A local fake of the Gemini API that speaks the real wire format.

It serves the same bytes the real service does (docs/gemini-wire.md §1-4), so tests run the
unmodified google-genai SDK over the transport we ship:

* ``POST /{version}/models/{model}:streamGenerateContent?alt=sse`` answers with
  ``data: {json}\\r\\n\\r\\n`` events, ``text/event-stream``, chunked;
* ``POST /{version}/models/{model}:generateContent`` answers with one JSON object;
* ``POST /{version}/models/{model}:batchEmbedContents`` (what the SDK's ``embed_content``
  sends) and ``:embedContent`` answer with embeddings (docs/gemini-wire.md §7): hashed
  word features (``worker.generation.embeddings.hashed_embedding``), so texts that share
  rare words are close and retrieval can be tested; deterministic; like the real service
  not normalized below 3072 dimensions; more than 100 requests in a batch is a 400;
* errors are ``application/json`` ``{"error": {...}}`` bodies with
  ``google.rpc.RetryInfo`` / ``QuotaFailure`` details.

Faults are scripted *per request*: ``fake.script(b1, b2, ...)`` queues behaviours
that the next requests consume in order; when the queue is empty ``fake.default``
(normally ``ok()``) answers. Every request is recorded in ``fake.requests``.

Quotas and caching, as the real service does them (docs/gemini-budget.md):

* ``rpm`` / ``tpm``: one global budget per model across all connections, over a sliding
  60-second window (tokens: the prompt's at admission, the output's once sent); past
  either, a 429 ``RESOURCE_EXHAUSTED`` with a ``QuotaFailure`` (quotaId ``...PerMinute...``)
  and a ``RetryInfo`` saying when the window has room again. ``rpd`` likewise per day
  (quotaId ``...PerDay``, retryDelay to the end of the day);
* implicit prefix caching: the longest prefix of (system instruction + contents) that an
  earlier request to the same model began with, in 64-character blocks, is reported as
  ``cachedContentTokenCount`` when it is at least ``cache_min_tokens``.

Usage::

    fake = await start_fake_gemini()
    fake.script(http_error(429, retry_delay="53s"), ok())
    ... GeminiModel(api_key="k", base_url=fake.base_url) ...
    await fake.close()
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import math
import random
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from worker.generation.embeddings import hashed_embedding

_WORDS = (
    "the river lantern quiet morning stone harbor wind letter garden old road night "
    "silver door found under above among mountain city sea winter light small bright "
    "shadow voice remembered carried across village bell distant whisper ember map "
    "forgotten tower thread window slowly again promised kept open"
).split()

_QUOTA_METRIC = "generativelanguage.googleapis.com/generate_content_requests"
_STATUS_TEXT = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    408: "DEADLINE_EXCEEDED",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
    502: "UNAVAILABLE",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
_MESSAGES = {
    400: "Request contains an invalid argument.",
    401: "Request had invalid authentication credentials.",
    403: "The caller does not have permission.",
    404: "models/unknown is not found for API version v1.",
    429: "You exceeded your current quota, please check your plan and billing details.",
    500: "An internal error has occurred.",
    503: "The model is overloaded. Please try again later.",
}


# -- scripted behaviours ------------------------------------------------------------


@dataclass(frozen=True)
class Behaviour:
    """What the fake does for one request. Build with the factory functions below."""

    kind: str
    after: int = 0  # text chunks sent before the fault
    text: str | None = None  # None: deterministic text derived from the request
    chunks: int | None = None  # split the text into exactly this many chunks
    chunk_chars: int | None = None  # else chunks of about this many characters
    delay_s: float | None = None  # between chunks; None: the fake's pace
    seconds: float = 0.0  # stall length
    status: int = 200
    status_text: str | None = None
    message: str | None = None
    retry_delay: str | None = None
    quota_id: str | None = None
    reason: str | None = None  # finishReason or blockReason


def ok(
    text: str | None = None,
    *,
    chunks: int | None = None,
    chunk_chars: int | None = None,
    delay_s: float | None = None,
) -> Behaviour:
    """A normal answer ending with finishReason STOP."""
    return Behaviour("ok", text=text, chunks=chunks, chunk_chars=chunk_chars, delay_s=delay_s)


def http_error(
    status: int,
    status_text: str | None = None,
    *,
    message: str | None = None,
    retry_delay: str | float | None = None,
    quota_id: str | None = None,
) -> Behaviour:
    """A non-200 JSON error; ``retry_delay`` (``"53s"`` or seconds) adds a RetryInfo."""
    if isinstance(retry_delay, int | float):
        retry_delay = f"{retry_delay:g}s"
    return Behaviour(
        "http_error",
        status=status,
        status_text=status_text,
        message=message,
        retry_delay=retry_delay,
        quota_id=quota_id,
    )


def disconnect_after(n_chunks: int, *, delay_s: float | None = None) -> Behaviour:
    """Send ``n_chunks`` then drop the TCP connection (RST, no chunk terminator)."""
    return Behaviour("disconnect", after=n_chunks, delay_s=delay_s)


def stall_after(n_chunks: int, seconds: float) -> Behaviour:
    """Send ``n_chunks``, go silent for ``seconds``, then finish normally."""
    return Behaviour("stall", after=n_chunks, seconds=seconds)


def truncate_after(n_chunks: int) -> Behaviour:
    """Send ``n_chunks`` then end the body cleanly with no finishReason."""
    return Behaviour("truncate", after=n_chunks)


def midstream_error(n_chunks: int, code: int = 500, status_text: str | None = None) -> Behaviour:
    """Send ``n_chunks`` then a ``data: {"error": ...}`` event."""
    return Behaviour("midstream_error", after=n_chunks, status=code, status_text=status_text)


def finish_with(reason: str, n_chunks: int = 1) -> Behaviour:
    """Send ``n_chunks`` then a final chunk with an empty content and ``reason``."""
    return Behaviour("finish", after=n_chunks, reason=reason)


def safety(n_chunks: int = 1, reason: str = "SAFETY") -> Behaviour:
    """A safety stop after some text, as real streams do (empty final content)."""
    return finish_with(reason, n_chunks)


def blocked_prompt(reason: str = "PROHIBITED_CONTENT") -> Behaviour:
    """One ``promptFeedback.blockReason`` event and a normal end."""
    return Behaviour("blocked_prompt", reason=reason)


def max_tokens(n_chunks: int = 2) -> Behaviour:
    """Send ``n_chunks`` of text, the last one carrying finishReason MAX_TOKENS."""
    return Behaviour("max_tokens", after=n_chunks)


def malformed_json(text: str = '{"title": "Broken", "bullets": [') -> Behaviour:
    """A 200 whose model text is not valid JSON (for the structured outline call)."""
    return Behaviour("malformed_json", text=text)


# -- recording ----------------------------------------------------------------------


@dataclass
class RecordedRequest:
    """One request as the fake saw it, plus what it sent back."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # lower-cased names
    body: Any
    model: str
    action: str  # 'streamGenerateContent' or 'generateContent'
    behaviour: Behaviour
    started_at: float = field(default_factory=time.monotonic)
    text_sent: str = ""
    chunks_sent: int = 0
    usage: dict[str, int] | None = None
    client_disconnected: bool = False
    completed: bool = False
    rate_limited: str | None = None  # the quotaId of a 429 the fake's own quotas sent
    cached_tokens: int = 0
    quota_slot: list[float] | None = None  # [time, tokens] in its model's window

    @property
    def prompt(self) -> str:
        return prompt_of(self.body)

    @property
    def system(self) -> str | None:
        parts = ((self.body or {}).get("systemInstruction") or {}).get("parts") or []
        return "".join(p.get("text", "") for p in parts) if parts else None

    @property
    def generation_config(self) -> dict[str, Any]:
        return (self.body or {}).get("generationConfig") or {}


def prompt_of(body: Any) -> str:
    """The user text of a request body (all text parts of all contents)."""
    contents = (body or {}).get("contents") or []
    return "\n".join(
        part.get("text", "")
        for content in contents
        for part in content.get("parts") or []
        if isinstance(part, dict)
    )


def default_text(prompt: str, words: int = 80) -> str:
    """Deterministic prose for a prompt: the fake's answer when a test gives none."""
    rng = random.Random(hashlib.sha256(prompt.encode()).digest())
    out: list[str] = []
    sentence = 0
    for _ in range(words):
        word = rng.choice(_WORDS)
        out.append(word.capitalize() if sentence == 0 else word)
        sentence += 1
        if sentence >= rng.randint(6, 12):
            out[-1] += "."
            sentence = 0
    return " ".join(out).rstrip(".") + "."


def default_outline(prompt: str, bullets: int = 3) -> dict[str, Any]:
    """Deterministic outline JSON (``title`` + ``bullets``) for a prompt."""
    rng = random.Random(hashlib.sha256(b"outline:" + prompt.encode()).digest())
    title = " ".join(rng.choice(_WORDS) for _ in range(3)).title()
    return {
        "title": f"The {title}",
        "bullets": [
            f"Section {i + 1}: the {rng.choice(_WORDS)} and the {rng.choice(_WORDS)}"
            for i in range(bullets)
        ],
    }


def split_text(text: str, *, chunks: int | None = None, chunk_chars: int = 100) -> list[str]:
    """Split into ``chunks`` near-equal pieces, or pieces of ``chunk_chars``."""
    if not text:
        return [""] if chunks is None else [""] * chunks
    if chunks is None:
        return [text[i : i + chunk_chars] for i in range(0, len(text), chunk_chars)]
    size = len(text) / chunks
    return [text[round(i * size) : round((i + 1) * size)] for i in range(chunks)]


def _tokens(chars: int) -> int:
    return math.ceil(chars / 4)


CACHE_BLOCK_CHARS = 64
QUOTA_WINDOW_S = 60.0


@dataclass
class _ModelQuota:
    """One model's sliding minute: admitted requests as [time, tokens] (tokens grow as
    the output is sent), and the day's count."""

    window: collections.deque[list[float]] = field(default_factory=collections.deque)
    tokens: float = 0.0
    day_requests: int = 0

    def expire(self, now: float) -> None:
        while self.window and self.window[0][0] <= now - QUOTA_WINDOW_S:
            self.tokens -= self.window.popleft()[1]


# -- the server ---------------------------------------------------------------------


class FakeGemini:
    """The fake server. Start with ``await start_fake_gemini()``; close with ``close()``.

    ``chunks_per_second`` paces every stream (for benchmarks and progress demos);
    ``thoughts_tokens`` adds a thoughtsTokenCount to usage, as thinking models do.
    """

    def __init__(
        self,
        *,
        chunk_chars: int = 100,
        chunks_per_second: float | None = None,
        default_words: int = 80,
        outline_bullets: int = 3,
        thoughts_tokens: int = 0,
        model_version: str = "gemini-fake",
        rpm: int | None = None,
        tpm: int | None = None,
        rpd: int | None = None,
        cache_min_tokens: int = 4096,
    ) -> None:
        self.chunk_chars = chunk_chars
        self.chunks_per_second = chunks_per_second
        self.default_words = default_words
        self.outline_bullets = outline_bullets
        self.thoughts_tokens = thoughts_tokens
        self.model_version = model_version
        self.rpm, self.tpm, self.rpd = rpm, tpm, rpd
        self.cache_min_tokens = cache_min_tokens
        self._quotas: dict[str, _ModelQuota] = {}
        self._prefixes: dict[str, set[bytes]] = {}
        self.default: Behaviour = ok()
        self.requests: list[RecordedRequest] = []
        self.open_streams = 0
        self.max_open_streams = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self._queue: list[Behaviour] = []
        self._idle = asyncio.Event()
        self._idle.set()
        self._runner: web.AppRunner | None = None
        self._ids = 0
        self.base_url = ""

    # -- control --------------------------------------------------------------------

    def script(self, *behaviours: Behaviour) -> None:
        """Queue behaviours for the next requests, in order."""
        self._queue.extend(behaviours)

    @property
    def pending(self) -> list[Behaviour]:
        return list(self._queue)

    def reset(self) -> None:
        """Forget the script, the records and the peaks (open counts stay live)."""
        self._queue.clear()
        self.requests.clear()
        self.default = ok()
        self.max_open_streams = self.open_streams
        self.max_in_flight = self.in_flight

    def expected_text(self, prompt: str) -> str:
        """The text a default ``ok()`` stream sends for this prompt."""
        return default_text(prompt, self.default_words)

    def expected_outline(self, prompt: str) -> dict[str, Any]:
        return default_outline(prompt, self.outline_bullets)

    async def wait_idle(self, within_s: float = 15.0) -> bool:
        """Wait until no request is being served (disconnects are noticed async)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within_s):
                await self._idle.wait()
        return self.in_flight == 0

    async def start(self) -> FakeGemini:
        app = web.Application()
        app.router.add_post("/{version}/models/{tail}", self._handle)
        # handler_cancellation: a client that goes away cancels the handler, so
        # open_streams drops as soon as the client closes its end.
        self._runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.base_url = f"http://{host}:{port}"
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> FakeGemini:
        return await self.start()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # -- serving --------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        model, _, action = request.match_info["tail"].partition(":")
        try:
            body = await request.json()
        except ValueError:
            body = None
        behaviour = self._queue.pop(0) if self._queue else self.default
        record = RecordedRequest(
            method=request.method,
            path=request.path,
            query=dict(request.query),
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
            model=model,
            action=action,
            behaviour=behaviour,
        )
        self.requests.append(record)
        if behaviour.kind != "http_error" and (limited := self._admit(record)) is not None:
            return self._error_response(limited)
        if behaviour.kind != "http_error":
            record.cached_tokens = self._cached_tokens(record)
        streaming = action == "streamGenerateContent"
        self.in_flight += 1
        self._idle.clear()
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        if streaming:
            self.open_streams += 1
            self.max_open_streams = max(self.max_open_streams, self.open_streams)
        try:
            if behaviour.kind == "http_error":
                return self._error_response(behaviour)
            if action in ("batchEmbedContents", "embedContent"):
                return await self._embed(request, record, behaviour)
            if streaming:
                return await self._stream(request, record, behaviour)
            return await self._unary(request, record, behaviour)
        except (ConnectionResetError, asyncio.CancelledError):
            record.client_disconnected = True
            raise
        finally:
            self.in_flight -= 1
            if not self.in_flight:
                self._idle.set()
            if streaming:
                self.open_streams -= 1

    # -- quotas and caching ---------------------------------------------------------------

    def _admit(self, record: RecordedRequest) -> Behaviour | None:
        """Count the request against its model's minute (and day), or say which quota it
        is past: a 429 with a RetryInfo for when the window has room again."""
        if self.rpm is None and self.tpm is None and self.rpd is None:
            return None
        quota = self._quotas.setdefault(record.model, _ModelQuota())
        now = time.monotonic()
        quota.expire(now)
        prompt = _tokens(len(record.prompt) + len(record.system or ""))
        room_at = quota.window[0][0] + QUOTA_WINDOW_S if quota.window else now
        if self.rpd is not None and quota.day_requests >= self.rpd:
            record.rate_limited = "GenerateRequestsPerDayPerProjectPerModel"
            delay = 3600.0
        elif self.rpm is not None and len(quota.window) >= self.rpm:
            record.rate_limited = "GenerateRequestsPerMinutePerProjectPerModel"
            delay = room_at - now
        elif self.tpm is not None and quota.tokens + prompt > self.tpm and quota.window:
            record.rate_limited = "GenerateContentInputTokensPerModelPerMinute"
            delay = room_at - now
        else:
            record.quota_slot = [now, float(prompt)]
            quota.window.append(record.quota_slot)
            quota.tokens += prompt
            quota.day_requests += 1
            return None
        return http_error(
            429, retry_delay=f"{max(delay, 0.001):.3f}s", quota_id=record.rate_limited
        )

    def _count_output(self, record: RecordedRequest, tokens: int) -> None:
        """Output tokens join the minute's token count as they are sent."""
        slot = record.quota_slot
        quota = self._quotas.get(record.model)
        if slot is None or quota is None:
            return
        grown = float(tokens) + _tokens(len(record.prompt) + len(record.system or "")) - slot[1]
        if grown > 0 and any(s is slot for s in quota.window):
            slot[1] += grown
            quota.tokens += grown

    def _cached_tokens(self, record: RecordedRequest) -> int:
        """Implicit caching: the longest earlier-seen prefix, in whole blocks."""
        text = ((record.system or "") + "\n" + record.prompt).encode()
        seen = self._prefixes.setdefault(record.model, set())
        digest = hashlib.sha256()
        cached = 0
        for end in range(CACHE_BLOCK_CHARS, len(text) + 1, CACHE_BLOCK_CHARS):
            digest.update(text[end - CACHE_BLOCK_CHARS : end])
            key = digest.digest()
            if key in seen and cached == end - CACHE_BLOCK_CHARS:
                cached = end
            seen.add(key)
        tokens = _tokens(cached)
        return tokens if tokens >= self.cache_min_tokens else 0

    @property
    def rate_limited(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.rate_limited]

    async def _embed(
        self, request: web.Request, record: RecordedRequest, b: Behaviour
    ) -> web.StreamResponse:
        if b.kind == "disconnect":
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        response: web.StreamResponse = await _embed_response(self, record, b)
        return response

    @property
    def embed_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.action in ("batchEmbedContents", "embedContent")]

    def _error_response(self, b: Behaviour) -> web.Response:
        status_text = b.status_text or _STATUS_TEXT.get(b.status, "UNKNOWN")
        details: list[dict[str, Any]] = []
        if b.quota_id:
            details.append(
                {
                    "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                    "violations": [
                        {
                            "quotaMetric": _QUOTA_METRIC,
                            "quotaId": b.quota_id,
                            "quotaDimensions": {"location": "global", "model": "gemini-fake"},
                            "quotaValue": "100",
                        }
                    ],
                }
            )
        if b.retry_delay:
            details.append(
                {
                    "@type": "type.googleapis.com/google.rpc.RetryInfo",
                    "retryDelay": b.retry_delay,
                }
            )
        error: dict[str, Any] = {
            "code": b.status,
            "message": b.message or _MESSAGES.get(b.status, "Error."),
            "status": status_text,
        }
        if details:
            error["details"] = details
        return web.json_response({"error": error}, status=b.status)

    def _usage(self, record: RecordedRequest, output_chars: int) -> dict[str, int]:
        prompt = _tokens(len(record.prompt) + len(record.system or ""))
        output = _tokens(output_chars)
        usage = {"promptTokenCount": prompt}
        if record.cached_tokens:
            usage["cachedContentTokenCount"] = min(record.cached_tokens, prompt)
        if output:
            usage["candidatesTokenCount"] = output
        if self.thoughts_tokens:
            usage["thoughtsTokenCount"] = self.thoughts_tokens
        usage["totalTokenCount"] = prompt + output + self.thoughts_tokens
        record.usage = usage
        self._count_output(record, usage["totalTokenCount"])
        return usage

    def _event(
        self, record: RecordedRequest, text: str | None, finish: str | None = None
    ) -> dict[str, Any]:
        candidate: dict[str, Any] = {
            "content": {"parts": [{"text": text}] if text else [], "role": "model"},
            "index": 0,
        }
        if finish:
            candidate["finishReason"] = finish
        if text:
            record.text_sent += text
        return {
            "candidates": [candidate],
            "usageMetadata": self._usage(record, len(record.text_sent)),
            "modelVersion": self.model_version,
            "responseId": f"fake-{self._ids}",
        }

    def _pieces(self, record: RecordedRequest, b: Behaviour) -> list[str]:
        text = b.text if b.text is not None else self.expected_text(record.prompt)
        pieces = split_text(text, chunks=b.chunks, chunk_chars=b.chunk_chars or self.chunk_chars)
        if b.kind != "ok" and len(pieces) <= b.after:
            pieces = split_text(text, chunks=b.after + 1)  # always room for n chunks
        return pieces

    def _delay(self, b: Behaviour) -> float:
        if b.delay_s is not None:
            return b.delay_s
        return 1.0 / self.chunks_per_second if self.chunks_per_second else 0.0

    async def _stream(
        self, request: web.Request, record: RecordedRequest, b: Behaviour
    ) -> web.StreamResponse:
        self._ids += 1
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        delay = self._delay(b)

        async def send(event: dict[str, Any]) -> None:
            if record.chunks_sent and delay:
                await asyncio.sleep(delay)
            await resp.write(b"data: " + json.dumps(event).encode() + b"\r\n\r\n")
            record.chunks_sent += 1

        if b.kind == "blocked_prompt":
            usage = self._usage(record, 0)
            await send(
                {
                    "promptFeedback": {"blockReason": b.reason},
                    "usageMetadata": usage,
                    "modelVersion": self.model_version,
                }
            )
        elif b.kind == "ok":
            pieces = self._pieces(record, b)
            for i, piece in enumerate(pieces):
                last = i == len(pieces) - 1
                await send(self._event(record, piece, "STOP" if last else None))
        else:
            pieces = self._pieces(record, b)
            head = pieces[: b.after]
            for i, piece in enumerate(head):
                last = i == len(head) - 1
                finish = "MAX_TOKENS" if b.kind == "max_tokens" and last else None
                await send(self._event(record, piece, finish))
            if b.kind == "disconnect":
                await asyncio.sleep(0.01)  # let the sent chunks leave the socket
                assert request.transport is not None
                request.transport.abort()
                record.completed = True
                return resp
            if b.kind == "stall":
                await asyncio.sleep(b.seconds)
                rest = pieces[b.after :] or [""]
                for i, piece in enumerate(rest):
                    await send(self._event(record, piece, "STOP" if i == len(rest) - 1 else None))
            elif b.kind == "midstream_error":
                status_text = b.status_text or _STATUS_TEXT.get(b.status, "INTERNAL")
                await send(
                    {
                        "error": {
                            "code": b.status,
                            "status": status_text,
                            "message": _MESSAGES.get(b.status, "Error."),
                        }
                    }
                )
            elif b.kind == "finish":
                await send(self._event(record, None, b.reason))
            elif b.kind == "malformed_json":
                await send(self._event(record, b.text, "STOP"))
            # "truncate" and "max_tokens": nothing more.
        await resp.write_eof()
        record.completed = True
        return resp

    async def _unary(
        self, request: web.Request, record: RecordedRequest, b: Behaviour
    ) -> web.StreamResponse:
        self._ids += 1
        config = record.generation_config
        if b.kind == "disconnect":
            assert request.transport is not None
            request.transport.abort()
            return web.Response()
        if b.kind == "stall":
            await asyncio.sleep(b.seconds)
        if b.kind == "blocked_prompt":
            payload: dict[str, Any] = {
                "promptFeedback": {"blockReason": b.reason},
                "usageMetadata": self._usage(record, 0),
            }
            return web.json_response(payload)
        if b.text is not None:
            text = b.text
        elif config.get("responseMimeType") == "application/json":
            text = json.dumps(self.expected_outline(record.prompt))
        else:
            text = self.expected_text(record.prompt)
        finish = {"finish": b.reason, "max_tokens": "MAX_TOKENS", "truncate": None}.get(
            b.kind, "STOP"
        )
        event = self._event(record, None if b.kind == "finish" else text, finish)
        record.chunks_sent = 1
        record.completed = True
        return web.json_response(event)


EMBED_BATCH_LIMIT = 100
FULL_DIMENSIONS = 3072


def fake_embedding(text: str, dimensions: int = FULL_DIMENSIONS) -> list[float]:
    """The fake's vector for a text: hashed word features, unit length only at the full
    3072 dimensions (as the real API), scaled by 3 below it; a text without words gets a
    fixed direction rather than zeros."""
    vector = hashed_embedding(text, dimensions)
    if not any(vector):
        vector[0] = 1.0
    norm = math.sqrt(sum(x * x for x in vector))
    scale = 1.0 / norm if dimensions == FULL_DIMENSIONS else 3.0 / norm
    return [round(x * scale, 7) for x in vector]


def _embed_text(request: Any) -> str:
    content = (request or {}).get("content") or {}
    return "\n".join(
        part.get("text", "") for part in content.get("parts") or [] if isinstance(part, dict)
    )


async def _embed_response(fake: FakeGemini, record: RecordedRequest, b: Behaviour) -> Any:
    """One ``embedContent`` or ``batchEmbedContents`` answer for ``record``."""
    body = record.body if isinstance(record.body, dict) else {}
    batch = record.action == "batchEmbedContents"
    requests = body.get("requests") if batch else [body]
    if not isinstance(requests, list) or not requests:
        return fake._error_response(http_error(400, message="requests must not be empty."))
    if len(requests) > EMBED_BATCH_LIMIT:
        return fake._error_response(
            http_error(
                400,
                message=f"* BatchEmbedContentsRequest.requests: at most {EMBED_BATCH_LIMIT} "
                "requests can be in one batch",
            )
        )
    if b.kind == "stall":
        await asyncio.sleep(b.seconds)
    vectors = []
    for item in requests:
        dims = int((item or {}).get("outputDimensionality") or FULL_DIMENSIONS)
        vectors.append({"values": fake_embedding(_embed_text(item), dims)})
        record.text_sent += _embed_text(item)
    record.completed = True
    record.chunks_sent = 1
    return web.json_response({"embeddings": vectors} if batch else {"embedding": vectors[0]})


async def start_fake_gemini(**kwargs: Any) -> FakeGemini:
    """Start a fake on 127.0.0.1:<free port>; the caller must ``await fake.close()``."""
    return await FakeGemini(**kwargs).start()


__all__ = [
    "Behaviour",
    "FakeGemini",
    "RecordedRequest",
    "blocked_prompt",
    "default_outline",
    "default_text",
    "disconnect_after",
    "fake_embedding",
    "finish_with",
    "http_error",
    "malformed_json",
    "max_tokens",
    "midstream_error",
    "ok",
    "prompt_of",
    "safety",
    "split_text",
    "stall_after",
    "start_fake_gemini",
    "truncate_after",
]


@contextlib.contextmanager
def unanswered_port() -> Iterator[int]:
    """A loopback port where connect() hangs: a listener whose accept queue is full drops
    further SYNs (what an unreachable or overloaded host looks like)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    port = server.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            filler.connect(("127.0.0.1", port))
        fillers.append(filler)
    try:
        yield port
    finally:
        for s in [server, *fillers]:
            s.close()
