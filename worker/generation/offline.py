"""``TextModel`` without a network: deterministic prose for demos and tests.

The text is seeded from the request (sha256 of model, system and prompt), so the
same job always produces the same chapter, and it is paced in small chunks so a
demo shows the chapter growing the way a real stream does.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import re
from types import TracebackType

from worker.generation.model import Outline, Usage

_SECTIONS = re.compile(r"^\s*sections\s*:\s*(\d+)\s*$", re.IGNORECASE | re.MULTILINE)
_DEFAULT_SECTIONS = 5
_MAX_SECTIONS = 50

_NOUNS = (
    "lantern river harbor letter garden road tower bell map window door city sea "
    "mountain village shadow ember thread voice storm orchard bridge"
).split()
_ADJECTIVES = (
    "quiet old silver distant forgotten bright narrow cold patient hidden small restless golden"
).split()
_VERBS = (
    "waited remembered carried crossed opened followed kept promised watched "
    "whispered gathered found"
).split()


def _tokens(text: str) -> int:
    """A rough token count (about four characters per token)."""
    return math.ceil(len(text) / 4)


def _rng(*parts: str) -> random.Random:
    return random.Random(hashlib.sha256("\x1f".join(parts).encode()).digest())


def _sentence(rng: random.Random) -> str:
    subject = f"the {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}"
    obj = f"the {rng.choice(_NOUNS)}"
    when = rng.choice(["dawn", "dusk", "morning", "the end"])
    tail = rng.choice(["", f" by the {rng.choice(_NOUNS)}", f" until {when}"])
    return f"{subject[0].upper()}{subject[1:]} {rng.choice(_VERBS)} {obj}{tail}."


def offline_text(model: str, system: str, prompt: str, words: int) -> str:
    """Deterministic paragraphs of about ``words`` words for a request."""
    rng = _rng(model, system, prompt)
    paragraphs: list[str] = []
    sentences: list[str] = []
    count = 0
    while count < words:
        sentence = _sentence(rng)
        sentences.append(sentence)
        count += len(sentence.split())
        if len(sentences) >= rng.randint(3, 6):
            paragraphs.append(" ".join(sentences))
            sentences = []
    if sentences:
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs) + "\n\n"


_WORDS_HINT = re.compile(r"in about (\d+) words")


class OfflineModel:
    """The offline ``TextModel``.

    Section length is ``words_per_section`` if given, else what the prompt asks for
    ("in about N words"), else about ``0.75 * max_output_tokens`` words; always capped
    at ``max_words_per_section`` so a demo with a large budget still finishes quickly.
    """

    name = "offline"

    def __init__(
        self,
        *,
        chunk_delay_s: float = 0.02,
        min_chunk_chars: int = 20,
        max_chunk_chars: int = 40,
        words_per_section: int | None = None,
        max_words_per_section: int = 400,
    ) -> None:
        if not 0 < min_chunk_chars <= max_chunk_chars:
            raise ValueError("need 0 < min_chunk_chars <= max_chunk_chars")
        self.chunk_delay_s = chunk_delay_s
        self.min_chunk_chars = min_chunk_chars
        self.max_chunk_chars = max_chunk_chars
        self.words_per_section = words_per_section
        self.max_words_per_section = max_words_per_section

    async def outline(self, *, model: str, system: str, prompt: str) -> tuple[Outline, Usage]:
        """``Sections: N`` on a line of the prompt sets the bullet count (default 5)."""
        match = _SECTIONS.search(prompt)
        count = int(match.group(1)) if match else _DEFAULT_SECTIONS
        count = min(max(count, 1), _MAX_SECTIONS)
        rng = _rng("outline", model, system, prompt)
        title = f"The {rng.choice(_ADJECTIVES).title()} {rng.choice(_NOUNS).title()}"
        bullets = [
            f"The {rng.choice(_NOUNS)} {rng.choice(_VERBS)} the {rng.choice(_NOUNS)}"
            for _ in range(count)
        ]
        await asyncio.sleep(self.chunk_delay_s)
        output = _tokens(title + "".join(bullets))
        return Outline(title=title, bullets=bullets), Usage(_tokens(system + prompt), output)

    def stream_section(
        self, *, model: str, system: str, prompt: str, max_output_tokens: int
    ) -> OfflineSectionStream:
        asked = _WORDS_HINT.search(prompt)
        words = self.words_per_section or min(
            int(asked.group(1)) if asked else max(1, int(max_output_tokens * 0.75)),
            self.max_words_per_section,
        )
        text = offline_text(model, system, prompt, words)
        rng = _rng("chunks", model, system, prompt)
        chunks: list[str] = []
        start = 0
        while start < len(text):
            size = rng.randint(self.min_chunk_chars, self.max_chunk_chars)
            chunks.append(text[start : start + size])
            start += size
        return OfflineSectionStream(chunks, _tokens(system + prompt), self.chunk_delay_s)

    def open(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


class OfflineSectionStream:
    """Yields pre-computed chunks with a delay between them; ends with 'STOP'."""

    def __init__(self, chunks: list[str], prompt_tokens: int, delay_s: float) -> None:
        self._chunks = chunks
        self._delay_s = delay_s
        self._next = 0
        self._sent = ""
        self.finish_reason: str | None = None
        self.usage = Usage(prompt_tokens=prompt_tokens)

    async def __aenter__(self) -> OfflineSectionStream:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        return None

    def __aiter__(self) -> OfflineSectionStream:
        return self

    async def __anext__(self) -> str:
        if self._next >= len(self._chunks):
            self.finish_reason = "STOP"
            raise StopAsyncIteration
        if self._next and self._delay_s > 0:
            await asyncio.sleep(self._delay_s)
        chunk = self._chunks[self._next]
        self._next += 1
        self._sent += chunk
        self.usage = Usage(self.usage.prompt_tokens, _tokens(self._sent))
        return chunk
