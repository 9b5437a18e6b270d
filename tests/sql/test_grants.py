"""Closed by default: every object in public has exactly the grants listed here.

Supabase grants anon, authenticated and service_role everything new in ``public``
(platform_bootstrap.sql reproduces that), so a table, view, sequence or function a
migration adds without explicit grants would be open to every signed-in user. This
suite compares the live privileges of every object with an explicit allow-list: a new
object that is not on the list, or a grant that changed, fails here.
"""

from __future__ import annotations

import asyncpg
import pytest

from tests.support.seed import as_role

API_ROLES = ("PUBLIC", "anon", "authenticated", "service_role")
ALL_TABLE = "DELETE,INSERT,REFERENCES,SELECT,TRIGGER,TRUNCATE,UPDATE"

# (kind, object, grantee) -> privileges. Functions not listed here (helpers, triggers)
# must have no grant at all for any API role; sequences likewise.
ALLOWED: dict[tuple[str, str, str], str] = {
    # The app (a signed-in user): its RPCs, and reads under row level security.
    ("function", "cancel_job(uuid)", "authenticated"): "EXECUTE",
    ("function", "enqueue_chapter_generation(uuid,jsonb,text)", "authenticated"): "EXECUTE",
    ("function", "pause_job(uuid)", "authenticated"): "EXECUTE",
    ("function", "resume_job(uuid)", "authenticated"): "EXECUTE",
    # The stories check constraint runs as whoever writes the row.
    ("function", "genworker_preferences_ok(jsonb)", "authenticated"): "EXECUTE",
    ("function", "genworker_preferences_ok(jsonb)", "service_role"): "EXECUTE",
    # A reader's text so far (runs as the caller: RLS on chapters and chapter_chunks).
    ("function", "get_chapter_text(uuid)", "authenticated"): "EXECUTE",
    ("function", "genworker_chunks_text(uuid)", "authenticated"): "EXECUTE",
    ("table", "chapter_chunks", "authenticated"): "SELECT",
    ("table", "chapters", "authenticated"): "DELETE,SELECT",
    ("table", "job_events", "authenticated"): "SELECT",
    ("table", "job_queue", "authenticated"): "SELECT",
    ("table", "stories", "authenticated"): "DELETE,SELECT",
    ("column", "chapters.number", "authenticated"): "INSERT",
    ("column", "chapters.story_id", "authenticated"): "INSERT",
    ("column", "chapters.title", "authenticated"): "INSERT,UPDATE",
    ("column", "stories.preferences", "authenticated"): "INSERT,UPDATE",
    ("column", "stories.premise", "authenticated"): "INSERT,UPDATE",
    ("column", "stories.title", "authenticated"): "INSERT,UPDATE",
    # The worker and operators (the service-role key).
    **{
        ("function", sig, "service_role"): "EXECUTE"
        for sig in (
            "admin_cancel_job(uuid)",
            "admin_enqueue_chapter(uuid,jsonb,text)",
            "admin_pause_job(uuid)",
            "admin_resume_job(uuid)",
            "append_chapter_content(uuid,text,integer,text,integer,text,jsonb)",
            "claim_jobs(text,text[],text[],integer,text)",
            "claim_next_job_v3(text,text[],text[])",
            "complete_job(uuid,text,jsonb)",
            "complete_jobs(text,jsonb)",
            "enqueue_job(text,jsonb,integer,text,integer,double precision)",
            "finish_chapter(uuid,text)",
            "gemini_bucket(double precision,double precision)",
            "gemini_budget_settle(text,integer,integer,double precision,boolean,text)",
            "gemini_budget_status()",
            "gemini_budget_take(text,integer)",
            "gemini_job_blocked(text,jsonb,text)",
            "gemini_next_daily_reset(timestamp with time zone)",
            "genworker_broadcast(uuid,text,jsonb)",
            "genworker_broadcast_status(chapters,integer)",
            "genworker_chunks_length(uuid)",
            "genworker_chunks_text(uuid)",
            "genworker_cut_chapter(uuid,integer)",
            "get_chapter_text(uuid)",
            "genworker_fence(uuid,text,integer,text)",
            "get_job(uuid)",
            "heartbeat_jobs(text,uuid[])",
            "purge_finished_jobs(integer)",
            "queue_stats()",
            "read_chapter(uuid,integer)",
            "release_job(uuid,text)",
            "release_worker_jobs(text)",
            "requeue_failed_jobs(uuid[],text,timestamp with time zone,integer)",
            "rewind_chapter_content(uuid,text,integer)",
            "save_chapter_outline(uuid,text,text,jsonb)",
            "start_chapter_generation(uuid,text,integer)",
            "story_progress(uuid,boolean)",
            "update_job_heartbeat(uuid,text)",
            "user_load(integer)",
            # genworker dashboard (20261201005000_dashboard.sql).
            "dashboard_job(uuid)",
            "dashboard_jobs(text,text,uuid,timestamp with time zone,timestamp with time zone,"
            "integer,integer)",
            "dashboard_live()",
            "dashboard_overview(integer)",
        )
    },
    ("table", "chapter_chunks", "service_role"): "DELETE,INSERT,SELECT",
    ("table", "chapters", "service_role"): ALL_TABLE,
    ("table", "gemini_budgets", "service_role"): "DELETE,INSERT,SELECT,UPDATE",
    ("table", "job_events", "service_role"): "SELECT",
    ("table", "job_lanes", "service_role"): ALL_TABLE,
    ("table", "job_queue", "service_role"): ALL_TABLE,
    # Written only by the claim (as the service role); nobody else reads it.
    ("table", "job_queue_user_state", "service_role"): "INSERT,SELECT,UPDATE",
    ("table", "stories", "service_role"): ALL_TABLE,
}

