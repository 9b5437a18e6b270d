"""Who may use the dashboard: the token login, signed session cookies and CSRF tokens.

The dashboard can cancel anyone's job, so every request passes one middleware:

- With ``DASHBOARD_TOKEN`` set, a browser logs in once with the token (compared in
  constant time) and gets a session cookie signed with a key derived from the token
  (HttpOnly, SameSite=Strict, Secure over HTTPS). Rotating the token ends every session.
  Scripts may instead send ``Authorization: Bearer <token>`` on GET requests.
- Without a token (loopback only, enforced by the configuration) every visitor gets a
  session on first sight, and the Host header must name a loopback address: a page on
  another site cannot reach the dashboard through DNS rebinding.
- Every POST carries a CSRF token bound to the session (HMAC of its id), checked in
  constant time; a missing or wrong one is a 403 and nothing changes.

The browser behaviour this relies on (SameSite, HttpOnly, DNS rebinding, CSP) is in
docs/dashboard.md §1.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import quote

from aiohttp import web
from aiohttp.typedefs import Middleware

from worker.config import is_loopback

COOKIE = "genworker_dashboard"
SESSION_TTL_S = 12 * 3600
LOGIN_FAILURE_DELAY_S = 0.5

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class Session:
    sid: str
    issued: int


# Per request: the session (None for a Bearer-token read) and its CSRF token.
SESSION: web.RequestKey[Session | None] = web.RequestKey("session", Session)
CSRF = web.RequestKey("csrf", str)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Guard:
    """Issues and checks sessions, CSRF tokens and the login token."""

    def __init__(self, token: str | None, *, failure_delay_s: float = LOGIN_FAILURE_DELAY_S):
        self.token = token
        self.failure_delay_s = failure_delay_s
        # Derived from the token, so sessions survive a restart and die with the token;
        # random per process when there is no token (loopback use).
        self._key = (
            hmac.new(token.encode(), b"genworker-dashboard-session-v1", hashlib.sha256).digest()
            if token
            else secrets.token_bytes(32)
        )

    @property
    def login_required(self) -> bool:
        return self.token is not None

    def _sign(self, text: str) -> str:
        return _b64(hmac.new(self._key, text.encode(), hashlib.sha256).digest())

    def new_session(self) -> tuple[Session, str]:
        session = Session(secrets.token_urlsafe(18), int(time.time()))
        body = f"{session.sid}.{session.issued}"
        return session, f"{body}.{self._sign(body)}"

    def read_session(self, cookie: str | None) -> Session | None:
        if not cookie or len(cookie) > 200:
            return None
        body, _, signature = cookie.rpartition(".")
        sid, _, issued = body.partition(".")
        if not (sid and issued.isdigit() and signature):
            return None
        if not hmac.compare_digest(signature, self._sign(body)):
            return None
        if time.time() - int(issued) > SESSION_TTL_S:
            return None
        return Session(sid, int(issued))

    def csrf_token(self, session: Session) -> str:
        return self._sign(f"csrf:{session.sid}")

    def csrf_ok(self, session: Session, given: str | None) -> bool:
        return bool(given) and hmac.compare_digest(str(given), self.csrf_token(session))

    def token_ok(self, given: str | None) -> bool:
        if self.token is None or not given:
            return False
        return hmac.compare_digest(given.encode(), self.token.encode())

    def set_cookie(self, request: web.Request, response: web.StreamResponse, value: str) -> None:
        response.set_cookie(
            COOKIE,
            value,
            max_age=SESSION_TTL_S,
            path="/",
            httponly=True,
            samesite="Strict",
            secure=request.secure,
        )

    async def login(self, given: str | None) -> str | None:
        """The new signed cookie value when ``given`` is the token, else None (after a pause
        that makes guessing slow)."""
        if self.token_ok(given):
            return self.new_session()[1]
        await asyncio.sleep(self.failure_delay_s)
        return None


def _host_is_loopback(request: web.Request) -> bool:
    host = request.host.rsplit(":", 1)[0] if not request.host.endswith("]") else request.host
    return is_loopback(host)


def _plain_error(message: str, status: int) -> web.HTTPException:
    cls: type[web.HTTPException] = {
        400: web.HTTPBadRequest,
        401: web.HTTPUnauthorized,
        403: web.HTTPForbidden,
        421: web.HTTPMisdirectedRequest,
    }[status]
    return cls(text=message + "\n", content_type="text/plain")


def guard_middleware(guard: Guard) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not guard.login_required and not _host_is_loopback(request):
            raise _plain_error(
                "this dashboard serves loopback addresses only (set DASHBOARD_TOKEN to "
                "serve other hosts)",
                421,
            )
        public = request.path == "/login" or request.path.startswith("/static/")
        session = guard.read_session(request.cookies.get(COOKIE))
        new_cookie: str | None = None
        if session is None and not guard.login_required:
            session, new_cookie = guard.new_session()
        if session is None and not public:
            bearer = request.headers.get("Authorization", "")
            if request.method == "GET" and bearer.startswith("Bearer "):
                if guard.token_ok(bearer[len("Bearer ") :]):
                    request[SESSION], request[CSRF] = None, ""
                    return await handler(request)
                raise _plain_error("wrong token", 401)
            if request.method == "GET" and not request.path.startswith("/api/"):
                raise web.HTTPSeeOther(f"/login?next={_safe_next(request.path_qs)}")
            raise _plain_error("log in first (POST /login with the dashboard token)", 401)
        if request.method == "POST" and request.path != "/login":
            assert session is not None
            form = await request.post()
            given = form.get("csrf")
            if not guard.csrf_ok(session, given if isinstance(given, str) else None):
                raise _plain_error(
                    "CSRF token missing or wrong: reload the page and try again", 403
                )
        request[SESSION] = session
        request[CSRF] = guard.csrf_token(session) if session else ""
        response = await handler(request)
        if new_cookie is not None:
            guard.set_cookie(request, response, new_cookie)
        return response

    return middleware


def _safe_next(path: str) -> str:
    """Only a local path survives the login redirect (no //evil.example)."""
    return quote(local_path(path), safe="/?=&")


def local_path(value: str | None) -> str:
    """Where to go after logging in: a local path, else the overview."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value[:500]


@web.middleware
async def headers_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """No framing, no inline script, no caching of operator pages, no referrer leaks."""
    try:
        response = await handler(request)
    except web.HTTPException as exc:
        response = exc
        _harden(response, request)
        raise
    _harden(response, request)
    return response


def _harden(response: web.StreamResponse, request: web.Request) -> None:
    h = response.headers
    h.setdefault(
        "Content-Security-Policy",
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    )
    h.setdefault("X-Content-Type-Options", "nosniff")
    h.setdefault("Referrer-Policy", "no-referrer")
    h.setdefault("X-Frame-Options", "DENY")
    if not request.path.startswith("/static/"):
        h.setdefault("Cache-Control", "no-store")
