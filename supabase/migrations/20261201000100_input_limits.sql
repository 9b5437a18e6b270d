-- genworker: limits at the door. The app calls the RPCs directly, so the database is
-- where a user's input is bounded: a job payload is always a small, shallow JSON object;
-- chapter options are the documented keys with values in range; story preferences are
-- short scalars; one user has a bounded number of active jobs and enqueues per hour
-- (both set per lane in job_lanes, not in code).

-- ---------------------------------------------------------------------------
-- Settings: per-user caps, per lane.
alter table public.job_lanes
  add column if not exists max_active_per_user integer not null default 50
    check (max_active_per_user between 1 and 1000000),
  add column if not exists max_enqueued_per_user_per_hour integer not null default 300
    check (max_enqueued_per_user_per_hour between 1 and 10000000);
comment on column public.job_lanes.max_active_per_user is
  'At most this many pending, processing or paused jobs per user in this lane (PT429 beyond).';
comment on column public.job_lanes.max_enqueued_per_user_per_hour is
  'At most this many jobs enqueued per user per rolling hour in this lane (PT429 beyond).';

-- The cap counts a user's active jobs: an index over exactly those rows.
create index if not exists job_queue_user_active_idx on public.job_queue (user_id, job_lane)
  where status in ('pending', 'processing', 'paused') and user_id is not null;

-- ---------------------------------------------------------------------------
-- Depth of a JSON document (a scalar is 0, {} or [] is 1), counted no further than
-- p_limit + 1 so a hostile document costs at most that many levels of work.
create or replace function public.genworker_jsonb_depth(p_doc jsonb, p_limit integer)
returns integer language sql immutable parallel safe set search_path = public, pg_temp as $$
  with recursive walk(v, depth) as (
    select p_doc, 1 where jsonb_typeof(p_doc) in ('object', 'array')
    union all
    select c.v, w.depth + 1
      from walk w
      cross join lateral (
        select e.value as v from jsonb_each(case when jsonb_typeof(w.v) = 'object' then w.v end) e
        union all
        select a.value from jsonb_array_elements(case when jsonb_typeof(w.v) = 'array' then w.v end) a
      ) c
     where w.depth <= p_limit and jsonb_typeof(c.v) in ('object', 'array'))
  select coalesce(max(depth), 0) from walk
$$;

-- Every job_queue payload, on every path (app RPCs, operators, a direct insert): an
-- object of at most 64 KiB and 32 levels. The worker's JSON decoders (Python's stops
-- near 1,000 levels) can therefore always read what a claim hands out.
create or replace function public.job_queue_check_payload() returns trigger
language plpgsql security definer set search_path = public, pg_temp as $$
declare
  v_bytes integer;
begin
  if jsonb_typeof(new.job_payload) is distinct from 'object' then
    raise exception using errcode = 'PT400',
      message = format('job_payload must be a JSON object, not %s',
                       coalesce(jsonb_typeof(new.job_payload), 'null'));
  end if;
  v_bytes := octet_length(new.job_payload::text);
  if v_bytes > 65536 then
    raise exception using errcode = 'PT400',
      message = format('job_payload is too large: %s bytes (at most 65536)', v_bytes);
  end if;
  if v_bytes > 64 and public.genworker_jsonb_depth(new.job_payload, 32) > 32 then
    raise exception using errcode = 'PT400',
      message = 'job_payload is nested too deeply (at most 32 levels)';
  end if;
  return new;
end $$;

drop trigger if exists job_queue_check_payload on public.job_queue;
create trigger job_queue_check_payload before insert or update of job_payload on public.job_queue
  for each row execute function public.job_queue_check_payload();

-- One user's share of a lane: active jobs and enqueues per hour, checked under a
-- per-user transaction lock so concurrent enqueues cannot both squeeze past the cap.
create or replace function public.job_queue_check_user_caps() returns trigger
language plpgsql security definer set search_path = public, pg_temp as $$
declare
  v_lane public.job_lanes;
  v_count integer;
