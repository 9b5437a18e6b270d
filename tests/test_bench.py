"""Benchmarks exit non-zero when a stated target fails (bench/measure.py ``Targets``)."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def measure(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCH))
    import measure as module

    monkeypatch.setattr(module, "OUT", io.StringIO())
    yield module
    sys.modules.pop("measure", None)


def test_all_targets_met_exits_0(measure) -> None:
    targets = measure.Targets()
    assert targets.check("cpu", True) == "PASS"
    assert targets.exit_code() == 0 and measure.OUT.getvalue() == ""


def test_a_failed_target_exits_1_and_is_named(measure) -> None:
    targets = measure.Targets()
    assert [targets.check("cpu", True), targets.check("wire/text", False)] == ["PASS", "FAIL"]
    assert targets.exit_code() == 1
    assert measure.OUT.getvalue() == "targets failed: wire/text\n"
