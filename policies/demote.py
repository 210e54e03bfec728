"""``demote``: drop activation memories (KV caches) that generation has not used for a while.

The cache is deleted (soft: its history stays, a rollback restores it); its
plaintext sources are untouched, so generation goes back to retrieving them
into the prompt, and ``promote`` may build a cache again when they are hot.
"""

from __future__ import annotations

from pydantic import Field

from .spec import Action, Context, Plan, Policy, Settings, hookimpl, last_used


class DemoteSettings(Settings):
    unused_s: float = Field(3 * 86_400, gt=0)  # an activation memory not injected this long is dropped
    type: str = "activation"


class Demote(Policy):
    name = "demote"
    description = "drop activation memories unused for a while back to their plaintext sources"
    settings_model = DemoteSettings
    settings: DemoteSettings

    def propose(self, ctx: Context) -> Plan:
        s = self.settings
        looked = 0
        actions = []
        for cube in ctx.cubes():
            for mem in ctx.memories(cube, type=s.type):
                looked += 1
                idle = ctx.now - last_used(ctx, mem)
                if idle >= s.unused_s:
                    actions.append(Action(
                        op="delete", args={"cube": cube, "id": mem.id, "expected_version": mem.version},
                        reason=f"not used for {idle / 3600:.1f} h (threshold {s.unused_s / 3600:g} h)"))
        return Plan(looked_at={"activation_memories": looked}, actions=actions)


@hookimpl
def memos_policies() -> list[type[Policy]]:
    return [Demote]
