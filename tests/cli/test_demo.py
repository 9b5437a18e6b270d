"""The demo as a newcomer runs it: `python3 dev.py demo`, Ctrl-C from a terminal, failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.devdb import free_port

ROOT = Path(__file__).resolve().parents[2]


def demo_env(tmp: Path, **extra: str) -> dict[str, str]:
    """No Gemini key (offline model) and a private TMPDIR, so the embedded database's
    folder and processes can be found afterwards."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GEMINI_", "SUPABASE_", "DATABASE_"))
    }
    pgtmp = tmp / "tmp"
    pgtmp.mkdir(exist_ok=True)
    return {**env, "TMPDIR": str(pgtmp), **extra}


def demo_args(*args: str) -> list[str]:
    """``demo`` and its options, on a free health port."""
    return ["demo", "--port", str(free_port()), *args]


def start_in_own_session(cmd: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    """As a terminal starts a foreground job: its own process group (and session)."""
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def read_until(proc: subprocess.Popen[str], marker: str, lines: list[str]) -> None:
    """Read output lines until one contains ``marker`` (the demo's own timeouts bound this)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.append(line)
        if marker in line:
            return
    pytest.fail(f"demo ended before printing {marker!r}:\n{''.join(lines)}")


def postmaster_pids(tmpdir: Path) -> list[int]:
    pids = []
    for pidfile in tmpdir.glob("genworker-pg-*/data/postmaster.pid"):
        pids.append(int(pidfile.read_text().split()[0]))
    return pids


def processes_mentioning(path: Path) -> Iterator[int]:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if str(path).encode() in cmdline and alive(int(entry.name)):
            yield int(entry.name)


def alive(pid: int) -> bool:
    """Running, not a zombie (a container's PID 1 may never reap the exited postmaster)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def assert_database_gone(tmpdir: Path, postmasters: list[int]) -> None:
    assert postmasters and not [p for p in postmasters if alive(p)], postmasters
    assert list(processes_mentioning(tmpdir)) == []
    assert list(tmpdir.glob("genworker-pg-*")) == []


def stop_leftovers(tmpdir: Path) -> None:
    """Only when the demo failed to: never leave a database behind for the next run."""
    from worker.devdb import LocalCluster

    for base in tmpdir.glob("genworker-pg-*"):
        if (base / "data" / "postmaster.pid").exists():
            LocalCluster(base).stop("immediate")


def test_demo_short_mode(tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "worker", *demo_args("--short", "--output", str(out_dir))],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
        env=demo_env(tmp_path),
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "jobs:            3 completed of 3\n" in out
    words = int(out.split("words:")[1].split()[0])
    writes = int(out.split("database writes:")[1].split()[0])
    assert words > 100 and writes > 3
    assert "100%" in out and "section 2/2" in out
    assert [line for line in out.splitlines() if line.count("completed") > 1] == []
    texts = sorted(out_dir.glob("chapter-*.md"))
    assert len(texts) == 3 and all(len(t.read_text().split()) > 50 for t in texts)
    assert list((tmp_path / "tmp").glob("genworker-pg-*")) == []


def test_dev_py_demo_ctrl_c_from_a_terminal(tmp_path: Path) -> None:
    """SIGINT to the whole process group (dev.py, the demo, initdb...), as Ctrl-C sends it."""
    env = demo_env(tmp_path)
    proc = start_in_own_session(
        [sys.executable, str(ROOT / "dev.py"), *demo_args("--output", str(tmp_path / "out"))],
        env,
    )
    lines: list[str] = []
    try:
        read_until(proc, "generating section", lines)
        postmasters = postmaster_pids(tmp_path / "tmp")
        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
        text = "".join(lines) + out
        assert proc.returncode == 130, text
        assert "Traceback" not in text and "KeyboardInterrupt" not in text
        assert "Summary" in text and "(interrupted)" in text
        assert "handed back to the queue" in text
        assert_database_gone(tmp_path / "tmp", postmasters)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        stop_leftovers(tmp_path / "tmp")


def test_demo_reports_a_failed_chapter(tmp_path: Path) -> None:
    """Gemini unreachable: the chapter fails, the summary says so, and the exit code is 1."""
    env = demo_env(
        tmp_path,
        GEMINI_API_KEY="demo-test-key",
        GEMINI_BASE_URL=f"http://127.0.0.1:{free_port()}",  # nothing listens there
        GEMINI_SECTION_RETRIES="0",
        MAX_RETRIES="0",
    )
    proc = subprocess.run(
        [sys.executable, "-m", "worker", *demo_args("--short", "--chapters", "1")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
    )
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr  # (its text goes to tmp_path/demo-output)
    assert "jobs:            0 completed of 1; 1 failed\n" in out
    assert "ch.1 failed:" in out and "(interrupted)" not in out
    assert "Traceback" not in out + proc.stderr
    assert list((tmp_path / "tmp").glob("genworker-pg-*")) == []


def test_demo_keep_serves_the_other_commands(tmp_path: Path) -> None:
    """`demo --keep`: the printed DATABASE_URL works for status, enqueue, show --follow and
    cancel while the demo's worker keeps running; Ctrl-C then ends it with exit 0."""
    from tests.cli.test_cli import genworker

    argv = demo_args("--keep", "--short", "--chapters", "1", "--output", str(tmp_path / "out"))
    proc = start_in_own_session([sys.executable, "-m", "worker", *argv], demo_env(tmp_path))
    lines: list[str] = []
    try:
        read_until(proc, "export DATABASE_URL=", lines)
        dsn = lines[-1].split("export DATABASE_URL=", 1)[1].strip()
        postmasters = postmaster_pids(tmp_path / "tmp")
        env = {"DATABASE_URL": dsn}

        status = genworker("status", env=env)
        assert status.returncode == 0
        # The chapter's job (its story-memory embedding job may be queued beside it).
        chapter_jobs = [
            (t["status"], t["count"])
            for t in json.loads(status.stdout)["by_type"]
            if t["job_type"] == "chapter_generation"
        ]
        assert chapter_jobs == [("completed", 1)]
        second = "00000000-0000-4000-8000-00000000c002"
        enq = genworker("enqueue", "--chapter", second, "--options", '{"sections": 2}', env=env)
        assert enq.returncode == 0, enq.stderr
        job = json.loads(enq.stdout)["job_id"]
        shown = genworker("show", "--chapter", second, "--follow", env=env)
        assert shown.returncode == 0, shown.stderr
        assert len(shown.stdout.split()) > 50 and "(completed)]" in shown.stderr
        cancel = genworker("cancel", "--job", job, env=env)
        assert cancel.returncode == 1 and f"job {job} is completed" in cancel.stderr

        os.killpg(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=120)
        text = "".join(lines) + out
        assert proc.returncode == 0, text
        assert "Traceback" not in text and "jobs:            1 completed of 1\n" in text
        assert_database_gone(tmp_path / "tmp", postmasters)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        stop_leftovers(tmp_path / "tmp")


def test_demo_without_postgresql_says_what_to_do(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "worker", *demo_args("--short")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=demo_env(tmp_path, PG_BIN=str(tmp_path / "no-such-bin")),
    )
    assert proc.returncode == 1
    [line] = proc.stderr.strip().splitlines()
    assert line.startswith("genworker demo: no PostgreSQL program at ") and "PG_BIN" in line
    assert list((tmp_path / "tmp").glob("genworker-pg-*")) == []


def test_a_killed_embedded_database_counts_as_stopped(tmp_path: Path) -> None:
    """The demo's clean-up must not fail (and hide the real error) on a server that is
    already gone: stop() and destroy() pass over a stale postmaster.pid."""
    from worker.devdb import LocalCluster

    cluster = LocalCluster(tmp_path / "pg").start()
    pidfile = tmp_path / "pg" / "data" / "postmaster.pid"
    postmaster = int(pidfile.read_text().split()[0])
    os.kill(postmaster, signal.SIGKILL)
    for _ in range(600):  # a generous ceiling; normally the first check sees it gone
        if not alive(postmaster):
            break
        time.sleep(0.1)
    assert not alive(postmaster) and pidfile.exists()  # stale, as a kill leaves it
    cluster.stop()
    cluster.destroy()
    assert not alive(postmaster)


def test_demo_output_replaces_only_chapter_files(tmp_path: Path) -> None:
    """`--output` may name a folder that holds other things: only the previous run's
    chapter files are replaced."""
    from worker.demo import save_output

    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "chapter-9.md").write_text("an earlier run")
    save_output([{"number": 1, "title": "One", "content": "Text."}], tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chapter-1.md", "notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert (tmp_path / "chapter-1.md").read_text() == "# One\n\nText.\n"
