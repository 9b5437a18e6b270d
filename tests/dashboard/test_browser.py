"""A real browser on the real thing: headless Chromium watches the worker write chapters.

`genworker run` (offline model) and `genworker dashboard` run as separate processes over
one database; Selenium drives Debian's chromium through chromedriver. The overview's
progress bars must advance without a reload, and one chapter is cancelled through the
confirmation page. Set DASHBOARD_SCREENSHOT=docs/dashboard.png to save the overview
(that is how the README's screenshot is made).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.runtime.test_process import worker_env, worker_process
from tests.support.seed import chapter_job
from worker.devdb import free_port

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1400,1100",
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
        reason="headless browser test needs Debian's chromium and chromium-driver "
        "(/usr/bin/chromium, /usr/bin/chromedriver); .ci/run installs them with apt-get",
    ),
]


@contextmanager
def dashboard_process(dsn: str, port: int) -> Iterator[subprocess.Popen[bytes]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SUPABASE_", "DASHBOARD_"))}
    env.update(DATABASE_URL=dsn, LOG_FORMAT="json", APP_ENV="demo")
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker", "dashboard", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


@contextmanager
def chromium(home: Path) -> Iterator[Any]:
    """Chromium with its profile, crash reports and temporary files all under ``home``."""
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the dev extra")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (*FLAGS, f"--user-data-dir={home / 'profile'}"):
        options.add_argument(flag)
    env = {**os.environ, "HOME": str(home), "TMPDIR": str(home)}
    driver = webdriver.Chrome(
        options=options,
        service=webdriver.ChromeService(executable_path=str(CHROMEDRIVER), env=env),
    )
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


async def wait_http(url: str) -> None:
    async with aiohttp.ClientSession() as http:
        for _ in range(300):
            try:
                async with http.get(url) as resp:
                    if resp.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url} never answered")


def watch_overview(driver: Any, base: str, job: str) -> dict[str, Any]:
    """Open the overview once; read the job's bar until it moves (no navigation after)."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(base + "/")
    driver.execute_script("window.__sameDocument = 'yes';")  # gone if the page reloads
    row = f"tr#live-{job}"

    def progress() -> int | None:
        # The live view re-renders its rows every poll: a row found an instant before it
        # was replaced is stale, so read it again rather than fail.
        for _ in range(10):
            try:
                found = driver.find_elements(By.CSS_SELECTOR, row)
                return int(found[0].get_attribute("data-progress")) if found else None
            except StaleElementReferenceException:
                continue
        return None

    WebDriverWait(driver, 120, poll_frequency=0.2).until(lambda d: (progress() or 0) > 0)
    first = progress()
    polls_before = int(
        driver.find_element(By.CSS_SELECTOR, "[data-live]").get_attribute("data-polls") or 0
    )
    WebDriverWait(driver, 120, poll_frequency=0.2).until(lambda d: (progress() or 0) > (first or 0))
    bar = driver.find_element(By.CSS_SELECTOR, f"{row} progress")
    return {
        "first": first,
        "later": progress(),
        "bar_value": float(bar.get_attribute("value")),
        "polls_before": polls_before,
        "polls_after": int(
            driver.find_element(By.CSS_SELECTOR, "[data-live]").get_attribute("data-polls")
        ),
        "same_document": driver.execute_script("return window.__sameDocument;"),
        "url": driver.current_url,
    }


def cancel_through_the_page(driver: Any, base: str, job: str) -> dict[str, str]:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(f"{base}/jobs/{job}")
    driver.find_element(By.ID, "action-cancel").click()
    WebDriverWait(driver, 30).until(lambda d: d.current_url.endswith(f"/jobs/{job}/cancel"))
    confirm_text = driver.find_element(By.TAG_NAME, "main").text
    driver.find_element(By.ID, "confirm").click()
    WebDriverWait(driver, 30).until(lambda d: "done=cancel" in d.current_url)
    return {
        "confirm_text": confirm_text,
        "status": driver.find_element(By.ID, "job-status").text,
        "notice": driver.find_element(By.CSS_SELECTOR, "p.notice").text,
    }


def screenshot(driver: Any, base: str, path: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(base + "/")
    WebDriverWait(driver, 30).until(
        lambda d: (
            d.find_elements(By.CSS_SELECTOR, "tr[id^=live-]")
            and int(d.find_element(By.CSS_SELECTOR, "[data-live]").get_attribute("data-polls") or 0)
            >= 2
        )
    )
    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, min(height + 160, 2400))
    driver.save_screenshot(path)


async def seed_an_hour_of_history(conn: asyncpg.Connection) -> None:
    """Screenshot only: finished jobs spread over the last hour, so the chart has a shape.

    Written with triggers off (replica role), as finished rows, so no worker claims them.
    """
    await conn.execute("set session_replication_role = replica")
    try:
        await conn.execute(
            """
            insert into job_queue (job_type, job_payload, status, lease_timeout_s, worker_id,
                                   started_at, completed_at, created_at, error_details)
            select 'noop', jsonb_build_object('n', g),
                   case when g % 23 = 0 then 'failed' else 'completed' end, 60,
                   'render-srv-d41-' || (g % 2) || '-4021-9f3a',
                   now() - make_interval(secs => t.ago + t.run),
                   now() - make_interval(secs => t.ago),
                   now() - make_interval(secs => t.ago + t.run + 2),
                   case when g % 23 = 0 then '{"type": "model_unavailable"}'::jsonb end
              from generate_series(1, 140) g,
                   lateral (select (g * g * 37) % 3540 + 20 as ago, 18 + (g % 9) * 6 as run) t
            """
        )
    finally:
        await conn.execute("set session_replication_role = origin")


async def test_overview_follows_the_worker_live_and_cancels_a_chapter(
    db_dsn: str, conn: asyncpg.Connection, tmp_path: Path
) -> None:
    long = {"target_words": 8000, "sections": 6}
    jobs = [(await chapter_job(conn, options=long))[2] for _ in range(3)]
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = worker_env(db_dsn, FLUSH_INTERVAL_MS="300", WORKER_CONCURRENCY="3")
    with dashboard_process(db_dsn, port) as dash, worker_process(env) as worker:
        await wait_http(base + "/")
        with chromium(tmp_path) as driver:
            seen = await asyncio.to_thread(watch_overview, driver, base, jobs[0])
            assert seen["later"] > seen["first"] > 0, seen
            assert seen["bar_value"] == seen["later"]
            assert seen["polls_after"] > seen["polls_before"] >= 0  # moved by the script
            assert seen["same_document"] == "yes" and seen["url"] == base + "/"  # no reload

            done = await asyncio.to_thread(cancel_through_the_page, driver, base, jobs[1])
            assert "Cancel job" in done["confirm_text"]
            assert done["status"] == "cancelled" and done["notice"] == "Cancel done."

            shot = os.environ.get("DASHBOARD_SCREENSHOT")
            if shot:
                await seed_an_hour_of_history(conn)
                await asyncio.to_thread(screenshot, driver, base, shot)
        status = await conn.fetchval("select status from job_queue where id = $1", jobs[1])
        chapter = await conn.fetchval(
            "select status from chapters where generation_job_id = $1", jobs[1]
        )
        assert (status, chapter) == ("cancelled", "cancelled")
        # The worker stopped that stream and carries on with the others.
        assert worker.poll() is None and dash.poll() is None
        others = await conn.fetch(
            "select status from job_queue where id = any($1::uuid[])", [jobs[0], jobs[2]]
        )
        assert {r["status"] for r in others} <= {"processing", "completed"}
