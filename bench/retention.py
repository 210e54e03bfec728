"""Store size under blob-carrying updates, with and without history retention; store_compact's cost.

Two memosd runs, each on a fresh store, each ``--rounds`` rounds of the same work on one cube:

* a rebuild: ``--blobs`` opaque memories of ``--blob-kb`` KiB (new bytes each round, as rebuilt
  KV caches are) are added in one commit, and last round's are taken out of the head (a rollback
  of just those memories to before they were added: absent from then on);
* ``--updates`` text updates of plaintext memories.

``with retention`` also runs ``cube_compact`` after every round (rules: nothing kept by age, the
newest ``--keep`` versions, enough that last round's rollback target is kept), which drops the versions the rules let go and frees the blobs only
they used; ``without`` keeps every version, as memos did before retention. The file size (and
pages in use and free, from ``store_stats``) is printed every ``--every`` rounds.

Then, on each store: ``store_compact`` (the file rewritten without its free pages; memosd restarts
in place), its time, the bytes it freed and how long requests waited; and ``get`` of a small memory
from ``--readers`` other clients, each paced 10 ms apart, while idle and while the compaction runs
(same run: the p50s, their ratio, and the worst wait). A get that overlaps the compaction at all
counts as during it.

Usage: python bench/retention.py [--rounds 100] [--blobs 4] [--blob-kb 256] [--updates 10] [--keep 20]
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "toytype"))  # the opaque type

from memosd import spawn  # noqa: E402

from memos.cli_store import compact  # noqa: E402
from memos.client import Client  # noqa: E402

PACE_S = 0.01


def rounds(client: Client, args: argparse.Namespace, retention: bool, rng: random.Random) -> list[dict[str, Any]]:
    """Run the rounds; the store's figures every ``--every`` rounds."""
    client.cube_create("work")
    if retention:
        client.cube_retention("work", {"all_days": 0, "daily_days": 0, "keep_versions": args.keep})
    texts = [m.id for m in client.add_many("work", [f"note {i}" for i in range(50)])]
    previous: list[str] = []
    previous_version = 0
    figures = []
    for n in range(1, args.rounds + 1):
        before = client.cube_get("work").version
        items = [{"text": f"cache {n}.{i}", "type": "opaque", "blob": rng.randbytes(args.blob_kb << 10)}
                 for i in range(args.blobs)]
        added = client.add_many("work", items)
        if previous:
            client.rollback("work", previous_version, memory_ids=previous)
        previous, previous_version = [m.id for m in added], before
        for i in range(args.updates):
            client.update("work", rng.choice(texts), text=f"round {n} update {i}")
        if retention:
            client.cube_compact("work")
        if n % args.every == 0 or n == 1:
            stats = client.store_stats()
            figures.append({"round": n, "bytes": stats["file_bytes"], **stats["pages"],
                            "blobs": stats["blobs"]["count"], "blob_bytes": stats["blobs"]["bytes"]})
    return figures


def gets_during(socket: str, memory_id: str, work: Any, idle_s: float, readers: int) -> dict[str, Any]:
    """``get`` latencies from ``readers`` clients, each paced 10 ms apart: those begun while idle for
    ``idle_s``, and those that overlap ``work()`` (begun before it ended and ended after it began)."""
    timings: list[tuple[float, float]] = []
    stop = threading.Event()

    def loop() -> None:
        client = Client(socket, timeout=60, retries=2)
        while not stop.is_set():
            began = time.perf_counter()
            client.get("work", memory_id)
            timings.append((began, time.perf_counter()))
            time.sleep(PACE_S)
        client.close()

    threads = [threading.Thread(target=loop) for _ in range(readers)]
    for thread in threads:
        thread.start()
    time.sleep(idle_s)
    window = time.perf_counter()
    result = work()
    end = time.perf_counter()
    time.sleep(0.5)
    stop.set()
    for thread in threads:
        thread.join()
    idle = [e - s for s, e in timings if e < window]
    during = [e - s for s, e in timings if s <= end and e >= window]
    return {"result": result, "idle": idle, "during": during}


