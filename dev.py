#!/usr/bin/env python3
"""The commands a newcomer needs, each doing its own setup on a machine with only Python.

    python3 dev.py demo     # embedded Postgres + the real worker + live progress
    python3 dev.py test     # the whole test suite (and the SQL suite on PostgreSQL 15 if present)
    python3 dev.py check    # the gates: ruff format, ruff check, mypy, import contracts

Both create ./.venv on first use and install the project with the pinned versions
of requirements.lock; later runs reuse it until pyproject.toml or the lock change.
Ctrl-C is left to the command itself (the demo hands its chapters back and stops its
database); the exit code is the command's, 130 when Ctrl-C ended it.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PYTHON = VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
PG15 = Path("/usr/lib/postgresql/15/bin")
# Each gate runs from .venv with the versions pinned in pyproject.toml's dev extra.
GATES = (
    ("ruff format", ["-m", "ruff", "format", "--check", "."]),
    ("ruff check", ["-m", "ruff", "check", "."]),
    ("mypy", ["-m", "mypy"]),  # files and strictness: [tool.mypy] in pyproject.toml
    ("import contracts", ["-c", "from importlinter.cli import lint_imports_command as c; c()"]),
)


def ensure_env() -> Path:
    if sys.version_info < (3, 11):  # noqa: UP036 (dev.py runs on whatever python3 is)
        sys.exit(f"genworker needs Python 3.11 or newer; this is {sys.version.split()[0]}")
    if not PYTHON.exists():
        print("creating .venv ...", flush=True)
        venv.create(VENV, with_pip=True)
    digest = hashlib.sha256(
        (ROOT / "pyproject.toml").read_bytes() + (ROOT / "requirements.lock").read_bytes()
    ).hexdigest()
    stamp = VENV / ".genworker-installed"
    if not stamp.exists() or stamp.read_text() != digest:
        print("installing genworker and its pinned dependencies into .venv ...", flush=True)
        pip = [str(PYTHON), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        subprocess.check_call([*pip, "--upgrade", "pip"])
        subprocess.check_call([*pip, "-c", str(ROOT / "requirements.lock"), "-e", f"{ROOT}[dev]"])
        stamp.write_text(digest)
    return PYTHON


def _ignore_sigint(_signum: int, _frame: object) -> None:
    """A Python-level handler rather than SIG_IGN: exec resets caught signals to the
    default, so the child still receives Ctrl-C (and Python there still raises
    KeyboardInterrupt), while this parent keeps waiting for it."""


def run(cmd: list[str], env: dict[str, str] | None = None) -> int:
    """Run ``cmd`` in the foreground and wait for it, however Ctrl-C arrives.

    A terminal sends SIGINT to the whole foreground process group, so the child gets it
    directly; subprocess.call would instead kill the child 0.25 s after the interrupt,
    before its own clean shutdown had run.
    """
    previous = signal.signal(signal.SIGINT, _ignore_sigint)
    try:
        proc = subprocess.Popen(cmd, env=env)
        code = proc.wait()
    finally:
        signal.signal(signal.SIGINT, previous)
    return 128 - code if code < 0 else code  # killed by signal N: report 128 + N


def check(python: str) -> int:
    failed = []
    for name, args in GATES:
        print(f"== {name}", flush=True)
        if run([python, *args]) != 0:
            failed.append(name)
    print(f"gates failed: {', '.join(failed)}" if failed else "all gates passed", flush=True)
    return 1 if failed else 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test", "check"):
        print(__doc__)
        return 2
    python = str(ensure_env())
    command, rest = argv[0], argv[1:]
    os.chdir(ROOT)
    if command == "demo":
        return run([python, "-m", "worker", "demo", *rest])
    if command == "check":
        return check(python)
    code = run([python, "-m", "pytest", *rest])
    if code == 0 and not rest and not os.environ.get("PG_BIN") and (PG15 / "postgres").exists():
        print(
            "\nSQL and store suites again on PostgreSQL 15 (Supabase's major version):", flush=True
        )
        code = run(
            [python, "-m", "pytest", "tests/sql", "tests/store"],
            env={**os.environ, "PG_BIN": str(PG15)},
        )
    return code


if __name__ == "__main__":
    try:
        raise SystemExit(main(sys.argv[1:]))
    except KeyboardInterrupt:  # Ctrl-C while .venv was being set up
        print("\ninterrupted", file=sys.stderr)
        raise SystemExit(130) from None
