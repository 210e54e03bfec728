"""Compare distillation recipes in this process, quickly: what the default recipe was chosen by.

Trains an adapter on the first N ``forget10_first300`` facts of
``../shared/data/tofu/tofu_dev.jsonl`` with SmolLM2-135M, the default
recipe with the keys given as JSON overridden, and prints, before and after:
the mean answer NLL on the N facts, on the first 40 ``retain_first300``
facts, on ``world_facts.json``, and the world multiple-choice accuracy
(the figures of bench/lora.py, less the daemon, the greedy answers and the
latency). One recipe per run; ``--skip-before`` when the base figures are known.

Usage: python bench/lora_recipe.py [--n 40] [--recipe '{"kl_weight": 1.0}'] [--skip-before]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lora import DATA  # noqa: E402

from memos.plugins.models import DEFAULT_MODELS, load  # noqa: E402
from memos.plugins.models.lora import answer_nll  # noqa: E402
from memos.plugins.models.recipe import Example, Recipe  # noqa: E402


def figures(lm, facts: list[dict], retain: list[dict], world: list[dict]) -> dict:
    right, world_nll = 0, []
    for w in world:
        scores = [answer_nll(lm, w["question"], a) for a in [w["answer"], *w["perturbed_answer"]]]
        world_nll.append(scores[0])
        right += scores[0] < min(scores[1:])
    return {"facts_nll": round(statistics.fmean(answer_nll(lm, f["question"], f["answer"]) for f in facts), 3),
            "retain_nll": round(statistics.fmean(answer_nll(lm, f["question"], f["answer"]) for f in retain), 3),
            "world_nll": round(statistics.fmean(world_nll), 3), "world_mc": round(right / len(world), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=40)
    parser.add_argument("--recipe", default="{}")
    parser.add_argument("--skip-before", action="store_true")
    args = parser.parse_args()
    rows = [json.loads(line) for line in (DATA / "tofu_dev.jsonl").read_text().splitlines() if line.strip()]
    facts = [r for r in rows if r["split"] == "forget10_first300"][:args.n]
    retain = [r for r in rows if r["split"] == "retain_first300"][:40]
    world = [json.loads(line) for line in (DATA / "world_facts.json").read_text().splitlines() if line.strip()]
    recipe = Recipe.model_validate({**Recipe().model_dump(), **json.loads(args.recipe)})
    lm = load("smollm2", DEFAULT_MODELS["smollm2"])
    if not args.skip_before:
        print("before", figures(lm, facts, retain, world), flush=True)
    started = time.perf_counter()
    adapter, report = lm.train_adapter([Example(kind="qa", question=f["question"], answer=f["answer"])
                                        for f in facts], recipe)
    print(f"trained {report['steps']} steps in {time.perf_counter() - started:.0f}s, final loss "
          f"{report['final_loss']}, recipe {json.dumps(recipe.model_dump(mode='json'))}", flush=True)
    with lm.adapter(adapter):
        print("after", figures(lm, facts, retain, world), flush=True)


if __name__ == "__main__":
    main()
