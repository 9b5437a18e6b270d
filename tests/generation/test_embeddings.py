"""Embeddings: the real google-genai SDK against the fake's embedding endpoints, the
offline embedder, and how chapters are cut into passages."""

from __future__ import annotations

import itertools
import math

import pytest

from tests.support.fake_gemini import disconnect_after, http_error, unanswered_port
from worker.errors import PermanentJobError, RetryableJobError
from worker.generation.embeddings import DIMENSIONS, HashedEmbedder, hashed_embedding
from worker.generation.gemini_embed import GeminiEmbedder
from worker.generation.passages import MAX_CHARS, split_passages


def cosine(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


async def test_batch_request_on_the_wire_and_unit_vectors(embedder, fake_gemini) -> None:
    texts = ["The brass astrolabe in the chapel.", "A train to Vienna at midnight."]
    vectors = await embedder.embed(texts, "RETRIEVAL_DOCUMENT")
    [request] = fake_gemini.requests
    assert request.path == "/v1/models/gemini-embedding-001:batchEmbedContents"
    assert request.headers["x-goog-api-key"] == "test-key-123"
    body = request.body["requests"]
    assert [r["content"]["parts"][0]["text"] for r in body] == texts
    assert {r["taskType"] for r in body} == {"RETRIEVAL_DOCUMENT"}
    assert {r["outputDimensionality"] for r in body} == {DIMENSIONS}
    assert {r["model"] for r in body} == {"models/gemini-embedding-001"}
    # The fake, like the API, does not normalize below 3072 dimensions; we do.
    assert all(len(v) == DIMENSIONS for v in vectors)
    assert all(math.isclose(math.sqrt(sum(x * x for x in v)), 1.0) for v in vectors)
    query = (await embedder.embed(["Where is the astrolabe?"], "RETRIEVAL_QUERY"))[0]
    assert fake_gemini.requests[-1].body["requests"][0]["taskType"] == "RETRIEVAL_QUERY"
    assert cosine(query, vectors[0]) > cosine(query, vectors[1])


async def test_more_than_one_batch(embedder, fake_gemini) -> None:
    texts = [f"passage number {i} about lighthouse{i}" for i in range(230)]
    vectors = await embedder.embed(texts, "RETRIEVAL_DOCUMENT")
    assert [len(r.body["requests"]) for r in fake_gemini.embed_requests] == [100, 100, 30]
    assert len(vectors) == 230
    one = await embedder.embed([texts[150]], "RETRIEVAL_DOCUMENT")
    assert one[0] == pytest.approx(vectors[150])


async def test_the_fake_refuses_oversized_batches(fake_gemini) -> None:
    big = GeminiEmbedder(api_key="k", model="m", base_url=fake_gemini.base_url)
    big.max_batch = 150
    try:
        with pytest.raises(PermanentJobError) as err:
            await big.embed(["word"] * 150, "RETRIEVAL_DOCUMENT")
    finally:
        await big.aclose()
    assert err.value.kind == "model_request_rejected"


@pytest.mark.parametrize(
    ("behaviour", "kind", "retryable", "retry_after"),
    [
        (http_error(429, retry_delay="7s"), "rate_limited", True, 7.0),
        (
            http_error(429, quota_id="EmbedContentRequestsPerDayPerProject"),
            "rate_limited",
            True,
            3600.0,
        ),
        (http_error(500), "model_unavailable", True, None),
        (http_error(503), "model_unavailable", True, None),
        (http_error(400, message="API key not valid."), "model_request_rejected", False, None),
        (http_error(404), "model_request_rejected", False, None),
        (disconnect_after(0), "stream_interrupted", True, None),
    ],
)
async def test_failures_are_classified(
    embedder, fake_gemini, behaviour, kind, retryable, retry_after
) -> None:
    fake_gemini.script(behaviour)
    with pytest.raises((RetryableJobError, PermanentJobError)) as err:
        await embedder.embed(["a passage"], "RETRIEVAL_DOCUMENT")
    assert (err.value.kind, err.value.retryable) == (kind, retryable)
    assert err.value.retry_after == retry_after
    assert "chapter will be retried" not in err.value.user_message
    assert "test-key-123" not in err.value.message
    # One attempt each: retrying is the job queue's, honouring RetryInfo.
    assert len(fake_gemini.requests) == 1


async def test_offline_embedder_is_deterministic_and_meaningful() -> None:
    e = HashedEmbedder()
    a, b, c, empty = await e.embed(
        ["the brass astrolabe", "an astrolabe of brass", "a train at midnight", "…"],
        "RETRIEVAL_DOCUMENT",
    )
    assert a == (await e.embed(["the brass astrolabe"], "RETRIEVAL_QUERY"))[0]
    assert cosine(a, b) > 0.9 and abs(cosine(a, c)) < 0.2
    assert math.isclose(math.sqrt(sum(x * x for x in empty)), 1.0)
    assert not any(hashed_embedding("the and of"))  # only common words: no features


# -- passages ---------------------------------------------------------------------------


def para(word: str, n: int) -> str:
    return " ".join([word] * n) + "."


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   \n\n  ",
        "One short line.",
        para("alpha", 60) + "\n\n" + para("beta", 60) + "\n\n\n" + para("gamma", 10),
        "\n\n".join(para(w, 30) for w in "abcdefghij"),
        para("long", 900),  # one paragraph far over the limit, no sentence ends inside
        "Sentence one is here. " * 200,
        "Ünïcödé — “quotes” 🙂 and emoji.\n\n" * 40,
        "\r\n\r\n".join(para("crlf", 50) for _ in range(5)),
    ],
)
def test_passages_cover_the_text_in_order_within_bounds(text: str) -> None:
    passages = split_passages(text)
    for p in passages:
        assert text[p.start : p.end] == p.text
        assert 1 <= len(p.text) <= MAX_CHARS
        assert p.text == p.text.strip()
    assert [p.ordinal for p in passages] == list(range(len(passages)))
    assert all(a.end <= b.start for a, b in itertools.pairwise(passages))
    covered = "".join(text[p.start : p.end] for p in passages)
    assert "".join(covered.split()) == "".join(text.split())  # nothing lost but whitespace


def test_paragraphs_are_kept_whole_and_short_ones_joined() -> None:
    text = para("alpha", 60) + "\n\n" + "Yes." + "\n\n" + para("beta", 60)
    passages = [p.text for p in split_passages(text)]
    assert passages == [para("alpha", 60) + "\n\nYes.", para("beta", 60)]
    with pytest.raises(ValueError):
        split_passages("x", max_chars=0)


async def test_the_connect_timeout_applies_to_embeddings_too() -> None:
    """The embedder's session is built like the text model's: a host that never answers
    is a retryable "cannot connect" after the connect timeout, not the request cap."""
    with unanswered_port() as port:
        embedder = GeminiEmbedder(
            api_key="test-key-123",
            model="gemini-embedding-001",
            base_url=f"http://127.0.0.1:{port}",
            connect_timeout_s=0.3,
            request_timeout_s=60,
        )
        try:
            with pytest.raises(RetryableJobError) as info:
                await embedder.embed(["a passage"], "RETRIEVAL_DOCUMENT")
        finally:
            await embedder.aclose()
    assert info.value.kind == "model_unavailable"
    assert "cannot connect to Gemini" in str(info.value)
