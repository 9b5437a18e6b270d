"""``TextModel`` on Gemini through the official google-genai async client.

Design decisions (the wire and SDK facts behind them: docs/gemini-wire.md):

* **Transport: aiohttp, injected explicitly.** The SDK silently picks aiohttp
  whenever it is importable (we install it for the health endpoint), so we make
  that choice visible and own the session: a ``TCPConnector`` bounded to the
  stream limit (the SDK's own is unlimited) with a socket-connect timeout. aiohttp
  is also the transport that releases pooled connections on early exit and
  mid-stream errors; httpx/httpx2 leak them until cyclic GC runs (docs/gemini-wire.md §6).
  Its per-request ``ClientTimeout(total=...)`` is a cap on the *whole* request,
  which is exactly what ``request_timeout_s`` means here.
* **Idle timeout in the app**, with ``asyncio.timeout`` around each ``__anext__``:
  cancelling inside ``__anext__`` is what releases the connection, and it works
  the same on every transport.
* **No SDK retries.** The job queue retries with backoff and honours
  ``retry_after``; SDK retries would ignore ``RetryInfo`` and multiply attempts.
  ``HttpRetryOptions(attempts=1)`` also disables aiohttp's hidden 1-10 s retry.
* **The fleet's budget first** (``budget``, docs/gemini-budget.md): after the local slot,
  each request takes one request and an estimate of its tokens (prompt chars / 4 + the
  output cap) from the model's shared budget, and settles the real usage (or the 429)
  after it. The local RPM limiter stays as a per-process safety cap.
* **Every ending is classified** (gemini_errors.py) into ``worker.errors`` exceptions,
  so the pipeline never sees SDK enums, ``APIError`` or transport exceptions.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from types import TracebackType
from typing import Any

import aiohttp
from aiolimiter import AsyncLimiter
from google import genai
from google.genai import types
from pydantic import BaseModel, ValidationError, field_validator

from worker.errors import JobError
from worker.generation.gemini_errors import (
    invalid_output,
    outline_finish,
    section_finish,
    stalled,
    translate,
    truncated,
)
from worker.generation.model import Outline, RequestBudget, Reservation, Usage
from worker.logs import register_secret


def gemini_session(connect_timeout_s: float, max_connections: int) -> aiohttp.ClientSession:
    """The aiohttp session of a Gemini client: our socket-connect timeout, a cap on sockets,
    and trust_env like the SDK's own session (HTTPS_PROXY in deployments)."""
    connector = _ConnectTimeoutConnector(connect_timeout_s=connect_timeout_s, limit=max_connections)
    return aiohttp.ClientSession(connector=connector, trust_env=True, read_bufsize=2**22)


class SdkClient:
    """The google-genai client both the text and the embedding models use: our own aiohttp
    session (from ``new_session``), one timeout, and the SDK's own retries off (ours decide;
    docs/gemini-wire.md). Built on first use, inside the running loop: aiohttp sessions bind
    to the loop that creates them, so the models' constructors stay loop-free."""

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None,
        api_version: str | None,
        timeout_s: float,
        new_session: Callable[[], aiohttp.ClientSession],
    ) -> None:
        self._api_key = api_key
        self._base_url, self._api_version = base_url, api_version
        self._timeout_ms = int(timeout_s * 1000)
        self._new_session = new_session
        self.session: aiohttp.ClientSession | None = None
        self.client: genai.Client | None = None

    def get(self) -> genai.Client:
        if self.client is None:
            self.session = self._new_session()
            self.client = genai.Client(
                api_key=self._api_key,
                vertexai=False,
                http_options=types.HttpOptions(
                    base_url=self._base_url,
                    api_version=self._api_version,
                    timeout=self._timeout_ms,
                    retry_options=types.HttpRetryOptions(attempts=1),
                    aiohttp_client=self.session,
                ),
            )
        return self.client

    async def aclose(self) -> None:
        client, session = self.client, self.session
        self.client = self.session = None
        if client is not None:
            await client.aio.aclose()
        if session is not None:  # injected: the SDK leaves it to us
            await session.close()


