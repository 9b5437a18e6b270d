"""Fixtures for the model-layer tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio

from tests.support.fake_gemini import FakeGemini, start_fake_gemini


@pytest_asyncio.fixture
async def fake_gemini() -> AsyncIterator[FakeGemini]:
    """A fresh fake Gemini server per test, on 127.0.0.1 and a free port."""
    fake = await start_fake_gemini()
    try:
        yield fake
    finally:
        await fake.close()
