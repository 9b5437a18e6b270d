"""The runner: claims jobs into free slots, runs their handlers, records the outcome.

Never more than ``concurrency`` handlers running (a job whose handler returned frees its
slot while its completion is recorded); one claim call asks for
min(free slots, ``claim_batch_max``) jobs and gets their full rows (``claim_jobs``, fair
across users and within each user's cap); a full batch claims again at once, a short
one waits for a new-job notification or for a local job to finish, and idle polling
backs off with jitter. Outcomes: completions batched by the ``Completer``; the fenced
failure UPDATE (retry with backoff, or final); ``release_job`` at shutdown; nothing at
all once the lease is lost.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from worker.completer import Completer
from worker.errors import LeaseLost, PermanentJobError, classify, error_details
from worker.heartbeat import Heartbeat
from worker.jobs import Handler, JobContext
from worker.logs import job_context
from worker.metrics import Metrics
from worker.store import ClaimedJob, Job, Store, StoreError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunnerConfig:
    worker_id: str
    concurrency: int = 50
    claim_batch_max: int = 25
    job_types: Sequence[str] | None = None
    job_lanes: Sequence[str] | None = None
    # The model of chapter jobs that name none: the claim skips jobs whose model cannot run.
    default_model: str | None = None
    poll_interval_s: float = 1.0
    poll_max_interval_s: float = 5.0
    heartbeat_interval_s: float = 10.0
    max_retries: int = 3
    retry_base_s: float = 5.0
    retry_max_s: float = 600.0
    shutdown_grace_s: float = 30.0
    shutdown_call_timeout_s: float = 5.0


@dataclass
class InFlight:
    claimed: ClaimedJob
    started: float = field(default_factory=time.monotonic)
    task: asyncio.Task[None] | None = None
    progress: int = 0
    step: str = "claimed"
    stop_reason: str | None = None  # 'lease_lost' | 'shutdown' | 'superseded'
    finishing: bool = False  # complete/fail under way: the heartbeat must not cancel it
    holds_slot: bool = True  # the handler has not returned yet


class _TypeMetrics(NamedTuple):
    claimed: Any
    completed: Any
    run_seconds: Any


def retry_delay(
    retry_count: int, base_s: float, max_s: float, server_hint_s: float | None = None
) -> float:
    """Exponential backoff with 'equal jitter' and a cap; a server's hint is a floor."""
    ceiling = min(max_s, base_s * 2.0**retry_count)
    delay = ceiling / 2 + random.uniform(0, ceiling / 2)
    return max(delay, server_hint_s or 0.0)


