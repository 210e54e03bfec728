"""Model benchmark: SmolLM2 load time, and a stored KV prefix against prefilling it again.

    python bench/models.py [--lengths 512,1024,2048] [--question 32] [--repeats 3] [--threads N]

For each prefix length N: the next-token logits after N + Q tokens computed in
one pass, against restoring the N-token prefix from its safetensors bytes and
running only the Q-token question on it (the bytes are read in the timed part;
making them is not). Also the size of the stored prefix and the largest logit
difference between the two ways, with the prefix stored in float32 and in
bfloat16. Medians of ``--repeats`` runs; prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from memos.plugins import models  # noqa: E402

TEXT = ("Memory is the faculty of the mind by which data or information is encoded, stored, "
        "and retrieved when needed. It is the retention of information over time for the purpose "
        "of influencing future action. ")


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--lengths", default="512,1024,2048")
    parser.add_argument("--question", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    import torch

    from memos.plugins.models.kv import KVCache

    spec = models.DEFAULT_MODELS["smollm2"].model_copy(update={"threads": args.threads})
    start = time.perf_counter()
    lm = models.load("smollm2", spec)
    load_s = time.perf_counter() - start
    unit = lm.tokenize(TEXT)
    question = (lm.tokenize("What is memory for, and how long does it last? ") * 8)[:args.question]
    lm.logits(question)  # warm up
    print(f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, "
          f"Python {platform.python_version()}, torch {torch.__version__}")
    print(f"load SmolLM2 from its prepared folder: {load_s:.2f} s (identity hash included)\n")
    print("| prefix | full prefill + question | restore bytes + question | saved | stored bytes "
          "| max diff fp32 | max diff bf16 |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in (int(x) for x in args.lengths.split(",")):
        prefix = (unit * (n // len(unit) + 1))[:n]
        full_s, full = timed(lambda p=prefix: lm.logits(p + question), args.repeats)
        data = lm.prefill(prefix).to_safetensors()
        half = KVCache.from_safetensors(data).astype("bfloat16").to_safetensors()
        cached_s, cached = timed(lambda d=data: lm.logits(question, prefix=KVCache.from_safetensors(d, expect=lm)),
                                 args.repeats)
        bf16 = lm.logits(question, prefix=KVCache.from_safetensors(half, expect=lm))
        print(f"| {n:,} | {full_s * 1000:,.0f} ms | {cached_s * 1000:,.0f} ms | {1 - cached_s / full_s:.1%} "
              f"| {len(data) / 1e6:.1f} MB ({len(half) / 1e6:.1f} MB bf16) "
              f"| {(full - cached).abs().max().item():.1e} | {(full - bf16).abs().max().item():.3f} |")


if __name__ == "__main__":
    main()