class _OutlineSchema(BaseModel):
    """The ``responseSchema`` sent for the outline call, and the check of the answer
    (``response.parsed`` would hide a bad answer as ``None``)."""

    title: str
    bullets: list[str]

    @field_validator("bullets")
    @classmethod
    def _some_bullets(cls, bullets: list[str]) -> list[str]:
        clean = [bullet.strip() for bullet in bullets if bullet.strip()]
        if not clean:
            raise ValueError("no non-blank bullets")
        return clean


def _parse_outline(text: str | None) -> Outline:
    try:
        parsed = _OutlineSchema.model_validate_json(text or "")
    except ValidationError as exc:
        first = exc.errors()[0]  # location and reason only: never the model's text
        where = ".".join(str(part) for part in first["loc"]) or "the document"
        raise invalid_output(f"outline JSON invalid at {where}: {first['msg']}") from None
    return Outline(title=parsed.title.strip(), bullets=parsed.bullets)


class _ConnectTimeoutConnector(aiohttp.TCPConnector):
    """A ``TCPConnector`` that applies our socket-connect timeout.

    The SDK passes ``ClientTimeout(total=...)`` on every request, which replaces
    the session's timeout object, so a connect timeout set on the session would be
    ignored; the connector is the one place that sees every request's timeout.
    """

    def __init__(self, *, connect_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._connect_timeout_s = connect_timeout_s

    async def connect(
        self,
        req: Any,
        traces: Any,
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 (aiohttp's)
    ) -> Any:
        timeout = aiohttp.ClientTimeout(
            total=timeout.total,
            connect=timeout.connect,
            sock_read=timeout.sock_read,
            sock_connect=self._connect_timeout_s,
            ceil_threshold=timeout.ceil_threshold,
        )
        return await super().connect(req, traces, timeout)


OUTLINE_OUTPUT_ESTIMATE = 1024  # tokens reserved for the outline's answer (it has no cap)


def estimate_tokens(system: str, prompt: str, max_output_tokens: int) -> int:
    """What a request may cost before it is sent: its text at 4 characters a token
    (Gemini's rule of thumb for English) plus the most it may write."""
    return (len(system) + len(prompt)) // 4 + 1 + max_output_tokens


class _Limiter:
    """Per-process admission: at most N requests in flight and an RPM budget.

    The semaphore is taken first so a request waiting for a slot does not burn
    rate tokens. The rate bucket holds ten seconds' worth of requests, so no
    60-second window sees much more than ``requests_per_minute`` (a bucket of a
    full minute would allow close to twice that in the first minute).
    """

    def __init__(self, max_concurrent: int, requests_per_minute: float | None) -> None:
        if max_concurrent < 1:
            raise ValueError("max_concurrent_streams must be >= 1")
        self._slots = asyncio.Semaphore(max_concurrent)
        self._rate: AsyncLimiter | None = None
        if requests_per_minute:
            burst = max(1, int(requests_per_minute // 6))
            self._rate = AsyncLimiter(burst, 60.0 * burst / requests_per_minute)

    async def acquire(self) -> None:
        await self._slots.acquire()
        try:
            if self._rate is not None:
                await self._rate.acquire()
        except BaseException:
            self._slots.release()
            raise

    def release(self) -> None:
        self._slots.release()


class GeminiModel:
    """The Gemini ``TextModel``. Create one per process and ``await aclose()`` it.

    ``idle_timeout_s`` is the longest allowed gap between chunks, including the
    wait for the first one (thinking time), so keep it above the worst case.
    ``request_timeout_s`` caps a whole request; it must exceed the longest section.
    """

    name = "gemini"

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str | None = None,
        api_version: str = "v1",
        connect_timeout_s: float = 10.0,
        idle_timeout_s: float = 120.0,
        request_timeout_s: float = 600.0,
        max_concurrent_streams: int = 50,
        requests_per_minute: float | None = None,
        thinking_level: str | None = None,
        budget: RequestBudget | None = None,
    ) -> None:
        if not api_key:
            raise ValueError("api_key is required")
        register_secret(api_key)  # masked in every error message and log line
        self._connect_timeout_s = connect_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.request_timeout_s = request_timeout_s
        self.max_concurrent_streams = max_concurrent_streams
        self._thinking_level = thinking_level
        self._limiter = _Limiter(max_concurrent_streams, requests_per_minute)
        self.budget = budget
        self._sdk_client = SdkClient(
            api_key=api_key,
            base_url=base_url,
            api_version=api_version,
            timeout_s=request_timeout_s,
            # The semaphore is the real bound; the connector caps sockets even if a stream
            # escaped it, with headroom for connections still closing.
            new_session=lambda: gemini_session(connect_timeout_s, max_concurrent_streams + 4),
        )

    # -- client lifecycle ---------------------------------------------------------

    def _sdk(self) -> genai.Client:
        return self._sdk_client.get()

    def open(self) -> None:
        """Build the session and SDK client up front: the first construction costs about
        0.2 s of event-loop time (TLS context, lazy imports), better spent at start-up
        than in the middle of the first job's stream."""
        self._sdk()

    async def aclose(self) -> None:
        await self._sdk_client.aclose()

    # -- calls --------------------------------------------------------------------

    def _config(self, system: str, **kwargs: Any) -> types.GenerateContentConfig:
        thinking = (
            types.ThinkingConfig(thinking_level=types.ThinkingLevel(self._thinking_level))
            if self._thinking_level
            else None
        )
        return types.GenerateContentConfig(
            system_instruction=system or None,
            thinking_config=thinking,
            # Our drops and truncations must reach the job queue, not be resumed
            # (and billed) behind our back; AFC is irrelevant without tools.
            automatic_continuation=False,
            automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True),
            **kwargs,
        )

    async def outline(self, *, model: str, system: str, prompt: str) -> tuple[Outline, Usage]:
        """One non-streaming structured-JSON call; bad JSON is retryable."""
        client = self._sdk()
        await self._limiter.acquire()
        try:
            reservation = await self._reserve(
                model, estimate_tokens(system, prompt, OUTLINE_OUTPUT_ESTIMATE)
            )
        except BaseException:
            self._limiter.release()
            raise
        usage: Usage | None = None
        failure: BaseException | None = None
        try:
            response = await client.aio.models.generate_content(
                model=model,
                contents=prompt,
                config=self._config(
                    system,
                    response_mime_type="application/json",
                    response_schema=_OutlineSchema,
                ),
            )
            usage = _usage(response.usage_metadata) or Usage()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if (error := self._translate(exc, received_chunks=0)) is None:
                raise
            failure = error
            raise error from exc
        finally:
            self._limiter.release()
            await self._settle(reservation, usage, failure)

        outline_finish(response)
        return _parse_outline(response.text), usage

    def stream_section(
        self, *, model: str, system: str, prompt: str, max_output_tokens: int
    ) -> GeminiSectionStream:
        config = self._config(system, max_output_tokens=max_output_tokens)
        estimate = estimate_tokens(system, prompt, max_output_tokens)
        return GeminiSectionStream(
            self, model=model, prompt=prompt, config=config, estimate=estimate
        )

    async def _reserve(self, model: str, tokens: int) -> Reservation | None:
        if self.budget is None:
            return None
        return await self.budget.reserve(model, tokens)

    async def _settle(
        self, reservation: Reservation | None, usage: Usage | None, error: BaseException | None
    ) -> None:
        if self.budget is not None and reservation is not None:
            # Shielded: a cancelled job still gives back what it did not use.
            await asyncio.shield(self.budget.settle(reservation, usage, error))

    def _translate(self, exc: BaseException, *, received_chunks: int) -> JobError | None:
        return translate(
            exc, received_chunks=received_chunks, request_timeout_s=self.request_timeout_s
        )


class GeminiSectionStream:
    """One streamed section. Use only as ``async with``: ``__aexit__`` closes the stream.

    The request is sent on the first ``__anext__``. Any abnormal ending raises a
    ``JobError`` from iteration after the HTTP stream has been released.
    """

    def __init__(
        self,
        owner: GeminiModel,
        *,
        model: str,
        prompt: str,
        config: types.GenerateContentConfig,
        estimate: int = 0,
    ) -> None:
        self._owner = owner
        self._estimate = estimate
        self._reservation: Reservation | None = None
        self._error: BaseException | None = None
        self._model = model
        self._prompt = prompt
        self._config = config
        self._agen: AsyncIterator[types.GenerateContentResponse] | None = None
        self._started = False
        self._done = False
        self._holds_slot = False
        self._chunks = 0
        self.finish_reason: str | None = None
        self.usage = Usage()

    async def __aenter__(self) -> GeminiSectionStream:
        client = self._owner._sdk()
        await self._owner._limiter.acquire()
        self._holds_slot = True
        try:
            self._reservation = await self._owner._reserve(self._model, self._estimate)
            # Sends nothing yet: returns the SDK's async generator.
            self._agen = await client.aio.models.generate_content_stream(
                model=self._model, contents=self._prompt, config=self._config
            )
        except BaseException as exc:
            self._release()
            reservation, self._reservation = self._reservation, None
            await self._owner._settle(reservation, None, exc)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._close_stream()
        finally:
            self._release()
            reservation, self._reservation = self._reservation, None
            await self._owner._settle(
                reservation, self.usage if self._chunks else None, self._error
            )

    def __aiter__(self) -> GeminiSectionStream:
        return self

    async def __anext__(self) -> str:
        if self._agen is None:
            raise RuntimeError("use `async with model.stream_section(...)` before iterating")
        while not self._done:
            self._started = True
            idle = asyncio.timeout(self._owner.idle_timeout_s)
            try:
                async with idle:
                    chunk = await self._agen.__anext__()
            except StopAsyncIteration:
                self._done = True
                if self.finish_reason is None:
                    raise truncated(self._chunks) from None
                raise
            except asyncio.CancelledError:
                self._done = True  # __aexit__ still aborts, in case a chunk had arrived
                raise
            except Exception as exc:
                self._done = True  # an exception out of the generator finished it
                if isinstance(exc, TimeoutError) and idle.expired():
                    raise stalled(self._owner.idle_timeout_s, self._chunks) from exc
                if (error := self._owner._translate(exc, received_chunks=self._chunks)) is None:
                    raise
                self._error = error
                raise error from exc

            self._chunks += 1
            try:
                text = self._absorb(chunk)
            except JobError:
                await self._close_stream()
                raise
            if text:
                return text
        raise StopAsyncIteration

    def _absorb(self, chunk: types.GenerateContentResponse) -> str:
        """Record usage and finish reason; raise on blocked or unusable endings."""
        usage = _usage(chunk.usage_metadata)
        if usage is not None:
            self.usage = usage  # a running total: keep the last, never sum
        finish = section_finish(chunk)
        if finish is not None:
            self.finish_reason = finish
        return chunk.text or ""

    async def _close_stream(self) -> None:
        agen, self._done = self._agen, True
        if agen is None:
            return
        if not self._started:
            if isinstance(agen, AsyncGenerator):
                await agen.aclose()  # never sent: nothing to release
            return
        await _abort(agen)

    def _release(self) -> None:
        if self._holds_slot:
            self._holds_slot = False
            self._owner._limiter.release()


async def _abort(agen: AsyncIterator[Any]) -> None:
    """Close a started SDK stream by cancelling inside ``__anext__`` (docs/gemini-wire.md §6).

    ``break`` or ``aclose()`` leave the generator that owns the HTTP response
    suspended; a cancellation delivered inside ``__anext__`` unwinds all of them.
    A chunk may already be buffered, in which case ``__anext__`` returns it
    before seeing the cancel, so repeat until the generator is finished.
    """
    while True:
        step = asyncio.ensure_future(agen.__anext__())
        try:
            await asyncio.sleep(0)  # let the step start reading
        finally:
            step.cancel()
        try:
            await step
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise  # our own cancellation: keep propagating it
            return
        except BaseException:  # StopAsyncIteration, API or transport error: finished
            return


def _usage(meta: types.GenerateContentResponseUsageMetadata | None) -> Usage | None:
    if meta is None:
        return None
    return Usage(
        prompt_tokens=meta.prompt_token_count or 0,
        output_tokens=meta.candidates_token_count or 0,
        thoughts_tokens=meta.thoughts_token_count or 0,
        cached_tokens=meta.cached_content_token_count or 0,
    )
