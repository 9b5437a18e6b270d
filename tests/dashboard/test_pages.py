"""Every dashboard page against the real database: overview, live, jobs, job detail."""

from __future__ import annotations

import json
import uuid

import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from tests.dashboard.conftest import dashboard_client
from tests.support.seed import FAIL_UPDATE, chapter_job, claim, insert_jobs
from worker.dashboard.security import COOKIE
from worker.dashboard.views import STORE


async def running_chapter(conn: asyncpg.Connection, text: str = "The tide came in.") -> tuple:
    """A chapter job claimed by worker-7 with some text written: (user, chapter, job)."""
    user, chapter, job = await chapter_job(conn)
    assert str((await claim(conn, "worker-7", ["chapter_generation"]))["job_id"]) == job
    await conn.fetchval("select start_chapter_generation($1, 'worker-7', 100)", job)
    await conn.fetchval(
        "select append_chapter_content($1, 'worker-7', 0, $2, 42, 'section 2/5: the tide')",
        job,
        text,
    )
    return user, chapter, job


async def failed_job(conn: asyncpg.Connection, job_type: str = "noop") -> str:
    [job] = await insert_jobs(conn, 1, job_type=job_type)
    await claim(conn, "worker-9", [job_type])
    details = {"type": "model_request_rejected", "message": "Gemini error 400 <b>bad</b>"}
    await conn.fetch(FAIL_UPDATE, job, "worker-9", "failed", 0, None, json.dumps(details))
    return job


# -------------------------------------------------------------------------------- overview


async def test_overview_shows_counts_workers_and_in_flight(
    client: TestClient, conn: asyncpg.Connection
) -> None:
    _, _, job = await running_chapter(conn)
    await insert_jobs(conn, 3, job_type="noop", lane="bulk")
    await failed_job(conn)
    resp = await client.get("/")
    assert resp.status == 200
    html = await resp.text()
    assert 'href="/jobs?status=pending"' in html and '<span class="value">3</span>' in html
    assert "bulk" in html and "chapter_generation" in html  # by lane, by type
    assert "worker-7" in html and "worker-9" in html  # workers seen recently
    assert f'id="live-{job}"' in html and 'value="42"' in html and "section 2/5: the tide" in html
    assert "oldest pending" in html and "p95 run time" in html and "throughput" in html
    assert 'data-live="/api/live"' in html and "/static/live.js" in html
    # Hardened responses, and a session cookie the page's scripts cannot read.
    assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
    assert "script-src 'self'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["Cache-Control"] == "no-store"
    cookie = resp.cookies[COOKIE]
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/"


async def test_overview_of_an_empty_queue(client: TestClient) -> None:
    resp = await client.get("/")
    assert resp.status == 200
    html = await resp.text()
    assert "Nothing is running right now." in html and "No jobs." in html


async def test_live_json_follows_progress(client: TestClient, conn: asyncpg.Connection) -> None:
    _, chapter, job = await running_chapter(conn, "abc")
    first = await (await client.get("/api/live")).json()
    [row] = first["jobs"]
    assert (row["job_id"], row["chapter_id"], row["progress"], row["text_bytes"]) == (
        job,
        chapter,
        42,
        3,
    )
    await conn.fetchval(
        "select append_chapter_content($1, 'worker-7', 3, 'def', 61, 'section 3/5')", job
    )
    [row] = (await (await client.get("/api/live")).json())["jobs"]
    assert (row["progress"], row["current_step"], row["text_bytes"]) == (61, "section 3/5", 6)
    await conn.fetchval("select finish_chapter($1, 'worker-7')", job)
    await conn.fetchval("select complete_job($1, 'worker-7', '{}')", job)
    assert (await (await client.get("/api/live")).json())["jobs"] == []


async def test_live_page_and_overview_json(client: TestClient, conn: asyncpg.Connection) -> None:
    _, _, job = await running_chapter(conn)
    live = await client.get("/live")
    assert live.status == 200 and f'id="live-{job}"' in await live.text()
    data = await (await client.get("/api/overview")).json()
    assert data["by_status"] == {"processing": 1} and data["workers"][0]["worker_id"] == "worker-7"


# ------------------------------------------------------------------------------------ jobs


async def test_jobs_page_filters(client: TestClient, conn: asyncpg.Connection) -> None:
    user, _, chapter_job_id = await running_chapter(conn)
    pending = await insert_jobs(conn, 2, job_type="noop")
    failed = await failed_job(conn, "other_type")

    html = await (await client.get("/jobs")).text()
    for job in (chapter_job_id, *pending, failed):
        assert f'href="/jobs/{job}"' in html

    html = await (await client.get("/jobs", params={"status": "failed"})).text()
    assert f'href="/jobs/{failed}"' in html and f'href="/jobs/{pending[0]}"' not in html
    assert "model_request_rejected" in html and "&lt;b&gt;bad&lt;/b&gt;" in html  # escaped

    html = await (await client.get("/jobs", params={"user": user.upper()})).text()
    assert f'href="/jobs/{chapter_job_id}"' in html and f'href="/jobs/{failed}"' not in html

    html = await (await client.get("/jobs", params={"type": "other_type"})).text()
    assert f'href="/jobs/{failed}"' in html and f'href="/jobs/{pending[0]}"' not in html

    html = await (await client.get("/jobs", params={"from": "2999-01-01"})).text()
    assert "No job matches these filters." in html
    html = await (
        await client.get("/jobs", params={"from": "2000-01-01", "to": "2999-01-01T00:00:00Z"})
    ).text()
    assert f'href="/jobs/{failed}"' in html


