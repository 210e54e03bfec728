"""`get` latency through memosd while policies run (and while a distillation trains), against idle, in one run.

One memosd (MiniLM off: the hashing embedder; SmolLM2-135M for the
distillation when prepared, else nothing is distilled) holds a cube of
``--memories`` plaintext memories, a tenth of them near-duplicate pairs, each
read once. ``get`` of a small memory is timed from one client, paced 10 ms
apart (as an agent asks), for ``--seconds`` in each phase:

* ``idle``: nothing else runs;
* ``policies``: another client runs ``fuse`` (the first run merges the
  duplicates), ``decay``, ``promote`` and ``distill`` back to back, real runs,
  the whole time: each scans every memory of every cube (nothing is hot
  enough to start a KV cache build or a training);
* ``distill``: a distillation of 32 TOFU facts trains (its steps running);
* ``both``: the policy runs and the distillation together.

It prints p50 and p99 per phase and the ratio of p50 to idle's (target: at
most 2x), and how many policy runs each phase saw and how long they took.

Usage: python bench/scheduler.py [--memories 5000] [--seconds 30] [--duty-cycle 0.5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import multiprocessing
import queue
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lora import DATA, timed_gets  # noqa: E402
from memosd import spawn  # noqa: E402

from memos.client import Client  # noqa: E402
from memos.plugins.models import MARKER, prepared_dir  # noqa: E402

# Every policy scans every memory each run; promote and distill find nothing hot enough (the
# timed memory is read thousands of times), so the policy phase measures the runs themselves
# (the first fuse run merges the duplicates, one commit each), not the KV cache builds and
# trainings they would start: the distill phase measures a training.
POLICIES = """
[promote]
min_reads = 1000000000
[demote]
[distill]
min_reads = 1000000000
max_load = 1000.0
[fuse]
[decay]
"""
RUN = ("fuse", "decay", "promote", "distill")


def _loop(socket: str, stop: Any, runs: Any) -> None:
    """Runs the policies back to back until ``stop`` is set (in a process of its own, so that its
    client's work does not share an interpreter with the client being timed)."""
    client = Client(socket, timeout=600)
    while not stop.is_set():
        for name in RUN:
            t = time.perf_counter()
            done = client.policy_run(name)
            runs.put((name, time.perf_counter() - t, len(done.actions)))
            if stop.is_set():
                return


class PolicyLoop:
    def __init__(self, socket: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.stop, self.runs = ctx.Event(), ctx.Queue()
        self.proc = ctx.Process(target=_loop, args=(socket, self.stop, self.runs), daemon=True)
        self.proc.start()

    def finish(self) -> list[tuple[str, float, int]]:
        self.stop.set()
        out = []
        while self.proc.is_alive() or not self.runs.empty():
            try:
                out.append(self.runs.get(timeout=0.5))
            except queue.Empty:
                pass
        self.proc.join()
        return out


def phase(reader: Client, small: str, seconds: float) -> list[float]:
    out: list[float] = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        out += timed_gets(reader, "get", small, 20)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--memories", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--duty-cycle", type=float, default=0.5, dest="duty",
                        help="[scheduler] duty_cycle: the share of time a policy run computes")
    args = parser.parse_args()
    smol = (prepared_dir() / "smollm2" / MARKER).is_file()
    rows = [json.loads(line) for line in (DATA / "tofu_dev.jsonl").read_text().splitlines() if line.strip()]
    facts = [r for r in rows if r["split"] == "forget10_first300"][:32]

    root = Path(tempfile.mkdtemp(prefix="memos-scheduler-bench-"))
    (root / "policies.toml").write_text(f"[scheduler]\nduty_cycle = {args.duty}\n" + POLICIES)
    socket = str(root / "memosd.sock")
    env = {"MEMOS_SEARCH__EMBEDDER": "hashing", "MEMOS_DAEMON__POLICIES": str(root / "policies.toml")}
    if not smol:
        env["MEMOS_ACTIVATION__MODELS"] = "{}"
    proc = spawn(root / "data", socket, env=env)
    print(f"# bench/scheduler.py  {time.strftime('%Y-%m-%d %H:%M')}  {args.memories} memories, "
          f"{args.seconds:.0f} s a phase, duty cycle {args.duty:g}, "
          f"distillation: {'SmolLM2-135M' if smol else 'none (no model)'}")
    try:
        admin, reader = Client(socket, timeout=600), Client(socket, timeout=60)
        admin.cube_create("get")
        small = admin.add("get", "a small memory to read back").id
        admin.cube_create("notes")
        texts = [f"note {i}: the {['red', 'green', 'blue'][i % 3]} box {i * 7919 % 10007} is on shelf {i % 97}"
                 for i in range(args.memories)]
        texts += [t + "." for t in texts[: args.memories // 10]]  # near duplicates
        for start in range(0, len(texts), 1000):
            for m in admin.add_many("notes", texts[start:start + 1000]):
                if start == 0:
                    admin.get("notes", m.id)
        admin.cube_create("facts")
        admin.add_many("facts", [f"Q: {f['question']}\nA: {f['answer']}" for f in facts])

        results: dict[str, tuple[list[float], list]] = {}
        results["idle"] = (phase(reader, small, args.seconds), [])
        loop = PolicyLoop(socket)
        results["policies"] = (phase(reader, small, args.seconds), loop.finish())
        if smol:
            job = admin.distill("facts", recipe={"steps": 100_000, "stop_loss": 0.0})
            while next(j for j in admin.jobs() if j["id"] == job["id"])["detail"].get("step", 0) < 1:
                time.sleep(0.2)
            results["distill"] = (phase(reader, small, args.seconds), [])
            loop = PolicyLoop(socket)
            results["both"] = (phase(reader, small, args.seconds), loop.finish())
            admin.job_cancel(job["id"])
        idle = statistics.median(results["idle"][0])
        print(f"{'phase':<9} {'gets':>6} {'p50 us':>8} {'p99 us':>8} {'p50/idle':>9}  policy runs (median s)")
        for name, (times, runs) in results.items():
            p50 = statistics.median(times)
            p99 = sorted(times)[int(0.99 * (len(times) - 1))]
            per = {n: [d for m, d, _ in runs if m == n] for n in RUN}
            runs_text = ", ".join(f"{n} {len(d)}x {statistics.median(d):.2f}" for n, d in per.items() if d)
            print(f"{name:<9} {len(times):>6} {p50 * 1e6:>8.0f} {p99 * 1e6:>8.0f} {p50 / idle:>8.2f}x  {runs_text}",
                  flush=True)
    finally:
        proc.terminate()
        proc.wait(120)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