class Runner:
    def __init__(
        self,
        store: Store,
        config: RunnerConfig,
        handlers: Mapping[str, Handler],
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        # One batch limit: what is asked for, what /status shows and what counts as a full
        # batch (claim again at once) is what the transport can carry in one answer.
        batch_max = min(config.claim_batch_max, store.transport.claim_batch_max)
        self.config = replace(config, claim_batch_max=batch_max)
        self.handlers = dict(handlers)
        self.metrics = metrics or Metrics()
        self.in_flight: dict[str, InFlight] = {}
        self.started_at = time.time()
        self.last_claim_at: float | None = None  # wall time of the last job claimed
        self.consecutive_store_errors = 0
        self.store_down_since: float | None = None  # monotonic time of the first failure
        self.last_store_error: str | None = None
        self.stopping = asyncio.Event()
        self.fatal: BaseException | None = None
        self._slot_free = asyncio.Event()  # a handler returned: a slot is free
        self._job_done = asyncio.Event()  # a job's outcome was recorded in the database
        self._running = 0  # handlers running: what WORKER_CONCURRENCY bounds
        self.completer = Completer(store, config.worker_id, self.metrics)
        # Read when scraped, not written per job.
        self.metrics.in_flight.set_function(lambda: len(self.in_flight))
        self._by_type: dict[str, _TypeMetrics] = {}
        self.claim_calls = 0
        self.claimed_jobs = 0
        self.last_claim_batch: int | None = None
        self.heartbeat = Heartbeat(
            store,
            config.worker_id,
            config.heartbeat_interval_s,
            # Finishing jobs too: a completion stuck in retries keeps its lease, and an outage
            # shows in /health even when every slot is busy completing (_lease_lost ignores
            # finishing jobs, so a completed job is never cancelled by it).
            job_ids=lambda: list(self.in_flight),
            on_lost=self._lease_lost,
            metrics=self.metrics,
            on_result=self._store_result,
        )
        self._side_tasks: list[asyncio.Task[None]] = []

    # -- lifecycle ------------------------------------------------------------------------
    async def run(self) -> None:
        """Run until ``stop()``; then drain, release, and return. Raises if a side task died."""
        released = await self.store.release_worker_jobs(self.config.worker_id)
        if released:
            log.warning("start-up recovery: released %d job(s) left by this worker id", released)
        claim_loop = asyncio.create_task(self._claim_loop(), name="claim-loop")
        beat = asyncio.create_task(self.heartbeat.run(), name="heartbeat")
        self._side_tasks = [claim_loop, beat]
        for t in self._side_tasks:
            t.add_done_callback(self._side_task_done)
        await self.stopping.wait()
        claim_loop.cancel()
        await asyncio.gather(claim_loop, return_exceptions=True)
        await self._drain()
        beat.cancel()
        await asyncio.gather(beat, return_exceptions=True)
        if self.fatal is not None:
            raise RuntimeError(f"side task failed: {self.fatal!r}") from self.fatal

    def stop(self) -> None:
        self.stopping.set()

    def _side_task_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self.stopping.is_set():
            return
        self.fatal = task.exception() or RuntimeError(f"{task.get_name()} exited")
        log.critical("side task %s died: %r; stopping", task.get_name(), self.fatal)
        self.stop()

    @property
    def side_tasks_alive(self) -> bool:
        return self.fatal is None and all(not t.done() for t in self._side_tasks)

    async def _drain(self) -> None:
        tasks = [f.task for f in self.in_flight.values() if f.task]
        if tasks:
            log.info(
                "shutdown: waiting up to %.0fs for %d job(s)",
                self.config.shutdown_grace_s,
                len(tasks),
            )
            await asyncio.wait(tasks, timeout=self.config.shutdown_grace_s)
        rest = [(f, f.task) for f in self.in_flight.values() if f.task and not f.task.done()]
        for f, task in rest:
            f.stop_reason = "shutdown"
            task.cancel()
        if rest:
            log.info("shutdown: cancelled and releasing %d job(s)", len(rest))
            await asyncio.gather(*(task for _, task in rest), return_exceptions=True)

    def _store_result(self, error: BaseException | None) -> None:
        """Every store outcome the process sees feeds /health's "degraded" signal."""
        if error is None:
            self.store_down_since = None
            self.last_store_error = None
        else:
            if self.store_down_since is None:
                self.store_down_since = time.monotonic()
            self.last_store_error = str(error)[:300]

    # -- claiming ---------------------------------------------------------------------
    async def _claim_loop(self) -> None:
        idle = self.config.poll_interval_s
        while not self.stopping.is_set():
            free = self.config.concurrency - self._running
            if free <= 0:
                self._slot_free.clear()
                await self._slot_free.wait()
                continue
            want = min(free, self.config.claim_batch_max)
            self._job_done.clear()  # a job recorded during the call is a reason to claim again
            t0 = time.monotonic()
            try:
                claimed = await self._claim_once(want)
            except Exception as exc:
                # Whatever goes wrong here, the loop backs off and carries on: one job's
                # data cannot reach this point (ClaimedJob keeps it as payload_error), and
                # a process that exits would only be restarted into the same state.
                self.consecutive_store_errors += 1
                self._store_result(exc)
                if isinstance(exc, StoreError):
                    self.metrics.store_errors.labels("claim").inc()
                    log.warning(
                        "claim failed (%d in a row): %s", self.consecutive_store_errors, exc
                    )
                else:
                    self.metrics.claim_loop_errors.inc()
                    log.error("unexpected error in the claim loop; backing off", exc_info=True)
                idle = min(self.config.poll_max_interval_s, idle * 2)
                await asyncio.sleep(idle * random.uniform(0.5, 1.0))
                continue
            self.metrics.claim_seconds.observe(time.monotonic() - t0)
            self.metrics.claim_batch_size.observe(len(claimed))
            self.claim_calls += 1
            self.claimed_jobs += len(claimed)
            self.last_claim_batch = len(claimed)
            self.consecutive_store_errors = 0
            self._store_result(None)
            for job in claimed:
                self._type_metrics(job.job_type).claimed.inc()
                await self._start(job)
            if claimed:
                self.last_claim_at = time.time()
                idle = self.config.poll_interval_s
                if len(claimed) == want:
                    continue  # a full batch: there may be more
            # Nothing more for us right now: wait for a new job's notification or the poll
            # interval. A short batch may also mean users at their caps: then a local job's
            # outcome landing (one of theirs may be under the cap again) is a reason too.
            woke = await self._wait_for_work(idle * random.uniform(0.5, 1.0), bool(claimed))
            if not claimed:
                idle = (
                    self.config.poll_interval_s
                    if woke
                    else min(self.config.poll_max_interval_s, idle * 1.5)
                )

    async def _wait_for_work(self, seconds: float, on_job_done: bool) -> bool:
        """True when a notification (or, if asked, a recorded local job) cut the wait short."""
        if not on_job_done:
            return await self.store.wait_for_work(seconds)
        if self._job_done.is_set():
            return True
        notified = asyncio.ensure_future(self.store.wait_for_work(seconds))
        slot = asyncio.ensure_future(self._job_done.wait())
        try:
            done, _ = await asyncio.wait({notified, slot}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (notified, slot):
                t.cancel()
            await asyncio.gather(notified, slot, return_exceptions=True)
        if slot in done:
            return True
        return notified.exception() is None and notified.result() is True

    async def _claim_once(self, want: int) -> list[ClaimedJob]:
        """One batch claim that shutdown cannot cut in half.

        Cancelling a claim request mid-flight could leave jobs claimed in the database
        and unknown here (stuck until their leases expire, costing a retry). So the call
        is shielded; if shutdown arrives meanwhile, the jobs it returns are released.
        """
        call = asyncio.ensure_future(
            self.store.claim_many(
                self.config.worker_id,
                self.config.job_types,
                self.config.job_lanes,
                want,
                self.config.default_model,
            )
        )
        try:
            return await asyncio.shield(call)
        except asyncio.CancelledError:
            try:
                async with asyncio.timeout(self.config.shutdown_call_timeout_s):
                    worker = self.config.worker_id
                    claimed = await call  # released together: each one left waits a lease
                    await asyncio.gather(*(self.store.release(c.job_id, worker) for c in claimed))
            except (StoreError, TimeoutError) as exc:
                log.warning("a claim under way at shutdown could not be undone: %s", exc)
            raise

    def _type_metrics(self, job_type: str) -> _TypeMetrics:
        """The per-job-type series touched for every job, looked up once per type."""
        found = self._by_type.get(job_type)
        if found is None:
            m = self.metrics
            found = _TypeMetrics(
                m.claimed.labels(job_type),
                m.completed.labels(job_type),
                m.run_seconds.labels(job_type),
            )
            if len(self._by_type) < 1000:  # job types are few; never grow without bound
                self._by_type[job_type] = found
        return found

    def users_in_flight(self, top: int = 10) -> list[tuple[str, int]]:
        """This process's running jobs per user ('none' for jobs without one), busiest first."""
        counts = Counter(
            (f.claimed.job.user_id if f.claimed.job else None) or "none"
            for f in list(self.in_flight.values())
        )
        return counts.most_common(top)

    async def _start(self, claimed: ClaimedJob) -> None:
        old = self.in_flight.get(claimed.job_id)
        if old is not None and old.task is not None:
            # Our own lease expired (the loop stalled) and we claimed the job again:
            # the old attempt must stop before the new one starts.
            old.stop_reason = "superseded"
            old.task.cancel()
            await asyncio.gather(old.task, return_exceptions=True)
        entry = InFlight(claimed)
        self.in_flight[claimed.job_id] = entry
        self._running += 1
        entry.task = asyncio.create_task(self._execute(entry), name=f"job-{claimed.job_id}")

    def _lease_lost(self, job_id: str) -> None:
        entry = self.in_flight.get(job_id)
        if entry is None or entry.task is None or entry.task.done() or entry.finishing:
            return
        log.warning("lease lost for job %s (rescued, cancelled or paused): stopping it", job_id)
        entry.stop_reason = "lease_lost"
        self.metrics.leases_lost.labels(entry.claimed.job_type).inc()
        entry.task.cancel()

    # -- executing ----------------------------------------------------------------------
    async def _execute(self, entry: InFlight) -> None:
        claimed = entry.claimed
        job: Job | None = None
        with job_context(claimed.job_id, claimed.job_type, claimed.retry_count + 1):
            try:
                if claimed.payload_error is not None:
                    raise PermanentJobError(
                        f"the job's payload cannot be read: {claimed.payload_error}",
                        kind="bad_payload",
                        user_message="The generation request was invalid and was not run.",
                    )
                job = claimed.job  # claim_jobs returns the whole row (no second read)
                if job is None:  # only claim_next_job_v3's answer lacks it: not used here
                    raise LeaseLost("claimed without its row")
                handler = self.handlers.get(job.job_type)
                if handler is None:
                    raise PermanentJobError(
                        f"no handler for job_type {job.job_type!r}; this worker handles "
                        f"{sorted(self.handlers)}",
                        kind="unknown_job_type",
                        user_message="This kind of job is not supported by the worker.",
                    )

                def report(progress: int, step: str) -> None:
                    entry.progress, entry.step = progress, step

                ctx = JobContext(job, self.config.worker_id, self.store, self.metrics, report)
                log.debug("job started")
                result = await handler(ctx)
                entry.finishing = True
                self._free_slot(entry)  # its completion goes on while the next job starts
                if await self.completer.complete(job.id, result):
                    self._type_metrics(job.job_type).completed.inc()
                    log.debug("job completed in %.2fs", time.monotonic() - entry.started)
                else:
                    raise LeaseLost("complete_job refused: the lease was lost")
            except asyncio.CancelledError:
                await self._on_cancelled(entry)
                raise
            except LeaseLost as exc:
                self.metrics.leases_lost.labels(claimed.job_type).inc()
                log.warning("job stopped, nothing more written: %s", exc)
            except Exception as exc:
                entry.finishing = True
                self._free_slot(entry)
                if isinstance(exc, StoreError):
                    self._store_result(exc)
                await self._record_failure(claimed, job, exc)
            finally:
                self._type_metrics(claimed.job_type).run_seconds.observe(
                    time.monotonic() - entry.started
                )
                if self.in_flight.get(claimed.job_id) is entry:
                    del self.in_flight[claimed.job_id]
                self._free_slot(entry)
                self._job_done.set()  # recorded: its user may be under the cap again

    def _free_slot(self, entry: InFlight) -> None:
        if entry.holds_slot:
            entry.holds_slot = False
            self._running -= 1
            self._slot_free.set()

    async def _on_cancelled(self, entry: InFlight) -> None:
        if entry.stop_reason != "shutdown":
            log.warning("job cancelled (%s): nothing more written", entry.stop_reason)
            return
        try:
            async with asyncio.timeout(self.config.shutdown_call_timeout_s):
                if await self.store.release(entry.claimed.job_id, self.config.worker_id):
                    self.metrics.released.labels(entry.claimed.job_type).inc()
                    log.info("job released for another worker (no attempt used)")
        except (StoreError, TimeoutError) as exc:
            log.error("could not release job at shutdown; its lease will expire: %s", exc)

    async def _record_failure(
        self, claimed: ClaimedJob, job: Job | None, exc: BaseException
    ) -> None:
        failure = classify(exc)
        retry_count = job.retry_count if job else claimed.retry_count
        allowed = min(job.max_retries if job else self.config.max_retries, self.config.max_retries)
        will_retry = failure.retryable and retry_count < allowed
        details = error_details(
            failure, attempt=retry_count + 1, worker_id=self.config.worker_id, will_retry=will_retry
        )
        retry_at = None
        if will_retry:
            delay = retry_delay(
                retry_count, self.config.retry_base_s, self.config.retry_max_s, failure.retry_after
            )
            retry_at = datetime.now(UTC) + timedelta(seconds=delay)
            details["retry_in_s"] = round(delay, 3)
        log.log(
            logging.WARNING if will_retry else logging.ERROR,
            "job failed (%s, %s): %s",
            failure.kind,
            "will retry" if will_retry else "final",
            failure.message,
            exc_info=failure.kind == "internal",
        )
        try:
            ok = await self.store.fail(
                claimed.job_id,
                self.config.worker_id,
                error_details=details,
                retry_count=retry_count + 1,
                retry_at=retry_at,
            )
        except StoreError as store_exc:
            self._store_result(store_exc)
            log.error("could not record the failure; the lease will expire: %s", store_exc)
            return
        if not ok:
            log.warning("failure not recorded: the lease was already lost")
        elif will_retry:
            self.metrics.retried.labels(claimed.job_type, failure.kind).inc()
        else:
            self.metrics.failed.labels(claimed.job_type, failure.kind).inc()
