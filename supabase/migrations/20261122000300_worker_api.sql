-- genworker 3/5: the worker's API. Executable by service_role only (see 5/5).
-- Every write is fenced by (job id, worker id, status = 'processing'): a worker
-- that lost its lease changes nothing and gets false back.
-- Failure has no function: it is the fenced UPDATE documented in README "Database".

-- Claim one job: pending and due, or processing with an expired lease (a rescue,
-- which uses one retry). Stale jobs with no retries left fail here instead.
create or replace function public.claim_next_job_v3(
  worker_id text, job_types text[] default null, job_lanes text[] default null)
returns table (job_id uuid, job_type text, job_payload jsonb, retry_count integer)
language plpgsql volatile
-- A cached generic plan, built before autovacuum has analyzed a freshly filled queue,
-- made each claim ~3x slower in the benchmark; plan every call for its arguments.
set plan_cache_mode = force_custom_plan
set search_path = public, pg_temp as $$
#variable_conflict use_column
declare
  v_worker text := claim_next_job_v3.worker_id;
  v_types  text[] := nullif(claim_next_job_v3.job_types, '{}'::text[]);
  v_lanes  text[] := nullif(claim_next_job_v3.job_lanes, '{}'::text[]);
begin
  if v_worker is null or v_worker = '' then
    raise exception using errcode = 'PT400', message = 'claim_next_job_v3: worker_id is required';
  end if;

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

  -- One statement. Two indexed SKIP LOCKED probes - one expired lease (a rescue) and
  -- the best ready job by priority desc, scheduled_at, created_at - and the higher
  -- priority of the two wins (the rescue on a tie). An OR over both sets would sort the
  -- whole pending set on an unanalyzed table.
  return query
  with stale as (
    select s.id, s.priority, 0 as pick from public.job_queue s
     where s.status = 'processing'
       and s.heartbeat_at < now() - make_interval(secs => s.lease_timeout_s)
       and s.retry_count < s.max_retries
       and (v_types is null or s.job_type = any (v_types))
       and (v_lanes is null or s.job_lane = any (v_lanes))
     limit 1
     for update skip locked),
  ready as (
    select c.id, c.priority, 1 as pick from public.job_queue c
     where c.status = 'pending' and c.scheduled_at <= now()
       and (v_types is null or c.job_type = any (v_types))
       and (v_lanes is null or c.job_lane = any (v_lanes))
     order by c.priority desc, c.scheduled_at, c.created_at
     limit 1
     for update skip locked),
  next_job as (
    select candidate.id from (select * from stale union all select * from ready) candidate
     order by candidate.priority desc, candidate.pick limit 1)
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
         worker_id = v_worker, heartbeat_at = now(), started_at = now(), completed_at = null
    from next_job
   where j.id = next_job.id
  returning j.id, j.job_type, j.job_payload, j.retry_count;
end $$;

-- Step two of the claim: the whole row.
create or replace function public.get_job(p_job_id uuid)
returns setof public.job_queue
language sql stable set search_path = public, pg_temp as $$
  select * from public.job_queue where id = p_job_id
$$;

create or replace function public.update_job_heartbeat(p_job_id uuid, p_worker_id text)
returns boolean language sql volatile set search_path = public, pg_temp as $$
  with beat as (
    update public.job_queue set heartbeat_at = now()
     where id = p_job_id and worker_id = p_worker_id and status = 'processing'
    returning 1)
  select exists (select 1 from beat)
$$;

-- One round trip for all of a worker's in-flight jobs; returns the ids it still holds.
create or replace function public.heartbeat_jobs(p_worker_id text, p_job_ids uuid[])
returns setof uuid language sql volatile set search_path = public, pg_temp as $$
  update public.job_queue set heartbeat_at = now()
   where id = any (p_job_ids) and worker_id = p_worker_id and status = 'processing'
  returning id
$$;

