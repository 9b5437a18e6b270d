"""Login token, signed cookies, CSRF with a token, loopback-only without one, no secrets shown."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager

import aiohttp
import asyncpg
import pytest
from aiohttp.test_utils import TestClient

from tests.dashboard.conftest import TOKEN, csrf_of, dashboard_client
from tests.support.seed import insert_jobs
from worker.cli import main
from worker.config import load_settings
from worker.dashboard.app import describe
from worker.dashboard.security import COOKIE, Guard
from worker.devdb import free_port


async def login(
    client: TestClient, token: str = TOKEN, next_path: str = "/"
) -> aiohttp.ClientResponse:
    return await client.post(
        "/login", data={"token": token, "next": next_path}, allow_redirects=False
    )


async def test_pages_redirect_to_login_and_api_says_401(token_client: TestClient) -> None:
    resp = await token_client.get("/jobs?status=failed", allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"] == "/login?next=/jobs?status=failed"
    assert COOKIE not in resp.cookies  # no session handed out before the login
    assert (await token_client.get("/api/live")).status == 401
    form = await token_client.get("/login")
    assert form.status == 200 and 'type="password" name="token"' in await form.text()


async def test_wrong_token_is_refused(token_client: TestClient) -> None:
    for wrong in ("", "nope", TOKEN[:-1], TOKEN + "x", TOKEN.upper()):
        resp = await login(token_client, wrong)
        assert resp.status == 401 and "not the dashboard token" in await resp.text()
        assert COOKIE not in resp.cookies
    assert (await token_client.get("/", allow_redirects=False)).status == 303


async def test_login_sets_a_strict_httponly_cookie(token_client: TestClient) -> None:
    resp = await login(token_client, next_path="/jobs")
    assert resp.status == 303 and resp.headers["Location"] == "/jobs"
    cookie = resp.cookies[COOKIE]
    assert cookie["httponly"] and cookie["samesite"] == "Strict" and cookie["path"] == "/"
    assert TOKEN not in cookie.value  # signed session id, never the token itself
    assert (await token_client.get("/")).status == 200
    assert (await token_client.get("/api/live")).status == 200


async def test_login_never_redirects_off_site(token_client: TestClient) -> None:
    for target in ("//evil.example/", "https://evil.example/", "\\\\evil", "jobs"):
        resp = await login(token_client, next_path=target)
        assert resp.status == 303 and resp.headers["Location"] == "/", target


async def test_tampered_or_foreign_cookies_are_refused(
    token_client: TestClient, db_dsn: str
) -> None:
    await login(token_client)
    value = token_client.session.cookie_jar.filter_cookies(token_client.make_url("/"))[COOKIE]
    sid, issued, sig = value.value.split(".")
    forged = [f"{sid}.{issued}.{sig[:-2]}AA", f"{sid}x.{issued}.{sig}", "garbage", "a.b.c"]
    # A cookie signed for another token (another deployment) is not valid here either.
    _, other = Guard("another-token-0123456789abcdef").new_session()
    async with aiohttp.ClientSession() as s:
        for bad in [*forged, other]:
            resp = await s.get(
                token_client.make_url("/"), cookies={COOKIE: bad}, allow_redirects=False
            )
            assert resp.status == 303, bad


async def test_bearer_token_reads_but_never_acts(
    token_client: TestClient, conn: asyncpg.Connection
) -> None:
    [job] = await insert_jobs(conn, 1)
    ok = await token_client.get("/api/live", headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status == 200 and "jobs" in await ok.json()
    bad = await token_client.get("/api/live", headers={"Authorization": "Bearer wrong"})
    assert bad.status == 401
    post = await token_client.post(
        f"/jobs/{job}/cancel",
        data={"confirm": "yes"},
        headers={"Authorization": f"Bearer {TOKEN}"},
    )
    assert post.status == 401
    assert await conn.fetchval("select status from job_queue where id = $1", job) == "pending"


async def test_actions_with_a_token_need_the_login_and_csrf(
    token_client: TestClient, conn: asyncpg.Connection
) -> None:
    [job] = await insert_jobs(conn, 1)
    anonymous = await token_client.post(
        f"/jobs/{job}/cancel", data={"confirm": "yes"}, allow_redirects=False
    )
    assert anonymous.status == 401
    await login(token_client)
    no_csrf = await token_client.post(
        f"/jobs/{job}/cancel", data={"confirm": "yes"}, allow_redirects=False
    )
    assert no_csrf.status == 403
    assert await conn.fetchval("select status from job_queue where id = $1", job) == "pending"
    page = await (await token_client.get(f"/jobs/{job}/cancel")).text()
    done = await token_client.post(
        f"/jobs/{job}/cancel",
        data={"confirm": "yes", "csrf": csrf_of(page)},
        allow_redirects=False,
    )
    assert done.status == 303
    assert await conn.fetchval("select status from job_queue where id = $1", job) == "cancelled"


async def test_logout_needs_csrf_and_ends_the_session(token_client: TestClient) -> None:
    await login(token_client)
    page = await (await token_client.get("/")).text()
    assert (await token_client.post("/logout", allow_redirects=False)).status == 403
    out = await token_client.post("/logout", data={"csrf": csrf_of(page)}, allow_redirects=False)
    assert out.status == 303 and out.headers["Location"] == "/login"
    assert (await token_client.get("/", allow_redirects=False)).status == 303


async def test_without_a_token_only_loopback_host_names_are_served(client: TestClient) -> None:
    """A DNS-rebinding page reaches 127.0.0.1 under its own host name: refused."""
    for host in ("evil.example", "evil.example:10001", "10.0.0.5"):
        resp = await client.get("/", headers={"Host": host})
        assert resp.status == 421, host
    for host in ("localhost:10001", "127.0.0.1", "[::1]:10001"):
        assert (await client.get("/", headers={"Host": host})).status == 200, host


async def test_pages_never_show_secrets(db_dsn: str, conn: asyncpg.Connection) -> None:
    password = "Sup3r-Secret-Db-Pass"
    settings = load_settings(
        {
            "DATABASE_URL": f"postgresql://postgres:{password}@db.example.test:5432/postgres",
            "DASHBOARD_TOKEN": TOKEN,
            "GEMINI_API_KEY": "AIzaNeverShowThisKey0123456789",
        },
        scope="dashboard",
    )
    info = describe(settings)
    assert info == {
        "app_env": "development",
        "store": "postgres",
        "database": "db.example.test:5432/postgres",
    }
    await insert_jobs(conn, 1)
    async with dashboard_client(db_dsn, token=TOKEN, info=info) as c:
        await login(c)
        for path in ("/", "/jobs", "/live", "/api/overview"):
            text = await (await c.get(path)).text()
            assert password not in text and TOKEN not in text and "AIza" not in text, path
        assert "db.example.test:5432/postgres" in await (await c.get("/")).text()


def test_refuses_to_start_off_loopback_without_a_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir("/")  # no .env
    for name in ("DASHBOARD_TOKEN", "SUPABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    # Set (and so restored afterwards): the CLI writes its --host/--port overrides here.
    monkeypatch.setenv("DASHBOARD_HOST", "127.0.0.1")
    monkeypatch.setenv("DASHBOARD_PORT", "10001")
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres:pw@127.0.0.1:1/postgres")
    with pytest.raises(SystemExit) as exited:
        main(["dashboard", "--host", "0.0.0.0"])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "DASHBOARD_TOKEN: required when DASHBOARD_HOST is not a loopback address" in err


@contextmanager
def dashboard_process(dsn: str, port: int) -> Iterator[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUPABASE_", "DASHBOARD_"))}
    env.update(DATABASE_URL=dsn, LOG_FORMAT="json", GENERATION_PROVIDER="offline")
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "dashboard", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


@pytest.mark.slow
async def test_genworker_dashboard_process_serves_and_stops_on_sigterm(db_dsn: str) -> None:
    port = free_port()
    with dashboard_process(db_dsn, port) as proc:
        body = ""
        async with aiohttp.ClientSession() as s:
            for _ in range(200):
                try:
                    async with s.get(f"http://127.0.0.1:{port}/") as resp:
                        body = await resp.text()
                        assert resp.status == 200
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.1)
        assert "Queue overview" in body
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 20) == 0
        output = proc.stdout.read().decode()  # type: ignore[union-attr]
        assert f"http://127.0.0.1:{port}/" in output
        assert db_dsn not in output  # the connection string never reaches the output
