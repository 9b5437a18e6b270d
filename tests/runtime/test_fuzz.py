"""Issue 8, "Must show": hundreds of generated inputs through the real door and the real worker.

A seeded ``random.Random`` builds chapter options (for ``enqueue_chapter_generation``, as a
signed-in user) and raw payloads (for ``enqueue_job``, as service_role): wrong types, huge
strings, deep nesting, unicode edge cases, NUL escapes, numbers as strings, 1e400, arrays,
nulls, unknown keys, and valid ones. Every case is sent as JSON text, so what PostgreSQL
refuses (lone surrogates, ``\\u0000``) is sent too. Then the real runner (in-process) and a
real worker process drain the queue. What must hold:

- every refused call has a clear SQLSTATE and left no job (and no queued chapter);
- every accepted job ends terminal: completed, or failed with an ``error_details.type``
  that README lists; cases built to be valid complete, built to be refused are refused;
- no runner side task dies and the worker process never exits on its own;
- every log line the worker writes is at most 20,000 characters.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.runtime.conftest import running, wait_until
from tests.runtime.test_process import worker_env, worker_process
from tests.support.seed import as_role, create_chapter, create_story, create_user
from tests.support.stores import open_store
from worker.generation.chapter import ChapterHandler, GenerationConfig
from worker.generation.offline import OfflineModel
from worker.generation.payload import parse_payload
from worker.handlers import build_handlers
from worker.logs import setup_logging

pytestmark = pytest.mark.slow

SEED = 20261201
MODEL = "fuzz-model"
LINE_LIMIT = 20_000
MB = 1_048_576
# Codes a refused call may answer with: the door's own (PT4xx) and PostgreSQL's refusal of
# JSON text that jsonb cannot hold (22P02 lone surrogate, 22P05 \u0000, 22021 a raw NUL).
CLEAR_CODES = {"PT400", "PT404", "PT409", "PT429", "22P02", "22P05", "22021"}
ACTIVE = "status in ('pending', 'processing', 'paused')"


def documented_error_types() -> set[str]:
    """The error_details types README promises ("Reading `error_details`")."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    header = "**Reading `error_details`**"
    start = readme.index(header) + len(header)
    section = readme[start : readme.index("`user_message`", start)]
    types = set(re.findall(r"`([a-z_]+)`", section))
    assert {"bad_payload", "internal", "lease_expired"} <= types, types
    return types


# --------------------------------------------------------------------------- the generator

UNICODE_OK = [
    "\u202eevil\u202c",  # RTL override
    "שלום עולם",
    "مرحبا بالعالم",
    "🐉🔥👩‍👩‍👧‍👦🇺🇦",  # emoji, ZWJ sequence, flag
    "e\u0301" * 20,  # combining marks
    "Z̴̡̢a̷̛l̶̢g̸o̵",
    "\ufeffmystery",  # BOM
    "zero\u200bwidth",
    "tab\tand\nnewline\x07bell",
    "\uffff\U0010ffff",
    "'; drop table job_queue; --",
    "%s %d {0} ${x}",
]
UNICODE_REFUSED = {  # what PostgreSQL's jsonb refuses, and how
    "\ud800": "22P02",
    "x\udc00": "22P02",
    "\x00": "22P05",
    "nul\x00inside": "22P05",
}
TEXT_CAPS = {
    "genre": 100,
    "tone": 100,
    "audience": 100,
    "point_of_view": 60,
    "model": 100,
    "instructions": 2000,
}
WRONG_TYPES: list[tuple[str, str]] = [  # (JSON text of a value, label)
    ('"1500"', "number as string"),
    ("1500.5", "float"),
    ("1e400", "1e400"),
    ("-1", "negative"),
    ("100000000000000000000000000000", "huge int"),
    ("true", "bool"),
    ("[1500]", "array"),
    ('{"n": 1500}', "object"),
    ('"ten"', "word"),
    ("0", "zero"),
]


