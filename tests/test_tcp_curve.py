"""memosd over tcp: CURVE encrypts the wire and pins the server's key; every tcp client needs a token.

A real memosd serves its ipc socket and a tcp endpoint on a free port. A
relay in the test (a thread copying bytes both ways, recording them) shows
what an eavesdropper on the network would see.
"""

from __future__ import annotations

import asyncio
import json
import socket
import stat
import threading
import time

import msgpack
import pytest
import zmq
from daemon_fixtures import Daemon, frame, memosctl
from memos.daemon.transport import server_keys

from memos.client import AsyncClient, Client
from memos.config import DaemonSettings
from memos.errors import ConfigError, InvalidRequest, Timeout, Unauthenticated


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def tcp_daemon():
    d = Daemon()
    d.endpoint = f"tcp://127.0.0.1:{free_port()}"
    d.socket.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    d.proc = d.spawn("--listen", d.endpoint)
    try:
        d.wait_ready()
        d.server_key = (d.data_dir / "curve.key.pub").read_text().strip()
        d.token = d.client().agent_add("remote")["token"]  # over ipc: the local administrator
        yield d
        if d.alive():
            d.stop()
    finally:
        d.cleanup()


@pytest.fixture
def unstarted():
    """A Daemon of this test alone, not started; killed and removed afterwards."""
    d = Daemon()
    d.data_dir.mkdir(mode=0o700, parents=True)
    d.socket.parent.mkdir(mode=0o700, parents=True)
    yield d
    d.cleanup()


def tcp_client(d: Daemon, endpoint: str | None = None, **options) -> Client:
    options.setdefault("timeout", 15.0)
    options.setdefault("retries", 0)
    options.setdefault("server_key", d.server_key)
    c = Client(endpoint or d.endpoint, **options)
    d._clients.append(c)
    return c