begin
  if new.user_id is null then
    return new;
  end if;
  perform pg_advisory_xact_lock(hashtextextended('genworker:user:' || new.user_id::text, 0));
  select * into v_lane from public.job_lanes where lane = new.job_lane;
  if not found then
    return new;
  end if;
  select count(*) into v_count from (
    select 1 from public.job_queue
     where user_id = new.user_id and job_lane = new.job_lane
       and status in ('pending', 'processing', 'paused')
     limit v_lane.max_active_per_user) active;
  if v_count >= v_lane.max_active_per_user then
    raise exception using errcode = 'PT429',
      message = format('too many active jobs: %s are pending, processing or paused (at most %s)',
                       v_count, v_lane.max_active_per_user),
      hint = 'wait for one to finish, or cancel one';
  end if;
  select count(*) into v_count from (
    select 1 from public.job_queue
     where user_id = new.user_id and job_lane = new.job_lane
       and created_at > now() - interval '1 hour'
     limit v_lane.max_enqueued_per_user_per_hour) recent;
  if v_count >= v_lane.max_enqueued_per_user_per_hour then
    raise exception using errcode = 'PT429',
      message = format('too many jobs enqueued in the last hour (at most %s)',
                       v_lane.max_enqueued_per_user_per_hour),
      hint = 'try again later';
  end if;
  return new;
end $$;

drop trigger if exists job_queue_check_user_caps on public.job_queue;
create trigger job_queue_check_user_caps before insert on public.job_queue
  for each row execute function public.job_queue_check_user_caps();

-- Rows stored before these checks existed and that would fail them end now, as the
-- worker would end them: failed, bad_payload, through the allowed transitions.
do $$
declare
  v_ids uuid[];
begin
  select array_agg(id) into v_ids from public.job_queue
   where status in ('pending', 'processing', 'paused')
     and (jsonb_typeof(job_payload) <> 'object' or octet_length(job_payload::text) > 65536
          or public.genworker_jsonb_depth(job_payload, 32) > 32);
  if v_ids is null then
    return;
  end if;
  update public.job_queue set status = 'pending' where id = any (v_ids) and status = 'paused';
  update public.job_queue set status = 'processing', worker_id = 'migration:input_limits'
   where id = any (v_ids) and status = 'pending';
  update public.job_queue
     set status = 'failed',
         error_details = jsonb_build_object(
           'type', 'bad_payload', 'retryable', false, 'will_retry', false,
           'message', 'job_payload is not a JSON object of at most 64 KiB and 32 levels',
           'user_message', 'The generation request was invalid and was not run.',
           'attempt', retry_count + 1, 'worker_id', 'migration:input_limits', 'at', now())
   where id = any (v_ids);
end $$;

-- ---------------------------------------------------------------------------
-- Chapter options: the documented keys only, scalar values within their ranges, and a
-- bounded size. The worker validates again (payload.py); these are the same limits.
create or replace function public.genworker_check_chapter_options(p_options jsonb)
returns void language plpgsql immutable set search_path = public, pg_temp as $$
declare
  k text;
  v jsonb;
  v_text text;
  v_limit integer;
