-- genworker: the audit trail written once per statement, and batched completion.
--
-- job_events gets exactly the rows it got before (one per insert, one per status change,
-- one per takeover of a processing job by another worker), but from statement-level
-- triggers that read the statement's transition tables: a batch claim of 25 jobs or a
-- batch completion writes its 25 audit rows with one INSERT instead of 25 trigger calls.

create or replace function public.job_queue_audit_insert() returns trigger
language plpgsql security definer set search_path = public, pg_temp as $$
begin
  insert into public.job_events (job_id, from_status, to_status, worker_id, details)
  select n.id, null, n.status, null, jsonb_build_object('job_type', n.job_type, 'lane', n.job_lane)
    from new_rows n;
  -- Wake LISTENing workers: one notification per job type (identical ones collapse anyway).
  perform pg_notify('genworker_jobs', t.job_type)
     from (select distinct n.job_type from new_rows n where n.status = 'pending') t;
  return null;
end $$;

create or replace function public.job_queue_audit_update() returns trigger
language plpgsql security definer set search_path = public, pg_temp as $$
begin
  insert into public.job_events (job_id, from_status, to_status, worker_id, details)
  select n.id, o.status, n.status, coalesce(n.worker_id, o.worker_id),
         jsonb_strip_nulls(jsonb_build_object(
           'retry_count', n.retry_count,
           'previous_worker', case when o.status = 'processing'
                                   and n.worker_id is distinct from o.worker_id
                                   then o.worker_id end,
           'error', case when n.error_details is distinct from o.error_details
                         then n.error_details end))
    from new_rows n
    join old_rows o on o.id = n.id
   where n.status is distinct from o.status
      or (n.status = 'processing' and n.worker_id is distinct from o.worker_id);
  perform pg_notify('genworker_jobs', t.job_type)
     from (select distinct n.job_type from new_rows n join old_rows o on o.id = n.id
            where n.status = 'pending' and o.status <> 'pending') t;
  return null;
end $$;

drop trigger if exists job_queue_after_change on public.job_queue;
drop trigger if exists job_queue_after_status on public.job_queue;
drop trigger if exists job_queue_audit_insert on public.job_queue;
create trigger job_queue_audit_insert after insert on public.job_queue
  referencing new table as new_rows
  for each statement execute function public.job_queue_audit_insert();
drop trigger if exists job_queue_audit_update on public.job_queue;
create trigger job_queue_audit_update after update on public.job_queue
  referencing old table as old_rows new table as new_rows
  for each statement execute function public.job_queue_audit_update();
drop function if exists public.job_queue_after_change();

-- ---------------------------------------------------------------------------
-- Complete several jobs in one call. p_results: a JSON array of
-- {"job_id": "<uuid>", "result": {...}}. Fenced exactly like complete_job (this worker,
-- still processing) and idempotent the same way: returns the ids that are now completed
-- by this worker, including ones a retried call had already completed. An id it does not
-- return was lost (rescued, cancelled or paused) and was left untouched.
create or replace function public.complete_jobs(p_worker_id text, p_results jsonb)
returns setof uuid language plpgsql volatile
set plan_cache_mode = force_generic_plan
set search_path = public, pg_temp as $$
declare
  v_bad text;
  v_ids uuid[];
  v_dup boolean;
begin
  if p_worker_id is null or p_worker_id = '' then
    raise exception using errcode = 'PT400', message = 'complete_jobs: p_worker_id is required';
  end if;
  if jsonb_typeof(p_results) is distinct from 'array' then
    raise exception using errcode = 'PT400',
      message = format('complete_jobs: p_results must be a JSON array, not %s',
                       coalesce(jsonb_typeof(p_results), 'null'));
  end if;
  if jsonb_array_length(p_results) > 1000 then
    raise exception using errcode = 'PT400',
      message = format('complete_jobs: at most 1000 results per call, not %s',
                       jsonb_array_length(p_results));
  end if;
  -- One pass: the first malformed element, the ids, and whether any id repeats.
  select left((array_agg(e::text) filter (where bad))[1], 100),
         array_agg(id) filter (where not bad),
         count(*) filter (where not bad) <> count(distinct id) filter (where not bad)
    into v_bad, v_ids, v_dup
    from (select e, jsonb_typeof(e) is distinct from 'object'
                    or jsonb_typeof(e -> 'job_id') is distinct from 'string'
                    or (e ->> 'job_id') !~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
                    as bad,
                 case when jsonb_typeof(e) = 'object' and jsonb_typeof(e -> 'job_id') = 'string'
                       and (e ->> 'job_id') ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
                      then (e ->> 'job_id')::uuid end as id
            from jsonb_array_elements(p_results) e) x;
  if v_bad is not null then
    raise exception using errcode = 'PT400',
      message = format('complete_jobs: each result must be {"job_id": "<uuid>", "result": ...}; got %s',
                       v_bad);
  end if;
  if v_dup then
    raise exception using errcode = 'PT400', message = 'complete_jobs: a job_id appears twice';
  end if;

  -- id = any(v_ids) keeps both lookups on the primary key whatever the planner knows.
  return query
  with input as (
    select (e ->> 'job_id')::uuid as id,
           coalesce(nullif(e -> 'result', 'null'::jsonb), '{}'::jsonb) as result
      from jsonb_array_elements(p_results) e),
  done as (
    update public.job_queue q
       set status = 'completed', job_result = i.result, completed_at = now(), progress = 100,
           current_step = 'completed', heartbeat_at = now()
      from input i
     where q.id = any (v_ids) and q.id = i.id
       and q.worker_id = p_worker_id and q.status = 'processing'
    returning q.id)
  select d.id from done d
  union
  select q.id from public.job_queue q
   where q.id = any (v_ids) and q.worker_id = p_worker_id and q.status = 'completed';
end $$;

revoke all on function public.job_queue_audit_insert(), public.job_queue_audit_update()
  from public, anon, authenticated, service_role;
revoke all on function public.complete_jobs(text, jsonb) from public, anon, authenticated;
grant execute on function public.complete_jobs(text, jsonb) to service_role;

notify pgrst, 'reload schema';
