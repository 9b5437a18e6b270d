"""Apply ``supabase/migrations`` to a database without the Supabase CLI.

Applied versions are recorded in ``supabase_migrations.schema_migrations``, the
table the Supabase CLI itself keeps, so ``supabase db push`` and ``genworker
migrate`` agree on what a database already has.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import asyncpg

_NAME = re.compile(r"^(\d{14})_(.+)\.sql$")


def sql_dir() -> Path:
    """The packaged SQL (wheel installs) or the repository's ``supabase/`` folder."""
    packaged = Path(__file__).parent / "_sql"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[1] / "supabase"


@dataclass(frozen=True)
class Migration:
    version: str
    name: str
    path: Path

    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")


def migrations(directory: Path | None = None) -> list[Migration]:
    """Every ``YYYYMMDDHHMMSS_name.sql`` file, in version order."""
    directory = directory or sql_dir() / "migrations"
    found = []
    for path in sorted(directory.glob("*.sql")):
        m = _NAME.match(path.name)
        if m:
            found.append(Migration(m.group(1), m.group(2), path))
    return found


def bootstrap_sql() -> str:
    return (sql_dir() / "platform_bootstrap.sql").read_text(encoding="utf-8")


async def apply_bootstrap(conn: asyncpg.Connection) -> None:
    """Create what every Supabase database has (roles, auth schema, publication)."""
    await conn.execute(bootstrap_sql())


async def pending_migrations(
    conn: asyncpg.Connection, directory: Path | None = None
) -> list[Migration]:
    """Migrations not yet recorded in supabase_migrations.schema_migrations."""
    done: set[str] = set()
    if await conn.fetchval("select to_regclass('supabase_migrations.schema_migrations')"):
        done = {
            r["version"]
            for r in await conn.fetch("select version from supabase_migrations.schema_migrations")
        }
    return [m for m in migrations(directory) if m.version not in done]


class MigrationFailed(Exception):
    """One migration raised; its transaction was rolled back (the cause is chained)."""

    def __init__(self, migration: Migration) -> None:
        super().__init__(f"migration {migration.path.name} failed")
        self.migration = migration


async def is_supabase_like(conn: asyncpg.Connection) -> bool:
    """Whether what the migrations rely on from the platform exists (the auth schema and the
    API roles); plain PostgreSQL needs ``apply_bootstrap`` first."""
    return bool(
        await conn.fetchval(
            "select to_regnamespace('auth') is not null and (select count(*) from pg_roles"
            " where rolname in ('anon', 'authenticated', 'service_role')) = 3"
        )
    )


async def apply_migrations(conn: asyncpg.Connection, directory: Path | None = None) -> list[str]:
    """Apply pending migrations, each in its own transaction; return the versions applied.

    Raises ``MigrationFailed`` naming the file that failed (the earlier ones stay applied).
    """
    await conn.execute(
        "create schema if not exists supabase_migrations;"
        "create table if not exists supabase_migrations.schema_migrations"
        " (version text primary key, statements text[], name text)"
    )
    applied = []
    for mig in await pending_migrations(conn, directory):
        try:
            async with conn.transaction():
                await conn.execute(mig.sql())
                await conn.execute(
                    "insert into supabase_migrations.schema_migrations (version, name, statements)"
                    " values ($1, $2, array[$3])",
                    mig.version,
                    mig.name,
                    mig.sql(),
                )
        except asyncpg.PostgresError as exc:
            raise MigrationFailed(mig) from exc
        applied.append(mig.version)
    return applied


def seed_sql() -> str:
    """Demo data (supabase/seed.sql): a user, a story and three chapters."""
    return (sql_dir() / "seed.sql").read_text(encoding="utf-8")


async def setup_local_database(conn: asyncpg.Connection, *, seed: bool = False) -> None:
    """A plain PostgreSQL made to look like a migrated Supabase project (tests, demo,
    benchmarks): the platform bootstrap, every migration, and optionally the demo data."""
    await apply_bootstrap(conn)
    await apply_migrations(conn)
    if seed:
        await conn.execute(seed_sql())
