"""A TEST-ONLY PostgREST stand-in, so the real supabase-py client can run against real PostgreSQL.

Follows PostgREST (v12-v14, as on Supabase; docs.postgrest.org and ``src/PostgREST/Error.hs``):

- ``POST /rest/v1/rpc/{fn}`` with named JSON arguments, bound through ``json_to_record`` as
  PostgREST does (so ``text[]``, ``uuid[]``, ``jsonb`` and ``null`` cast like PostgREST); overloads
  chosen by argument-name set, defaults may be omitted, a lone unnamed json/jsonb parameter takes
  the whole body; no match gives 404 PGRST202, several give 300 PGRST203. Result shapes:
  SETOF/TABLE -> array, one composite -> object (all-null fields when none), scalar -> bare
  value, void -> 204. ``GET /rpc/{fn}?arg=v`` is read-only. STABLE/IMMUTABLE run READ ONLY.
- Tables: GET/POST/PATCH/DELETE, ``select=`` (``*`` or columns), filters eq neq gt gte lt lte
  like ilike is in (and ``not.``), ``order``, ``limit``, ``offset``; ``Prefer: return=``,
  ``resolution=merge-duplicates|ignore-duplicates`` with ``on_conflict``; unknown body column ->
  400 PGRST204; PATCH/DELETE without filters -> 400 21000 (pg-safeupdate, as on Supabase).
- ``Accept: application/vnd.pgrst.object+json`` -> one object or 406 PGRST116 (rolled back).
- Auth: HS256 JWT -> ``SET LOCAL ROLE`` + ``request.jwt.claims``/``method``/``path``/``headers``
  GUCs in one transaction per request; no token -> ``anon``; bad token 401 PGRST301, expired
  401 PGRST303. Role and function ``statement_timeout`` settings are applied like PostgREST.
- Errors: ``{code, message, details, hint}``, PostgREST's SQLSTATE -> HTTP table (PTxyz -> xyz,
  42501 -> 401/403, ``RAISE SQLSTATE 'PGRST'``) and ``Proxy-Status: PostgREST; error=<code>``.
- Profiles: only ``public`` (other -> 406 PGRST106).
- Like a real upstream, a request whose client timed out still runs and commits.

Not followed: embedding/joins, ``or=``/``and=``, full-text and array operators, aliases and casts
in ``select``, ``count=`` (no Content-Range totals), ``Range`` headers, PUT, CSV, ``tx=rollback``,
``Prefer: missing=default``, ``response.status``/``response.headers`` GUCs, ``max_rows``, the
API-key gateway (Kong, ``apikey`` is ignored) and the schema cache: every request reads the live
catalog, so there is no stale-cache PGRST202 after DDL. The pool logs in as the given (superuser)
DSN, not ``authenticator``; ``SET ROLE`` makes grants and RLS apply all the same.

Test hooks: :meth:`Gateway.inject` (503/HTML 502/dropped connection/delay, before or after the
real request commits), :attr:`Gateway.requests`, :meth:`Gateway.count`, :attr:`Gateway.counts`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import jwt
from aiohttp import web

SCHEMA = "public"
OBJECT_MEDIA = "application/vnd.pgrst.object+json"
RESERVED = frozenset({"select", "order", "limit", "offset", "on_conflict", "columns"})
OPS = {
    "eq": "=",
    "neq": "<>",
    "gt": ">",
    "gte": ">=",
    "lt": "<",
    "lte": "<=",
    "like": "like",
    "ilike": "ilike",
}
FAULT_MESSAGES = {
    "PGRST000": "Database connection error. Retrying the connection.",
    "PGRST001": "Database client error. Retrying the connection.",
    "PGRST002": "Could not query the database for the schema cache. Retrying.",
    "PGRST003": "Timed out acquiring connection from connection pool.",
}
ROLE = web.RequestKey("role", str)
HTML_502 = "<html><head><title>502 Bad Gateway</title></head><body>bad gateway</body></html>"


class PgrstError(Exception):
    """An error answered with PostgREST's JSON body; raising it inside a request rolls back."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        details: Any = None,
        hint: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.details, self.hint, self.headers = details, hint, dict(headers or {})


