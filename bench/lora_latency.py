"""`get` p50 through memosd while a distillation trains, for several training thread counts, side by side.

For each ``--threads`` value (``default``: torch's own, i.e. every core) a
memosd is started with ``MEMOS_PARAMETER__THREADS`` set, 40 TOFU facts are
added and distilled (SmolLM2-135M, the default recipe); ``get`` p50 of a
small memory is measured idle (500 gets, 10 ms apart; and 500 back to back,
for comparison), then for ``--seconds`` once the training has started (steps
running), paced alike, and the job is cancelled. The ratio
is what bench/lora.py's latency target is about, without its hour of
evaluation.

Usage: python bench/lora_latency.py [--threads default,1] [--seconds 60]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lora import DATA, get_p50, timed_gets  # noqa: E402
from memosd import spawn  # noqa: E402

from memos.client import Client  # noqa: E402


def measure(threads: str, facts: list[dict], seconds: float) -> tuple[float, float, int]:
    root = Path(tempfile.mkdtemp(prefix="memos-lora-latency-"))
    socket = str(root / "memosd.sock")
    env = {"MEMOS_SEARCH__EMBEDDER": "hashing"}
    if threads != "default":
        env["MEMOS_PARAMETER__THREADS"] = threads
    proc = spawn(root / "data", socket, env=env)
    try:
        client, reader = Client(socket, timeout=120), Client(socket, timeout=60)
        client.cube_create("get")
        small = client.add("get", "a small memory to read back")
        client.cube_create("facts")
        client.add_many("facts", [f"Q: {f['question']}\nA: {f['answer']}" for f in facts])
        unpaced = []
        for _ in range(500):
            t = time.perf_counter()
            reader.get("get", small.id)
            unpaced.append(time.perf_counter() - t)
        print(f"  get p50 idle, back to back: {statistics.median(unpaced) * 1e6:.0f} us", flush=True)
        idle = get_p50(reader, "get", small.id, 500)
        job = client.distill("facts", recipe={"steps": 100_000, "stop_loss": 0.0})
        while next(j for j in client.jobs() if j["id"] == job["id"])["detail"].get("step", 0) < 1:
            time.sleep(0.2)
        busy: list[float] = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            busy += timed_gets(reader, "get", small.id, 20)
        client.job_cancel(job["id"])
        return idle, statistics.median(busy) * 1e6, len(busy)
    finally:
        proc.terminate()
        proc.wait(120)
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", default="default,1")
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    rows = [json.loads(line) for line in (DATA / "tofu_dev.jsonl").read_text().splitlines() if line.strip()]
    facts = [r for r in rows if r["split"] == "forget10_first300"][:40]
    print(f"# bench/lora_latency.py  {time.strftime('%Y-%m-%d %H:%M')}  {args.seconds:.0f}s of training each")
    for threads in args.threads.split(","):
        idle, busy, n = measure(threads, facts, args.seconds)
        print(f"training threads {threads:>7}: get p50 idle {idle:.0f} us, training {busy:.0f} us "
              f"({busy / idle:.2f}x, {n} gets)", flush=True)


if __name__ == "__main__":
    main()
