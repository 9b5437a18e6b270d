"""The PostgREST gateway, proven with the real supabase-py async client on real PostgreSQL.

The worker's tests trust this gateway to behave like Supabase's Data API, so every shape,
error code and fault below is asserted through the same client the worker uses.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import httpx
import pytest
from postgrest import APIError
from supabase import AClient, AsyncClientOptions, acreate_client

from tests.support.postgrest_gateway import Gateway, http_status, make_token, start_gateway

SECRET = "gateway-test-secret-at-least-32-bytes-long"
ALICE = uuid.UUID("00000000-0000-0000-0000-00000000a11c")
BOB = uuid.UUID("00000000-0000-0000-0000-000000000b0b")

# Our own objects, independent of the project's migrations (which are still being written).
SCHEMA_SQL = f"""
insert into auth.users (id, email) values ('{ALICE}', 'alice@x'), ('{BOB}', 'bob@x');

create table public.jobs (
  id bigint primary key,
  owner uuid not null references auth.users (id),
  status text not null default 'queued',
  worker_id text,
  tags text[] not null default '{{}}',
  touched int not null default 0
);
alter table public.jobs enable row level security;
create policy own_jobs on public.jobs for all to authenticated
  using (owner = auth.uid()) with check (owner = auth.uid());
revoke all on public.jobs from anon;

create function public.claim(p_worker text, p_tags text[] default null)
returns setof public.jobs language sql as $$
  update public.jobs j set status = 'running', worker_id = p_worker
  where j.id = (select id from public.jobs where status = 'queued'
                and (p_tags is null or tags && p_tags) order by id limit 1
                for update skip locked)
  returning j.*
$$;

create function public.get_job(p_id bigint) returns public.jobs language sql stable as $$
  select * from public.jobs where id = p_id
$$;

create function public.is_owner(p_id bigint, p_worker text) returns boolean
language sql stable as $$
  select exists (select 1 from public.jobs where id = p_id and worker_id = p_worker)
$$;

create function public.heartbeat(p_id bigint) returns void language sql as $$
  update public.jobs set touched = touched + 1 where id = p_id
$$;

create function public.complete(p_id bigint, p_worker text) returns void
language plpgsql as $$
begin
  update public.jobs set status = 'done' where id = p_id and worker_id = p_worker;
  if not found then
    raise sqlstate 'PT409' using message = 'job not owned', detail = p_id::text;
  end if;
end $$;

create function public.boom() returns void language plpgsql as $$
begin
  raise exception 'boom' using detail = 'some detail', hint = 'some hint';
end $$;

create function public.touch_all() returns int language plpgsql as $$
begin
  update public.jobs set touched = touched + 1;
  return 1;
end $$;

create function public.stable_write() returns int language plpgsql stable as $$
begin
  return public.touch_all();
end $$;

create function public.echo(p_tags text[], p_ids uuid[], p_doc jsonb, p_note text default null)
returns jsonb language sql immutable as $$
  select jsonb_build_object('tags', p_tags, 'ids', p_ids, 'doc', p_doc, 'note', p_note,
                            'n_tags', cardinality(p_tags))
$$;

create function public.takes_json(jsonb) returns jsonb language sql as $$ select $1 $$;
create function public.ov(a int) returns text language sql as $$ select 'one' $$;
create function public.ov(a int, b int default 0) returns text language sql as $$ select 'two' $$;
create function public.sleepy(p_s float8) returns void language sql as $$
  select pg_sleep(p_s)
$$;
create function public.capped() returns void language sql set statement_timeout = '100ms'
as $$ select pg_sleep(1) $$;

create function public.whoami() returns jsonb language sql stable as $$
  select jsonb_build_object('user', current_user, 'role', auth.role(), 'uid', auth.uid(),
    'method', current_setting('request.method', true),
    'path', current_setting('request.path', true),
    'read_only', current_setting('transaction_read_only'))
$$;

