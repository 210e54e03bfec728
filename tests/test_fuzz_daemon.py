"""Fuzzing a real memosd over a bare DEALER.

Random bytes, mutated valid requests and random maps of known operations and
argument names: each frame must get exactly one reply, a map that is either
ok or carries a known, non-internal error code (the same one the protocol
module gives locally), and the daemon must stay up with bounded memory.
"""

from __future__ import annotations

import random

import msgpack
import psutil
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from memos import catalog, protocol as p
from memos.client import OPERATIONS
from memos.operations import Route
from memos.errors import ERRORS_BY_CODE, MemosError
from memos.ids import new_id

from daemon_fixtures import Daemon, Raw, daemon, frame, request  # noqa: F401  (fixtures)

MAX = 64 << 20  # the daemon's default max_message_bytes
OPS = sorted(OPERATIONS)
ROUTES = {name: Route(op, print) for name, op in OPERATIONS.items()}  # validation only: never called
FIELDS = sorted({name for op in OPERATIONS.values() for name in op.args.model_fields}
                | set(catalog.NewMemoryArgs.model_fields))
CUBES = ["fz", "fz-b", "missing", "", "bad name", "x" * 70]

FUZZ_SETTINGS = settings(max_examples=1000, deadline=None, derandomize=False, database=None,
                         suppress_health_check=list(HealthCheck))


class Session:
    """One DEALER for the whole run; counts frames sent and replies read."""

    def __init__(self, d: Daemon) -> None:
        self.d = d
        self.raw = d.raw()
        self.sent = 0
        self.memory_ids: list[str] = []

    def check(self, frames: list[bytes]) -> dict:
        self.raw.send(*frames)
        self.sent += 1
        reply = self.raw.recv(timeout=15)
        while "partial" in reply:  # a streaming operation's pieces come first, then its one reply
            assert reply["ok"] is True and set(reply) == {"v", "id", "ok", "partial"}, reply
            piece = reply["partial"]
            if isinstance(piece, dict) and piece.get("op") == "watch":  # a watch stays open: this is its answer
                assert expected_code(frames) is None, f"watched on a frame the protocol refuses: {frames!r:.300}"
                return reply
            reply = self.raw.recv(timeout=15)  # (or an event of an earlier watch on this connection)
        assert set(reply) >= {"v", "id", "ok"}, reply
        want = expected_code(frames)
        if reply["ok"] is True:
            assert want is None, f"accepted a frame the protocol refuses ({want}): {frames!r:.300}"
            result = reply["result"]
            if isinstance(result, dict) and isinstance(result.get("id"), str) and len(result["id"]) == 26:
                self.memory_ids.append(result["id"])
        else:
            assert reply["ok"] is False, reply
            code = reply["error"]["code"]
            assert code in ERRORS_BY_CODE and code != "internal", reply
            if want is not None:
                assert code == want, (reply, frames)
        return reply


def expected_code(frames: list[bytes]) -> str | None:
    """The error the protocol layer gives this input, or None if it passes validation."""
    if len(frames) != 1:
        return "invalid_request"
    try:
        message = p.decode(frames[0], MAX)
        envelope, _, _ = p.parse_request(message, ROUTES)
    except MemosError as exc:
        return exc.code
    if envelope.token is not None:
        return None  # authentication is the daemon's call (unauthenticated, or a real token)
    return None


@pytest.fixture(scope="module")
def session(daemon):
    admin = daemon.client()
    admin.cube_create("fz")
    admin.cube_create("fz-b")
    s = Session(daemon)
    s.memory_ids += [m.id for m in admin.add_many("fz", ["one", "two", "three"])]
    s.token = admin.agent_add("fz-agent")["token"]
    admin.cube_grant("fz", "fz-agent", "write")
    yield s
    assert s.raw.nothing_more(0.3), "a frame got more than one reply"
    s.raw.close()
    assert daemon.alive()
    assert admin.audit_verify().ok


# -- strategies -------------------------------------------------------------------

leaves = (st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=True)
          | st.text(max_size=40) | st.binary(max_size=40))
values = st.recursive(leaves, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=10), inner, max_size=4), max_leaves=12)


