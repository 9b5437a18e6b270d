"""The four confirmed actions against the real database, and what refuses them."""

from __future__ import annotations

import uuid

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from tests.dashboard.conftest import csrf_of, dashboard_client
from tests.dashboard.test_pages import failed_job, running_chapter
from tests.support.seed import chapter_job, insert_jobs


async def status_of(conn: asyncpg.Connection, job: str) -> str:
    return await conn.fetchval("select status from job_queue where id = $1", job)


async def confirm_and_post(client: TestClient, job: str, action: str) -> tuple[str, object]:
    """Open the confirmation page (a GET changes nothing), then press its button."""
    page = await client.get(f"/jobs/{job}/{action}")
    assert page.status == 200
    html = await page.text()
    assert f'action="/jobs/{job}/{action}"' in html and 'name="confirm" value="yes"' in html
    resp = await client.post(
        f"/jobs/{job}/{action}",
        data={"csrf": csrf_of(html), "confirm": "yes"},
        allow_redirects=False,
    )
    return html, resp


async def test_cancel_a_running_chapter(client: TestClient, conn: asyncpg.Connection) -> None:
    _, chapter, job = await running_chapter(conn, "Kept text.")
    html, resp = await confirm_and_post(client, job, "cancel")
    assert "stops at its next heartbeat" in html
    assert await status_of(conn, job) == "cancelled"
    assert resp.status == 303 and resp.headers["Location"] == f"/jobs/{job}?done=cancel"
    page = await (await client.get(resp.headers["Location"])).text()
    assert "Cancel done." in page and 'class="pill cancelled"' in page
    row = await conn.fetchrow("select status, content from chapters where id = $1", chapter)
    assert (row["status"], row["content"]) == ("cancelled", "Kept text.")
    assert await conn.fetchval("select update_job_heartbeat($1, 'worker-7')", job) is False


async def test_pause_then_resume(client: TestClient, conn: asyncpg.Connection) -> None:
    _, chapter, job = await chapter_job(conn)
    _, resp = await confirm_and_post(client, job, "pause")
    assert resp.status == 303 and await status_of(conn, job) == "paused"
    assert await conn.fetchval("select status from chapters where id = $1", chapter) == "paused"
    html = await (await client.get(f"/jobs/{job}")).text()
    assert 'id="action-resume"' in html and 'id="action-pause"' not in html
    _, resp = await confirm_and_post(client, job, "resume")
    assert resp.status == 303 and await status_of(conn, job) == "pending"
    retries = await conn.fetchval("select retry_count from job_queue where id = $1", job)
    assert retries == 0


async def test_retry_a_failed_job(client: TestClient, conn: asyncpg.Connection) -> None:
    job = await failed_job(conn)
    _, resp = await confirm_and_post(client, job, "retry")
    assert resp.status == 303
    row = await conn.fetchrow("select status, retry_count from job_queue where id = $1", job)
    assert (row["status"], row["retry_count"]) == ("pending", 0)


@pytest.mark.parametrize(
    ("action", "state"),
    [("retry", "pending"), ("resume", "pending"), ("cancel", "cancelled"), ("pause", "paused")],
)
async def test_an_action_that_does_not_apply_changes_nothing(
    client: TestClient, conn: asyncpg.Connection, action: str, state: str
) -> None:
    [job] = await insert_jobs(conn, 1)
    if state != "pending":
        await conn.execute("update job_queue set status = $2 where id = $1", job, state)
    html, resp = await confirm_and_post(client, job, action)
    assert "nothing would change" in html  # the confirmation page says so up front
    assert resp.status == 409
    assert "Nothing changed" in await resp.text()
    assert await status_of(conn, job) == state


async def test_get_never_acts(client: TestClient, conn: asyncpg.Connection) -> None:
    [job] = await insert_jobs(conn, 1)
    for action in ("cancel", "pause", "retry", "resume"):
        assert (await client.get(f"/jobs/{job}/{action}")).status == 200
    assert await status_of(conn, job) == "pending"


async def test_post_without_csrf_is_refused(client: TestClient, conn: asyncpg.Connection) -> None:
    [job] = await insert_jobs(conn, 1)
    await client.get("/")  # a session, but no token sent
    for data in ({"confirm": "yes"}, {"confirm": "yes", "csrf": "forged"}, {"csrf": ""}):
        resp = await client.post(f"/jobs/{job}/cancel", data=data, allow_redirects=False)
        assert resp.status == 403 and "CSRF token missing or wrong" in await resp.text()
    assert await status_of(conn, job) == "pending"


async def test_csrf_token_of_another_session_is_refused(
    db_dsn: str, client: TestClient, conn: asyncpg.Connection
) -> None:
    [job] = await insert_jobs(conn, 1)
    theirs = csrf_of(await (await client.get(f"/jobs/{job}/cancel")).text())
    async with dashboard_client(db_dsn) as other:
        await other.get("/")
        resp = await other.post(
            f"/jobs/{job}/cancel", data={"csrf": theirs, "confirm": "yes"}, allow_redirects=False
        )
        assert resp.status == 403
    # A cross-site form post arrives without the SameSite=Strict cookie: no session at all.
    async with aiohttp.ClientSession() as cookieless:
        fresh = await cookieless.post(
            client.make_url(f"/jobs/{job}/cancel"),
            data={"csrf": theirs, "confirm": "yes"},
            allow_redirects=False,
        )
        assert fresh.status == 403
    assert await status_of(conn, job) == "pending"


async def test_post_without_confirmation_is_refused(
    client: TestClient, conn: asyncpg.Connection
) -> None:
    [job] = await insert_jobs(conn, 1)
    token = csrf_of(await (await client.get(f"/jobs/{job}/cancel")).text())
    resp = await client.post(f"/jobs/{job}/cancel", data={"csrf": token}, allow_redirects=False)
    assert resp.status == 400 and "needs confirmation" in await resp.text()
    assert await status_of(conn, job) == "pending"


async def test_actions_on_unknown_or_malformed_jobs(
    client: TestClient, conn: asyncpg.Connection
) -> None:
    [job] = await insert_jobs(conn, 1)
    token = csrf_of(await (await client.get(f"/jobs/{job}/cancel")).text())
    missing = str(uuid.uuid4())
    for action in ("cancel", "pause", "resume", "retry"):
        resp = await client.post(
            f"/jobs/{missing}/{action}", data={"csrf": token, "confirm": "yes"}
        )
        assert resp.status == 404, action
    resp = await client.post("/jobs/123/cancel", data={"csrf": token, "confirm": "yes"})
    assert resp.status == 400
    resp = await client.post(f"/jobs/{job}/delete", data={"csrf": token, "confirm": "yes"})
    assert resp.status == 404
    assert await status_of(conn, job) == "pending"


async def test_an_oversized_post_is_refused_whole(
    client: TestClient, conn: asyncpg.Connection
) -> None:
    [job] = await insert_jobs(conn, 1)
    token = csrf_of(await (await client.get(f"/jobs/{job}/cancel")).text())
    resp = await client.post(
        f"/jobs/{job}/cancel", data={"csrf": token, "confirm": "yes", "pad": "x" * 200_000}
    )
    assert resp.status == 413
    assert await status_of(conn, job) == "pending"
