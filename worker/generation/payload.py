"""Validation of a chapter_generation job's payload, before any model call.

Anything invalid fails the job permanently with one message listing every
problem, stored on the job and shown on the chapter.
"""

from __future__ import annotations

import re
import reprlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from worker.errors import PermanentJobError

_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
TEXT_OPTIONS = {"genre": 100, "tone": 100, "point_of_view": 60, "audience": 100}
TENSES = ("past", "present")
OPTION_NAMES = (
    "target_words",
    "sections",
    "genre",
    "tone",
    "point_of_view",
    "tense",
    "audience",
    "instructions",
    "model",
)


@dataclass(frozen=True)
class ChapterOptions:
    target_words: int = 1500
    sections: int = 5
    genre: str | None = None
    tone: str | None = None
    point_of_view: str | None = None
    tense: str | None = None
    audience: str | None = None
    instructions: str = ""
    model: str = ""


@dataclass(frozen=True)
class ChapterPayload:
    chapter_id: str
    user_id: str
    options: ChapterOptions


def clean_text(value: str) -> str:
    """Strip control characters (keeping newlines and tabs) and surrounding space."""
    return _CONTROL.sub("", value).strip()


_SHOWN = reprlib.Repr()  # keyword arguments need Python 3.12
_SHOWN.maxlevel, _SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlong = 2, 60, 60, 40


def shown(value: Any) -> str:
    """A user-supplied value as it may appear in an error or a log line: bounded in size
    and depth (reprlib), whatever the user sent."""
    return _SHOWN.repr(value)


def _uuid(value: Any) -> str | None:
    try:
        return str(uuid.UUID(str(value)))
    except (ValueError, TypeError):
        return None


def _int(
    opts: Mapping[str, Any], name: str, default: int, lo: int, hi: int, problems: list[str]
) -> int:
    value = opts.get(name)
    if value is None:  # not given (the enqueue RPC treats a null option the same way)
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        problems.append(
            f"options.{name} must be a whole number from {lo} to {hi}, got {shown(value)}"
        )
        return default
    return value


def parse_payload(
    payload: Mapping[str, Any],
    *,
    job_user_id: str | None,
    default_model: str,
    allowed_models: Sequence[str],
) -> ChapterPayload:
    problems: list[str] = []
    chapter_id = _uuid(payload.get("chapter_id"))
    if chapter_id is None:
        problems.append(f"chapter_id must be a UUID, got {shown(payload.get('chapter_id'))}")
    user_id = _uuid(payload.get("user_id"))
    if user_id is None:
        problems.append(f"user_id must be a UUID, got {shown(payload.get('user_id'))}")
    elif job_user_id is not None and user_id != job_user_id:
        problems.append("user_id does not match the user who enqueued the job")
    opts = payload.get("options", {})
    if opts is None:
        opts = {}
    if not isinstance(opts, Mapping):
        problems.append(f"options must be an object, got {type(opts).__name__}")
        opts = {}
    unknown = sorted(set(opts) - set(OPTION_NAMES))
    if unknown:
        problems.append(
            f"unknown option(s) {shown(', '.join(map(str, unknown[:5])))}; "
            f"known: {', '.join(OPTION_NAMES)}"
        )

    target_words = _int(opts, "target_words", 1500, 200, 8000, problems)
    sections = _int(opts, "sections", 5, 2, 12, problems)
    texts: dict[str, str | None] = {}
    for name, limit in TEXT_OPTIONS.items():
        value = opts.get(name)
        if value is not None and (not isinstance(value, str) or len(clean_text(value)) > limit):
            problems.append(f"options.{name} must be text of at most {limit} characters")
            value = None
        texts[name] = clean_text(value) or None if isinstance(value, str) else None
    tense = opts.get("tense")
    if tense is not None and tense not in TENSES:
        problems.append(f"options.tense must be one of {', '.join(TENSES)}, got {shown(tense)}")
        tense = None
    instructions = opts.get("instructions", "")
    if instructions is None:
        instructions = ""
    if not isinstance(instructions, str):
        problems.append("options.instructions must be text")
        instructions = ""
    instructions = clean_text(instructions)
    if len(instructions) > 2000:
        problems.append(
            f"options.instructions must be at most 2000 characters, got {len(instructions)}"
        )
    model = opts.get("model") or default_model
    if model not in allowed_models:
        problems.append(
            f"options.model {shown(model)} is not allowed; "
            f"choose one of {', '.join(allowed_models)}"
        )

    if problems:
        raise PermanentJobError(
            "invalid chapter_generation payload: " + "; ".join(problems),
            kind="bad_payload",
            user_message="The generation request was invalid: " + "; ".join(problems),
        )
    return ChapterPayload(
        chapter_id=str(chapter_id),
        user_id=str(user_id),
        options=ChapterOptions(
            target_words=target_words,
            sections=sections,
            tense=tense,
            instructions=instructions,
            model=model,
            **texts,
        ),
    )
