"""Prompts for the outline and for each section, and the bounded story context."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from worker.generation.payload import TEXT_OPTIONS, ChapterOptions, clean_text

SYSTEM = (
    "You are a novelist writing one chapter of a serialized story. Write vivid, coherent "
    "prose that continues the story faithfully. Never mention that you are an AI, never "
    "add notes or headings, and never repeat text that was already written."
)
CHARS_PER_TOKEN = 4


def approx_tokens(text: str) -> int:
    return len(text) // CHARS_PER_TOKEN + 1


def _preference(preferences: Mapping[str, Any], key: str, limit: int) -> str | None:
    """A story preference as the prompt may use it: text, cleaned, within the same cap as
    the job option (and as the stories check constraint), whatever the row holds."""
    value = preferences.get(key)
    if not isinstance(value, str):
        return None
    return clean_text(value)[:limit] or None


def style_lines(options: ChapterOptions, preferences: Mapping[str, Any]) -> list[str]:
    lines = []
    for label, value in (
        ("Genre", options.genre or _preference(preferences, "genre", TEXT_OPTIONS["genre"])),
        ("Tone", options.tone or _preference(preferences, "tone", TEXT_OPTIONS["tone"])),
        (
            "Point of view",
            options.point_of_view or _preference(preferences, "pov", TEXT_OPTIONS["point_of_view"]),
        ),
        ("Tense", options.tense or _preference(preferences, "tense", 20)),
        (
            "Audience",
            options.audience or _preference(preferences, "audience", TEXT_OPTIONS["audience"]),
        ),
    ):
        if value:
            lines.append(f"{label}: {value}")
    return lines


def _story_parts(ctx: Mapping[str, Any], max_tokens: int) -> tuple[list[str], dict[int, int]]:
    """The context lines, and how many characters of each earlier chapter's tail they carry."""
    story = ctx.get("story") or {}
    parts = [f"Story title: {story.get('title', '')}", f"Premise: {story.get('premise', '')}"]
    budget = max_tokens - sum(approx_tokens(p) for p in parts)
    previous: Sequence[Mapping[str, Any]] = ctx.get("previous") or []
    kept: list[str] = []
    carried: dict[int, int] = {}
    for chap in reversed(previous):  # the nearest chapters matter most
        tail = str(chap.get("tail", ""))
        block = f"Chapter {chap.get('number')}: {chap.get('title') or 'untitled'}\n...{tail}"
        cost = approx_tokens(block)
        if cost > budget:
            if budget > 50:
                kept.append(block[-budget * CHARS_PER_TOKEN :])
                carried[int(chap.get("number") or 0)] = min(len(tail), budget * CHARS_PER_TOKEN)
            break
        kept.append(block)
        carried[int(chap.get("number") or 0)] = len(tail)
        budget -= cost
    if kept:
        parts.append("Earlier chapters (most recent last):\n" + "\n\n".join(reversed(kept)))
    return parts, carried


def story_context(ctx: Mapping[str, Any], max_tokens: int) -> str:
    """Story premise plus the tail of earlier chapters, newest kept first, within a token cap."""
    return "\n".join(_story_parts(ctx, max_tokens)[0])


def carried_tails(ctx: Mapping[str, Any], max_tokens: int) -> dict[int, int]:
    """Chapter number -> characters at the end of its text that ``story_context`` carries:
    story memory does not repeat them."""
    return _story_parts(ctx, max_tokens)[1]


def stable_head(ctx: Mapping[str, Any], options: ChapterOptions, max_tokens: int) -> list[str]:
    """What every request of a chapter begins with, byte for byte: the story, the style and
    the author's instructions. The outline call and every section share it (sections also
    share the plan after it), and the part that changes (the text so far, the section to
    write) comes last, so Gemini's implicit prefix caching can serve the head from its
    cache (docs/gemini-budget.md)."""
    story = ctx.get("story") or {}
    lines = [
        story_context(ctx, max_tokens),
        "",
        *style_lines(options, story.get("preferences") or {}),
    ]
    if options.instructions:
        lines.append(f"Author's instructions: {options.instructions}")
    return lines


def outline_prompt(ctx: Mapping[str, Any], options: ChapterOptions, max_tokens: int) -> str:
    chapter = ctx.get("chapter") or {}
    lines = [
        *stable_head(ctx, options, max_tokens),
        f"Plan chapter {chapter.get('number')}"
        + (f" titled '{chapter['title']}'" if chapter.get("title") else "")
        + ".",
        f"Sections: {options.sections}",
        f"Target length: about {options.target_words} words in total.",
    ]
    lines.append(
        f"Return a chapter title and exactly {options.sections} bullets, one per "
        "section, each a one-sentence summary of what happens in it."
    )
    return "\n".join(lines)


def section_prompt(
    ctx: Mapping[str, Any],
    options: ChapterOptions,
    title: str,
    bullets: Sequence[str],
    index: int,
    written_tail: str,
    words: int,
    max_tokens: int,
    memory_notes: str = "",
) -> str:
    """Stable parts first (story, style, instructions, chapter plan), then what changes per
    section (the story-memory notes, the text so far, the instruction), so consecutive
    prompts of a chapter share the longest possible prefix."""
    plan = "\n".join(f"{i + 1}. {b}" for i, b in enumerate(bullets))
    lines = [
        *stable_head(ctx, options, max_tokens),
        f"Chapter title: {title}",
        f"Chapter plan:\n{plan}",
    ]
    if memory_notes:
        lines.append(memory_notes)
    if written_tail:
        lines.append(f"The chapter so far ends with:\n...{written_tail}")
    lines.append(
        f"Write section {index + 1} of {len(bullets)} ({bullets[index]}) in about "
        f"{words} words. Continue seamlessly from the text so far; output prose only."
    )
    return "\n".join(lines)
