"""memosd's life: restarts, crashes, refusing to start twice, signals, configuration."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from memos.client import Client
from memos.errors import Denied, MemosError

from daemon_fixtures import MEMOSD, ROOT, Daemon, fresh_daemon, frame, make_daemon  # noqa: F401


def everything(admin: Client) -> dict:
    """What a restart must keep, as plain data."""
    out: dict = {"cubes": sorted((c.name, c.owner, sorted((k, v.value) for k, v in c.acl.items()), c.version)
                                 for c in admin.cube_list()),
                 "agents": sorted(a.name for a in admin.agent_list())}
    for c in admin.cube_list():
        out[f"memories:{c.name}"] = [m.model_dump(exclude={"usage"}) for m in admin.list(c.name, status="all")]
        out[f"history:{c.name}"] = [h.model_dump() for h in admin.history(c.name)]
    return out


def test_restart_keeps_everything(fresh_daemon):
    d = fresh_daemon
    admin = d.client()
    admin.cube_create("life")
    kept = admin.add("life", "kept", tags=["a"], metadata={"n": 1})
    admin.add_many("life", ["two", "three"])
    admin.update("life", kept.id, text="kept v2")
    blob = admin.add("life", "blob", type="opaque", blob=b"\x01\x02" * 1000)
    token = admin.agent_add("life-reader")["token"]
    admin.cube_grant("life", "life-reader", "read")
    with d.raw() as raw:
        retried = frame("add", {"cube": "life", "text": "retried"})
        first_reply = raw.exchange(retried)
    before = everything(admin)
    checkpoint = admin.audit_checkpoint()
    tail = admin.audit_tail(50)

    d.restart()
    admin = d.client()
    assert everything(admin) == before
    assert admin.get_blob("life", blob.blob.sha256) == b"\x01\x02" * 1000
    assert admin.get("life", kept.id, at=1).text == "kept"
    assert admin.audit_tail(len(tail), after=tail[0].seq - 1) == tail
    report = admin.audit_verify(checkpoint)
    assert report.ok and report.records >= checkpoint.seq
    # the agent's token and role survive
    reader = d.client(token=token)
    assert reader.whoami()["agent"] == "life-reader"
    assert reader.get("life", kept.id).text == "kept v2"
    with pytest.raises(Denied):
        reader.add("life", "no writes")
    # and so do stored replies: a retry after the restart is still applied once
    with d.raw() as raw:
        assert raw.exchange(retried) == first_reply
    assert [m.text for m in admin.list("life")].count("retried") == 1


@contextmanager
def writing(d: Daemon, cubes: list[str], at_least: int) -> Iterator[list[list[str]]]:
    """One writer thread per entry of ``cubes``, adding until the daemon goes away.

    Yields the acknowledged ids per writer once ``at_least`` writes in all are
    acknowledged; the threads are joined when the block ends.
    """
    acked: list[list[str]] = [[] for _ in cubes]
    stop = threading.Event()

    def writer(i: int) -> None:
        c = Client(d.socket, timeout=1.5, retries=0)
        try:
            n = 0
            while not stop.is_set():
                try:
                    m = c.add(cubes[i], f"w{i} item {n}")
                except MemosError:
                    return  # the daemon is gone
                acked[i].append(m.id)
                n += 1
        finally:
            c.close()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(len(cubes))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while sum(map(len, acked)) < at_least and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield acked
    finally:
        stop.set()
        for t in threads:
            t.join(10)


def test_sigkill_during_writes_loses_nothing_acknowledged(fresh_daemon):
    d = fresh_daemon
    admin = d.client()
    for i in range(4):
        admin.cube_create(f"crash{i}")
    with writing(d, [f"crash{i}" for i in range(4)], at_least=200) as acked:
        d.kill()  # mid-stream: writers still sending
    assert sum(map(len, acked)) >= 200
    assert d.socket.exists(), "SIGKILL leaves the socket behind"

    d.start()  # the stale socket and lock must not stop it
    admin = d.client()
    for i in range(4):
        stored = [m.id for m in admin.list(f"crash{i}")]
        assert set(acked[i]) <= set(stored), f"lost {len(set(acked[i]) - set(stored))} acknowledged writes"
        assert len(set(stored)) == len(stored)
        assert [h.version for h in admin.history(f"crash{i}")] == list(range(len(stored), -1, -1))
    assert admin.audit_verify().ok


def refused(proc: subprocess.Popen, d: Daemon, words: str) -> None:
    code = proc.wait(20)
    log = d.log()
    assert code != 0, log
    assert words in log, log


def test_second_daemon_refused(fresh_daemon, make_daemon):
    d = fresh_daemon
    admin = d.client()
    admin.cube_create("first")
    # same socket (and data dir)
    refused(d.spawn(), d, "another memosd is running")
    # same data dir, another socket
    other = d.root / "run2"
    other.mkdir(mode=0o700)
    refused(d.spawn(socket=other / "memosd.sock"), d, "another memosd is running")
    assert not (other / "memosd.sock").exists()
    # same socket, another data dir
    refused(d.spawn(data_dir=d.root / "data2"), d, "another memosd is running")
    # the first one never noticed
    assert d.socket.exists()
    assert admin.ping()["pid"] == d.pid
    assert [c.name for c in admin.cube_list()] == ["first"]


def test_stale_socket_is_removed(make_daemon):
    d = make_daemon().start()
    d.kill()
    assert d.socket.exists()
    stale = d.root / "stale-link"
    os.link(d.socket, stale)  # keeps the old inode alive, so a new socket cannot reuse it
    d.start()
    assert not os.path.samefile(d.socket, stale), "the stale socket was not replaced"
    d.stop()


def test_a_socket_another_program_listens_on_is_not_taken_over(make_daemon):
    import socket as sockets

    d = make_daemon()
    d.socket.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    other = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
    other.bind(str(d.socket))
    other.listen(1)
    try:
        refused(d.spawn(), d, "another program listens on")
        client = sockets.socket(sockets.AF_UNIX, sockets.SOCK_STREAM)
        client.connect(str(d.socket))  # still the other program's
        client.close()
    finally:
        other.close()
    d.socket.unlink()
    d.start()  # once it is gone, memosd starts
    d.stop()


def test_socket_folder_must_be_private(make_daemon):
    d = make_daemon()
    open_dir = d.root / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o755)
    refused(d.spawn(socket=open_dir / "memosd.sock"), d, "open to other users")
    assert not (open_dir / "memosd.sock").exists()
    # and the data folder too
    data = d.root / "open-data"
    data.mkdir()
    os.chmod(data, 0o755)
    run = d.root / "run"
    run.mkdir(mode=0o700)
    refused(d.spawn(data_dir=data), d, "open to other users")


def test_sigint_exits_cleanly(make_daemon):
    d = make_daemon().start()
    d.client().cube_create("interrupted")
    d.stop(signal.SIGINT)  # asserts exit code 0 and no traceback
    d.start()
    assert [c.name for c in d.client().cube_list()] == ["interrupted"]
    d.stop()


def test_environment_overrides(make_daemon, monkeypatch):
    d = make_daemon()
    sock = d.root / "envsock" / "m.sock"
    sock.parent.mkdir(mode=0o700)
    log = d.root / "env.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MEMOS_DAEMON__SOCKET": str(sock),
           "MEMOS_DAEMON__DATA_DIR": str(d.root / "envdata"), "MEMOS_DAEMON__LOG_LEVEL": "WARNING"}
    with open(log, "wb") as out:
        proc = subprocess.Popen(MEMOSD, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    d.proc, d.socket = proc, sock
    d.logs.append(log)
    d.wait_ready()
    monkeypatch.setenv("MEMOS_DAEMON__SOCKET", str(sock))
    monkeypatch.delenv("MEMOS_SOCKET", raising=False)
    c = Client(timeout=10, retries=0)  # the client finds the socket the same way
    try:
        c.cube_create("from-env")
    finally:
        c.close()
    assert (d.root / "envdata" / "data.mdb").exists()
    d.stop()
    assert "memosd listening" not in d.log()  # INFO is below the WARNING level set by the environment


@pytest.mark.parametrize("case", ["env value", "no reader threads", "retention out of range", "toml type",
                                  "toml syntax", "missing file", "long socket path"])
def test_bad_configuration_is_refused_cleanly(make_daemon, case):
    d = make_daemon()
    (d.root / "run").mkdir(mode=0o700)
    bad = d.root / "bad.toml"
    if case == "env value":
        proc = d.spawn(env={"MEMOS_DAEMON__MAX_MESSAGE_BYTES": "lots"})
    elif case == "no reader threads":
        bad.write_text("[daemon]\nread_workers = 0\n")
        proc = d.spawn("--config", str(bad))
    elif case == "retention out of range":  # refused at start, not a writer thread dying later
        proc = d.spawn(env={"MEMOS_DAEMON__REQUEST_RETENTION_S": "1e12"})
    elif case == "toml type":
        bad.write_text("daemon = 3\n")
        proc = d.spawn("--config", str(bad))
    elif case == "toml syntax":
        bad.write_text("[daemon\n")
        proc = d.spawn("--config", str(bad))
    elif case == "missing file":
        proc = d.spawn("--config", str(d.root / "absent.toml"))
    else:
        deep = d.root / ("x" * 110)
        deep.mkdir(mode=0o700)
        proc = d.spawn(socket=deep / "memosd.sock")
    assert proc.wait(20) == 2, d.log()
    assert "cannot start" in d.log()
    d.check_log()  # a message, not a traceback


def test_sigterm_under_load_answers_or_drops_but_loses_nothing_acknowledged(make_daemon):
    d = make_daemon().start()
    admin = d.client()
    admin.cube_create("drain")
    with writing(d, ["drain"] * 4, at_least=100) as per_writer:
        d.stop()  # SIGTERM mid-stream: exit 0, no traceback
    acked = [memory_id for ids in per_writer for memory_id in ids]
    d.start()
    admin = d.client()
    stored = [m.id for m in admin.list("drain")]
    assert set(acked) <= set(stored) and len(acked) >= 100
    assert [h.version for h in admin.history("drain")] == list(range(len(stored), -1, -1))
    assert admin.audit_verify().ok
