"""deploy/: the Prometheus alert rules (promtool) and the Grafana board name real metrics.

Why the rules add ``or vector(0)`` and why metric names come from the registry rather
than a scrape: docs/dashboard.md §3.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy/prometheus/genworker-alerts.yml"
RULE_TESTS = ROOT / "deploy/prometheus/genworker-alerts.test.yml"
BOARD = ROOT / "deploy/grafana/genworker-dashboard.json"
PROMETHEUS_OWN = {"up"}  # series Prometheus itself records for every target
KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring"}
PROMTOOL = shutil.which("promtool")


def exported() -> set[str]:
    """Every series name genworker's /metrics can expose, from the real registry."""
    names: set[str] = set()
    for family in Metrics().registry.collect():
        if family.type == "counter":
            names |= {f"{family.name}_total", f"{family.name}_created"}
        elif family.type == "histogram":
            names |= {f"{family.name}_{s}" for s in ("bucket", "sum", "count", "created")}
        else:
            names.add(family.name)
    return names


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects.

    Drops strings, label matchers, range selectors and grouping clauses, then function
    names (an identifier before "("); what is left are metric names, keywords and numbers.
    """
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"[A-Za-z_:][A-Za-z0-9_:]*\s*\(", "(", text)
    words = set(re.findall(r"(?<![0-9.$])\b[A-Za-z_:][A-Za-z0-9_:]*\b", text))
    return {w for w in words if w not in KEYWORDS and not re.fullmatch(r"\d+[smhdwy]", w)}


def test_metric_names_parser() -> None:
    expr = (
        'sum by (le, job_type) (rate(genworker_job_run_seconds_bucket{kind="a b"}[5m])) '
        "/ on () (sum(rate(genworker_jobs_failed_total[$__rate_interval])) or vector(0)) > 0.1"
    )
    assert metric_names(expr) == {"genworker_job_run_seconds_bucket", "genworker_jobs_failed_total"}
    assert metric_names("max(genworker_queue_oldest_pending_age_seconds) > 300") == {
        "genworker_queue_oldest_pending_age_seconds"
    }


def board_expressions(board: dict[str, Any]) -> list[str]:
    exprs: list[str] = []
    for panel in board["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            exprs += [t["expr"] for t in inner.get("targets", [])]
    return exprs


def test_grafana_board_parses_and_every_expression_names_an_exported_metric() -> None:
    board = json.loads(BOARD.read_text())
    assert board["uid"] and board["title"] == "genworker"
    exprs = board_expressions(board)
    assert len(exprs) >= 15
    known = exported()
    used: set[str] = set()
    for expr in exprs:
        names = metric_names(expr)
        assert names, f"no metric in {expr!r}"
        assert names <= known, f"{expr!r} names {names - known}, which genworker does not export"
        used |= names
    # The board covers the queue, throughput, latency, leases, Gemini and chapter writes.
    for family in (
        "genworker_queue_jobs",
        "genworker_queue_oldest_pending_age_seconds",
        "genworker_jobs_claimed_total",
        "genworker_jobs_failed_total",
        "genworker_job_run_seconds_bucket",
        "genworker_claim_latency_seconds_bucket",
        "genworker_leases_lost_total",
        "genworker_heartbeat_failures_total",
        "genworker_model_tokens_total",
        "genworker_chapter_writes_total",
    ):
        assert family in used, family
    # Panels use the board's datasource variable, so the JSON imports into any Grafana.
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}


def test_alert_rules_name_exported_metrics_and_cover_the_issue() -> None:
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    known = exported() | PROMETHEUS_OWN
    for rule in rules:
        names = metric_names(rule["expr"])
        assert names and names <= known, (rule["alert"], names - known)
        assert rule["labels"]["severity"] in ("warning", "critical")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    assert {r["alert"] for r in rules} == {
        "GenworkerJobFailureRateHigh",
        "GenworkerOldestPendingJobOld",
        "GenworkerNoClaimsWhileWorkPending",
        "GenworkerLeasesLost",
        "GenworkerHeartbeatFailures",
        "GenworkerGeminiRateLimited",
        "GenworkerDown",
        "GenworkerMetricsAbsent",
    }


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    rules = [r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    cases = [
        c for t in yaml.safe_load(RULE_TESTS.read_text())["tests"] for c in t["alert_rule_test"]
    ]
    for alert in rules:
        mine = [c for c in cases if c["alertname"] == alert]
        assert any(c["exp_alerts"] for c in mine), f"{alert} never fires in the unit tests"
        assert any(not c["exp_alerts"] for c in mine), f"{alert} is never tested quiet"


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")
def test_promtool_check_rules() -> None:
    done = subprocess.run(
        [str(PROMTOOL), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 8 rules found" in done.stdout + done.stderr


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")
def test_promtool_test_rules() -> None:
    done = subprocess.run(
        [str(PROMTOOL), "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout + done.stderr
