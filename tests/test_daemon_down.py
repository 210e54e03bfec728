"""With no daemon, clients and memosctl fail at once and say how to start one; a daemon that dies
while a client waits is reported within a second, not after every timeout."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from daemon_fixtures import ROOT, Daemon
from memos.client import AsyncClient, Client
from memos.errors import Unavailable


def stale_socket(path: Path, pid: int | None = None) -> None:
    """A socket file nobody listens on, as a killed daemon leaves it (and its lock file)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()
    if pid is not None:
        Path(f"{path}.lock").write_text(f"{pid}\n")


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("kind", ["missing", "stale", "stale with a dead pid"])
def test_clients_fail_at_once_naming_the_socket_and_how_to_start_memosd(tmp_path, kind):
    path = tmp_path / "memosd.sock"
    if kind != "missing":
        stale_socket(path, dead_pid() if "pid" in kind else None)
    for call in (lambda: Client(path, timeout=30).ping(),
                 lambda: asyncio.run(AsyncClient(path, timeout=30).ping())):
        start = time.monotonic()
        with pytest.raises(Unavailable) as caught:
            call()
        assert time.monotonic() - start < 1.0
        message = caught.value.message
        assert str(path) in message and "memosd" in message and "start it" in message
        assert ("stale" in message) == (kind != "missing")
        assert ("is gone" in message) == ("pid" in kind)


def test_memosctl_says_so_in_a_line(tmp_path):
    env = {**os.environ, "MEMOS_SOCKET": str(tmp_path / "memosd.sock")}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "memos.cli", "cube", "list"], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=60, check=False)
    took = time.monotonic() - start
    assert proc.returncode == 1
    assert proc.stderr.startswith("memosctl: unavailable: memosd is not running") and "Traceback" not in proc.stderr
    assert took < 10, took  # interpreter start-up included; the call itself fails at once (test above)


@pytest.mark.parametrize("kind", ["blocking", "async"])
def test_a_daemon_killed_while_a_client_waits_is_reported_within_a_second(kind):
    import threading

    d = Daemon().start()
    try:
        client = Client(d.socket, timeout=60, retries=2)
        client.ping()
        os.kill(d.pid, signal.SIGSTOP)  # a request that will never be answered...

        def killer() -> None:
            time.sleep(0.5)
            os.kill(d.pid, signal.SIGKILL)  # ...by a daemon that then dies, leaving its socket

        async def waiting() -> None:
            async_client = AsyncClient(d.socket, timeout=60, retries=2)
            try:
                await async_client.cube_list()
            finally:
                await async_client.close()

        threading.Thread(target=killer).start()
        start = time.monotonic()
        with pytest.raises(Unavailable, match="went away while 'cube_list' waited"):
            client.cube_list() if kind == "blocking" else asyncio.run(waiting())
        assert time.monotonic() - start < 2.5  # killed after 0.5 s, noticed within the next second
        d.proc.wait(10)
        d.start()  # a new daemon on the same socket: the client goes on, and nothing was left queued
        assert client.ping()["pid"] == d.pid
        client.close()
    finally:
        d.cleanup()
