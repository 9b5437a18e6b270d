-- genworker: one Gemini budget for the whole fleet (issue 12).
--
-- Gemini's quotas (requests per minute, tokens per minute, requests per day) belong to the
-- Google Cloud project, per model, so every worker instance takes from one budget here,
-- before each request, through one function (gemini_budget_take), and settles the real
-- usage after it (gemini_budget_settle). A 429 seen by any instance becomes a cool-down
-- every instance honours; a daily-quota 429 stops chapter claims for that model until the
-- daily reset (midnight Pacific time). docs/gemini-budget.md explains the design.
--
-- The budget is a token bucket per model and per dimension, refilled continuously and
-- taken under the row lock: a direct atomic take per Gemini request (one short round trip
-- for a call that lasts seconds) rather than leased slices, measured in bench/fleet_budget.py.
-- The bucket holds burst_s seconds' worth and refills at (limit - burst) per minute, so no
-- 60-second window is granted more than the configured limit (burst + refill = limit).

create table if not exists public.gemini_budgets (
  model                 text primary key check (length(model) between 1 and 200),
  rpm                   integer check (rpm is null or rpm between 1 and 10000000),
  tpm                   bigint check (tpm is null or tpm between 1 and 10000000000),
  rpd                   integer check (rpd is null or rpd between 1 and 100000000),
  burst_s               double precision not null default 1
                          check (burst_s >= 0.1 and burst_s <= 30),
  -- Bucket state, written only by gemini_budget_take / gemini_budget_settle.
  request_level         double precision not null default 0,
  token_level           double precision not null default 0,
  refilled_at           timestamptz not null default now(),
  quota_day             date,
  day_requests          integer not null default 0,
  cooldown_until        timestamptz,
  cooldown_reason       text,
  daily_exhausted_until timestamptz,
  daily_reason          text,
  granted_requests      bigint not null default 0,
  rate_limited          bigint not null default 0,
  updated_at            timestamptz not null default now()
);
comment on table public.gemini_budgets is
  'One row per Gemini model: the fleet-wide RPM/TPM/RPD budget (null = not limited here) and its shared state (buckets, cool-down, daily exhaustion). Operators set rpm/tpm/rpd/burst_s; the rest is written by gemini_budget_take and gemini_budget_settle.';
alter table public.gemini_budgets enable row level security;
revoke all on public.gemini_budgets from public, anon, authenticated, service_role;
grant select, insert, update, delete on public.gemini_budgets to service_role;

-- When Google's daily quotas next reset: midnight Pacific time (PST/PDT as the date has it).
create or replace function public.gemini_next_daily_reset(p_at timestamptz)
returns timestamptz language sql immutable
set search_path = public, pg_temp as $$
  select (date_trunc('day', p_at at time zone 'America/Los_Angeles') + interval '1 day')
           at time zone 'America/Los_Angeles'
$$;

-- A bucket's size and refill rate (per second) for a per-minute limit.
create or replace function public.gemini_bucket(p_limit double precision, p_burst_s double precision,
                                                out cap double precision, out rate double precision)
language sql immutable
set search_path = public, pg_temp as $$
  select greatest(1.0, p_limit * p_burst_s / 60.0),
         greatest(p_limit - greatest(1.0, p_limit * p_burst_s / 60.0), p_limit / 2.0) / 60.0
$$;

-- Take one request and p_tokens tokens (an estimate: prompt chars/4 + max output) of
-- p_model's budget, or say how long to wait. Atomic under the row lock. A model without a
-- row is not limited here (granted, reason 'unbudgeted'). Reasons when not granted:
-- 'daily_exhausted' and 'cooldown' (until = when it ends), 'rpd', 'rpm', 'tpm'. A request
-- larger than the whole token bucket is granted when the bucket is full (it then runs into
-- debt that later takes wait out), so no estimate can block a model for good.
create or replace function public.gemini_budget_take(p_model text, p_tokens integer)
returns table (granted boolean, wait_s double precision, reason text, until timestamptz)
language plpgsql volatile
set search_path = public, pg_temp as $$
declare
  b public.gemini_budgets%rowtype;
  t timestamptz;
  v_day date;
  v_elapsed double precision;
  r_cap double precision; r_rate double precision;
  k_cap double precision; k_rate double precision;
  v_req double precision;
  v_tok double precision;
  v_need double precision;
  v_tokens integer := least(greatest(coalesce(p_tokens, 0), 0), 10000000);
