-- genworker 2/5: the app's stories (the seed app calls them sequences) and chapters.
-- A chapter's status follows its generation job (job_queue_sync_chapter), so every
-- path that moves a job - the worker, a rescue, cancel/pause by the user, an
-- operator's requeue - leaves the chapter telling the truth.

create table if not exists public.stories (
  id          uuid primary key default gen_random_uuid(),
  owner_id    uuid not null default auth.uid() references auth.users (id) on delete cascade,
  title       text not null check (char_length(title) between 1 and 300),
  premise     text not null default '' check (char_length(premise) <= 20000),
  preferences jsonb not null default '{}'::jsonb check (jsonb_typeof(preferences) = 'object'),
  created_at  timestamptz not null default now(),
  updated_at  timestamptz not null default now(),
  unique (id, owner_id)
);
create index if not exists stories_owner_idx on public.stories (owner_id);

create table if not exists public.chapters (
  id                uuid primary key default gen_random_uuid(),
  story_id          uuid not null,
  owner_id          uuid not null default auth.uid() references auth.users (id) on delete cascade,
  number            integer not null check (number >= 1),
  title             text not null default '' check (char_length(title) <= 300),
  outline           jsonb,
  content           text not null default '',
  progress          integer not null default 0 check (progress between 0 and 100),
  status            text not null default 'draft'
                    check (status in ('draft', 'queued', 'generating', 'paused', 'completed', 'failed', 'cancelled')),
  current_step      text,
  error_message     text,
  word_count        integer not null default 0,
  generation_job_id uuid references public.job_queue (id) on delete set null,
  generation_state  jsonb not null default '{}'::jsonb,
  created_at        timestamptz not null default now(),
  updated_at        timestamptz not null default now(),
  unique (story_id, number),
  -- A chapter belongs to its story's owner, by construction.
  foreign key (story_id, owner_id) references public.stories (id, owner_id) on delete cascade
);
comment on column public.chapters.generation_state is
  'Checkpoint: {sections_done, content_length, usage}. A resumed job cuts content back to content_length.';
create index if not exists chapters_owner_idx on public.chapters (owner_id);
create index if not exists chapters_job_idx on public.chapters (generation_job_id);

drop trigger if exists stories_updated_at on public.stories;
create trigger stories_updated_at before update on public.stories
  for each row execute function public.genworker_touch_updated_at();
drop trigger if exists chapters_updated_at on public.chapters;
create trigger chapters_updated_at before update on public.chapters
  for each row execute function public.genworker_touch_updated_at();

create or replace function public.job_queue_sync_chapter() returns trigger
language plpgsql security definer set search_path = public, pg_temp as $$
begin
  if new.status = 'pending' then
    update public.chapters c
       set status = 'queued',
           current_step = case
             when old.status = 'processing' and new.retry_count > old.retry_count
               then left('retrying: ' || coalesce(new.error_details ->> 'user_message', 'transient error'), 300)
             else 'waiting for a worker' end
     where c.generation_job_id = new.id;
  elsif new.status = 'paused' then
    update public.chapters c set status = 'paused', current_step = 'paused'
     where c.generation_job_id = new.id;
  elsif new.status = 'cancelled' then
    update public.chapters c set status = 'cancelled', current_step = 'cancelled'
     where c.generation_job_id = new.id;
  elsif new.status = 'failed' then
    update public.chapters c
       set status = 'failed', current_step = 'failed',
           error_message = coalesce(new.error_details ->> 'user_message',
                                    new.error_details ->> 'message', 'Generation failed.')
     where c.generation_job_id = new.id;
  elsif new.status = 'completed' then
    update public.chapters c set status = 'completed', progress = 100, current_step = 'completed'
     where c.generation_job_id = new.id and c.status <> 'completed';
  end if;
  return null;
end $$;

drop trigger if exists job_queue_sync_chapter on public.job_queue;
create trigger job_queue_sync_chapter after update of status on public.job_queue
  for each row when (old.status is distinct from new.status)
  execute function public.job_queue_sync_chapter();

notify pgrst, 'reload schema';
