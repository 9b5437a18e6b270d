"""Settings from the environment: declared once, validated once, reported in one message.

Why one message: a deploy that stops at the first bad variable costs one redeploy per
variable. ``load_settings`` checks everything and raises a single ``ConfigError`` that
lists every problem with the expected form; the CLI prints it and exits 2.

Why one table: ``VARIABLES`` is the only list of what the worker reads. ``.env.example``,
the README table, ``render.yaml`` and ``fly.toml`` are tested against it.

Secrets (the service-role key, the Gemini key, the database password) are registered
with ``worker.logs`` as soon as they are read and never appear in ``repr(Settings)`` or
in error messages.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import secrets
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

from dotenv import dotenv_values

from worker.logs import FORMATS, LEVELS, MASK, redact, register_secret

GROUPS = (
    "Supabase / Database",
    "Gemini",
    "Worker",
    "Health & logging",
    "Dashboard",
    "Platform-provided",
)
_STORE, _GEMINI, _WORKER, _HEALTH, _DASHBOARD, _PLATFORM = GROUPS


class Invalid(ValueError):
    """Raised by a parser with what is wrong, phrased as the expected form."""


# ----------------------------------------------------------------------------- parsers


def _int(low: int, high: int | None = None) -> Callable[[str], int]:
    expected = (
        f"an integer between {low} and {high}" if high is not None else f"an integer >= {low}"
    )

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise Invalid(f"must be {expected}") from None
        if value < low or (high is not None and value > high):
            raise Invalid(f"must be {expected}")
        return value

    return parse


def _float(low: float, *, above: bool = False) -> Callable[[str], float]:
    expected = f"a number {'>' if above else '>='} {low:g} (seconds)"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise Invalid(f"must be {expected}") from None
        if not math.isfinite(value) or value < low or (above and value == low):
            raise Invalid(f"must be {expected}")
        return value

    return parse


def _similarity(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise Invalid("must be a cosine similarity from -1 to 1, such as 0.65") from None
    if not -1.0 <= value <= 1.0:  # NaN fails too
        raise Invalid("must be a cosine similarity from -1 to 1, such as 0.65")
    return value


def _choice(*options: str, upper: bool = False) -> Callable[[str], str]:
    def parse(text: str) -> str:
        value = text.upper() if upper else text.lower()
        if value not in options:
            raise Invalid(f"must be one of {', '.join(options)}")
        return value

    return parse


def _http_url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise Invalid("must be an http(s) URL such as https://<project-ref>.supabase.co")
    return text.rstrip("/")


def where(url: str) -> str:
    """host:port/database of a URL, never its user or password."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "the configured address"
    path = parts.path if parts.scheme.startswith("postgres") else ""
    return f"{host}{port}{path}"


def postgres_url(text: str) -> str:
    """A postgres URL the drivers can use, or ``Invalid`` saying what is wrong."""
    parts = urlsplit(text)
    if parts.scheme not in ("postgres", "postgresql"):
        raise Invalid(
            "must be a postgres:// or postgresql:// URL with user, password, host, port and "
            "database (on Supabase: Connect > Session pooler)"
        )
    try:
        parts.port  # noqa: B018 - urlsplit checks the port lazily
    except ValueError:
        raise Invalid("must have a numeric port, such as 5432 (session pooler)") from None
    return text


def _names(text: str) -> tuple[str, ...] | None:
    """Comma-separated names, blanks and duplicates dropped; empty means None (= all)."""
    items = dict.fromkeys(part.strip() for part in text.split(","))
    items.pop("", None)
    return tuple(items) or None


def _word(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_.\-]*", text):
        raise Invalid("must be a single word such as development, staging or production")
    return text


def _worker_id(text: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._:@\-]{0,127}", text):
        raise Invalid("must be 1-128 characters: letters, digits and . _ : @ -")
    return text


def _text(text: str) -> str:
    return text


# ------------------------------------------------------------------------------- table


@dataclass(frozen=True)
class Variable:
    """One environment variable the worker reads.

    ``field`` is the ``Settings`` attribute it fills directly (None for platform inputs
    and values derived by hand); ``default`` is the text used when it is unset.
    """

    name: str
    default: str | None
    description: str
    group: str
    secret: bool = False
    field: str | None = None
    parse: Callable[[str], Any] = _text


