"""What a handler is: the job-side contract shared by the runner and the job types.

Kept apart from the runner so handlers (worker/generation) depend on this small
module, never on the runner that calls them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from worker.metrics import Metrics
from worker.store import Job, Store


@dataclass
class JobContext:
    """What a handler gets: the full job row, the store and a progress hook for /status."""

    job: Job
    worker_id: str
    store: Store
    metrics: Metrics
    report: Callable[[int, str], None]

    @property
    def attempt(self) -> int:
        return self.job.retry_count + 1


Handler = Callable[[JobContext], Awaitable[Mapping[str, Any]]]