begin
  if p_options is null then
    return;
  end if;
  if jsonb_typeof(p_options) <> 'object' then
    raise exception using errcode = 'PT400', message = 'p_options must be a JSON object';
  end if;
  if octet_length(p_options::text) > 8192 then
    raise exception using errcode = 'PT400',
      message = format('p_options is too large: %s bytes (at most 8192)', octet_length(p_options::text));
  end if;
  for k, v in select key, value from jsonb_each(p_options) loop
    if k not in ('target_words', 'sections', 'tense', 'genre', 'tone', 'audience',
                 'point_of_view', 'model', 'instructions') then
      raise exception using errcode = 'PT400',
        message = format('p_options has an unknown key %s', left(quote_literal(k), 60)),
        hint = 'allowed: target_words, sections, genre, tone, point_of_view, tense, audience, '
               'instructions, model';
    end if;
    continue when jsonb_typeof(v) = 'null';
    v_text := v #>> '{}';
    case k
      when 'target_words', 'sections' then
        if jsonb_typeof(v) <> 'number' or v_text !~ '^[0-9]{1,6}$'
           or v_text::integer not between (case k when 'sections' then 2 else 200 end)
                                      and (case k when 'sections' then 12 else 8000 end) then
          raise exception using errcode = 'PT400',
            message = format('p_options.%s must be a whole number from %s to %s', k,
                             case k when 'sections' then 2 else 200 end,
                             case k when 'sections' then 12 else 8000 end);
        end if;
      when 'tense' then
        if jsonb_typeof(v) <> 'string' or v_text not in ('past', 'present') then
          raise exception using errcode = 'PT400',
            message = 'p_options.tense must be "past" or "present"';
        end if;
      when 'genre', 'tone', 'audience', 'point_of_view', 'model', 'instructions' then
        v_limit := case k when 'point_of_view' then 60 when 'instructions' then 2000 else 100 end;
        if jsonb_typeof(v) <> 'string' or char_length(v_text) > v_limit then
          raise exception using errcode = 'PT400',
            message = format('p_options.%s must be text of at most %s characters', k, v_limit);
        end if;
    end case;  -- every key reaching here is one of the documented ones
  end loop;
end $$;

