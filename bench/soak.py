"""A soak of a real memosd: ``python bench/soak.py [--minutes 10] [--clients 4] [--embedder hashing]``.

One memosd (the hashing embedder unless ``--embedder minilm``) and ``--clients`` client
processes, each owning a share of a cube seeded with ``--memories`` memories, mixing reads and
writes for ``--minutes``: ``get`` 35%, ``search`` 25%, ``list`` (a page of 50) 10%, ``update``
15%, ``add`` 7.5% and ``delete`` 7.5% (so the live set, and the search index, keep their size
while the store's history grows). Every ``--every`` seconds it prints the throughput, p50 and
p99 latency of each operation (timed in the clients, IPC included) and the daemon's resident
memory: its own (RssAnon: heap, indexes) and its mapped files (RssFile: LMDB's map, which grows
with the store).

At the end it gives a verdict on the daemon's own memory: after a warm-up (the first tenth of the
run, at least a minute), the median of the last third of the samples against the median of the
first third; flat if it grew by at most ``--tolerance`` (10%) or 4 MiB, whichever is larger. It
exits non-zero if the daemon died, an operation failed, the audit chain did not verify, or the
memory was not flat.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import queue
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))

from memosd import spawn  # noqa: E402

from memos.client import Client  # noqa: E402

CUBE = "soak"
WORDS = ("bees roof library boiler flat serviced bicycle green basket cat pixel garden kettle river bridge "
         "lantern orchard violin harbour meadow").split()
MIX = [("get", 35), ("search", 25), ("list", 10), ("update", 15), ("add", 7.5), ("delete", 7.5)]


def text(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 16)))


def worker(n: int, socket: str, ids: list[str], until: float, out: mp.Queue) -> None:
    """One client process: timed operations until ``until``, reported about once a second."""
    rng = random.Random(n)
    client = Client(socket, timeout=60, retries=0)
    ops, weights = zip(*MIX)
    batch: list[tuple[str, float]] = []
    sent = time.monotonic()
    errors = 0
    while time.monotonic() < until:
        op = rng.choices(ops, weights)[0]
        start = time.perf_counter()
        try:
            if op == "get":
                client.get(CUBE, rng.choice(ids))
            elif op == "search":
                client.search(CUBE, " ".join(rng.sample(WORDS, 3)), k=5)
            elif op == "list":
                client.list(CUBE, limit=50, after=rng.choice(ids))
            elif op == "update":
                client.update(CUBE, rng.choice(ids), text=text(rng))
            elif op == "add":
                ids.append(client.add(CUBE, text(rng)).id)
            else:
                client.delete(CUBE, ids.pop(rng.randrange(len(ids))))
        except Exception as exc:  # counted and reported: a soak must not have any
            errors += 1
            out.put(("error", n, f"{op}: {type(exc).__name__}: {exc}"[:300]))
            continue
        batch.append((op, time.perf_counter() - start))
        if time.monotonic() - sent >= 1.0:
            out.put(("ops", n, batch))
            batch, sent = [], time.monotonic()
    out.put(("ops", n, batch))
    out.put(("done", n, errors))
    client.close()


def memory(pid: int) -> tuple[float, float]:
    """The daemon's own resident memory and its resident mapped files, in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["RssAnon"].split()[0]) / 1024, int(fields["RssFile"].split()[0]) / 1024


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")


def report(elapsed: float, window: dict[str, list[float]], seconds: float, pid: int, root: Path) -> tuple[int, float]:
    total = sum(len(v) for v in window.values())
    own, mapped = memory(pid)
    rss = psutil.Process(pid).memory_info().rss / (1 << 20)
    store = (root / "data" / "data.mdb").stat().st_size / (1 << 20)
    cells = "  ".join(f"{op} {pct(window[op], 0.5):.2f}/{pct(window[op], 0.99):.1f}" for op, _ in MIX)
    print(f"{elapsed / 60:5.1f} min  {total / seconds:6.0f} ops/s  p50/p99 ms: {cells}  "
          f"rss {rss:.0f} MiB (own {own:.0f}, mapped {mapped:.0f})  store {store:.0f} MiB", flush=True)
    return total, own