@dataclass
class Case:
    """One generated call: what is sent and what must come of it."""

    label: str
    rpc: str  # 'chapter' (enqueue_chapter_generation) or 'job' (enqueue_job)
    body: str  # JSON text: p_options or p_job_payload
    expect: str  # 'complete' | 'bad_payload' | 'refused' | 'terminal' (any documented end)
    codes: frozenset[str] = frozenset()  # for 'refused': the acceptable SQLSTATEs
    needle: str | None = None  # for 'refused': text the error message must contain
    job_type: str = "chapter_generation"
    bad_chapter: str | None = None  # 'null' | 'foreign' (another user's chapter)


def dumps(value: Any) -> str:
    """JSON text as a client sends it; ensure_ascii keeps lone surrogates as escapes."""
    return json.dumps(value, ensure_ascii=True)


def nested(depth: int, leaf: str = "1") -> str:
    return "[" * depth + leaf + "]" * depth


def valid_value(rng: random.Random, key: str) -> Any:
    if key == "target_words":
        return rng.randint(200, 8000)
    if key == "sections":
        return rng.randint(2, 12)
    if key == "tense":
        return rng.choice(["past", "present"])
    if key == "model":
        return MODEL
    if rng.random() < 0.5:
        return rng.choice(UNICODE_OK)[: TEXT_CAPS[key]]
    return rng.choice("abcé漢🐉 ") * rng.randint(1, TEXT_CAPS[key])


def valid_options(rng: random.Random, small: bool = False) -> dict[str, Any]:
    keys = rng.sample(sorted({"target_words", "sections", "tense", *TEXT_CAPS}), rng.randint(0, 5))
    opts = {k: valid_value(rng, k) for k in keys}
    # The door bounds the whole object at 8 KiB of its text form (UTF-8, ", " and ": ").
    if len(json.dumps(opts, ensure_ascii=False).encode()) > 8000:
        opts.pop("instructions")
    if small:  # what a worker process at the platform's pace finishes quickly
        opts |= {"sections": 2, "target_words": 200}
        opts.pop("instructions", None)
    return opts


def option_case(rng: random.Random, *, small: bool = False) -> Case:
    """One generated p_options, with the outcome the documented limits give it."""
    roll = rng.randrange(14)
    base = valid_options(rng, small)
    if roll <= 2:
        return Case("valid options", "chapter", dumps(base), "complete")
    if roll == 3:
        key = rng.choice(["colour", "Genre", "target words", "", "__proto__", "x" * 300, "🐉"])
        base[key] = rng.choice([1, "a", None, [], {}])
        return Case(
            f"unknown key {key[:20]!r} = {base[key]!r}",
            "chapter",
            dumps(base),
            "refused",
            frozenset({"PT400"}),
            "unknown key",
        )
    if roll == 4:
        key = rng.choice(["target_words", "sections"])
        text, what = rng.choice(WRONG_TYPES)
        body = dumps(base)[:-1] + ("," if base else "") + f'"{key}": {text}}}'
        return Case(
            f"{key} {what}", "chapter", body, "refused", frozenset({"PT400"}), f"p_options.{key}"
        )
    if roll == 5:
        key = rng.choice(sorted(TEXT_CAPS))
        value: Any = rng.choice([1500, 1.5, True, ["a"], {"a": "b"}])
        base[key] = value
        return Case(
            f"{key} wrong type", "chapter", dumps(base), "refused", frozenset({"PT400"}), key
        )
    if roll == 6:
        key = rng.choice(sorted(TEXT_CAPS))
        size = rng.choice([TEXT_CAPS[key] + 1, 5_000, 100_000, MB])
        base[key] = rng.choice("aé🐉") * size
        needle = key if len(dumps(base).encode()) <= 8192 else "too large"
        return Case(
            f"{key} {size} chars", "chapter", dumps(base), "refused", frozenset({"PT400"}), needle
        )
    if roll == 7:
        depth = rng.choice([2, 40, 1_000, 3_000])
        key = rng.choice(["genre", "sections", "deep"])
        body = dumps(base)[:-1] + ("," if base else "") + f'"{key}": {nested(depth)}}}'
        return Case(f"{key} nested {depth}", "chapter", body, "refused", frozenset({"PT400"}))
    if roll == 8:
        key = rng.choice(["genre", "tone", "instructions"])
        bad, code = rng.choice(sorted(UNICODE_REFUSED.items()))
        base[key] = f"before{bad}after"
        if rng.random() < 0.3:  # in a key instead of a value
            base = {bad: "x"}
        return Case(f"unicode {bad!r}", "chapter", dumps(base), "refused", frozenset({code}))
    if roll == 9:
        body = rng.choice(["[]", '"options"', "42", "true", '[{"sections": 3}]'])
        return Case(
            f"options {body}",
            "chapter",
            body,
            "refused",
            frozenset({"PT400"}),
            "p_options must be a JSON object",
        )
    if roll == 10:
        opts = dict(base)
        opts["tense"] = rng.choice(["future", "PAST", "", 1, None])
        expect = "complete" if opts["tense"] is None else "refused"
        return Case(
            "tense", "chapter", dumps(opts), expect, frozenset({"PT400"}), "p_options.tense"
        )
    if roll == 11:  # accepted by the door (any short text), refused by the worker's allow-list
        base["model"] = rng.choice(["gpt-5", "gemini-ultra-max", "🐉", "../../etc/passwd"])
        return Case("model not allowed", "chapter", dumps(base), "bad_payload")
    if roll == 12:  # nulls are "not given"
        opts = {k: None for k in rng.sample(sorted({"target_words", "sections", *TEXT_CAPS}), 3)}
        return Case("nulls", "chapter", dumps(opts), "complete")
    bad = rng.choice(["null", "foreign"])
    return Case(
        f"chapter {bad}",
        "chapter",
        dumps(base),
        "refused",
        frozenset({"PT400" if bad == "null" else "PT404"}),
        "p_chapter_id is required" if bad == "null" else "not found",
        bad_chapter=bad,
    )


