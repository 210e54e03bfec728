"""The wire protocol over a bare DEALER: idempotent retries and bad input."""

from __future__ import annotations

import msgpack
import pytest

from memos import protocol as p
from memos.ids import new_id

from daemon_fixtures import Daemon, _running, frame, request

MAX = 1 << 20  # the daemon below refuses requests over 1 MiB


@pytest.fixture(scope="module")
def daemon():
    yield from _running(env={"MEMOS_DAEMON__MAX_MESSAGE_BYTES": str(MAX)})


@pytest.fixture(scope="module")
def cube(daemon):
    admin = daemon.client()
    admin.cube_create("proto")
    return "proto"


@pytest.fixture
def raw(daemon):
    with daemon.raw() as r:
        yield r


def assert_alive(daemon: Daemon) -> None:
    assert daemon.alive()
    with daemon.raw() as r:
        reply = r.exchange(frame("ping"), timeout=5)
    assert reply["ok"] is True and reply["result"]["pid"] == daemon.pid


# -- idempotent retries -------------------------------------------------------------

def test_same_id_twice_applies_once(daemon, cube, raw):
    rid = new_id()
    add = frame("add", {"cube": cube, "text": "once"}, rid=rid)
    first = raw.exchange(add)
    assert first["ok"] is True and first["id"] == rid
    second = raw.exchange(add)
    assert second == first
    assert [m.text for m in daemon.client().list(cube)].count("once") == 1


def test_same_id_sent_back_to_back(daemon, cube, raw):
    """Both copies may land in one group commit: still applied once, both answered alike."""
    rid = new_id()
    add = frame("add", {"cube": cube, "text": "burst"}, rid=rid)
    for _ in range(3):
        raw.send(add)
    replies = [raw.recv() for _ in range(3)]
    assert raw.nothing_more(0.1)
    assert all(r == replies[0] for r in replies) and replies[0]["ok"] is True
    assert [m.text for m in daemon.client().list(cube)].count("burst") == 1


def test_same_id_from_another_agent_is_independent(daemon, cube, raw):
    admin = daemon.client()
    token = admin.agent_add("proto-agent")["token"]
    admin.cube_grant(cube, "proto-agent", "write")
    rid = new_id()
    mine = raw.exchange(frame("add", {"cube": cube, "text": "same id"}, rid=rid))
    theirs = raw.exchange(frame("add", {"cube": cube, "text": "same id"}, rid=rid, token=token))
    assert mine["ok"] and theirs["ok"]
    assert mine["result"]["id"] != theirs["result"]["id"]
    assert theirs["result"]["provenance"]["actor"] == "proto-agent"
    assert [m.text for m in admin.list(cube)].count("same id") == 2
    # and each one's retry still answers with its own first reply
    assert raw.exchange(frame("add", {"cube": cube, "text": "same id"}, rid=rid, token=token)) == theirs


def test_failed_write_is_not_remembered(daemon, raw):
    rid = new_id()
    add = frame("add", {"cube": "proto-later", "text": "x"}, rid=rid)
    assert raw.exchange(add)["error"]["code"] == "not_found"
    daemon.client().cube_create("proto-later")
    retried = raw.exchange(add)
    assert retried["ok"] is True and retried["result"]["text"] == "x"


# -- bad input ----------------------------------------------------------------------

def packed(message) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def deep(n: int) -> bytes:
    return b"\x91" * n + b"\xc0"  # n nested one-element arrays around nil


