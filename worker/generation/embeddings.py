"""The embedding port of story memory, and the offline embedder that needs no network.

Vectors are 768 floats of unit length, whatever produced them: 768 because the column
``story_passages.embedding vector(768)`` and its HNSW index are built for it (why this
size: docs/gemini-wire.md §7), unit length because cosine distance then ranks exactly
like the dot product and the API normalizes only its full 3072-size output.
Passages are embedded as RETRIEVAL_DOCUMENT and the section's query as RETRIEVAL_QUERY:
the model is trained for that asymmetric pairing of a short question with longer text.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Sequence
from typing import Literal, Protocol, runtime_checkable

DIMENSIONS = 768
TaskType = Literal["RETRIEVAL_DOCUMENT", "RETRIEVAL_QUERY"]

_WORD = re.compile(r"[^\W\d_]{3,}", re.UNICODE)
# Words too common to say what a passage is about.
_STOPWORDS = frozenset(
    """the and for with that this from into onto over under then than they them their
    there here what when where which while who whom whose why how was were are been being
    have has had not but nor yet all any each few more most other some such only own same
    very can will just should would could now his her hers him she its our ours your yours
    you out off about again once down upon also ever every one two did does done said
    says like""".split()
)


def normalize(vector: Sequence[float]) -> list[float]:
    """The vector scaled to unit length; ValueError for a zero or non-finite vector."""
    norm = math.sqrt(math.fsum(x * x for x in vector))
    if not math.isfinite(norm) or norm == 0.0:
        raise ValueError("cannot normalize a zero or non-finite vector")
    return [x / norm for x in vector]


def content_words(text: str) -> list[str]:
    """Lower-cased words of three letters or more, common words left out."""
    return [w for w in (m.group(0).lower() for m in _WORD.finditer(text)) if w not in _STOPWORDS]


def hashed_embedding(text: str, dimensions: int = DIMENSIONS) -> list[float]:
    """A deterministic vector that carries meaning by vocabulary: every content word adds
    a signed unit to the component its hash picks (the "hashing trick"), so texts sharing
    rare words point the same way. Not normalized; all zeros for a text with no words."""
    vector = [0.0] * dimensions
    for word in content_words(text):
        digest = hashlib.blake2b(word.encode(), digest_size=8).digest()
        index = int.from_bytes(digest[:4], "big") % dimensions
        vector[index] += 1.0 if digest[4] & 1 else -1.0
    return vector


@runtime_checkable
class Embedder(Protocol):
    """Turns texts into unit vectors of ``DIMENSIONS``; errors are ``worker.errors.JobError``."""

    model: str
    max_batch: int

    async def embed(self, texts: Sequence[str], task: TaskType) -> list[list[float]]: ...

    def open(self) -> None: ...

    async def aclose(self) -> None: ...


class HashedEmbedder:
    """The offline ``Embedder`` (GENERATION_PROVIDER=offline): hashed word features, no
    network, the same vector for the same text every time."""

    model = "offline-hashed-768"
    max_batch = 100

    async def embed(self, texts: Sequence[str], task: TaskType) -> list[list[float]]:
        out = []
        for text in texts:
            vector = hashed_embedding(text)
            if not any(vector):
                vector[0] = 1.0  # a text without words: a fixed direction, never a zero vector
            out.append(normalize(vector))
        return out

    def open(self) -> None:
        return None

    async def aclose(self) -> None:
        return None
