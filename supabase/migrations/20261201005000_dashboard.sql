-- genworker dashboard: what `genworker dashboard` reads. Its actions call existing
-- functions: admin_cancel_job / admin_pause_job / admin_resume_job (20261201003000) and
-- requeue_failed_jobs.
-- Operators only (service_role): every function here is revoked from public, anon and
-- authenticated at the end of this file. Payloads, errors and event details come back
-- as (truncated) pretty-printed text, never as nested JSON: a user's payload may be nested
-- thousands of levels deep, which a JSON decoder in the dashboard would choke on.

-- The jobs page lists newest first; without this every page would sort the whole table.
-- created_at never changes, so heartbeats and progress writes stay HOT updates.
create index if not exists job_queue_created_idx on public.job_queue (created_at desc, id desc);

-- Overview: queue_stats() plus counts by lane, the last hour's outcomes and completions per
-- minute, and the workers seen recently. The database knows a worker only through its jobs:
-- one holding jobs now, or one that finished a job in the last p_recent_minutes.
create or replace function public.dashboard_overview(p_recent_minutes integer default 15)
returns jsonb language sql stable set search_path = public, pg_temp as $$
  select public.queue_stats() || jsonb_build_object(
    'by_lane', coalesce((
      select jsonb_agg(jsonb_build_object('job_lane', job_lane, 'status', status, 'count', n)
                       order by job_lane, status)
        from (select job_lane, status, count(*) as n from public.job_queue
               group by job_lane, status) l), '[]'::jsonb),
    'last_hour_outcomes', (
      select jsonb_build_object(
               'completed', count(*) filter (where status = 'completed'),
               'failed', count(*) filter (where status = 'failed'),
               'cancelled', count(*) filter (where status = 'cancelled'))
        from public.job_queue
       where status in ('completed', 'failed', 'cancelled')
         and completed_at > now() - interval '1 hour'),
    -- Index 0 is the minute just gone, 59 the oldest.
    'completed_per_minute', (
      select jsonb_agg(coalesce(c.n, 0) order by m.minute)
        from generate_series(0, 59) as m(minute)
        left join (select floor(extract(epoch from now() - completed_at) / 60)::integer as minute,
                          count(*) as n
                     from public.job_queue
                    where status = 'completed' and completed_at > now() - interval '1 hour'
                    group by 1) c on c.minute = m.minute),
    'recent_minutes', greatest(coalesce(p_recent_minutes, 15), 1),
    'workers', coalesce((
      select jsonb_agg(jsonb_build_object(
               'worker_id', w.worker_id, 'in_flight', w.in_flight, 'stale', w.stale,
               'finished_recently', w.finished, 'last_seen', w.last_seen)
             order by w.last_seen desc)
        from (select u.worker_id, sum(u.in_flight)::integer as in_flight,
                     sum(u.stale)::integer as stale, sum(u.finished)::integer as finished,
                     max(u.last_seen) as last_seen
                from (select worker_id, count(*) as in_flight,
                             count(*) filter (
                               where heartbeat_at < now() - make_interval(secs => lease_timeout_s))
                               as stale,
                             0 as finished, max(coalesce(heartbeat_at, started_at)) as last_seen
                        from public.job_queue
                       where status = 'processing' and worker_id is not null
                       group by worker_id
                      union all
                      select worker_id, 0, 0, count(*), max(completed_at)
                        from public.job_queue
                       where status in ('completed', 'failed', 'cancelled')
                         and completed_at > now() - make_interval(
                               mins => greatest(coalesce(p_recent_minutes, 15), 1))
                         and worker_id is not null
                       group by worker_id) u
               group by u.worker_id
               order by max(u.last_seen) desc
               limit 100) w), '[]'::jsonb))
$$;

-- Jobs page: newest first, filtered, one page at a time (p_limit + 1 rows are read so the
-- page knows whether another follows, without counting the whole table).
create or replace function public.dashboard_jobs(
  p_status text default null, p_job_type text default null, p_user_id uuid default null,
  p_created_from timestamptz default null, p_created_to timestamptz default null,
  p_limit integer default 50, p_offset integer default 0)
returns jsonb language plpgsql stable set search_path = public, pg_temp as $$
declare
  v_result jsonb;
begin
  if p_status is not null
     and p_status not in ('pending', 'processing', 'paused', 'completed', 'failed', 'cancelled') then
    raise exception using errcode = 'PT400', message = format('unknown job status %L', left(p_status, 40));
  end if;
  if p_limit is null or p_limit not between 1 and 500 then
    raise exception using errcode = 'PT400', message = 'p_limit must be between 1 and 500';
  end if;
  if p_offset is null or p_offset not between 0 and 1000000 then
    raise exception using errcode = 'PT400', message = 'p_offset must be between 0 and 1000000';
  end if;
  with page as (
    select j.*, row_number() over (order by j.created_at desc, j.id desc) as rn
      from (select q.id, q.job_type, q.job_lane, q.status, q.priority, q.retry_count,
                   q.max_retries, q.user_id, q.worker_id, q.created_at, q.scheduled_at,
                   q.started_at, q.completed_at, q.progress, left(q.current_step, 200) as current_step,
                   left(q.error_details ->> 'type', 60) as error_type,
                   left(q.error_details ->> 'message', 300) as error_message
              from public.job_queue q
             where (p_status is null or q.status = p_status)
               and (p_job_type is null or q.job_type = p_job_type)
               and (p_user_id is null or q.user_id = p_user_id)
               and (p_created_from is null or q.created_at >= p_created_from)
               and (p_created_to is null or q.created_at < p_created_to)
             order by q.created_at desc, q.id desc
             limit p_limit + 1 offset p_offset) j)
  select jsonb_build_object(
           'jobs', coalesce(jsonb_agg(to_jsonb(page) - 'rn' order by page.rn)
                              filter (where page.rn <= p_limit), '[]'::jsonb),
           'has_more', coalesce(max(page.rn) > p_limit, false),
           'limit', p_limit, 'offset', p_offset)
    into v_result
    from page;
  return v_result;
