"""Fixtures for the SQL suites."""

from __future__ import annotations

import asyncpg
import pytest

from tests.support.seed import claimed_chapter, create_chapter, create_story, create_user


@pytest.fixture
async def alice(conn: asyncpg.Connection) -> dict[str, str]:
    user = await create_user(conn, "alice@example.test")
    story = await create_story(conn, user)
    chapter = await create_chapter(conn, story, user, 1, "Arrival")
    return {"user": user, "story": story, "chapter": chapter}


@pytest.fixture
async def running(conn: asyncpg.Connection) -> dict[str, str]:
    """A chapter whose generation job is claimed by worker 'w'."""
    return await claimed_chapter(conn)