-- Story preferences: at most 32 keys named like identifiers, each a short scalar; the
-- prompt builder applies the same caps to what it reads from here.
create or replace function public.genworker_preferences_ok(p jsonb)
returns boolean language sql immutable parallel safe set search_path = public, pg_temp as $$
  select jsonb_typeof(p) = 'object'
     and octet_length(p::text) <= 4096
     and (select count(*) from jsonb_object_keys(p)) <= 32
     and not exists (
       select 1 from jsonb_each(p) e
        where e.key !~ '^[a-z][a-z0-9_]{0,39}$'
           or jsonb_typeof(e.value) not in ('string', 'number', 'boolean', 'null')
           or (jsonb_typeof(e.value) = 'string' and char_length(e.value #>> '{}') >
                 case e.key when 'pov' then 60 when 'tense' then 20
                            when 'genre' then 100 when 'tone' then 100 when 'audience' then 100
                            else 200 end))
$$;

alter table public.stories drop constraint if exists stories_preferences_bounded;
alter table public.stories add constraint stories_preferences_bounded
  check (public.genworker_preferences_ok(preferences)) not valid;
-- Existing rows are checked too where they pass; a project with older, larger
-- preferences keeps them (new writes are checked) and gets a notice instead of a failure.
do $$
begin
  alter table public.stories validate constraint stories_preferences_bounded;
exception when check_violation then
  raise notice 'stories_preferences_bounded left NOT VALID: some stored preferences exceed it';
end $$;

-- ---------------------------------------------------------------------------
-- The app's enqueue: named arguments, the options checked, idempotency keys that never
-- surface a raw constraint violation, and one answer for a call without a signed-in user.
create or replace function public.genworker_require_user() returns uuid
language plpgsql stable set search_path = public, pg_temp as $$
declare
  v_user uuid := auth.uid();
begin
  if v_user is null then
    raise exception using errcode = '42501',
      message = 'sign in first: this call needs a signed-in user (a JWT with a sub claim)';
  end if;
  return v_user;
end $$;

create or replace function public.genworker_enqueue_chapter(
  p_user uuid, p_chapter_id uuid, p_options jsonb, p_idempotency_key text)
returns uuid language plpgsql volatile security definer set search_path = public, pg_temp as $$
declare
  v_user uuid := p_user;
  ch public.chapters;
  v_job uuid;
  v_job_chapter uuid;
  v_active text;
begin
  if v_user is null then
    raise exception using errcode = '42501',
      message = 'sign in first: this call needs a signed-in user (a JWT with a sub claim)';
  end if;
  if p_chapter_id is null then
    raise exception using errcode = 'PT400', message = 'p_chapter_id is required';
  end if;
  perform public.genworker_check_chapter_options(p_options);
  if p_idempotency_key is not null and char_length(p_idempotency_key) not between 1 and 200 then
    raise exception using errcode = 'PT400', message = 'p_idempotency_key must be 1 to 200 characters';
  end if;

  -- One user's enqueues run one at a time (the caps and the idempotency lookup need it);
  -- then the chapter is locked, so concurrent calls for it also run one after the other.
  perform pg_advisory_xact_lock(hashtextextended('genworker:user:' || v_user::text, 0));
  select * into ch from public.chapters where id = p_chapter_id for update;
  if not found or ch.owner_id <> v_user then
    raise exception using errcode = 'PT404', message = format('chapter %s not found', p_chapter_id);
  end if;

  if p_idempotency_key is not null then
    select id, (job_payload ->> 'chapter_id')::uuid into v_job, v_job_chapter
      from public.job_queue where user_id = v_user and idempotency_key = p_idempotency_key;
    if found then
      if v_job_chapter is distinct from ch.id then
        raise exception using errcode = 'PT409',
          message = 'p_idempotency_key was already used for another chapter',
          hint = 'use a new key for each chapter generation';
      end if;
      return v_job;
    end if;
  end if;

  select status into v_active from public.job_queue
   where id = ch.generation_job_id and status in ('pending', 'processing', 'paused');
  if found then
    raise exception using errcode = 'PT409',
      message = format('chapter %s already has an active generation job %s (%s)',
                       ch.id, ch.generation_job_id, v_active),
      hint = 'cancel_job it first, or wait for it to finish';
  end if;

  insert into public.job_queue (job_type, job_payload, user_id, idempotency_key)
  values ('chapter_generation',
          jsonb_build_object('chapter_id', ch.id, 'story_id', ch.story_id, 'user_id', v_user,
                             'options', coalesce(p_options, '{}'::jsonb)),
          v_user, p_idempotency_key)
  returning id into v_job;

  update public.chapters
     set status = 'queued', generation_job_id = v_job, progress = 0, current_step = 'queued',
         error_message = null, content = '', outline = null, word_count = 0,
         generation_state = '{}'::jsonb
   where id = ch.id;
  return v_job;
end $$;

create or replace function public.enqueue_chapter_generation(
  p_chapter_id uuid, p_options jsonb default '{}'::jsonb, p_idempotency_key text default null)
returns uuid language sql volatile security definer set search_path = public, pg_temp as $$
  select public.genworker_enqueue_chapter(public.genworker_require_user(), p_chapter_id,
                                          p_options, p_idempotency_key)
$$;

create or replace function public.admin_enqueue_chapter(
  p_chapter_id uuid, p_options jsonb default '{}'::jsonb, p_idempotency_key text default null)
returns uuid language plpgsql volatile security definer set search_path = public, pg_temp as $$
declare
  v_owner uuid;
begin
  if p_chapter_id is null then
    raise exception using errcode = 'PT400', message = 'p_chapter_id is required';
  end if;
  select owner_id into v_owner from public.chapters where id = p_chapter_id;
  if v_owner is null then
    raise exception using errcode = 'PT404', message = format('chapter %s not found', p_chapter_id);
  end if;
  return public.genworker_enqueue_chapter(v_owner, p_chapter_id, p_options, p_idempotency_key);
end $$;

create or replace function public.enqueue_job(
  p_job_type text, p_job_payload jsonb default '{}'::jsonb, p_priority integer default 0,
  p_job_lane text default 'default', p_max_retries integer default 3,
  p_delay_s double precision default 0)
returns uuid language plpgsql volatile set search_path = public, pg_temp as $$
declare
  v_job uuid;
begin
  if p_job_type is null or p_job_type = '' then
    raise exception using errcode = 'PT400', message = 'p_job_type is required';
  end if;
  if p_delay_s is null or p_delay_s = 'NaN'::float8 or p_delay_s not between 0 and 31536000 then
    raise exception using errcode = 'PT400', message = 'p_delay_s must be from 0 to 31536000 seconds';
  end if;
  insert into public.job_queue (job_type, job_payload, priority, job_lane, max_retries, scheduled_at)
  values (p_job_type, coalesce(p_job_payload, '{}'::jsonb), coalesce(p_priority, 0),
          coalesce(p_job_lane, 'default'), coalesce(p_max_retries, 3),
          now() + make_interval(secs => p_delay_s))
  returning id into v_job;
  return v_job;
end $$;

-- cancel_job, pause_job and resume_job answer a missing user the same way through
-- genworker_control_job (20261201003000_operator_job_controls.sql).

-- ---------------------------------------------------------------------------
-- Deleting a chapter (directly, or with its story or user) cancels its active generation
-- with a stated reason, instead of leaving the worker to fail on a missing row.
create or replace function public.chapters_cancel_generation_on_delete() returns trigger
language plpgsql security definer set search_path = public, pg_temp as $$
begin
  if old.generation_job_id is not null then
    update public.job_queue
       set status = 'cancelled', current_step = 'cancelled: chapter deleted',
           error_details = jsonb_build_object(
             'type', 'cancelled', 'retryable', false, 'will_retry', false,
             'message', 'the chapter was deleted while it was being generated',
             'user_message', 'Generation was cancelled because the chapter was deleted.',
             'at', now())
     where id = old.generation_job_id and status in ('pending', 'processing', 'paused');
  end if;
  return null;
end $$;

drop trigger if exists chapters_cancel_generation_on_delete on public.chapters;
create trigger chapters_cancel_generation_on_delete after delete on public.chapters
  for each row execute function public.chapters_cancel_generation_on_delete();

-- ---------------------------------------------------------------------------
-- Closed by default. Supabase grants anon and authenticated everything new in public;
-- from here on, objects this role creates there get nothing until a migration grants
-- it, and functions no longer get EXECUTE for PUBLIC anywhere.
alter default privileges in schema public revoke all on tables from anon, authenticated;
alter default privileges in schema public revoke all on sequences from anon, authenticated;
alter default privileges in schema public revoke all on functions from anon, authenticated;
alter default privileges revoke execute on functions from public;

-- No API role needs a sequence: ids are uuids, job_events ids come from its trigger.
revoke all on all sequences in schema public from public, anon, authenticated, service_role;

-- The functions of this migration: app RPCs for signed-in users, operator RPCs for
-- service_role, helpers and triggers for nobody.
revoke all on function
  public.genworker_jsonb_depth(jsonb, integer), public.job_queue_check_payload(),
  public.job_queue_check_user_caps(), public.genworker_check_chapter_options(jsonb),
  public.genworker_preferences_ok(jsonb), public.genworker_require_user(),
  public.genworker_enqueue_chapter(uuid, uuid, jsonb, text),
  public.enqueue_chapter_generation(uuid, jsonb, text),
  public.admin_enqueue_chapter(uuid, jsonb, text),
  public.enqueue_job(text, jsonb, integer, text, integer, double precision),
  public.chapters_cancel_generation_on_delete()
  from public, anon, authenticated, service_role;
grant execute on function public.enqueue_chapter_generation(uuid, jsonb, text) to authenticated;
grant execute on function public.admin_enqueue_chapter(uuid, jsonb, text),
  public.enqueue_job(text, jsonb, integer, text, integer, double precision) to service_role;
-- The stories check constraint runs as the writing user.
grant execute on function public.genworker_preferences_ok(jsonb) to authenticated, service_role;

notify pgrst, 'reload schema';
