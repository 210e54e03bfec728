"""Parameter memory on SmolLM2-135M: distil TOFU facts into a LoRA adapter through memosd, before and after.

For each size N (default 40 and 150) the first N facts of the
``forget10_first300`` split are added to a cube as QA-shaped plaintext
memories (``Q: ...`` / ``A: ...``) and distilled with ``Client.distill``
(the daemon's default recipe, the default model), in the daemon's training
process. Reported, in one run, for the base model and for each adapter
(evaluated in this process with the stored adapter loaded onto the model):

* (i) mean answer NLL per token given the question (as a chat turn, no
  memory in the prompt) on the N distilled facts;
* (ii) the same on the 150 ``retain_first300`` facts, never distilled;
* (iii) on ``world_facts.json``: the answer NLL, and the multiple-choice
  accuracy (the true answer's NLL below every perturbed answer's);
* the contains-answer rate of greedy answers (48 new tokens) to (i): the
  reference answer, lower-cased with punctuation and spacing normalised,
  appears in the answer; and their mean ROUGE-L recall of the reference;
* training time per 100 facts (the job's wall time, model load included);
* ``get`` p50 through memosd while the daemon is idle and while it trains,
  the gets 10 ms apart in both (back-to-back gets keep the cores awake and
  hot, which no request pattern of an agent does).

Targets: NLL on (i) at least halved; world multiple-choice accuracy no more
than 3 points below the base model; ``get`` p50 during training at most 2x idle.

Usage: python bench/lora.py [--data PATH] [--world PATH] [--sizes 40,150] [--recipe JSON] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from memos.plugins.models import DEFAULT_MODELS, load  # noqa: E402
from memosd import spawn  # noqa: E402

from memos.client import Client  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "tofu"
GREEDY_TOKENS = 48


def normalise(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def rouge_l_recall(reference: str, answer: str) -> float:
    """Longest common subsequence of words over the reference's length."""
    ref, out = normalise(reference).split(), normalise(answer).split()
    if not ref:
        return 0.0
    row = [0] * (len(out) + 1)
    for r in ref:
        prev = 0
        for j, o in enumerate(out, 1):
            prev, row[j] = row[j], prev + 1 if r == o else max(row[j], row[j - 1])
    return row[-1] / len(ref)


def evaluate(lm, facts: list[dict], retain: list[dict], world: list[dict]) -> dict:
    """The figures of one model state (the adapter active or not) on the three sets."""
    from memos.plugins.models.lora import answer_nll

    with lm.lock:
        fact_nll = [answer_nll(lm, f["question"], f["answer"]) for f in facts]
        retain_nll = [answer_nll(lm, f["question"], f["answer"]) for f in retain]
        world_nll, right = [], 0
        for w in world:
            scores = [answer_nll(lm, w["question"], a) for a in [w["answer"], *w["perturbed_answer"]]]
            world_nll.append(scores[0])
            right += scores[0] < min(scores[1:])
        contains, recall = [], []
        for f in facts:
            ids = lm.chat_ids([{"role": "user", "content": f["question"]}])
            text = lm.generate(ids, None, GREEDY_TOKENS).text
            contains.append(normalise(f["answer"]) in normalise(text))
            recall.append(rouge_l_recall(f["answer"], text))
    return {"per_fact": {"nll": fact_nll, "contains": contains, "recall": recall},
            "retain_nll": statistics.fmean(retain_nll), "world_nll": statistics.fmean(world_nll),
            "world_mc": right / len(world), **on_first(fact_nll, contains, recall, len(facts))}


def on_first(nll: list[float], contains: list[bool], recall: list[float], n: int) -> dict:
    """The fact figures over the first ``n`` facts."""
    return {"facts_nll": statistics.fmean(nll[:n]), "contains": sum(contains[:n]) / n,
            "rouge_l_recall": statistics.fmean(recall[:n])}


PACE_S = 0.01  # between two gets, idle and while training alike: the same request pattern in both


def get_p50(client: Client, cube: str, memory_id: str, n: int) -> float:
    """``get`` p50 in us over ``n`` gets paced like those made while training."""
    return statistics.median(timed_gets(client, cube, memory_id, n)) * 1e6


