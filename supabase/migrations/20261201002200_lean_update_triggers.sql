-- genworker: fewer trigger calls per job_queue row change, same effects.
--
-- A claim or a completion of 25 jobs used to run three row triggers per job (updated_at,
-- the transition check, the chapter sync). Now one BEFORE row trigger stamps updated_at
-- and checks the transition, and the chapter sync runs once per statement over its
-- transition tables. The allowed moves, the bookkeeping and the chapter states written
-- are exactly those of job_queue_check_transition and job_queue_sync_chapter.

create or replace function public.job_queue_before_update() returns trigger
language plpgsql set search_path = public, pg_temp as $$
declare
  ok boolean;
begin
  new.updated_at := now();
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
  if new.status in ('completed', 'failed', 'cancelled') then
    new.completed_at := now();
  elsif new.status in ('pending', 'paused') then
    new.worker_id := null;
    new.heartbeat_at := null;
    new.completed_at := null;
  end if;
  return new;
end $$;

create or replace function public.job_queue_sync_chapters() returns trigger
language plpgsql security definer set search_path = public, pg_temp as $$
declare
  ch public.chapters;
begin
  -- A chapter follows its job; when generation stops short of completion (back to the
  -- queue, paused, cancelled, failed) its streamed text becomes chapters.content
  -- (20261201001000), and readers on the private topic get the new status.
  for ch in
    update public.chapters c
       set content = case when n.status = 'completed' then c.content
                          else coalesce(public.genworker_chunks_text(c.id), c.content) end,
           status = case n.status when 'pending' then 'queued' else n.status end,
           current_step = case
             when n.status <> 'pending' then n.status
             when o.status = 'processing' and n.retry_count > o.retry_count
               then left('retrying: ' || coalesce(n.error_details ->> 'user_message', 'transient error'), 300)
             else 'waiting for a worker' end,
           progress = case when n.status = 'completed' then 100 else c.progress end,
           error_message = case when n.status = 'failed'
                                then coalesce(n.error_details ->> 'user_message',
                                              n.error_details ->> 'message', 'Generation failed.')
                                else c.error_message end
      from new_rows n
      join old_rows o on o.id = n.id
     where c.generation_job_id = n.id
       and n.status is distinct from o.status
       and n.status in ('pending', 'paused', 'cancelled', 'failed', 'completed')
       and (n.status <> 'completed' or c.status <> 'completed')
    returning c.*
  loop
    perform public.genworker_broadcast_status(ch, char_length(ch.content));
  end loop;
  return null;
end $$;

drop trigger if exists job_queue_updated_at on public.job_queue;
drop trigger if exists job_queue_check_transition on public.job_queue;
drop trigger if exists job_queue_before_update on public.job_queue;
create trigger job_queue_before_update before update on public.job_queue
  for each row execute function public.job_queue_before_update();
drop function if exists public.job_queue_check_transition();

drop trigger if exists job_queue_sync_chapter on public.job_queue;
drop trigger if exists job_queue_sync_chapters on public.job_queue;
create trigger job_queue_sync_chapters after update on public.job_queue
  referencing old table as old_rows new table as new_rows
  for each statement execute function public.job_queue_sync_chapters();
drop function if exists public.job_queue_sync_chapter();

revoke all on function public.job_queue_before_update(), public.job_queue_sync_chapters()
  from public, anon, authenticated, service_role;

notify pgrst, 'reload schema';