async def test_jobs_page_paginates(client: TestClient, conn: asyncpg.Connection) -> None:
    ids = await insert_jobs(conn, 5, job_type="noop")
    seen: list[str] = []
    for page in (1, 2, 3):
        resp = await client.get("/jobs", params={"per_page": "2", "page": str(page)})
        assert resp.status == 200
        html = await resp.text()
        seen += [job for job in ids if f'href="/jobs/{job}"' in html]
        assert ('rel="next"' in html) is (page < 3)
        assert ('rel="prev"' in html) is (page > 1)
        if page < 3:
            assert f"/jobs?page={page + 1}&amp;per_page=2" in html
    assert sorted(seen) == sorted(ids) and len(seen) == 5


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("status=exploded", "status: expected one of pending"),
        ("user=not-a-uuid", "user: expected a user id"),
        ("from=yesterday", "from: expected a date"),
        ("to=2026-13-45", "to: expected a date"),
        ("from=2026-12-02&to=2026-12-01", "to: must be after from"),
        ("page=0", "page: expected a whole number from 1"),
        ("page=-3", "page: expected a whole number"),
        ("per_page=100000", "per_page: expected a whole number from 1 to 200"),
        ("type=" + "x" * 101, "type: expected a job type"),
        ("type=%3Cscript%3E", "type: expected a job type"),
        ("type=%00", "type: expected a job type"),
        ("type=caf%C3%A9", "type: expected a job type"),
        ("user=%F0%9F%98%80", "user: expected a user id"),
        ("from=%00", "from: expected a date"),
        ("page=%D9%A3", "page: expected a whole number"),  # an Arabic-Indic digit 3
        ("stauts=failed", "unknown filter 'stauts'"),
        ("status=failed&status=pending", "each filter may be given once"),
    ],
)
async def test_bad_filters_are_a_400_that_says_why(
    client: TestClient, query: str, message: str
) -> None:
    resp = await client.get(f"/jobs?{query}")
    assert resp.status == 400
    html = await resp.text()
    assert "Bad filter" in html and message in html.replace("&#39;", "'")
    assert "<script>" not in html


# ------------------------------------------------------------------------------ job detail


async def test_job_detail_shows_payload_events_and_chapter_text(
    client: TestClient, conn: asyncpg.Connection
) -> None:
    _, chapter, job = await running_chapter(conn, "It was <i>late</i> & the sea was loud.")
    resp = await client.get(f"/jobs/{job}")
    assert resp.status == 200
    html = await resp.text()
    assert f'"chapter_id": "{chapter}"' in html.replace("&#34;", '"')  # the payload
    assert "It was &lt;i&gt;late&lt;/i&gt; &amp; the sea was loud." in html  # escaped text
    assert 'value="42"' in html and "section 2/5: the tide" in html
    assert "2 events" in html and html.count('class="pill processing"') >= 2  # history
    assert 'id="action-cancel"' in html and 'id="action-pause"' in html
    assert 'id="action-retry"' not in html and 'id="action-resume"' not in html


async def test_failed_job_detail_shows_error_details(
    client: TestClient, conn: asyncpg.Connection
) -> None:
    job = await failed_job(conn)
    html = await (await client.get(f"/jobs/{job}")).text()
    assert "error_details" in html and "model_request_rejected" in html
    assert "Gemini error 400 &lt;b&gt;bad&lt;/b&gt;" in html
    assert 'id="action-retry"' in html and 'id="action-cancel"' not in html


async def test_job_detail_of_a_deeply_nested_huge_payload(
    client: TestClient, conn: asyncpg.Connection
) -> None:
    # Rows stored before the payload limits (20261201000100) may be any size and depth.
    await conn.execute("set session_replication_role = replica")  # seed past the checks
    deep = '{"x":' + "[" * 3000 + "]" * 3000 + ', "big": "' + "é" * 300_000 + '"}'
    job = await conn.fetchval(
        "insert into job_queue (job_type, job_payload, lease_timeout_s)"
        " values ('noop', $1::text::jsonb, 60)"
        " returning id",
        deep,
    )
    resp = await client.get(f"/jobs/{job}")
    assert resp.status == 200
    html = await resp.text()
    assert "shown in part" in html and len(html) < 400_000


async def test_unknown_and_malformed_job_ids(client: TestClient) -> None:
    missing = str(uuid.uuid4())
    resp = await client.get(f"/jobs/{missing}")
    assert resp.status == 404 and f"There is no job {missing}" in await resp.text()
    resp = await client.get("/jobs/not-a-job-id")
    assert resp.status == 400 and "A job id is a UUID" in await resp.text()
    resp = await client.get(f"/jobs/{missing}/cancel")
    assert resp.status == 404
    resp = await client.get(f"/jobs/{missing}/explode")
    assert resp.status == 404 and "Actions: cancel, pause, resume, retry." in await resp.text()
    resp = await client.get("/api/live/../../etc/passwd")
    assert resp.status == 404


async def test_database_failure_is_a_503_page(db_dsn: str) -> None:
    async with dashboard_client(db_dsn) as c:
        await c.server.app[STORE].close()
        resp = await c.get("/")
        assert resp.status == 503 and "nothing was changed" in await resp.text()
        resp = await c.get("/api/live")
        assert resp.status == 503 and "error" in await resp.json()
