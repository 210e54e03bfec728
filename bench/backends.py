"""Storage backends side by side: memosd on LMDB against memosd on PostgreSQL, in one run.

Two daemons run throughout, identical but for ``storage``; the measures take
turns, once per round, and the figures are medians over rounds:

* ``add`` from 1 client (a commit per request: the latency of one durable commit);
* ``add`` from C client processes at once (group commit: throughput, p50, p99);
* ``get`` from C client processes at once (throughput, p50, p99);
* for PostgreSQL alone, what another daemon sharing the store sees: a second memosd
  on the same database searches for each memory right after its add through the first
  is acknowledged (how long that search takes, its index catching up through the
  follower, and whether it found the memory).

Both daemons use the model-free embedder, so the figures are the store's and
the daemon's, not MiniLM's. PostgreSQL is the server named by ``--pg`` or, by
default, a throwaway one started from the machine's binaries (tests/pgserver.py)
with its default settings (fsync and synchronous_commit on), on a unix socket.

Usage: python bench/backends.py [--n 1500] [--clients 8] [--rounds 3] [--pg URL]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import memosd  # bench/memosd.py

from memos.client import Client

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def _adds(socket: str, n: int, tag: str, out: mp.Queue) -> None:
    c = Client(socket, timeout=60)
    lat = []
    for i in range(n):
        t = time.perf_counter()
        c.add("bench", f"{tag} memory {i} about the launch window and the weather")
        lat.append(time.perf_counter() - t)
    out.put(lat)


def _gets(socket: str, ids: list[str], n: int, seed: int, out: mp.Queue) -> None:
    c = Client(socket, timeout=60)
    rng = random.Random(seed)
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        c.get("bench", rng.choice(ids))
        lat.append(time.perf_counter() - t)
    out.put(lat)


def _run(target, args_for, clients: int) -> tuple[float, list[float]]:
    """``clients`` processes at once; ops/s over the wall time, and every latency."""
    out: mp.Queue = mp.Queue()
    procs = [mp.Process(target=target, args=(*args_for(i), out)) for i in range(clients)]
    began = time.perf_counter()
    for p in procs:
        p.start()
    lat = [x for _ in procs for x in out.get()]
    wall = time.perf_counter() - began
    for p in procs:
        p.join()
    return len(lat) / wall, lat


def _pct(lat: list[float], q: float) -> float:
    return sorted(lat)[min(len(lat) - 1, int(q * len(lat)))] * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1500, help="requests per measure")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--pg", help="a PostgreSQL URL (an empty database); default: a throwaway server")
    args = ap.parse_args()
    mp.set_start_method("fork")
    server = None
    if args.pg is None:
        from pgserver import PgServer

        server = PgServer()
        args.pg = server.url(server.new_database())
    root = Path(tempfile.mkdtemp(prefix="memos-bench-backends-"))
    env = {"MEMOS_SEARCH__EMBEDDER": "hashing", "MEMOS_ACTIVATION__MODELS": "{}"}
    daemons, sockets = [], {}
    try:
        for name, storage in (("lmdb", "lmdb"), ("postgresql", args.pg)):
            (root / name).mkdir(mode=0o700)
            sockets[name] = str(root / name / "memosd.sock")
            daemons.append(memosd.spawn(root / name / "data", sockets[name], env={**env, "MEMOS_STORAGE": storage}))
            Client(sockets[name]).cube_create("bench")
        results: dict[str, dict[str, list[float]]] = {name: {} for name in sockets}
        for r in range(args.rounds):
            for name, socket in sockets.items():
                res = results[name]
                _, one = _run(_adds, lambda i: (socket, max(50, args.n // 10), f"single{r}"), 1)
                res.setdefault("add1_p50", []).append(_pct(one, 0.5))
                per = args.n // args.clients
                rate, lat = _run(_adds, lambda i: (socket, per, f"r{r}c{i}"), args.clients)
                res.setdefault("add_rate", []).append(rate)
                res.setdefault("add_p50", []).append(_pct(lat, 0.5))
                res.setdefault("add_p99", []).append(_pct(lat, 0.99))
                ids = [m.id for m in Client(socket).list("bench", limit=1000)]
                rate, lat = _run(_gets, lambda i: (socket, ids, per, r * 100 + i), args.clients)
                res.setdefault("get_rate", []).append(rate)
                res.setdefault("get_p50", []).append(_pct(lat, 0.5))
                res.setdefault("get_p99", []).append(_pct(lat, 0.99))
                print(f"round {r + 1} {name}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in res.items()), flush=True)
        staleness = _cross_daemon(root, env, args.pg, sockets["postgresql"], daemons)
    finally:
        for proc in daemons:
            proc.terminate()
            proc.wait()
        if server is not None:
            server.stop()
    med = {name: {k: statistics.median(v) for k, v in res.items()} for name, res in results.items()}
    print(f"\n{platform.node()} ({os.cpu_count()} CPUs), {time.strftime('%Y-%m-%d')}: n={args.n}, "
          f"{args.clients} client processes, median of {args.rounds} rounds\n")
    print("| measure | LMDB | PostgreSQL | PostgreSQL / LMDB |")
    print("|---|---|---|---|")
    rows = [("add, 1 client: p50 ms", "add1_p50"), (f"add, {args.clients} clients: ops/s", "add_rate"),
            ("add: p50 ms", "add_p50"), ("add: p99 ms", "add_p99"),
            (f"get, {args.clients} clients: ops/s", "get_rate"), ("get: p50 ms", "get_p50"),
            ("get: p99 ms", "get_p99")]
    for label, key in rows:
        a, b = med["lmdb"][key], med["postgresql"][key]
        print(f"| {label} | {a:.1f} | {b:.1f} | {b / a:.2f} |")
    lat, found = staleness
    print("\nTwo daemons on one PostgreSQL: a search right after each add is acknowledged, through the daemon "
          "that wrote it or through the other one\n")
    print("| searched through | p50 ms | p99 ms | max ms | found |")
    print("|---|---|---|---|---|")
    for who in ("own", "other"):
        print(f"| {'the writing daemon' if who == 'own' else 'the other daemon'} | {_pct(lat[who], 0.5):.1f} | "
              f"{_pct(lat[who], 0.99):.1f} | {max(lat[who]) * 1000:.1f} | {found[who]} of {len(lat[who])} |")
    print(f"\nother / own, p50: {_pct(lat['other'], 0.5) / _pct(lat['own'], 0.5):.2f}")


def _cross_daemon(root: Path, env: dict[str, str], url: str, first: str,
                  daemons: list) -> tuple[dict[str, list[float]], dict[str, int]]:
    (root / "second").mkdir(mode=0o700)
    second = str(root / "second" / "memosd.sock")
    daemons.append(memosd.spawn(root / "second" / "data", second, env={**env, "MEMOS_STORAGE": url}))
    a, b = Client(first), Client(second)
    a.cube_create("stale")
    lat: dict[str, list[float]] = {"own": [], "other": []}
    found = {"own": 0, "other": 0}
    for i in range(400):  # turn by turn: the writer's own daemon searches, then the other one
        mem = a.add("stale", f"marker{i}x unique words for memory {i}")
        who, c = ("own", a) if i % 2 == 0 else ("other", b)
        t = time.perf_counter()
        hits = c.search("stale", f"marker{i}x", k=1)
        lat[who].append(time.perf_counter() - t)
        found[who] += bool(hits) and hits[0].memory.id == mem.id
    return lat, found


if __name__ == "__main__":
    main()