BAD_FRAMES = {
    "empty": ([b""], "invalid_request"),
    "garbage": ([b"\xc1\xff\x00garbage"], "invalid_request"),
    "truncated map": ([packed(p.encode(request("ping")))[:5]], "invalid_request"),
    "trailing bytes": ([p.encode(request("ping")) + b"\x00"], "invalid_request"),
    "not a map": ([packed([1, 2, 3])], "invalid_request"),
    "a string": ([packed("ping")], "invalid_request"),
    "non-string keys": ([b"\x81\x01\x02"], "invalid_request"),
    "invalid utf-8": ([b"\x81\xa2\xff\xfe\x01"], "invalid_request"),
    "deeply nested": ([deep(100_000)], "invalid_request"),
    "nested in args": ([packed({**request("ping"), "args": {"x": 1}})], "invalid_request"),
    "wrong version": ([packed(request("ping", v=2))], "invalid_request"),
    "version as string": ([packed({**request("ping"), "v": "1"})], "invalid_request"),
    "missing op": ([packed({"v": 1, "id": new_id(), "args": {}})], "invalid_request"),
    "missing id": ([packed({"v": 1, "op": "ping"})], "invalid_request"),
    "id too long": ([packed({**request("ping"), "id": "x" * 65})], "invalid_request"),
    "unknown op": ([packed(request("drop_tables"))], "unknown_operation"),
    "string for int": ([packed(request("list", {"cube": "proto", "limit": "3"}))], "invalid_request"),
    "bool for int": ([packed(request("list", {"cube": "proto", "limit": True}))], "invalid_request"),
    "unknown field": ([packed(request("list", {"cube": "proto", "colour": "red"}))], "invalid_request"),
    "unknown envelope field": ([packed({**request("ping"), "extra": 1})], "invalid_request"),
    "args not a map": ([packed({**request("ping"), "args": [1]})], "invalid_request"),
    "text not a string": ([packed(request("add", {"cube": "proto", "text": 5}))], "invalid_request"),
    "blob as string": ([packed(request("add", {"cube": "proto", "text": "t", "blob": "abc"}))], "invalid_request"),
    "negative version": ([packed(request("get", {"cube": "proto", "id": "x", "at": -1}))], "invalid_request"),
    "huge version": ([packed(request("get", {"cube": "proto", "id": new_id(), "at": 2**64 - 1}))],
                     "invalid_request"),
    "two frames": ([p.encode(request("ping")), p.encode(request("ping"))], "invalid_request"),
    "empty then frame": ([b"", p.encode(request("ping"))], "invalid_request"),
    "ext type": ([packed({**request("ping"), "args": {"x": msgpack.ExtType(5, b"xyz")}})], "invalid_request"),
    "timestamp ext": ([b"\x81\xa1t\xd6\xff\x00\x00\x00\x01"], "invalid_request"),
    "bad token": ([packed(request("ping", token="nobody.secret"))], "unauthenticated"),
    "token not a string": ([packed({**request("ping"), "token": 7})], "invalid_request"),
    "too large": ([packed(request("add", {"cube": "proto", "text": "x" * (3 * MAX // 2)}))], "too_large"),
}


@pytest.mark.parametrize("name", list(BAD_FRAMES))
def test_bad_frame_gets_one_typed_error(daemon, cube, raw, name):
    frames, code = BAD_FRAMES[name]
    reply = raw.exchange(*frames, timeout=10, settle=0.05)
    assert reply["ok"] is False, reply
    assert reply["v"] == p.PROTOCOL_VERSION
    assert reply["error"]["code"] == code, reply
    assert isinstance(reply["error"]["message"], str) and reply["error"]["message"]
    try:  # the id is echoed when the frame decodes at all, else null
        message = p.decode(frames[0], MAX) if len(frames) == 1 else None
    except p.MemosError:
        message = None
    assert reply["id"] == p.request_id_of(message)
    assert_alive(daemon)


def test_bad_frames_are_audited_without_breaking_the_chain(daemon):
    admin = daemon.client()
    since = admin.audit_checkpoint().seq
    with daemon.raw() as r:
        r.exchange(b"\xc1")
        r.exchange(packed(request("drop_tables")))
    records = admin.audit_tail(10, after=since)
    assert [(rec.outcome, rec.detail.get("code")) for rec in records] == [
        ("error", "invalid_request"), ("error", "unknown_operation")]
    assert admin.audit_verify().ok


def test_oversize_request_leaves_the_daemon_serving(daemon, cube, raw):
    big = packed(request("add", {"cube": cube, "text": "y" * (3 * MAX // 2)}))
    assert raw.exchange(big)["error"]["code"] == "too_large"
    small = raw.exchange(frame("add", {"cube": cube, "text": "after big"}))
    assert small["ok"] is True
    assert_alive(daemon)
    daemon.check_log()


def test_far_oversize_request_cannot_hurt_the_daemon(daemon, cube):
    """Past twice the limit zmq drops the connection unread; the daemon carries on."""
    with daemon.raw() as r:
        r.send(packed(request("add", {"cube": cube, "text": "z" * (3 * MAX)})))
        if r.sock.poll(1000):
            assert r.recv()["error"]["code"] == "too_large"
    assert_alive(daemon)
    assert "z" * 100 not in "".join(m.text or "" for m in daemon.client().list(cube))