def payload_case(rng: random.Random, chapter_ids: list[str]) -> Case:
    """One generated raw job payload (operator path): the object/size/depth door, then the
    worker's own validation for whatever gets in."""
    roll = rng.randrange(10)
    if roll == 0:
        body = rng.choice(['"hello"', "[]", "42", "true", '[{"chapter_id": "x"}]'])
        return Case(
            f"payload {body}",
            "job",
            body,
            "refused",
            frozenset({"PT400"}),
            "must be a JSON object",
        )
    if roll == 1:
        size = rng.choice([70_000, 300_000, MB])
        body = dumps({"chapter_id": rng.choice(chapter_ids), "pad": "p" * size})
        return Case(f"payload {size} B", "job", body, "refused", frozenset({"PT400"}), "too large")
    if roll == 2:
        depth = rng.choice([33, 100, 2_000, 5_000])
        body = f'{{"x": {nested(depth)}}}'
        return Case(f"payload depth {depth}", "job", body, "refused", frozenset({"PT400"}))
    if roll == 3:  # shallow enough to get in, and useless to the worker
        body = f'{{"x": {nested(rng.randint(1, 30))}}}'
        return Case("payload shallow junk", "job", body, "bad_payload")
    if roll == 4:
        cid = rng.choice(
            [
                "not-a-uuid",
                "",
                12345,
                None,
                ["a"],
                {"id": 1},
                "\u202e" + str(uuid.uuid4()),
                "9" * 500,
            ]
        )
        return Case("payload bad chapter_id", "job", dumps({"chapter_id": cid}), "bad_payload")
    if roll == 5:
        bad, code = rng.choice(sorted(UNICODE_REFUSED.items()))
        body = dumps({"chapter_id": rng.choice(chapter_ids), "note": bad})
        return Case(f"payload unicode {bad!r}", "job", body, "refused", frozenset({code}))
    if roll == 6:  # a real chapter id and user id, options fuzzed: the worker decides
        opts = json.loads(option_case(rng).body) if rng.random() < 0.5 else {}
        body = dumps(
            {
                "chapter_id": rng.choice(chapter_ids),
                "user_id": str(uuid.uuid4()),
                "options": opts,
            }
        )
        return Case("payload real chapter", "job", body, "terminal")
    if roll == 7:
        sleep_s = rng.choice(['"0"', "-1", "1e400", "[]", "null", "0.01", "3601"])
        expect = "complete" if sleep_s in ("null", "0.01") else "bad_payload"
        body = f'{{"sleep_s": {sleep_s}}}'
        return Case(f"noop sleep_s {sleep_s}", "job", body, expect, job_type="noop")
    if roll == 8:
        job_type = rng.choice(["mystery", "CHAPTER_GENERATION", "🐉", "x" * 200])
        return Case(f"job_type {job_type[:12]!r}", "job", "{}", "terminal", job_type=job_type)
    return Case(
        "job_type empty",
        "job",
        "{}",
        "refused",
        frozenset({"PT400"}),
        "p_job_type is required",
        job_type="",
    )