def ident(name: str) -> str:
    """Quote an identifier: the only way client-supplied names reach the SQL text."""
    return '"' + name.replace('"', '""') + '"'


def literal(value: str) -> str:
    """Quote a filter value as an untyped literal, so PostgreSQL casts it to the column type the
    way PostgREST's ``unknown``-typed parameters do (standard_conforming_strings is forced on)."""
    if "\x00" in value:
        raise PgrstError(400, "22P05", "unsupported Unicode escape sequence")
    return "'" + value.replace("'", "''") + "'"


def http_status(sqlstate: str, message: str, authed: bool) -> int:
    """PostgREST's ``mapSQLtoHTTP`` (Error.hs), including the pg-safeupdate and PTxyz cases."""
    exact = {
        "23503": 409,
        "23505": 409,
        "25006": 405,
        "53400": 500,
        "57P01": 503,
        "P0001": 400,
        "42883": 404,
        "42P01": 404,
        "42P17": 500,
    }
    if sqlstate in exact:
        return exact[sqlstate]
    if sqlstate == "42501":
        return 403 if authed else 401
    if sqlstate == "21000":
        return 400 if message.endswith("requires a WHERE clause") else 500
    if sqlstate == "22023":
        return 401 if message.startswith("role") and message.endswith("does not exist") else 400
    if sqlstate.startswith("PT"):
        return int(sqlstate[2:]) if sqlstate[2:].isdigit() else 500
    prefixes = {
        "08": 503,
        "09": 500,
        "0L": 403,
        "0P": 403,
        "25": 500,
        "28": 403,
        "2D": 500,
        "38": 500,
        "39": 500,
        "3B": 500,
        "40": 500,
        "53": 503,
        "54": 500,
        "55": 500,
        "57": 500,
        "58": 500,
        "F0": 500,
        "HV": 500,
        "P0": 500,
        "XX": 500,
    }
    return prefixes.get(sqlstate[:2], 400)


def pg_error(exc: asyncpg.PostgresError, authed: bool) -> PgrstError:
    """Translate a database error, including ``RAISE SQLSTATE 'PGRST'`` full-control errors."""
    state, msg = exc.sqlstate or "XX000", exc.message or ""
    if state == "PGRST":
        try:
            body, det = json.loads(msg), json.loads(exc.detail or "")
            return PgrstError(
                int(det["status"]),
                body["code"],
                body["message"],
                body.get("details"),
                body.get("hint"),
                det.get("headers"),
            )
        except (ValueError, KeyError, TypeError):
            return PgrstError(
                500, "PGRST121", "Could not parse JSON in the \"RAISE SQLSTATE 'PGRST'\" error"
            )
    return PgrstError(http_status(state, msg, authed), state, msg, exc.detail, exc.hint)


def error_response(err: PgrstError) -> web.Response:
    body = {"code": err.code, "message": err.message, "details": err.details, "hint": err.hint}
    headers = {"Proxy-Status": f"PostgREST; error={err.code}", **err.headers}
    if err.status == 401:
        headers.setdefault("WWW-Authenticate", "Bearer")
    return web.json_response(body, status=err.status, headers=headers)


def split_list(text: str) -> list[str]:
    """Split ``a,"b,c",d`` (the inside of ``in.(...)``) honouring double quotes and escapes."""
    items, cur, quoted, esc = [], [], False, False
    for ch in text:
        if esc:
            cur.append(ch)
            esc = False
        elif quoted and ch == "\\":
            esc = True
        elif ch == '"':
            quoted = not quoted
        elif ch == "," and not quoted:
            items.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    return [*items, "".join(cur)] if text else []


