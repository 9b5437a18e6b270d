"""supabase/config.toml: what the Supabase CLI needs to push, start and reset from this repo
(docs/supabase-platform.md §6)."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from worker.migrate import migrations, sql_dir

SUPABASE = Path(__file__).resolve().parents[1] / "supabase"
CONFIG = tomllib.loads((SUPABASE / "config.toml").read_text(encoding="utf-8"))


def test_project_and_database_version() -> None:
    assert isinstance(CONFIG["project_id"], str) and re.fullmatch(
        r"[a-z0-9_-]+", CONFIG["project_id"]
    )
    # Supabase's major version, the one CI also runs the SQL suites on.
    assert CONFIG["db"]["major_version"] == 15
    assert "public" in CONFIG["api"]["schemas"]
    assert CONFIG["realtime"]["enabled"] is True


def test_the_paths_it_names_exist() -> None:
    seeds = CONFIG["db"]["seed"]["sql_paths"]
    assert CONFIG["db"]["seed"]["enabled"] is True and seeds == ["./seed.sql"]
    for pattern in seeds + CONFIG["db"]["migrations"]["schema_paths"]:
        found = sorted(SUPABASE.glob(pattern.removeprefix("./")))
        assert found and all(p.is_file() and p.stat().st_size > 0 for p in found), pattern
    # The demo and `supabase db reset` load the same seed file.
    assert (sql_dir() / "seed.sql").resolve() == (SUPABASE / "seed.sql").resolve()


def test_migrations_are_where_and_as_the_cli_expects_them() -> None:
    assert CONFIG["db"]["migrations"]["enabled"] is True
    files = sorted(p.name for p in (SUPABASE / "migrations").iterdir())
    assert files and all(re.fullmatch(r"\d{14}_[a-z0-9_]+\.sql", name) for name in files), files
    versions = [name[:14] for name in files]
    assert len(set(versions)) == len(versions)  # one file per version
    assert [m.path.name for m in migrations()] == files  # genworker migrate applies the same set