def one_run(args: argparse.Namespace, retention: bool) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="memos-retention-", dir="/tmp"))
    os.chmod(root, 0o700)
    socket = str(root / "memosd.sock")
    env = {"MEMOS_SEARCH__EMBEDDER": "hashing", "MEMOS_ACTIVATION__MODELS": "{}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent.parent / "tests"
                                                                / "toytype"), os.environ.get("PYTHONPATH")])),
           "MEMOS_AUDIT__SIGNING_KEY": str(root / "audit.key"),
           "MEMOS_AUDIT__CHECKPOINT_FILE": str(root / "checkpoints.jsonl")}
    proc = spawn(root / "data", socket, env)
    try:
        client = Client(socket, timeout=120)
        began = time.monotonic()
        figures = rounds(client, args, retention, random.Random(args.seed))
        took = time.monotonic() - began
        small = client.add("work", "the memory timed by get").id
        timed = gets_during(socket, small, lambda: compact(client), args.idle_s, args.readers)
        client.close()
        return {"figures": figures, "rounds_s": took, **timed}
    finally:
        proc.terminate()
        proc.wait(60)
        shutil.rmtree(root, ignore_errors=True)


def _us(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1e6 if values else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--blobs", type=int, default=4, help="opaque memories rebuilt each round")
    parser.add_argument("--blob-kb", type=int, default=256, dest="blob_kb")
    parser.add_argument("--updates", type=int, default=10, help="text updates each round")
    parser.add_argument("--keep", type=int, default=20, help="versions retention keeps (keep_versions)")
    parser.add_argument("--every", type=int, default=10, help="print the store's size every this many rounds")
    parser.add_argument("--idle-s", type=float, default=3.0, dest="idle_s")
    parser.add_argument("--readers", type=int, default=4, help="clients timing get, each paced 10 ms apart")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(f"# bench/retention.py  {platform.machine()}  {os.cpu_count()} cpus  Python {platform.python_version()}  "
          f"{time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    print(f"{args.rounds} rounds of {args.blobs} x {args.blob_kb} KiB blobs rebuilt and {args.updates} updates; "
          f"retention keeps the newest {args.keep} versions", flush=True)
    runs = {}
    for retention in (False, True):
        name = "with retention" if retention else "without retention"
        runs[name] = run = one_run(args, retention)
        print(f"\n## {name}  ({run['rounds_s']:.1f} s for the rounds)")
        print(f"{'round':>6} {'file MiB':>9} {'pages used':>11} {'pages free':>11} {'blobs':>6} {'blob MiB':>9}")
        for f in run["figures"]:
            print(f"{f['round']:>6} {f['bytes'] / 2**20:9.1f} {f['used']:11} {f['free']:11} {f['blobs']:6} "
                  f"{f['blob_bytes'] / 2**20:9.1f}")
    print("\n## store_compact after the rounds")
    print(f"{'store':<20} {'before MiB':>10} {'after MiB':>10} {'freed MiB':>10} {'copy s':>7} {'offline s':>9} "
          f"{'waited s':>9} {'get p50 idle us':>15} {'p50 during us':>14} {'ratio':>6} {'max during ms':>13} "
          f"{'gets during':>11}")
    for name, run in runs.items():
        r = run["result"]
        idle, during = _us(run["idle"], 0.5), _us(run["during"], 0.5)
        worst = max(run["during"], default=float("nan")) * 1e3
        print(f"{name:<20} {r['bytes_before'] / 2**20:10.1f} {r['bytes_after'] / 2**20:10.1f} "
              f"{r['freed'] / 2**20:10.1f} {r['copy_s']:7.3f} {r['offline_s']:9.3f} {r['paused_s']:9.3f} "
              f"{idle:15.0f} {during:14.0f} {during / idle:5.2f}x {worst:13.0f} {len(run['during']):11}")
        print(f"{'':<20} get p99 idle {_us(run['idle'], 0.99):.0f} us, during {_us(run['during'], 0.99):.0f} us; "
              f"median of idle {statistics.median(run['idle']) * 1e6:.0f} us over {len(run['idle'])} gets")
    return 0


if __name__ == "__main__":
    sys.exit(main())