def _v(
    name: str,
    default: str | None,
    description: str,
    group: str,
    parse: Callable[[str], Any] = _text,
    *,
    secret: bool = False,
    field: str | None = "",
) -> Variable:
    """Shorthand for the table below; ``field`` defaults to the lower-cased name."""
    return Variable(
        name, default, description, group, secret, name.lower() if field == "" else field, parse
    )


VARIABLES: tuple[Variable, ...] = (
    _v(
        "SUPABASE_URL",
        None,
        "Project URL https://<ref>.supabase.co; with the key below selects the REST store",
        _STORE,
        _http_url,
    ),
    _v(
        "SUPABASE_SERVICE_ROLE_KEY",
        None,
        "Service-role (or sb_secret_) key; server-side only, it bypasses RLS",
        _STORE,
        secret=True,
    ),
    _v(
        "DATABASE_URL",
        None,
        "postgresql:// URL: the direct store, needed by migrate; session pooler (5432)",
        _STORE,
        postgres_url,
        secret=True,
    ),
    _v(
        "GENERATION_PROVIDER",
        "gemini",
        "gemini, or offline (deterministic text, no API calls; refused in production)",
        _GEMINI,
        _choice("gemini", "offline"),
    ),
    _v(
        "GEMINI_API_KEY",
        None,
        "Gemini API key; required when GENERATION_PROVIDER=gemini",
        _GEMINI,
        secret=True,
    ),
    _v("GEMINI_MODEL", "gemini-3.5-flash", "Model used when a job does not name one", _GEMINI),
    _v(
        "GEMINI_ALLOWED_MODELS",
        None,
        "Comma-separated models a job may ask for; empty means GEMINI_MODEL only",
        _GEMINI,
        _names,
    ),
    _v(
        "GEMINI_BASE_URL",
        None,
        "API endpoint override (proxies, tests); empty = Google's",
        _GEMINI,
        _http_url,
    ),
    _v(
        "GEMINI_MAX_CONCURRENT_STREAMS",
        "50",
        "Gemini streams open at once per process",
        _GEMINI,
        _int(1),
    ),
    _v(
        "GEMINI_REQUESTS_PER_MINUTE",
        "600",
        "Local safety cap on requests per minute per process (0 = none); the fleet's "
        "shared budget per model is the gemini_budgets table",
        _GEMINI,
        _int(0),
    ),
    _v(
        "GEMINI_SHARED_BUDGET",
        "on",
        "on: every request takes from the fleet's budget in gemini_budgets and 429s cool the "
        "model down for every instance; off: per-process limiting only",
        _GEMINI,
        _choice("on", "off"),
    ),
    _v(
        "GEMINI_CONNECT_TIMEOUT_S",
        "10.0",
        "Seconds to open a connection to Gemini",
        _GEMINI,
        _float(0, above=True),
    ),
    _v(
        "GEMINI_IDLE_TIMEOUT_S",
        "90.0",
        "Longest silence between streamed chunks before the section is retried",
        _GEMINI,
        _float(0, above=True),
    ),
    _v(
        "GEMINI_REQUEST_TIMEOUT_S",
        "600.0",
        "Cap on one whole Gemini request",
        _GEMINI,
        _float(0, above=True),
    ),
    _v(
        "GEMINI_SECTION_RETRIES",
        "2",
        "Retries of one section inside a job before the job itself is retried",
        _GEMINI,
        _int(0),
    ),
    _v(
        "GEMINI_MAX_RATE_LIMIT_WAIT_S",
        "120.0",
        "Longest in-job wait on a 429 before the job goes back to the queue",
        _GEMINI,
        _float(0),
    ),
    _v(
        "GEMINI_THINKING_LEVEL",
        "low",
        "Gemini 3 thinking level: minimal, low, medium, high, or default (the model's own; "
        "use it for Gemini 2.5, which takes no level)",
        _GEMINI,
        _choice("default", "minimal", "low", "medium", "high"),
    ),
    _v(
        "GEMINI_EMBEDDING_MODEL",
        "gemini-embedding-001",
        "Embedding model of story memory (768-dimension vectors; offline: hashed features)",
        _GEMINI,
    ),
    _v(
        "WORKER_ID",
        None,
        "Id of this process; leave empty so each process derives a unique one",
        _WORKER,
        _worker_id,
        field=None,
    ),
    _v("WORKER_CONCURRENCY", "50", "Jobs one process runs at once", _WORKER, _int(1, 500)),
    _v(
        "CLAIM_BATCH_MAX",
        "25",
        "Most jobs one claim call takes (it asks for min(free slots, this))",
        _WORKER,
        _int(1, 1000),
    ),
    _v("JOB_TYPES", None, "Comma-separated job types to claim; empty = all", _WORKER, _names),
    _v("JOB_LANES", None, "Comma-separated lanes to claim; empty = all", _WORKER, _names),
    _v("POLL_INTERVAL_MS", "1000", "Poll delay when the queue runs empty", _WORKER, _int(50)),
    _v(
        "POLL_MAX_INTERVAL_MS",
        "5000",
        "Ceiling of the idle poll backoff (>= POLL_INTERVAL_MS)",
        _WORKER,
        _int(50),
    ),
    _v(
        "HEARTBEAT_INTERVAL_S",
        "10.0",
        "How often the leases of running jobs are renewed",
        _WORKER,
        _float(0, above=True),
    ),
    _v(
        "MAX_RETRIES",
        "3",
        "Cap on a job's retries: min(job.max_retries, MAX_RETRIES)",
        _WORKER,
        _int(0),
    ),
    _v(
        "RETRY_BASE_S",
        "5.0",
        "First retry delay; it doubles per attempt, with jitter",
        _WORKER,
        _float(0, above=True),
    ),
    _v(
        "RETRY_MAX_S",
        "600.0",
        "Longest retry delay (>= RETRY_BASE_S)",
        _WORKER,
        _float(0, above=True),
    ),
    _v(
        "SHUTDOWN_GRACE_S",
        "30.0",
        "On SIGTERM, time for running jobs to finish; keep below the platform kill timeout",
        _WORKER,
        _float(0, above=True),
    ),
    _v(
        "FLUSH_INTERVAL_MS",
        "1000",
        "Longest time streamed text waits before it is written",
        _WORKER,
        _int(1),
    ),
    _v("FLUSH_CHARS", "2000", "Buffered characters that force a write", _WORKER, _int(1)),
    _v(
        "CONTEXT_TAIL_CHARS",
        "2000",
        "Characters of earlier text given to the next section as context",
        _WORKER,
        _int(0),
    ),
    _v(
        "CONTEXT_MAX_TOKENS",
        "6000",
        "Token budget of the context in each section prompt",
        _WORKER,
        _int(0),
    ),
    _v(
        "MEMORY_MAX_TOKENS",
        "800",
        "Story memory's share of CONTEXT_MAX_TOKENS in each section prompt; 0 turns it off",
        _WORKER,
        _int(0),
    ),
    _v(
        "MEMORY_TOP_K",
        "4",
        "Passages of earlier chapters retrieved per section, at most",
        _WORKER,
        _int(1, 50),
    ),
    _v(
        "MEMORY_MIN_SIMILARITY",
        "0.65",
        "Cosine similarity a passage needs to be retrieved (depends on the embedding model)",
        _WORKER,
        _similarity,
    ),
    _v(
        "HEALTH_CHECK_PORT",
        "10000",
        "Port of /health, /ready and /metrics; when unset, PORT if set, else 10000",
        _HEALTH,
        _int(1, 65535),
        field="health_port",
    ),
    _v("HEALTH_HOST", "0.0.0.0", "Address the health server binds", _HEALTH),
    _v(
        "APP_ENV",
        "development",
        "development, staging, production...; production refuses offline",
        _HEALTH,
        _word,
    ),
    _v("LOG_LEVEL", "INFO", "DEBUG, INFO, WARNING or ERROR", _HEALTH, _choice(*LEVELS, upper=True)),
    _v(
        "LOG_FORMAT",
        "auto",
        "json, text, or auto (text on a terminal, JSON lines otherwise)",
        _HEALTH,
        _choice(*FORMATS),
    ),
    _v(
        "DASHBOARD_HOST",
        "127.0.0.1",
        "Address `genworker dashboard` binds; any non-loopback address requires DASHBOARD_TOKEN",
        _DASHBOARD,
    ),
    _v("DASHBOARD_PORT", "10001", "Port of `genworker dashboard`", _DASHBOARD, _int(1, 65535)),
    _v(
        "DASHBOARD_TOKEN",
        None,
        "Dashboard login token (at least 16 characters); required off loopback",
        _DASHBOARD,
        secret=True,
    ),
    _v(
        "PORT",
        None,
        "Set by some platforms; the health port when HEALTH_CHECK_PORT is unset",
        _PLATFORM,
        _int(1, 65535),
        field=None,
    ),
    _v(
        "RENDER_SERVICE_ID",
        None,
        "Set by Render; part of the derived worker id",
        _PLATFORM,
        field=None,
    ),
    _v(
        "RENDER_INSTANCE_ID",
        None,
        "Set by Render; part of the derived worker id",
        _PLATFORM,
        field=None,
    ),
    _v(
        "FLY_MACHINE_ID",
        None,
        "Set by Fly.io; part of the derived worker id",
        _PLATFORM,
        field=None,
    ),
)

