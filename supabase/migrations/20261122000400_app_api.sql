-- genworker 4/5: what the app calls with a signed-in user's JWT (role authenticated).
-- SECURITY DEFINER so users never need write access to job_queue or to a
-- chapter's generation fields; each function checks ownership through auth.uid().

-- The shared body: enqueue a chapter_generation job on behalf of p_user.
create or replace function public.genworker_enqueue_chapter(
  p_user uuid, p_chapter_id uuid, p_options jsonb, p_idempotency_key text)
returns uuid language plpgsql volatile security definer set search_path = public, pg_temp as $$
declare
  v_user uuid := p_user;
  ch public.chapters;
  v_job uuid;
  v_active text;
begin
  if v_user is null then
    raise exception using errcode = '42501', message = 'sign in to generate chapters';
  end if;
  if p_options is not null and jsonb_typeof(p_options) <> 'object' then
    raise exception using errcode = 'PT400', message = 'p_options must be a JSON object';
  end if;
  if p_idempotency_key is not null and char_length(p_idempotency_key) not between 1 and 200 then
    raise exception using errcode = 'PT400', message = 'p_idempotency_key must be 1 to 200 characters';
  end if;

  -- Lock the chapter first: concurrent calls for it then run one after the other.
  select * into ch from public.chapters where id = p_chapter_id for update;
  if not found or ch.owner_id <> v_user then
    raise exception using errcode = 'PT404', message = format('chapter %s not found', p_chapter_id);
  end if;

  if p_idempotency_key is not null then
    select id into v_job from public.job_queue
     where user_id = v_user and idempotency_key = p_idempotency_key;
    if found then
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
  select public.genworker_enqueue_chapter(auth.uid(), p_chapter_id, p_options, p_idempotency_key)
$$;

-- Operators (service_role): enqueue a chapter on behalf of its owner.
create or replace function public.admin_enqueue_chapter(
  p_chapter_id uuid, p_options jsonb default '{}'::jsonb, p_idempotency_key text default null)
returns uuid language plpgsql volatile security definer set search_path = public, pg_temp as $$
declare
  v_owner uuid;
begin
  select owner_id into v_owner from public.chapters where id = p_chapter_id;
  if v_owner is null then
    raise exception using errcode = 'PT404', message = format('chapter %s not found', p_chapter_id);
  end if;
  return public.genworker_enqueue_chapter(v_owner, p_chapter_id, p_options, p_idempotency_key);
end $$;

-- Operators (service_role): enqueue any job type (smoke tests, benchmarks, other handlers).
create or replace function public.enqueue_job(
  p_job_type text, p_job_payload jsonb default '{}'::jsonb, p_priority integer default 0,
  p_job_lane text default 'default', p_max_retries integer default 3,
  p_delay_s double precision default 0)
returns uuid language sql volatile set search_path = public, pg_temp as $$
  insert into public.job_queue (job_type, job_payload, priority, job_lane, max_retries, scheduled_at)
  values (p_job_type, coalesce(p_job_payload, '{}'::jsonb), p_priority, p_job_lane, p_max_retries,
          now() + make_interval(secs => p_delay_s))
  returning id
$$;

-- Owner only. A pending or paused job is cancelled at once; a processing one is
-- cancelled here and its worker stops at its next heartbeat. False if already finished.
create or replace function public.cancel_job(p_job_id uuid)
returns boolean language plpgsql volatile security definer set search_path = public, pg_temp as $$
declare
  v_status text;
begin
  select status into v_status from public.job_queue
   where id = p_job_id and user_id = auth.uid() for update;
  if not found then
    raise exception using errcode = 'PT404', message = format('job %s not found', p_job_id);
  end if;
  if v_status not in ('pending', 'processing', 'paused') then
    return false;
  end if;
  update public.job_queue
     set status = 'cancelled', completed_at = now(), current_step = 'cancelled'
   where id = p_job_id;
  return true;
end $$;

-- Owner only. The job keeps its checkpoint; a processing worker stops at its next heartbeat.
create or replace function public.pause_job(p_job_id uuid)
returns boolean language plpgsql volatile security definer set search_path = public, pg_temp as $$
declare
  v_status text;
begin
  select status into v_status from public.job_queue
   where id = p_job_id and user_id = auth.uid() for update;
  if not found then
    raise exception using errcode = 'PT404', message = format('job %s not found', p_job_id);
  end if;
  if v_status not in ('pending', 'processing') then
    return false;
  end if;
  update public.job_queue set status = 'paused', current_step = 'paused' where id = p_job_id;
  return true;
end $$;

-- Owner only. Back to pending without using an attempt.
create or replace function public.resume_job(p_job_id uuid)
returns boolean language plpgsql volatile security definer set search_path = public, pg_temp as $$
declare
  v_status text;
begin
  select status into v_status from public.job_queue
   where id = p_job_id and user_id = auth.uid() for update;
  if not found then
    raise exception using errcode = 'PT404', message = format('job %s not found', p_job_id);
  end if;
  if v_status <> 'paused' then
    return false;
  end if;
  update public.job_queue
     set status = 'pending', worker_id = null, heartbeat_at = null, scheduled_at = now(),
         current_step = 'resumed'
   where id = p_job_id;
  return true;
end $$;

notify pgrst, 'reload schema';
