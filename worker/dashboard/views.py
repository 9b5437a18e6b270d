"""The dashboard's pages, its live JSON and its four confirmed actions.

Every read is one store call (one SQL function in supabase/migrations); every action is
one function: ``admin_cancel_job``, ``admin_pause_job`` or ``admin_resume_job`` through
``Store.control_job``, or ``requeue_failed_jobs``. A GET never changes anything: an
action link opens a confirmation page whose form POSTs with the session's CSRF token and
``confirm=yes``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import jinja2
from aiohttp import web

from worker.dashboard.filters import STATUSES, BadFilter, parse_filter, parse_job_id
from worker.dashboard.security import COOKIE, CSRF, SESSION, Guard, local_path
from worker.logs import redact
from worker.store import Store
from worker.store.base import NotFoundError, StoreError

log = logging.getLogger("worker.dashboard")

STORE = web.AppKey("store", Store)
GUARD = web.AppKey("guard", Guard)
TEMPLATES = web.AppKey("templates", jinja2.Environment)
INFO = web.AppKey("info", dict[str, str])

LIVE_POLL_MS = 1500


@dataclass(frozen=True)
class Action:
    label: str
    applies_to: tuple[str, ...]
    explains: str


ACTIONS: dict[str, Action] = {
    "cancel": Action(
        "Cancel",
        ("pending", "processing", "paused"),
        "The job is cancelled for good. A worker running it stops at its next heartbeat; "
        "a chapter keeps the text written so far.",
    ),
    "pause": Action(
        "Pause",
        ("pending", "processing"),
        "The job is paused and never claimed while paused. A worker running it stops at "
        "its next heartbeat; the chapter keeps its checkpoint.",
    ),
    "resume": Action(
        "Resume",
        ("paused",),
        "The job goes back to the queue without using an attempt and resumes from its checkpoint.",
    ),
    "retry": Action(
        "Retry",
        ("failed",),
        "The failed job goes back to the queue with its retries reset; a chapter resumes "
        "from its checkpoint.",
    ),
}

NOTICES = {name: f"{a.label} done." for name, a in ACTIONS.items()}


# ------------------------------------------------------------------------------- helpers


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, datetime):
        return value
    if not value:
        return None
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def duration(seconds: Any) -> str:
    """3 s, 4 m 05 s, 2 h 03 m, 3 d 04 h: what an on-call engineer reads at a glance."""
    if seconds is None:
        return "–"
    s = max(0, int(float(seconds)))
    if s < 60:
        return f"{float(seconds):.1f} s" if float(seconds) < 10 else f"{s} s"
    if s < 3600:
        return f"{s // 60} m {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} m"
    return f"{s // 86400} d {s % 86400 // 3600:02d} h"


def when(value: Any) -> str:
    moment = _parse_time(value)
    return moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%SZ") if moment else "–"


def ago(value: Any) -> str:
    moment = _parse_time(value)
    if moment is None:
        return "–"
    return duration((datetime.now(UTC) - moment).total_seconds()) + " ago"


def make_templates() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("worker.dashboard", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(duration=duration, when=when, ago=ago)
    env.globals.update(STATUSES=STATUSES, ACTIONS=ACTIONS, LIVE_POLL_MS=LIVE_POLL_MS)
    return env


def render(
    request: web.Request, template: str, *, status: int = 200, **context: Any
) -> web.Response:
    guard = request.app[GUARD]
    text = (
        request.app[TEMPLATES]
        .get_template(template)
        .render(
            csrf=request.get(CSRF, ""),
            login_required=guard.login_required,
            logged_in=request.get(SESSION) is not None,
            info=request.app[INFO],
            path=request.path,
            **context,
        )
    )
    return web.Response(text=text, status=status, content_type="text/html")


def error_page(request: web.Request, status: int, title: str, message: str) -> web.Response:
    if request.path.startswith("/api/"):
        return web.json_response({"error": message}, status=status)
    return render(request, "error.html", status=status, title=title, message=message)


def store_failure(request: web.Request, exc: StoreError) -> web.Response:
    log.warning("dashboard: database call failed: %s", exc)
    return error_page(
        request,
        503,
        "Database unavailable",
        f"The database call failed; nothing was changed. ({redact(str(exc))[:300]})",
    )


def pivot(rows: list[dict[str, Any]], key: str) -> list[tuple[str, dict[str, int], int]]:
    """[{key, status, count}] → [(name, {status: count}, total)], sorted by name."""
    table: dict[str, dict[str, int]] = {}
    for row in rows:
        table.setdefault(str(row[key]), {})[row["status"]] = int(row["count"])
    return [(name, counts, sum(counts.values())) for name, counts in sorted(table.items())]


def bars(per_minute: list[int] | None) -> dict[str, Any]:
    """Completions per minute as SVG bar geometry, oldest minute on the left."""
    values = list(reversed(per_minute or [0] * 60))
    top = max(values) or 1
    height = 40
    return {
        "height": height,
        "max": max(values),
        "bars": [
            {
                "x": i * 5,
                "h": round(height * v / top, 1),
                "y": round(height - height * v / top, 1),
                "v": v,
                "minute": 60 - i,
            }
            for i, v in enumerate(values)
        ],
    }


# --------------------------------------------------------------------------------- pages

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def handles_store_errors(fn: Handler) -> Handler:
    async def wrapper(request: web.Request) -> web.StreamResponse:
        try:
            return await fn(request)
        except StoreError as exc:
            return store_failure(request, exc)

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


@handles_store_errors
async def overview(request: web.Request) -> web.StreamResponse:
    store = request.app[STORE]
    data = await store.dashboard_overview()
    live = await store.dashboard_live()
    last_hour = data.get("last_hour") or {}
    return render(
        request,
        "overview.html",
        data=data,
        live=live,
        by_type=pivot(data.get("by_type") or [], "job_type"),
        by_lane=pivot(data.get("by_lane") or [], "job_lane"),
        chart=bars(data.get("completed_per_minute")),
        throughput_per_min=(last_hour.get("completed") or 0) / 60,
    )


@handles_store_errors
async def live_page(request: web.Request) -> web.StreamResponse:
    return render(request, "live.html", live=await request.app[STORE].dashboard_live())


@handles_store_errors
async def api_live(request: web.Request) -> web.StreamResponse:
    return web.json_response(await request.app[STORE].dashboard_live())


@handles_store_errors
async def api_overview(request: web.Request) -> web.StreamResponse:
    return web.json_response(await request.app[STORE].dashboard_overview())


@handles_store_errors
async def jobs(request: web.Request) -> web.StreamResponse:
    try:
        f = parse_filter(request.query)
    except BadFilter as exc:
        return error_page(request, 400, "Bad filter", str(exc))
    page = await request.app[STORE].dashboard_jobs(
        status=f.status,
        job_type=f.type,
        user_id=f.user,
        created_from=f.created_from,
        created_to=f.created_to,
        limit=f.per_page,
        offset=f.offset,
    )
    return render(request, "jobs.html", f=f, page=page)


async def _job_or_error(request: web.Request) -> dict[str, Any] | web.Response:
    job_id = parse_job_id(request.match_info["job_id"])
    if job_id is None:
        return error_page(
            request,
            400,
            "Bad job id",
            "A job id is a UUID, such as the ones listed on the jobs page.",
        )
    detail = await request.app[STORE].dashboard_job(job_id)
    if detail is None:
        return error_page(
            request,
            404,
            "No such job",
            f"There is no job {job_id}; it may have been purged by retention.",
        )
    return detail


@handles_store_errors
async def job(request: web.Request) -> web.StreamResponse:
    detail = await _job_or_error(request)
    if isinstance(detail, web.Response):
        return detail
    notice = NOTICES.get(request.query.get("done", ""))
    return render(request, "job.html", d=detail, job=detail["job"], notice=notice)


@handles_store_errors
async def confirm(request: web.Request) -> web.StreamResponse:
    action = ACTIONS.get(request.match_info["action"])
    if action is None:
        return error_page(request, 404, "No such action", "Actions: cancel, pause, resume, retry.")
    detail = await _job_or_error(request)
    if isinstance(detail, web.Response):
        return detail
    return render(
        request,
        "confirm.html",
        job=detail["job"],
        name=request.match_info["action"],
        action=action,
    )


@handles_store_errors
async def act(request: web.Request) -> web.StreamResponse:
    name = request.match_info["action"]
    action = ACTIONS.get(name)
    if action is None:
        return error_page(request, 404, "No such action", "Actions: cancel, pause, resume, retry.")
    job_id = parse_job_id(request.match_info["job_id"])
    if job_id is None:
        return error_page(request, 400, "Bad job id", "A job id is a UUID.")
    form = await request.post()
    if form.get("confirm") != "yes":
        return error_page(
            request,
            400,
            "Not confirmed",
            f"{action.label} needs confirmation: use the {action.label} button on the job's page.",
        )
    store = request.app[STORE]
    try:
        if name == "retry":
            done = job_id in await store.requeue_failed([job_id])
        else:
            done = await store.control_job(job_id, name)
    except NotFoundError:
        return error_page(request, 404, "No such job", f"There is no job {job_id}.")
    if not done:
        detail = await store.dashboard_job(job_id)
        if detail is None:
            return error_page(request, 404, "No such job", f"There is no job {job_id}.")
        status = detail["job"]["status"]
        return error_page(
            request,
            409,
            "Nothing changed",
            f"{action.label} applies to {' or '.join(action.applies_to)} jobs; "
            f"job {job_id} is {status}.",
        )
    log.info("dashboard: operator action %s on job %s", name, job_id)
    raise web.HTTPSeeOther(f"/jobs/{job_id}?done={name}")


# --------------------------------------------------------------------------------- login


async def login_form(request: web.Request) -> web.StreamResponse:
    if not request.app[GUARD].login_required:
        raise web.HTTPSeeOther("/")
    return render(request, "login.html", next=local_path(request.query.get("next")), failed=False)


async def login(request: web.Request) -> web.StreamResponse:
    guard = request.app[GUARD]
    if not guard.login_required:
        raise web.HTTPSeeOther("/")
    form = await request.post()
    given = form.get("token")
    target = local_path(str(form.get("next") or "/"))
    cookie = await guard.login(given if isinstance(given, str) else None)
    if cookie is None:
        log.warning("dashboard: failed login from %s", request.remote)
        return render(request, "login.html", status=401, next=target, failed=True)
    response = web.HTTPSeeOther(target)
    guard.set_cookie(request, response, cookie)
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    response = web.HTTPSeeOther("/login" if request.app[GUARD].login_required else "/")
    response.del_cookie(COOKIE, path="/")
    raise response


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/", overview)
    r.add_get("/live", live_page)
    r.add_get("/jobs", jobs)
    r.add_get("/jobs/{job_id}", job)
    r.add_get("/jobs/{job_id}/{action}", confirm)
    r.add_post("/jobs/{job_id}/{action}", act)
    r.add_get("/api/live", api_live)
    r.add_get("/api/overview", api_overview)
    r.add_get("/login", login_form)
    r.add_post("/login", login)
    r.add_post("/logout", logout)
