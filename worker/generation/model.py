"""The provider-neutral model interface the chapter pipeline is written against.

Two implementations exist: ``GeminiModel`` (the real API through google-genai)
and ``OfflineModel`` (deterministic text for demos and tests). The pipeline only
sees this module, so provider quirks (enums, wire errors, transports) stay in the
adapter and arrive here as plain strings and ``worker.errors`` exceptions.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, runtime_checkable


@dataclass
class Usage:
    """Token counts of one request (or a sum of requests, via ``+``)."""

    prompt_tokens: int = 0
    output_tokens: int = 0
    thoughts_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, served from Gemini's implicit prefix cache

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.output_tokens + self.thoughts_tokens

    def __add__(self, other: Usage) -> Usage:
        """Add two *requests'* usages (a chapter's bill); never add chunks of one stream."""
        return Usage(
            self.prompt_tokens + other.prompt_tokens,
            self.output_tokens + other.output_tokens,
            self.thoughts_tokens + other.thoughts_tokens,
            self.cached_tokens + other.cached_tokens,
        )


@dataclass(frozen=True)
class Reservation:
    """What one request took from a shared budget: settled once the request is over."""

    model: str
    tokens: int


class RequestBudget(Protocol):
    """A budget every model request takes from first and settles after (the fleet's
    shared Gemini budget, worker/generation/budget.py). Errors are ``JobError``s."""

    async def reserve(self, model: str, tokens: int) -> Reservation:
        """Wait for room (or raise ``RetryableJobError`` when the wait would be too long)."""

    async def settle(
        self, reservation: Reservation, used: Usage | None, error: BaseException | None
    ) -> None:
        """Correct the reservation with the real usage; a 429 in ``error`` cools the model."""


@dataclass(frozen=True)
class Outline:
    """A chapter plan: one bullet per section to stream."""

    title: str
    bullets: list[str]


@runtime_checkable
class SectionStream(Protocol):
    """One streamed section: ``async with model.stream_section(...) as s: async for d in s``.

    The context manager guarantees the underlying connection is closed whatever
    happens in the loop body (break, exception, cancellation). ``finish_reason``
    is set once the stream ended normally ('STOP' or 'MAX_TOKENS'); any other
    ending raises a ``worker.errors.JobError`` from the iteration.
    """

    finish_reason: str | None
    usage: Usage

    async def __aenter__(self) -> SectionStream: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def __aiter__(self) -> AsyncIterator[str]: ...


@runtime_checkable
class TextModel(Protocol):
    """What the pipeline needs from a text model; errors are ``worker.errors.JobError``."""

    name: str

    async def outline(self, *, model: str, system: str, prompt: str) -> tuple[Outline, Usage]: ...

    def stream_section(
        self, *, model: str, system: str, prompt: str, max_output_tokens: int
    ) -> SectionStream: ...

    def open(self) -> None:
        """Build clients now, inside the running loop, rather than on the first job."""

    async def aclose(self) -> None: ...
