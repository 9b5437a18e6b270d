-- genworker: story memory. A completed chapter is cut into passages, embedded (job type
-- chapter_embedding) and stored with a pgvector column; before each section the worker
-- retrieves the passages of the story's EARLIER chapters closest to what it is about to
-- write (match_story_passages). README "Story memory" says what and why.
--
-- pgvector is optional. Where the server has no `vector` extension (plain PostgreSQL 15
-- without postgresql-15-pgvector), or the migrating role may not create it, this file
-- creates nothing and says so in a NOTICE; the worker then finds no memory functions and
-- writes chapters exactly as before. Everything that mentions the vector type is therefore
-- created by dynamic SQL below, after the extension is known to exist; nothing outside
-- this block refers to it. Setting genworker.story_memory = 'off' for the migrating
-- session skips it deliberately (the tests use that to build a database without memory).
-- Enabling pgvector later: install it, then run this file again (every statement is
-- idempotent) with psql, since the Supabase CLI records a version only once.

do $migration$
declare
  v_schema text;
  v_iterative boolean;
  v_ddl text;
begin
  if coalesce(current_setting('genworker.story_memory', true), '') = 'off' then
    raise notice 'story memory skipped: genworker.story_memory is off for this session';
    return;
  end if;
  if not exists (select 1 from pg_available_extensions where name = 'vector') then
    raise notice 'story memory skipped: the vector extension (pgvector) is not available on '
                 'this server; chapters are written without it (README "Story memory")';
    return;
  end if;
  if not exists (select 1 from pg_extension where extname = 'vector') then
    begin
      create extension if not exists vector with schema extensions;
    exception when insufficient_privilege or invalid_schema_name or feature_not_supported then
      raise notice 'story memory skipped: could not create the vector extension (%): enable '
                   'pgvector for this database, then run this migration again', sqlerrm;
      return;
    end;
  end if;
  -- The extension's functions (the vector type's input, its operators) are executable by
  -- everyone wherever pgvector is installed normally. Created here, by the role that ran
  -- 20261201000100_input_limits.sql (which revokes EXECUTE from PUBLIC on whatever that
  -- role creates later), they would not be: give back exactly what pgvector expects.
  declare
    f regprocedure;
  begin
    for f in
      select p.oid::regprocedure from pg_proc p
        join pg_depend d on d.classid = 'pg_proc'::regclass and d.objid = p.oid and d.deptype = 'e'
        join pg_extension e on e.oid = d.refobjid and e.extname = 'vector'
       where not has_function_privilege('public', p.oid, 'execute')
         and pg_get_userbyid(p.proowner) = current_user
    loop
      execute format('grant execute on function %s to public', f);
    end loop;
  end;
  -- Wherever the extension lives (Supabase: extensions; an older project: maybe public).
  select n.nspname,
         string_to_array(split_part(e.extversion, '-', 1), '.')::int[] >= array[0, 8, 0]
    into v_schema, v_iterative
    from pg_extension e join pg_namespace n on n.oid = e.extnamespace
   where e.extname = 'vector';

  v_ddl := $ddl$
-- Passages: a completed chapter's text cut at paragraph boundaries, with the character
-- offsets they came from, the md5 of the text they were cut from, and the embedding.
create table if not exists public.story_passages (
  chapter_id     uuid not null references public.chapters (id) on delete cascade,
  ordinal        integer not null check (ordinal >= 0),
  story_id       uuid not null references public.stories (id) on delete cascade,
  owner_id       uuid not null references auth.users (id) on delete cascade,
  chapter_number integer not null,
  start_offset   integer not null check (start_offset >= 0),
  end_offset     integer not null,
  content        text not null check (char_length(content) between 1 and 4000),
  content_md5    text not null,
  model          text not null check (char_length(model) between 1 and 200),
  embedding      @vec@.vector(768) not null,
  created_at     timestamptz not null default now(),
  primary key (chapter_id, ordinal),
  check (end_offset - start_offset = char_length(content))
);
comment on table public.story_passages is
  'Story memory: passages of completed chapters and their embeddings (768 dimensions, unit '
  'length, RETRIEVAL_DOCUMENT). Written only by the chapter_embedding job through '
  'replace_chapter_passages; owners read their own.';
