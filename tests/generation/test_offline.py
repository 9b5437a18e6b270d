"""OfflineModel: deterministic, paced, and a drop-in ``TextModel``."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from worker.generation.model import Outline, SectionStream, TextModel, Usage
from worker.generation.offline import OfflineModel

SYSTEM = "You are a novelist."


async def collect(model: OfflineModel, prompt: str, max_output_tokens: int = 200) -> list[str]:
    async with model.stream_section(
        model="offline", system=SYSTEM, prompt=prompt, max_output_tokens=max_output_tokens
    ) as stream:
        chunks = [chunk async for chunk in stream]
    assert stream.finish_reason == "STOP"
    return chunks


def test_usage_adds_requests() -> None:
    total = Usage(10, 20, 3) + Usage(1, 2, 0)
    assert total == Usage(prompt_tokens=11, output_tokens=22, thoughts_tokens=3)
    assert total.total_tokens == 36


async def test_protocol_conformance() -> None:
    model = OfflineModel(chunk_delay_s=0)
    assert isinstance(model, TextModel)
    assert model.name == "offline"
    stream = model.stream_section(model="m", system=SYSTEM, prompt="p", max_output_tokens=10)
    assert isinstance(stream, SectionStream)
    assert stream.finish_reason is None and stream.usage.output_tokens == 0
    await model.aclose()


async def test_output_is_deterministic_per_prompt() -> None:
    model = OfflineModel(chunk_delay_s=0)
    first = await collect(model, "Chapter 1, section 1")
    again = await collect(OfflineModel(chunk_delay_s=0), "Chapter 1, section 1")
    other = await collect(model, "Chapter 1, section 2")
    assert first == again
    assert "".join(first) != "".join(other)


async def test_chunk_sizes_and_usage() -> None:
    model = OfflineModel(chunk_delay_s=0)
    async with model.stream_section(
        model="m", system=SYSTEM, prompt="p", max_output_tokens=200
    ) as stream:
        chunks = [chunk async for chunk in stream]
    assert all(20 <= len(c) <= 40 for c in chunks[:-1])
    text = "".join(chunks)
    assert stream.usage.output_tokens == math.ceil(len(text) / 4)
    assert stream.usage.prompt_tokens == math.ceil(len(SYSTEM + "p") / 4)


async def test_section_length_follows_the_token_budget_with_a_cap() -> None:
    model = OfflineModel(chunk_delay_s=0, max_words_per_section=400)
    short = "".join(await collect(model, "p", max_output_tokens=40))
    capped = "".join(await collect(model, "p", max_output_tokens=100_000))
    assert 30 <= len(short.split()) <= 45  # ~0.75 words per token
    assert 400 <= len(capped.split()) <= 420
    fixed = OfflineModel(chunk_delay_s=0, words_per_section=50)
    assert 50 <= len("".join(await collect(fixed, "p", max_output_tokens=10)).split()) <= 65


async def test_pacing_shows_progress() -> None:
    model = OfflineModel(chunk_delay_s=0.01, words_per_section=60)
    started = time.monotonic()
    chunks = await collect(model, "paced")
    elapsed = time.monotonic() - started
    assert len(chunks) > 5
    assert elapsed >= (len(chunks) - 1) * 0.01 * 0.9


async def test_cancellation_propagates() -> None:
    model = OfflineModel(chunk_delay_s=0.05)
    task = asyncio.create_task(collect(model, "slow"))
    await asyncio.sleep(0.12)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_outline_sections_from_prompt() -> None:
    model = OfflineModel(chunk_delay_s=0)
    outline, usage = await model.outline(model="m", system=SYSTEM, prompt="A tale.\nSections: 3\n")
    assert isinstance(outline, Outline)
    assert len(outline.bullets) == 3 and outline.title
    assert usage.prompt_tokens > 0 and usage.output_tokens > 0
    default, _ = await model.outline(model="m", system=SYSTEM, prompt="A tale.")
    assert len(default.bullets) == 5
    again, _ = await model.outline(model="m", system=SYSTEM, prompt="A tale.")
    assert again == default


def test_story_preferences_reach_the_prompt_within_the_option_caps() -> None:
    """A row that holds more (stored before the check constraint) is cut to the caps."""
    from worker.generation.payload import TEXT_OPTIONS, ChapterOptions
    from worker.generation.prompts import style_lines

    prefs = {"genre": "g" * 1_100_000, "pov": "p\x00" * 500, "tone": ["not", "text"]}
    lines = style_lines(ChapterOptions(), prefs)
    assert lines == [f"Genre: {'g' * TEXT_OPTIONS['genre']}", f"Point of view: {'p' * 60}"]
