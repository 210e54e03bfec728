"""Store benchmark: durable commit rate and read-at-version latency.

    python bench/store.py [--n N] [--repeats R] [--memories M] [--no-write]

(a) single-change durable commits per second through ``Memos.add`` against raw
LMDB with one transaction per put (same ~200-byte value, sync on, same disk,
fresh directories); (b) ``get(at=...)``, ``state(at=...)`` and ``list()``
latency on a cube with M memories and at least M versions. The figures are
printed and written into BENCHMARKS.md under "## Store (bench/store.py)".
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import random
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lmdb

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memos.api import LOCAL_ADMIN, Memos, NewMemory  # noqa: E402
from memos.paging import every  # noqa: E402
from memos.storage import StoreOptions  # noqa: E402

SECTION = "## Store (bench/store.py)"
VALUE = ("memory text of about two hundred bytes, the size of a short fact an agent keeps: "
         "the user prefers metric units and dark mode; meeting moved to Thursday 10:00. ").encode()[:200]


def raw_lmdb_rate(n: int, where: str) -> float:
    path = tempfile.mkdtemp(prefix="bench-raw-", dir=where)
    try:
        env = lmdb.open(path, map_size=1 << 30, max_dbs=2, sync=True, metasync=True)
        db = env.open_db(b"data")
        start = time.perf_counter()
        for i in range(n):
            with env.begin(write=True, db=db) as txn:
                txn.put(i.to_bytes(8, "big"), VALUE)
        elapsed = time.perf_counter() - start
        env.close()
        return n / elapsed
    finally:
        shutil.rmtree(path, ignore_errors=True)


def memos_add_rate(n: int, where: str, sync: bool = True) -> float:
    path = tempfile.mkdtemp(prefix="bench-memos-", dir=where)
    text = VALUE.decode()
    try:
        m = Memos(path, options=StoreOptions(sync=sync))
        m.create_cube(LOCAL_ADMIN, "bench")
        start = time.perf_counter()
        for _ in range(n):
            m.add(LOCAL_ADMIN, "bench", text)
        elapsed = time.perf_counter() - start
        m.close()
        return n / elapsed
    finally:
        shutil.rmtree(path, ignore_errors=True)


def percentile(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def build_versioned_cube(m: Memos, memories: int) -> tuple[list[str], float]:
    start = time.perf_counter()
    m.create_cube(LOCAL_ADMIN, "big")
    ids: list[str] = []
    for lo in range(0, memories, 1000):
        batch = [NewMemory(text=f"memory {i}: " + VALUE.decode()[:150], tags=[f"t{i % 10}"])
                 for i in range(lo, min(memories, lo + 1000))]
        ids += [x.id for x in m.add_many(LOCAL_ADMIN, "big", batch)]
    rng = random.Random(7)
    while m.get_cube(LOCAL_ADMIN, "big").version < memories:
        writes = [m.write_update(LOCAL_ADMIN, "big", rng.choice(ids), text=f"edit {k} " + VALUE.decode()[:150])
                  for k in range(1000)]
        for result in m.apply(writes):
            if isinstance(result, Exception):
                raise result
    return ids, time.perf_counter() - start


def timed(fn, count: int) -> list[float]:
    out = []
    for _ in range(count):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="commits per repeat in (a)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--memories", type=int, default=10_000, help="memories (and at least as many versions) in (b)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave BENCHMARKS.md alone")
    ap.add_argument("--dir", default=None, help="where the temporary stores go (default: the system temp dir)")
    args = ap.parse_args()
    where = args.dir or tempfile.gettempdir()

    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
               f"Python {platform.python_version()}, py-lmdb {lmdb.__version__} (LMDB {'.'.join(map(str, lmdb.version()))})")
    date = dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    print(f"machine: {machine}\ndate:    {date}\nstores in {where}\n")

    # (a) durable commits, alternating so drift in disk speed hits both alike.
    raw, api = [], []
    for _ in range(args.repeats):
        raw.append(raw_lmdb_rate(args.n, where))
        api.append(memos_add_rate(args.n, where))
    raw_med, api_med = statistics.median(raw), statistics.median(api)
    nosync = [memos_add_rate(args.n, where, sync=False) for _ in range(args.repeats)]
    nosync_med = statistics.median(nosync)
    rows_a = [
        ("raw LMDB, 1 put per durable txn", f"{raw_med:,.0f}/s", " ".join(f"{x:,.0f}" for x in raw)),
        ("Memos.add, 1 memory per commit", f"{api_med:,.0f}/s", " ".join(f"{x:,.0f}" for x in api)),
        ("Memos.add / raw", f"{api_med / raw_med:.2f}", ""),
        ("Memos.add, sync off (CPU and page writes)", f"{nosync_med:,.0f}/s",
         " ".join(f"{x:,.0f}" for x in nosync)),
    ]
    print(f"(a) durable single-change commits, n={args.n}, median of {args.repeats}")
    for name, med, runs in rows_a:
        print(f"    {name:<42} {med:>10}   runs: {runs}")

    # (b) reads at past versions.
    path = tempfile.mkdtemp(prefix="bench-versions-", dir=where)
    try:
        m = Memos(path)
        ids, build_s = build_versioned_cube(m, args.memories)
        head = m.get_cube(LOCAL_ADMIN, "big").version
        first_full = -(-args.memories // 1000)  # every memory exists from this version on
        rng = random.Random(11)
        get_ms = timed(lambda: m.get(LOCAL_ADMIN, "big", rng.choice(ids), at=rng.randint(first_full, head)), 2000)
        state_ms = timed(lambda: m.state(LOCAL_ADMIN, "big", at=rng.randint(first_full, head)), 40)
        sizes = {len(m.state(LOCAL_ADMIN, "big", at=v)) for v in (first_full, head)}
        # A listing answers at most a page (max_page): all of them is a page at a time.
        list_ms = timed(lambda: every(lambda n, after: m.list(LOCAL_ADMIN, "big", status=None, limit=n, after=after),
                                      lambda mem: mem.id), 10)
        page_ms = timed(lambda: m.list(LOCAL_ADMIN, "big", limit=100, after=rng.choice(ids)), 200)
        versions = m.store.stats()["versions"]
        m.close()
    finally:
        shutil.rmtree(path, ignore_errors=True)
    assert sizes == {args.memories}
    rows_b = [
        ("get(at=random version)", 2000, get_ms),
        (f"state(at=random version), {args.memories:,} memories", 40, state_ms),
        (f"list() of the head, all {args.memories:,}, by pages", 10, list_ms),
        ("list(limit=100, after=random id)", 200, page_ms),
    ]
    print(f"\n(b) cube of {args.memories:,} memories, {head:,} versions, {versions:,} version records "
          f"(built in {build_s:.1f} s)")
    print(f"    {'operation':<42} {'calls':>5} {'p50 ms':>9} {'p99 ms':>9}")
    for name, count, samples in rows_b:
        print(f"    {name:<42} {count:>5} {percentile(samples, 50):>9.3f} {percentile(samples, 99):>9.3f}")

    if args.no_write:
        return
    lines = [
        SECTION, "",
        f"Command: `python bench/store.py --n {args.n} --repeats {args.repeats} --memories {args.memories}`  ",
        f"Machine: {machine}  ",
        f"Date: {date}; stores in `{where}`", "",
        f"(a) Durable single-change commits (sync on, ~200-byte value, {args.n} commits, median of {args.repeats}):", "",
        "A Memos.add commit puts six records (head, version record, commit, cube, audit record, audit head)"
        " and validates and encodes the memory; the sync-off row shows that cost without the fsync."
        " Many writes in one commit (`Memos.apply`, the daemon's group commit) is where throughput comes from.", "",
        "| path | commits/s | runs |", "|---|---:|---|",
        *[f"| {name} | {med} | {runs} |" for name, med, runs in rows_a], "",
        f"(b) Reads on a cube of {args.memories:,} memories and {head:,} versions ({versions:,} version records):", "",
        "| operation | calls | p50 ms | p99 ms |", "|---|---:|---:|---:|",
        *[f"| {name} | {count} | {percentile(s, 50):.3f} | {percentile(s, 99):.3f} |" for name, count, s in rows_b],
        "",
    ]
    write_section(ROOT / "BENCHMARKS.md", "\n".join(lines))
    print(f"\nwrote {SECTION!r} in BENCHMARKS.md")


def write_section(path: Path, body: str) -> None:
    """Replace this benchmark's section, leaving other sections as they are."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.M | re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: body + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + body + "\n"
    path.write_text(text)


if __name__ == "__main__":
    main()
