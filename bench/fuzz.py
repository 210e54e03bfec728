"""A long protocol fuzz of a real memosd: ``python bench/fuzz.py [--frames 100000] [--seed 1]``.

Sends frames one at a time over a bare DEALER, from eight kinds: random bytes; valid requests
cut short; arrays nested up to 100,000 deep; huge frames (a few over the 64 MiB limit, more of
1 MiB); well-formed requests of every operation with arguments of the wrong types; unknown
operations; strings that are not UTF-8; valid requests with bits flipped. Each frame must get
exactly one reply, a map that is either ok or carries a known error code other than `internal`;
the daemon must stay up, with its memory bounded. It prints the counts, the replies by code and
the daemon's RSS as the run goes; it exits non-zero on the first broken promise.
"""

from __future__ import annotations

import argparse
import collections
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

import msgpack
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))

from memosd import spawn  # noqa: E402

from memos import protocol as p  # noqa: E402
from memos.client import OPERATIONS, Client  # noqa: E402
from memos.errors import ERRORS_BY_CODE  # noqa: E402
from memos.ids import new_id  # noqa: E402

OPS = sorted(OPERATIONS)
# Operations that start work of their own (jobs, model loads, generation, policy runs) are sent
# with wrong arguments only: a fuzz of the protocol, not a load test of the models.
HEAVY = {"activate", "distill", "fuse", "generate", "model_prepare", "model_add", "reindex", "policy_run"}
VALUES = [None, True, 0, -1, 2**64 - 1, 1.5, float("nan"), "", "x" * 300, b"\x00\xff", [], [1, [2]], {},
          {"k": "v"}, "fz", "01ARZ3NDEKTSV4RRFFQ69G5FAV"]


def request(rng: random.Random, op: str, args: dict) -> dict:
    return {"v": 1, "id": new_id(), "op": op, "args": args}


def wrong_typed(rng: random.Random) -> bytes:
    op = rng.choice(OPS)
    fields = list(OPERATIONS[op].args.model_fields)
    args = {f: rng.choice(VALUES) for f in rng.sample(fields, k=rng.randint(0, len(fields)))}
    if op not in HEAVY and rng.random() < 0.5 and "cube" in fields:
        args["cube"] = "fz"
    if op in HEAVY and not args:
        args = {"cube": 7}
    return msgpack.packb(request(rng, op, args), use_bin_type=True)


def nested(rng: random.Random) -> bytes:
    depth = rng.choice([100, 1000, 10_000, 100_000])
    body = b"\x91" * depth + b"\xc0"  # [[[...[nil]...]]]
    return msgpack.packb({"v": 1, "id": new_id(), "op": "add"}, use_bin_type=True)[:-1] + b"\xa4args" + body \
        if rng.random() < 0.5 else body


def not_utf8(rng: random.Random) -> bytes:
    bad = bytes(rng.choice([0xFF, 0xFE, 0xC0, 0x80, 0xED]) for _ in range(rng.randint(1, 8)))
    text = b"\xa0"[0] | len(bad)
    head = msgpack.packb({"v": 1, "id": new_id()}, use_bin_type=True)
    return bytes([head[0] + 1]) + head[1:] + b"\xa2op" + bytes([text]) + bad


def make(rng: random.Random, kind: str) -> list[bytes]:
    if kind == "random":
        return [rng.randbytes(rng.randint(1, 256))]
    if kind == "truncated":
        whole = wrong_typed(rng)
        return [whole[: rng.randint(1, max(1, len(whole) - 1))]]
    if kind == "nested":
        return [nested(rng)]
    if kind == "huge":
        size = (65 << 20) if rng.random() < 0.02 else (1 << 20)
        return [msgpack.packb(request(rng, "add", {"cube": "fz", "text": "x" * size}), use_bin_type=True)]
    if kind == "wrong_types":
        return [wrong_typed(rng)]
    if kind == "unknown_op":
        return [msgpack.packb(request(rng, rng.choice(["drop_all", "", "x" * 100, "__init__"]), {}),
                              use_bin_type=True)]
    if kind == "not_utf8":
        return [not_utf8(rng)]
    data = bytearray(wrong_typed(rng))  # mutated
    for _ in range(rng.randint(1, 4)):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    frames = [bytes(data)]
    return frames + [b"extra"] if rng.random() < 0.05 else frames


def memory(pid: int) -> tuple[int, int]:
    """The daemon's resident memory in MiB: its own (heap, anonymous) and its mapped files (LMDB's map)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["RssAnon"].split()[0]) >> 10, int(fields["RssFile"].split()[0]) >> 10


KINDS = ["random", "truncated", "nested", "huge", "wrong_types", "unknown_op", "not_utf8", "mutated"]
WEIGHTS = [20, 15, 5, 1, 30, 5, 5, 19]


def store_mib(root: Path) -> float:
    return (root / "data" / "data.mdb").stat().st_size / (1 << 20)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="memos-fuzz-"))
    socket = str(root / "memosd.sock")
    proc = spawn(root / "data", socket, env={"MEMOS_SEARCH__EMBEDDER": "hashing", "MEMOS_ACTIVATION__MODELS": "{}"})
    print(f"# bench/fuzz.py  {time.strftime('%Y-%m-%d %H:%M')}  {args.frames} frames, seed {args.seed}")
    codes: collections.Counter[str] = collections.Counter()
    kinds: collections.Counter[str] = collections.Counter()
    try:
        admin = Client(socket, timeout=60)
        admin.cube_create("fz")
        admin.add_many("fz", ["one", "two", "three"])
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(f"ipc://{socket}")
        anon0, file0 = memory(proc.pid)
        anon_max = anon0
        start = time.monotonic()
        for i in range(1, args.frames + 1):
            kind = rng.choices(KINDS, WEIGHTS)[0]
            kinds[kind] += 1
            sock.send_multipart(make(rng, kind))
            if not sock.poll(60_000):
                raise SystemExit(f"frame {i} ({kind}): no reply in 60 s")
            reply = p.decode(sock.recv(), 1 << 62)
            while isinstance(reply, dict) and "partial" in reply:
                reply = p.decode(sock.recv(), 1 << 62)
            if not isinstance(reply, dict) or "ok" not in reply:
                raise SystemExit(f"frame {i} ({kind}): a reply that is not a reply: {reply!r:.200}")
            code = "ok" if reply["ok"] else reply["error"]["code"]
            if code == "internal" or (code != "ok" and code not in ERRORS_BY_CODE):
                raise SystemExit(f"frame {i} ({kind}): {reply!r:.300}")
            codes[code] += 1
            if i % 10_000 == 0 or i == args.frames:
                anon, mapped = memory(proc.pid)
                anon_max = max(anon_max, anon)
                print(f"{i:>7} frames  {i / (time.monotonic() - start):6.0f}/s  resident: own {anon} MiB, "
                      f"mapped files {mapped} MiB  store {store_mib(root):.0f} MiB", flush=True)
        if sock.poll(500):
            raise SystemExit("a frame got more than one reply")
        assert admin.ping()["pid"] == proc.pid and admin.audit_verify().ok
        print(f"kinds: {dict(kinds)}")
        print(f"replies: {dict(codes.most_common())}")
        anon, mapped = memory(proc.pid)
        print(f"crashes 0, internal errors 0; own memory {anon0} MiB at start, {anon_max} MiB at most, {anon} MiB "
              f"at the end; mapped files {file0} -> {mapped} MiB (the store grew to {store_mib(root):.0f} MiB: "
              f"every refused frame is audited); audit chain verified")
        return 0
    finally:
        proc.terminate()
        proc.wait(120)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