def condition(qual: str, column: str, raw: str) -> str:
    """One ``col=op.value`` filter as SQL; values are literals, columns quoted identifiers."""
    negate = raw.startswith("not.")
    op, sep, value = raw.removeprefix("not.").partition(".")
    col = f"{qual}.{ident(column)}"
    if not sep:
        raise PgrstError(400, "PGRST100", f'"failed to parse filter ({raw})"', None)
    if op in OPS:
        sql = f"{col} {OPS[op]} {literal(value.replace('*', '%') if 'like' in op else value)}"
    elif op == "is" and value.lower() in ("null", "true", "false", "unknown"):
        sql = f"{col} is {value.lower()}"
    elif op == "in" and value.startswith("(") and value.endswith(")"):
        items = split_list(value[1:-1])
        sql = f"{col} in ({', '.join(map(literal, items))})" if items else "false"
    else:
        raise PgrstError(
            400,
            "PGRST100",
            f'"failed to parse filter ({raw})"',
            "unknown or unsupported operator (test gateway)",
        )
    return f"not ({sql})" if negate else sql


@dataclass
class Query:
    """The read part of a request: ``select``, filters, ``order``, ``limit``/``offset``."""

    columns: str = "*"
    where: list[str] = field(default_factory=list)
    order: str = ""
    limit: str = ""

    @classmethod
    def parse(
        cls, params: Mapping[str, str], qual: str, skip: frozenset[str] = frozenset()
    ) -> Query:
        q = cls()
        cols = [c.strip() for c in params.get("select", "*").split(",") if c.strip()]
        if any(ch in c for c in cols for ch in "():!"):
            raise PgrstError(
                400,
                "PGRST127",
                "Feature not implemented",
                "embedding, aliases and casts in select (test gateway)",
            )
        q.columns = (
            f"{qual}.*" if cols in ([], ["*"]) else ", ".join(f"{qual}.{ident(c)}" for c in cols)
        )
        q.where = [
            condition(qual, k, v) for k, v in params.items() if k not in RESERVED and k not in skip
        ]
        terms = []
        for term in filter(None, params.get("order", "").split(",")):
            col, *mods = term.split(".")
            words = {
                "asc": "asc",
                "desc": "desc",
                "nullsfirst": "nulls first",
                "nullslast": "nulls last",
            }
            if any(m not in words for m in mods):
                raise PgrstError(400, "PGRST100", f'"failed to parse order ({term})"')
            terms.append(" ".join([f"{qual}.{ident(col)}", *(words[m] for m in mods)]))
        q.order = f" order by {', '.join(terms)}" if terms else ""
        for key in ("limit", "offset"):
            if key in params:
                if not params[key].isdigit():
                    raise PgrstError(400, "PGRST100", f'"failed to parse {key}"')
                q.limit += f" {key} {int(params[key])}"
        return q

    def sql_where(self) -> str:
        return f" where {' and '.join(self.where)}" if self.where else ""


@dataclass
class Function:
    """One ``pg_proc`` row, reduced to what PostgREST's schema cache keeps."""

    name: str
    in_names: list[str]
    in_types: list[str]
    required: int
    volatile: bool
    setof: bool
    composite: bool
    void: bool
    timeout: str | None

    def matches(self, keys: set[str]) -> bool:
        return keys <= set(self.in_names) and set(self.in_names[: self.required]) <= keys

    @property
    def whole_body(self) -> bool:
        return (
            len(self.in_names) == 1
            and not self.in_names[0]
            and self.in_types[0] in ("json", "jsonb")
        )


FUNCTIONS_SQL = """
select p.proname::text as name, p.provolatile = 'v' as volatile, p.proretset as setof,
       p.prorettype = 'void'::regtype as void, rt.typtype in ('c', 'p') as composite,
       p.pronargs - p.pronargdefaults as required, p.proconfig as config,
       coalesce(p.proargnames, '{}') as names, coalesce(p.proargmodes::text[], '{}') as modes,
       array(select format_type(t, null) from unnest(p.proargtypes::oid[]) with ordinality
             as x(t, i) order by i) as in_types
from pg_proc p join pg_namespace n on n.oid = p.pronamespace
     join pg_type rt on rt.oid = p.prorettype
where n.nspname = $1 and p.proname = $2 and p.prokind = 'f'"""

