"""``compact``: ask each cube with droppable versions to be compacted (``cube_compact``).

The retention rules (``[retention]`` in memosd.toml, or a cube's own ``cube_retention``) decide
what goes; this policy only notices where enough would go and asks, so the work happens through
the daemon's request path, audited as ``policy:compact``.
"""

from __future__ import annotations

from pydantic import Field

from .spec import Action, Context, Plan, Policy, Settings, hookimpl


class CompactSettings(Settings):
    min_versions: int = Field(1, ge=1)  # compact a cube once this many of its versions may go...
    min_bytes: int = Field(0, ge=0)  # ...or once this many blob bytes would be freed (0: versions decide)
    max_cubes: int = Field(100, ge=1)  # per run; the rest wait for the next one


class Compact(Policy):
    name = "compact"
    description = "drop the versions the retention rules let go, freeing blobs only they used"
    settings_model = CompactSettings
    settings: CompactSettings

    def propose(self, ctx: Context) -> Plan:
        s = self.settings
        looked, droppable, actions = 0, 0, []
        for cube in ctx.cubes():
            looked += 1
            plan = ctx.call("cube_compact_plan", cube=cube)
            droppable += plan["versions_dropped"]
            enough = plan["versions_dropped"] >= s.min_versions or (s.min_bytes and plan["bytes_freed"] >= s.min_bytes)
            if plan["versions_dropped"] and enough and len(actions) < s.max_cubes:
                actions.append(Action(
                    op="cube_compact", args={"cube": cube},
                    reason=f"{plan['versions_dropped']} versions droppable (threshold {s.min_versions}), "
                           f"{plan['bytes_freed']} blob bytes to free; oldest kept would be {plan['oldest_kept']}"))
        return Plan(looked_at={"cubes": looked, "versions_droppable": droppable}, actions=actions)


@hookimpl
def memos_policies() -> list[type[Policy]]:
    return [Compact]
