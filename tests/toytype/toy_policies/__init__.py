"""Policies of the tests, registered by entry point like any third party's (``memos.policies``)."""

from __future__ import annotations

import time

from pydantic import Field

from memos.errors import MemosError
from memos.policies.spec import Action, Context, Plan, Policy, Settings, hookimpl


class Explode(Policy):
    """Always fails: a bug in a policy must fail its own run and nothing else."""

    name = "explode"
    description = "raises"

    def propose(self, ctx: Context) -> Plan:
        raise RuntimeError("this policy always fails")


class SleepySettings(Settings):
    sleep_s: float = Field(0.0, ge=0)


class Sleepy(Policy):
    """Takes its time and records when it ran: runs of one policy must never overlap."""

    name = "sleepy"
    description = "sleeps"
    settings_model = SleepySettings
    settings: SleepySettings

    def propose(self, ctx: Context) -> Plan:
        start = time.time()
        time.sleep(self.settings.sleep_s)
        return Plan(looked_at={"start": start, "end": time.time()})


class Meddle(Policy):
    """Proposes what a policy may not do, and a malformed request, beside a valid one."""

    name = "meddle"
    description = "asks for too much"

    def propose(self, ctx: Context) -> Plan:
        cubes = ctx.cubes()
        calls = {}
        for op, args in (("agent_add", {"name": "eve"}), ("audit_tail", {}), ("rollback_approve", {"id": "0" * 26}),
                         ("jobs", {})):
            try:
                ctx.call(op, **args)
                calls[op] = "ok"
            except MemosError as exc:
                calls[op] = exc.code
        return Plan(looked_at={"cubes": len(cubes), "calls": calls}, actions=[
            Action(op="agent_add", args={"name": "mallory"}, reason="not a cube's business"),
            Action(op="cube_grant", args={"cube": cubes[0], "agent": "mallory", "role": "admin"},
                   reason="access is people's business"),
            Action(op="add", args={"cube": cubes[0], "text": 7}, reason="malformed"),
            Action(op="history", args={"cube": cubes[0]}, reason="a read is no action"),
            Action(op="add", args={"cube": cubes[0], "text": "a note from a policy"}, reason="valid"),
        ])


@hookimpl
def memos_policies() -> list[type[Policy]]:
    return [Explode, Sleepy, Meddle]