TABLE_SQL = """
select array(select attname::text from pg_attribute where attrelid = c.oid and attnum > 0
             and not attisdropped order by attnum) as cols,
       array(select a.attname::text from pg_index i join pg_attribute a
             on a.attrelid = i.indrelid and a.attnum = any(i.indkey)
             where i.indrelid = c.oid and i.indisprimary) as pk
from pg_class c join pg_namespace n on n.oid = c.relnamespace
where n.nspname = $1 and c.relname = $2 and c.relkind in ('r', 'v', 'm', 'p', 'f')"""

ROLE_TIMEOUT_SQL = """
select set_config('statement_timeout', substr(s, 19), true)
from pg_db_role_setting d join pg_roles r on r.oid = d.setrole, unnest(d.setconfig) s
where r.rolname = $1 and s like 'statement_timeout=%'
  and d.setdatabase in (0, (select oid from pg_database where datname = current_database()))
order by d.setdatabase"""


async def load_functions(conn: asyncpg.Connection, name: str) -> list[Function]:
    out = []
    for r in await conn.fetch(FUNCTIONS_SQL, SCHEMA, name):
        modes = r["modes"] or ["i"] * len(r["in_types"])
        names = list(r["names"]) or [""] * len(modes)
        in_names = [n for n, m in zip(names, modes, strict=True) if m in ("i", "b", "v")]
        timeout = next(
            (c.split("=", 1)[1] for c in r["config"] or () if c.startswith("statement_timeout=")),
            None,
        )
        out.append(
            Function(
                name,
                in_names,
                list(r["in_types"]),
                r["required"],
                r["volatile"],
                r["setof"],
                r["composite"],
                r["void"],
                timeout,
            )
        )
    return out


@dataclass
class Fault:
    """One injected failure; see :meth:`Gateway.inject`."""

    path_contains: str
    method: str | None
    times: int
    status: int | None
    code: str
    html: bool
    delay: float
    drop: bool
    after: bool


@dataclass
class Logged:
    method: str
    path: str
    query: str
    status: int  # -1 when the connection was dropped