begin
  if p_model is null or length(p_model) not between 1 and 200 then
    raise exception using errcode = 'PT400',
      message = 'gemini_budget_take: p_model must be 1-200 characters';
  end if;
  select * into b from public.gemini_budgets where model = p_model for update;
  if not found then
    return query select true, 0.0::double precision, 'unbudgeted'::text, null::timestamptz;
    return;
  end if;
  t := clock_timestamp();  -- after the lock: the moment this take is decided
  if b.daily_exhausted_until > t then
    return query select false, extract(epoch from b.daily_exhausted_until - t)::double precision,
                        'daily_exhausted'::text, b.daily_exhausted_until;
    return;
  end if;
  if b.cooldown_until > t then
    return query select false, extract(epoch from b.cooldown_until - t)::double precision,
                        'cooldown'::text, b.cooldown_until;
    return;
  end if;

  v_day := (t at time zone 'America/Los_Angeles')::date;
  if b.quota_day is distinct from v_day then
    b.quota_day := v_day;
    b.day_requests := 0;
  end if;
  if b.rpd is not null and b.day_requests >= b.rpd then
    update public.gemini_budgets
       set quota_day = b.quota_day, day_requests = b.day_requests,
           daily_exhausted_until = public.gemini_next_daily_reset(t),
           daily_reason = format('the configured budget of %s requests per day is used', b.rpd),
           updated_at = t
     where model = p_model;
    return query select false,
                        extract(epoch from public.gemini_next_daily_reset(t) - t)::double precision,
                        'rpd'::text, public.gemini_next_daily_reset(t);
    return;
  end if;

  v_elapsed := greatest(extract(epoch from t - b.refilled_at)::double precision, 0.0);
  v_req := b.request_level;
  v_tok := b.token_level;
  if b.rpm is not null then
    select c.cap, c.rate into r_cap, r_rate from public.gemini_bucket(b.rpm, b.burst_s) c;
    v_req := least(r_cap, v_req + v_elapsed * r_rate);
  end if;
  if b.tpm is not null then
    select c.cap, c.rate into k_cap, k_rate from public.gemini_bucket(b.tpm, b.burst_s) c;
    v_tok := least(k_cap, v_tok + v_elapsed * k_rate);
    v_need := least(v_tokens, k_cap);
  end if;

  if (b.rpm is null or v_req >= 1.0) and (b.tpm is null or v_tok >= v_need) then
    update public.gemini_budgets
       set request_level = case when b.rpm is null then 0 else v_req - 1.0 end,
           token_level = case when b.tpm is null then 0 else v_tok - v_tokens end,
           refilled_at = t, quota_day = b.quota_day, day_requests = b.day_requests + 1,
           granted_requests = b.granted_requests + 1, updated_at = t
     where model = p_model;
    return query select true, 0.0::double precision,
                        case when b.rpm is null and b.tpm is null and b.rpd is null
                             then 'unbudgeted' else 'granted' end, null::timestamptz;
    return;
  end if;

  update public.gemini_budgets
     set request_level = coalesce(v_req, 0), token_level = coalesce(v_tok, 0), refilled_at = t,
         quota_day = b.quota_day, day_requests = b.day_requests, updated_at = t
   where model = p_model;
  return query
  select false,
         greatest(case when b.rpm is not null and v_req < 1.0 then (1.0 - v_req) / r_rate else 0 end,
                  case when b.tpm is not null and v_tok < v_need then (v_need - v_tok) / k_rate
                       else 0 end),
         case when b.rpm is not null and v_req < 1.0 then 'rpm' else 'tpm' end,
         null::timestamptz;
end $$;

-- Settle one request: give back (or take more of) the token reservation once the real
-- usage is known, and record a 429: p_retry_after_s starts a cool-down every instance
-- honours (the longest one wins); p_daily marks the model exhausted until the daily reset.
-- A 429 for a model without a row creates one (no limits, just the shared cool-down).
create or replace function public.gemini_budget_settle(
  p_model text, p_reserved integer, p_used integer,
  p_retry_after_s double precision default null, p_daily boolean default false,
  p_reason text default null)