-- A vector(768) is 3,080 bytes: stored out of line (TOAST) by default, every distance would
-- first fetch and reassemble it. Kept in the row, a scan reads it where it is.
alter table public.story_passages alter column embedding set storage plain;
create index if not exists story_passages_story_idx
  on public.story_passages (story_id, model, chapter_number);

-- The embedding job of a chapter, when one is waiting: enqueueing twice returns it.
create index if not exists job_queue_embedding_chapter_idx
  on public.job_queue ((job_payload ->> 'chapter_id'))
  where job_type = 'chapter_embedding' and status = 'pending';

-- Its own lane: a user's embedding jobs never count against the caps of their chapters.
insert into public.job_lanes (lane, lease_timeout_s, description, max_active_per_user,
                              max_enqueued_per_user_per_hour)
values ('story_memory', 120, 'chapter_embedding jobs (story memory)', 1000, 10000)
on conflict (lane) do nothing;

-- ---------------------------------------------------------------------------
-- Enqueue: one pending chapter_embedding job per completed chapter (it reads the text
-- when it runs, so a waiting job already covers a newer text). Null when the chapter is
-- not completed or has no text.
create or replace function public.genworker_enqueue_chapter_embedding(p_chapter_id uuid)
returns uuid language plpgsql volatile security definer
set search_path = public, pg_temp as $fn$
declare
  ch record;
  v_job uuid;
begin
  select c.id, c.story_id, c.owner_id, c.status, btrim(c.content) = '' as blank
    into ch from public.chapters c where c.id = p_chapter_id;
  if not found or ch.status <> 'completed' or ch.blank then
    return null;
  end if;
  select j.id into v_job from public.job_queue j
   where j.job_type = 'chapter_embedding' and j.status = 'pending'
     and j.job_payload ->> 'chapter_id' = p_chapter_id::text
   limit 1;
  if found then
    return v_job;
  end if;
  insert into public.job_queue (job_type, job_lane, job_payload, user_id, max_retries)
  values ('chapter_embedding', 'story_memory',
          jsonb_build_object('chapter_id', ch.id, 'story_id', ch.story_id), ch.owner_id, 5)
  returning id into v_job;
  return v_job;
end $fn$;

-- A chapter that completes is queued for embedding; one that leaves 'completed' (a
-- regeneration resets its text) loses its passages at once, so no retrieval ever serves
-- text the chapter no longer has. Queueing can never fail or delay the chapter: any
-- error (a cap, a lock timeout) is a WARNING and the chapter's transaction goes on;
-- `genworker embed --all-missing` catches up later.
create or replace function public.chapters_story_memory() returns trigger
language plpgsql security definer set search_path = public, pg_temp as $fn$
begin
  if new.status = 'completed' then
    begin
      perform public.genworker_enqueue_chapter_embedding(new.id);
    exception when others then
      raise warning 'story memory: chapter % was not queued for embedding: % (%)',
        new.id, sqlerrm, sqlstate;
    end;
  elsif old.status = 'completed' then
    delete from public.story_passages where chapter_id = new.id;
  end if;
  return null;
end $fn$;

drop trigger if exists chapters_story_memory on public.chapters;
create trigger chapters_story_memory after update of status on public.chapters
  for each row when (old.status is distinct from new.status
                     and (new.status = 'completed' or old.status = 'completed'))
  execute function public.chapters_story_memory();

-- ---------------------------------------------------------------------------
-- The worker's side (service_role), fenced like every job write.

-- The text to embed: the chapter named by the job, or null when the lease is lost.
create or replace function public.chapter_embedding_source(p_job_id uuid, p_worker_id text)
returns jsonb language plpgsql volatile set search_path = public, pg_temp as $fn$
declare
  v_job public.job_queue;
  ch public.chapters;
