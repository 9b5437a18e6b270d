"""The REST transport on the wire: the exact HTTP requests it sends, and how it maps responses.

The real supabase-py client builds every request; respx intercepts httpx underneath it. The
second half drives the real client against the PostgREST gateway (real database) with
injected faults, to show that retried writes stay idempotent end to end.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest
import respx

from tests.store._helpers import chapter_job, insert_job
from tests.support.postgrest_gateway import Gateway
from worker.store import Store
from worker.store.base import (
    ClaimedJob,
    ConflictError,
    ForbiddenError,
    InvalidInputError,
    Job,
    NotFoundError,
    StoreError,
    TransientStoreError,
)
from worker.store.supabase import SupabaseTransport, build_http_client

URL = "https://proj.supabase.co"
# A JWT-shaped service key; it must never show up in an error message.
KEY = "eyJhbGciOiJIUzI1NiJ9.eyJyb2xlIjoic2VydmljZV9yb2xlIn0.c2VydmljZS1zZWNyZXQtc2lnbmF0dXJl"
JOB = "6f1c1a52-5d0e-4b7a-9a57-0c7e2f1d9a01"
W = "w-1"
JSON_HEADERS = {"content-type": "application/json; charset=utf-8"}


@pytest.fixture
async def mock() -> AsyncIterator[respx.MockRouter]:
    async with respx.mock(base_url=URL, assert_all_called=True) as router:
        yield router


@pytest.fixture
async def sb() -> AsyncIterator[Store]:
    s = await Store(SupabaseTransport(URL, KEY, concurrency=2)).open()
    try:
        yield s
    finally:
        await s.close()


def body(route: respx.Route, n: int = -1) -> Any:
    return json.loads(route.calls[n].request.content)


def pgrst_error(
    status: int, code: str, message: str, details: Any = None, hint: Any = None
) -> httpx.Response:
    """An error exactly as PostgREST answers it (body + Proxy-Status header)."""
    return httpx.Response(
        status,
        json={"code": code, "message": message, "details": details, "hint": hint},
        headers={"Proxy-Status": f"PostgREST; error={code}"},
    )


def json_response(value: Any, status: int = 200) -> httpx.Response:
    return httpx.Response(status, content=json.dumps(value).encode(), headers=JSON_HEADERS)


def assert_key_hidden(exc: BaseException) -> None:
    for text in (str(exc), repr(exc), *map(str, exc.args)):
        assert KEY not in text
        assert KEY.split(".")[-1] not in text


# -- the exact requests ---------------------------------------------------------------------


async def test_claim_request_is_pinned(mock: respx.MockRouter, sb: Store) -> None:
    route = mock.post("/rest/v1/rpc/claim_next_job_v3").respond(
        json=[
            {
                "job_id": JOB,
                "job_type": "chapter_generation",
                "job_payload": {"chapter_id": "c1"},
                "retry_count": 2,
            }
        ]
    )
    claimed = await sb.claim(W, ["chapter_generation"], None)
    assert claimed == ClaimedJob(JOB, "chapter_generation", {"chapter_id": "c1"}, 2)

    req = route.calls.last.request
    assert req.method == "POST"
    assert req.url == httpx.URL(f"{URL}/rest/v1/rpc/claim_next_job_v3")
    assert req.content == (
        b'{"worker_id":"w-1","job_types":["chapter_generation"],"job_lanes":null}'
    )
    h = req.headers
    assert h["apikey"] == KEY
    assert h["authorization"] == f"Bearer {KEY}"
    assert h["accept-profile"] == "public" and h["content-profile"] == "public"
    assert h["content-type"] == "application/json"
    assert h["x-client-info"].startswith("supabase-py/2.34")
    assert "prefer" not in h  # no count=, and RPCs need no return=


async def test_claim_lanes_only(mock: respx.MockRouter, sb: Store) -> None:
    route = mock.post("/rest/v1/rpc/claim_next_job_v3").respond(json=[])
    assert await sb.claim(W, None, ["fast", "bulk"]) is None
    assert await sb.claim(W, [], []) is None
    assert route.calls[0].request.content == (
        b'{"worker_id":"w-1","job_types":null,"job_lanes":["fast","bulk"]}'
    )
    assert route.calls[1].request.content == (
        b'{"worker_id":"w-1","job_types":null,"job_lanes":null}'
    )


async def test_get_job_request_and_row_types(mock: respx.MockRouter, sb: Store) -> None:
    row = {
        "id": JOB,
        "job_type": "chapter_generation",
        "job_lane": "default",
        "status": "processing",
        "priority": 0,
        "job_payload": {"chapter_id": "c1"},
        "job_result": None,
        "error_details": None,
        "retry_count": 1,
        "max_retries": 3,
        "lease_timeout_s": 60,
        "scheduled_at": "2026-11-22T08:00:00.123456+00:00",
        "worker_id": W,
        "heartbeat_at": "2026-11-22T08:00:05+00:00",
        "started_at": "2026-11-22T08:00:01.5+00:00",
        "completed_at": None,
        "created_at": "2026-11-22T07:59:59+00:00",
        "updated_at": "2026-11-22T08:00:05+00:00",
        "user_id": "00000000-0000-0000-0000-00000000a11c",
        "idempotency_key": None,
        "progress": 0,
        "current_step": None,
    }
    route = mock.post("/rest/v1/rpc/get_job").mock(
        side_effect=[json_response([row]), json_response([])]
    )
    job = await sb.get_job(JOB)
    assert isinstance(job, Job)
    assert (job.id, job.status, job.worker_id, job.retry_count) == (JOB, "processing", W, 1)
    assert job.user_id == "00000000-0000-0000-0000-00000000a11c"
    assert job.job_payload == {"chapter_id": "c1"}
    assert job.started_at == datetime(2026, 11, 22, 8, 0, 1, 500000, tzinfo=UTC)
    assert job.scheduled_at is not None and job.scheduled_at.utcoffset() is not None
    assert await sb.get_job(JOB) is None

    req = route.calls[0].request
    assert req.method == "POST"
    assert req.url == httpx.URL(f"{URL}/rest/v1/rpc/get_job")
    assert req.content == f'{{"p_job_id":"{JOB}"}}'.encode()
    assert req.headers["accept-profile"] == "public"
    assert req.headers["authorization"] == f"Bearer {KEY}"


async def test_fail_retry_path_is_the_fenced_patch(mock: respx.MockRouter, sb: Store) -> None:
    route = mock.patch("/rest/v1/job_queue").respond(json=[{"id": JOB, "status": "pending"}])
    at = datetime(2026, 11, 22, 9, 30, 15, 250000, tzinfo=UTC)
    details = {"type": "rate_limited", "will_retry": True, "attempt": 2}
    assert await sb.fail(JOB, W, error_details=details, retry_count=2, retry_at=at) is True

    req = route.calls.last.request
    assert req.method == "PATCH"
    assert req.url.raw_path == (
        f"/rest/v1/job_queue?id=eq.{JOB}&worker_id=eq.{W}&status=eq.processing".encode()
    )
    assert req.headers["prefer"] == "return=representation"
    assert req.headers["content-profile"] == "public"
    assert req.headers["apikey"] == KEY and req.headers["authorization"] == f"Bearer {KEY}"
    assert json.loads(req.content) == {
        "status": "pending",
        "retry_count": 2,
        "scheduled_at": "2026-11-22T09:30:15.250000+00:00",
        "error_details": details,
    }


async def test_fail_final_path_body(mock: respx.MockRouter, sb: Store) -> None:
    route = mock.patch("/rest/v1/job_queue").respond(json=[{"id": JOB, "status": "failed"}])
    assert await sb.fail(JOB, W, error_details={"type": "x"}, retry_count=4, retry_at=None)
    assert body(route) == {"status": "failed", "error_details": {"type": "x"}}


async def test_fail_patch_matching_no_row_is_false(mock: respx.MockRouter, sb: Store) -> None:
    route = mock.patch("/rest/v1/job_queue").respond(json=[])
    assert await sb.fail(JOB, W, error_details={}, retry_count=1, retry_at=None) is False
    assert route.call_count == 1  # a lost lease is an answer, not an error: no retry


async def test_heartbeat_many_request(mock: respx.MockRouter, sb: Store) -> None:
    route = mock.post("/rest/v1/rpc/heartbeat_jobs").respond(json=[JOB])
    other = "0b5e2c1d-0000-4000-8000-000000000002"
    assert await sb.heartbeat_many([JOB, other], W) == {JOB}
    assert route.calls.last.request.content == (
        f'{{"p_worker_id":"w-1","p_job_ids":["{JOB}","{other}"]}}'.encode()
    )
    assert await sb.heartbeat_many([], W) == set()
    assert route.call_count == 1  # nothing to send, no request


async def test_append_request_carries_every_parameter(mock: respx.MockRouter, sb: Store) -> None:
    route = mock.post("/rest/v1/rpc/append_chapter_content").respond(json=True)
    assert await sb.append_chapter(
        JOB,
        W,
        offset=120,
        text="Ünïcode — text\n",
        progress=45,
        current_step="section 2/4: Storm",
        checkpoint={"sections_done": 2, "content_length": 135},
    )
    assert await sb.append_chapter(JOB, W, offset=135, text="more", progress=50, current_step="s3")
    first = route.calls[0].request.content
    assert (
        first
        == (
            '{"p_job_id":"' + JOB + '","p_worker_id":"w-1","p_offset":120,'
            '"p_text":"Ünïcode — text\\n","p_progress":45,"p_current_step":"section 2/4: Storm",'
            '"p_checkpoint":{"sections_done":2,"content_length":135}}'
        ).encode()
    )
    assert body(route, 1)["p_checkpoint"] is None


FAILED_AFTER = datetime(2026, 11, 1, tzinfo=UTC)
RPC_CASES: list[tuple[str, Callable[[Store], Awaitable[Any]], str, dict[str, Any], Any, Any]] = [
    (
        "heartbeat",
        lambda s: s.heartbeat(JOB, W),
        "update_job_heartbeat",
        {"p_job_id": JOB, "p_worker_id": W},
        True,
        True,
    ),
    (
        "heartbeat-lost",
        lambda s: s.heartbeat(JOB, W),
        "update_job_heartbeat",
        {"p_job_id": JOB, "p_worker_id": W},
        False,
        False,
    ),
    (
        "complete",
        lambda s: s.complete(JOB, W, {"words": 3}),
        "complete_job",
        {"p_job_id": JOB, "p_worker_id": W, "p_job_result": {"words": 3}},
        True,
        True,
    ),
    (
        "release",
        lambda s: s.release(JOB, W),
        "release_job",
        {"p_job_id": JOB, "p_worker_id": W},
        True,
        True,
    ),
    (
        "release_worker_jobs",
        lambda s: s.release_worker_jobs(W),
        "release_worker_jobs",
        {"p_worker_id": W},
        2,
        2,
    ),
    (
        "queue_stats",
        lambda s: s.queue_stats(),
        "queue_stats",
        {},
        {"by_status": {"pending": 1}},
        {"by_status": {"pending": 1}},
    ),
    ("ping", lambda s: s.ping(), "queue_stats", {}, {"by_status": {}}, None),
    (
        "start_chapter",
        lambda s: s.start_chapter(JOB, W, 2000),
        "start_chapter_generation",
        {"p_job_id": JOB, "p_worker_id": W, "p_tail_chars": 2000},
        {"chapter": {"id": "c1"}},
        {"chapter": {"id": "c1"}},
    ),
    (
        "start_chapter-lost",
        lambda s: s.start_chapter(JOB, W, 10),
        "start_chapter_generation",
        {"p_job_id": JOB, "p_worker_id": W, "p_tail_chars": 10},
        None,
        None,
    ),
    (
        "save_outline",
        lambda s: s.save_outline(JOB, W, "T", {"sections": []}),
        "save_chapter_outline",
        {"p_job_id": JOB, "p_worker_id": W, "p_title": "T", "p_outline": {"sections": []}},
        True,
        True,
    ),
    (
        "rewind",
        lambda s: s.rewind_chapter(JOB, W, 40),
        "rewind_chapter_content",
        {"p_job_id": JOB, "p_worker_id": W, "p_length": 40},
        True,
        True,
    ),
    (
        "finish",
        lambda s: s.finish_chapter(JOB, W),
        "finish_chapter",
        {"p_job_id": JOB, "p_worker_id": W},
        1234,
        1234,
    ),
    (
        "finish-lost",
        lambda s: s.finish_chapter(JOB, W),
        "finish_chapter",
        {"p_job_id": JOB, "p_worker_id": W},
        None,
        None,
    ),
    (
        "requeue_failed",
        lambda s: s.requeue_failed(job_type="a", failed_after=FAILED_AFTER),
        "requeue_failed_jobs",
        {
            "p_job_ids": None,
            "p_job_type": "a",
            "p_failed_after": "2026-11-01T00:00:00+00:00",
            "p_limit": 1000,
        },
        [JOB],
        [JOB],
    ),
    (
        "purge_finished",
        lambda s: s.purge_finished(30),
        "purge_finished_jobs",
        {"p_older_than_days": 30},
        7,
        7,
    ),
    (
        "enqueue_chapter",
        lambda s: s.enqueue_chapter("c1", {"target_words": 900}, "k1"),
        "admin_enqueue_chapter",
        {"p_chapter_id": "c1", "p_options": {"target_words": 900}, "p_idempotency_key": "k1"},
        JOB,
        JOB,
    ),
    (
        "enqueue_job",
        lambda s: s.enqueue_job("noop", {"n": 1}, priority=5, delay_s=1.5),
        "enqueue_job",
        {
            "p_job_type": "noop",
            "p_job_payload": {"n": 1},
            "p_priority": 5,
            "p_job_lane": "default",
            "p_max_retries": 3,
            "p_delay_s": 1.5,
        },
        JOB,
        JOB,
    ),
    (
        "story_progress",
        lambda s: s.story_progress("s1"),
        "story_progress",
        {"p_story_id": "s1", "p_with_content": False},
        [{"number": 1}],
        [{"number": 1}],
    ),
]


@pytest.mark.parametrize(
    ("call", "fn", "params", "answer", "expected"),
    [c[1:] for c in RPC_CASES],
    ids=[c[0] for c in RPC_CASES],
)
async def test_rpc_requests_and_results(
    mock: respx.MockRouter,
    sb: Store,
    call: Callable[[Store], Awaitable[Any]],
    fn: str,
    params: dict[str, Any],
    answer: Any,
    expected: Any,
) -> None:
    route = mock.post(f"/rest/v1/rpc/{fn}").mock(return_value=json_response(answer))
    assert await call(sb) == expected
    assert route.call_count == 1
    req = route.calls.last.request
    assert json.loads(req.content) == params
    assert list(json.loads(req.content)) == list(params)  # argument order as sent
    assert req.headers["authorization"] == f"Bearer {KEY}"
    assert req.headers["content-profile"] == "public"


# -- documented responses → StoreErrors -----------------------------------------------------


async def test_setof_empty_array_is_none(mock: respx.MockRouter, sb: Store) -> None:
    mock.post("/rest/v1/rpc/claim_next_job_v3").respond(json=[])
    assert await sb.claim(W, None, None) is None


async def test_pgrst202_is_not_found(mock: respx.MockRouter, sb: Store) -> None:
    route = mock.post("/rest/v1/rpc/claim_next_job_v3").mock(
        return_value=pgrst_error(
            404,
            "PGRST202",
            "Could not find the function public.claim_next_job_v3(job_lanes, job_types, worker_id)"
            " in the schema cache",
            "Searched for the function public.claim_next_job_v3 with parameters job_lanes, "
            "job_types, worker_id or with a single unnamed json/jsonb parameter, but no matches "
            "were found in the schema cache.",
            None,
        )
    )
    with pytest.raises(NotFoundError) as err:
        await sb.claim(W, None, None)
    assert err.value.code == "PGRST202" and not err.value.transient
    assert "schema cache" in str(err.value)
    assert route.call_count == 1
    assert_key_hidden(err.value)


async def test_pgrst202_on_an_idempotent_call_is_not_retried(
    mock: respx.MockRouter, sb: Store
) -> None:
    route = mock.post("/rest/v1/rpc/update_job_heartbeat").mock(
        return_value=pgrst_error(404, "PGRST202", "Could not find the function")
    )
    with pytest.raises(NotFoundError):
        await sb.heartbeat(JOB, W)
    assert route.call_count == 1


@pytest.mark.parametrize(
    ("status", "code", "exc_type"),
    [
        (409, "PT409", ConflictError),
        (409, "23505", ConflictError),
        (403, "PT403", ForbiddenError),
        (403, "42501", ForbiddenError),
        (404, "PT404", NotFoundError),
        (400, "PT400", InvalidInputError),
        (400, "P0001", InvalidInputError),
        (401, "PGRST301", StoreError),
    ],
)
async def test_permanent_errors_map_and_are_not_retried(
    mock: respx.MockRouter, sb: Store, status: int, code: str, exc_type: type
) -> None:
    route = mock.post("/rest/v1/rpc/append_chapter_content").mock(
        return_value=pgrst_error(status, code, f"error {code}")
    )
    with pytest.raises(StoreError) as err:
        await sb.append_chapter(JOB, W, offset=0, text="x", progress=1, current_step="s")
    assert type(err.value) is exc_type
    assert err.value.code == code and not err.value.transient
    assert str(err.value) == f"error {code}"
    assert route.call_count == 1
    assert_key_hidden(err.value)


async def test_append_offset_conflict(mock: respx.MockRouter, sb: Store) -> None:
    mock.post("/rest/v1/rpc/append_chapter_content").mock(
        return_value=pgrst_error(
            409,
            "PT409",
            "append offset mismatch on chapter c1: content has 10 characters, "
            "the append expected 5",
        )
    )
    with pytest.raises(ConflictError, match="offset mismatch") as err:
        await sb.append_chapter(JOB, W, offset=5, text="x", progress=1, current_step="s")
    assert err.value.kind == "conflict"


@pytest.mark.parametrize(
    ("status", "code"),
    [(503, "PGRST003"), (504, "PGRST003"), (503, "PGRST000"), (500, "40001"), (500, "57014")],
)
async def test_claim_transient_is_not_retried(
    mock: respx.MockRouter, sb: Store, status: int, code: str
) -> None:
    route = mock.post("/rest/v1/rpc/claim_next_job_v3").mock(
        return_value=pgrst_error(status, code, "Timed out acquiring connection")
    )
    with pytest.raises(TransientStoreError) as err:
        await sb.claim(W, None, None)
    assert err.value.code == code and err.value.transient
    assert route.call_count == 1  # the claim is not idempotent: never retried
    assert_key_hidden(err.value)


async def test_heartbeat_503_retried_until_success(mock: respx.MockRouter, sb: Store) -> None:
    unavailable = pgrst_error(503, "PGRST003", "Timed out acquiring connection from pool.")
    route = mock.post("/rest/v1/rpc/update_job_heartbeat").mock(
        side_effect=[unavailable, unavailable, json_response(True)]
    )
    assert await sb.heartbeat(JOB, W) is True
    assert route.call_count == 3
    assert len({c.request.content for c in route.calls}) == 1  # the same request each time


async def test_heartbeat_many_is_not_retried(mock: respx.MockRouter, sb: Store) -> None:
    route = mock.post("/rest/v1/rpc/heartbeat_jobs").mock(
        return_value=pgrst_error(503, "PGRST003", "Timed out acquiring connection from pool.")
    )
    with pytest.raises(TransientStoreError):
        await sb.heartbeat_many([JOB], W)
    assert route.call_count == 1


async def test_retries_stop_after_four_attempts(mock: respx.MockRouter, sb: Store) -> None:
    route = mock.post("/rest/v1/rpc/complete_job").mock(
        return_value=pgrst_error(503, "PGRST003", "Timed out acquiring connection from pool.")
    )
    with pytest.raises(TransientStoreError):
        await sb.complete(JOB, W, {})
    assert route.call_count == 4


async def test_html_502_is_transient(mock: respx.MockRouter, sb: Store) -> None:
    page = "<html><head><title>502 Bad Gateway</title></head><body>cloudflare</body></html>"
    html = httpx.Response(502, text=page, headers={"content-type": "text/html"})
    claim = mock.post("/rest/v1/rpc/claim_next_job_v3").mock(return_value=html)
    beat = mock.post("/rest/v1/rpc/update_job_heartbeat").mock(
        side_effect=[html, json_response(True)]
    )
    with pytest.raises(TransientStoreError) as err:
        await sb.claim(W, None, None)
    assert err.value.code == "502" and str(err.value) == "Bad Gateway"
    assert claim.call_count == 1
    assert_key_hidden(err.value)
    assert await sb.heartbeat(JOB, W) is True
    assert beat.call_count == 2


@pytest.mark.parametrize(
    "exc",
    [
        httpx.ReadTimeout,
        httpx.ConnectError,
        httpx.ConnectTimeout,
        httpx.RemoteProtocolError,
        httpx.PoolTimeout,
    ],
)
async def test_transport_errors_are_transient(
    mock: respx.MockRouter, sb: Store, exc: type[Exception]
) -> None:
    claim = mock.post("/rest/v1/rpc/claim_next_job_v3").mock(side_effect=exc)
    with pytest.raises(TransientStoreError) as err:
        await sb.claim(W, None, None)
    assert claim.call_count == 1
    assert str(err.value).startswith(exc.__name__)
    assert isinstance(err.value.__cause__, httpx.TransportError)
    assert_key_hidden(err.value)

    beat = mock.post("/rest/v1/rpc/update_job_heartbeat").mock(
        side_effect=[exc, exc, json_response(True)]
    )
    assert await sb.heartbeat(JOB, W) is True
    assert beat.call_count == 3


async def test_fail_patch_timeout_is_retried(mock: respx.MockRouter, sb: Store) -> None:
    """Safe because the PATCH is fenced: a committed first attempt makes the retry match []."""
    route = mock.patch("/rest/v1/job_queue").mock(
        side_effect=[httpx.ReadTimeout("read timed out"), json_response([])]
    )
    assert await sb.fail(JOB, W, error_details={}, retry_count=1, retry_at=None) is False
    assert route.call_count == 2


async def test_get_job_503_is_retried_once_not_twice(mock: respx.MockRouter, sb: Store) -> None:
    """get_job is an RPC (POST), which supabase-py never retries itself: transport_retry alone
    makes the 4 attempts (stacked, the two layers would send 16 requests and wait ~30 s)."""
    route = mock.post("/rest/v1/rpc/get_job").mock(
        return_value=pgrst_error(503, "PGRST003", "Timed out acquiring connection from pool.")
    )
    with pytest.raises(TransientStoreError):
        await sb.get_job(JOB)
    assert route.call_count == 4
    assert all("x-retry-count" not in c.request.headers for c in route.calls)


@pytest.mark.parametrize(
    "answer",
    [
        pgrst_error(401, "PGRST301", "JWT cryptographic operation failed"),
        pgrst_error(403, "42501", "permission denied for function update_job_heartbeat"),
        httpx.Response(500, text="upstream said no", headers={"content-type": "text/plain"}),
        httpx.ConnectError("connection refused"),
        httpx.ReadTimeout("timed out"),
    ],
    ids=["401", "403", "500-text", "connect", "timeout"],
)
async def test_service_key_never_in_error_text(
    mock: respx.MockRouter, sb: Store, answer: Any
) -> None:
    def reply(_request: httpx.Request) -> httpx.Response:
        if isinstance(answer, Exception):
            raise answer
        return answer

    mock.post("/rest/v1/rpc/update_job_heartbeat").mock(side_effect=reply)
    with pytest.raises(StoreError) as err:
        await sb.heartbeat(JOB, W)
    assert_key_hidden(err.value)
    cause = err.value.__cause__
    assert cause is not None
    assert_key_hidden(cause)


async def test_html_200_is_not_a_successful_heartbeat(mock: respx.MockRouter, sb: Store) -> None:
    """A 2xx page that is not JSON (a captive proxy, a wrong SUPABASE_URL) must not count as
    "lease held": postgrest-py hands the raw text back as ``data``, and bool(text) is True."""
    mock.post("/rest/v1/rpc/update_job_heartbeat").respond(
        200, text="<html>Sign in</html>", headers={"content-type": "text/html"}
    )
    with pytest.raises(TransientStoreError):
        await sb.heartbeat(JOB, W)


async def test_close_closes_the_http_client() -> None:
    http = build_http_client(4)
    s = await Store(SupabaseTransport(URL, KEY, http=http)).open()
    assert s.transport.client is not None
    await s.close()
    assert http.is_closed


async def test_not_open_is_an_error() -> None:
    s = Store(SupabaseTransport(URL, KEY))
    with pytest.raises(RuntimeError, match="not open"):
        await s.claim(W, None, None)
    await s.close()


# -- through the gateway: lost responses, real database ---------------------------------------


async def test_lost_append_response_is_retried_once_applied(
    supabase_store: Store, gateway: Gateway, conn: asyncpg.Connection
) -> None:
    cj = await chapter_job(conn)
    await supabase_store.claim(W, ["chapter_generation"], None)
    assert await supabase_store.start_chapter(cj.job, W, 100) is not None
    # The append commits, then the connection drops before the response.
    gateway.inject("append_chapter_content", drop=True, after=True)
    assert (
        await supabase_store.append_chapter(
            cj.job, W, offset=0, text="Once. ", progress=30, current_step="s1"
        )
        is True
    )
    assert gateway.count("append_chapter_content") == 2
    assert await conn.fetchval("select content from get_chapter_text($1)", cj.chapter) == "Once. "
    assert await conn.fetchval("select count(*) from chapter_chunks") == 1


async def test_lost_complete_response_is_retried_to_true(
    supabase_store: Store, gateway: Gateway, conn: asyncpg.Connection
) -> None:
    jid = await insert_job(conn)
    await supabase_store.claim(W, None, None)
    gateway.inject("complete_job", status=503, code="PGRST003", after=True)
    assert await supabase_store.complete(jid, W, {"ok": 1}) is True
    assert gateway.count("complete_job") == 2
    assert await conn.fetchval("select status from job_queue where id = $1", jid) == "completed"


async def test_lost_claim_response_is_not_retried(
    supabase_store: Store, gateway: Gateway, conn: asyncpg.Connection
) -> None:
    """The claim committed but its answer was lost: the job stays with this worker until its
    lease expires (or release_worker_jobs at the next start); it is never claimed twice."""
    jid = await insert_job(conn)
    gateway.inject("claim_next_job_v3", drop=True, after=True)
    with pytest.raises(TransientStoreError):
        await supabase_store.claim(W, None, None)
    assert gateway.count("claim_next_job_v3") == 1
    assert await conn.fetchval("select worker_id from job_queue where id = $1", jid) == W
    assert await supabase_store.claim(W, None, None) is None
    assert await supabase_store.release_worker_jobs(W) == 1


async def test_gateway_503_on_heartbeat_then_success(
    supabase_store: Store, gateway: Gateway, conn: asyncpg.Connection
) -> None:
    jid = await insert_job(conn)
    await supabase_store.claim(W, None, None)
    gateway.inject("update_job_heartbeat", times=2)  # 503 PGRST003, request not run
    assert await supabase_store.heartbeat(jid, W) is True
    assert gateway.count("update_job_heartbeat") == 3


async def test_gateway_503_on_heartbeat_many_is_reported_at_once(
    supabase_store: Store, gateway: Gateway, conn: asyncpg.Connection
) -> None:
    """heartbeat_many is deliberately not retried: the next tick is the retry."""
    jid = await insert_job(conn)
    await supabase_store.claim(W, None, None)
    gateway.inject("heartbeat_jobs")
    with pytest.raises(TransientStoreError):
        await supabase_store.heartbeat_many([jid], W)
    assert gateway.count("heartbeat_jobs") == 1
    assert await supabase_store.heartbeat_many([jid], W) == {jid}


async def test_gateway_html_502_on_fail_patch(
    supabase_store: Store, gateway: Gateway, conn: asyncpg.Connection
) -> None:
    jid = await insert_job(conn)
    await supabase_store.claim(W, None, None)
    gateway.inject("/job_queue", method="PATCH", html=True, after=True)
    assert (
        await supabase_store.fail(jid, W, error_details={"m": 1}, retry_count=1, retry_at=None)
        is False
    )  # first attempt had committed
    assert gateway.count("/job_queue", "PATCH") == 2
    assert await conn.fetchval("select status from job_queue where id = $1", jid) == "failed"
