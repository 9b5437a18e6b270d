-- Operator job controls: what `genworker cancel|pause|resume --job` and
-- `genworker show --chapter` call with the service_role key or DATABASE_URL.
-- The app's cancel_job/pause_job/resume_job are owner-scoped (auth.uid()); an operator
-- acts on any job. Both now go through one body, so the rules live in one place.

-- The one body: 'cancel' (pending, processing or paused), 'pause' (pending or
-- processing: the worker stops at its next heartbeat keeping the checkpoint),
-- 'resume' (paused -> pending without using an attempt). p_user is the owner the job
-- must belong to; NULL only from the operator wrappers below (service_role). False
-- when the job is not in a state the action applies to.
create or replace function public.genworker_control_job(
  p_job_id uuid, p_user uuid, p_action text)
returns boolean language plpgsql volatile security definer set search_path = public, pg_temp as $$
declare
  v_status text;
begin
  if p_action not in ('cancel', 'pause', 'resume') then
    raise exception using errcode = 'PT400', message = format('unknown job action %s', p_action);
  end if;
  select status into v_status from public.job_queue
   where id = p_job_id and (p_user is null or user_id = p_user) for update;
  if not found then
    raise exception using errcode = 'PT404', message = format('job %s not found', p_job_id);
  end if;
  if p_action = 'cancel' then
    if v_status not in ('pending', 'processing', 'paused') then
      return false;
    end if;
    update public.job_queue
       set status = 'cancelled', completed_at = now(), current_step = 'cancelled'
     where id = p_job_id;
  elsif p_action = 'pause' then
    if v_status not in ('pending', 'processing') then
      return false;
    end if;
    update public.job_queue set status = 'paused', current_step = 'paused' where id = p_job_id;
  else
    if v_status <> 'paused' then
      return false;
    end if;
    update public.job_queue
       set status = 'pending', worker_id = null, heartbeat_at = null, scheduled_at = now(),
           current_step = 'resumed'
     where id = p_job_id;
  end if;
  return true;
end $$;

-- The app (authenticated): owner only, a missing user answered as the enqueue does.
create or replace function public.cancel_job(p_job_id uuid)
returns boolean language sql volatile security definer set search_path = public, pg_temp as $$
  select public.genworker_control_job(p_job_id, public.genworker_require_user(), 'cancel')
$$;

create or replace function public.pause_job(p_job_id uuid)
returns boolean language sql volatile security definer set search_path = public, pg_temp as $$
  select public.genworker_control_job(p_job_id, public.genworker_require_user(), 'pause')
$$;

create or replace function public.resume_job(p_job_id uuid)
returns boolean language sql volatile security definer set search_path = public, pg_temp as $$
  select public.genworker_control_job(p_job_id, public.genworker_require_user(), 'resume')
$$;

-- Operators (service_role): any job, whoever owns it (or none: noop jobs).
create or replace function public.admin_cancel_job(p_job_id uuid)
returns boolean language sql volatile security definer set search_path = public, pg_temp as $$
  select public.genworker_control_job(p_job_id, null, 'cancel')
$$;

create or replace function public.admin_pause_job(p_job_id uuid)
returns boolean language sql volatile security definer set search_path = public, pg_temp as $$
  select public.genworker_control_job(p_job_id, null, 'pause')
$$;

create or replace function public.admin_resume_job(p_job_id uuid)
returns boolean language sql volatile security definer set search_path = public, pg_temp as $$
  select public.genworker_control_job(p_job_id, null, 'resume')
$$;

-- Operators (service_role): one chapter's state, and its text from character p_from on
-- (0 = all), so `genworker show --follow` fetches only what was added since its last look.
-- While a chapter is written its text is in chapter_chunks (20261201001000); after, in
-- chapters.content.
-- content_length is the whole text's length; a retried section can make it shrink.
create or replace function public.read_chapter(p_chapter_id uuid, p_from integer default 0)
returns table (chapter_id uuid, story_id uuid, number integer, title text, status text,
               progress integer, current_step text, word_count integer, content_length integer,
               error_message text, job_id uuid, job_status text, content text)
language sql stable set search_path = public, pg_temp as $$
  select c.id, c.story_id, c.number, c.title, c.status, c.progress, c.current_step,
         c.word_count, char_length(t.text), c.error_message, c.generation_job_id, j.status,
         substr(t.text, greatest(coalesce(p_from, 0), 0) + 1)
    from public.chapters c
    cross join lateral (select coalesce(public.genworker_chunks_text(c.id), c.content) as text) t
    left join public.job_queue j on j.id = c.generation_job_id
   where c.id = p_chapter_id
$$;

-- Privileges: the shared body is nobody's (reached only through the wrappers, which run
-- as their owner); the app's controls stay with authenticated; the operator functions
-- are service_role's.
revoke all on function
  public.genworker_control_job(uuid, uuid, text),
  public.cancel_job(uuid), public.pause_job(uuid), public.resume_job(uuid),
  public.admin_cancel_job(uuid), public.admin_pause_job(uuid), public.admin_resume_job(uuid),
  public.read_chapter(uuid, integer)
  from public, anon, authenticated, service_role;
grant execute on function public.cancel_job(uuid), public.pause_job(uuid),
  public.resume_job(uuid) to authenticated;
grant execute on function public.admin_cancel_job(uuid), public.admin_pause_job(uuid),
  public.admin_resume_job(uuid), public.read_chapter(uuid, integer) to service_role;

notify pgrst, 'reload schema';