begin
  if not public.genworker_fence(p_job_id, p_worker_id, 5, 'reading chapter') then
    return null;
  end if;
  select * into v_job from public.job_queue where id = p_job_id;
  if v_job.job_payload ->> 'chapter_id' is null
     or v_job.job_payload ->> 'chapter_id' !~* '^[0-9a-f]{8}-([0-9a-f]{4}-){3}[0-9a-f]{12}$' then
    raise exception using errcode = 'PT400',
      message = format('job %s: job_payload.chapter_id must be a chapter uuid', p_job_id);
  end if;
  select * into ch from public.chapters where id = (v_job.job_payload ->> 'chapter_id')::uuid;
  if not found then
    return jsonb_build_object('status', 'missing');
  end if;
  if v_job.user_id is not null and ch.owner_id <> v_job.user_id then
    raise exception using errcode = 'PT403',
      message = format('job %s: its user does not own chapter %s', p_job_id, ch.id);
  end if;
  return jsonb_build_object(
    'chapter_id', ch.id, 'story_id', ch.story_id, 'number', ch.number, 'status', ch.status,
    'content', ch.content, 'content_md5', md5(ch.content));
end $fn$;

-- Replace a chapter's passages in one transaction: delete the old, insert the new. Null
-- when the lease is lost; {"status": "stale"} (nothing written) when the chapter is no
-- longer completed or its text is no longer the one embedded (a newer job follows).
-- p_passages: [{"ordinal", "start_offset", "end_offset", "content", "embedding": [768]}].
create or replace function public.replace_chapter_passages(
  p_job_id uuid, p_worker_id text, p_chapter_id uuid, p_content_md5 text, p_model text,
  p_passages jsonb)
returns jsonb language plpgsql volatile set search_path = public, @vec@, pg_temp as $fn$
declare
  ch public.chapters;
  v_bad text;
  v_count integer;
begin
  if not public.genworker_fence(p_job_id, p_worker_id, 90, 'storing passages') then
    return null;
  end if;
  if not exists (select 1 from public.job_queue
                  where id = p_job_id and job_payload ->> 'chapter_id' = p_chapter_id::text) then
    raise exception using errcode = 'PT403',
      message = format('job %s is not the embedding job of chapter %s', p_job_id, p_chapter_id);
  end if;
  if p_model is null or char_length(p_model) not between 1 and 200 then
    raise exception using errcode = 'PT400', message = 'p_model must be 1 to 200 characters';
  end if;
  if jsonb_typeof(p_passages) is distinct from 'array' or jsonb_array_length(p_passages) > 2000 then
    raise exception using errcode = 'PT400',
      message = 'p_passages must be an array of at most 2000 passages';
  end if;
  -- FOR SHARE: a regeneration (which locks the chapter FOR UPDATE) waits for us, then
  -- its status change removes what we wrote; one that committed first makes us stale.
  select * into ch from public.chapters where id = p_chapter_id for share;
  if not found then
    return jsonb_build_object('status', 'missing', 'passages', 0);
  end if;
  if ch.status <> 'completed' or md5(ch.content) <> coalesce(p_content_md5, '') then
    return jsonb_build_object('status', 'stale', 'passages', 0);
  end if;
  select format('passage %s: %s', coalesce(e ->> 'ordinal', '?'), why) into v_bad
    from jsonb_array_elements(p_passages) with ordinality as a(e, i),
         lateral (select case
           when jsonb_typeof(e) <> 'object' then 'not an object'
           when (e ->> 'ordinal') !~ '^[0-9]{1,6}$' then 'ordinal must be a whole number'
           when (e ->> 'start_offset') !~ '^[0-9]{1,9}$' or (e ->> 'end_offset') !~ '^[0-9]{1,9}$'
             then 'offsets must be whole numbers'
           when jsonb_typeof(e -> 'content') <> 'string'
             or substr(ch.content, (e ->> 'start_offset')::integer + 1,
                       (e ->> 'end_offset')::integer - (e ->> 'start_offset')::integer)
                is distinct from e ->> 'content'
             then 'content is not the chapter text at its offsets'
           when jsonb_typeof(e -> 'embedding') <> 'array'
             or jsonb_array_length(e -> 'embedding') <> 768
             then 'embedding must be an array of 768 numbers'
           when abs(vector_norm((e -> 'embedding')::text::vector(768)) - 1) > 0.001
             then 'embedding must be of unit length (normalized)'
         end as why) w
   where why is not null
   limit 1;
  if v_bad is not null then
    raise exception using errcode = 'PT400', message = left(v_bad, 300);
  end if;
  delete from public.story_passages where chapter_id = ch.id;
  insert into public.story_passages (chapter_id, ordinal, story_id, owner_id, chapter_number,
                                     start_offset, end_offset, content, content_md5, model,
                                     embedding)
  select ch.id, (e ->> 'ordinal')::integer, ch.story_id, ch.owner_id, ch.number,
         (e ->> 'start_offset')::integer, (e ->> 'end_offset')::integer, e ->> 'content',
         p_content_md5, p_model, (e -> 'embedding')::text::vector(768)
    from jsonb_array_elements(p_passages) e;
  get diagnostics v_count = row_count;
  return jsonb_build_object('status', 'stored', 'passages', v_count);
