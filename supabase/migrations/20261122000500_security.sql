-- genworker 5/5: privileges, row level security and Realtime.
-- Supabase grants anon/authenticated/service_role everything in public by
-- default, so this file revokes explicitly and grants back only what is needed.

alter table public.job_queue  enable row level security;
alter table public.job_events enable row level security;
alter table public.job_lanes  enable row level security;
alter table public.stories    enable row level security;
alter table public.chapters   enable row level security;

revoke all on public.job_queue, public.job_events, public.job_lanes, public.stories, public.chapters
  from public, anon, authenticated;
grant all on public.job_queue, public.job_lanes, public.stories, public.chapters to service_role;
revoke all on public.job_events from service_role;
grant select on public.job_events to service_role;

-- Users read their own rows; they write stories and a chapter's title/number, never
-- its generation fields (content, progress, status, outline...), which only the
-- worker functions change.
grant select on public.job_queue, public.job_events to authenticated;
grant select, delete on public.stories to authenticated;
grant insert (title, premise, preferences), update (title, premise, preferences)
  on public.stories to authenticated;
grant select, delete on public.chapters to authenticated;
grant insert (story_id, number, title), update (title) on public.chapters to authenticated;

drop policy if exists job_queue_owner_read on public.job_queue;
create policy job_queue_owner_read on public.job_queue for select to authenticated
  using (user_id = (select auth.uid()));

drop policy if exists job_events_owner_read on public.job_events;
create policy job_events_owner_read on public.job_events for select to authenticated
  using (exists (select 1 from public.job_queue j
                  where j.id = job_events.job_id and j.user_id = (select auth.uid())));

drop policy if exists stories_owner_all on public.stories;
create policy stories_owner_all on public.stories for all to authenticated
  using (owner_id = (select auth.uid())) with check (owner_id = (select auth.uid()));

drop policy if exists chapters_owner_read on public.chapters;
create policy chapters_owner_read on public.chapters for select to authenticated
  using (owner_id = (select auth.uid()));
drop policy if exists chapters_owner_insert on public.chapters;
create policy chapters_owner_insert on public.chapters for insert to authenticated
  with check (owner_id = (select auth.uid()));
drop policy if exists chapters_owner_update on public.chapters;
create policy chapters_owner_update on public.chapters for update to authenticated
  using (owner_id = (select auth.uid())) with check (owner_id = (select auth.uid()));
drop policy if exists chapters_owner_delete on public.chapters;
create policy chapters_owner_delete on public.chapters for delete to authenticated
  using (owner_id = (select auth.uid()) and status not in ('queued', 'generating', 'paused'));

-- Functions: the worker's are service_role only, the app's authenticated only,
-- triggers nobody's.
do $$
declare
  f record;
begin
  for f in
    select p.oid::regprocedure as sig, p.proname
      from pg_proc p join pg_namespace n on n.oid = p.pronamespace
     where n.nspname = 'public'
       and p.proname in (
         'claim_next_job_v3', 'get_job', 'update_job_heartbeat', 'heartbeat_jobs', 'complete_job',
         'release_job', 'release_worker_jobs', 'genworker_fence', 'start_chapter_generation',
         'save_chapter_outline', 'append_chapter_content', 'rewind_chapter_content',
         'finish_chapter', 'story_progress', 'queue_stats', 'purge_finished_jobs', 'requeue_failed_jobs',
         'enqueue_chapter_generation', 'cancel_job', 'pause_job', 'resume_job',
         'genworker_enqueue_chapter', 'admin_enqueue_chapter', 'enqueue_job',
         'genworker_touch_updated_at', 'job_queue_before_insert', 'job_queue_check_transition',
         'job_queue_after_change', 'job_events_immutable', 'job_queue_sync_chapter')
  loop
    execute format('revoke all on function %s from public, anon, authenticated, service_role', f.sig);
    if f.proname in ('enqueue_chapter_generation', 'cancel_job', 'pause_job', 'resume_job') then
      execute format('grant execute on function %s to authenticated', f.sig);
    elsif f.proname = 'genworker_enqueue_chapter' then
      null;  -- internal: reached only through the two wrappers
    elsif f.proname not in ('genworker_touch_updated_at', 'job_queue_before_insert',
                            'job_queue_check_transition', 'job_queue_after_change',
                            'job_events_immutable', 'job_queue_sync_chapter') then
      execute format('grant execute on function %s to service_role', f.sig);
    end if;
  end loop;
end $$;

-- Realtime: the UI watches its chapter (and job) rows change.
do $$
declare
  t text;
begin
  if exists (select 1 from pg_publication where pubname = 'supabase_realtime') then
    foreach t in array array['chapters', 'job_queue'] loop
      if not exists (select 1 from pg_publication_tables
                      where pubname = 'supabase_realtime' and schemaname = 'public' and tablename = t) then
        execute format('alter publication supabase_realtime add table public.%I', t);
      end if;
    end loop;
  end if;
end $$;

notify pgrst, 'reload schema';
