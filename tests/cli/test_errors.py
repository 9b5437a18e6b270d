"""Every genworker command, against every ordinary mistake: one line on stderr, no traceback.

Exit 2 when the command line or configuration is wrong, 1 when something failed while
running; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import AsyncIterator

import asyncpg
import pytest

from tests.cli.test_cli import genworker
from tests.support.database import with_database
from tests.support.seed import create_chapter, create_story, create_user
from worker.devdb import free_port

A_UUID = "00000000-0000-4000-8000-00000000c001"


def one_line(proc: subprocess.CompletedProcess[str], command: str, code: int) -> str:
    """The failure contract: exit ``code``, nothing on stdout, one line on stderr."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == code, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"genworker {command}: "), lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    return lines[0]


@pytest.fixture
async def unmigrated_dsn(pg_server) -> AsyncIterator[str]:
    """A plain PostgreSQL database: no Supabase bootstrap, no migrations."""
    name = f"plain_{free_port()}"
    admin = await asyncpg.connect(pg_server.admin_dsn)
    await admin.execute(f"create database {name}")
    await admin.close()
    dsn = with_database(pg_server.admin_dsn, name)
    yield dsn
    await pg_server.drop_database(dsn)


# -- the command line ------------------------------------------------------------------------

BAD_UUID = [
    ("enqueue", ["enqueue", "--chapter", "chapter-one"]),
    ("requeue", ["requeue", "not-a-job"]),
    ("cancel", ["cancel", "--job", "12345"]),
    ("pause", ["pause", "--job", "x" * 500]),
    ("resume", ["resume", "--job", ""]),
    ("show", ["show", "--chapter", "c001"]),
]


@pytest.mark.parametrize(("command", "argv"), BAD_UUID, ids=[c for c, _ in BAD_UUID])
def test_bad_uuid(command: str, argv: list[str]) -> None:
    line = one_line(genworker(*argv), command, 2)
    assert "not a uuid" in line and f"genworker {command} --help" in line
    assert "x" * 100 not in line  # input is echoed bounded


@pytest.mark.parametrize(
    "options", ["{bad", "{'sections': 2}", "[1, 2]", '"text"', "", "{" * 10_000]
)
def test_bad_json_options(options: str) -> None:
    line = one_line(genworker("enqueue", "--type", "noop", "--options", options), "enqueue", 2)
    assert "JSON" in line and len(line) < 400


@pytest.mark.parametrize("since", ["yesterday", "2026-13-01", "22/11/2026", ""])
def test_bad_since_date(since: str) -> None:
    line = one_line(genworker("requeue", "--since", since), "requeue", 2)
    assert "ISO date" in line and "2026-11-22" in line


@pytest.mark.parametrize(
    ("command", "argv"),
    [
        ("enqueue", ["enqueue"]),
        ("requeue", ["requeue"]),
        ("requeue", ["requeue", "--all", "--limit", "0"]),
        ("cancel", ["cancel"]),
        ("show", ["show"]),
        ("show", ["show", "--chapter", A_UUID, "--follow", "--interval", "0"]),
        ("show", ["show", "--chapter", A_UUID, "--follow", "--interval", "nan"]),
    ],
)
def test_missing_or_invalid_arguments(command: str, argv: list[str]) -> None:
    one_line(genworker(*argv, env={"DATABASE_URL": "postgresql://u@127.0.0.1:1/x"}), command, 2)


def test_no_command() -> None:
    proc = genworker()
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


# -- the database --------------------------------------------------------------------------

STORE_COMMANDS = [
    ("status", ["status"]),
    ("enqueue", ["enqueue", "--type", "noop"]),
    ("enqueue", ["enqueue", "--chapter", A_UUID]),
    ("requeue", ["requeue", "--all"]),
    ("cancel", ["cancel", "--job", A_UUID]),
    ("pause", ["pause", "--job", A_UUID]),
    ("resume", ["resume", "--job", A_UUID]),
    ("show", ["show", "--chapter", A_UUID]),
]
IDS = [" ".join(argv[:2]) for _, argv in STORE_COMMANDS]


@pytest.mark.parametrize(("command", "argv"), STORE_COMMANDS, ids=IDS)
def test_closed_port(command: str, argv: list[str]) -> None:
    dsn = f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/postgres"
    line = one_line(genworker(*argv, env={"DATABASE_URL": dsn}), command, 1)
    assert "cannot connect to the database at 127.0.0.1:" in line
    assert "connection refused" in line and "DATABASE_URL" in line and "hunter2" not in line