def raw_nul_case() -> Case:
    """A raw NUL byte in the JSON text itself (not an escape): refused by the server."""
    return Case("raw NUL byte", "chapter", '{"genre": "a\x00b"}', "refused", frozenset({"22021"}))


# --------------------------------------------------------------------------- sending


@dataclass
class Sent:
    case: Case
    chapter: str | None
    job: str | None = None
    code: str | None = None
    message: str = ""


async def fuzz_user(conn: asyncpg.Connection, chapters: int) -> tuple[str, list[str]]:
    """A user with ``chapters`` draft chapters and caps raised out of the way."""
    user = await create_user(conn)
    story = await create_story(conn, user)
    rows = await conn.fetch(
        "insert into chapters (story_id, owner_id, number) select $1, $2, g"
        " from generate_series(1, $3) g returning id",
        story,
        user,
        chapters,
    )
    await conn.execute(
        "update job_lanes set max_active_per_user = 100000, max_enqueued_per_user_per_hour = 100000"
    )
    return user, [str(r["id"]) for r in rows]


async def send(conn: asyncpg.Connection, case: Case, user: str, chapter: str, foreign: str) -> Sent:
    target = {"null": None, "foreign": foreign}.get(case.bad_chapter or "", chapter)
    sent = Sent(case, target)
    try:
        if case.rpc == "chapter":
            async with as_role(conn, "authenticated", user):
                sent.job = str(
                    await conn.fetchval(
                        "select enqueue_chapter_generation($1, $2::jsonb)", target, case.body
                    )
                )
        else:
            async with as_role(conn, "service_role"):
                sent.job = str(
                    await conn.fetchval(
                        "select enqueue_job($1, $2::jsonb)", case.job_type, case.body
                    )
                )
    except asyncpg.PostgresError as exc:
        sent.code, sent.message = exc.sqlstate, str(exc)
    return sent


async def send_all(
    conn: asyncpg.Connection, cases: list[Case], user: str, chapters: list[str], foreign: str
) -> list[Sent]:
    assert len(chapters) >= len(cases)
    return [
        await send(conn, case, user, chapter, foreign)
        for case, chapter in zip(cases, chapters, strict=False)
    ]


def check_door(results: list[Sent]) -> list[Sent]:
    """Each call's answer against its case; returns the accepted ones."""
    for s in results:
        what = f"{s.case.label}: {s.code} {s.message[:200]}"
        if s.code is not None:
            assert s.code in CLEAR_CODES, what
            assert s.message and len(s.message) <= 1_000, what  # a clear, bounded message
            assert s.case.expect in ("refused", "terminal"), what
            if s.case.codes:
                assert s.code in s.case.codes, what
            if s.case.needle:
                assert s.case.needle in s.message, what
        else:
            assert s.case.expect != "refused", f"{s.case.label} was accepted: {s.case.body[:200]}"
    return [s for s in results if s.job is not None]


async def check_outcomes(conn: asyncpg.Connection, results: list[Sent], types: set[str]) -> None:
    accepted = {s.job: s for s in results if s.job}
    rows = await conn.fetch(
        "select id::text, status, error_details, retry_count from job_queue where id = any($1)",
        list(accepted),
    )
    assert len(rows) == len(accepted)
    for row in rows:
        s = accepted[row["id"]]
        details = json.loads(row["error_details"]) if row["error_details"] else None
        what = f"{s.case.label}: {row['status']} {details} {s.case.body[:200]}"
        assert row["status"] in ("completed", "failed"), what
        if row["status"] == "failed":
            assert details and details["type"] in types, what
            assert details["will_retry"] is False, what
            assert "retried" not in details["user_message"], what  # a final failure
            if details["type"].startswith("store_"):  # only an outage is "unavailable"
                assert "unavailable" not in details["user_message"], what
            assert len(json.dumps(details)) <= 4_000, what
        if s.case.expect == "complete":
            assert row["status"] == "completed", what
        elif s.case.expect == "bad_payload":
            assert row["status"] == "failed" and details["type"] == "bad_payload", what
            assert row["retry_count"] == 0, what
    # A refused call queued nothing and left its chapter as it was.
    refused_chapters = [
        s.chapter for s in results if s.code and s.chapter and s.case.rpc == "chapter"
    ]
    assert not await conn.fetchval(
        "select count(*) from chapters where id = any($1::uuid[]) and status <> 'draft'",
        refused_chapters,
    )


