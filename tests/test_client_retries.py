"""The blocking client's timeouts: resend with the same id, drop late replies, keep the full timeout.

The peer is a bare ROUTER socket scripted reply by reply, so each timing case is exact.
"""

from __future__ import annotations

import os
import select
import signal
import threading
import time
from pathlib import Path

import msgpack
import pytest
import zmq

from memos import protocol as p
from memos.client import Client
from memos.errors import Timeout


class Peer:
    """A ROUTER that hands each request to ``script`` (runs in a thread)."""

    def __init__(self, path: Path, script) -> None:
        self.sock = zmq.Context.instance().socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind(f"ipc://{path}")
        self.ids: list[str] = []
        self.thread = threading.Thread(target=script, args=(self,), daemon=True)
        self.thread.start()

    def request(self) -> tuple[bytes, dict]:
        identity, frame = self.sock.recv_multipart()
        message = msgpack.unpackb(frame)
        self.ids.append(message["id"])
        return identity, message

    def reply(self, identity: bytes, rid: str, result) -> None:
        self.sock.send_multipart([identity, p.encode(p.ok_reply(rid, result))])

    def close(self) -> None:
        self.thread.join(10)
        self.sock.close()


def test_resends_with_the_same_id_and_drops_replies_to_other_requests(tmp_path):
    def script(peer: Peer) -> None:
        peer.request()  # first try: no answer, so the client times out and resends
        identity, message = peer.request()
        peer.reply(identity, "an-abandoned-request", {"pong": "stale"})  # must be ignored
        peer.reply(identity, message["id"], {"pong": True, "pid": 7, "protocol": 1})

    peer = Peer(tmp_path / "s.sock", script)
    client = Client(tmp_path / "s.sock", timeout=0.3, retries=1)
    try:
        assert client.ping() == {"pong": True, "pid": 7, "protocol": 1}
    finally:
        client.close()
        peer.close()
    assert len(peer.ids) == 2 and peer.ids[0] == peer.ids[1]


def test_each_request_gets_the_whole_timeout_after_a_shortened_wait(tmp_path):
    def script(peer: Peer) -> None:
        identity, message = peer.request()
        peer.reply(identity, "an-abandoned-request", None)  # shortens what is left of this wait
        peer.reply(identity, message["id"], 1)
        identity, message = peer.request()
        time.sleep(0.35)  # most of the next request's 0.5 s timeout
        peer.reply(identity, message["id"], 2)

    peer = Peer(tmp_path / "s.sock", script)
    client = Client(tmp_path / "s.sock", timeout=0.5, retries=0)
    try:
        assert client.request("ping") == 1
        assert client.request("ping") == 2
    finally:
        client.close()
        peer.close()


def test_gives_up_after_every_try(tmp_path):
    def script(peer: Peer) -> None:
        for _ in range(3):
            peer.request()

    peer = Peer(tmp_path / "s.sock", script)
    client = Client(tmp_path / "s.sock", timeout=0.1, retries=2)
    try:
        with pytest.raises(Timeout, match="3 tries"):
            client.ping()
    finally:
        client.close()
        peer.close()
    assert len(set(peer.ids)) == 1 and len(peer.ids) == 3


def test_request_ids_are_unique_across_clients_and_forked_children(tmp_path):
    one, two = Client(tmp_path / "a.sock"), Client(tmp_path / "b.sock")
    ids = [c._frame("ping", {})[0] for c in (one, two, one, two)]
    assert len(set(ids)) == 4

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: what would its next id be?
        try:
            os.write(write_end, one._frame("ping", {})[0].encode())
        finally:
            os._exit(0)
    ready: list[int] = []
    try:
        ready, _, _ = select.select([read_end], [], [], 30)
        assert ready, "the forked child did not answer"
        child_id = os.read(read_end, 100).decode()
    finally:
        if not ready:
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        os.close(read_end)
        os.close(write_end)
    parent_id = one._frame("ping", {})[0]
    # Without a new prefix the child would repeat an id its parent has sent or will send next.
    assert child_id not in [*ids, parent_id]
    assert child_id[:16] != parent_id[:16]


def test_a_request_given_up_on_never_reaches_a_daemon_that_comes_back():
    """ZeroMQ queues frames while it reconnects: a write the caller was told failed must not be
    applied later, when a daemon listens on the socket again."""
    import asyncio

    from daemon_fixtures import Daemon
    from memos.client import AsyncClient
    from memos.errors import MemosError

    d = Daemon().start()
    try:
        blocking = Client(d.socket, timeout=0.5, retries=0)
        blocking.cube_create("present")

        async def give_up(client: AsyncClient) -> None:
            with pytest.raises(MemosError):  # Timeout: the async client waits its whole timeout
                await client.cube_create("async-ghost")
            await client.close()

        async def connected() -> AsyncClient:
            client = AsyncClient(d.socket, timeout=0.5, retries=0)
            await client.ping()
            return client

        loop = asyncio.new_event_loop()
        async_client = loop.run_until_complete(connected())
        d.stop()  # both clients hold a connected socket to a daemon that is gone
        with pytest.raises(MemosError):  # Unavailable: the blocking client sees the daemon go
            blocking.cube_create("ghost")
        loop.run_until_complete(give_up(async_client))
        loop.close()
        d.start()
        time.sleep(0.5)  # time for a queued frame to arrive, were there one
        assert [c.name for c in blocking.cube_list()] == ["present"]  # the same client, a new socket
        blocking.close()
        d.stop()
    finally:
        d.cleanup()
