-- What every Supabase database already has before our migrations run.
-- Applied by the tests, the demo and `genworker migrate --bootstrap` on plain PostgreSQL.
-- Never applied to a real Supabase project (it has all of this already).
-- Idempotent: roles are cluster-wide and may exist from an earlier database.

do $$
begin
  if not exists (select 1 from pg_roles where rolname = 'anon') then
    create role anon nologin noinherit;
  end if;
  if not exists (select 1 from pg_roles where rolname = 'authenticated') then
    create role authenticated nologin noinherit;
  end if;
  if not exists (select 1 from pg_roles where rolname = 'service_role') then
    create role service_role nologin noinherit bypassrls;
  end if;
  if not exists (select 1 from pg_roles where rolname = 'authenticator') then
    create role authenticator login noinherit;
  end if;
end $$;

grant anon, authenticated, service_role to authenticator;

-- Supabase's statement timeouts for API requests (its "Timeouts" guide): anon 3 s,
-- authenticated 8 s, and service_role inherits the authenticator's 8 s. PostgREST (and
-- the test gateway) applies the impersonated role's setting to each request.
alter role anon set statement_timeout = '3s';
alter role authenticated set statement_timeout = '8s';
alter role authenticator set statement_timeout = '8s';

create schema if not exists auth;
grant usage on schema auth to anon, authenticated, service_role;

create table if not exists auth.users (
  id uuid primary key default gen_random_uuid(),
  email text unique,
  raw_user_meta_data jsonb not null default '{}'::jsonb,
  created_at timestamptz not null default now()
);

-- The JWT claims PostgREST puts in request.jwt.claims (older versions: request.jwt.claim.*).
create or replace function auth.jwt() returns jsonb language sql stable as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim', true), ''),
    nullif(current_setting('request.jwt.claims', true), '')
  )::jsonb
$$;

create or replace function auth.uid() returns uuid language sql stable as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.sub', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
  )::uuid
$$;

create or replace function auth.role() returns text language sql stable as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.role', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role')
  )::text
$$;

grant execute on function auth.jwt(), auth.uid(), auth.role() to anon, authenticated, service_role;

-- Supabase grants the API roles everything in public by default; RLS and explicit
-- revokes in the migrations are what protect the data. Reproduce that here so the
-- tests prove the migrations' revokes, not an empty default.
grant usage on schema public to anon, authenticated, service_role;
-- Supabase keeps extensions (pgvector among them) in their own schema, usable by the API
-- roles; `create extension ... with schema extensions` is the platform's convention.
create schema if not exists extensions;
grant usage on schema extensions to anon, authenticated, service_role;
alter default privileges in schema public grant all on tables to anon, authenticated, service_role;
alter default privileges in schema public grant all on functions to anon, authenticated, service_role;
alter default privileges in schema public grant all on sequences to anon, authenticated, service_role;

-- The role that runs the migrations. On a hosted project that is `postgres`, which is
-- not a superuser: it is a member of the API roles, may reference auth.users, owns the
-- supabase_realtime publication, and the defaults above are set for it too. Here it is
-- the role named by the setting genworker.migration_owner (the suite's non-superuser
-- run sets it), else whoever applies this file.
do $$
declare
  v_kind text;
  v_owner text := coalesce(nullif(current_setting('genworker.migration_owner', true), ''),
                           current_user);
begin
  if v_owner = current_user then
    return;
  end if;
  execute format('grant anon, authenticated, service_role to %I', v_owner);
  execute format('grant usage on schema auth to %I', v_owner);
  execute format('grant select, references on auth.users to %I', v_owner);
  execute format('grant usage, create on schema public to %I', v_owner);
  execute format('grant usage on schema extensions to %I', v_owner);
  foreach v_kind in array array['tables', 'functions', 'sequences'] loop
    execute format('alter default privileges for role %I in schema public grant all on %s'
                   ' to anon, authenticated, service_role', v_owner, v_kind);
  end loop;
end $$;

do $$
begin
  if not exists (select 1 from pg_publication where pubname = 'supabase_realtime') then
    create publication supabase_realtime;
  end if;
  if nullif(current_setting('genworker.migration_owner', true), '') is not null then
    execute format('alter publication supabase_realtime owner to %I',
                   current_setting('genworker.migration_owner'));
  end if;
end $$;

-- Realtime's tenant objects that Broadcast from the database relies on (what the Realtime
-- service creates in every project; see docs/supabase-platform.md §4). realtime.send inserts a row into
-- realtime.messages, which Realtime delivers on commit through logical replication; Realtime
-- Authorization is row level security on realtime.messages, evaluated at channel join with
-- realtime.topic() set to the channel's topic. Hosted projects partition the table by day
-- on inserted_at; one plain table with the same columns is enough here.
do $$
begin
  if not exists (select 1 from pg_roles where rolname = 'supabase_realtime_admin') then
    create role supabase_realtime_admin nologin noinherit;
  end if;
end $$;

create schema if not exists realtime;
grant usage on schema realtime to anon, authenticated, service_role;

create table if not exists realtime.messages (
  topic          text not null,
  extension      text not null,
  payload        jsonb,
  event          text,
  private        boolean default false,
  updated_at     timestamp without time zone not null default now(),
  inserted_at    timestamp without time zone not null default now(),
  id             uuid not null default gen_random_uuid(),
  binary_payload bytea,
  primary key (id, inserted_at)
);
alter table realtime.messages owner to supabase_realtime_admin;
alter table realtime.messages enable row level security;
grant select, insert, update on realtime.messages to anon, authenticated, service_role;

-- The channel topic Realtime sets (without its 'realtime:' prefix) while it authorizes.
create or replace function realtime.topic() returns text language sql stable as $$
  select nullif(current_setting('realtime.topic', true), '')::text
$$;

-- Broadcast one message from SQL. Like Supabase's: adds a generated 'id' to a payload
-- without one, sets realtime.topic for the rest of the transaction, and never raises:
-- any error becomes a WARNING and the caller's transaction goes on.
create or replace function realtime.send(
  payload jsonb, event text, topic text, private boolean default true)
returns void language plpgsql volatile as $$
declare
  v_id uuid;
begin
  begin
    v_id := gen_random_uuid();
    execute format('set local realtime.topic to %L', topic);
    insert into realtime.messages (id, payload, event, topic, private, extension)
    values (v_id,
            case when payload ? 'id' then payload else jsonb_set(payload, '{id}', to_jsonb(v_id)) end,
            event, topic, private, 'broadcast');
  exception when others then
    raise warning 'WarnSendingBroadcastMessage: %', sqlerrm;
  end;
end $$;

alter function realtime.topic() owner to supabase_realtime_admin;
alter function realtime.send(jsonb, text, text, boolean) owner to supabase_realtime_admin;
grant execute on function realtime.topic(), realtime.send(jsonb, text, text, boolean)
  to anon, authenticated, service_role;
