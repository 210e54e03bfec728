"""IPC benchmark: memosd against the raw ZeroMQ floor, in one run.

Measures, each with 1 and with C concurrent client processes:

* raw pyzmq DEALER/ROUTER round trip of a ~200-byte msgpack map (an echo
  server in another process): the floor;
* memosd ``get`` through the blocking client library (p50, p99, ops/s);
* durable ``add`` throughput with group commit, against the same daemon
  started with ``max_group = 1`` (one commit per request).

Usage: python bench/ipc.py [--n 2000] [--clients 8]
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


def run_clients(target, args: tuple, clients: int) -> tuple[float, float, float]:
    """Start ``clients`` processes together; return p50 us, p99 us, total ops/s."""
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
    p50, p99 = _percentiles(lat)
    return p50, p99, len(lat) / wall


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=2000, help="requests per client")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--embedder", default="none",
                        help="the daemon's embedder; the default 'none' (search off) isolates the IPC and store path")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="memos-bench-", dir="/tmp"))
    os.chmod(tmp, 0o700)
    rows: list[tuple[str, float, float, float]] = []

    echo = subprocess.Popen([sys.executable, "-c", ECHO_SERVER, f"ipc://{tmp}/echo.sock"], stdout=subprocess.PIPE)
    echo.stdout.readline()
    for c in (1, args.clients):
        rows.append((f"raw pyzmq round trip, {c} client(s)", *run_clients(raw_client, (f"ipc://{tmp}/echo.sock", args.n), c)))
    echo.kill()

    os.environ["MEMOS_SEARCH__EMBEDDER"] = args.embedder
    grouped = Daemon(tmp / "grouped")
    grouped.client.cube_create("bench")
    memory = grouped.client.add("bench", "a memory to read back " + "x" * 100)
    for c in (1, args.clients):
        rows.append((f"memosd get, {c} client(s)", *run_clients(get_client, (grouped.socket, memory.id, args.n), c)))
    adds = max(args.n // 4, 50)
    rows.append((f"memosd add, group commit, {args.clients} clients",
                 *run_clients(add_client, (grouped.socket, adds), args.clients)))
    rows.append(("memosd add, group commit, 1 client", *run_clients(add_client, (grouped.socket, adds), 1)))
    rows.append((f"memosd add, group commit, {args.clients} async clients in 1 process",
                 *run_clients(add_async_clients, (grouped.socket, adds, args.clients), 1)))
    grouped.stop()

    single = Daemon(tmp / "single", MEMOS_DAEMON__MAX_GROUP="1")
    single.client.cube_create("bench")
    rows.append((f"memosd add, one commit per request, {args.clients} clients",
                 *run_clients(add_client, (single.socket, adds), args.clients)))
    rows.append((f"memosd add, one commit per request, {args.clients} async clients in 1 process",
                 *run_clients(add_async_clients, (single.socket, adds, args.clients), 1)))
    single.stop()

    print(f"# bench/ipc.py  {time.strftime('%Y-%m-%d %H:%M')}  {platform.machine()} cpus={os.cpu_count()} "
          f"python={platform.python_version()}  n={args.n} clients={args.clients} embedder={args.embedder}")
    print(f"{'measure':<52} {'p50 us':>9} {'p99 us':>9} {'ops/s':>9}")
    for name, p50, p99, ops in rows:
        print(f"{name:<52} {p50:9.0f} {p99:9.0f} {ops:9.0f}")
    by = {name: (p50, ops) for name, p50, _, ops in rows}
    raw1 = by["raw pyzmq round trip, 1 client(s)"][0]
    get1 = by["memosd get, 1 client(s)"][0]
    grouped_ops = by[f"memosd add, group commit, {args.clients} clients"][1]
    single_ops = by[f"memosd add, one commit per request, {args.clients} clients"][1]
    print(f"get p50 / raw round trip p50 (1 client): {get1 / raw1:.2f}x  (target <= 2x)")
    print(f"add ops/s group commit / one commit per request ({args.clients} client processes): "
          f"{grouped_ops / single_ops:.2f}x  (target >= 3x)")
    grouped_async = by[f"memosd add, group commit, {args.clients} async clients in 1 process"][1]
    single_async = by[f"memosd add, one commit per request, {args.clients} async clients in 1 process"][1]
    print(f"add ops/s group commit / one commit per request ({args.clients} async clients): "
          f"{grouped_async / single_async:.2f}x")


if __name__ == "__main__":
    main()
