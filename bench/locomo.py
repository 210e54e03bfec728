"""LoCoMo evidence recall through memosd.

Ingests each conversation of a LoCoMo-format file into its own cube (one memory
per dialogue turn: speaker, text, image caption and session date as metadata),
asks every question of categories 1-4 through the daemon's ``search``, and
scores evidence recall@k as the LoCoMo paper does: the fraction of a
question's evidence turns found among the top k, averaged over questions.

Only what a user's memory would hold is used: the turns. The dataset's
``observation``, ``session_summary`` and ``event_summary`` fields are never read.

Usage: python bench/locomo.py [--data PATH] [--socket PATH]
(without --socket a private memosd is started on a temporary store)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import memosd  # bench/memosd.py
from memos.client import Client
from memos.extraction import messages_to_memories

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "locomo" / "locomo_dev.json"
KS = (5, 10, 25)
CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop"}


def turns_of(conversation: dict) -> list[dict]:
    """One memory per turn (the default extraction); sessions are the list-valued session_N keys."""
    out = []
    sessions = sorted((int(k.split("_")[1]), k) for k, v in conversation.items()
                      if re.fullmatch(r"session_\d+", k) and isinstance(v, list))
    for number, key in sessions:
        messages = [{"speaker": t["speaker"], "text": t["text"], "caption": t.get("blip_caption"),
                     "id": t["dia_id"]} for t in conversation[key]]
        out += messages_to_memories(messages, session=str(number), date=conversation.get(f"{key}_date_time"),
                                    tags=["locomo"])
    return out


def evidence_of(qa: dict, known: set[str]) -> set[str]:
    """Evidence dia_ids that exist; malformed entries like 'D8:6; D9:17' are split."""
    ids = set()
    for entry in qa.get("evidence") or []:
        for token in re.split(r"[;,\s]+", str(entry)):
            if token in known:
                ids.add(token)
    return ids


class Daemon:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="memos-locomo-", dir="/tmp"))
        os.chmod(self.root, 0o700)
        self.socket = str(self.root / "memosd.sock")
        self.proc = memosd.spawn(self.root / "data", self.socket, timeout=60)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--socket", help="use a running memosd instead of starting one")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()
    samples = json.loads(args.data.read_text())
    daemon = None if args.socket else Daemon()
    client = Client(args.socket or daemon.socket, timeout=600)
    hits: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    ingest_s = query_s = 0.0
    turns_total = questions = 0
    try:
        for sample in samples:
            cube = f"locomo-{sample['sample_id']}-{int(time.time() * 1000) % 100000}"
            client.cube_create(cube)
            turns = turns_of(sample["conversation"])
            start = time.perf_counter()
            memories = []
            for chunk in range(0, len(turns), 1000):
                memories += client.add_many(cube, turns[chunk:chunk + 1000])
            ingest_s += time.perf_counter() - start
            turns_total += len(turns)
            by_memory = {m.id: m.metadata["message_id"] for m in memories}
            known = set(by_memory.values())
            for qa in sample["qa"]:
                if qa.get("category") not in CATEGORIES:
                    continue
                evidence = evidence_of(qa, known)
                if not evidence:
                    continue
                start = time.perf_counter()
                results = client.search(cube, str(qa["question"]), k=max(KS))
                query_s += time.perf_counter() - start
                questions += 1
                ranked = [r.memory.metadata.get("message_id") for r in results]
                for k in KS:
                    found = len(evidence & set(ranked[:k])) / len(evidence)
                    hits["overall"][k].append(found)
                    hits[CATEGORIES[qa["category"]]][k].append(found)
    finally:
        if daemon:
            daemon.stop()
    print(f"# bench/locomo.py  {time.strftime('%Y-%m-%d %H:%M')}  data={args.data.name}  "
          f"conversations={len(samples)} turns={turns_total} questions={questions}")
    print(f"{'':<12} {'n':>5} " + " ".join(f"{'R@' + str(k):>7}" for k in KS))
    table = {}
    for name in ["overall", *CATEGORIES.values()]:
        row = {k: 100 * sum(v) / len(v) for k, v in hits[name].items()}
        table[name] = {"n": len(hits[name][KS[0]]), **{f"recall@{k}": round(row[k], 1) for k in KS}}
        print(f"{name:<12} {len(hits[name][KS[0]]):>5} " + " ".join(f"{row[k]:7.1f}" for k in KS))
    print(f"ingest: {ingest_s:.1f} s for {turns_total} turns ({1000 * ingest_s / turns_total:.1f} ms/turn, "
          f"embedding included); search: {1000 * query_s / max(questions, 1):.1f} ms/query (p50 not shown: "
          "mean over all questions, query embedding included)")
    if args.json:
        print(json.dumps(table))


if __name__ == "__main__":
    main()
