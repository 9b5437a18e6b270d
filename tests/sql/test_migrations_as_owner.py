"""The migrations as a hosted project runs them: as an owner that is not a superuser.

Supabase's ``postgres`` role is not a superuser, so a statement that needs one (an
event trigger, a C function, another role's objects) would pass on the embedded server
and fail at ``supabase db push``. This applies the bootstrap as the superuser (the
platform's part), then every migration as a plain owner role, and checks the result
grants exactly what the superuser-applied schema does.
"""

from __future__ import annotations

import asyncpg

from tests.sql.test_grants import expected_grants, live_grants
from tests.support.seed import as_role, claim, create_chapter, create_story, create_user
from worker.migrate import apply_bootstrap, apply_migrations, migrations

OWNER = "genworker_owner"


async def test_migrations_apply_as_a_non_superuser_owner(pg_server) -> None:
    admin = await asyncpg.connect(pg_server.admin_dsn)
    try:
        await admin.execute(
            f"do $$ begin if not exists (select 1 from pg_roles where rolname = '{OWNER}') then"
            f" create role {OWNER} login nosuperuser createrole createdb; end if; end $$"
        )
    finally:
        await admin.close()
    dsn = await pg_server.create_empty_database(owner=OWNER)
    platform = await asyncpg.connect(dsn)
    try:
        await platform.execute(f"set genworker.migration_owner = '{OWNER}'")
        await apply_bootstrap(platform)
    finally:
        await platform.close()

    owner = await asyncpg.connect(dsn, user=OWNER)
    try:
        assert (
            await owner.fetchval("select rolsuper from pg_roles where rolname = current_user")
            is False
        )
        applied = await apply_migrations(owner)
        assert applied == [m.version for m in migrations()]
        # The objects are the owner's, and the closed defaults held for this owner.
        job_queue_owner = await owner.fetchval(
            "select pg_get_userbyid(relowner) from pg_class where relname = 'job_queue'"
        )
        assert job_queue_owner == OWNER
        assert await live_grants(owner) == await expected_grants(owner)
        # And the app and the worker work through it.
        platform = await asyncpg.connect(dsn)  # Supabase Auth creates users, not the owner
        try:
            user = await create_user(platform)
        finally:
            await platform.close()
        story = await create_story(owner, user)
        chapter = await create_chapter(owner, story, user, 1)
        async with as_role(owner, "authenticated", user):
            job = await owner.fetchval("select enqueue_chapter_generation($1)", chapter)
        async with as_role(owner, "service_role"):
            claimed = await claim(owner, "w1")
        assert claimed is not None and claimed["job_id"] == job
    finally:
        await owner.close()
        await pg_server.drop_database(dsn)
