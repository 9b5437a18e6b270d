"""Runner fixtures: a runner factory over a real store and database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from worker.jobs import Handler
from worker.metrics import Metrics
from worker.runner import Runner, RunnerConfig
from worker.store import Store


@asynccontextmanager
async def running(
    store: Store, handlers: dict[str, Handler], **overrides: Any
) -> AsyncIterator[Runner]:
    """Run a Runner in the background; stop and await it on exit."""
    cfg = dict(
        worker_id="test-worker",
        concurrency=50,
        poll_interval_s=0.05,
        poll_max_interval_s=0.2,
        heartbeat_interval_s=0.3,
        retry_base_s=0.1,
        retry_max_s=0.5,
        shutdown_grace_s=1.0,
    )
    cfg.update(overrides)
    runner = Runner(store, RunnerConfig(**cfg), handlers, Metrics())
    task = asyncio.create_task(runner.run())
    try:
        yield runner
    finally:
        runner.stop()
        await asyncio.wait_for(task, 30)


async def wait_until(
    predicate: Callable[[], Any],
    timeout: float = 60.0,  # noqa: ASYNC109  (a ceiling for loaded machines, not a bound)
    every: float = 0.05,
) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(every)


@pytest.fixture
def run_runner():  # type: ignore[no-untyped-def]
    return running