def timed_gets(client: Client, cube: str, memory_id: str, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        client.get(cube, memory_id)
        times.append(time.perf_counter() - t)
        time.sleep(PACE_S)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DATA / "tofu_dev.jsonl")
    parser.add_argument("--world", type=Path, default=None, help="default: world_facts.json beside --data")
    parser.add_argument("--sizes", default="40,150")
    parser.add_argument("--recipe", default="{}", help="recipe keys to override, as JSON")
    parser.add_argument("--out", type=Path, help="write every figure as JSON here")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    world_path = args.world or args.data.parent / "world_facts.json"
    rows = [json.loads(line) for line in args.data.read_text().splitlines() if line.strip()]
    forget = [r for r in rows if r["split"] == "forget10_first300"]
    retain = [r for r in rows if r["split"] == "retain_first300"]
    world = [json.loads(line) for line in world_path.read_text().splitlines() if line.strip()]
    recipe = json.loads(args.recipe) or None
    began = time.time()
    print(f"# bench/lora.py  {platform.node()}  {platform.processor() or platform.machine()}  "
          f"{os.cpu_count()} cpus  {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    print(f"{len(forget)} forget facts, {len(retain)} retain facts, {len(world)} world questions", flush=True)

    from memos.plugins.models.lora import Adapter

    lm = load("smollm2", DEFAULT_MODELS["smollm2"])
    most = forget[:max(sizes)]
    base = evaluate(lm, most, retain, world)
    print(f"[{time.time() - began:7.1f}s] base model evaluated", flush=True)

    root = Path(tempfile.mkdtemp(prefix="memos-lora-"))
    socket = str(root / "memosd.sock")
    proc = spawn(root / "data", socket, env={"MEMOS_SEARCH__EMBEDDER": "hashing"})
    results = []
    try:
        client = Client(socket, timeout=120)
        reader = Client(socket, timeout=60)
        client.cube_create("lora-get")
        small = client.add("lora-get", "a small memory to read back")
        for n in sizes:
            cube = f"lora-{n}"
            client.cube_create(cube)
            client.add_many(cube, [f"Q: {f['question']}\nA: {f['answer']}" for f in forget[:n]])
            idle = get_p50(reader, "lora-get", small.id, 500)
            job = client.distill(cube, recipe=recipe)
            busy: list[float] = []
            while True:
                state = next(j for j in client.jobs() if j["id"] == job["id"])
                if state["state"] != "running":
                    break
                busy += timed_gets(reader, "lora-get", small.id, 20)
            assert state["state"] == "done", state
            seconds = state["finished"] - state["started"]
            [made] = client.adapters(cube)
            mem = client.get(cube, made["memory_id"])
            adapter = Adapter.from_safetensors(client.get_blob(cube, mem.blob.sha256))
            with lm.adapter(adapter):
                after = evaluate(lm, forget[:n], retain, world)
            per_fact = base["per_fact"]
            before = {**base, **on_first(per_fact["nll"], per_fact["contains"], per_fact["recall"], n)}
            results.append({"n": n, "before": before, "after": after, "seconds": seconds,
                            "per_100_facts_s": seconds * 100 / n, "get_p50_idle_us": idle,
                            "get_p50_training_us": statistics.median(busy) * 1e6, "gets_during": len(busy),
                            "report": made["report"], "size": made["size"]})
            print(f"[{time.time() - began:7.1f}s] N={n}: trained in {seconds:.0f}s, facts NLL "
                  f"{before['facts_nll']:.3f} -> {after['facts_nll']:.3f}", flush=True)
    finally:
        proc.terminate()
        proc.wait(120)
        shutil.rmtree(root, ignore_errors=True)

    print(f"\n# bench/lora.py  total {time.time() - began:.0f}s  recipe {json.dumps(results[0]['report']['recipe'])}")
    print("   N  facts NLL before/after  retain NLL before/after  world NLL before/after  world MC before/after  "
          "contains before/after  ROUGE-L before/after  s/100 facts  steps  get p50 idle/training")
    for r in results:
        b, a = r["before"], r["after"]
        print(f"{r['n']:>4}  {b['facts_nll']:>9.3f} / {a['facts_nll']:<9.3f}  {b['retain_nll']:>10.3f} / "
              f"{a['retain_nll']:<10.3f}  {b['world_nll']:>9.3f} / {a['world_nll']:<9.3f}  "
              f"{100 * b['world_mc']:>8.1f}% / {100 * a['world_mc']:<8.1f}%  "
              f"{100 * b['contains']:>7.1f}% / {100 * a['contains']:<7.1f}%  "
              f"{b['rouge_l_recall']:>9.2f} / {a['rouge_l_recall']:<9.2f}  "
              f"{r['per_100_facts_s']:>11.0f}  {r['report']['steps']:>5}  "
              f"{r['get_p50_idle_us']:.0f} / {r['get_p50_training_us']:.0f} us "
              f"({r['get_p50_training_us'] / r['get_p50_idle_us']:.2f}x)")
    for r in results:
        b, a = r["before"], r["after"]
        halved = a["facts_nll"] <= b["facts_nll"] / 2
        kept = 100 * (b["world_mc"] - a["world_mc"]) <= 3
        fast = r["get_p50_training_us"] <= 2 * r["get_p50_idle_us"]
        print(f"targets N={r['n']}: facts NLL halved {'met' if halved else 'missed'} "
              f"({a['facts_nll'] / b['facts_nll']:.2f}x); world MC within 3 points {'met' if kept else 'missed'} "
              f"({100 * (a['world_mc'] - b['world_mc']):+.1f}); get p50 <= 2x idle {'met' if fast else 'missed'} "
              f"({r['get_p50_training_us'] / r['get_p50_idle_us']:.2f}x)")
    if args.out:
        for r in results:
            r["before"].pop("per_fact", None)
            r["after"].pop("per_fact", None)
        args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