@st.composite
def plausible(draw, field: str):
    """A value that often passes the schema, so requests reach the store."""
    if field in ("cube", "name", "agent"):
        return draw(st.sampled_from(CUBES + ["fz-agent", "admin"]) | st.text(max_size=20))
    if field in ("id", "memory_id", "after"):
        return draw(st.sampled_from(SESSION_IDS + ["0" * 26, "not-an-id"]))
    if field in ("at", "v1", "v2", "to_version", "version", "expected_version", "before", "limit", "n"):
        return draw(st.integers(0, 8) | st.integers(-3, 2**64 - 1))
    if field in ("text", "policy", "tag", "media_type"):
        return draw(st.text(max_size=30))
    if field == "tags":
        return draw(st.lists(st.text(max_size=8), max_size=3))
    if field in ("metadata", "settings", "checkpoint"):
        return draw(st.dictionaries(st.text(max_size=8), leaves, max_size=3))
    if field == "blob":
        return draw(st.binary(max_size=64))
    if field == "type":
        return draw(st.sampled_from(["plaintext", "opaque", "tally", "other"]))
    if field == "role":
        return draw(st.sampled_from(["read", "write", "admin", None, "root"]))
    if field == "status":
        return draw(st.sampled_from(["active", "archived", "deleted", "all", "gone"]))
    if field == "sha256":
        return draw(st.sampled_from(["0" * 64, "f" * 63]))
    if field == "items":
        return draw(st.lists(st.fixed_dictionaries({"text": st.text(max_size=10)}), max_size=3))
    return draw(values)


SESSION_IDS: list[str] = []  # filled with real memory ids as the run goes


@st.composite
def requests(draw):
    # Hypothesis favours small draws, so the common case is a draw below 9 and the rare one 9.
    op = draw(st.sampled_from(OPS) if draw(st.integers(0, 9)) < 9 else st.text(max_size=10))
    model = OPERATIONS[op].args if op in OPERATIONS else None
    names = list(model.model_fields) if model is not None else []
    chosen = draw(st.lists(st.sampled_from(names), unique=True)) if names else []
    if model is not None:  # usually give every required field
        chosen += [n for n, f in model.model_fields.items() if f.is_required() and draw(st.integers(0, 9)) < 9]
    args = {n: draw(plausible(n)) for n in dict.fromkeys(chosen)}
    if draw(st.integers(0, 9)) == 9:
        args[draw(st.sampled_from(FIELDS) | st.text(max_size=8))] = draw(values)
    message = {"v": draw(st.sampled_from([1] * 8 + [0, 2, "1", None])),
               "id": draw(st.builds(new_id) if draw(st.integers(0, 9)) < 9 else st.none() | st.text(max_size=70)),
               "op": op, "args": args}
    token = draw(st.sampled_from(["none"] * 6 + ["agent", "bad", "junk"]))
    if token == "agent":
        message["token"] = "fz-agent"  # replaced by the real token in the test
    elif token == "bad":
        message["token"] = "fz-agent.wrong"
    elif token == "junk":
        message["token"] = draw(values)
    if draw(st.integers(0, 9)) == 9:
        del message[draw(st.sampled_from(["v", "id", "op", "args"]))]
    return message


@st.composite
def mutated(draw):
    data = bytearray(p.encode(draw(requests())))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "delete", "set"]))
        i = draw(st.integers(0, max(0, len(data) - 1)))
        if kind == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif kind == "insert":
            data[i:i] = draw(st.binary(min_size=1, max_size=8))
        elif kind == "delete" and data:
            del data[i:i + draw(st.integers(1, 8))]
        elif kind == "set" and data:
            data[i] = draw(st.integers(0, 255))
    return [bytes(data)]


def encode_request(message: dict, token: str) -> bytes:
    if message.get("token") == "fz-agent":
        message = {**message, "token": token}
    try:
        return msgpack.packb(message, use_bin_type=True)
    except (TypeError, ValueError, OverflowError):
        return msgpack.packb({"v": 1, "id": new_id(), "op": "ping"}, use_bin_type=True)


def rss(d: Daemon) -> int:
    return psutil.Process(d.pid).memory_info().rss


# -- tests -------------------------------------------------------------------------

def test_fuzz_frames(daemon, session):
    SESSION_IDS[:] = session.memory_ids[:20]
    # warm up: every op once, valid and not, so caches and pools settle before measuring
    rng = random.Random(7)
    for i in range(150):
        op = OPS[i % len(OPS)]
        session.check([frame(op, {"cube": "fz"} if rng.random() < 0.5 else {})])
        session.check([bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64)))])
    before = rss(daemon)

    @FUZZ_SETTINGS
    @given(st.one_of(
        st.lists(st.binary(max_size=256), min_size=1, max_size=3),
        mutated(),
        requests().map(lambda m: [encode_request(m, session.token)]),
    ))
    def one_frame(frames):
        session.check(frames)

    @FUZZ_SETTINGS
    @given(requests())
    def structured(message):
        session.check([encode_request(message, session.token)])

    one_frame()
    structured()
    assert daemon.alive()
    with daemon.raw() as r:
        assert r.exchange(frame("ping"))["result"]["pid"] == daemon.pid
    grown = rss(daemon) - before
    assert grown < 20 << 20, f"memosd grew by {grown >> 20} MiB over {session.sent} frames"
    daemon.check_log()
