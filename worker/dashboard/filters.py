"""The jobs page's query string, parsed strictly: a bad filter is a 400 that says why.

Silently ignoring a typo (``?stauts=failed``) would show an on-call engineer every job
and let them believe none failed, so unknown parameters are refused too.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import UTC, date, datetime, time, timedelta
from urllib.parse import urlencode

from worker.metrics import QUEUE_STATUSES

STATUSES = QUEUE_STATUSES
PER_PAGE_DEFAULT = 50
PER_PAGE_MAX = 200
PAGE_MAX = 10_000
_TYPE = re.compile(r"[A-Za-z0-9_.:\-]{1,100}")


class BadFilter(ValueError):
    """A query parameter the jobs page cannot use; ``str()`` is shown to the operator."""


@dataclass(frozen=True)
class JobFilter:
    status: str | None = None
    type: str | None = None
    user: str | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None
    page: int = 1
    per_page: int = PER_PAGE_DEFAULT

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.per_page

    def query(self, **changes: object) -> str:
        """This filter as a query string, with ``changes`` applied (for page links)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)} | changes
        params = {
            "status": values["status"],
            "type": values["type"],
            "user": values["user"],
            "from": _show(values["created_from"]),
            "to": _show(values["created_to"]),
            "page": values["page"] if values["page"] != 1 else None,
            "per_page": values["per_page"] if values["per_page"] != PER_PAGE_DEFAULT else None,
        }
        return urlencode({k: v for k, v in params.items() if v not in (None, "")})


def _show(value: object) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else None


def _when(name: str, text: str, *, end: bool) -> datetime:
    """A date (YYYY-MM-DD, the whole day) or an ISO date-time; naive means UTC."""
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            moment = datetime.combine(day + timedelta(days=1) if end else day, time(), UTC)
        else:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BadFilter(
            f"{name}: expected a date such as 2026-12-01 or a time such as "
            f"2026-12-01T09:30:00Z, got {text[:40]!r}"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _int(name: str, text: str, low: int, high: int) -> int:
    # ASCII digits only: str.isdigit() (and int()) also accept "٣" and other scripts' digits.
    if not re.fullmatch(r"[0-9]{1,9}", text) or not low <= int(text) <= high:
        raise BadFilter(f"{name}: expected a whole number from {low} to {high}, got {text[:20]!r}")
    return int(text)


def parse_filter(query: Mapping[str, str]) -> JobFilter:
    """``JobFilter`` from ``request.query``; raises BadFilter with what is wrong."""
    known = {"status", "type", "user", "from", "to", "page", "per_page"}
    unknown = sorted(set(query) - known)
    if unknown:
        raise BadFilter(
            f"unknown filter {unknown[0][:40]!r}; use status, type, user, from, to, page, per_page"
        )
    if len(query) != len(set(query)):  # a MultiDict counts a repeated key twice
        raise BadFilter("each filter may be given once")
    text = {k: v.strip() for k, v in query.items() if v.strip()}
    status = text.get("status")
    if status is not None and status not in STATUSES:
        raise BadFilter(f"status: expected one of {', '.join(STATUSES)}, got {status[:40]!r}")
    job_type = text.get("type")
    if job_type is not None and not _TYPE.fullmatch(job_type):
        raise BadFilter(
            "type: expected a job type such as chapter_generation "
            "(letters, digits, _ . : -, at most 100)"
        )
    user = text.get("user")
    if user is not None:
        try:
            user = str(uuid.UUID(user))
        except ValueError:
            raise BadFilter(f"user: expected a user id (a UUID), got {user[:40]!r}") from None
    created_from = _when("from", text["from"], end=False) if "from" in text else None
    created_to = _when("to", text["to"], end=True) if "to" in text else None
    if created_from and created_to and created_to <= created_from:
        raise BadFilter("to: must be after from")
    return JobFilter(
        status=status,
        type=job_type,
        user=user,
        created_from=created_from,
        created_to=created_to,
        page=_int("page", text["page"], 1, PAGE_MAX) if "page" in text else 1,
        per_page=_int("per_page", text["per_page"], 1, PER_PAGE_MAX)
        if "per_page" in text
        else PER_PAGE_DEFAULT,
    )


def parse_job_id(text: str) -> str | None:
    """The canonical UUID, or None when ``text`` is not one."""
    try:
        return str(uuid.UUID(text)) if len(text) <= 64 else None
    except ValueError:
        return None