end $$;

-- Job detail: the row, its last 200 events and its chapter (linked by the payload's
-- chapter_id, or by generation_job_id); null when there is no such job.
create or replace function public.dashboard_job(p_job_id uuid)
returns jsonb language sql stable set search_path = public, pg_temp as $$
  select jsonb_build_object(
    'job', (to_jsonb(j) - 'job_payload' - 'error_details' - 'job_result') || jsonb_build_object(
      'payload_text', left(jsonb_pretty(j.job_payload), 100000),
      'payload_bytes', octet_length(j.job_payload::text),
      'error_type', left(j.error_details ->> 'type', 60),
      'error_details_text', left(jsonb_pretty(j.error_details), 100000),
      'result_text', left(jsonb_pretty(j.job_result), 100000)),
    'events_total', (select count(*) from public.job_events e where e.job_id = j.id),
    'events', coalesce((
      select jsonb_agg(jsonb_build_object(
               'id', e.id, 'at', e.at, 'from_status', e.from_status, 'to_status', e.to_status,
               'worker_id', e.worker_id, 'details_text', left(e.details::text, 4000))
             order by e.at, e.id)
        from (select * from public.job_events ev where ev.job_id = j.id
               order by ev.at desc, ev.id desc limit 200) e), '[]'::jsonb),
    'chapter', (
      select jsonb_build_object(
               'id', c.id, 'story_id', c.story_id, 'number', c.number, 'title', c.title,
               'status', c.status, 'progress', c.progress, 'current_step', c.current_step,
               'error_message', c.error_message, 'word_count', c.word_count,
               'content_length', char_length(c.content), 'content', left(c.content, 200000),
               'outline_text', left(jsonb_pretty(c.outline), 20000),
               'linked', c.generation_job_id is not distinct from j.id, 'updated_at', c.updated_at)
        from public.chapters c
       where c.generation_job_id = j.id
          or c.id = case when j.job_payload ->> 'chapter_id'
                                ~* '^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$'
                         then (j.job_payload ->> 'chapter_id')::uuid end
       order by (c.generation_job_id is not distinct from j.id) desc
       limit 1))
    from public.job_queue j
   where j.id = p_job_id
$$;

-- The live view, polled every second or two: jobs being processed with their chapter's
-- progress. octet_length reads a TOASTed text's size from its pointer without
-- decompressing it, so a poll costs the same whatever the chapters' length.
create or replace function public.dashboard_live()
returns jsonb language sql stable set search_path = public, pg_temp as $$
  select jsonb_build_object(
    'generated_at', now(),
    'jobs', coalesce(jsonb_agg(jsonb_build_object(
              'job_id', l.id, 'job_type', l.job_type, 'worker_id', l.worker_id,
              'attempt', l.retry_count + 1, 'started_at', l.started_at,
              'heartbeat_at', l.heartbeat_at, 'stale', l.stale, 'running_s', l.running_s,
              'progress', l.progress, 'current_step', l.current_step,
              'chapter_id', l.chapter_id, 'chapter_number', l.number, 'title', l.title,
              'text_bytes', l.text_bytes)
            order by l.started_at, l.id), '[]'::jsonb))
    from (select j.id, j.job_type, j.worker_id, j.retry_count, j.started_at, j.heartbeat_at,
                 j.heartbeat_at < now() - make_interval(secs => j.lease_timeout_s) as stale,
                 round(extract(epoch from now() - j.started_at)::numeric, 1) as running_s,
                 greatest(j.progress, coalesce(c.progress, 0)) as progress,
                 left(coalesce(c.current_step, j.current_step), 200) as current_step,
                 c.id as chapter_id, c.number, left(c.title, 300) as title,
                 octet_length(c.content) as text_bytes
            from public.job_queue j
            left join public.chapters c on c.generation_job_id = j.id
           where j.status = 'processing'
           order by j.started_at, j.id
           limit 200) l
$$;

-- Operators only.
revoke all on function public.dashboard_overview(integer) from public, anon, authenticated;
revoke all on function public.dashboard_jobs(text, text, uuid, timestamptz, timestamptz, integer, integer)
  from public, anon, authenticated;
revoke all on function public.dashboard_job(uuid) from public, anon, authenticated;
revoke all on function public.dashboard_live() from public, anon, authenticated;
grant execute on function public.dashboard_overview(integer) to service_role;
grant execute on function public.dashboard_jobs(text, text, uuid, timestamptz, timestamptz, integer, integer)
  to service_role;
grant execute on function public.dashboard_job(uuid) to service_role;
grant execute on function public.dashboard_live() to service_role;

notify pgrst, 'reload schema';
