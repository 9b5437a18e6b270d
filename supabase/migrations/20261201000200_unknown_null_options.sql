-- genworker: an unknown chapter option is refused whatever its value. 20261201000100
-- skipped null values before looking at the key, so {"colour": null} got through the
-- door and then failed in the worker (payload.py refuses unknown keys) as bad_payload.
-- A null for a documented key still means "not given".

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

revoke all on function public.genworker_check_chapter_options(jsonb)
  from public, anon, authenticated, service_role;

notify pgrst, 'reload schema';
