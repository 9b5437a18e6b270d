"""What an operator sees when a `genworker` command fails: one line that names the fix.

Exit codes: 2 when the command line or the configuration is wrong (fix it and run the
command again), 1 when the command ran and something failed (the database is
unreachable or not migrated, a conflict), 130 on Ctrl-C. ``--debug`` adds the traceback.
"""

from __future__ import annotations

import socket

from worker.config import where as where  # re-exported: the CLI's messages use it
from worker.store.base import (
    ConflictError,
    ForbiddenError,
    InvalidInputError,
    NotFoundError,
    StoreError,
    TransientStoreError,
    error_from_code,
)

EXIT_RUNTIME = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
MAX_DETAIL = 300  # database messages can quote input: never print them unbounded

# SQLSTATEs that mean "these migrations were never applied": undefined function,
# table or schema, and PostgREST's "function not in the schema cache".
_NOT_MIGRATED = {"42883", "42P01", "3F000", "PGRST202", "PGRST205"}
_LOGIN_REFUSED = {"28P01", "28000"}


class CommandFailed(Exception):
    """An expected failure, already worded for the operator."""

    def __init__(self, message: str, code: int = EXIT_RUNTIME) -> None:
        super().__init__(message)
        self.code = code


def detail(exc: BaseException) -> str:
    """The first line of an error message, bounded."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= MAX_DETAIL else text[: MAX_DETAIL - 3] + "..."


def connection_failed(target: str, exc: BaseException) -> CommandFailed:
    """Opening the first connection failed: refused, unknown host, login, database name."""
    code = getattr(exc, "sqlstate", None)
    if code in _LOGIN_REFUSED:
        return CommandFailed(
            f"the database at {target} refused the login ({detail(exc)}): "
            "check the user and password in DATABASE_URL"
        )
    if code == "3D000":
        return CommandFailed(f"{detail(exc)} at {target}: check the database name in DATABASE_URL")
    if code is not None:
        return CommandFailed(f"the database at {target} refused the connection: {detail(exc)}")
    reason = (
        "connection refused"
        if isinstance(exc, ConnectionRefusedError) or "Errno 111" in str(exc)
        else "unknown host"
        if isinstance(exc, socket.gaierror)
        else "timed out"
        if isinstance(exc, TimeoutError)
        else detail(exc)
    )
    return CommandFailed(
        f"cannot connect to the database at {target} ({reason}): is it running, "
        "and is DATABASE_URL (or SUPABASE_URL) right?"
    )


def explain(exc: BaseException) -> CommandFailed | None:
    """The operator's one line for an expected failure; None for a bug (shown as such)."""
    if isinstance(exc, CommandFailed):
        return exc
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate is not None and not isinstance(exc, StoreError):  # asyncpg, used directly
        return explain(error_from_code(sqlstate, detail(exc)))
    if isinstance(exc, StoreError):
        if exc.code in _NOT_MIGRATED:
            return CommandFailed(
                f"the database is not migrated ({detail(exc)}): run `genworker migrate` "
                "(or `supabase db push`) first"
            )
        if isinstance(exc, TransientStoreError):
            return CommandFailed(
                f"the database is unreachable ({detail(exc)}): is it running, and is "
                "DATABASE_URL (or SUPABASE_URL) right?"
            )
        if isinstance(exc, ForbiddenError):
            return CommandFailed(
                f"{detail(exc)}: operator commands need the database owner's DATABASE_URL "
                "or the service_role key"
            )
        if isinstance(exc, InvalidInputError):
            return CommandFailed(f"the database rejected the input: {detail(exc)}", EXIT_USAGE)
        if isinstance(exc, ConflictError | NotFoundError):
            return CommandFailed(detail(exc))
        return CommandFailed(f"database error: {detail(exc)}")
    if isinstance(exc, (OSError, TimeoutError)):
        return connection_failed("the configured address", exc)
    return None
