"""Logging: one JSON object per line, job context from contextvars, secrets masked.

Why JSON lines: Render and Fly collect stdout line by line, so one record must be one
line, and fields (``job_id``, ``attempt``) must be searchable without regexes.

Why contextvars: fifty jobs share one event loop, so "which job logged this" cannot be
threaded through every call. ``job_context`` sets it once per job task and every record
logged inside that task carries it.

Why redaction here: the worker handles a service-role key, a Gemini key and a database
password, and third-party libraries log URLs, headers and exceptions we don't control.
Masking at the one handler we install is the only place that sees all of it.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar, Token
from datetime import UTC, datetime
from typing import Any

MASK = "***"
# Bounds on one record: a job's payload or a model's answer can be megabytes, and a
# log line that size is lost by the platform's collector (and costs what it stores).
MAX_MESSAGE_CHARS = 4000
MAX_FIELD_CHARS = 1000
MAX_FIELD_ITEMS = 50
MAX_TRACEBACK_CHARS = 12000
_FIELD_LIMITS = {"msg": MAX_MESSAGE_CHARS, "exc": MAX_TRACEBACK_CHARS, "stack": MAX_TRACEBACK_CHARS}
LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
FORMATS = ("auto", "json", "text")
CONTEXT_FIELDS = ("worker_id", "job_id", "job_type", "attempt")

# Libraries that log one INFO line per HTTP request: at 50 concurrent streams that
# drowns the worker's own records, so they are held at WARNING unless LOG_LEVEL=DEBUG.
_CHATTY_LOGGERS = ("httpx", "httpcore", "hpack", "urllib3")
_HANDLER_MARK = "_genworker_handler"

# --------------------------------------------------------------------------- context

_worker_id: ContextVar[str | None] = ContextVar("genworker_worker_id", default=None)
_job_id: ContextVar[str | None] = ContextVar("genworker_job_id", default=None)
_job_type: ContextVar[str | None] = ContextVar("genworker_job_type", default=None)
_attempt: ContextVar[int | None] = ContextVar("genworker_attempt", default=None)


def bind_worker(worker_id: str | None) -> Token[str | None]:
    """Tag every later record in this context (and tasks created from it) with the worker.

    Call it before the runner creates its tasks: a task copies the context it is created
    in. Returns the token in case a test wants to undo it.
    """
    return _worker_id.set(worker_id)


@contextmanager
def job_context(
    job_id: object, job_type: str | None = None, attempt: int | None = None
) -> Iterator[None]:
    """Tag every record logged inside the block with the job being worked on."""
    tokens: tuple[tuple[ContextVar[Any], Token[Any]], ...] = (
        (_job_id, _job_id.set(None if job_id is None else str(job_id))),
        (_job_type, _job_type.set(job_type)),
        (_attempt, _attempt.set(attempt)),
    )
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


def current_context() -> dict[str, Any]:
    """The bound context fields that are set (for error details and metrics labels)."""
    values = {
        "worker_id": _worker_id.get(),
        "job_id": _job_id.get(),
        "job_type": _job_type.get(),
        "attempt": _attempt.get(),
    }
    return {key: value for key, value in values.items() if value is not None}


# ------------------------------------------------------------------------- redaction

# Shorter values would mask ordinary words in every line; real keys are far longer, and
# passwords inside URLs are masked by pattern whatever their length.
_MIN_SECRET_LENGTH = 8
_secrets: tuple[str, ...] = ()  # replaced whole (copy-on-write), so readers need no lock
_secrets_lock = threading.Lock()

# scheme://user:PASSWORD@host — the password may itself contain '@', so it runs to the
# last '@' that is followed by a plain host[:port].
_URL_PASSWORD = re.compile(
    r"(?i)\b([a-z][a-z0-9+.\-]*://[^\s:/@]*:)[^\s/]*?@(?=[\w.\-\[\]:%]*(?:[^\w.\-\[\]:%@]|$))"
)
_BEARER = re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9\-._~+/]+=*")
_KEY_PARAM = re.compile(
    r"(?i)(?<![\w-])((?:api[_-]?key|key|access[_-]?token|token|secret|password)=)"
    r"[^\s&#\"',;)]+"
)
_JWT = re.compile(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")
_GOOGLE_API_KEY = re.compile(r"\bAIza[0-9A-Za-z_\-]{30,}")
_SUPABASE_SECRET_KEY = re.compile(r"\bsb_secret_[A-Za-z0-9_\-]{8,}")
# Mapping keys whose values are masked whatever they look like (headers, payload dumps).
_SECRET_KEY_NAME = re.compile(
    r"(?i)(^|[_\-.])(api[_-]?key|apikey|authorization|password|passwd|secret|token|"
    r"service[_-]?role[_-]?key|x-goog-api-key)$"
)


def register_secret(value: str | None) -> None:
    """Mask this exact value wherever it appears in a log record from now on."""
    global _secrets
    if not value or len(value) < _MIN_SECRET_LENGTH:
        return
    with _secrets_lock:
        if value not in _secrets:
            # Longest first, so a secret containing another is masked whole.
            _secrets = tuple(sorted((*_secrets, value), key=len, reverse=True))


def redact(text: str) -> str:
    """Mask registered secrets and anything shaped like a credential."""
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, MASK)
    text = _URL_PASSWORD.sub(rf"\1{MASK}@", text)
    text = _BEARER.sub(rf"\1{MASK}", text)
    text = _KEY_PARAM.sub(rf"\1{MASK}", text)
    text = _JWT.sub(MASK, text)
    text = _GOOGLE_API_KEY.sub(MASK, text)
    return _SUPABASE_SECRET_KEY.sub(MASK, text)


def clip(text: str, limit: int) -> str:
    """At most ``limit`` characters, saying how many were cut: user input can be huge.

    The marker counts within the limit, so clipping again (the JSON formatter re-scrubs
    what the filter already clipped) changes nothing and the count stays the real one.
    """
    if len(text) <= limit:
        return text
    keep = max(0, limit - len(f"... [{len(text)} more characters]"))
    return f"{text[:keep]}... [{len(text) - keep} more characters]"


def _scrub(value: Any, key: str | None = None, depth: int = 0) -> Any:
    """A JSON-ready, redacted, length-bounded copy of a log field (nested containers too)."""
    if key is not None and value is not None and _SECRET_KEY_NAME.search(key):
        return MASK
    if value is None or isinstance(value, bool | int | float):
        return value
    if isinstance(value, str):
        return clip(redact(value), _FIELD_LIMITS.get(key or "", MAX_FIELD_CHARS))
    if depth < 5 and isinstance(value, Mapping):
        items = list(value.items())[:MAX_FIELD_ITEMS]
        return {str(k)[:100]: _scrub(v, str(k), depth + 1) for k, v in items}
    if depth < 5 and isinstance(value, list | tuple | set | frozenset):
        return [_scrub(v, None, depth + 1) for v in list(value)[:MAX_FIELD_ITEMS]]
    return clip(redact(str(value)[: MAX_FIELD_CHARS * 4]), MAX_FIELD_CHARS)


# --------------------------------------------------------------------------- records

_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
    *CONTEXT_FIELDS,
}


def _extras(record: logging.LogRecord) -> Iterator[tuple[str, Any]]:
    for key, value in record.__dict__.items():
        if key not in _STANDARD_ATTRS and not key.startswith("_"):
            yield key, value


class ContextFilter(logging.Filter):
    """Copy the contextvars onto the record; an explicit ``extra=`` value wins."""

    def filter(self, record: logging.LogRecord) -> bool:
        for name, value in current_context().items():
            if getattr(record, name, None) is None:
                setattr(record, name, value)
        return True


class RedactingFilter(logging.Filter):
    """Mask secrets in the message, the extras and the traceback before any formatter.

    The record is rewritten in place (message pre-formatted, args dropped), so every
    handler after ours sees the masked version too.
    """

    _plain = logging.Formatter()

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad %-format must not lose the record
            message = f"{record.msg!s} {record.args!r}"
        record.msg, record.args = clip(redact(message), MAX_MESSAGE_CHARS), None
        for key, value in list(_extras(record)):
            record.__dict__[key] = _scrub(value, key)
        if record.exc_info and not record.exc_text:
            record.exc_text = self._plain.formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = clip(redact(record.exc_text), MAX_TRACEBACK_CHARS)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, context, extras, exc."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                payload[name] = value
        for key, value in _extras(record):
            payload[key if key not in payload else f"extra_{key}"] = value
        if record.exc_info:
            payload["exc_type"] = getattr(record.exc_info[0], "__name__", None)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            payload["exc"] = record.exc_text
        if record.stack_info:
            payload["stack"] = record.stack_info
        # Scrubbed again here so the formatter is safe even without RedactingFilter.
        return json.dumps(_scrub(payload), ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """Readable lines for a terminal: time, level, logger, message, context, extras."""

    def format(self, record: logging.LogRecord) -> str:
        head = f"{_timestamp(record)[11:]} {record.levelname:<7} {record.name}: "
        fields = [
            f"{name}={getattr(record, name)}"
            for name in CONTEXT_FIELDS
            if getattr(record, name, None) is not None
        ]
        fields += [f"{key}={value}" for key, value in _extras(record)]
        line = head + record.getMessage() + (f"  [{' '.join(fields)}]" if fields else "")
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + record.stack_info
        return redact(line)


class _StdoutHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stdout`` is at emit time (pytest capture, redirects)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property
    def stream(self) -> Any:
        return sys.stdout

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler assigns it; the property wins
        pass


def _stdout_is_tty() -> bool:
    try:
        return sys.stdout.isatty()
    except (AttributeError, ValueError):
        return False


def setup_logging(level: str, fmt: str = "auto") -> None:
    """Install the worker's stdout handler on the root logger; safe to call again.

    ``fmt='auto'`` picks text on a terminal and JSON lines otherwise (Render, Fly, CI).
    A second call replaces the handler installed by the first, so level or format can
    change without duplicated lines.
    """
    level_name = level.strip().upper()
    if level_name not in LEVELS:
        raise ValueError(f"log level must be one of {', '.join(LEVELS)}, got {level!r}")
    fmt = fmt.strip().lower()
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    text = fmt == "text" or (fmt == "auto" and _stdout_is_tty())

    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
    handler = _StdoutHandler()
    setattr(handler, _HANDLER_MARK, True)
    handler.addFilter(ContextFilter())
    handler.addFilter(RedactingFilter())
    handler.setFormatter(TextFormatter() if text else JsonFormatter())
    root.addHandler(handler)
    root.setLevel(level_name)

    quiet = logging.NOTSET if level_name == "DEBUG" else logging.WARNING
    for name in _CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(quiet)
    logging.captureWarnings(True)
