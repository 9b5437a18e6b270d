"""Cutting a chapter into passages for story memory: whole paragraphs, bounded in size,
with the character offsets they came from.

A passage is what retrieval hands back to the model, so it should be a self-contained
piece of story (a paragraph, or a few short ones together) and small enough that several
fit the memory budget of a prompt. Offsets are in characters (code points), the unit of
PostgreSQL's ``substr`` on text, so the database can check every passage against the
chapter it claims to come from.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_CHARS = 1200  # about 300 tokens: three or four passages fit an 800-token budget
MIN_CHARS = 200  # shorter paragraphs join their neighbours (a line of dialogue alone says little)

_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
_SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]]*\s+")


@dataclass(frozen=True)
class Passage:
    ordinal: int
    start: int
    end: int
    text: str


def _paragraphs(text: str) -> list[tuple[int, int]]:
    """(start, end) of each paragraph, outer whitespace excluded."""
    spans, pos = [], 0
    for brk in [*_PARAGRAPH_BREAK.finditer(text), None]:
        end = brk.start() if brk else len(text)
        chunk = text[pos:end]
        stripped = chunk.strip()
        if stripped:
            lead = len(chunk) - len(chunk.lstrip())
            spans.append((pos + lead, pos + lead + len(stripped)))
        pos = brk.end() if brk else len(text)
    return spans


def _split_long(text: str, start: int, end: int, limit: int) -> list[tuple[int, int]]:
    """A paragraph over ``limit`` cut at sentence ends (else at a space, else hard)."""
    out = []
    while end - start > limit:
        window = text[start : start + limit]
        cuts = [m.end() for m in _SENTENCE_END.finditer(window)]
        cut = cuts[-1] if cuts and cuts[-1] > limit // 3 else window.rfind(" ") + 1
        if cut <= limit // 3:
            cut = limit
        piece = text[start : start + cut].rstrip()
        out.append((start, start + len(piece)))
        start += cut
        while start < end and text[start].isspace():
            start += 1
    if end > start:
        out.append((start, end))
    return out


def split_passages(
    text: str, *, max_chars: int = MAX_CHARS, min_chars: int = MIN_CHARS
) -> list[Passage]:
    """Paragraphs joined up to ``max_chars`` (short ones with their neighbours), long
    ones cut at sentence ends. ``text[p.start:p.end] == p.text`` for every passage."""
    if max_chars < 1 or not 0 <= min_chars <= max_chars:
        raise ValueError("need 1 <= max_chars and 0 <= min_chars <= max_chars")
    spans: list[tuple[int, int]] = []
    for start, end in _paragraphs(text):
        spans.extend(_split_long(text, start, end, max_chars))
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged:
            prev_start, prev_end = merged[-1]
            short = prev_end - prev_start < min_chars or end - start < min_chars
            if short and end - prev_start <= max_chars:
                merged[-1] = (prev_start, end)
                continue
        merged.append((start, end))
    return [Passage(i, a, b, text[a:b]) for i, (a, b) in enumerate(merged)]
