-- genworker: read_chapter (the operator's `genworker show --follow`) reads the streamed
-- text. Since 20261201001000 a chapter's text lives in chapter_chunks while it is being
-- written and reaches chapters.content only when generation stops; 20261201003000 defined
-- read_chapter over chapters.content, so this redefinition must come after it.

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

revoke all on function public.read_chapter(uuid, integer)
  from public, anon, authenticated, service_role;
grant execute on function public.read_chapter(uuid, integer) to service_role;

notify pgrst, 'reload schema';