class Relay:
    """A tcp forwarder between a client and memosd that keeps every byte it passes on."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.seen = bytearray()
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                with self.lock:
                    self.seen += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


def test_the_key_pair_is_made_at_first_start_and_the_secret_is_private(tcp_daemon):
    secret = tcp_daemon.data_dir / "curve.key"
    assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    assert zmq.curve_public(secret.read_bytes().strip()).decode() == tcp_daemon.server_key
    assert tcp_daemon.server_key in tcp_daemon.log()  # the operator finds it in the start log too


def test_a_client_with_the_pinned_key_and_a_token_works(tcp_daemon):
    c = tcp_client(tcp_daemon, token=tcp_daemon.token)
    assert c.whoami()["agent"] == "remote"
    c.cube_create("tcp-notes")
    events = c.events("tcp-notes", timeout=3)  # acknowledged over tcp before this returns
    seen: list = []
    follower = threading.Thread(target=lambda: seen.extend(e.op for e in events))
    follower.start()
    added = c.add("tcp-notes", "the lighthouse keeper logs the storm at dawn")
    assert c.get("tcp-notes", added.id).text == added.text
    hits = c.search("tcp-notes", "lighthouse storm")
    assert [h.memory.id for h in hits][:1] == [added.id]
    follower.join(30)
    assert "add" in seen


def test_the_ipc_socket_still_vouches_for_this_user(tcp_daemon):
    assert tcp_daemon.client().whoami()["admin"] is True  # tcp beside it changes nothing on ipc


def test_a_client_pinning_another_key_gets_no_answer_and_is_never_served(tcp_daemon):
    wrong, _ = zmq.curve_keypair()
    c = tcp_client(tcp_daemon, token=tcp_daemon.token, server_key=wrong, timeout=1.0)
    tcp_client(tcp_daemon, token=tcp_daemon.token).cube_create("tcp-wrong-key")
    started = time.monotonic()
    with pytest.raises(Timeout):
        c.add("tcp-wrong-key", "sent to an impostor")
    assert time.monotonic() - started < 5
    assert tcp_daemon.client().list("tcp-wrong-key") == []


def test_a_tcp_client_without_a_token_is_refused_and_never_the_administrator(tcp_daemon):
    c = tcp_client(tcp_daemon)
    with pytest.raises(Unauthenticated):
        c.whoami()
    with pytest.raises(Unauthenticated):
        c.agent_add("intruder")  # what the local administrator may do over ipc without a token
    assert "intruder" not in [a.name for a in tcp_daemon.client().agent_list()]
    assert tcp_client(tcp_daemon, token=tcp_daemon.token).whoami()["admin"] is False


def test_memory_text_and_token_are_not_readable_on_the_wire(tcp_daemon):
    port = int(tcp_daemon.endpoint.rsplit(":", 1)[1])
    relay = Relay(port)
    try:
        c = tcp_client(tcp_daemon, f"tcp://127.0.0.1:{relay.port}", token=tcp_daemon.token)
        c.cube_create("tcp-wire")
        text = "zebra-quartz-87 crossed the wire unseen"
        _, frame = c._frame("add", {"cube": "tcp-wire", "text": text})
        secret = tcp_daemon.token.encode()
        assert text.encode() in frame and secret in frame  # in clear, the frame would show both
        assert c.add("tcp-wire", text).text == text  # the reply carries the text back too
        with relay.lock:
            seen = bytes(relay.seen)
        assert len(seen) > len(frame)  # the request and its reply went through the relay
        assert text.encode() not in seen
        assert secret not in seen
        assert secret.split(b".")[-1] not in seen
    finally:
        relay.close()


@pytest.mark.parametrize("bad", ["garbage", "directory", "open"])
def test_memosd_refuses_a_tcp_listener_without_a_usable_curve_key(unstarted, bad):
    d = unstarted
    key = d.data_dir / "curve.key"
    if bad == "directory":
        key.mkdir()
    else:
        key.write_bytes(b"not a key\n" if bad == "garbage" else zmq.curve_keypair()[1])
        key.chmod(0o600 if bad == "garbage" else 0o644)
    proc = d.spawn("--listen", f"tcp://127.0.0.1:{free_port()}")
    assert proc.wait(60) == 2
    assert "curve.key" in d.log() and "config_error" in d.log()


def test_memosd_refuses_a_listen_endpoint_that_is_not_tcp(unstarted):
    d = unstarted
    proc = d.spawn("--listen", "ipc:///tmp/elsewhere.sock")
    assert proc.wait(60) == 2
    assert "tcp://" in d.log()


def test_memosctl_reaches_memosd_over_tcp_with_the_server_key(tcp_daemon):
    out = memosctl(tcp_daemon, "whoami", "--json", "--socket", tcp_daemon.endpoint,
                   "--server-key", tcp_daemon.server_key, "--token", tcp_daemon.token)
    assert json.loads(out.stdout)["agent"] == "remote"


def test_without_curve_in_libzmq_a_tcp_listener_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setattr(zmq, "has", lambda capability: capability != "curve")
    cfg = DaemonSettings(listen=["tcp://127.0.0.1:1"])
    with pytest.raises(ConfigError, match="CURVE"):
        server_keys(cfg, tmp_path)
    assert server_keys(DaemonSettings(), tmp_path) is None  # ipc only: no key needed, none made
    assert not (tmp_path / "curve.key").exists()


def test_a_tcp_client_without_the_server_key_is_refused_when_made(monkeypatch):
    monkeypatch.delenv("MEMOS_SERVER_KEY", raising=False)
    with pytest.raises(InvalidRequest, match="curve.key.pub"):
        Client("tcp://127.0.0.1:1", token="a.b")
    with pytest.raises(InvalidRequest):
        Client("tcp://127.0.0.1:1", server_key="short")


def test_curve_clients_lets_in_only_the_keys_it_lists(unstarted):
    allowed_public, allowed_secret = zmq.curve_keypair()
    unstarted.env["MEMOS_DAEMON__CURVE_CLIENTS"] = json.dumps([allowed_public.decode()])
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    unstarted.proc = unstarted.spawn("--listen", endpoint)
    unstarted.wait_ready()
    server_key = (unstarted.data_dir / "curve.key.pub").read_bytes().strip()
    token = unstarted.client().agent_add("listed")["token"]

    def whoami(public: bytes, secret: bytes) -> dict | None:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.curve_serverkey, sock.curve_publickey, sock.curve_secretkey = server_key, public, secret
        sock.connect(endpoint)
        try:
            sock.send(frame("whoami", token=token))
            return msgpack.unpackb(sock.recv(), raw=False) if sock.poll(3000) else None
        finally:
            sock.close(linger=0)

    assert whoami(allowed_public, allowed_secret)["result"]["agent"] == "listed"
    assert whoami(*zmq.curve_keypair()) is None  # refused at the handshake: no answer at all
    unstarted.stop()


def test_the_async_client_and_its_events_go_over_tcp_too(tcp_daemon):
    async def run() -> tuple[str, str, list[str]]:
        async with AsyncClient(tcp_daemon.endpoint, server_key=tcp_daemon.server_key, token=tcp_daemon.token,
                               timeout=15, retries=0) as c:
            await c.cube_create("tcp-async")
            events = await c.subscribe("tcp-async")  # acknowledged over tcp before this returns
            added = await c.add("tcp-async", "an owl counts the tides")
            event = await asyncio.wait_for(events.__anext__(), 15)
            await events.aclose()
            return (await c.get("tcp-async", added.id)).text, added.id, list(event.memories)

    text, added, ids = asyncio.run(run())
    assert text == "an owl counts the tides" and ids == [added]


def test_the_administrator_over_tcp_presents_the_token_of_require_token(unstarted):
    unstarted.env.update({"MEMOS_DAEMON__REQUIRE_TOKEN": "true",
                          "MEMOS_DAEMON__ADMIN_TOKEN_FILE": str(unstarted.admin_token_file)})
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    unstarted.proc = unstarted.spawn("--listen", endpoint)
    deadline = time.monotonic() + 30
    while not (unstarted.admin_token_file.exists() and unstarted.socket.exists()):
        assert time.monotonic() < deadline and unstarted.alive(), unstarted.log()
        time.sleep(0.05)
    unstarted.server_key = (unstarted.data_dir / "curve.key.pub").read_text().strip()
    admin_token = unstarted.admin_token_file.read_text().strip()
    assert tcp_client(unstarted, endpoint, token=admin_token).whoami()["admin"] is True
    with pytest.raises(Unauthenticated):
        tcp_client(unstarted, endpoint).whoami()
    unstarted.stop()