# Story memory (20261201004000_story_memory.sql) exists only where pgvector does: owners
# read their passages under RLS; the worker's functions are service_role's.
MEMORY_ALLOWED: dict[tuple[str, str, str], str] = {
    ("table", "story_passages", "authenticated"): "SELECT",
    ("table", "story_passages", "service_role"): "DELETE,INSERT,SELECT",
    **{
        ("function", sig, "service_role"): "EXECUTE"
        for sig in (
            "chapter_embedding_source(uuid,text)",
            "enqueue_chapter_embeddings(uuid,boolean,text,integer)",
            "match_story_passages(uuid,text,jsonb,text,integer,double precision,jsonb)",
            "replace_chapter_passages(uuid,text,uuid,text,text,jsonb)",
            "story_memory_size(uuid,text,text)",
        )
    },
}


async def expected_grants(conn: asyncpg.Connection) -> dict[tuple[str, str, str], str]:
    """The allow-list for this database: with the memory entries where it was installed,
    which must be wherever the vector extension is (so the condition cannot hide a miss)."""
    installed = await conn.fetchval("select to_regclass('public.story_passages') is not null")
    vector = await conn.fetchval(
        "select exists (select 1 from pg_extension where extname = 'vector')"
    )
    assert installed == vector, "story memory must be installed exactly where pgvector is"
    return {**ALLOWED, **MEMORY_ALLOWED} if installed else dict(ALLOWED)


