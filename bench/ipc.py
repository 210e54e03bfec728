"""IPC benchmark: memosd against the raw ZeroMQ floor, in one run.

Measures (p50, p99, ops/s):

* raw pyzmq DEALER/ROUTER round trip of a ~200-byte msgpack map (an echo
  server in another process), with 1 and with C client processes: the floor;
* memosd ``get`` through the blocking client library, with 1 and C clients;
* durable ``add`` throughput with group commit, against the same daemon
  started with ``max_group = 1`` (one commit per request), with C client
  processes and with C asyncio clients in one process;
* the same comparison without memos: a minimal one-thread pyzmq ROUTER that
  puts each request into LMDB, either everything that arrived since its last
  commit in one commit or one commit per request. It writes one record per
  request, or eight in eight sub-databases as memosd's add does (state,
  head, commit, cube, audit record, audit head, stored reply and its time).
  That is how much a group commit can gain on this machine's fsync at all.

Every server runs throughout; the measures take turns, once per round.

Usage: python bench/ipc.py [--n 2000] [--clients 8] [--rounds 3]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import memosd  # bench/memosd.py

PAYLOAD = {"v": 1, "id": "01J000000000000000000000", "op": "get",
           "args": {"cube": "bench", "id": "01J000000000000000000000", "pad": "x" * 120}}

ECHO_SERVER = """
import sys, zmq
ctx = zmq.Context()
s = ctx.socket(zmq.ROUTER)
s.bind(sys.argv[1])
print("ready", flush=True)
while True:
    s.send_multipart(s.recv_multipart())
"""


# A durable-write server with nothing but ZeroMQ and LMDB: the floor for ``add``.
# argv: endpoint, LMDB folder, "group" or "single", records per request.
RAW_WRITE_SERVER = """
import sys, lmdb, zmq
endpoint, path, mode, records = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
env = lmdb.open(path, map_size=1 << 30, max_dbs=records)
dbs = [env.open_db(b"db%d" % i) for i in range(records)]
s = zmq.Context().socket(zmq.ROUTER)
s.bind(endpoint)
print("ready", flush=True)
most = 1 if mode == "single" else 64
key = 0
while True:
    batch = [s.recv_multipart()]  # wait for one, then take what else has arrived
    while len(batch) < most:
        try:
            batch.append(s.recv_multipart(zmq.NOBLOCK))
        except zmq.Again:
            break
    with env.begin(write=True) as txn:  # sync=True: durable when the block ends
        for _, frame in batch:
            key += 1
            for db in dbs:
                txn.put(key.to_bytes(8, "big"), frame, db=db)
    for request in batch:
        s.send_multipart(request)