def build_cases(
    rng: random.Random,
    chapter_ids: list[str],
    n_options: int,
    n_payloads: int,
    *,
    small: bool = False,
) -> list[Case]:
    cases = [option_case(rng, small=small) for _ in range(n_options)]
    cases += [payload_case(rng, chapter_ids) for _ in range(n_payloads)]
    if small:
        cases = [
            c
            for c in cases
            if not (c.rpc == "job" and c.expect == "terminal" and "real chapter" in c.label)
        ]
    rng.shuffle(cases)
    return cases


GEN = GenerationConfig(
    default_model=MODEL,
    allowed_models=[MODEL],
    flush_interval_s=0.05,
    flush_chars=4000,
    section_retries=0,
    retry_pause_s=0.01,
    max_rate_limit_wait_s=1,
)


async def drained(conn: asyncpg.Connection) -> bool:
    return not await conn.fetchval(f"select exists (select 1 from job_queue where {ACTIVE})")


# --------------------------------------------------------------------------- the tests


async def test_fuzzed_inputs_through_the_door_and_the_in_process_runner(
    db_dsn: str, conn: asyncpg.Connection, json_logs: pytest.CaptureFixture[str]
) -> None:
    rng = random.Random(SEED)
    user, chapters = await fuzz_user(conn, 320)
    other = await create_user(conn)
    foreign = await create_chapter(conn, await create_story(conn, other), other)
    cases = [*build_cases(rng, chapters, 220, 90), raw_nul_case()]
    results = await send_all(conn, cases, user, chapters, foreign)
    accepted = check_door(results)
    # The generator reaches every branch: valid, refused by the door, refused by the worker.
    expects = [c.expect for c in cases]
    assert min(expects.count(e) for e in ("complete", "refused", "bad_payload", "terminal")) >= 10
    assert len({s.code for s in results if s.code}) >= 4
    assert await conn.fetchval("select count(*) from job_queue") == len(accepted)

    model = OfflineModel(chunk_delay_s=0, min_chunk_chars=200, max_chunk_chars=400)
    handlers = build_handlers(ChapterHandler(model, GEN))
    # A job's start and completion lines are DEBUG (cheap at INFO): log at DEBUG so every
    # job writes lines here and every one of them is checked below.
    setup_logging("DEBUG", "json")
    try:
        async with open_store("postgres", db_dsn) as store, running(store, handlers) as runner:
            await wait_until(lambda: drained(conn), timeout=120)
            assert runner.side_tasks_alive and runner.fatal is None
    finally:
        setup_logging("INFO", "json")
    assert runner.metrics.claim_loop_errors._value.get() == 0
    await check_outcomes(conn, results, documented_error_types())

    lines = json_logs.readouterr().out.splitlines()
    assert len(lines) >= len(accepted)
    for line in lines:
        assert len(line) <= LINE_LIMIT, line[:300]
        record = json.loads(line)
        assert record["level"] != "CRITICAL", line[:300]


async def test_fuzzed_inputs_through_a_worker_process(
    db_dsn: str, conn: asyncpg.Connection
) -> None:
    """A subset at the platform's pace: a real `python -m worker run` drains it and stays up."""
    rng = random.Random(SEED + 1)
    user, chapters = await fuzz_user(conn, 90)
    other = await create_user(conn)
    foreign = await create_chapter(conn, await create_story(conn, other), other)
    cases = build_cases(rng, chapters, 55, 30, small=True)
    results = await send_all(conn, cases, user, chapters, foreign)
    accepted = check_door(results)
    assert accepted and any(s.code for s in results)

    # DEBUG: a job's start and completion lines too (see the in-process test).
    env = worker_env(db_dsn, WORKER_ID="fuzz-process", GEMINI_MODEL=MODEL, LOG_LEVEL="DEBUG")
    with worker_process(env) as proc:
        await wait_until(lambda: drained(conn), timeout=120)
        alive = proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 20)
        output = proc.stdout.read().decode()  # type: ignore[union-attr]
    assert alive and code == 0, output[-3000:]
    await check_outcomes(conn, results, documented_error_types())
    lines = output.splitlines()
    assert len(lines) >= len(accepted)
    assert all(len(line) <= LINE_LIMIT for line in lines)
    assert "CRITICAL" not in output and "Traceback" not in output


