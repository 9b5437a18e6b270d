"""``Embedder`` on Gemini's embedding models through google-genai's ``embed_content``.

The SDK sends every ``embed_content`` call on the Gemini API as one
``:batchEmbedContents`` request (docs/gemini-wire.md §7), so a call carries a whole
batch of passages; we keep a batch at ``max_batch`` texts, the API's limit. The client is
configured as ``GeminiModel``'s (gemini.py): our own aiohttp session, no SDK retries (the
job queue retries and honours ``RetryInfo``), a cap on the whole request. Failures are
classified by ``gemini_errors.translate`` like any other Gemini call.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

from google import genai
from google.genai import types

from worker.errors import JobError, PermanentJobError, RetryableJobError
from worker.generation.embeddings import DIMENSIONS, TaskType, normalize
from worker.generation.gemini import SdkClient, gemini_session
from worker.generation.gemini_errors import translate
from worker.logs import register_secret


class GeminiEmbedder:
    """Create one per process, ``open()`` it in the loop and ``await aclose()`` it."""

    max_batch = 100  # batchEmbedContents accepts at most 100 requests

    def __init__(
        self,
        *,
        api_key: str,
        model: str,
        base_url: str | None = None,
        api_version: str = "v1",
        connect_timeout_s: float = 10.0,
        request_timeout_s: float = 60.0,
        max_concurrent: int = 4,
    ) -> None:
        if not api_key:
            raise ValueError("api_key is required")
        register_secret(api_key)
        self.model = model
        self.request_timeout_s = request_timeout_s
        self._slots = asyncio.Semaphore(max_concurrent)
        self._sdk_client = SdkClient(
            api_key=api_key,
            base_url=base_url,
            api_version=api_version,
            timeout_s=request_timeout_s,
            new_session=lambda: gemini_session(connect_timeout_s, max_concurrent + 4),
        )

    def _sdk(self) -> genai.Client:
        return self._sdk_client.get()

    def open(self) -> None:
        self._sdk()

    async def aclose(self) -> None:
        await self._sdk_client.aclose()

    async def embed(self, texts: Sequence[str], task: TaskType) -> list[list[float]]:
        """Unit vectors for ``texts``, in order, in batches of ``max_batch``."""
        out: list[list[float]] = []
        for start in range(0, len(texts), self.max_batch):
            out.extend(await self._batch(list(texts[start : start + self.max_batch]), task))
        return out

    async def _batch(self, texts: list[str], task: TaskType) -> list[list[float]]:
        client = self._sdk()
        async with self._slots:
            try:
                response = await client.aio.models.embed_content(
                    model=self.model,
                    contents=texts,
                    config=types.EmbedContentConfig(
                        task_type=task, output_dimensionality=DIMENSIONS
                    ),
                )
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = translate(exc, received_chunks=0, request_timeout_s=self.request_timeout_s)
                if error is None:
                    raise
                raise _for_embedding(error) from exc
        embeddings = response.embeddings or []
        if len(embeddings) != len(texts):
            raise RetryableJobError(
                f"Gemini returned {len(embeddings)} embeddings for {len(texts)} texts",
                kind="model_output_invalid",
                user_message="Gemini returned an unusable embedding response.",
            )
        vectors = []
        for embedding in embeddings:
            values = list(embedding.values or [])
            if len(values) != DIMENSIONS or not all(math.isfinite(v) for v in values):
                raise PermanentJobError(
                    f"Gemini returned an embedding of {len(values)} values, not {DIMENSIONS}: "
                    f"check GEMINI_EMBEDDING_MODEL ({self.model}) supports outputDimensionality",
                    kind="model_output_invalid",
                    user_message="The embedding model returned vectors of the wrong size.",
                )
            try:
                vectors.append(normalize(values))
            except ValueError:
                raise RetryableJobError(
                    "Gemini returned a zero embedding",
                    kind="model_output_invalid",
                    user_message="Gemini returned an unusable embedding response.",
                ) from None
        return vectors


def _for_embedding(error: JobError) -> JobError:
    """The same classification, with a user message about story memory, not a chapter
    (the chapter itself is never affected by an embedding failure)."""
    return type(error)(
        error.message,
        kind=error.kind,
        user_message=f"Story memory for this chapter was not updated ({error.kind}).",
        retry_after=error.retry_after,
        detail=error.detail,
    )