end $fn$;

-- How many passages of earlier chapters a chapter job could retrieve (embedded with
-- p_model): 0 means the worker skips memory entirely. Null when the lease is lost.
create or replace function public.story_memory_size(p_job_id uuid, p_worker_id text, p_model text)
returns integer language plpgsql stable set search_path = public, pg_temp as $fn$
declare
  ch record;
begin
  perform 1 from public.job_queue
   where id = p_job_id and worker_id = p_worker_id and status = 'processing';
  if not found then
    return null;
  end if;
  select c.story_id, c.number into ch from public.chapters c where c.generation_job_id = p_job_id;
  if not found then
    return 0;
  end if;
  return (select count(*)::integer from public.story_passages p
           where p.story_id = ch.story_id and p.chapter_number < ch.number and p.model = p_model);
end $fn$;

-- Retrieval: the p_match_count passages of the job's story's EARLIER chapters closest to
-- p_query (cosine similarity >= p_min_similarity), leaving out passages that lie wholly
-- inside a tail the prompt already carries: p_carried maps a chapter number to how many
-- of its last characters are in the prompt ({"4": 2000}). Empty when the lease is lost.
create or replace function public.match_story_passages(
  p_job_id uuid, p_worker_id text, p_query jsonb, p_model text,
  p_match_count integer default 4, p_min_similarity double precision default 0.5,
  p_carried jsonb default '{}'::jsonb)
returns table (chapter_number integer, ordinal integer, start_offset integer,
               end_offset integer, content text, similarity double precision)
language plpgsql stable
-- Planned per call for its story: a generic plan cannot know how selective the story is.
set plan_cache_mode = force_custom_plan
set search_path = public, @vec@, pg_temp @iterative@ as $fn$
declare
  ch record;
  q vector(768);
  v_cut jsonb;
  v_count integer;
  v_exact_max integer;
