"""The genworker command: help everywhere, migrate, operator commands and the demo."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from worker.cli import COMMANDS, build_parser, main


def genworker(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SUPABASE_", "GEMINI_", "DATABASE_"))
    }
    return subprocess.run(
        [sys.executable, "-m", "worker", *args],
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: genworker {command}" in out and len(out.splitlines()) > 3


def test_top_level_help_lists_every_command() -> None:
    text = build_parser().format_help()
    for command in COMMANDS:
        assert command in text


def test_version() -> None:
    proc = genworker("--version")
    assert proc.returncode == 0 and proc.stdout.startswith("genworker ")


def test_migrate_needs_database_url(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "migrate"],
        cwd=tmp_path,
        env={"PATH": os.environ["PATH"]},
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "DATABASE_URL" in proc.stderr


async def test_migrate_bootstrap_and_idempotent(pg_server) -> None:
    dsn = await pg_server.create_database()  # a template copy: already migrated
    try:
        proc = genworker("migrate", "--bootstrap", "--database-url", dsn)
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout) == {"applied": []}
        proc = genworker("migrate", "--dry-run", env={"DATABASE_URL": dsn})
        assert json.loads(proc.stdout) == {"pending": []}
    finally:
        await pg_server.drop_database(dsn)


async def test_migrate_fresh_database(pg_server) -> None:
    import asyncpg

    admin = await asyncpg.connect(pg_server.admin_dsn)
    await admin.execute("drop database if exists fresh_migrate with (force)")
    await admin.execute("create database fresh_migrate")
    await admin.close()
    from tests.support.database import with_database

    dsn = with_database(pg_server.admin_dsn, "fresh_migrate")
    proc = genworker("migrate", "--bootstrap", "--dry-run", env={"DATABASE_URL": dsn})
    assert proc.returncode == 0, proc.stderr
    from worker.migrate import migrations

    files = [m.path.name for m in migrations()]
    assert json.loads(proc.stdout) == {"pending": files}
    assert all(name.endswith(".sql") and name[:14].isdigit() for name in files)
    conn = await asyncpg.connect(dsn)
    try:  # a dry run changes nothing, not even the bootstrap
        assert await conn.fetchval("select to_regnamespace('auth')") is None
    finally:
        await conn.close()
    proc = genworker("migrate", "--bootstrap", env={"DATABASE_URL": dsn})
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["applied"] == files
    conn = await asyncpg.connect(dsn)
    try:
        assert await conn.fetchval(
            "select count(*) from supabase_migrations.schema_migrations"
        ) == len(json.loads(proc.stdout)["applied"])
    finally:
        await conn.close()


async def test_operator_commands(db_dsn, conn) -> None:
    from tests.support.seed import create_chapter, create_story, create_user

    env = {"DATABASE_URL": db_dsn}
    proc = genworker("enqueue", "--type", "noop", "--options", '{"sleep_s": 0}', env=env)
    assert proc.returncode == 0, proc.stderr
    job = json.loads(proc.stdout)["job_id"]
    user = await create_user(conn)
    chapter = await create_chapter(conn, await create_story(conn, user), user)
    proc = genworker("enqueue", "--chapter", chapter, "--options", '{"sections": 2}', env=env)
    chapter_job = json.loads(proc.stdout)["job_id"]
    assert (
        await conn.fetchval("select user_id from job_queue where id = $1", chapter_job) is not None
    )
    stats = json.loads(genworker("status", env=env).stdout)
    assert stats["by_status"] == {"pending": 2}
    await conn.fetch("select * from claim_next_job_v3('w', array['noop'], null)")
    await conn.execute("update job_queue set status = 'failed' where id = $1", job)
    proc = genworker("requeue", "--type", "noop", env=env)
    assert json.loads(proc.stdout) == {"requeued": [job], "count": 1}
    assert genworker("requeue", env=env).returncode == 2


def test_status_config_error_is_clear() -> None:
    proc = genworker("status", env={"SUPABASE_URL": "https://x.supabase.co"})
    assert proc.returncode == 2
    assert "SUPABASE_SERVICE_ROLE_KEY" in proc.stderr and "GEMINI" not in proc.stderr