-- The project's migrations close Supabase's default privileges, so these test objects
-- are granted explicitly, as Supabase's defaults would have done.
grant all on public.jobs to authenticated, service_role;
grant execute on function public.claim(text, text[]), public.get_job(bigint),
  public.is_owner(bigint, text), public.heartbeat(bigint), public.complete(bigint, text),
  public.boom(), public.touch_all(), public.stable_write(),
  public.echo(text[], uuid[], jsonb, text), public.takes_json(jsonb), public.ov(int),
  public.ov(int, int), public.sleepy(float8), public.capped(), public.whoami()
  to public, anon, authenticated, service_role;
"""


@dataclass
class Env:
    conn: asyncpg.Connection
    gateway: Gateway
    http: httpx.AsyncClient

    async def client(
        self, role: str = "service_role", sub: uuid.UUID | None = None, token: str | None = None
    ) -> AClient:
        """A real supabase-py client whose API key is a JWT for ``role``."""
        key = token or make_token(SECRET, role, str(sub) if sub else None)
        return await acreate_client(
            self.gateway.url, key, options=AsyncClientOptions(httpx_client=self.http)
        )

    async def add_job(
        self, job_id: int, owner: uuid.UUID = ALICE, tags: tuple[str, ...] = ()
    ) -> None:
        await self.conn.execute(
            "insert into public.jobs (id, owner, tags) values ($1, $2, $3)",
            job_id,
            owner,
            list(tags),
        )


@pytest.fixture
async def env(db_dsn: str) -> AsyncIterator[Env]:
    conn = await asyncpg.connect(db_dsn)
    await conn.execute(SCHEMA_SQL)
    gateway = await start_gateway(db_dsn, SECRET)
    http = httpx.AsyncClient(http2=False, timeout=5.0)
    try:
        yield Env(conn, gateway, http)
    finally:
        await http.aclose()
        await gateway.close()
        await conn.close()


async def test_setof_rpc_list_empty_and_maybe_single(env: Env) -> None:
    sb = await env.client()
    assert (await sb.rpc("claim", {"p_worker": "w1"}).execute()).data == []
    assert await sb.rpc("claim", {"p_worker": "w1"}).maybe_single().execute() is None

    await env.add_job(1, tags=("gpu",))
    await env.add_job(2, tags=("cpu",))
    res = await sb.rpc("claim", {"p_worker": "w1", "p_tags": ["cpu", "x y"]}).execute()
    assert [(r["id"], r["status"], r["worker_id"], r["tags"]) for r in res.data] == [
        (2, "running", "w1", ["cpu"])
    ]
    one = await sb.rpc("claim", {"p_worker": "w2", "p_tags": None}).maybe_single().execute()
    assert one is not None and one.data["id"] == 1 and one.data["worker_id"] == "w2"
    assert await env.conn.fetchval("select count(*) from jobs where status = 'running'") == 2


async def test_scalar_void_composite_and_argument_casts(env: Env) -> None:
    sb = await env.client()
    await env.add_job(1)
    await sb.rpc("claim", {"p_worker": "w1"}).execute()
    assert (await sb.rpc("is_owner", {"p_id": 1, "p_worker": "w1"}).execute()).data is True
    assert (await sb.rpc("is_owner", {"p_id": 1, "p_worker": "zz"}).execute()).data is False

    assert (await sb.rpc("heartbeat", {"p_id": 1}).execute()).data == []
    assert await env.conn.fetchval("select touched from jobs where id = 1") == 1

    job = (await sb.rpc("get_job", {"p_id": 1}).execute()).data
    assert job["id"] == 1 and job["status"] == "running"
    missing = (await sb.rpc("get_job", {"p_id": 99}).execute()).data
    assert missing == dict.fromkeys(job)  # PostgREST #3694: all-null object, not null

    ids = [str(ALICE), str(BOB)]
    out = (
        await sb.rpc(
            "echo", {"p_tags": ["a", "b,c", 'q"t'], "p_ids": ids, "p_doc": {"k": [1, None]}}
        ).execute()
    ).data
    assert out == {
        "tags": ["a", "b,c", 'q"t'],
        "ids": ids,
        "doc": {"k": [1, None]},
        "note": None,
        "n_tags": 3,
    }
    assert (
        await sb.rpc("echo", {"p_tags": None, "p_ids": [], "p_doc": None, "p_note": "n"}).execute()
    ).data["ids"] == []

    who = (await sb.rpc("whoami", {}).execute()).data
    assert who == {
        "user": "service_role",
        "role": "service_role",
        "uid": None,
        "method": "POST",
        "path": "/rpc/whoami",
        "read_only": "on",
    }


async def test_table_reads_and_fenced_updates(env: Env) -> None:
    sb = await env.client()
    for i in (1, 2, 3):
        await env.add_job(i, BOB if i == 3 else ALICE)
    rows = (
        await sb.table("jobs")
        .select("id, status")
        .in_("id", [1, 3])
        .order("id", desc=True)
        .limit(5)
        .execute()
    ).data
    assert rows == [{"id": 3, "status": "queued"}, {"id": 1, "status": "queued"}]
    assert (
        await sb.table("jobs")
        .select("*")
        .is_("worker_id", "null")
        .neq("id", 2)
        .gte("id", 2)
        .execute()
    ).data[0]["id"] == 3
    assert (await sb.table("jobs").select("id").eq("id", 2).single().execute()).data == {"id": 2}
    with pytest.raises(APIError) as err:
        await sb.table("jobs").select("id").single().execute()
    assert err.value.code == "PGRST116" and err.value.details == "The result contains 3 rows"

    await sb.rpc("claim", {"p_worker": "w1"}).execute()
    upd = await (
        sb.table("jobs")
        .update({"status": "failed", "tags": ["e"]})
        .eq("id", 1)
        .eq("worker_id", "w1")
        .execute()
    )
    assert [(r["id"], r["status"], r["tags"]) for r in upd.data] == [(1, "failed", ["e"])]
    lost = await (
        sb.table("jobs")
        .update({"status": "failed"})
        .eq("id", 1)
        .eq("worker_id", "someone-else")
        .execute()
    )
    assert lost.data == []
    minimal = await (
        sb.table("jobs")
        .update({"touched": 5}, returning="minimal")  # type: ignore[arg-type]
        .eq("id", 2)
        .execute()
    )
    assert minimal.data == []
    assert await env.conn.fetchval("select touched from jobs where id = 2") == 5

    ins = await sb.table("jobs").insert([{"id": 7, "owner": str(BOB)}]).execute()
    assert ins.data[0]["status"] == "queued"
    await sb.table("jobs").upsert({"id": 7, "owner": str(BOB), "status": "done"}).execute()
    assert (await sb.table("jobs").delete().eq("id", 7).execute()).data[0]["status"] == "done"

    for query, code in [
        (sb.table("jobs").update({"status": "x"}), "21000"),
        (sb.table("jobs").delete(), "21000"),
        (sb.table("jobs").update({"nope": 1}).eq("id", 1), "PGRST204"),
        (sb.table("jobs").insert({"id": 1, "owner": str(ALICE)}), "23505"),
        (sb.table("missing").select("*"), "PGRST205"),
    ]:
        with pytest.raises(APIError) as err:
            await query.execute()
        assert err.value.code == code


async def test_rls_hides_other_users_rows_and_anon_is_denied(env: Env) -> None:
    await env.add_job(1, ALICE)
    await env.add_job(2, BOB)
    alice = await env.client("authenticated", ALICE)
    assert [r["id"] for r in (await alice.table("jobs").select("id").execute()).data] == [1]
    assert (await alice.table("jobs").update({"status": "x"}).eq("id", 2).execute()).data == []
    assert (await alice.rpc("get_job", {"p_id": 2}).execute()).data["id"] is None
    who = (await alice.rpc("whoami", {}).execute()).data
    assert (who["user"], who["role"], who["uid"]) == ("authenticated", "authenticated", str(ALICE))
    with pytest.raises(APIError) as err:
        await alice.table("jobs").insert({"id": 3, "owner": str(BOB)}).execute()
    assert err.value.code == "42501"  # WITH CHECK violation

    anon = await env.client("anon")
    with pytest.raises(APIError) as err:
        await anon.table("jobs").select("*").execute()
    assert err.value.code == "42501" and "permission denied" in (err.value.message or "")
    raw = await env.http.get(f"{env.gateway.url}/rest/v1/jobs")  # no Authorization: anon
    assert raw.status_code == 401 and raw.json()["code"] == "42501"
    service = await env.client()
    assert len((await service.table("jobs").select("id").execute()).data) == 2  # bypasses RLS


async def test_errors_follow_postgrest(env: Env) -> None:
    sb = await env.client()
    service = make_token(SECRET, "service_role")
    await env.add_job(1)
    cases = [
        ("complete", {"p_id": 1, "p_worker": "w9"}, "PT409", 409),
        ("boom", {}, "P0001", 400),
        ("stable_write", {}, "25006", 405),
        ("nope", {"a": 1, "b": 2}, "PGRST202", 404),
        ("claim", {"worker": "w"}, "PGRST202", 404),
        ("get_job", {"p_id": "not-a-number"}, "22P02", 400),
    ]
    for fn, args, code, status in cases:
        with pytest.raises(APIError) as err:
            await sb.rpc(fn, args).execute()
        assert err.value.code == code, fn
        raw = await env.http.post(
            f"{env.gateway.url}/rest/v1/rpc/{fn}",
            json=args,
            headers={"Authorization": f"Bearer {service}"},
        )
        assert raw.status_code == status
        assert raw.headers["Proxy-Status"] == f"PostgREST; error={code}"
    with pytest.raises(APIError) as err:
        await sb.rpc("complete", {"p_id": 1, "p_worker": "w9"}).execute()
    assert (err.value.message, err.value.details) == ("job not owned", "1")
    with pytest.raises(APIError) as err:
        await sb.rpc("boom", {}).execute()
    assert (err.value.details, err.value.hint) == ("some detail", "some hint")
    with pytest.raises(APIError) as err:
        await sb.rpc("nope", {"b": 1, "a": 2}).execute()
    assert err.value.message == "Could not find the function public.nope(a, b) in the schema cache"
    assert await env.conn.fetchval("select touched from jobs where id = 1") == 0  # rolled back

    for token, code in [
        (make_token("wrong-secret-of-a-decent-length-too!", "service_role"), "PGRST301"),
        (make_token(SECRET, "service_role", exp_s=-10), "PGRST303"),
    ]:
        with pytest.raises(APIError) as err:
            await (await env.client(token=token)).rpc("whoami", {}).execute()
        assert err.value.code == code
    with pytest.raises(APIError) as err:
        await sb.schema("private").rpc("whoami", {}).execute()
    assert err.value.code == "PGRST106"


async def test_injected_faults_surface_like_the_real_client_sees_them(env: Env) -> None:
    sb = await env.client()
    gw = env.gateway
    await env.add_job(1)

    gw.inject("rpc/claim", status=503)
    with pytest.raises(APIError) as err:
        await sb.rpc("claim", {"p_worker": "w1"}).execute()
    assert err.value.code == "PGRST003"
    assert await env.conn.fetchval("select status from jobs where id = 1") == "queued"

    gw.inject("rpc/claim", html=True)
    with pytest.raises(APIError) as err:
        await sb.rpc("claim", {"p_worker": "w1"}).execute()
    assert (err.value.code, err.value.message) == ("502", "Bad Gateway")

    gw.inject("rpc/claim", drop=True)
    with pytest.raises(httpx.RemoteProtocolError):
        await sb.rpc("claim", {"p_worker": "w1"}).execute()
    assert gw.count("rpc/claim", "POST") == 3
    assert await env.conn.fetchval("select status from jobs where id = 1") == "queued"

    gw.inject("rpc/claim", drop=True, after=True)  # committed, but the response is lost
    with pytest.raises(httpx.RemoteProtocolError):
        await sb.rpc("claim", {"p_worker": "w1"}).execute()
    assert await env.conn.fetchval("select worker_id from jobs where id = 1") == "w1"

    gw.inject("rpc/heartbeat", delay=0.6)
    slow = httpx.AsyncClient(http2=False, timeout=0.2)
    try:
        slow_sb = await acreate_client(
            gw.url,
            make_token(SECRET, "service_role"),
            options=AsyncClientOptions(httpx_client=slow),
        )
        with pytest.raises(httpx.ReadTimeout):
            await slow_sb.rpc("heartbeat", {"p_id": 1}).execute()
    finally:
        await slow.aclose()
    for _ in range(50):  # the upstream still runs the request after the client gave up
        if await env.conn.fetchval("select touched from jobs where id = 1") == 1:
            break
        await asyncio.sleep(0.05)
    assert await env.conn.fetchval("select touched from jobs where id = 1") == 1

    gw.inject("jobs", method="GET", status=503, times=2)
    with pytest.raises(APIError):
        await sb.table("jobs").select("id").retry(False).execute()
    assert gw.faults[0].times == 1  # one left
    before = gw.count("/jobs")
    rows = await sb.table("jobs").select("id").execute()  # supabase-py retries a GET 503 once
    assert rows.data == [{"id": 1}] and gw.count("/jobs") == before + 2 and not gw.faults
    assert (await sb.rpc("heartbeat", {"p_id": 1}).execute()).data == []
    assert gw.counts["POST /rest/v1/rpc/heartbeat"] == 2


async def test_get_rpc_json_body_overloads_and_statement_timeouts(env: Env) -> None:
    sb = await env.client()
    await env.add_job(1)
    await sb.rpc("claim", {"p_worker": "w1"}).execute()
    assert (await sb.rpc("is_owner", {"p_id": 1, "p_worker": "w1"}, get=True).execute()).data
    who = (await sb.rpc("whoami", {}, get=True).execute()).data
    assert (who["method"], who["read_only"]) == ("GET", "on")
    with pytest.raises(APIError) as err:  # GET is READ ONLY even for a VOLATILE function
        await sb.rpc("touch_all", {}, get=True).execute()
    assert err.value.code == "25006"

    body = {"anything": [1, {"x": None}]}
    assert (await sb.rpc("takes_json", body).execute()).data == body
    assert (await sb.rpc("ov", {"a": 1, "b": 2}).execute()).data == "two"
    with pytest.raises(APIError) as err:
        await sb.rpc("ov", {"a": 1}).execute()
    assert err.value.code == "PGRST203"

    with pytest.raises(APIError) as err:  # function SET statement_timeout is hoisted
        await sb.rpc("capped", {}).execute()
    assert err.value.code == "57014"
    db = await env.conn.fetchval("select current_database()")
    await env.conn.execute(
        f"alter role authenticated in database {db} set statement_timeout = '100ms'"
    )
    alice = await env.client("authenticated", ALICE)
    with pytest.raises(APIError) as err:  # role settings apply, as Supabase's per-role timeouts
        await alice.rpc("sleepy", {"p_s": 0.5}).execute()
    assert err.value.code == "57014"
    assert (await sb.rpc("sleepy", {"p_s": 0.2}).execute()).data == []

    head = await env.http.head(
        f"{env.gateway.url}/rest/v1/jobs",
        headers={"Authorization": f"Bearer {make_token(SECRET, 'service_role')}"},
    )
    assert head.status_code == 200 and head.content == b""


@pytest.mark.parametrize(
    ("state", "message", "authed", "status"),
    [
        ("PT409", "", True, 409),
        ("P0001", "", True, 400),
        ("23505", "", True, 409),
        ("42501", "", False, 401),
        ("42501", "", True, 403),
        ("42883", "", True, 404),
        ("25006", "", True, 405),
        ("57014", "", True, 500),
        ("40001", "", True, 500),
        ("21000", "UPDATE requires a WHERE clause", True, 400),
        ("21000", "more rows", True, 500),
        ("22P02", "", True, 400),
        ("08006", "", True, 503),
        ("PTabc", "", True, 500),
    ],
)
def test_sqlstate_to_http_status(state: str, message: str, authed: bool, status: int) -> None:
    assert http_status(state, message, authed) == status
