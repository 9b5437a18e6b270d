"""Pointers into docs/ from code and tests lead somewhere: the file and the section exist."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
POINTER = re.compile(r"docs/([a-z0-9-]+\.md)(?: §(\d+)(?:-(\d+))?)?")


def test_every_docs_pointer_resolves() -> None:
    seen = 0
    for path in [*ROOT.glob("worker/**/*.py"), *ROOT.glob("tests/**/*.py"), ROOT / "README.md"]:
        for name, first, last in POINTER.findall(path.read_text()):
            doc = ROOT / "docs" / name
            assert doc.is_file(), f"{path.relative_to(ROOT)} points to missing docs/{name}"
            sections = set(re.findall(r"^## (\d+)\. ", doc.read_text(), re.M))
            if first:
                for number in range(int(first), int(last or first) + 1):
                    assert str(number) in sections, f"{path.name}: docs/{name} has no §{number}"
            seen += 1
    assert seen >= 5  # the pointers this test exists for are still there
