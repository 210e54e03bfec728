"""Time to first token with and without activation memory, through memosd, on SmolLM2-135M.

For each memory size (default 512, 1,024 and 2,048 tokens of memory
preamble) a cube of synthetic facts is filled until its preamble reaches the
size, and activated (one activation memory: the KV cache of the preamble).
Then a 32-token question is asked through ``Client.generate`` with one new
token, alternately:

* **full prompt**: ``use_activation=False``: every fact is written into the
  prompt and prefilled (``k`` covers them all; the reply's ``memories`` and
  ``prefill_tokens`` are checked to hold them);
* **activation**: the activation memory is read from LMDB, its sha256 and
  structure checked, loaded, and only the question is prefilled.

TTFT is measured in this process, from the request to the first streamed
token (``on_partial``): retrieval, the blob's load and the checks included.
Medians of ``--repeats`` runs each.

In this process, on the same preamble: the KV blob's size stored as fp32 and
as bf16, and the largest next-token logit difference bf16 storage adds
against the full prompt (fp32 storage: against the full prompt too).

Last, ``get`` p50 of a small memory through memosd while the daemon is idle,
and while a generation runs (a 2,048-token full prefill and 64 new tokens).

Usage: python bench/ttft.py [--sizes 512,1024,2048] [--repeats 5] [--question-tokens 32]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from memosd import spawn  # noqa: E402

from memos.client import Client  # noqa: E402
from memos.plugins.activation import preamble  # noqa: E402
from memos.plugins.models import DEFAULT_MODELS, load, model_folder, prepared_dir  # noqa: E402

NAMES = ["Ada", "Bo", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivo", "Jun", "Kai", "Lea"]
THINGS = ["bicycle", "violin", "passport", "garden key", "red notebook", "camera", "telescope", "kayak"]
PLACES = ["the garage", "the attic", "a drawer in the kitchen", "the office safe", "the boat shed",
          "the blue cupboard", "the cellar", "the car's glove box"]


def facts_for(tokenizer, target: int) -> list[str]:
    """Synthetic facts until their preamble is at least ``target`` tokens."""
    out: list[str] = []
    i = 0
    while True:
        i += 1
        out.append(f"Fact {i}: {NAMES[i % len(NAMES)]} keeps the {THINGS[i % len(THINGS)]} "
                   f"number {i} in {PLACES[(i * 3) % len(PLACES)]}.")
        if preamble_tokens(tokenizer, out) >= target:
            return out


def preamble_tokens(tokenizer, texts: list[str]) -> int:
    return len(tokenizer.apply_chat_template(preamble.preamble_messages(texts), tokenize=True,
                                             add_generation_prompt=False, return_dict=False))


def question_of(tokenizer, n: int) -> str:
    """A question of about ``n`` tokens (as the user turn's text)."""
    words = "Please tell me exactly where Ada keeps the bicycle number eight and who else keeps one".split()
    text = ""
    for word in words * 4:
        candidate = f"{text} {word}".strip()
        if len(tokenizer(candidate + "?", add_special_tokens=False)["input_ids"]) > n:
            break
        text = candidate
    return text + "?"


def timed_generate(client: Client, cube: str, question: str, **kw) -> tuple[float, dict]:
    """(seconds to the first streamed token, the reply)."""
    start = time.perf_counter()
    first: list[float] = []

    def on_partial(part: dict) -> None:
        if not first:
            first.append(time.perf_counter())

    reply = client.generate(cube, question, max_tokens=1, on_partial=on_partial, **kw)
    return (first[0] if first else time.perf_counter()) - start, reply


def wait_job(client: Client, job_id: str, timeout: float = 600.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = next(j for j in client.jobs() if j["id"] == job_id)
        if job["state"] != "running":
            if job["state"] != "done":
                raise SystemExit(f"job {job_id} ended {job['state']}: {job.get('error')}")
            return job
        time.sleep(0.1)
    raise SystemExit(f"job {job_id} still running after {timeout}s")


def kv_figures(folder: Path, texts: list[str], question: str) -> dict:
    """Blob sizes fp32/bf16 and the logit error each adds, in process."""
    lm = load("smollm2", DEFAULT_MODELS["smollm2"])
    with lm.lock:
        pre = lm.chat_ids(preamble.preamble_messages(texts), add_generation_prompt=False)
        full = lm.chat_ids(preamble.chat(texts, [], question))
        assert full[:len(pre)] == pre, "the preamble must start the chat"
        rest = full[len(pre):]
        cache = lm.prefill(pre)
        reference = lm.logits(full)
        out = {}
        for dtype in ("float32", "bfloat16"):
            blob = cache.astype(dtype).to_safetensors()
            restored = type(cache).from_safetensors(blob)
            diff = (lm.logits(rest, prefix=restored).float() - reference.float()).abs().max().item()
            out[dtype] = {"bytes": len(blob), "max_logit_diff": diff}
        out["tokens"] = len(pre)
    return out


def get_latency(client: Client, cube: str, memory_id: str, n: int) -> float:
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        client.get(cube, memory_id)
        lat.append(time.perf_counter() - t)
    return statistics.median(lat) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="512,1024,2048")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--question-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    folder = model_folder("smollm2", DEFAULT_MODELS["smollm2"], prepared_dir())
    if not folder.exists():
        raise SystemExit(f"SmolLM2 is not prepared at {folder}: python -m memos.plugins.models.prepare smollm2")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    question = question_of(tokenizer, args.question_tokens)
    began = time.time()
    print(f"# bench/ttft.py  {time.strftime('%Y-%m-%d %H:%M', time.localtime(began))}  {platform.machine()} "
          f"cpus={os.cpu_count()} python={platform.python_version()} model=smollm2 fp32 threads={args.threads}",
          flush=True)
    print(f"question: {len(tokenizer(question, add_special_tokens=False)['input_ids'])} tokens: {question!r}")

    root = Path(tempfile.mkdtemp(prefix="memos-ttft-", dir="/tmp"))
    os.chmod(root, 0o700)
    (root / "run").mkdir(mode=0o700)
    socket = str(root / "run" / "memosd.sock")
    env = {"MEMOS_SEARCH__EMBEDDER": "hashing", "MEMOS_ACTIVATION__THREADS": str(args.threads)}
    proc = spawn(root / "data", socket, env)
    client = Client(socket, timeout=600, retries=0)
    rows = []
    try:
        for size in sizes:
            cube = f"ttft-{size}"
            texts = facts_for(tokenizer, size)
            client.cube_create(cube)
            client.add_many(cube, texts)
            job = client.activate(cube)
            wait_job(client, job["id"])
            [act] = client.activations(cube)
            full_s, cached_s = [], []
            reply_full = reply_cached = None
            timed_generate(client, cube, question, k=len(texts))  # warm: the model is loaded once
            for _ in range(args.repeats):
                t, reply_full = timed_generate(client, cube, question, use_activation=False, k=len(texts))
                full_s.append(t)
                t, reply_cached = timed_generate(client, cube, question, k=len(texts))
                cached_s.append(t)
            assert reply_cached["activation"] == act["memory_id"], reply_cached
            assert reply_full["activation"] is None
            assert sum(m["how"] == "prompt" for m in reply_full["memories"]) == len(texts), "full prompt lacks facts"
            full, cached = statistics.median(full_s), statistics.median(cached_s)
            rows.append((size, act["tokens"], len(texts), reply_full["timings"]["prefill_tokens"],
                         reply_cached["timings"]["prefill_tokens"], reply_cached["timings"]["cached_tokens"],
                         full * 1000, cached * 1000, 100 * (1 - cached / full)))
            print(f"[{time.time() - began:7.1f}s] {size}: full {full * 1000:.0f} ms, activation "
                  f"{cached * 1000:.0f} ms ({100 * (1 - cached / full):.1f}% less)", flush=True)

        # get p50, idle vs during a generation.
        client.cube_create("ttft-get")
        small = client.add("ttft-get", "a small memory to read back")
        reader = Client(socket, timeout=60)
        idle = get_latency(reader, "ttft-get", small.id, 2000)
        busy_cube = f"ttft-{max(sizes)}"
        n_busy = len(facts_for(tokenizer, max(sizes)))
        done = threading.Event()
        lat_busy: list[float] = []

        def generate_long() -> None:
            try:
                Client(socket, timeout=600, retries=0).generate(busy_cube, question, use_activation=False,
                                                                k=n_busy, max_tokens=64)
            finally:
                done.set()

        thread = threading.Thread(target=generate_long)
        thread.start()
        time.sleep(0.2)
        while not done.is_set():
            t = time.perf_counter()
            reader.get("ttft-get", small.id)
            lat_busy.append(time.perf_counter() - t)
        thread.join()
        busy = statistics.median(lat_busy) * 1e6
    finally:
        client.close()
        proc.terminate()
        proc.wait(60)
        shutil.rmtree(root, ignore_errors=True)

    kv = kv_figures(folder, facts_for(tokenizer, max(sizes)), question)

    print(f"# bench/ttft.py  total {time.time() - began:.0f}s")
    print("memory tokens  facts  prefill full  prefill act  cached  TTFT full ms  TTFT act ms  TTFT cut")
    for size, tokens, n, pf, pa, cached, full, act, cut in rows:
        print(f"{tokens:>13,}  {n:>5}  {pf:>12,}  {pa:>11,}  {cached:>6,}  {full:>12.0f}  {act:>11.0f}  {cut:>7.1f}%")
    print(f"KV blob of {kv['tokens']:,} tokens: fp32 {kv['float32']['bytes'] / 2**20:.1f} MiB "
          f"(max logit diff vs full prompt {kv['float32']['max_logit_diff']:.2e}), "
          f"bf16 {kv['bfloat16']['bytes'] / 2**20:.1f} MiB (max logit diff {kv['bfloat16']['max_logit_diff']:.2e})")
    print(f"get p50: idle {idle:.0f} us, during a generation {busy:.0f} us ({busy / idle:.2f}x, "
          f"{len(lat_busy)} gets)")
    last = rows[-1]
    print(f"target: TTFT cut at {last[0]:,} tokens >= 90%: {last[-1]:.1f}% {'met' if last[-1] >= 90 else 'missed'}")


if __name__ == "__main__":
    main()
