"""A real memosd in a subprocess, for integration tests.

``Daemon`` starts ``memosd`` on an ipc socket inside a fresh private temp dir
(under /tmp, so the socket path stays well below the ipc length limit), waits
until ``ping`` answers, and on ``stop`` sends SIGTERM and checks a clean exit.
``restart`` starts it again on the same data dir. ``Raw`` is a bare DEALER for
sending frames the client library would never send.

Test modules import the fixtures they need from here.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# A memosd a test starts by hand (not through Daemon) signs its audit checkpoints here, not in ~/.config.
_AUDIT_FALLBACK = tempfile.mkdtemp(prefix="memos-test-audit-", dir="/tmp")
atexit.register(shutil.rmtree, _AUDIT_FALLBACK, True)
os.environ.setdefault("MEMOS_AUDIT__SIGNING_KEY", os.path.join(_AUDIT_FALLBACK, "audit-signing.key"))
os.environ.setdefault("MEMOS_AUDIT__CHECKPOINT_FILE", os.path.join(_AUDIT_FALLBACK, "audit-checkpoints.jsonl"))

import msgpack
import pytest
import zmq

import pgserver
from memos import protocol as p
from memos.client import Client
from memos.errors import MemosError
from memos.ids import new_id

ROOT = Path(__file__).resolve().parent.parent
TOYTYPE = ROOT / "tests" / "toytype"
MEMOSD = [sys.executable, "-m", "memos.daemon.main"]


def memosctl(daemon: Daemon, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    """``memosctl ARGS`` against ``daemon`` as the local administrator; asserts its exit status."""
    env = {**os.environ, "MEMOS_SOCKET": str(daemon.socket), **daemon.audit_env(), **daemon.env}
    env.pop("MEMOS_TOKEN", None)
    proc = subprocess.run([sys.executable, "-m", "memos.cli", *args], capture_output=True, text=True, env=env,
                          timeout=120, cwd=ROOT, check=False)
    assert (proc.returncode == 0) == ok, proc.stderr
    return proc


class Daemon:
    """One memosd process (and its successors after restarts) on one data dir."""

    def __init__(self, root: Path | None = None, env: dict[str, str] | None = None,
                 socket: Path | None = None) -> None:
        self.root = root or Path(tempfile.mkdtemp(prefix="memosd-", dir="/tmp"))
        os.chmod(self.root, 0o700)
        self.data_dir = self.root / "data"
        self.socket = socket or self.root / "run" / "memosd.sock"
        self.signing_key = self.root / "config" / "audit-signing.key"
        self.checkpoint_file = self.root / "config" / "audit-checkpoints.jsonl"
        self.admin_token_file = self.root / "config" / "admin.token"  # for tests that turn require_token on
        self.env = dict(env or {})
        self.pg_database = None if "MEMOS_STORAGE" in self.env else pgserver.daemon_database()
        if self.pg_database is not None:
            self.env["MEMOS_STORAGE"] = pgserver.shared().url(self.pg_database)
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []
        self._clients: list[Client] = []

    # -- process control --------------------------------------------------

    def spawn(self, *extra: str, env: dict[str, str] | None = None, socket: Path | None = None,
              data_dir: Path | None = None) -> subprocess.Popen[bytes]:
        """Start a memosd process without waiting (for lifecycle tests)."""
        log = self.root / f"memosd-{len(self.logs)}.log"
        self.logs.append(log)
        # Daemons that do not test search use the model-free embedder: starting
        # torch in every one of them would only slow the suite down. Likewise they
        # know no language model (a fuzzed `generate` would load one).
        # The audit signing key and checkpoint file of each daemon live in its own root, never in ~/.config.
        full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "MEMOS_SEARCH__EMBEDDER": "hashing",
                    "MEMOS_ACTIVATION__MODELS": "{}", **self.audit_env(), **self.env, **(env or {})}
        # The tests' own memory types (tests/toytype) are registered in the daemon too.
        full_env["PYTHONPATH"] = os.pathsep.join(
            [str(TOYTYPE), *filter(None, full_env.get("PYTHONPATH", "").split(os.pathsep))])
        args = [*MEMOSD, "--data-dir", str(data_dir or self.data_dir), "--socket", str(socket or self.socket), *extra]
        with open(log, "wb") as out:
            return subprocess.Popen(args, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT)

    def audit_env(self) -> dict[str, str]:
        return {"MEMOS_AUDIT__SIGNING_KEY": str(self.signing_key),
                "MEMOS_AUDIT__CHECKPOINT_FILE": str(self.checkpoint_file)}

    def start(self, timeout: float = 20.0) -> Daemon:
        (self.socket.parent).mkdir(mode=0o700, parents=True, exist_ok=True)
        self.proc = self.spawn()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        client = Client(self.socket, timeout=0.5, retries=0)
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(f"memosd exited with {self.proc.returncode}:\n{self.log()}")
                if self.socket.exists():
                    try:
                        if client.ping()["pid"] == self.proc.pid:
                            return
                    except MemosError:
                        pass
                time.sleep(0.05)
        finally:
            client.close()
        raise AssertionError(f"memosd did not answer ping in {timeout}s:\n{self.log()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal memosd, wait for it and check that it shut down cleanly (exit 0)."""
        self.close_clients()
        assert self.proc is not None
        self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"memosd did not stop within {timeout}s:\n{self.log()}") from None
        assert code == 0, f"memosd exited with {code}:\n{self.log()}"
        self.check_log()
        assert not self.socket.exists(), "a clean stop must remove the socket"
        return code

    def kill(self) -> None:
        """SIGKILL: no cleanup at all, as after a crash."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)

    def restart(self, timeout: float = 20.0) -> Daemon:
        if self.alive():
            self.stop()
        self.close_clients()
        return self.start(timeout)

    def cleanup(self) -> None:
        self.close_clients()
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self.root, ignore_errors=True)
        if self.pg_database is not None:
            pgserver.shared().drop_database(self.pg_database)

    # -- the store it serves ---------------------------------------------------

    @property
    def storage(self) -> str:
        return self.env.get("MEMOS_STORAGE", "lmdb")

    def store(self) -> Any:
        """The store this daemon serves, opened in the test (LMDB beside a running memosd is fine)."""
        from memos.backends import open_store

        return open_store(self.storage, self.data_dir)

    def stored_bytes(self) -> bytes:
        """Everything the store holds: LMDB's file, free pages and all; PostgreSQL's rows."""
        if self.storage == "lmdb":
            return (self.data_dir / "data.mdb").read_bytes()
        import psycopg

        out = bytearray()
        with psycopg.connect(self.storage) as conn:
            tables = conn.execute("SELECT table_name FROM information_schema.tables "
                                  "WHERE table_schema = 'memos'").fetchall()
            for (table,) in tables:
                for k, v in conn.execute(f'SELECT k, v FROM memos."{table}"'):
                    out += k + v
        return bytes(out)

    # -- logs ---------------------------------------------------------------

    def log(self, index: int = -1) -> str:
        return self.logs[index].read_text(errors="replace") if self.logs else ""

    def check_log(self) -> None:
        """A bug answered with 'internal' is still a bug: no tracebacks in the log."""
        text = self.log()
        assert "Traceback" not in text and '"exception"' not in text, text[-4000:]

    # -- clients ------------------------------------------------------------

    def client(self, token: str | None = None, **options: Any) -> Client:
        options.setdefault("timeout", 15.0)
        options.setdefault("retries", 0)
        c = Client(self.socket, token=token, **options)
        self._clients.append(c)
        return c

    def close_clients(self) -> None:
        while self._clients:
            self._clients.pop().close()

    def raw(self) -> Raw:
        return Raw(self.socket)


class Raw:
    """A bare DEALER on memosd's socket: sends frames as given, reads replies."""

    ctx = zmq.Context()

    def __init__(self, socket: Path) -> None:
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"ipc://{socket}")

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        """The next reply, decoded; fails if none arrives in time."""
        if not self.sock.poll(int(timeout * 1000)):
            raise AssertionError(f"no reply within {timeout}s")
        frames = self.sock.recv_multipart()
        assert len(frames) == 1, f"a reply is one frame, got {len(frames)}"
        reply = msgpack.unpackb(frames[0], raw=False)
        assert isinstance(reply, dict), reply
        return reply

    def nothing_more(self, wait: float = 0.05) -> bool:
        return not self.sock.poll(int(wait * 1000))

    def exchange(self, *frames: bytes, timeout: float = 10.0, settle: float = 0.0) -> dict[str, Any]:
        """Send, and return the one reply (with ``settle``, also check that no second one follows)."""
        self.send(*frames)
        reply = self.recv(timeout)
        if settle:
            assert self.nothing_more(settle), "more than one reply to one request"
        return reply

    def close(self) -> None:
        self.sock.close(linger=0)

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def request(op: str, args: dict[str, Any] | None = None, *, rid: str | None = None,
            token: str | None = None, v: int = p.PROTOCOL_VERSION) -> dict[str, Any]:
    message: dict[str, Any] = {"v": v, "id": rid or new_id(), "op": op, "args": args or {}}
    if token is not None:
        message["token"] = token
    return message


