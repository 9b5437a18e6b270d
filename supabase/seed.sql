-- Demo data: one user, one story, three chapters. Applied by `genworker demo`
-- (and by `supabase db reset` locally). Fixed ids so the demo can find them.
insert into auth.users (id, email)
values ('00000000-0000-4000-8000-00000000d3e0', 'demo@genworker.local')
on conflict (id) do nothing;

insert into public.stories (id, owner_id, title, premise, preferences)
values ('00000000-0000-4000-8000-0000000057a0', '00000000-0000-4000-8000-00000000d3e0',
        'The Lighthouse at Vell',
        'A lighthouse keeper on a northern island finds a door beneath the lamp room that '
        'opens onto a different sea each night.',
        '{"genre": "literary fantasy", "tone": "quiet, wondering", "pov": "third limited", "tense": "past"}')
on conflict (id) do nothing;

insert into public.chapters (id, story_id, owner_id, number, title)
values
  ('00000000-0000-4000-8000-00000000c001', '00000000-0000-4000-8000-0000000057a0',
   '00000000-0000-4000-8000-00000000d3e0', 1, 'The Door Beneath the Lamp'),
  ('00000000-0000-4000-8000-00000000c002', '00000000-0000-4000-8000-0000000057a0',
   '00000000-0000-4000-8000-00000000d3e0', 2, 'A Sea of Glass'),
  ('00000000-0000-4000-8000-00000000c003', '00000000-0000-4000-8000-0000000057a0',
   '00000000-0000-4000-8000-00000000d3e0', 3, 'What the Tide Keeps')
on conflict (id) do nothing;
