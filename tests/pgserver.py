"""A throwaway PostgreSQL server for the tests, from the machine's own binaries (Debian's postgresql).

``initdb`` refuses to run as root, and CI runs as root: the cluster then belongs to
the unprivileged uid 65534 and its processes run as that user. It listens on a unix
socket in its own folder only. Each test gets a database of its own, dropped after.
"""

from __future__ import annotations

import atexit
import glob
import itertools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

NOBODY = 65534
_counter = itertools.count()


def bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(os.path.realpath(found)).parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
    return Path(versions[-1]).parent if versions else None


class PgServer:
    def __init__(self) -> None:
        bins = bindir()
        if bins is None:
            raise FileNotFoundError("PostgreSQL's binaries (pg_ctl, initdb) are not installed")
        self.bins = bins
        # Under /tmp, not pytest's 0700 folders: the server's user must reach its own folder.
        self.root = Path(tempfile.mkdtemp(prefix="memos-pg-", dir="/tmp"))
        os.chmod(self.root, 0o755)
        self.data = self.root / "data"
        self.data.mkdir(mode=0o700)
        if os.getuid() == 0:
            os.chown(self.data, NOBODY, NOBODY)
        self._run("initdb", "-D", str(self.data), "-U", "memos", "--auth=trust", "-E", "UTF8", "--no-locale")
        self.start()
        self.admin_url = self.url("postgres")

    def start(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.data / "server.log"), "-w", "start",
                  "-o", f"-k {self.data} -c listen_addresses='' -c max_connections=300 "
                        "-c shared_buffers=64MB")

    def halt(self) -> None:
        """Stop the server, its clients' connections cut (it keeps its data: ``start`` again)."""
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def _run(self, tool: str, *args: str, check: bool = True) -> None:
        cmd = [str(self.bins / tool), *args]
        if os.getuid() == 0:
            cmd = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd]
        subprocess.run(cmd, check=check, capture_output=True, cwd=self.root, timeout=120)

    def url(self, database: str) -> str:
        return f"postgresql://memos@/{database}?host={self.data}"

    def sql(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(statement)

    def new_database(self) -> str:
        name = f"memos_test_{os.getpid()}_{next(_counter)}"
        self.sql(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        self.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


_shared: PgServer | None = None


def shared() -> PgServer:
    """The one server of this test process, started when first asked for, stopped at exit."""
    global _shared
    if _shared is None:
        _shared = PgServer()
        atexit.register(_shared.stop)
    return _shared


def daemon_database() -> str | None:
    """With MEMOS_TEST_STORAGE=postgresql the daemon tests run on PostgreSQL: a new database per daemon."""
    if os.environ.get("MEMOS_TEST_STORAGE", "lmdb") != "postgresql":
        return None
    return shared().new_database()