begin
  perform 1 from public.job_queue
   where id = p_job_id and worker_id = p_worker_id and status = 'processing';
  if not found then
    return;
  end if;
  if jsonb_typeof(p_query) is distinct from 'array' or jsonb_array_length(p_query) <> 768 then
    raise exception using errcode = 'PT400', message = 'p_query must be an array of 768 numbers';
  end if;
  if p_match_count is null or p_match_count not between 1 and 50 then
    raise exception using errcode = 'PT400', message = 'p_match_count must be from 1 to 50';
  end if;
  if p_min_similarity is null or p_min_similarity = 'NaN'::float8
     or p_min_similarity not between -1 and 1 then
    raise exception using errcode = 'PT400', message = 'p_min_similarity must be from -1 to 1';
  end if;
  if p_carried is not null and jsonb_typeof(p_carried) <> 'object' then
    raise exception using errcode = 'PT400', message = 'p_carried must be a JSON object';
  end if;
  select c.story_id, c.number into ch from public.chapters c where c.generation_job_id = p_job_id;
  if not found then
    return;
  end if;
  q := p_query::text::vector(768);
  -- Unit vectors only: their inner product is their cosine similarity, and pgvector's
  -- inner product (<#>, negated) costs a fifth of its cosine distance (bench/retrieval.py).
  if abs(vector_norm(q) - 1) > 0.001 then
    raise exception using errcode = 'PT400', message = 'p_query must be of unit length (normalized)';
  end if;
  -- Where each carried tail starts in its chapter's current text: {"4": 10233, ...}. A
  -- plain per-row test against it keeps the scan an index scan (a join would not).
  select coalesce(jsonb_object_agg(c.number::text,
                                   char_length(c.content) - (p_carried ->> c.number::text)::integer),
                  '{}'::jsonb)
    into v_cut
    from public.chapters c
   where c.story_id = ch.story_id and c.number < ch.number
     and coalesce(p_carried ->> c.number::text, '') ~ '^[0-9]{1,9}$';
  -- A story of up to 20,000 passages (a very long novel) is searched exactly: its rows
  -- (found through the (story_id, model, chapter_number) index or a scan, as the planner
  -- sees fit), each distance computed once, the k smallest kept. Exact by construction and
  -- linear in the story's size (bench/retrieval.py has the figures); beyond that the HNSW
  -- index answers, approximately, in about constant time.
  -- Distances are negated inner products (<#>): on unit vectors, -cosine similarity.
  -- genworker.memory_exact_max (e.g. `alter database ... set`) moves the boundary.
  v_exact_max := coalesce(nullif(current_setting('genworker.memory_exact_max', true), '')::integer,
                          20000);
  select count(*) into v_count from (
    select 1 from public.story_passages p
     where p.story_id = ch.story_id and p.model = p_model and p.chapter_number < ch.number
     limit v_exact_max + 1) s;
  if v_count <= v_exact_max then
    return query
    with scored as materialized (
      select p.chapter_id, p.chapter_number, p.ordinal, p.embedding <#> q as distance
        from public.story_passages p
       where p.story_id = ch.story_id and p.model = p_model and p.chapter_number < ch.number
         and (v_cut = '{}'::jsonb  -- planned per call: with no tail carried, no test per row
              or p.start_offset < coalesce((v_cut ->> p.chapter_number::text)::integer,
                                           2147483647))),
    nearest as (
      select s.* from scored s
       where s.distance <= -p_min_similarity
       order by s.distance, s.chapter_number, s.ordinal
       limit p_match_count)
    select n.chapter_number, n.ordinal, p.start_offset, p.end_offset, p.content, -n.distance
      from nearest n
      join public.story_passages p on p.chapter_id = n.chapter_id and p.ordinal = n.ordinal
     order by n.distance, n.chapter_number, n.ordinal;
    return;
  end if;
  -- The threshold is applied after the limit: it bounds the very distance the rows are
  -- ordered by, so it only drops the tail of the k nearest.
  return query
  with nearest as materialized (
    select p.chapter_number, p.ordinal, p.start_offset, p.end_offset, p.content,
           p.embedding <#> q as distance
      from public.story_passages p
     where p.story_id = ch.story_id and p.chapter_number < ch.number and p.model = p_model
       and (v_cut = '{}'::jsonb
            or p.start_offset < coalesce((v_cut ->> p.chapter_number::text)::integer, 2147483647))
     order by p.embedding <#> q
     limit p_match_count)
  select n.chapter_number, n.ordinal, n.start_offset, n.end_offset, n.content, -n.distance
    from nearest n
   where n.distance <= -p_min_similarity
   order by n.distance, n.chapter_number, n.ordinal;
end $fn$;

-- Backfill (operators): queue embedding jobs for a story's completed chapters, or with
-- p_only_missing for those without current passages (none, of another text, or of
-- another model than p_model when given). Returns the job ids (a waiting job is reused).
create or replace function public.enqueue_chapter_embeddings(
  p_story_id uuid default null, p_only_missing boolean default false,
  p_model text default null, p_limit integer default 1000)
returns setof uuid language plpgsql volatile security definer
set search_path = public, pg_temp as $fn$
declare
  v_chapter uuid;
  v_job uuid;
begin
  if p_story_id is null and not coalesce(p_only_missing, false) then
    raise exception using errcode = 'PT400',
      message = 'give p_story_id, or p_only_missing to queue every chapter without passages';
  end if;
  if p_limit is null or p_limit not between 1 and 100000 then
    raise exception using errcode = 'PT400', message = 'p_limit must be from 1 to 100000';
  end if;
  if p_story_id is not null and not exists (select 1 from public.stories where id = p_story_id) then
    raise exception using errcode = 'PT404', message = format('story %s not found', p_story_id);
  end if;
  for v_chapter in
    select c.id from public.chapters c
     where c.status = 'completed' and btrim(c.content) <> ''
       and (p_story_id is null or c.story_id = p_story_id)
       and (not coalesce(p_only_missing, false) or not exists (
             select 1 from public.story_passages p
              where p.chapter_id = c.id and p.content_md5 = md5(c.content)
                and (p_model is null or p.model = p_model)))
     order by c.story_id, c.number
     limit p_limit
  loop
    v_job := public.genworker_enqueue_chapter_embedding(v_chapter);
    if v_job is not null then
      return next v_job;
    end if;
  end loop;
end $fn$;

-- ---------------------------------------------------------------------------
-- Privileges: owners read their own passages; only the worker's functions write.
alter table public.story_passages enable row level security;
revoke all on public.story_passages from public, anon, authenticated, service_role;
grant select on public.story_passages to authenticated;
grant select, insert, delete on public.story_passages to service_role;
drop policy if exists story_passages_owner_read on public.story_passages;
create policy story_passages_owner_read on public.story_passages for select to authenticated
  using (owner_id = (select auth.uid()));

revoke all on function
  public.genworker_enqueue_chapter_embedding(uuid), public.chapters_story_memory(),
  public.chapter_embedding_source(uuid, text),
  public.replace_chapter_passages(uuid, text, uuid, text, text, jsonb),
  public.story_memory_size(uuid, text, text),
  public.match_story_passages(uuid, text, jsonb, text, integer, double precision, jsonb),
  public.enqueue_chapter_embeddings(uuid, boolean, text, integer)
  from public, anon, authenticated, service_role;
grant execute on function
  public.chapter_embedding_source(uuid, text),
  public.replace_chapter_passages(uuid, text, uuid, text, text, jsonb),
  public.story_memory_size(uuid, text, text),
  public.match_story_passages(uuid, text, jsonb, text, integer, double precision, jsonb),
  public.enqueue_chapter_embeddings(uuid, boolean, text, integer)
  to service_role;
$ddl$;

  execute replace(replace(v_ddl, '@vec@', quote_ident(v_schema)), '@iterative@',
                  -- pgvector >= 0.8 keeps scanning the HNSW graph until enough rows pass
                  -- the story filter, instead of stopping after ef_search candidates.
                  case when v_iterative then 'set hnsw.iterative_scan = relaxed_order' else '' end
                  -- 40 candidates (the default) lost about one in eight of the true top 4
                  -- in bench/retrieval.py; 100 costs little at k <= 50.
                  || ' set hnsw.ef_search = 100');

  -- HNSW needs pgvector >= 0.5; without it retrieval is an exact scan of the story's rows.
  if exists (select 1 from pg_am where amname = 'hnsw') then
    execute format('create index if not exists story_passages_embedding_idx on '
                   'public.story_passages using hnsw (embedding %I.vector_ip_ops)', v_schema);
  else
    raise notice 'story memory: this pgvector has no HNSW; retrieval scans each story exactly';
  end if;
end $migration$;

notify pgrst, 'reload schema';