-- Idempotent for the same worker: a retried call whose first attempt committed is true.
create or replace function public.complete_job(p_job_id uuid, p_worker_id text, p_job_result jsonb default '{}'::jsonb)
returns boolean language plpgsql volatile set search_path = public, pg_temp as $$
begin
  update public.job_queue
     set status = 'completed', job_result = coalesce(p_job_result, '{}'::jsonb),
         completed_at = now(), progress = 100, current_step = 'completed', heartbeat_at = now()
   where id = p_job_id and worker_id = p_worker_id and status = 'processing';
  if found then
    return true;
  end if;
  return exists (select 1 from public.job_queue
                  where id = p_job_id and worker_id = p_worker_id and status = 'completed');
end $$;

-- Graceful shutdown: hand the job back without using an attempt. Checkpoints stay.
create or replace function public.release_job(p_job_id uuid, p_worker_id text)
returns boolean language sql volatile set search_path = public, pg_temp as $$
  with released as (
    update public.job_queue
       set status = 'pending', worker_id = null, heartbeat_at = null, scheduled_at = now(),
           current_step = 'released'
     where id = p_job_id and worker_id = p_worker_id and status = 'processing'
    returning 1)
  select exists (select 1 from released)
$$;

-- Start-up recovery for a worker id that is reused (WORKER_ID set by hand).
create or replace function public.release_worker_jobs(p_worker_id text)
returns integer language sql volatile set search_path = public, pg_temp as $$
  with released as (
    update public.job_queue
       set status = 'pending', worker_id = null, heartbeat_at = null, scheduled_at = now(),
           current_step = 'released'
     where worker_id = p_worker_id and status = 'processing'
    returning 1)
  select count(*)::integer from released
$$;

-- ---------------------------------------------------------------------------
-- Chapter writes. Each locks the job row first (FOR SHARE: a concurrent rescue waits,
-- and a rescue that committed first makes the fence fail) and finds the chapter by
-- generation_job_id. The job row itself is rewritten only at milestones (a new step:
-- start, outline, each section, finish), not on every append: every job_queue UPDATE
-- is WAL and a Realtime event, and the heartbeat task already keeps the lease.

create or replace function public.genworker_fence(p_job_id uuid, p_worker_id text, p_progress integer, p_step text)
returns boolean language plpgsql volatile set search_path = public, pg_temp as $$
begin
  perform 1 from public.job_queue
   where id = p_job_id and worker_id = p_worker_id and status = 'processing'
   for share;
  if not found then
    return false;
  end if;
  if p_step is not null then
    update public.job_queue
       set heartbeat_at = now(),
           progress = greatest(progress, least(coalesce(p_progress, progress), 100)),
           current_step = p_step
     where id = p_job_id;
  end if;
  return true;
end $$;

-- Returns the generation context, after cutting any partial section back to the
-- checkpoint; null when the lease is lost. Re-checks that the job's user owns the
-- chapter and its story.
create or replace function public.start_chapter_generation(
  p_job_id uuid, p_worker_id text, p_tail_chars integer default 2000)
returns jsonb language plpgsql volatile set search_path = public, pg_temp as $$
declare
  v_user uuid;
  ch public.chapters;
  st public.stories;
  v_keep integer;
begin
  if not public.genworker_fence(p_job_id, p_worker_id, null, 'starting') then
    return null;
  end if;
  select user_id into v_user from public.job_queue where id = p_job_id;
  select * into ch from public.chapters where generation_job_id = p_job_id for update;
  if not found then
    raise exception using errcode = 'PT404',
      message = format('no chapter is linked to job %s', p_job_id);
  end if;
  select * into st from public.stories where id = ch.story_id;
  if v_user is null or ch.owner_id <> v_user or st.owner_id <> v_user then
    raise exception using errcode = 'PT403',
      message = format('job %s: its user does not own chapter %s and its story', p_job_id, ch.id);
  end if;
  v_keep := case when ch.outline is null then 0
                 else coalesce((ch.generation_state ->> 'content_length')::integer, 0) end;
  update public.chapters
     set content = case when char_length(content) > v_keep then left(content, v_keep) else content end,
         status = 'generating', current_step = 'starting', error_message = null
   where id = ch.id;
  return jsonb_build_object(
    'chapter', jsonb_build_object(
      'id', ch.id, 'number', ch.number, 'title', ch.title, 'outline', ch.outline,
      'generation_state', ch.generation_state, 'content_length', least(v_keep, char_length(ch.content)),
      'content_tail', right(left(ch.content, v_keep), greatest(p_tail_chars, 0)),
      'owner_id', ch.owner_id),
    'story', jsonb_build_object(
      'id', st.id, 'title', st.title, 'premise', st.premise, 'preferences', st.preferences),
    'previous', coalesce((
      select jsonb_agg(jsonb_build_object('number', p.number, 'title', p.title, 'tail', p.tail)
                       order by p.number)
        from (select c.number, c.title, right(c.content, greatest(p_tail_chars, 0)) as tail
                from public.chapters c
               where c.story_id = ch.story_id and c.number < ch.number
               order by c.number desc limit 20) p), '[]'::jsonb));