returns void
language plpgsql volatile
set search_path = public, pg_temp as $$
declare
  t timestamptz := clock_timestamp();
  v_reason text := left(coalesce(p_reason, 'Gemini answered 429 RESOURCE_EXHAUSTED'), 300);
  v_delta double precision :=
    least(greatest(coalesce(p_reserved, 0), 0), 10000000)
    - least(greatest(coalesce(p_used, 0), 0), 10000000);
  v_limited boolean := p_retry_after_s is not null or coalesce(p_daily, false);
  v_cool timestamptz := case when p_retry_after_s is not null
    then t + make_interval(secs => least(greatest(p_retry_after_s, 0), 3600)) end;
begin
  if p_model is null or length(p_model) not between 1 and 200 then
    raise exception using errcode = 'PT400',
      message = 'gemini_budget_settle: p_model must be 1-200 characters';
  end if;
  if v_limited then
    insert into public.gemini_budgets (model) values (p_model) on conflict (model) do nothing;
  end if;
  update public.gemini_budgets b
     set token_level = case when b.tpm is null then 0
                            else least((public.gemini_bucket(b.tpm, b.burst_s)).cap,
                                       b.token_level + v_delta) end,
         cooldown_until = case when v_cool is not null and v_cool > coalesce(b.cooldown_until, '-infinity')
                               then v_cool else b.cooldown_until end,
         cooldown_reason = case when v_cool is not null and v_cool > coalesce(b.cooldown_until, '-infinity')
                                then v_reason else b.cooldown_reason end,
         daily_exhausted_until = case when coalesce(p_daily, false)
                                      then public.gemini_next_daily_reset(t)
                                      else b.daily_exhausted_until end,
         daily_reason = case when coalesce(p_daily, false) then v_reason else b.daily_reason end,
         rate_limited = b.rate_limited + case when v_limited then 1 else 0 end,
         updated_at = t
   where b.model = p_model;
end $$;

-- Every model's budget and state, for /health, /status and /metrics.
create or replace function public.gemini_budget_status()
returns table (model text, rpm integer, tpm bigint, rpd integer, day_requests integer,
               cooldown_until timestamptz, cooldown_reason text,
               daily_exhausted_until timestamptz, daily_reason text,
               granted_requests bigint, rate_limited bigint)
language sql stable set search_path = public, pg_temp as $$
  select b.model, b.rpm, b.tpm, b.rpd,
         case when b.quota_day = (now() at time zone 'America/Los_Angeles')::date
              then b.day_requests else 0 end,
         case when b.cooldown_until > now() then b.cooldown_until end,
         case when b.cooldown_until > now() then b.cooldown_reason end,
         case when b.daily_exhausted_until > now() then b.daily_exhausted_until end,
         case when b.daily_exhausted_until > now() then b.daily_reason end,
         b.granted_requests, b.rate_limited
    from public.gemini_budgets b
   order by b.model
   limit 1000
$$;

-- Claim only what can run: a chapter job whose model (options.model, else the worker's
-- default) is in cool-down or out of its daily quota is not claimed.
create or replace function public.gemini_job_blocked(
  p_job_type text, p_payload jsonb, p_default_model text)
returns boolean language sql stable
set search_path = public, pg_temp as $$
  select p_job_type = 'chapter_generation' and exists (
    select 1 from public.gemini_budgets b
     where b.model = coalesce(p_payload #>> '{options,model}', p_default_model)
       and (b.cooldown_until > now() or b.daily_exhausted_until > now()))
$$;

revoke all on function public.gemini_next_daily_reset(timestamptz),
                       public.gemini_bucket(double precision, double precision),
                       public.gemini_budget_take(text, integer),
                       public.gemini_budget_settle(text, integer, integer, double precision, boolean, text),
                       public.gemini_budget_status(),
                       public.gemini_job_blocked(text, jsonb, text)
  from public, anon, authenticated;
-- The helpers run inside the service role's calls (functions run as their caller).
grant execute on function public.gemini_next_daily_reset(timestamptz),
                          public.gemini_bucket(double precision, double precision),
                          public.gemini_job_blocked(text, jsonb, text),
                          public.gemini_budget_take(text, integer),
                          public.gemini_budget_settle(text, integer, integer, double precision, boolean, text),
                          public.gemini_budget_status()
  to service_role;

notify pgrst, 'reload schema';
