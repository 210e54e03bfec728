"""``fuse``: merge near-duplicate plaintext memories, and adapters that hold overlapping facts.

**Near duplicates** are memories of one cube whose word sets (lower-cased,
punctuation dropped) have a Jaccard similarity of at least ``similarity``.
Pairs are found exactly, without comparing all of them, by prefix filtering
(Bayardo et al., "Scaling up all pairs similarity search", 2007): with words
ordered rarest first, two sets that reach the threshold share a word among
the first ``|x| - ceil(t·|x|) + 1`` of each. A group holds memories that are
all near duplicates of each other (a chain is not a group). Each group is
merged (``merge``, at the versions read) into one memory whose sources list
them all; they are archived in the same commit, so rolling it back restores
them exactly.

**Adapters** (parameter memories) of one model whose facts overlap by at
least ``adapter_overlap`` (Jaccard) are fused (``fuse``, a job); once the
fused adapter exists, a later run archives the adapters it was made from.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from collections.abc import Sequence

from pydantic import Field

from .spec import Action, Context, Plan, Policy, Settings, hookimpl, running

_WORD = re.compile(r"\w+")


class FuseSettings(Settings):
    similarity: float = Field(0.8, gt=0, le=1)  # word-set Jaccard of near duplicates
    max_merges: int = Field(100, ge=0)  # per run
    adapter_overlap: float = Field(0.5, gt=0, le=1)  # facts Jaccard of adapters worth fusing
    type: str = "plaintext"


def words(text: str | None) -> frozenset[str]:
    return frozenset(_WORD.findall((text or "").lower()))


def jaccard(a: frozenset[str], b: frozenset[str]) -> float:
    return len(a & b) / len(a | b) if a or b else 1.0


def near_duplicates(texts: dict[str, str | None], threshold: float) -> list[list[str]]:
    """Groups (two or more ids) of texts whose every pair has word-set Jaccard >= ``threshold``.

    Pairs are found exactly by prefix filtering; a group grows only by texts similar to all of
    its members, so a chain (A like B, B like C, A unlike C) never merges A with C.
    """
    sets = {i: words(t) for i, t in texts.items()}
    sets = {i: w for i, w in sets.items() if w}
    freq = Counter(w for ws in sets.values() for w in ws)
    ordered = {i: sorted(ws, key=lambda w: (freq[w], w)) for i, ws in sets.items()}
    postings: dict[str, list[str]] = defaultdict(list)
    similar: dict[str, set[str]] = defaultdict(set)
    for i in sorted(sets, key=lambda i: (len(sets[i]), i)):  # smaller sets first: each pair seen once
        ws = ordered[i]
        prefix = ws[: len(ws) - math.ceil(threshold * len(ws)) + 1]
        seen: set[str] = set()
        for w in prefix:
            for j in postings[w]:
                if j not in seen:
                    seen.add(j)
                    if jaccard(sets[i], sets[j]) >= threshold:
                        similar[i].add(j)
                        similar[j].add(i)
            postings[w].append(i)
    groups = []
    taken: set[str] = set()
    for i in sorted(similar):
        if i in taken:
            continue
        group = [i]
        for j in sorted(similar[i] - taken):
            if all(j in similar[g] for g in group):
                group.append(j)
        if len(group) > 1:
            taken.update(group)
            groups.append(sorted(group))
    return sorted(groups)


class Fuse(Policy):
    name = "fuse"
    description = "merge near-duplicate plaintext memories (originals archived); fuse overlapping adapters"
    settings_model = FuseSettings
    settings: FuseSettings

    def propose(self, ctx: Context) -> Plan:
        s = self.settings
        looked = {"memories": 0, "adapters": 0}
        actions: list[Action] = []
        for cube in ctx.cubes():
            texts: dict[str, str | None] = {}
            versions: dict[str, int] = {}
            for m in ctx.memories(cube, type=s.type):
                if m.blob is None:
                    texts[m.id], versions[m.id] = m.text, m.version
            looked["memories"] += len(texts)
            for group in near_duplicates(texts, s.similarity):
                if len(actions) >= s.max_merges:
                    break
                if len(group) > 100:
                    group = group[:100]  # merge's limit; the rest join at the next run
                actions.append(Action(op="merge", args={"cube": cube, "ids": group,
                                                        "expected_versions": [versions[i] for i in group]},
                                      reason=self._why([texts[i] for i in group])))
            adapters = ctx.call("adapters", cube=cube)
            looked["adapters"] += len(adapters)
            active = {m.id for m in ctx.memories(cube, type="parameter")}
            actions += self._adapters(ctx, cube, adapters, active)
        return Plan(looked_at=looked, actions=actions)

    def _why(self, group: Sequence[str | None]) -> str:
        sets = [words(text) for text in group]
        least = min(jaccard(a, b) for k, a in enumerate(sets) for b in sets[k + 1:])
        return (f"{len(group)} near-duplicate memories (word-set Jaccard >= {self.settings.similarity:g}; "
                f"least similar pair {least:.2f})")

    def _adapters(self, ctx: Context, cube: str, adapters: list[dict], active: set[str]) -> list[Action]:
        s = self.settings
        adapters = [a for a in adapters if a["memory_id"] in active]
        actions = []
        fused_from: set[str] = set()
        for a in adapters:  # adapters already fused into an active one: archive them
            if a["fused"]:
                fused_from |= {src["memory_id"] for src in a["sources"]}
        for a in adapters:
            if a["memory_id"] in fused_from:
                actions.append(Action(op="update", args={"cube": cube, "id": a["memory_id"], "status": "archived"},
                                      reason="fused into a newer adapter"))
        fresh = [a for a in adapters if not a["stale"] and a["memory_id"] not in fused_from]
        if running(ctx, cube, "fuse"):
            return actions
        taken: set[str] = set()
        for k, a in enumerate(fresh):
            if a["memory_id"] in taken:
                continue
            facts_a = frozenset(f["memory_id"] for f in a["facts"])
            group = [a]
            for b in fresh[k + 1:]:
                if b["memory_id"] not in taken and b["model"] == a["model"] and len(group) < 16:
                    if jaccard(facts_a, frozenset(f["memory_id"] for f in b["facts"])) >= s.adapter_overlap:
                        group.append(b)
            if len(group) > 1:
                taken |= {g["memory_id"] for g in group}
                actions.append(Action(op="fuse", args={"cube": cube, "ids": [g["memory_id"] for g in group]},
                                      reason=f"{len(group)} adapters of one model whose facts overlap by at least "
                                             f"{s.adapter_overlap:g}"))
        return actions


@hookimpl
def memos_policies() -> list[type[Policy]]:
    return [Fuse]