end $$;

create or replace function public.save_chapter_outline(
  p_job_id uuid, p_worker_id text, p_title text, p_outline jsonb)
returns boolean language plpgsql volatile set search_path = public, pg_temp as $$
begin
  if not public.genworker_fence(p_job_id, p_worker_id, 10, 'outline') then
    return false;
  end if;
  update public.chapters
     set outline = p_outline,
         title = case when title = '' then left(coalesce(p_title, ''), 300) else title end,
         progress = greatest(progress, 10), current_step = 'outline', status = 'generating'
   where generation_job_id = p_job_id;
  return true;
end $$;

-- Append text at p_offset (the content length before the append). Re-sending an
-- append that already landed is a no-op; any other offset is a conflict. Text and
-- progress always travel together, so Realtime subscribers get both. A null
-- p_current_step keeps the current one (the worker sends it only when it changes).
create or replace function public.append_chapter_content(
  p_job_id uuid, p_worker_id text, p_offset integer, p_text text,
  p_progress integer, p_current_step text, p_checkpoint jsonb default null)
returns boolean language plpgsql volatile set search_path = public, pg_temp as $$
declare
  v_id uuid;
  v_len integer;
  v_add integer := char_length(coalesce(p_text, ''));
begin
  if not public.genworker_fence(p_job_id, p_worker_id, p_progress, p_current_step) then
    return false;
  end if;
  select id, char_length(content) into v_id, v_len
    from public.chapters where generation_job_id = p_job_id for update;
  if v_id is null then
    raise exception using errcode = 'PT404', message = format('no chapter is linked to job %s', p_job_id);
  end if;
  if v_len = p_offset then
    update public.chapters
       set content = content || coalesce(p_text, ''),
           progress = greatest(progress, least(p_progress, 100)),
           current_step = coalesce(p_current_step, current_step), status = 'generating',
           generation_state = coalesce(p_checkpoint, generation_state)
     where id = v_id;
  elsif v_add > 0 and v_len = p_offset + v_add
        and right((select content from public.chapters where id = v_id), v_add) = p_text then
    -- Already applied (the first attempt's response was lost): keep it once.
    if p_checkpoint is not null then
      update public.chapters set generation_state = p_checkpoint where id = v_id;
    end if;
  else
    raise exception using errcode = 'PT409',
      message = format('append offset mismatch on chapter %s: content has %s characters, the append expected %s',
                       v_id, v_len, p_offset);
  end if;
  return true;
end $$;

-- Cut content back to p_length: a failed section is retried from its start.
create or replace function public.rewind_chapter_content(p_job_id uuid, p_worker_id text, p_length integer)
returns boolean language plpgsql volatile set search_path = public, pg_temp as $$
declare
  v_len integer;
begin
  if not public.genworker_fence(p_job_id, p_worker_id, null, null) then
    return false;
  end if;
  select char_length(content) into v_len from public.chapters where generation_job_id = p_job_id for update;
  if v_len is null or p_length < 0 or p_length > v_len then
    raise exception using errcode = 'PT409',
      message = format('cannot rewind chapter of job %s to %s characters (it has %s)', p_job_id, p_length, v_len);
  end if;
  update public.chapters set content = left(content, p_length) where generation_job_id = p_job_id;
  return true;
end $$;

-- Returns the chapter's word count, or null when the lease is lost.
create or replace function public.finish_chapter(p_job_id uuid, p_worker_id text)
returns integer language plpgsql volatile set search_path = public, pg_temp as $$
declare
  v_words integer;
begin
  if not public.genworker_fence(p_job_id, p_worker_id, 99, 'finishing') then
    return null;
  end if;
  update public.chapters
     set status = 'completed', progress = 100, current_step = 'completed', error_message = null,
         word_count = case when btrim(content) = '' then 0
                           else coalesce(array_length(regexp_split_to_array(btrim(content), '\s+'), 1), 0) end,
         generation_state = generation_state || jsonb_build_object('finished', true)
   where generation_job_id = p_job_id
  returning word_count into v_words;
  return coalesce(v_words, 0);
end $$;

-- ---------------------------------------------------------------------------
-- Operations.

create or replace function public.queue_stats()
returns jsonb language sql stable set search_path = public, pg_temp as $$
  select jsonb_build_object(
    'by_status', coalesce((select jsonb_object_agg(status, n)
                             from (select status, count(*) as n from public.job_queue group by status) s),
                          '{}'::jsonb),
    'by_type', coalesce((select jsonb_agg(jsonb_build_object('job_type', job_type, 'status', status, 'count', n)
                                          order by job_type, status)
                           from (select job_type, status, count(*) as n
                                   from public.job_queue group by job_type, status) t), '[]'::jsonb),
    'oldest_pending_age_s', (select round(extract(epoch from now() - min(scheduled_at))::numeric, 3)
                               from public.job_queue where status = 'pending' and scheduled_at <= now()),
    'last_hour', (select jsonb_build_object(
                           'completed', count(*),
                           'avg_run_s', round(avg(d)::numeric, 3),
                           'p95_run_s', round((percentile_cont(0.95) within group (order by d))::numeric, 3))
                    from (select extract(epoch from completed_at - started_at) as d
                            from public.job_queue
                           where status = 'completed' and completed_at > now() - interval '1 hour') r),
    'generated_at', now())
$$;

-- A story's chapters at a glance (operators, the demo's progress bars); the text
-- itself only when asked for.
create or replace function public.story_progress(p_story_id uuid, p_with_content boolean default false)
returns table (chapter_id uuid, number integer, title text, status text, progress integer,
               current_step text, word_count integer, content_length integer,
               error_message text, job_id uuid, content text)
