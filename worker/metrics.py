"""Prometheus metrics, on a registry of our own so tests and demos can build several."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

QUEUE_STATUSES = ("pending", "processing", "paused", "completed", "failed", "cancelled")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.claimed = Counter(
            "genworker_jobs_claimed_total", "Jobs claimed", ["job_type"], registry=r
        )
        self.completed = Counter(
            "genworker_jobs_completed_total", "Jobs completed", ["job_type"], registry=r
        )
        self.failed = Counter(
            "genworker_jobs_failed_total", "Jobs failed for good", ["job_type", "kind"], registry=r
        )
        self.retried = Counter(
            "genworker_jobs_retried_total",
            "Jobs sent back for a retry",
            ["job_type", "kind"],
            registry=r,
        )
        self.released = Counter(
            "genworker_jobs_released_total",
            "Jobs handed back at shutdown",
            ["job_type"],
            registry=r,
        )
        self.leases_lost = Counter(
            "genworker_leases_lost_total",
            "Jobs stopped because the lease was lost, cancelled or paused",
            ["job_type"],
            registry=r,
        )
        self.in_flight = Gauge(
            "genworker_jobs_in_flight", "Jobs running in this process", registry=r
        )
        self.run_seconds = Histogram(
            "genworker_job_run_seconds",
            "Job run time",
            ["job_type"],
            registry=r,
            buckets=(0.01, 0.1, 0.5, 1, 5, 15, 30, 60, 120, 300, 600, 1800),
        )
        self.claim_seconds = Histogram(
            "genworker_claim_latency_seconds",
            "Time of one claim call",
            registry=r,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5),
        )
        self.claim_batch_size = Histogram(
            "genworker_claim_batch_size",
            "Jobs returned by one claim call (asked for: min(free slots, CLAIM_BATCH_MAX))",
            registry=r,
            buckets=(0, 1, 2, 5, 10, 25, 50, 100),
        )
        self.completion_batch_size = Histogram(
            "genworker_completion_batch_size",
            "Jobs completed by one completion call",
            registry=r,
            buckets=(1, 2, 5, 10, 25, 50, 100),
        )
        self.user_in_flight = Gauge(
            "genworker_user_jobs_in_flight",
            "Jobs running in this process per user, the busiest users only ('none': no user)",
            ["user_id"],
            registry=r,
        )
        self.heartbeat_failures = Counter(
            "genworker_heartbeat_failures_total", "Heartbeat rounds that failed", registry=r
        )
        self.claim_loop_errors = Counter(
            "genworker_claim_loop_errors_total",
            "Unexpected errors in the claim loop (logged and backed off, never fatal)",
            registry=r,
        )
        self.store_errors = Counter(
            "genworker_store_errors_total", "Database call failures", ["op"], registry=r
        )
        self.model_tokens = Counter(
            "genworker_model_tokens_total",
            "Model tokens used per model: prompt (cached included), cached, output, thoughts",
            ["model", "kind"],
            registry=r,
        )
        self.model_rate_limited = Counter(
            "genworker_model_rate_limited_total",
            "Gemini 429 answers seen by this process, per model",
            ["model"],
            registry=r,
        )
        self.budget_wait_seconds = Histogram(
            "genworker_budget_wait_seconds",
            "Time a Gemini request waited for the fleet's shared budget, per model",
            ["model"],
            registry=r,
            buckets=(0.005, 0.05, 0.25, 1, 2.5, 5, 15, 30, 60, 120),
        )
        self.model_blocked = Gauge(
            "genworker_model_blocked",
            "1 while a model is in a shared cool-down or out of its daily quota",
            ["model", "reason"],
            registry=r,
        )
        self.chapter_writes = Counter(
            "genworker_chapter_writes_total", "Chapter content writes", registry=r
        )
        self.chapter_bytes = Counter(
            "genworker_chapter_bytes_total",
            "Bytes of text, steps and checkpoints sent in chapter writes",
            registry=r,
        )

        # The whole queue, not this process: the same on every instance (alert on max()).
        # Refreshed from queue_stats() when /metrics is scraped (worker/health.py).
        self.queue_jobs = Gauge(
            "genworker_queue_jobs",
            "Jobs in the queue by status (whole database, refreshed at scrape)",
            ["status"],
            registry=r,
        )
        self.queue_oldest_pending_age = Gauge(
            "genworker_queue_oldest_pending_age_seconds",
            "Age of the oldest due pending job, 0 when none (whole database, refreshed at scrape)",
            registry=r,
        )

    def set_queue(self, stats: Mapping[str, Any]) -> None:
        """Copy a ``queue_stats()`` answer into the queue gauges."""
        by_status = stats.get("by_status") or {}
        for status in QUEUE_STATUSES:
            self.queue_jobs.labels(status).set(int(by_status.get(status) or 0))
        self.queue_oldest_pending_age.set(float(stats.get("oldest_pending_age_s") or 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
