"""Fixtures for the model-layer tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tests.support.fake_gemini import FakeGemini, start_fake_gemini
from worker.generation.gemini import GeminiModel
from worker.generation.gemini_embed import GeminiEmbedder
from worker.store import Store
from worker.store.postgres import PostgresTransport


@pytest_asyncio.fixture
async def fake_gemini() -> AsyncIterator[FakeGemini]:
    """A fresh fake Gemini server per test, on 127.0.0.1 and a free port."""
    fake = await start_fake_gemini()
    try:
        yield fake
    finally:
        await fake.close()


@pytest.fixture
async def model(fake_gemini: FakeGemini) -> AsyncIterator[GeminiModel]:
    m = GeminiModel(
        api_key="test-key-123",
        base_url=fake_gemini.base_url,
        idle_timeout_s=3.0,  # far above a loaded machine's chunk gaps; only the stall trips it
        request_timeout_s=60,
    )
    yield m
    await m.aclose()


@pytest.fixture
async def store(db_dsn: str) -> AsyncIterator[Store]:
    s = await Store(PostgresTransport(db_dsn)).open()
    yield s
    await s.close()


@pytest.fixture
async def embedder(fake_gemini: FakeGemini) -> AsyncIterator[GeminiEmbedder]:
    e = GeminiEmbedder(
        api_key="test-key-123", model="gemini-embedding-001", base_url=fake_gemini.base_url
    )
    e.open()
    yield e
    await e.aclose()
