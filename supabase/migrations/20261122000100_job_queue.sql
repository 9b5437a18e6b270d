-- genworker 1/5: the job queue, its audit trail and the per-lane lease settings.
-- Every status change is validated (job_queue_check_transition) and recorded
-- (job_queue_after_change -> job_events); new pending work wakes LISTENing workers.

create table if not exists public.job_lanes (
  lane            text primary key,
  lease_timeout_s integer not null default 60 check (lease_timeout_s between 1 and 86400),
  description     text
);
comment on table public.job_lanes is
  'Per-lane settings. lease_timeout_s: a processing job whose heartbeat is older is rescued.';
insert into public.job_lanes (lane, description)
values ('default', 'jobs enqueued without a lane')
on conflict (lane) do nothing;

create table if not exists public.job_queue (
  id              uuid primary key default gen_random_uuid(),
  job_type        text not null check (job_type <> ''),
  job_lane        text not null default 'default',
  status          text not null default 'pending'
                  check (status in ('pending', 'processing', 'paused', 'completed', 'failed', 'cancelled')),
  priority        integer not null default 0,
  job_payload     jsonb not null default '{}'::jsonb,
  job_result      jsonb,
  error_details   jsonb,
  retry_count     integer not null default 0 check (retry_count >= 0),
  max_retries     integer not null default 3 check (max_retries >= 0),
  lease_timeout_s integer not null check (lease_timeout_s between 1 and 86400),
  scheduled_at    timestamptz not null default now(),
  worker_id       text,
  heartbeat_at    timestamptz,
  started_at      timestamptz,
  completed_at    timestamptz,
  created_at      timestamptz not null default now(),
  updated_at      timestamptz not null default now(),
  user_id         uuid references auth.users (id) on delete cascade,
  idempotency_key text,
  progress        integer not null default 0 check (progress between 0 and 100),
  current_step    text
);
comment on column public.job_queue.retry_count is
  'Retries used so far: failures sent back to pending and rescues of lost leases.';
comment on column public.job_queue.lease_timeout_s is
  'Heartbeat age after which the job is rescued; defaults from job_lanes.';

-- Heartbeats rewrite the row every few seconds: leave room for HOT updates.
alter table public.job_queue set (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.01);

-- The claim: an ordered scan over pending rows only (finished rows are not in it).
create index if not exists job_queue_claim_idx on public.job_queue
  (priority desc, scheduled_at, created_at) where status = 'pending';
-- Rescue sweeps and start-up recovery look at processing rows only.
create index if not exists job_queue_processing_idx on public.job_queue (worker_id)
  where status = 'processing';
create index if not exists job_queue_user_idx on public.job_queue (user_id, created_at desc);
create index if not exists job_queue_finished_idx on public.job_queue (completed_at)
  where status in ('completed', 'failed', 'cancelled');
create unique index if not exists job_queue_idempotency_idx on public.job_queue
  (coalesce(user_id, '00000000-0000-0000-0000-000000000000'::uuid), idempotency_key)
  where idempotency_key is not null;

create table if not exists public.job_events (
  id          bigint generated always as identity primary key,
  job_id      uuid not null references public.job_queue (id) on delete cascade,
  from_status text,
  to_status   text not null,
  worker_id   text,
  at          timestamptz not null default now(),
  details     jsonb not null default '{}'::jsonb
);
comment on table public.job_events is
  'Append-only audit trail of job status changes, written only by a trigger on job_queue.';
create index if not exists job_events_job_idx on public.job_events (job_id, at);

-- ---------------------------------------------------------------------------
create or replace function public.genworker_touch_updated_at() returns trigger
language plpgsql set search_path = public, pg_temp as $$
begin
  new.updated_at := now();
  return new;
end $$;

create or replace function public.job_queue_before_insert() returns trigger
language plpgsql set search_path = public, pg_temp as $$
begin
  if new.lease_timeout_s is null then
    select l.lease_timeout_s into new.lease_timeout_s from public.job_lanes l where l.lane = new.job_lane;
    new.lease_timeout_s := coalesce(new.lease_timeout_s, 60);
  end if;
  if new.status not in ('pending', 'paused') then
    raise exception using errcode = 'PT409',
      message = format('a job must be inserted as pending or paused, not %s', new.status);
  end if;
  return new;