"""


def _percentiles(samples: list[float]) -> tuple[float, float]:
    samples = sorted(samples)
    return statistics.median(samples) * 1e6, samples[int(len(samples) * 0.99) - 1] * 1e6


# -- client processes (module level so spawn can import them) ----------------

def raw_client(endpoint: str, n: int, barrier, out) -> None:
    import msgpack
    import zmq

    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect(endpoint)
    frame = msgpack.packb(PAYLOAD)
    for _ in range(50):
        sock.send(frame)
        sock.recv()
    barrier.wait()
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        sock.send(frame)
        sock.recv()
        lat.append(time.perf_counter() - t)
    out.put(lat)


def raw_add_client(endpoint: str, n: int, barrier, out) -> None:
    import msgpack
    import zmq

    sock = zmq.Context().socket(zmq.DEALER)
    sock.connect(endpoint)
    barrier.wait()
    lat = []
    for i in range(n):
        frame = msgpack.packb({**PAYLOAD, "op": "add", "id": f"{os.getpid()}-{i}",
                               "args": {"cube": "bench", "text": f"memory {i}: " + "x" * 100}})
        t = time.perf_counter()
        sock.send(frame)
        sock.recv()
        lat.append(time.perf_counter() - t)
    out.put(lat)


def get_client(socket: str, memory_id: str, n: int, barrier, out) -> None:
    from memos.client import Client

    client = Client(socket)
    for _ in range(50):
        client.get("bench", memory_id)
    barrier.wait()
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        client.get("bench", memory_id)
        lat.append(time.perf_counter() - t)
    out.put(lat)


def add_client(socket: str, n: int, barrier, out) -> None:
    from memos.client import Client

    client = Client(socket)
    barrier.wait()
    lat = []
    for i in range(n):
        t = time.perf_counter()
        client.add("bench", f"memory {i} from {os.getpid()}: " + "x" * 100)
        lat.append(time.perf_counter() - t)
    out.put(lat)


def add_async_clients(socket: str, n: int, tasks: int, barrier, out) -> None:
    """``tasks`` concurrent clients as asyncio tasks in one process (one connection each)."""
    import asyncio

    from memos.client import AsyncClient

    async def one(client: AsyncClient, lat: list[float]) -> None:
        for i in range(n):
            t = time.perf_counter()
            await client.add("bench", f"memory {i} from {os.getpid()}: " + "x" * 100)
            lat.append(time.perf_counter() - t)

    async def run() -> list[float]:
        clients = [AsyncClient(socket) for _ in range(tasks)]
        lat: list[float] = []
        barrier.wait()
        await asyncio.gather(*(one(c, lat) for c in clients))
        for c in clients:
            await c.close()
        return lat

    out.put(asyncio.run(run()))


def run_clients(target, args: tuple, clients: int) -> tuple[list[float], float]:
    """Start ``clients`` processes together; return every latency (s) and the wall time (s)."""
    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(clients + 1), ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, barrier, out)) for _ in range(clients)]
    for p in procs:
        p.start()
    barrier.wait()
    start = time.perf_counter()
    lat: list[float] = []
    for _ in procs:
        lat.extend(out.get())
    wall = time.perf_counter() - start
    for p in procs:
        p.join()
    return lat, wall


# -- servers ----------------------------------------------------------------------

class Daemon:
    def __init__(self, root: Path, **env: str) -> None:
        self.socket = str(root / "memosd.sock")
        self.proc = memosd.spawn(root / "data", self.socket, env)
        from memos.client import Client

        self.client = Client(self.socket)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)


class Raw:
    """A raw server in a subprocess (``script`` gets the endpoint first, then ``argv``)."""

    def __init__(self, script: str, endpoint: str, *argv: str) -> None:
        self.endpoint = endpoint
        self.proc = subprocess.Popen([sys.executable, "-c", script, endpoint, *argv], stdout=subprocess.PIPE)
        self.proc.stdout.readline()

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="get requests per client (adds: a quarter)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3,
                        help="every measure runs once per round, in turn, so that a noisy minute "
                             "hits a figure and its baseline alike")
    parser.add_argument("--embedder", default="none",
                        help="the daemon's embedder; the default 'none' (search off) isolates the IPC and store path")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="memos-bench-", dir="/tmp"))
    os.chmod(tmp, 0o700)
    c, gets, adds = args.clients, max(args.n // args.rounds, 50), max(args.n // 4 // args.rounds, 50)

    os.environ["MEMOS_SEARCH__EMBEDDER"] = args.embedder
    echo = Raw(ECHO_SERVER, f"ipc://{tmp}/echo.sock")
    grouped = Daemon(tmp / "grouped")
    single = Daemon(tmp / "single", MEMOS_DAEMON__MAX_GROUP="1")
    for daemon in (grouped, single):
        daemon.client.cube_create("bench")
    memory = grouped.client.add("bench", "a memory to read back " + "x" * 100)
    raw_writers = {(mode, records): Raw(RAW_WRITE_SERVER, f"ipc://{tmp}/raw-{mode}-{records}.sock",
                                        str(tmp / f"raw-{mode}-{records}"), mode, str(records))
                   for records in (1, 8) for mode in ("group", "single")}

    measures = [
        ("raw pyzmq round trip, 1 client (the floor)", raw_client, (echo.endpoint, gets), 1),
        ("memosd get, 1 client", get_client, (grouped.socket, memory.id, gets), 1),
        (f"raw pyzmq round trip, {c} clients", raw_client, (echo.endpoint, gets), c),
        (f"memosd get, {c} clients", get_client, (grouped.socket, memory.id, gets), c),
        (f"memosd add, group commit, {c} clients", add_client, (grouped.socket, adds), c),
        (f"memosd add, one commit per request, {c} clients", add_client, (single.socket, adds), c),
        ("memosd add, group commit, 1 client", add_client, (grouped.socket, adds), 1),
        (f"memosd add, group commit, {c} async clients in 1 process",
         add_async_clients, (grouped.socket, adds, c), 1),
        (f"memosd add, one commit per request, {c} async clients in 1 process",
         add_async_clients, (single.socket, adds, c), 1),
    ]
    for (mode, records), server in raw_writers.items():
        label = "group commit" if mode == "group" else "one commit per request"
        measures.append((f"raw pyzmq+LMDB add, {label}, {records} record(s), {c} clients",
                         raw_add_client, (server.endpoint, adds), c))

    runs: dict[str, list[tuple[list[float], float]]] = {name: [] for name, *_ in measures}
    for _ in range(args.rounds):
        for name, target, targs, clients in measures:
            runs[name].append(run_clients(target, targs, clients))
    for server in (echo, *raw_writers.values()):
        server.stop()
    grouped.stop()
    single.stop()

    def p50(name: str, i: int | None = None) -> float:
        return statistics.median(runs[name][i][0] if i is not None else [x for lat, _ in runs[name] for x in lat])

    def ops(name: str, i: int | None = None) -> float:
        picked = [runs[name][i]] if i is not None else runs[name]
        return sum(len(lat) for lat, _ in picked) / sum(wall for _, wall in picked)

    def ratio(label: str, top: str, bottom: str, of, target: str = "") -> None:
        rounds = ", ".join(f"{of(top, i) / of(bottom, i):.2f}" for i in range(args.rounds))
        print(f"{label}: {of(top) / of(bottom):.2f}x  (rounds: {rounds}){target}")

    print(f"# bench/ipc.py  {time.strftime('%Y-%m-%d %H:%M')}  {platform.machine()} cpus={os.cpu_count()} "
          f"python={platform.python_version()}  n={args.n} clients={c} rounds={args.rounds} embedder={args.embedder}")
    print(f"{'measure':<64} {'p50 us':>9} {'p99 us':>9} {'ops/s':>9}")
    for name, *_ in measures:
        _, p99 = _percentiles([x for lat, _ in runs[name] for x in lat])
        print(f"{name:<64} {p50(name) * 1e6:9.0f} {p99:9.0f} {ops(name):9.0f}")
    ratio("get p50 / raw round trip p50 (1 client)", "memosd get, 1 client",
          "raw pyzmq round trip, 1 client (the floor)", p50, "  target <= 2x")
    ratio(f"add ops/s, group commit / one commit per request ({c} client processes)",
          f"memosd add, group commit, {c} clients", f"memosd add, one commit per request, {c} clients", ops,
          "  target >= 3x")
    ratio(f"add ops/s, group commit / one commit per request ({c} async clients)",
          f"memosd add, group commit, {c} async clients in 1 process",
          f"memosd add, one commit per request, {c} async clients in 1 process", ops)
    for records in (1, 8):
        ratio(f"the same without memos (raw pyzmq+LMDB, {records} record(s) a request)",
              f"raw pyzmq+LMDB add, group commit, {records} record(s), {c} clients",
              f"raw pyzmq+LMDB add, one commit per request, {records} record(s), {c} clients", ops)


if __name__ == "__main__":
    main()