_BY_NAME = {variable.name: variable for variable in VARIABLES}
_SECRET_FIELDS = frozenset(v.field for v in VARIABLES if v.secret and v.field)

# ---------------------------------------------------------------------------- settings

Provider = Literal["gemini", "offline"]
WorkerIdSource = Literal["env", "render", "fly", "host"]


@dataclass(frozen=True, repr=False)
class Settings:
    """The validated configuration; build it with ``load_settings``."""

    supabase_url: str | None
    supabase_service_role_key: str | None
    database_url: str | None
    generation_provider: Provider
    gemini_api_key: str | None
    gemini_model: str
    gemini_allowed_models: tuple[str, ...]
    gemini_base_url: str | None
    gemini_max_concurrent_streams: int
    gemini_requests_per_minute: int
    gemini_shared_budget: str
    gemini_connect_timeout_s: float
    gemini_idle_timeout_s: float
    gemini_request_timeout_s: float
    gemini_section_retries: int
    gemini_max_rate_limit_wait_s: float
    gemini_thinking_level: str
    gemini_embedding_model: str
    worker_id: str
    worker_id_source: WorkerIdSource
    worker_concurrency: int
    claim_batch_max: int
    job_types: tuple[str, ...] | None
    job_lanes: tuple[str, ...] | None
    poll_interval_ms: int
    poll_max_interval_ms: int
    heartbeat_interval_s: float
    max_retries: int
    retry_base_s: float
    retry_max_s: float
    shutdown_grace_s: float
    flush_interval_ms: int
    flush_chars: int
    context_tail_chars: int
    context_max_tokens: int
    memory_max_tokens: int
    memory_top_k: int
    memory_min_similarity: float
    health_port: int
    health_host: str
    app_env: str
    log_level: str
    log_format: str
    dashboard_host: str
    dashboard_port: int
    dashboard_token: str | None

    @property
    def store_kind(self) -> Literal["postgres", "supabase"]:
        """Direct Postgres wins when both are configured: it has LISTEN and no HTTP hop."""
        return "postgres" if self.database_url else "supabase"

    @property
    def is_production(self) -> bool:
        return self.app_env.lower() == "production"

    @property
    def worker_id_is_explicit(self) -> bool:
        return self.worker_id_source == "env"

    def safe_dict(self) -> dict[str, Any]:
        """Every field with secrets masked: fit for a startup log line."""
        return {f.name: _masked(f.name, getattr(self, f.name)) for f in fields(self)}

    def __repr__(self) -> str:
        shown = ", ".join(f"{key}={value!r}" for key, value in self.safe_dict().items())
        return f"Settings({shown})"

    __str__ = __repr__


