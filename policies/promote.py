"""``promote``: plaintext memories that search and generation read often become an activation memory.

The hottest memories of a cube (read at least ``min_reads`` times, the last
time within ``window_s``) are prefilled once into a KV cache (``activate``),
so generation injects them instead of prefilling them again on every call.
Nothing is proposed while a fresh activation memory already holds them all.
"""

from __future__ import annotations

from pydantic import Field

from .spec import Action, Context, Plan, Policy, Settings, hookimpl, reads, running


class PromoteSettings(Settings):
    min_reads: int = Field(5, ge=1)  # reads (get, search, generation) that make a memory hot
    window_s: float = Field(7 * 86_400, gt=0)  # ...if the last of them is this recent
    min_memories: int = Field(1, ge=1)  # fewer hot memories than this: no activation memory
    max_memories: int = Field(32, ge=1, le=10_000)  # the hottest this many go into it
    model: str | None = None  # default: the [activation] default model


class Promote(Policy):
    name = "promote"
    description = "build an activation memory (KV cache) of the plaintext memories read most"
    settings_model = PromoteSettings
    settings: PromoteSettings

    def propose(self, ctx: Context) -> Plan:
        s = self.settings
        looked = 0
        actions = []
        for cube in ctx.cubes():
            hot = []
            for m in ctx.memories(cube, type="plaintext"):
                looked += 1
                if (reads(m) >= s.min_reads and m.usage is not None and m.usage.last_read is not None
                        and ctx.now - m.usage.last_read <= s.window_s):
                    hot.append(m)
            hot.sort(key=lambda m: (-reads(m), m.id))
            hot = hot[: s.max_memories]
            if len(hot) < s.min_memories:
                continue
            wanted = {m.id for m in hot}
            held = [a for a in ctx.call("activations", cube=cube)
                    if not a["stale"] and (s.model is None or a["model_name"] == s.model)
                    and wanted <= {src["memory_id"] for src in a["sources"]}]
            if held or running(ctx, cube, "activate"):
                continue
            args = {"cube": cube, "ids": sorted(wanted)}
            if s.model is not None:
                args["model"] = s.model
            actions.append(Action(op="activate", args=args, reason=(
                f"{len(hot)} memories read at least {s.min_reads} times within {s.window_s / 86_400:g} days "
                f"(most: {reads(hot[0])}), not all in a fresh activation memory")))
        return Plan(looked_at={"memories": looked}, actions=actions)


@hookimpl
def memos_policies() -> list[type[Policy]]:
    return [Promote]