language sql stable set search_path = public, pg_temp as $$
  select c.id, c.number, c.title, c.status, c.progress, c.current_step, c.word_count,
         char_length(c.content), c.error_message, c.generation_job_id,
         case when p_with_content then c.content end
    from public.chapters c where c.story_id = p_story_id order by c.number
$$;

-- Retention: delete finished jobs (and their events) older than N days.
create or replace function public.purge_finished_jobs(p_older_than_days integer)
returns integer language plpgsql volatile set search_path = public, pg_temp as $$
declare
  n integer;
begin
  if p_older_than_days is null or p_older_than_days < 0 then
    raise exception using errcode = 'PT400', message = 'p_older_than_days must be >= 0';
  end if;
  delete from public.job_queue
   where status in ('completed', 'failed', 'cancelled')
     and completed_at < now() - make_interval(days => p_older_than_days);
  get diagnostics n = row_count;
  return n;
end $$;

-- Send failed jobs back to the queue after a fix, by id and/or by type and age.
-- Checkpoints are kept, so a chapter resumes where it stopped.
create or replace function public.requeue_failed_jobs(
  p_job_ids uuid[] default null, p_job_type text default null,
  p_failed_after timestamptz default null, p_limit integer default 1000)
returns setof uuid language sql volatile set search_path = public, pg_temp as $$
  update public.job_queue q
     set status = 'pending', retry_count = 0, error_details = null, worker_id = null,
         heartbeat_at = null, completed_at = null, scheduled_at = now(), current_step = 'requeued'
   where q.id in (
     select f.id from public.job_queue f
      where f.status = 'failed'
        and (p_job_ids is null or f.id = any (p_job_ids))
        and (p_job_type is null or f.job_type = p_job_type)
        and (p_failed_after is null or f.completed_at >= p_failed_after)
      order by f.completed_at
      limit greatest(p_limit, 0)
      for update skip locked)
  returning q.id
$$;

notify pgrst, 'reload schema';
