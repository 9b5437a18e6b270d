"""The aiohttp health server: /health (liveness), /ready, /status and /metrics.

/health stays 200 while the process can do its job, reporting "degraded" (with
reasons) during a database outage it is riding out; it turns 503 only when the
process should be restarted: a side task died or the event loop is stuck.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from worker import __version__
from worker.generation.budget import FleetBudget
from worker.runner import Runner
from worker.store.base import StoreError

LOOP_LAG_LIMIT_S = 5.0
QUEUE_GAUGES_EVERY_S = 10.0  # at most one queue_stats() per this many seconds of scrapes
WATCHDOG_LIMIT_S = 120.0
TOP_USERS = 10  # /status and /metrics show the busiest users only

log = logging.getLogger(__name__)


class LoopMonitor:
    """Measures event-loop lag: how late a 0.5 s sleep wakes up."""

    def __init__(self, every_s: float = 0.5) -> None:
        self.every_s = every_s
        self.lag_s = 0.0
        self.last_tick = time.monotonic()

    async def run(self) -> None:
        while True:
            t0 = time.monotonic()
            await asyncio.sleep(self.every_s)
            self.last_tick = time.monotonic()
            self.lag_s = max(0.0, self.last_tick - t0 - self.every_s)

    @property
    def stuck(self) -> bool:
        return (
            self.lag_s > LOOP_LAG_LIMIT_S
            or time.monotonic() - self.last_tick > LOOP_LAG_LIMIT_S + self.every_s
        )

    def start_watchdog(self, limit_s: float, *, exit_code: int = 70) -> threading.Thread:
        """Exit the process when the event loop has not ticked for ``limit_s``.

        A blocked loop cannot answer /health or act on anything, and Fly's checks never
        restart a machine: only the process exiting lets the platform's restart policy
        bring a fresh one (whose jobs' leases meanwhile expire and are rescued).
        """

        def watch() -> None:
            while True:
                time.sleep(min(1.0, limit_s / 4))
                stalled = time.monotonic() - self.last_tick
                if stalled > limit_s:
                    log.critical(
                        "event loop stalled for %.0fs: exiting so the platform restarts the worker",
                        stalled,
                    )
                    logging.shutdown()
                    os._exit(exit_code)

        thread = threading.Thread(target=watch, name="loop-watchdog", daemon=True)
        thread.start()
        return thread


def health_report(
    runner: Runner, monitor: LoopMonitor, budget: FleetBudget | None = None
) -> tuple[int, dict[str, Any]]:
    problems: list[str] = []
    degraded: list[str] = []
    if runner.fatal is not None:
        problems.append(f"side task failed: {runner.fatal!r}")
    elif not runner.side_tasks_alive and not runner.stopping.is_set():
        problems.append("a side task (claim loop or heartbeat) is not running")
    if monitor.stuck:
        problems.append(f"event loop lag {monitor.lag_s:.1f}s")
    if runner.store_down_since is not None:
        degraded.append(
            f"database calls failing for "
            f"{time.monotonic() - runner.store_down_since:.1f}s: "
            f"{runner.last_store_error}"
        )
    if runner.heartbeat.consecutive_failures:
        degraded.append(f"{runner.heartbeat.consecutive_failures} heartbeat round(s) failed")
    if budget is not None:
        # A model out of its daily quota (or cooling down) is the fleet's state, not this
        # process's fault: reported, still 200 (a restart would not help).
        degraded.extend(budget.reasons())
    status = "unhealthy" if problems else "degraded" if degraded else "ok"
    if runner.stopping.is_set() and not problems:
        status = "stopping"
    body = {
        "status": status,
        "reasons": problems + degraded,
        "worker_id": runner.config.worker_id,
        "version": __version__,
        "uptime_s": round(time.time() - runner.started_at, 3),
        "in_flight": len(runner.in_flight),
        "concurrency": runner.config.concurrency,
        "last_claim_at": runner.last_claim_at,
        "loop_lag_s": round(monitor.lag_s, 4),
        "store": getattr(runner.store, "name", "unknown"),
    }
    return (503 if problems else 200), body


def build_app(
    runner: Runner, monitor: LoopMonitor, budget: FleetBudget | None = None
) -> web.Application:
    async def health(_req: web.Request) -> web.Response:
        code, body = health_report(runner, monitor, budget)
        return web.json_response(body, status=code)

    async def ready(_req: web.Request) -> web.Response:
        try:
            async with asyncio.timeout(5):
                await runner.store.ping()
        except (StoreError, TimeoutError) as exc:
            return web.json_response({"ready": False, "reason": str(exc)[:300]}, status=503)
        if runner.stopping.is_set():
            return web.json_response({"ready": False, "reason": "shutting down"}, status=503)
        return web.json_response({"ready": True, "worker_id": runner.config.worker_id})

    async def status(_req: web.Request) -> web.Response:
        now = time.monotonic()
        jobs = [
            {
                "job_id": job_id,
                "job_type": f.claimed.job_type,
                "attempt": f.claimed.retry_count + 1,
                "progress": f.progress,
                "step": f.step,
                "running_s": round(now - f.started, 3),
            }
            for job_id, f in list(runner.in_flight.items())
        ]
        try:
            async with asyncio.timeout(5):
                queue: Any = await runner.store.queue_stats()
        except (StoreError, TimeoutError) as exc:
            queue = {"error": str(exc)[:300]}
        try:
            async with asyncio.timeout(5):
                users: Any = await runner.store.user_load(TOP_USERS)
        except (StoreError, TimeoutError) as exc:
            users = {"error": str(exc)[:300]}
        return web.json_response(
            {
                "worker_id": runner.config.worker_id,
                "queue": queue,
                "in_flight": jobs,
                "users_in_flight": [
                    {"user_id": u, "in_flight": n} for u, n in runner.users_in_flight(TOP_USERS)
                ],
                "user_load": users,
                "claims": {
                    "calls": runner.claim_calls,
                    "jobs": runner.claimed_jobs,
                    "mean_batch": round(runner.claimed_jobs / runner.claim_calls, 3)
                    if runner.claim_calls
                    else None,
                    "last_batch": runner.last_claim_batch,
                    "batch_max": runner.config.claim_batch_max,
                },
                "gemini_blocked": {
                    model: {"reason": b.reason, "until": b.until, "detail": b.detail}
                    for model, b in (budget.blocked if budget is not None else {}).items()
                },
            },
            dumps=_dumps,
        )

    refreshed = {"at": -QUEUE_GAUGES_EVERY_S}

    async def metrics(_req: web.Request) -> web.Response:
        gauge = runner.metrics.user_in_flight
        gauge.clear()  # only the current top users: a bounded set of label values
        for user, n in runner.users_in_flight(TOP_USERS):
            gauge.labels(user).set(n)
        if budget is not None:
            blocked = runner.metrics.model_blocked
            blocked.clear()
            for model, state in budget.blocked.items():
                blocked.labels(model, state.reason).set(1)
        # Queue-wide gauges (backlog, oldest pending age) for alerting, refreshed at scrape
        # time; a failed refresh keeps the last values and shows in the store error count.
        if time.monotonic() - refreshed["at"] >= QUEUE_GAUGES_EVERY_S:
            refreshed["at"] = time.monotonic()
            try:
                async with asyncio.timeout(5):
                    runner.metrics.set_queue(await runner.store.queue_stats())
            except (StoreError, TimeoutError) as exc:
                runner.metrics.store_errors.labels("queue_stats").inc()
                log.debug("queue gauges not refreshed: %s", exc)
        resp = web.Response(body=runner.metrics.render())
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/healthz", health)
    app.router.add_get("/ready", ready)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    return app


def _dumps(obj: Any) -> str:
    return json.dumps(obj, default=str)


async def start_health_server(
    runner: Runner,
    monitor: LoopMonitor,
    host: str,
    port: int,
    *,
    budget: FleetBudget | None = None,
) -> web.AppRunner:
    app_runner = web.AppRunner(build_app(runner, monitor, budget), access_log=None)
    await app_runner.setup()
    site = web.TCPSite(app_runner, host, port)
    await site.start()
    return app_runner