# Every table, view, sequence and function in public, with its effective ACL (the
# built-in default when none is stored: functions are executable by PUBLIC then).
GRANTS_SQL = """
with objs as (
  select case when c.relkind = 'S' then 'sequence' else 'table' end as kind,
         c.relname::text as name, c.relacl as acl, c.relowner as owner,
         case when c.relkind = 'S' then 's' else 'r' end::"char" as objtype
    from pg_class c join pg_namespace n on n.oid = c.relnamespace
   where n.nspname = 'public' and c.relkind in ('r', 'p', 'v', 'm', 'f', 'S')
  union all
  select 'function', p.oid::regprocedure::text, p.proacl, p.proowner, 'f'::"char"
    from pg_proc p join pg_namespace n on n.oid = p.pronamespace
   where n.nspname = 'public'
  union all
  select 'column', c.relname || '.' || a.attname, a.attacl, c.relowner, null
    from pg_attribute a join pg_class c on c.oid = a.attrelid
    join pg_namespace n on n.oid = c.relnamespace
   where n.nspname = 'public' and a.attnum > 0 and not a.attisdropped and a.attacl is not null)
select o.kind, o.name, coalesce(r.rolname, 'PUBLIC') as grantee,
       string_agg(x.privilege_type, ',' order by x.privilege_type) as privileges
  from objs o
  cross join lateral aclexplode(coalesce(o.acl, acldefault(o.objtype, o.owner))) x
  left join pg_roles r on r.oid = x.grantee
 where x.grantee = 0 or r.rolname in ('anon', 'authenticated', 'service_role')
 group by o.kind, o.name, r.rolname
"""


async def live_grants(conn: asyncpg.Connection) -> dict[tuple[str, str, str], str]:
    rows = await conn.fetch(GRANTS_SQL)
    # Function signatures print with ", " between arguments; the list uses ",".
    return {(r["kind"], r["name"].replace(", ", ","), r["grantee"]): r["privileges"] for r in rows}


async def test_every_public_object_has_exactly_the_allowed_grants(conn) -> None:
    live = await live_grants(conn)
    allowed = await expected_grants(conn)
    unexpected = {k: v for k, v in live.items() if allowed.get(k) != v}
    missing = {k: v for k, v in allowed.items() if k not in live}
    assert unexpected == {}, "grants not on the allow-list (add them there or revoke them)"
    assert missing == {}, "allow-listed grants that no longer exist"


async def test_a_function_added_later_is_closed_until_granted(conn) -> None:
    """The migrations revoke Supabase's default privileges: what comes next is closed."""
    await conn.execute(
        "create function public.added_later() returns int language sql as $$ select 1 $$;"
        "create table public.added_later_t (id int);"
        "create sequence public.added_later_s"
    )
    live = await live_grants(conn)
    for kind, name in (
        ("function", "added_later()"),
        ("table", "added_later_t"),
        ("sequence", "added_later_s"),
    ):
        for role in ("PUBLIC", "anon", "authenticated"):
            assert (kind, name, role) not in live, (kind, name, role)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with as_role(conn, "authenticated", None):
            await conn.fetchval("select public.added_later()")


@pytest.mark.parametrize("role", ["anon", "authenticated", "service_role"])
async def test_no_api_role_can_move_a_sequence(conn, role) -> None:
    """An anon setval survives a rollback: it would break every later claim (23505)."""
    seqs = [
        r["s"]
        for r in await conn.fetch(
            "select c.oid::regclass::text as s from pg_class c"
            " join pg_namespace n on n.oid = c.relnamespace"
            " where n.nspname = 'public' and c.relkind = 'S'"
        )
    ]
    assert "job_events_id_seq" in seqs
    for seq in seqs:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with as_role(conn, role, None):
                await conn.fetchval("select setval($1::regclass, 1)", seq)
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            async with as_role(conn, role, None):
                await conn.fetchval("select nextval($1::regclass)", seq)


async def test_supabase_statement_timeouts_are_set_for_the_api_roles(conn) -> None:
    rows = await conn.fetch(
        "select r.rolname, s from pg_db_role_setting d join pg_roles r on r.oid = d.setrole,"
        " unnest(d.setconfig) s where s like 'statement_timeout=%'"
    )
    found = {r["rolname"]: r["s"] for r in rows}
    assert found["anon"] == "statement_timeout=3s"
    assert found["authenticated"] == "statement_timeout=8s"
    assert found["authenticator"] == "statement_timeout=8s"