def test_closed_port_over_rest() -> None:
    env = {"SUPABASE_URL": f"http://127.0.0.1:{free_port()}", "SUPABASE_SERVICE_ROLE_KEY": "k"}
    line = one_line(genworker("status", env=env), "status", 1)
    assert "database is unreachable" in line and "SUPABASE_URL" in line


def test_migrate_closed_port() -> None:
    dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    for argv in (["migrate"], ["migrate", "--dry-run"], ["migrate", "--bootstrap"]):
        line = one_line(genworker(*argv, env={"DATABASE_URL": dsn}), "migrate", 1)
        assert "cannot connect" in line


def test_migrate_not_a_postgres_url() -> None:
    line = one_line(genworker("migrate", "--database-url", "https://x.supabase.co"), "migrate", 2)
    assert "postgresql://" in line
    bad_port = "postgresql://u:p@127.0.0.1:abc/postgres"
    line = one_line(genworker("migrate", "--database-url", bad_port), "migrate", 2)
    assert "numeric port" in line and ":p@" not in line


@pytest.mark.parametrize(("command", "argv"), STORE_COMMANDS, ids=IDS)
def test_unmigrated_database(unmigrated_dsn: str, command: str, argv: list[str]) -> None:
    line = one_line(genworker(*argv, env={"DATABASE_URL": unmigrated_dsn}), command, 1)
    assert "not migrated" in line and "genworker migrate" in line


async def test_migrate_plain_postgres_needs_bootstrap(unmigrated_dsn: str) -> None:
    for argv in (["migrate"], ["migrate", "--dry-run"]):
        line = one_line(genworker(*argv, env={"DATABASE_URL": unmigrated_dsn}), "migrate", 2)
        assert "--bootstrap" in line
    conn = await asyncpg.connect(unmigrated_dsn)
    try:  # nothing was half-applied
        assert await conn.fetchval("select to_regclass('public.job_queue')") is None
    finally:
        await conn.close()


async def test_migrate_failure_names_the_file(unmigrated_dsn: str) -> None:
    conn = await asyncpg.connect(unmigrated_dsn)
    try:  # a Supabase-looking database whose public schema already has a clashing object
        from worker.migrate import apply_bootstrap

        await apply_bootstrap(conn)
        await conn.execute("create view public.job_lanes as select 1 as lane")
    finally:
        await conn.close()
    line = one_line(genworker("migrate", env={"DATABASE_URL": unmigrated_dsn}), "migrate", 1)
    assert re.search(r"migration 20261122000100_job_queue\.sql failed and was rolled back", line)


@pytest.mark.parametrize(("command", "argv"), STORE_COMMANDS, ids=IDS)
async def test_database_error(db_dsn: str, conn, command: str, argv: list[str]) -> None:
    """A role that may log in but may not call the operator functions."""
    await conn.execute("drop role if exists cli_nobody")
    await conn.execute("create role cli_nobody login")
    try:
        dsn = db_dsn.replace("postgres@", "cli_nobody@", 1)
        line = one_line(genworker(*argv, env={"DATABASE_URL": dsn}), command, 1)
        assert "permission denied" in line and "service_role" in line
    finally:
        await conn.execute("drop owned by cli_nobody")
        await conn.execute("drop role cli_nobody")


async def test_missing_database(db_dsn: str) -> None:
    dsn = with_database(db_dsn, "no_such_database")
    line = one_line(genworker("status", env={"DATABASE_URL": dsn}), "status", 1)
    assert "does not exist" in line and "database name in DATABASE_URL" in line


async def test_enqueue_conflict_names_the_job_to_cancel(db_dsn: str, conn) -> None:
    user = await create_user(conn)
    chapter = await create_chapter(conn, await create_story(conn, user), user)
    env = {"DATABASE_URL": db_dsn}
    first = genworker("enqueue", "--chapter", chapter, env=env)
    assert first.returncode == 0, first.stderr
    job = json.loads(first.stdout)["job_id"]
    line = one_line(genworker("enqueue", "--chapter", chapter, env=env), "enqueue", 1)
    assert "already has an active generation job" in line
    assert f"genworker cancel --job {job}" in line


async def test_enqueue_unknown_chapter(db_dsn: str) -> None:
    env = {"DATABASE_URL": db_dsn}
    line = one_line(genworker("enqueue", "--chapter", A_UUID, env=env), "enqueue", 1)
    assert f"chapter {A_UUID} not found" in line


def test_debug_shows_the_traceback() -> None:
    dsn = f"postgresql://postgres@127.0.0.1:{free_port()}/postgres"
    proc = genworker("--debug", "status", env={"DATABASE_URL": dsn})
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "cannot connect" in proc.stderr.splitlines()[-1]
