-- genworker: fair claims across users, a per-user processing cap, and a batch claim.
--
-- Fairness. Ready jobs are grouped by (user, lane); jobs without a user form one group of
-- their own. Within a priority, a claim serves first the group with the fewest jobs
-- processing, counting the jobs this very claim takes (so a batch deals round-robin), then
-- the group served least recently (job_queue_user_state), then the oldest job. A backlog of
-- one user therefore delays another user's job by about one claim per active group, and a
-- lone user still gets every free slot. Priority always wins across priorities, and an
-- expired lease (a rescue) keeps its place: it competes by priority and wins ties.
--
-- The cap. job_lanes.max_processing_per_user: at most that many jobs of one user in that
-- lane are processing at once, across every worker instance. Jobs without a user are not
-- capped. A claim skips users at their cap; the worker never sleeps for it. Exactness under
-- concurrent claimers: a claim takes a transaction-scoped advisory lock per (user, lane)
-- before it counts that user's processing jobs in a later statement (a fresh snapshot), so
-- two claims never both see the last free slot.

-- ---------------------------------------------------------------------------
alter table public.job_lanes
  add column if not exists max_processing_per_user integer not null default 3
    check (max_processing_per_user between 1 and 100000);
comment on column public.job_lanes.max_processing_per_user is
  'At most this many jobs of one user in this lane are processing at once (all workers).';

-- The fair claim's one index: a loose scan over it lists the groups with pending work, and
-- an ordered range scan per group finds that group's next jobs.
create index if not exists job_queue_fair_idx on public.job_queue
  ((coalesce(user_id, '00000000-0000-0000-0000-000000000000'::uuid)), job_lane,
   priority desc, scheduled_at, created_at)
  where status = 'pending';
-- The cap counts a group's processing jobs: a small index over exactly those rows.
create index if not exists job_queue_group_processing_idx on public.job_queue
  ((coalesce(user_id, '00000000-0000-0000-0000-000000000000'::uuid)), job_lane)
  where status = 'processing';

-- When each group was last served: the tie-break that makes successive claims rotate.
create table if not exists public.job_queue_user_state (
  user_key        uuid not null,
  job_lane        text not null,
  last_claimed_at timestamptz not null,
  claims          bigint not null default 0,
  primary key (user_key, job_lane)
);
comment on table public.job_queue_user_state is
  'Per (user, lane): when a claim last served it. user_key is the nil uuid for jobs without a user. Written only by the claim.';
alter table public.job_queue_user_state enable row level security;
revoke all on public.job_queue_user_state from public, anon, authenticated, service_role;
grant select, insert, update on public.job_queue_user_state to service_role;

-- ---------------------------------------------------------------------------
-- Claim up to p_limit jobs in one call and return their full rows (no get_job round trip).
-- Pending and due jobs, fairly across groups and within each group's cap; or processing
-- jobs with an expired lease (a rescue, which uses one retry and ignores the cap: the job
-- already counts against it). Stale jobs with no retries left fail here instead.
--
-- Plan shape: every scan is an ordered index range scan with a LIMIT (the loose scan, the
-- per-group scans, the rescue probe), which is the cheapest plan with or without planner
-- statistics. So the function runs on its cached generic plans (force_generic_plan): no
-- planning on any call, and no plan that depends on when autovacuum last analyzed the
-- table (tests/sql/test_ops.py guards the plans, analyzed or not, generic or custom).
-- Chapter jobs whose model is cooling down or out of its daily quota are not claimed
-- (gemini_job_blocked, 20261201001500); p_default_model is the model of jobs that name none.
create or replace function public.claim_jobs(
  p_worker_id text, p_job_types text[] default null, p_job_lanes text[] default null,
  p_limit integer default 1, p_default_model text default null)
returns setof public.job_queue
language plpgsql volatile
set plan_cache_mode = force_generic_plan
set search_path = public, pg_temp as $$
declare
  v_types text[] := nullif(p_job_types, '{}'::text[]);
  v_lanes text[] := nullif(p_job_lanes, '{}'::text[]);
  v_keys uuid[];
  v_glanes text[];
  v_locked boolean[];
  v_use_keys uuid[] := '{}';
  v_use_lanes text[] := '{}';
  i integer;
