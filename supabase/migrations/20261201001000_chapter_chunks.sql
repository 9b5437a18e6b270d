-- genworker: streamed text as append-only deltas, delivered by Broadcast from the database.
--
-- Before this migration every append rewrote the whole chapters.content value, so the
-- WAL and every Postgres Changes subscriber paid for all text so far on every write
-- (cost growing with the square of the chapter). Now:
--   * each append INSERTs one row into chapter_chunks (seq = character offset) and sends
--     that delta with realtime.send on the private topic 'chapter:<id>';
--   * chapters is written only at milestones (start, outline, a new step, a section
--     checkpoint, finish, and the job's status changes), and chapters.content is
--     materialised from the chunks when generation stops (finish, pause, cancel, failure,
--     retry) - so Postgres Changes on chapters carries the full text once, at the end;
--   * get_chapter_text(chapter) returns the text so far for a reader joining mid-stream.
-- The function signatures the worker calls are unchanged. Where the realtime schema is
-- absent (plain PostgreSQL) nothing is sent; everything else works the same.

create table if not exists public.chapter_chunks (
  chapter_id uuid not null references public.chapters (id) on delete cascade,
  seq        integer not null check (seq >= 0),
  text       text not null check (text <> ''),
  primary key (chapter_id, seq)
);
comment on table public.chapter_chunks is
  'Append-only streamed text: one row per append, seq = character offset of its first character. '
  'Written only by the worker functions; rows past a rewind point are deleted.';

-- A chapter generating when this migration lands keeps its text: it becomes its first chunk.
insert into public.chapter_chunks (chapter_id, seq, text)
select c.id, 0, c.content from public.chapters c
 where c.content <> '' and c.status in ('queued', 'generating', 'paused', 'failed')
   and not exists (select 1 from public.chapter_chunks k where k.chapter_id = c.id);

-- ---------------------------------------------------------------------------
-- Internal helpers (service_role: the worker's functions run as their caller).

-- Characters the chunks hold: the end of the last one (one backwards index probe).
create or replace function public.genworker_chunks_length(p_chapter_id uuid)
returns integer language sql stable set search_path = public, pg_temp as $$
  select coalesce((select k.seq + char_length(k.text) from public.chapter_chunks k
                    where k.chapter_id = p_chapter_id order by k.seq desc limit 1), 0)
$$;

-- The streamed text so far, or null when the chapter has no chunks.
create or replace function public.genworker_chunks_text(p_chapter_id uuid)
returns text language sql stable set search_path = public, pg_temp as $$
  select string_agg(k.text, '' order by k.seq) from public.chapter_chunks k
   where k.chapter_id = p_chapter_id
$$;

-- Sends one Broadcast message on the chapter's private topic, when Realtime is installed.
-- realtime.send never raises (it turns every error into a WARNING), so a delivery
-- problem can never undo a write. The existence check is one catalog cache lookup.
create or replace function public.genworker_broadcast(p_chapter_id uuid, p_event text, p_payload jsonb)
returns void language plpgsql volatile set search_path = public, pg_temp as $$
begin
  if to_regprocedure('realtime.send(jsonb,text,text,boolean)') is not null then
    perform realtime.send(p_payload, p_event, 'chapter:' || p_chapter_id::text, true);
  end if;
end $$;

-- Cut the streamed text back to p_length: chunks past it are deleted (one straddling
-- chunk is shortened), content is cut too if it was longer (it is always a prefix of
-- the streamed text), and readers get a 'rewind' event. Returns whether anything was cut.
create or replace function public.genworker_cut_chapter(p_chapter_id uuid, p_length integer)
returns boolean language plpgsql volatile set search_path = public, pg_temp as $$
declare
  k public.chapter_chunks;
begin
  if public.genworker_chunks_length(p_chapter_id) <= p_length then
    return false;
  end if;
  delete from public.chapter_chunks where chapter_id = p_chapter_id and seq >= p_length;
  delete from public.chapter_chunks
   where chapter_id = p_chapter_id and seq < p_length and seq + char_length(text) > p_length
  returning * into k;
  if found then
    insert into public.chapter_chunks (chapter_id, seq, text)
    values (p_chapter_id, k.seq, left(k.text, p_length - k.seq));
  end if;
  update public.chapters set content = left(content, p_length)
   where id = p_chapter_id and char_length(content) > p_length;
  perform public.genworker_broadcast(p_chapter_id, 'rewind', jsonb_build_object('length', p_length));
  return true;
end $$;

-- Status events for Broadcast subscribers, so a UI on Broadcast alone sees every state.
create or replace function public.genworker_broadcast_status(c public.chapters, p_length integer)
returns void language sql volatile set search_path = public, pg_temp as $$
  select public.genworker_broadcast(c.id, 'status', jsonb_strip_nulls(jsonb_build_object(
    'status', c.status, 'progress', c.progress, 'step', c.current_step, 'length', p_length,
    'error_message', c.error_message)))
$$;

-- ---------------------------------------------------------------------------
-- The worker's chapter writes, same signatures and fencing as before.

create or replace function public.start_chapter_generation(
  p_job_id uuid, p_worker_id text, p_tail_chars integer default 2000)
returns jsonb language plpgsql volatile set search_path = public, pg_temp as $$
declare
  v_user uuid;
  ch public.chapters;
  st public.stories;
  v_keep integer;
  v_text text;
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
  -- A partial section of an earlier attempt is cut back to the checkpoint.
  v_keep := case when ch.outline is null then 0
                 else coalesce((ch.generation_state ->> 'content_length')::integer, 0) end;
  perform public.genworker_cut_chapter(ch.id, v_keep);
  v_text := coalesce(public.genworker_chunks_text(ch.id), '');
  update public.chapters
     set status = 'generating', current_step = 'starting', error_message = null
   where id = ch.id
  returning * into ch;
  perform public.genworker_broadcast_status(ch, char_length(v_text));
  return jsonb_build_object(
    'chapter', jsonb_build_object(
      'id', ch.id, 'number', ch.number, 'title', ch.title, 'outline', ch.outline,
      'generation_state', ch.generation_state, 'content_length', char_length(v_text),
      'content_tail', right(v_text, greatest(p_tail_chars, 0)),
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
declare
  ch public.chapters;
begin
  if not public.genworker_fence(p_job_id, p_worker_id, 10, 'outline') then
    return false;
  end if;
  update public.chapters
     set outline = p_outline,
         title = case when title = '' then left(coalesce(p_title, ''), 300) else title end,
         progress = greatest(progress, 10), current_step = 'outline', status = 'generating'
   where generation_job_id = p_job_id
  returning * into ch;
  if found then
    perform public.genworker_broadcast_status(ch, public.genworker_chunks_length(ch.id));
  end if;
  return true;
end $$;

-- Append p_text at p_offset (the streamed length before it): one INSERT, never a rewrite.
-- Re-sending an append that already landed is a no-op; any other offset is PT409.
-- Every append is broadcast as a 'delta'; the chapters row is written only at
-- milestones (a new step, or a checkpoint), so Postgres Changes on chapters is not
-- one event per append. A null p_current_step keeps the current step.
create or replace function public.append_chapter_content(
  p_job_id uuid, p_worker_id text, p_offset integer, p_text text,
  p_progress integer, p_current_step text, p_checkpoint jsonb default null)
returns boolean language plpgsql volatile set search_path = public, pg_temp as $$
declare
  v_id uuid;
  v_len integer;
  v_text text := coalesce(p_text, '');
  v_progress integer := least(greatest(coalesce(p_progress, 0), 0), 100);
  v_inserted boolean := false;
begin
  if not public.genworker_fence(p_job_id, p_worker_id, p_progress, p_current_step) then
    return false;
  end if;
  select id into v_id from public.chapters where generation_job_id = p_job_id;
  if v_id is null then
    raise exception using errcode = 'PT404', message = format('no chapter is linked to job %s', p_job_id);
  end if;
  v_len := public.genworker_chunks_length(v_id);
  if v_len = p_offset then
    if v_text <> '' then
      insert into public.chapter_chunks (chapter_id, seq, text) values (v_id, p_offset, v_text)
      on conflict (chapter_id, seq) do nothing;
      v_inserted := found;
      if not v_inserted and not exists (
          select 1 from public.chapter_chunks
           where chapter_id = v_id and seq = p_offset and text = v_text) then
        raise exception using errcode = 'PT409',
          message = format('append offset mismatch on chapter %s: another append landed at %s',
                           v_id, p_offset);
      end if;
    end if;
    if v_inserted or (v_text = '' and p_current_step is not null) then
      perform public.genworker_broadcast(v_id, 'delta', jsonb_strip_nulls(jsonb_build_object(
        'offset', p_offset, 'text', v_text, 'progress', v_progress, 'step', p_current_step)));
    end if;
    if p_current_step is not null or p_checkpoint is not null then
      update public.chapters
         set progress = greatest(progress, v_progress),
             current_step = coalesce(p_current_step, current_step), status = 'generating',
             generation_state = coalesce(p_checkpoint, generation_state)
       where id = v_id;
    end if;
  elsif v_text <> '' and v_len = p_offset + char_length(v_text) and exists (
      select 1 from public.chapter_chunks
       where chapter_id = v_id and seq = p_offset and text = v_text) then
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

-- Cut the text back to p_length: a failed section is retried from its start.
create or replace function public.rewind_chapter_content(p_job_id uuid, p_worker_id text, p_length integer)
returns boolean language plpgsql volatile set search_path = public, pg_temp as $$
declare
  v_id uuid;
  v_len integer;
begin
  if not public.genworker_fence(p_job_id, p_worker_id, null, null) then
    return false;
  end if;
  select id into v_id from public.chapters where generation_job_id = p_job_id;
  v_len := case when v_id is not null then public.genworker_chunks_length(v_id) end;
  if v_len is null or p_length is null or p_length < 0 or p_length > v_len then
    raise exception using errcode = 'PT409',
      message = format('cannot rewind chapter of job %s to %s characters (it has %s)', p_job_id, p_length, v_len);
  end if;
  perform public.genworker_cut_chapter(v_id, p_length);
  return true;
end $$;

-- Materialise chapters.content from the chunks (the full text reaches Postgres Changes
-- once, here) and mark the chapter completed. Returns the word count, or null when the
-- lease is lost.
create or replace function public.finish_chapter(p_job_id uuid, p_worker_id text)
returns integer language plpgsql volatile set search_path = public, pg_temp as $$
declare
  ch public.chapters;
  v_text text;
begin
  if not public.genworker_fence(p_job_id, p_worker_id, 99, 'finishing') then
    return null;
  end if;
  select * into ch from public.chapters where generation_job_id = p_job_id;
  if not found then
    return 0;
  end if;
  v_text := coalesce(public.genworker_chunks_text(ch.id), ch.content);
  update public.chapters
     set content = case when content = v_text then content else v_text end,
         status = 'completed', progress = 100, current_step = 'completed', error_message = null,
         word_count = case when btrim(v_text) = '' then 0
                           else coalesce(array_length(regexp_split_to_array(btrim(v_text), '\s+'), 1), 0) end,
         generation_state = generation_state || jsonb_build_object('finished', true)
   where id = ch.id
  returning * into ch;
  perform public.genworker_broadcast_status(ch, char_length(v_text));
  return ch.word_count;
end $$;

-- A chapter's status follows its job (as before); in addition, whenever generation
-- stops short of finishing, content is materialised from the chunks so the row keeps
-- the text written so far, and Broadcast subscribers get a 'status' event.
create or replace function public.job_queue_sync_chapter() returns trigger
language plpgsql security definer set search_path = public, pg_temp as $$
declare
  ch public.chapters;
  v_text text;
begin
  select * into ch from public.chapters c where c.generation_job_id = new.id;
  if not found then
    return null;
  end if;
  if new.status in ('pending', 'paused', 'cancelled', 'failed') then
    v_text := coalesce(public.genworker_chunks_text(ch.id), ch.content);
    update public.chapters c
       set content = case when c.content = v_text then c.content else v_text end,
           status = case new.status when 'pending' then 'queued' else new.status end,
           current_step = case
             when new.status = 'pending' and old.status = 'processing' and new.retry_count > old.retry_count
               then left('retrying: ' || coalesce(new.error_details ->> 'user_message', 'transient error'), 300)
             when new.status = 'pending' then 'waiting for a worker'
             else new.status end,
           error_message = case when new.status = 'failed'
             then coalesce(new.error_details ->> 'user_message', new.error_details ->> 'message',
                           'Generation failed.')
             else c.error_message end
     where c.id = ch.id
    returning * into ch;
    perform public.genworker_broadcast_status(ch, char_length(v_text));
  elsif new.status = 'completed' and ch.status <> 'completed' then
    update public.chapters c set status = 'completed', progress = 100, current_step = 'completed'
     where c.id = ch.id
    returning * into ch;
    perform public.genworker_broadcast_status(ch, char_length(ch.content));
  end if;
  return null;
end $$;

-- A new generation job starts the chapter from nothing: the old chunks go (the
-- enqueue has already emptied content), and readers still showing the old text are told
-- (a 'status' with length 0), so the new text's offsets are not taken for duplicates.
create or replace function public.chapters_new_job_clears_chunks() returns trigger
language plpgsql security definer set search_path = public, pg_temp as $$
begin
  delete from public.chapter_chunks where chapter_id = new.id;
  perform public.genworker_broadcast_status(new, 0);
  return null;
end $$;

drop trigger if exists chapters_new_job_clears_chunks on public.chapters;
create trigger chapters_new_job_clears_chunks after update of generation_job_id on public.chapters
  for each row when (new.generation_job_id is not null
                     and old.generation_job_id is distinct from new.generation_job_id)
  execute function public.chapters_new_job_clears_chunks();

-- ---------------------------------------------------------------------------
-- For readers: the text so far, with the row's state, in one snapshot. A reader
-- joining mid-stream (or repairing a gap) loads this, then applies deltas past
-- content_length. SECURITY INVOKER: row level security decides what a user sees.
create or replace function public.get_chapter_text(p_chapter_id uuid)
returns table (chapter_id uuid, content text, content_length integer, status text,
               progress integer, current_step text)
language sql stable set search_path = public, pg_temp as $$
  select c.id, t.text, char_length(t.text), c.status, c.progress, c.current_step
    from public.chapters c
    cross join lateral (select coalesce(public.genworker_chunks_text(c.id), c.content) as text) t
   where c.id = p_chapter_id
$$;

-- Operators and the demo's progress bars: the streamed length (and text) while a
-- chapter is being written, not the row's snapshot.
create or replace function public.story_progress(p_story_id uuid, p_with_content boolean default false)
returns table (chapter_id uuid, number integer, title text, status text, progress integer,
               current_step text, word_count integer, content_length integer,
               error_message text, job_id uuid, content text)
language sql stable set search_path = public, pg_temp as $$
  select c.id, c.number, c.title, c.status, c.progress, c.current_step, c.word_count,
         case when exists (select 1 from public.chapter_chunks k where k.chapter_id = c.id)
              then public.genworker_chunks_length(c.id) else char_length(c.content) end,
         c.error_message, c.generation_job_id,
         case when p_with_content then coalesce(public.genworker_chunks_text(c.id), c.content) end
    from public.chapters c where c.story_id = p_story_id order by c.number
$$;

-- ---------------------------------------------------------------------------
-- Privileges. Users read their own chunks (the Postgres Changes opt-in, and
-- get_chapter_text); only the worker functions write them.

alter table public.chapter_chunks enable row level security;
revoke all on public.chapter_chunks from public, anon, authenticated, service_role;
grant select on public.chapter_chunks to authenticated;
grant select, insert, delete on public.chapter_chunks to service_role;

drop policy if exists chapter_chunks_owner_read on public.chapter_chunks;
create policy chapter_chunks_owner_read on public.chapter_chunks for select to authenticated
  using (exists (select 1 from public.chapters c
                  where c.id = chapter_chunks.chapter_id and c.owner_id = (select auth.uid())));

revoke all on function
  public.genworker_chunks_length(uuid), public.genworker_chunks_text(uuid),
  public.genworker_broadcast(uuid, text, jsonb), public.genworker_cut_chapter(uuid, integer),
  public.genworker_broadcast_status(public.chapters, integer),
  public.start_chapter_generation(uuid, text, integer),
  public.save_chapter_outline(uuid, text, text, jsonb),
  public.append_chapter_content(uuid, text, integer, text, integer, text, jsonb),
  public.rewind_chapter_content(uuid, text, integer), public.finish_chapter(uuid, text),
  public.job_queue_sync_chapter(), public.chapters_new_job_clears_chunks(),
  public.get_chapter_text(uuid)
  from public, anon, authenticated, service_role;
grant execute on function
  public.genworker_chunks_length(uuid), public.genworker_chunks_text(uuid),
  public.genworker_broadcast(uuid, text, jsonb), public.genworker_cut_chapter(uuid, integer),
  public.genworker_broadcast_status(public.chapters, integer),
  public.start_chapter_generation(uuid, text, integer),
  public.save_chapter_outline(uuid, text, text, jsonb),
  public.append_chapter_content(uuid, text, integer, text, integer, text, jsonb),
  public.rewind_chapter_content(uuid, text, integer), public.finish_chapter(uuid, text)
  to service_role;
-- get_chapter_text runs as its caller and reads through genworker_chunks_text, which
-- row level security on chapter_chunks confines to the caller's own chapters.
grant execute on function public.get_chapter_text(uuid), public.genworker_chunks_text(uuid)
  to authenticated;
grant execute on function public.get_chapter_text(uuid) to service_role;

-- Realtime Authorization: a signed-in user may receive a chapter's private topic
-- 'chapter:<id>' only if they own the chapter. Realtime evaluates this at channel join,
-- as the user, with realtime.topic() set to the channel's topic. No INSERT policy:
-- users cannot send on these topics; only the database does.
-- Skipped where Realtime is not installed (plain PostgreSQL). realtime.messages belongs to
-- Realtime's own role; where the migrating role may not add policies to it (some
-- `supabase db push` setups refuse with 42501 what the SQL editor allows), the migration
-- goes on with a WARNING that names the statement to run in the SQL editor: until then
-- nobody can join chapter topics (private channels fail closed), and nothing else changes.
do $$
declare
  v_policy constant text := $policy$
    create policy genworker_chapter_topic_owner_read on realtime.messages
      for select to authenticated
      using (
        realtime.messages.extension = 'broadcast'
        and exists (select 1 from public.chapters c
                     where c.owner_id = (select auth.uid())
                       and 'chapter:' || c.id::text = (select realtime.topic())))
  $policy$;
begin
  if to_regnamespace('realtime') is null or to_regclass('realtime.messages') is null then
    return;
  end if;
  begin
    execute 'drop policy if exists genworker_chapter_topic_owner_read on realtime.messages';
    execute v_policy;
  exception when insufficient_privilege then
    raise warning using
      message = 'genworker: could not add the Realtime Authorization policy on realtime.messages ('
                || sqlerrm || '); readers cannot join chapter:<id> topics until it exists',
      hint = 'run this in the SQL editor: ' || btrim(regexp_replace(v_policy, '\s+', ' ', 'g'));
  end;
end $$;

notify pgrst, 'reload schema';