end $$;

-- Allowed moves. processing -> processing is a rescue by another worker.
-- Also stamps completed_at on terminal states and clears ownership on the way back to pending.
create or replace function public.job_queue_check_transition() returns trigger
language plpgsql set search_path = public, pg_temp as $$
declare
  ok boolean;
begin
  if new.status = old.status then
    return new;
  end if;
  ok := case old.status
    when 'pending'    then new.status in ('processing', 'cancelled', 'paused')
    when 'processing' then new.status in ('completed', 'failed', 'pending', 'cancelled', 'paused')
    when 'paused'     then new.status in ('pending', 'cancelled')
    when 'failed'     then new.status = 'pending'
    else false
  end;
  if not ok then
    raise exception using errcode = 'PT409',
      message = format('invalid job status transition %s -> %s (job %s)', old.status, new.status, old.id);
  end if;
  -- Bookkeeping every path needs, so the worker's plain failure UPDATE stays small.
  if new.status in ('completed', 'failed', 'cancelled') then
    new.completed_at := now();
  elsif new.status in ('pending', 'paused') then
    new.worker_id := null;
    new.heartbeat_at := null;
    new.completed_at := null;
  end if;
  return new;
end $$;

create or replace function public.job_queue_after_change() returns trigger
language plpgsql security definer set search_path = public, pg_temp as $$
begin
  if tg_op = 'INSERT' then
    insert into public.job_events (job_id, from_status, to_status, worker_id, details)
    values (new.id, null, new.status, null,
            jsonb_build_object('job_type', new.job_type, 'lane', new.job_lane));
  elsif new.status is distinct from old.status
        or (new.status = 'processing' and new.worker_id is distinct from old.worker_id) then
    insert into public.job_events (job_id, from_status, to_status, worker_id, details)
    values (new.id, old.status, new.status, coalesce(new.worker_id, old.worker_id),
            jsonb_strip_nulls(jsonb_build_object(
              'retry_count', new.retry_count,
              'previous_worker', case when old.status = 'processing'
                                      and new.worker_id is distinct from old.worker_id
                                      then old.worker_id end,
              'error', case when new.error_details is distinct from old.error_details
                            then new.error_details end)));
  end if;
  -- Wake LISTENing workers. Identical payloads collapse within a transaction.
  if new.status = 'pending' and (tg_op = 'INSERT' or old.status <> 'pending') then
    perform pg_notify('genworker_jobs', new.job_type);
  end if;
  return null;
end $$;

create or replace function public.job_events_immutable() returns trigger
language plpgsql set search_path = public, pg_temp as $$
begin
  raise exception using errcode = 'PT409', message = 'job_events is append-only';
end $$;

drop trigger if exists job_queue_updated_at on public.job_queue;
create trigger job_queue_updated_at before update on public.job_queue
  for each row execute function public.genworker_touch_updated_at();
drop trigger if exists job_queue_before_insert on public.job_queue;
create trigger job_queue_before_insert before insert on public.job_queue
  for each row execute function public.job_queue_before_insert();
drop trigger if exists job_queue_check_transition on public.job_queue;
create trigger job_queue_check_transition before update of status on public.job_queue
  for each row execute function public.job_queue_check_transition();
drop trigger if exists job_queue_after_change on public.job_queue;
create trigger job_queue_after_change after insert on public.job_queue
  for each row execute function public.job_queue_after_change();
-- Heartbeats and progress writes skip the trigger entirely.
drop trigger if exists job_queue_after_status on public.job_queue;
create trigger job_queue_after_status after update on public.job_queue
  for each row when (old.status is distinct from new.status
                     or old.worker_id is distinct from new.worker_id)
  execute function public.job_queue_after_change();
drop trigger if exists job_events_immutable on public.job_events;
create trigger job_events_immutable before update on public.job_events
  for each row execute function public.job_events_immutable();

notify pgrst, 'reload schema';
