"""Logging: JSON lines with job context, redaction of secrets, text mode, idempotent setup."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from worker import logs
from worker.logs import bind_worker, job_context, register_secret, setup_logging

log = logging.getLogger("genworker.test")

SECRET = "registered-secret-value-1234567890"
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJyb2xlIjoic2VydmljZV9yb2xlIn0."
    "c2lnbmF0dXJlLWJ5dGVzLWhlcmU"
)


def _ours() -> list[logging.Handler]:
    return [h for h in logging.getLogger().handlers if getattr(h, "_genworker_handler", False)]


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    token = bind_worker(None)
    yield
    for handler in _ours():
        root.removeHandler(handler)
    root.setLevel(level)
    logs._worker_id.reset(token)


def json_lines(capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    out = capsys.readouterr().out
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_json_lines_carry_context_and_extras(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO", "json")
    bind_worker("render-srv-1-x-42-beef")
    log.info("before")
    with job_context("job-1", "chapter_generation", 2):
        log.info("section %d of %d", 3, 8, extra={"chapter_id": "ch-9", "chars": 1200})
    log.debug("hidden at INFO")
    before, inside = json_lines(capsys)
    assert set(before) == {"ts", "level", "logger", "msg", "worker_id"}
    assert before["worker_id"] == "render-srv-1-x-42-beef"
    assert before["ts"].endswith("Z") and before["level"] == "INFO"
    assert before["logger"] == "genworker.test"
    assert inside == {
        "ts": inside["ts"],
        "level": "INFO",
        "logger": "genworker.test",
        "msg": "section 3 of 8",
        "worker_id": "render-srv-1-x-42-beef",
        "job_id": "job-1",
        "job_type": "chapter_generation",
        "attempt": 2,
        "chapter_id": "ch-9",
        "chars": 1200,
    }


async def test_concurrent_jobs_keep_their_own_context(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO", "json")

    async def job(job_id: str) -> None:
        with job_context(job_id, "chapter_generation", 1):
            await asyncio.sleep(0)
            log.info("working")
            await asyncio.sleep(0)
            log.info("done")

    await asyncio.gather(job("a"), job("b"))
    lines = json_lines(capsys)
    assert sorted(line["job_id"] for line in lines) == ["a", "a", "b", "b"]
    assert logs.current_context() == {}


def test_one_record_is_one_line_with_exception(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO", "json")
    try:
        raise RuntimeError(f"connect failed: postgresql://postgres:{SECRET}@db.x.co:5432/db")
    except RuntimeError:
        log.exception("first line\nsecond line")
    (line,) = json_lines(capsys)
    assert line["msg"] == "first line\nsecond line"
    assert line["exc_type"] == "RuntimeError"
    assert "Traceback" in line["exc"] and "connect failed" in line["exc"]
    assert SECRET not in line["exc"]


def test_redaction(capsys: pytest.CaptureFixture[str]) -> None:
    register_secret(SECRET)
    setup_logging("INFO", "json")
    log.info("key is %s", SECRET)
    log.info("GET /rest/v1/rpc headers Authorization: Bearer abc.def-ghi_jkl=")
    log.info("token %s", JWT)
    log.info("dsn postgresql://postgres.ref:p@ss:w0rd@aws-0.pooler.supabase.com:6543/postgres")
    log.info("url https://generativelanguage.googleapis.com/v1?alt=sse&key=AIzaSyXXXX&x=1")
    log.info("rest apikey=sb_secret_abcdefgh12345678 done")
    log.info(
        "extras",
        extra={
            "headers": {"apikey": "short", "Accept": "json"},
            "api_key": "x",
            "payload": [SECRET, {"jwt": JWT}],
        },
    )
    lines = json_lines(capsys)
    text = json.dumps(lines)
    for leaked in (
        SECRET,
        JWT,
        "abc.def-ghi_jkl",
        "p@ss:w0rd",
        "w0rd",
        "AIzaSyXXXX",
        "sb_secret_abcdefgh",
        "short",
    ):
        assert leaked not in text, leaked
    assert lines[0]["msg"] == "key is ***"
    assert lines[1]["msg"].endswith("Authorization: Bearer ***")
    assert lines[2]["msg"] == "token ***"
    assert lines[3]["msg"] == (
        "dsn postgresql://postgres.ref:***@aws-0.pooler.supabase.com:6543/postgres"
    )
    assert "?alt=sse&key=***&x=1" in lines[4]["msg"]
    assert lines[5]["msg"] == "rest apikey=*** done"
    assert lines[6]["headers"] == {"apikey": "***", "Accept": "json"}
    assert lines[6]["api_key"] == "***"
    assert lines[6]["payload"] == ["***", {"jwt": "***"}]


def test_redact_leaves_ordinary_text_alone() -> None:
    text = (
        "chapter 3: 1200 chars, max_tokens=6000 https://abc.supabase.co/rest/v1/rpc "
        "postgresql://postgres@127.0.0.1:5432/postgres"
    )
    assert logs.redact(text) == text


def test_short_values_are_not_registered() -> None:
    register_secret("abc")
    register_secret(None)
    assert logs.redact("abcdef") == "abcdef"


def test_text_mode(capsys: pytest.CaptureFixture[str]) -> None:
    register_secret(SECRET)
    setup_logging("DEBUG", "text")
    bind_worker("w-1")
    with job_context("job-7", "chapter_generation", 1):
        log.debug("writing %s", SECRET, extra={"offset": 40})
    out = capsys.readouterr().out
    assert not out.startswith("{")
    assert "DEBUG" in out and "genworker.test: writing ***" in out
    assert "worker_id=w-1 job_id=job-7 job_type=chapter_generation attempt=1 offset=40" in out
    assert SECRET not in out


def test_auto_is_json_when_stdout_is_not_a_tty(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO")
    log.info("hello")
    assert json_lines(capsys)[0]["msg"] == "hello"


def test_setup_is_idempotent(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO", "json")
    setup_logging("WARNING", "json")
    assert len(_ours()) == 1
    log.info("dropped at WARNING")
    log.warning("once")
    assert [line["msg"] for line in json_lines(capsys)] == ["once"]


def test_bad_level_or_format() -> None:
    with pytest.raises(ValueError, match="log level"):
        setup_logging("verbose")
    with pytest.raises(ValueError, match="log format"):
        setup_logging("INFO", "xml")


# -- bounded lines (issue 8: a 1 MB user value once made a 1,048,931-character line) ---------

BIG = "u" * 1_048_576  # what a user can put in one option value
LINE_LIMIT = 20_000  # the fixed ceiling the runtime tests hold every worker line to


def assert_clipped(value: str, original: int, limit: int) -> None:
    """Within ``limit``, ending in '... [N more characters]' where N is what was cut."""
    kept, sep, tail = value.rpartition("... [")
    assert sep and tail.endswith(" more characters]"), value[-80:]
    assert len(value) <= limit
    assert len(kept) + int(tail.removesuffix(" more characters]")) == original


def test_a_megabyte_in_the_message_is_clipped(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO", "json")
    log.info("bad target_words %s", BIG)
    out = capsys.readouterr().out
    (line,) = out.splitlines()
    assert len(line) <= LINE_LIMIT
    msg = json.loads(line)["msg"]
    assert msg.startswith("bad target_words uuu")
    assert_clipped(msg, len("bad target_words ") + len(BIG), logs.MAX_MESSAGE_CHARS)


def test_a_megabyte_in_extra_fields_is_clipped(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO", "json")
    log.info(
        "payload",
        extra={
            "target_words": BIG,
            "payload": {"options": {"genre": BIG, "tags": [BIG] * 3}},
            "many": list(range(100_000)),
        },
    )
    (line,) = capsys.readouterr().out.splitlines()
    assert len(line) <= LINE_LIMIT
    rec = json.loads(line)
    assert_clipped(rec["target_words"], len(BIG), logs.MAX_FIELD_CHARS)
    options = rec["payload"]["options"]
    assert options["genre"].startswith("uuu")
    for value in (options["genre"], *options["tags"]):
        assert_clipped(value, len(BIG), logs.MAX_FIELD_CHARS)
    assert rec["many"] == list(range(logs.MAX_FIELD_ITEMS))


def test_a_megabyte_in_an_exception_is_clipped(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO", "json")
    try:
        raise ValueError(f"options.genre must be short, got {BIG}")
    except ValueError:
        log.exception("job failed")
    (line,) = capsys.readouterr().out.splitlines()
    assert len(line) <= LINE_LIMIT
    rec = json.loads(line)
    assert rec["exc_type"] == "ValueError" and rec["exc"].startswith("Traceback")
    assert "ValueError: options.genre" in rec["exc"]
    _, _, tail = rec["exc"].rpartition("... [")
    assert len(rec["exc"]) <= logs.MAX_TRACEBACK_CHARS
    assert int(tail.removesuffix(" more characters]")) > len(BIG) - logs.MAX_TRACEBACK_CHARS


def test_text_lines_are_bounded_too(capsys: pytest.CaptureFixture[str]) -> None:
    setup_logging("INFO", "text")
    try:
        raise ValueError(BIG)
    except ValueError:
        log.exception("value %s", BIG, extra={"genre": BIG})
    out = capsys.readouterr().out
    assert len(out) <= LINE_LIMIT
    assert out.count(" more characters]") == 3


def test_secrets_are_masked_where_a_line_is_clipped(capsys: pytest.CaptureFixture[str]) -> None:
    """Masking runs before clipping: a secret that straddles the cut leaves no prefix."""
    register_secret(SECRET)
    setup_logging("INFO", "json")
    # Each secret starts before the cut (limit minus the marker) and ends after it.
    straddle = "a" * (logs.MAX_MESSAGE_CHARS - 40) + SECRET + BIG
    field_straddle = "b" * (logs.MAX_FIELD_CHARS - 60) + " " + JWT + " " + BIG
    try:
        raise RuntimeError(f"{SECRET} {JWT} " + BIG)
    except RuntimeError:
        log.exception(
            "%s",
            straddle,
            extra={"note": field_straddle, "nested": {"deep": [field_straddle]}, "token": BIG},
        )
    (line,) = capsys.readouterr().out.splitlines()
    assert len(line) <= LINE_LIMIT
    rec = json.loads(line)
    for leaked in (SECRET[:10], JWT[:10]):
        assert leaked not in line, leaked
    assert rec["msg"].startswith("a" * 100) and "***" in rec["msg"]
    assert rec["note"].startswith("b" * 100) and "***" in rec["note"]
    assert "***" in rec["nested"]["deep"][0]
    assert rec["token"] == "***"
    assert "*** ***" in rec["exc"]