class Gateway:
    """The running app: ``url`` for ``acreate_client``, ``requests`` log, ``inject`` faults."""

    def __init__(self, pool: asyncpg.Pool, jwt_secret: str) -> None:
        self.pool, self.secret = pool, jwt_secret
        self.url = ""
        self.requests: list[Logged] = []
        self.faults: list[Fault] = []
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.app = web.Application(
            middlewares=[self._outer, self._errors], client_max_size=16 * 1024 * 1024
        )
        self.app.router.add_route("*", "/rest/v1/rpc/{fn}", self._rpc)
        self.app.router.add_route("*", "/rest/v1/{table}", self._table)

    # -- test API ---------------------------------------------------------------------------
    def inject(
        self,
        path_contains: str = "",
        *,
        method: str | None = None,
        status: int | None = None,
        code: str = "PGRST003",
        html: bool = False,
        delay: float = 0.0,
        drop: bool = False,
        after: bool = False,
        times: int = 1,
    ) -> Fault:
        """Make the next ``times`` matching requests fail.

        ``status`` answers a PostgREST-style JSON error with ``code`` (default 503 PGRST003);
        ``html`` a non-JSON 502 page; ``drop`` closes the connection without a response;
        ``delay`` sleeps first (a hang when nothing else is set: the request then still runs,
        like a slow upstream that a client timeout does not roll back). ``after=True`` runs
        and commits the real request before the fault, i.e. the response is lost."""
        if status is None and not (html or drop or delay):
            status = 503
        fault = Fault(
            path_contains,
            method,
            times,
            status or (502 if html else None),
            code,
            html,
            delay,
            drop,
            after,
        )
        self.faults.append(fault)
        return fault

    def count(self, path_contains: str = "", method: str | None = None) -> int:
        """How many requests reached the gateway (faulted ones included)."""
        return sum(
            1
            for r in self.requests
            if path_contains in r.path and (method is None or r.method == method)
        )

    @property
    def counts(self) -> Counter[str]:
        return Counter(f"{r.method} {r.path}" for r in self.requests)

    async def close(self) -> None:
        self._closing.set()
        if self._runner is not None:
            await self._runner.cleanup()
        await self.pool.close()

    # -- middleware -------------------------------------------------------------------------
    def _take_fault(self, request: web.Request) -> Fault | None:
        for fault in self.faults:
            if fault.path_contains in request.path and fault.method in (None, request.method):
                fault.times -= 1
                if fault.times <= 0:
                    self.faults.remove(fault)
                return fault
        return None

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    @web.middleware
    async def _outer(self, request: web.Request, handler: Any) -> web.StreamResponse:
        entry = Logged(request.method, request.path, request.query_string, 0)
        self.requests.append(entry)
        await request.read()  # buffered now, so a client that gives up cannot cancel the work
        fault = self._take_fault(request)
        if fault is None:
            try:
                resp = await handler(request)
            except web.HTTPException as exc:  # aiohttp's own 404/405 for unknown routes
                entry.status = exc.status
                raise
        else:
            real = await handler(request) if fault.after else None
            await self._sleep(fault.delay)
            if fault.drop:
                if request.transport is not None:
                    request.transport.close()
                entry.status = -1
                return web.Response(status=599)
            if fault.html:
                resp = web.Response(
                    status=fault.status or 502, text=HTML_502, content_type="text/html"
                )
            elif fault.status is not None:
                msg = FAULT_MESSAGES.get(fault.code, "injected fault")
                resp = error_response(PgrstError(fault.status, fault.code, msg))
            else:
                resp = real if real is not None else await handler(request)
        entry.status = resp.status
        return resp

    @web.middleware
    async def _errors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        try:
            return await handler(request)
        except PgrstError as err:
            return error_response(err)
        except asyncpg.PostgresError as exc:
            return error_response(pg_error(exc, request.get(ROLE, "anon") != "anon"))
        except (asyncpg.InterfaceError, OSError) as exc:
            return error_response(PgrstError(503, "PGRST001", FAULT_MESSAGES["PGRST001"], str(exc)))

    # -- request plumbing -------------------------------------------------------------------
    def _claims(self, request: web.Request) -> dict[str, Any]:
        auth = request.headers.get("Authorization")
        if auth is None:
            return {"role": "anon"}
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise PgrstError(401, "PGRST301", "Empty JWT is sent in Authorization header")
        try:
            claims = jwt.decode(
                token.strip(), self.secret, algorithms=["HS256"], options={"verify_aud": False}
            )
        except jwt.ExpiredSignatureError:
            raise PgrstError(401, "PGRST303", "JWT expired") from None
        except jwt.InvalidSignatureError:
            raise PgrstError(401, "PGRST301", "JWT cryptographic operation failed") from None
        except jwt.InvalidTokenError:
            raise PgrstError(401, "PGRST301", "JWT couldn't be decoded") from None
        return {**claims, "role": claims.get("role") or "anon"}

    def _check(self, request: web.Request) -> dict[str, Any]:
        """Profile and media-type checks, then the JWT: the order PostgREST rejects in."""
        header = "Accept-Profile" if request.method in ("GET", "HEAD") else "Content-Profile"
        profile = request.headers.get(header, SCHEMA)
        if profile != SCHEMA:
            raise PgrstError(
                406,
                "PGRST106",
                f"Invalid schema: {profile}",
                hint=f"Only the following schemas are exposed: {SCHEMA}",
            )
        accept = request.headers.get("Accept", "*/*")
        if not any(m in accept for m in ("*/*", "application/json", OBJECT_MEDIA)):
            raise PgrstError(406, "PGRST107", f"None of these media types are available: {accept}")
        claims = self._claims(request)
        request[ROLE] = claims["role"]
        return claims

    @contextlib.asynccontextmanager
    async def _tx(
        self,
        conn: asyncpg.Connection,
        request: web.Request,
        claims: dict[str, Any],
        readonly: bool,
        stmt_timeout: str | None = None,
    ) -> AsyncIterator[None]:
        """PostgREST's per-request transaction: role, claims and request GUCs, all LOCAL."""
        async with conn.transaction(readonly=readonly):
            await conn.fetch(ROLE_TIMEOUT_SQL, claims["role"])
            headers = {k.lower(): v for k, v in request.headers.items()}
            await conn.execute(
                "select set_config('standard_conforming_strings', 'on', true),"
                " set_config('search_path', $1, true),"
                " set_config('request.jwt.claims', $2, true),"
                " set_config('request.method', $3, true), set_config('request.path', $4, true),"
                " set_config('request.headers', $5, true), set_config('role', $6, true)"
                + (", set_config('statement_timeout', $7, true)" if stmt_timeout else ""),
                SCHEMA,
                json.dumps(claims),
                request.method,
                request.path.removeprefix("/rest/v1"),
                json.dumps(headers),
                claims["role"],
                *([stmt_timeout] if stmt_timeout else []),
            )
            yield

    @staticmethod
    async def _body(request: web.Request, empty: Any) -> Any:
        raw = await request.read()
        if not raw.strip():
            return empty
        try:
            return json.loads(raw)
        except ValueError:
            raise PgrstError(400, "PGRST102", "Empty or invalid json") from None

    @staticmethod
    def _json(
        request: web.Request,
        text: str,
        status: int = 200,
        *,
        rows: int | None = None,
        plural: bool = True,
    ) -> web.Response:
        """Render a JSON result, enforcing ``Accept: vnd.pgrst.object+json`` on row sets."""
        media = "application/json"
        if OBJECT_MEDIA in request.headers.get("Accept", "") and plural:
            if rows != 1:
                raise PgrstError(
                    406,
                    "PGRST116",
                    "Cannot coerce the result to a single JSON object",
                    f"The result contains {rows} rows",
                )
            text, media = json.dumps(json.loads(text)[0]), OBJECT_MEDIA
        return web.Response(status=status, text=text, content_type=media, charset="utf-8")

    # -- /rpc -------------------------------------------------------------------------------
    async def _rpc(self, request: web.Request) -> web.Response:
        if request.method not in ("GET", "HEAD", "POST"):
            raise PgrstError(405, "PGRST101", f"Cannot use the {request.method} method on RPC")
        claims = self._check(request)
        name = request.match_info["fn"]
        async with self.pool.acquire() as conn:
            candidates = await load_functions(conn, name)
            arg_names = {n for f in candidates for n in f.in_names if n}
            if request.method == "POST":
                body = await self._body(request, {})
                args = body if isinstance(body, dict) else {}
            else:
                body = args = {k: v for k, v in request.query.items() if k in arg_names}
            fn = self._resolve(name, candidates, set(args), request.method == "POST")
            params: list[str] = []
            if fn.whole_body:  # PostgREST passes the whole body to a lone json/jsonb param
                source = f"{ident(SCHEMA)}.{ident(name)}($1::{fn.in_types[0]}) _f"
                params = [json.dumps(body)]
            elif args:
                pos = {n: t for n, t in zip(fn.in_names, fn.in_types, strict=True)}
                defs = ", ".join(f"{ident(k)} {pos[k]}" for k in args)
                call_args = ", ".join(f"{ident(k)} := _a.{ident(k)}" for k in args)
                source = (
                    f"json_to_record($1::json) as _a({defs}), "
                    f"lateral {ident(SCHEMA)}.{ident(name)}({call_args}) _f"
                )
                params = [json.dumps(args)]
            else:
                source = f"{ident(SCHEMA)}.{ident(name)}() _f"
            query = Query.parse(request.query, "_f", frozenset(arg_names))
            readonly = request.method != "POST" or not fn.volatile
            async with self._tx(conn, request, claims, readonly, fn.timeout):
                if fn.void:
                    await conn.execute(f"select from {source}", *params)
                    return web.Response(status=204)
                if fn.setof:
                    cols, agg = (query.columns, "_r") if fn.composite else ("_f as v", "_r.v")
                    row = await conn.fetchrow(
                        f"select coalesce(json_agg({agg}), '[]')::text, count(*) from (select "
                        f"{cols} from {source}{query.sql_where()}{query.order}{query.limit}) _r",
                        *params,
                    )
                    return self._json(request, row[0], rows=row[1])
                expr = "row_to_json(_r)" if fn.composite else "to_json(_r.v)"
                cols = query.columns if fn.composite else "_f as v"
                text = await conn.fetchval(
                    f"select {expr}::text from (select {cols} from {source}) _r", *params
                )
                return self._json(request, text or "null", plural=False)

    @staticmethod
    def _resolve(name: str, candidates: list[Function], keys: set[str], post: bool) -> Function:
        """PostgREST's overload choice: by argument-name set, else a lone json/jsonb param."""
        found = [f for f in candidates if f.matches(keys) and not f.whole_body]
        if not found:
            found = [f for f in candidates if f.whole_body]
        if len(found) == 1:
            return found[0]
        qname = f"{SCHEMA}.{name}"
        if found:
            sigs = ", ".join(
                qname
                + "("
                + ", ".join(f"{n} => {t}" for n, t in zip(f.in_names, f.in_types, strict=True))
                + ")"
                for f in found
            )
            raise PgrstError(
                300,
                "PGRST203",
                f"Could not choose the best candidate function between: {sigs}",
                hint="Try renaming the parameters or the "
                "function itself in the database so function overloading can be "
                "resolved",
            )
        ks = ", ".join(sorted(keys))
        shown = f"({ks})" if keys else " without parameters"
        det = (
            f" with parameter{'s' if len(keys) > 1 else ''} {ks}" if keys else " without parameters"
        )
        hint = (
            f"Perhaps you meant to call the function {qname}"
            f"({', '.join(sorted(candidates[0].in_names))})"
            if candidates
            else None
        )
        det += " or with a single unnamed json/jsonb parameter" if post else ""
        raise PgrstError(
            404,
            "PGRST202",
            f"Could not find the function {qname}{shown} in the schema cache",
            f"Searched for the function {qname}{det}, but no "
            "matches were found in the schema cache.",
            hint,
        )

    # -- tables -----------------------------------------------------------------------------
    async def _table(self, request: web.Request) -> web.Response:
        method = request.method
        if method not in ("GET", "HEAD", "POST", "PATCH", "DELETE"):
            raise PgrstError(
                400, "PGRST127", "Feature not implemented", f"{method} on tables (test gateway)"
            )
        claims = self._check(request)
        name = request.match_info["table"]
        table = f"{ident(SCHEMA)}.{ident(name)}"
        prefer = {
            p.strip().partition("=")[0]: p.strip().partition("=")[2]
            for h in request.headers.getall("Prefer", [])
            for p in h.split(",")
        }
        minimal = prefer.get("return", "minimal") != "representation"
        async with self.pool.acquire() as conn:
            meta = await conn.fetchrow(TABLE_SQL, SCHEMA, name)
            if meta is None:
                raise PgrstError(
                    404,
                    "PGRST205",
                    f"Could not find the table '{SCHEMA}.{name}' in the schema cache",
                )
            query = Query.parse(request.query, table)
            body: Any = None
            rows: list[Any] = []
            keys: list[str] = []
            if method in ("POST", "PATCH"):
                body = await self._body(request, None)
                rows = body if isinstance(body, list) else [body]
                if body is None or not all(isinstance(r, dict) for r in rows):
                    raise PgrstError(400, "PGRST102", "Empty or invalid json")
                keys = list(dict.fromkeys(k for r in rows for k in r))
                for key in keys:
                    if key not in meta["cols"]:
                        raise PgrstError(
                            400,
                            "PGRST204",
                            f"Could not find the '{key}' column of '{name}' in the schema cache",
                        )
            if method in ("PATCH", "DELETE") and not query.where:
                raise PgrstError(
                    400,
                    "21000",
                    f"{'UPDATE' if method == 'PATCH' else 'DELETE'} requires a WHERE clause",
                )
            if method in ("PATCH", "DELETE") and query.limit:
                raise PgrstError(
                    400,
                    "PGRST127",
                    "Feature not implemented",
                    "limited update/delete (test gateway)",
                )
            record = f"(select * from json_populate_record(null::{table}, $1::json)) _b"
            if method in ("GET", "HEAD"):
                stmt, params = None, []
            elif method == "PATCH":
                sets = ", ".join(f"{ident(k)} = _b.{ident(k)}" for k in keys)
                stmt = (
                    f"update {table} set {sets} from {record}{query.sql_where()}"
                    if keys
                    else f"update {table} set {ident(meta['cols'][0])} = "
                    f"{ident(meta['cols'][0])} where false"
                )
                params = [json.dumps(body)] if keys else []
            elif method == "DELETE":
                stmt, params = f"delete from {table}{query.sql_where()}", []
            else:
                stmt, params = (
                    self._insert(table, keys, meta["pk"], request, prefer),
                    [json.dumps(rows)],
                )
            async with self._tx(conn, request, claims, readonly=stmt is None):
                if stmt is not None and minimal:
                    await conn.execute(stmt, *params)
                    return web.Response(status=201 if method == "POST" else 204)
                source = (
                    f"{table}{query.sql_where()}{query.order}{query.limit}"
                    if stmt is None
                    else "_w"
                )
                cols = query.columns.replace(f"{table}.", "_w.") if stmt else query.columns
                with_ = f"with _w as ({stmt} returning {table}.*) " if stmt else ""
                row = await conn.fetchrow(
                    f"{with_}select coalesce(json_agg(_r), '[]')::text, count(*) from "
                    f"(select {cols} from {source}) _r",
                    *params,
                )
                resp = self._json(request, row[0], 201 if method == "POST" else 200, rows=row[1])
                if method in ("GET", "HEAD"):
                    resp.headers["Content-Range"] = f"0-{row[1] - 1}/*" if row[1] else "*/0"
                return resp

    @staticmethod
    def _insert(
        table: str, keys: list[str], pk: list[str], request: web.Request, prefer: dict[str, str]
    ) -> str:
        if not keys:
            return f"insert into {table} default values"
        cols = ", ".join(map(ident, keys))
        stmt = (
            f"insert into {table} ({cols}) select {cols} from "
            f"json_populate_recordset(null::{table}, $1::json) _b where true"
        )
        resolution = prefer.get("resolution")
        if resolution in ("merge-duplicates", "ignore-duplicates"):
            target = [
                c.strip() for c in request.query.get("on_conflict", "").split(",") if c.strip()
            ] or pk
            action = (
                "do nothing"
                if resolution == "ignore-duplicates"
                else "do update set " + ", ".join(f"{ident(k)} = excluded.{ident(k)}" for k in keys)
            )
            stmt += f" on conflict ({', '.join(map(ident, target))}) {action}"
        return stmt


def _bound_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


async def start_gateway(dsn: str, jwt_secret: str) -> Gateway:
    """Serve the gateway on a free loopback port; ``await gateway.close()`` when done."""
    pool = await asyncpg.create_pool(dsn, min_size=1, max_size=10, statement_cache_size=0)
    gateway = Gateway(pool, jwt_secret)
    runner = web.AppRunner(gateway.app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    sock = _bound_socket()
    await web.SockSite(runner, sock).start()
    gateway._runner = runner
    gateway.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    return gateway


def make_token(secret: str, role: str, sub: str | None = None, exp_s: int = 3600) -> str:
    """A Supabase-shaped HS256 JWT (negative ``exp_s`` gives an already-expired token)."""
    now = int(time.time())
    claims: dict[str, Any] = {"iss": "supabase", "role": role, "iat": now, "exp": now + exp_s}
    if sub is not None:
        claims |= {"sub": sub, "aud": "authenticated"}
    return jwt.encode(claims, secret, algorithm="HS256")