async def test_the_per_user_caps_refuse_with_pt429_and_queue_nothing(
    conn: asyncpg.Connection,
) -> None:
    """The caps the fuzz tests raise: active jobs, then enqueues per hour (cancel + re-enqueue
    does not get around the second)."""
    user = await create_user(conn)
    story = await create_story(conn, user)
    chapters = [await create_chapter(conn, story, user, n) for n in range(1, 8)]
    await conn.execute(
        "update job_lanes set max_active_per_user = 3, max_enqueued_per_user_per_hour = 5"
        " where lane = 'default'"
    )

    async def enqueue(chapter: str) -> str:
        async with as_role(conn, "authenticated", user):
            return str(await conn.fetchval("select enqueue_chapter_generation($1)", chapter))

    async def cancel(job: str) -> None:
        async with as_role(conn, "authenticated", user):
            assert await conn.fetchval("select cancel_job($1)", job)

    jobs = [await enqueue(c) for c in chapters[:3]]
    with pytest.raises(asyncpg.PostgresError) as err:
        await enqueue(chapters[3])
    assert err.value.sqlstate == "PT429" and "too many active jobs" in str(err.value)
    assert await conn.fetchval("select count(*) from job_queue") == 3
    assert await conn.fetchval("select status from chapters where id = $1", chapters[3]) == "draft"

    # Cancelling frees an active slot, but every enqueue counts against the hour.
    await cancel(jobs[0])
    jobs.append(await enqueue(chapters[3]))
    await cancel(jobs[1])
    jobs.append(await enqueue(chapters[4]))  # the fifth this hour
    await cancel(jobs[2])
    with pytest.raises(asyncpg.PostgresError) as err:
        await enqueue(chapters[5])
    assert err.value.sqlstate == "PT429" and "in the last hour" in str(err.value)
    assert await conn.fetchval("select count(*) from job_queue") == 5
    # Another user is not affected by this one's caps.
    other = await create_user(conn)
    other_chapter = await create_chapter(conn, await create_story(conn, other), other)
    async with as_role(conn, "authenticated", other):
        assert await conn.fetchval("select enqueue_chapter_generation($1)", other_chapter)


async def test_the_door_and_the_worker_agree_on_null_and_unknown_options(
    conn: asyncpg.Connection,
) -> None:
    """Found by the fuzz test: the door let {"colour": null} in for the worker to refuse,
    and the worker refused {"target_words": null} that the door calls "not given"."""
    user = await create_user(conn)
    story = await create_story(conn, user)
    first, second = [await create_chapter(conn, story, user, n) for n in (1, 2)]
    with pytest.raises(asyncpg.PostgresError) as err:
        async with as_role(conn, "authenticated", user):
            await conn.fetchval(
                "select enqueue_chapter_generation($1, $2)", first, '{"colour": null}'
            )
    assert err.value.sqlstate == "PT400" and "unknown key 'colour'" in str(err.value)
    nulls = {"target_words": None, "sections": None, "genre": None, "tense": None, "model": None}
    async with as_role(conn, "authenticated", user):
        job = await conn.fetchval(
            "select enqueue_chapter_generation($1, $2)", second, json.dumps(nulls)
        )
    payload = json.loads(
        await conn.fetchval("select job_payload from job_queue where id = $1", job)
    )
    parsed = parse_payload(payload, job_user_id=user, default_model=MODEL, allowed_models=[MODEL])
    assert (parsed.options.target_words, parsed.options.sections) == (1500, 5)
    assert (parsed.options.genre, parsed.options.tense, parsed.options.model) == (None, None, MODEL)
