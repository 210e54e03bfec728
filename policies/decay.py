"""``decay``: archive memories nobody has read (or changed) for a configured time.

Archived memories keep their history, are no longer searched or injected,
and come back with ``update --status active`` or a rollback.
"""

from __future__ import annotations

from pydantic import Field

from .spec import Action, Context, Plan, Policy, Settings, hookimpl, last_used


class DecaySettings(Settings):
    unused_s: float = Field(30 * 86_400, gt=0)  # unused this long (not read, not changed): archived
    types: list[str] = Field(default_factory=lambda: ["plaintext"])  # of these memory types
    max_actions: int = Field(1000, ge=1)  # per run; the rest wait for the next one


class Decay(Policy):
    name = "decay"
    description = "archive memories unused for a configured time (restorable, history kept)"
    settings_model = DecaySettings
    settings: DecaySettings

    def propose(self, ctx: Context) -> Plan:
        s = self.settings
        looked = 0
        actions = []
        for cube in ctx.cubes():
            for mem in ctx.memories(cube):
                if mem.type not in s.types:
                    continue
                looked += 1
                idle = ctx.now - last_used(ctx, mem)
                if idle >= s.unused_s and len(actions) < s.max_actions:
                    actions.append(Action(
                        op="update", args={"cube": cube, "id": mem.id, "status": "archived",
                                           "expected_version": mem.version},
                        reason=f"unused for {idle / 86_400:.1f} days (threshold {s.unused_s / 86_400:g})"))
        return Plan(looked_at={"memories": looked, "unused_s": s.unused_s}, actions=actions)


@hookimpl
def memos_policies() -> list[type[Policy]]:
    return [Decay]
