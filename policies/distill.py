"""``distill``: a stable, frequently read set of plaintext memories becomes a parameter memory.

Memories read at least ``min_reads`` times and unchanged for ``stable_s`` are
distilled into a LoRA adapter (``distill``, a background job in a low-priority
process), when a model is ready, the machine is idle enough (load per CPU at
most ``max_load``) and no fresh adapter already holds them all.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from .spec import Action, Context, Plan, Policy, Settings, hookimpl, reads, running


class DistillSettings(Settings):
    min_reads: int = Field(10, ge=1)
    stable_s: float = Field(86_400, ge=0)  # unchanged this long
    min_memories: int = Field(4, ge=1)
    max_memories: int = Field(64, ge=1, le=10_000)
    max_load: float = Field(0.5, gt=0)  # 1-minute load average per CPU above this: not now
    model: str | None = None  # default: the [activation] default model
    recipe: dict[str, Any] | None = None  # overrides of [parameter] recipe for these distillations


class Distill(Policy):
    name = "distill"
    description = "distill stable, frequently read memories into a LoRA adapter when the machine is idle"
    settings_model = DistillSettings
    settings: DistillSettings

    def propose(self, ctx: Context) -> Plan:
        s = self.settings
        load = ctx.load()
        if load > s.max_load:
            return Plan(looked_at={"load": round(load, 2), "skipped": f"load per CPU above {s.max_load}"})
        models = [m for m in ctx.call("model_list") if m["prepared"] and not m["error"]
                  and (m["name"] == s.model if s.model is not None else m["default"])]
        if not models:
            return Plan(looked_at={"skipped": f"model {s.model or '(default)'} is not ready"})
        looked = 0
        actions = []
        for cube in ctx.cubes():
            stable = []
            for m in ctx.memories(cube, type="plaintext"):
                looked += 1
                if reads(m) >= s.min_reads and ctx.now - ctx.changed_at(m) >= s.stable_s:
                    stable.append(m)
            stable.sort(key=lambda m: (-reads(m), m.id))
            stable = stable[: s.max_memories]
            if len(stable) < s.min_memories:
                continue
            wanted = {m.id for m in stable}
            held = [a for a in ctx.call("adapters", cube=cube)
                    if not a["stale"] and a["model_name"] == models[0]["name"]
                    and wanted <= {f["memory_id"] for f in a["facts"]}]
            if held or running(ctx, cube, "distill"):
                continue
            args = {"cube": cube, "ids": sorted(wanted), "model": models[0]["name"]}
            if s.recipe:
                args["recipe"] = s.recipe
            actions.append(Action(op="distill", args=args, reason=(
                f"{len(stable)} memories read at least {s.min_reads} times and unchanged for "
                f"{s.stable_s / 3600:g} h, not all in a fresh adapter; load per CPU {load:.2f}")))
        return Plan(looked_at={"memories": looked, "load": round(load, 2)}, actions=actions)


@hookimpl
def memos_policies() -> list[type[Policy]]:
    return [Distill]