begin
  if p_worker_id is null or p_worker_id = '' then
    raise exception using errcode = 'PT400', message = 'claim_jobs: p_worker_id is required';
  end if;
  if p_limit is null or p_limit < 1 or p_limit > 1000 then
    raise exception using errcode = 'PT400',
      message = format('claim_jobs: p_limit must be between 1 and 1000, not %s', p_limit);
  end if;
  -- The claim's commit does not wait for its WAL flush (this transaction only). Safe: WAL
  -- is flushed in order, so the worker's first durable write for the job (a heartbeat, a
  -- chapter write, the completion) makes the claim durable first; and if the server crashes
  -- before that, the claim and its audit rows are lost together, the job is pending again,
  -- and every write of the worker that held it fails its fence (lease lost). What is lost
  -- is at most a few hundred milliseconds of claims, never an effect.
  perform set_config('synchronous_commit', 'off', true);

  update public.job_queue q
     set status = 'failed', completed_at = now(),
         error_details = jsonb_build_object(
           'type', 'lease_expired',
           'message', format('worker %s stopped heartbeating (last %s) and all %s retries are used',
                             q.worker_id, q.heartbeat_at, q.max_retries),
           'user_message', 'Generation stopped unexpectedly too many times and was given up.',
           'retryable', false, 'will_retry', false, 'attempt', q.retry_count + 1,
           'worker_id', q.worker_id, 'at', now())
   where q.id in (
     select s.id from public.job_queue s
      where s.status = 'processing'
        and s.heartbeat_at < now() - make_interval(secs => s.lease_timeout_s)
        and s.retry_count >= s.max_retries
        and (v_types is null or s.job_type = any (v_types))
        and (v_lanes is null or s.job_lane = any (v_lanes))
      limit 100
      for update skip locked);

  -- The nil uuid is written out (not a variable) so that every expression matches the
  -- indexes' coalesce(user_id, ...) in a cached generic plan too.
  -- 1. The groups worth serving, best first, at most p_limit of them, each locked if we
  --    can (another claim holding a user's lock is serving that user right now).
  with recursive grp(user_key, job_lane) as (
    (select coalesce(q.user_id, '00000000-0000-0000-0000-000000000000'::uuid), q.job_lane from public.job_queue q
      where q.status = 'pending'
      order by coalesce(q.user_id, '00000000-0000-0000-0000-000000000000'::uuid), q.job_lane
      limit 1)
    union all
    select nxt.user_key, nxt.job_lane
      from grp g
     cross join lateral (
       select coalesce(q.user_id, '00000000-0000-0000-0000-000000000000'::uuid) as user_key, q.job_lane from public.job_queue q
        where q.status = 'pending'
          and (coalesce(q.user_id, '00000000-0000-0000-0000-000000000000'::uuid), q.job_lane) > (g.user_key, g.job_lane)
        order by coalesce(q.user_id, '00000000-0000-0000-0000-000000000000'::uuid), q.job_lane
        limit 1) nxt),
  ranked as (
    select g.user_key, g.job_lane,
           row_number() over (order by best.priority desc, busy.n, st.last_claimed_at nulls first,
                                       best.scheduled_at, best.created_at) as ord
      from grp g
     cross join lateral (
       select q.priority, q.scheduled_at, q.created_at from public.job_queue q
        where coalesce(q.user_id, '00000000-0000-0000-0000-000000000000'::uuid) = g.user_key and q.job_lane = g.job_lane
          and q.status = 'pending' and q.scheduled_at <= now()
          and (v_types is null or q.job_type = any (v_types))
          and not public.gemini_job_blocked(q.job_type, q.job_payload, p_default_model)
        order by q.priority desc, q.scheduled_at, q.created_at
        limit 1) best
     cross join lateral (
       select count(*) as n from public.job_queue p
        where coalesce(p.user_id, '00000000-0000-0000-0000-000000000000'::uuid) = g.user_key and p.job_lane = g.job_lane
          and p.status = 'processing') busy
      left join public.job_lanes l on l.lane = g.job_lane
      left join public.job_queue_user_state st
        on st.user_key = g.user_key and st.job_lane = g.job_lane
     where (v_lanes is null or g.job_lane = any (v_lanes))
       and (g.user_key = '00000000-0000-0000-0000-000000000000'::uuid or busy.n < coalesce(l.max_processing_per_user, 2147483647))
     order by ord
     limit p_limit)
  select array_agg(r.user_key order by r.ord), array_agg(r.job_lane order by r.ord),
         array_agg(r.got order by r.ord)
    into v_keys, v_glanes, v_locked
    from (select ranked.*,
                 ranked.user_key = '00000000-0000-0000-0000-000000000000'::uuid
                 or pg_try_advisory_xact_lock(hashtextextended(
                      'genworker:claim:' || ranked.user_key::text || '/' || ranked.job_lane, 0))
                   as got
            from ranked) r;

  for i in 1 .. coalesce(array_length(v_keys, 1), 0) loop
    if v_locked[i] then
      v_use_keys := v_use_keys || v_keys[i];
      v_use_lanes := v_use_lanes || v_glanes[i];
    end if;
  end loop;
  if cardinality(v_use_keys) = 0 and cardinality(v_keys) > 0 then
    -- Every group we want is being served by another claim: wait for the best one rather
    -- than come back empty-handed (a lone user keeps every free slot busy).
    perform pg_advisory_xact_lock(hashtextextended(
      'genworker:claim:' || v_keys[1]::text || '/' || v_glanes[1], 0));
    v_use_keys := array[v_keys[1]];
    v_use_lanes := array[v_glanes[1]];
  end if;

  -- 2. A fresh snapshot, taken after the locks: each locked group's processing count is
  --    exact. Each group offers its next jobs up to its free room; a job's slot is the
  --    group's processing count plus its rank in the group, so ordering by slot deals the
  --    batch round-robin. Rescues compete by priority and win ties.
  return query
  with grp as (
    select g.user_key, g.job_lane, st.last_claimed_at,
           case when g.user_key = '00000000-0000-0000-0000-000000000000'::uuid then p_limit
                else least(p_limit, coalesce(l.max_processing_per_user, 2147483647) - busy.n)
           end as room,
           busy.n as busy
      from unnest(v_use_keys, v_use_lanes) as g(user_key, job_lane)
     cross join lateral (
       select count(*)::integer as n from public.job_queue p
        where coalesce(p.user_id, '00000000-0000-0000-0000-000000000000'::uuid) = g.user_key and p.job_lane = g.job_lane
          and p.status = 'processing') busy
      left join public.job_lanes l on l.lane = g.job_lane
      left join public.job_queue_user_state st
        on st.user_key = g.user_key and st.job_lane = g.job_lane),
  ready as (
    select j.id, j.priority, 1 as pick, grp.busy + j.rn as slot, grp.last_claimed_at,
           j.scheduled_at, j.created_at
      from grp
     cross join lateral (
       select c.*, row_number() over (order by c.priority desc, c.scheduled_at, c.created_at) as rn
         from (select q.id, q.priority, q.scheduled_at, q.created_at from public.job_queue q
                where coalesce(q.user_id, '00000000-0000-0000-0000-000000000000'::uuid) = grp.user_key and q.job_lane = grp.job_lane
                  and q.status = 'pending' and q.scheduled_at <= now()
                  and (v_types is null or q.job_type = any (v_types))
                  and not public.gemini_job_blocked(q.job_type, q.job_payload, p_default_model)
                order by q.priority desc, q.scheduled_at, q.created_at
                limit greatest(grp.room, 0)
                for update skip locked) c) j),
  stale as (
    select s.id, s.priority, 0 as pick, 0::bigint as slot, null::timestamptz as last_claimed_at,
           s.scheduled_at, s.created_at
      from public.job_queue s
     where s.status = 'processing'
       and s.heartbeat_at < now() - make_interval(secs => s.lease_timeout_s)
       and s.retry_count < s.max_retries
       and (v_types is null or s.job_type = any (v_types))
       and (v_lanes is null or s.job_lane = any (v_lanes))
       and not public.gemini_job_blocked(s.job_type, s.job_payload, p_default_model)
     limit p_limit
     for update skip locked),
  chosen as (
    select cand.id from (select * from stale union all select * from ready) cand
     order by cand.priority desc, cand.pick, cand.slot, cand.last_claimed_at nulls first,
              cand.scheduled_at, cand.created_at
     limit p_limit),
  claimed as (
    update public.job_queue j
       set status = 'processing',
           retry_count = j.retry_count + case when j.status = 'processing' then 1 else 0 end,
           error_details = case when j.status = 'processing' then jsonb_build_object(
               'type', 'lease_expired',
               'message', format('rescued from worker %s (last heartbeat %s)', j.worker_id, j.heartbeat_at),
               'user_message', 'Generation was interrupted and is being resumed.',
               'retryable', true, 'will_retry', true, 'attempt', j.retry_count + 1,
               'worker_id', j.worker_id, 'at', now())
             else j.error_details end,
           worker_id = p_worker_id, heartbeat_at = now(), started_at = now(), completed_at = null
      from chosen
     where j.id = chosen.id
    returning j.*),
  served as (
    -- In key order, so two claims never wait on each other's state rows in a cycle.
    insert into public.job_queue_user_state as s (user_key, job_lane, last_claimed_at, claims)
    select coalesce(c.user_id, '00000000-0000-0000-0000-000000000000'::uuid), c.job_lane, clock_timestamp(), count(*)
      from claimed c
     group by 1, 2
     order by 1, 2
    on conflict (user_key, job_lane) do update
       set last_claimed_at = excluded.last_claimed_at, claims = s.claims + excluded.claims)
  select * from claimed;
end $$;

-- The single claim keeps its exact contract (names, columns) and is the batch claim of one.
create or replace function public.claim_next_job_v3(
  worker_id text, job_types text[] default null, job_lanes text[] default null)
returns table (job_id uuid, job_type text, job_payload jsonb, retry_count integer)
language plpgsql volatile
set search_path = public, pg_temp as $$
#variable_conflict use_column
begin
  if claim_next_job_v3.worker_id is null or claim_next_job_v3.worker_id = '' then
    raise exception using errcode = 'PT400', message = 'claim_next_job_v3: worker_id is required';
  end if;
  return query
  select c.id, c.job_type, c.job_payload, c.retry_count
    from public.claim_jobs(claim_next_job_v3.worker_id, claim_next_job_v3.job_types,
                           claim_next_job_v3.job_lanes, 1) c;
end $$;

-- Per-user load for /status and /metrics: processing and pending jobs of the busiest users.
create or replace function public.user_load(p_limit integer default 10)
returns table (user_id uuid, job_lane text, processing integer, pending integer,
               max_processing integer, last_claimed_at timestamptz)
language sql stable set search_path = public, pg_temp as $$
  select nullif(a.user_key, '00000000-0000-0000-0000-000000000000'::uuid), a.job_lane,
         a.processing::integer, a.pending::integer, l.max_processing_per_user,
         st.last_claimed_at
    from (select coalesce(q.user_id, '00000000-0000-0000-0000-000000000000'::uuid) as user_key,
                 q.job_lane,
                 count(*) filter (where q.status = 'processing') as processing,
                 count(*) filter (where q.status = 'pending') as pending
            from public.job_queue q
           where q.status in ('pending', 'processing')
           group by 1, 2) a
    left join public.job_lanes l on l.lane = a.job_lane
    left join public.job_queue_user_state st
      on st.user_key = a.user_key and st.job_lane = a.job_lane
   order by a.processing desc, a.pending desc, a.user_key
   limit least(greatest(coalesce(p_limit, 10), 0), 1000)
$$;

revoke all on function public.claim_jobs(text, text[], text[], integer, text),
                       public.claim_next_job_v3(text, text[], text[]),
                       public.user_load(integer)
  from public, anon, authenticated;
grant execute on function public.claim_jobs(text, text[], text[], integer, text),
                          public.claim_next_job_v3(text, text[], text[]),
                          public.user_load(integer)
  to service_role;

notify pgrst, 'reload schema';