def _masked(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name in _SECRET_FIELDS and name != "database_url":
        return MASK
    if name == "database_url":
        return _mask_url(value)
    return value


def _mask_url(url: str) -> str:
    """The URL with its password replaced, parsed rather than pattern-matched."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return redact(url)
        userinfo, _, hostinfo = parts.netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        return parts._replace(netloc=f"{user}:{MASK}@{hostinfo}").geturl()
    except ValueError:
        return redact(url)


class ConfigError(ValueError):
    """Every configuration problem at once; ``str()`` is the message to print."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__(self.problems)

    def __str__(self) -> str:
        count = len(self.problems)
        lines = [f"genworker: invalid configuration ({count} problem{'s' * (count != 1)}):"]
        lines += [f"  - {redact(problem)}" for problem in self.problems]
        lines.append(
            "Set these as environment variables (or in .env for local runs); "
            ".env.example documents every variable."
        )
        return "\n".join(lines)


# ----------------------------------------------------------------------------- loading


def _sanitize(part: str) -> str:
    return re.sub(r"[^A-Za-z0-9._\-]", "-", part)[:64] or "unknown"


def derive_worker_id(environ: Mapping[str, str] | None = None) -> str:
    """A worker id unique to this process, even across overlapping deploys and instances.

    The platform part says where it runs; pid plus random hex makes two processes (old
    and new deploy on one host, or a restart reusing a pid) never collide.
    """
    env = os.environ if environ is None else environ
    suffix = f"{os.getpid()}-{secrets.token_hex(2)}"
    service, machine = env.get("RENDER_SERVICE_ID"), env.get("FLY_MACHINE_ID")
    if service:
        instance = env.get("RENDER_INSTANCE_ID") or socket.gethostname()
        return f"render-{_sanitize(service)}-{_sanitize(instance)}-{suffix}"
    if machine:
        return f"fly-{_sanitize(machine)}-{suffix}"
    return f"{_sanitize(socket.gethostname())}-{suffix}"


def _environment(environ: Mapping[str, str] | None, dotenv: bool) -> Mapping[str, str]:
    """The variables to read: ``environ``, or the process env over ``./.env``.

    ``.env`` is merged rather than loaded into ``os.environ``, so real variables always
    win and loading has no side effects on the process.
    """
    if environ is not None:
        return environ
    if not dotenv or not (Path.cwd() / ".env").is_file():
        return os.environ
    from_file = {k: v for k, v in dotenv_values(Path.cwd() / ".env").items() if v is not None}
    return {**from_file, **os.environ}


def _get(env: Mapping[str, str], name: str) -> str | None:
    """The stripped value, or None when unset or blank (a blank line in .env is unset)."""
    value = env.get(name)
    if value is None:
        return None
    return value.strip() or None


def _register_secrets(env: Mapping[str, str]) -> None:
    for variable in VARIABLES:
        value = _get(env, variable.name)
        if not variable.secret or value is None:
            continue
        if variable.name == "DATABASE_URL":
            try:
                password = urlsplit(value).password
            except ValueError:
                password = None
            if password:
                register_secret(password)
                register_secret(unquote(password))
        else:
            register_secret(value)


def _shown(variable: Variable, raw: str) -> str:
    if variable.name == "DATABASE_URL":
        return repr(_mask_url(raw))
    if variable.secret:
        return "a hidden value"
    text = redact(raw)
    return repr(text if len(text) <= 80 else text[:77] + "...")


def load_settings(
    environ: Mapping[str, str] | None = None,
    *,
    dotenv: bool = True,
    scope: Literal["worker", "store", "dashboard"] = "worker",
) -> Settings:
    """Read, validate and return the settings, or raise one ``ConfigError`` for all problems.

    ``environ`` replaces the process environment (and disables ``.env``), for tests.
    ``scope="store"`` validates only the database variables: operator commands
    (status, enqueue, requeue) need no Gemini key. ``scope="dashboard"`` adds the
    DASHBOARD_* variables and refuses a non-loopback bind without a token; the other
    scopes ignore DASHBOARD_* problems (a dashboard typo never stops a worker).
    """
    env = _environment(environ, dotenv)
    _register_secrets(env)
    problems: list[str] = []
    values: dict[str, Any] = {}

    def parse(variable: Variable, raw: str | None) -> Any:
        text = raw if raw is not None else variable.default
        if text is None:
            return None
        try:
            return variable.parse(text)
        except Invalid as exc:
            problems.append(f"{variable.name}: {exc}, got {_shown(variable, text)}")
            return None

    for variable in VARIABLES:
        if variable.field and variable.field != "health_port":
            values[variable.field] = parse(variable, _get(env, variable.name))

    # HEALTH_CHECK_PORT, else the platform's PORT, else the default.
    if _get(env, "HEALTH_CHECK_PORT") is None and _get(env, "PORT") is not None:
        values["health_port"] = parse(_BY_NAME["PORT"], _get(env, "PORT"))
    else:
        values["health_port"] = parse(_BY_NAME["HEALTH_CHECK_PORT"], _get(env, "HEALTH_CHECK_PORT"))

    explicit_id = parse(_BY_NAME["WORKER_ID"], _get(env, "WORKER_ID"))
    if explicit_id:
        values["worker_id"], values["worker_id_source"] = explicit_id, "env"
    else:
        values["worker_id"] = derive_worker_id(env)
        values["worker_id_source"] = (
            "render"
            if _get(env, "RENDER_SERVICE_ID")
            else "fly"
            if _get(env, "FLY_MACHINE_ID")
            else "host"
        )

    given = {variable.name for variable in VARIABLES if _get(env, variable.name)}
    problems += _cross_checks(values, given)
    store_names = {v.name for v in VARIABLES if v.group == _STORE}
    dashboard_names = {v.name for v in VARIABLES if v.group == _DASHBOARD}
    if scope == "dashboard":
        problems += _dashboard_checks(values)
    if scope in ("store", "dashboard"):
        keep = store_names | (dashboard_names if scope == "dashboard" else set())
        problems = [
            p for p in problems if p.split(":")[0] in keep or p.startswith("DATABASE_URL or")
        ]
    else:
        problems = [p for p in problems if p.split(":")[0] not in dashboard_names]
    if problems:
        raise ConfigError(problems)
    if values["gemini_allowed_models"] is None:
        values["gemini_allowed_models"] = (values["gemini_model"],)
    return Settings(**values)


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _dashboard_checks(values: dict[str, Any]) -> list[str]:
    """The dashboard can cancel anyone's job: off loopback it must ask for a token."""
    problems: list[str] = []
    token, host = values["dashboard_token"], values["dashboard_host"]
    if token is not None and len(token) < 16:
        problems.append(
            "DASHBOARD_TOKEN: must be at least 16 characters; generate one with "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
        )
    if host and not is_loopback(host) and token is None:
        problems.append(
            f"DASHBOARD_TOKEN: required when DASHBOARD_HOST is not a loopback address "
            f"(got {host!r}); the dashboard refuses to serve other machines without a login"
        )
    return problems


def _cross_checks(values: dict[str, Any], given: set[str]) -> list[str]:
    """Rules that involve more than one variable.

    ``given`` holds the variables that were set, valid or not, so a bad value is reported
    once (by its parser) and not again as "missing"; a rule whose input failed to parse
    (``None`` in ``values``) is skipped.
    """
    problems: list[str] = []
    url, key = "SUPABASE_URL" in given, "SUPABASE_SERVICE_ROLE_KEY" in given
    if url and not key:
        problems.append(
            "SUPABASE_SERVICE_ROLE_KEY: required when SUPABASE_URL is set "
            "(Supabase dashboard > Project Settings > API keys)"
        )
    elif key and not url:
        problems.append(
            "SUPABASE_URL: required when SUPABASE_SERVICE_ROLE_KEY is set; "
            "expected https://<project-ref>.supabase.co"
        )
    elif not (url or key or "DATABASE_URL" in given):
        problems.append(
            "DATABASE_URL or SUPABASE_URL + SUPABASE_SERVICE_ROLE_KEY: no job "
            "store configured; set DATABASE_URL=postgresql://... (direct) or both "
            "Supabase variables (REST)"
        )

    provider = values["generation_provider"]
    if provider == "offline" and values["app_env"] and values["app_env"].lower() == "production":
        problems.append(
            "GENERATION_PROVIDER: 'offline' is refused when APP_ENV=production; "
            "it writes placeholder text into real chapters. Use 'gemini'"
        )
    if provider == "gemini" and not values["gemini_api_key"]:
        problems.append(
            "GEMINI_API_KEY: required when GENERATION_PROVIDER is 'gemini' (the "
            "default); expected a key from Google AI Studio, or set "
            "GENERATION_PROVIDER=offline for local runs"
        )

    allowed, model = values["gemini_allowed_models"], values["gemini_model"]
    if allowed and model not in allowed:
        problems.append(
            f"GEMINI_ALLOWED_MODELS: must include GEMINI_MODEL ({model!r}), "
            f"got {', '.join(allowed)!r}"
        )

    memory, context = values["memory_max_tokens"], values["context_max_tokens"]
    if memory and context is not None and memory >= context:
        problems.append(
            f"MEMORY_MAX_TOKENS: must be below CONTEXT_MAX_TOKENS ({context}), of which it is "
            f"a share, or 0 to turn story memory off; got {memory}"
        )

    for low, high in (
        ("POLL_INTERVAL_MS", "POLL_MAX_INTERVAL_MS"),
        ("RETRY_BASE_S", "RETRY_MAX_S"),
        ("GEMINI_IDLE_TIMEOUT_S", "GEMINI_REQUEST_TIMEOUT_S"),
    ):
        a, b = values[low.lower()], values[high.lower()]
        if a is not None and b is not None and b < a:
            problems.append(f"{high}: must be >= {low} ({a:g}), got {b:g}")
    return problems