def verdict(samples: list[tuple[float, float]], seconds: float, tolerance: float) -> tuple[bool, str]:
    """Flat if the daemon's own memory in the last third is within tolerance of the first third (after warm-up)."""
    warm = max(60.0, seconds / 10)
    kept = [own for t, own in samples if t >= warm]
    if len(kept) < 6:
        return False, "too few samples after the warm-up for a verdict"
    third = len(kept) // 3
    first, last = statistics.median(kept[:third]), statistics.median(kept[-third:])
    allowed = max(first * tolerance, 4.0)
    flat = last - first <= allowed
    return flat, (f"own memory after {warm:.0f} s of warm-up: first third median {first:.1f} MiB, last third "
                  f"median {last:.1f} MiB, growth {last - first:+.1f} MiB (allowed {allowed:.1f}): "
                  f"{'FLAT' if flat else 'GROWING'}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--memories", type=int, default=2000, help="memories the cube starts with")
    parser.add_argument("--every", type=float, default=30.0, help="seconds between reports")
    parser.add_argument("--embedder", choices=["hashing", "minilm"], default="hashing")
    parser.add_argument("--tolerance", type=float, default=0.10)
    args = parser.parse_args()
    seconds = args.minutes * 60
    root = Path(tempfile.mkdtemp(prefix="memos-soak-"))
    socket = str(root / "memosd.sock")
    proc = spawn(root / "data", socket, env={"MEMOS_SEARCH__EMBEDDER": args.embedder, "MEMOS_ACTIVATION__MODELS": "{}"})
    print(f"# bench/soak.py  {time.strftime('%Y-%m-%d %H:%M')}  {args.minutes:g} min, {args.clients} clients, "
          f"{args.memories} memories to start, embedder {args.embedder}, {psutil.cpu_count()} CPUs", flush=True)
    try:
        admin = Client(socket, timeout=120)
        admin.cube_create(CUBE)
        rng = random.Random(0)
        ids = [m.id for i in range(0, args.memories, 500)
               for m in admin.add_many(CUBE, [text(rng) for _ in range(min(500, args.memories - i))])]
        ctx = mp.get_context("spawn")
        out: mp.Queue = ctx.Queue()
        start = time.monotonic()
        until = start + seconds
        workers = [ctx.Process(target=worker, args=(n, socket, ids[n::args.clients], until, out))
                   for n in range(args.clients)]
        for w in workers:
            w.start()
        window: dict[str, list[float]] = defaultdict(list)
        every_op: dict[str, list[float]] = defaultdict(list)
        samples: list[tuple[float, float]] = []
        errors: list[str] = []
        done = 0
        next_sample, next_report = start + 5, start + args.every
        while done < args.clients:
            try:
                kind, n, payload = out.get(timeout=1.0)
            except queue.Empty:
                kind = None
            if kind == "ops":
                for op, latency in payload:
                    window[op].append(latency)
                    every_op[op].append(latency)
            elif kind == "error":
                errors.append(payload)
                print(f"client {n}: {payload}", flush=True)
            elif kind == "done":
                done += 1
            if proc.poll() is not None:
                print(f"memosd died with {proc.returncode}")
                return 1
            now = time.monotonic()
            if now >= next_sample:
                samples.append((now - start, memory(proc.pid)[0]))
                next_sample += 5
            if now >= next_report:
                report(now - start, window, args.every, proc.pid, root)
                window = defaultdict(list)
                next_report += args.every
        for w in workers:
            w.join(60)
        elapsed = time.monotonic() - start
        total = sum(len(v) for v in every_op.values())
        print(f"whole run: {total} operations in {elapsed:.0f} s, {total / elapsed:.0f} ops/s; p50/p99 ms: "
              + "  ".join(f"{op} {pct(every_op[op], 0.5):.2f}/{pct(every_op[op], 0.99):.1f}" for op, _ in MIX))
        print(f"errors: {len(errors)}")
        ok = admin.audit_verify().ok and admin.ping()["pid"] == proc.pid
        print(f"daemon alive, same process, audit chain {'verified' if ok else 'BROKEN'}")
        flat, line = verdict(samples, elapsed, args.tolerance)
        print(line, flush=True)
        admin.close()
        return 0 if ok and flat and not errors else 1
    finally:
        proc.terminate()
        proc.wait(120)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