def frame(op: str, args: dict[str, Any] | None = None, **kw: Any) -> bytes:
    return p.encode(request(op, args, **kw))


# -- fixtures -------------------------------------------------------------------

def _running(env: dict[str, str] | None = None):
    d = Daemon(env=env).start()
    try:
        yield d
        if d.alive():
            d.stop()
    finally:
        d.cleanup()


@pytest.fixture(scope="module")
def daemon():
    """One memosd per test module; tests use cube and agent names of their own."""
    yield from _running()


@pytest.fixture
def fresh_daemon():
    """A memosd of this test alone (it may stop, kill or restart it)."""
    yield from _running()


@pytest.fixture
def make_daemon():
    """Build unstarted Daemons; all are killed and removed afterwards."""
    made: list[Daemon] = []

    def make(**kw: Any) -> Daemon:
        d = Daemon(**kw)
        made.append(d)
        return d

    yield make
    for d in made:
        d.cleanup()


@pytest.fixture
def admin(daemon):
    """A client of the local administrator (no token: the daemon's own user)."""
    return daemon.client()


# -- agent processes ------------------------------------------------------------

# Run with ``python -c AGENT_SCRIPT <json config>``: one agent process adding to a
# shared cube and its private cube, and now and then trying another agent's
# private cube. It prints one JSON line: what was acknowledged and refused.
AGENT_SCRIPT = r"""
import json, os, sys, time
cfg = json.loads(sys.argv[1])
from memos.client import Client
from memos.errors import Denied
c = Client(cfg["socket"], token=cfg["token"], timeout=60, retries=0)
open(cfg["ready"], "w").close()
while not os.path.exists(cfg["go"]):
    time.sleep(0.005)
out = {"shared": [], "private": [], "denied": 0, "leaked": 0}
for i in range(cfg["n"]):
    m = c.add(cfg["shared"], f"{cfg['name']} shared {i}")
    out["shared"].append([m.id, m.text, m.version])
    m = c.add(cfg["private"], f"{cfg['name']} private {i}")
    out["private"].append([m.id, m.text, m.version])
    if i % 10 == 0 and cfg["foreign"]:
        try:
            c.add(cfg["foreign"], "intrusion")
            out["leaked"] += 1
        except Denied:
            out["denied"] += 1
c.close()
print(json.dumps(out))
"""


def run_agents(daemon: Daemon, configs: list[dict[str, Any]], timeout: float = 120.0) -> list[dict[str, Any]]:
    """Start one agent process per config, release them together, return their reports."""
    import json

    go = daemon.root / f"go-{new_id()}"
    procs = []
    for i, cfg in enumerate(configs):
        cfg = {**cfg, "socket": str(daemon.socket), "go": str(go), "ready": str(go) + f".ready{i}"}
        procs.append((cfg, subprocess.Popen([sys.executable, "-c", AGENT_SCRIPT, json.dumps(cfg)], cwd=ROOT,
                                            env={**os.environ, "HF_HUB_OFFLINE": "1"},
                                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)))
    deadline = time.monotonic() + timeout
    while not all(os.path.exists(cfg["ready"]) for cfg, _ in procs):
        assert time.monotonic() < deadline, "agent processes did not start"
        for _, proc in procs:
            assert proc.poll() is None, proc.communicate()[1].decode()
        time.sleep(0.01)
    go.touch()
    reports = []
    for _, proc in procs:
        out, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        assert proc.returncode == 0, err.decode()
        reports.append(json.loads(out.decode().strip().splitlines()[-1]))
    return reports
