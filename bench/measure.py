"""Measuring helpers shared by the benchmark scripts.

Imported by its siblings as ``from measure import ...``: run as
``.venv/bin/python bench/<name>.py``, the script's own folder is first on ``sys.path``.
Nothing from ``worker`` is imported at module level, so chapter_stream.py's fake-server
subprocess stays light.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.jobs import Handler
    from worker.runner import Runner, RunnerConfig
    from worker.store import Store

ROOT = Path(__file__).resolve().parents[1]
OUT = sys.stdout  # figures go here; the worker's log lines go to a temporary file


def say(*parts: Any) -> None:
    print(*parts, file=OUT, flush=True)


@contextlib.asynccontextmanager
async def throwaway_database() -> AsyncIterator[tuple[Any, Any, str]]:
    """A LocalCluster prepared like a migrated Supabase project, destroyed afterwards.

    Yields (cluster, an admin asyncpg connection, the server version).
    """
    import asyncpg

    from worker.devdb import LocalCluster
    from worker.migrate import setup_local_database

    say("Starting a throwaway PostgreSQL (LocalCluster) ...")
    cluster = LocalCluster().start()
    try:
        admin = await asyncpg.connect(cluster.dsn())
        try:
            await setup_local_database(admin)
            yield cluster, admin, await admin.fetchval("show server_version")
        finally:
            await admin.close()
    finally:
        cluster.destroy()


def repo_on_path() -> None:
    """``tests.support`` lives in the repository, not in the installed package."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


class RssSampler:
    """Peak resident set size: ru_maxrss, plus psutil samples every 100 ms if available."""

    def __init__(self) -> None:
        try:
            import psutil

            self._proc: Any = psutil.Process()
        except ImportError:  # psutil is optional
            self._proc = None
        self.peak = 0
        self._task: asyncio.Task[None] | None = None

    def sample(self) -> None:
        if self._proc is not None:
            self.peak = max(self.peak, self._proc.memory_info().rss)

    async def _run(self) -> None:
        while True:
            self.sample()
            await asyncio.sleep(0.1)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sample()

    @staticmethod
    def maxrss_mb() -> float:
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / 1024 if sys.platform != "darwin" else kb / 2**20


class Targets:
    """The verdict on each stated target; a benchmark exits 1 when any failed, so a script
    or CI can act on it without reading the figures."""

    def __init__(self) -> None:
        self.failed: list[str] = []

    def check(self, name: str, ok: bool) -> str:
        if not ok:
            self.failed.append(name)
        return "PASS" if ok else "FAIL"

    def exit_code(self) -> int:
        if self.failed:
            say(f"targets failed: {', '.join(self.failed)}")
            return 1
        return 0


class PgCpu:
    """CPU seconds used by a LocalCluster's server processes (postmaster + backends).

    Read from the postmaster: its own time, its reaped children's (backends that exited)
    and its live children's, so a backend that ends between two readings still counts.
    Needs psutil (the bench extra).
    """

    def __init__(self, datadir: Path) -> None:
        import psutil

        pid = int((datadir / "postmaster.pid").read_text().split()[0])
        self._pm = psutil.Process(pid)

    def total(self) -> float:
        t = self._pm.cpu_times()
        live = 0.0
        for child in self._pm.children(recursive=True):
            try:
                c = child.cpu_times()
            except Exception:  # it exited meanwhile: now in the reaped total
                continue
            live += c.user + c.system
        return t.user + t.system + t.children_user + t.children_system + live


def cpu_s() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def pct(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    s = sorted(values)
    k = max(0, min(len(s) - 1, round(p / 100 * len(s) + 0.5) - 1))
    return s[k]


def counter_value(counter: Any) -> float:
    return sum(s.value for m in counter.collect() for s in m.samples if s.name.endswith("_total"))


@contextlib.contextmanager
def logs_to_file(level: str) -> Iterator[Path]:
    """Production logging (JSON lines) into a temporary file instead of the terminal."""
    from worker.logs import setup_logging

    fd, name = tempfile.mkstemp(prefix="genworker-bench-", suffix=".log")
    path = Path(name)
    with os.fdopen(fd, "w", encoding="utf-8") as f, contextlib.redirect_stdout(f):
        setup_logging(level, "json")
        yield path


def log_problems(path: Path) -> tuple[int, list[str]]:
    """Log lines at WARNING or above (or not JSON): their count and the first five."""
    count, first = 0, []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            level = json.loads(line).get("level", "")
        except ValueError:
            level = "?"
        if str(level).upper() in ("WARNING", "ERROR", "CRITICAL", "?"):
            count += 1
            if len(first) < 5:
                first.append(line[:300])
    return count, first


@contextlib.asynccontextmanager
async def running(
    store: Store, handlers: dict[str, Handler], config: RunnerConfig
) -> AsyncIterator[Runner]:
    """As tests/runtime/conftest.py's ``running``, but with the caller's full RunnerConfig
    (production settings, not the tests' fast ones) and without importing pytest (RSS)."""
    from worker.metrics import Metrics
    from worker.runner import Runner

    runner = Runner(store, config, handlers, Metrics())
    task = asyncio.create_task(runner.run())
    try:
        yield runner
    finally:
        runner.stop()
        await asyncio.wait_for(task, 60)
