"""The policy contract: the pluggy hooks a policy plugin implements, and what a policy sees and returns.

A policy plugin is any importable object (usually a module) registered under
the entry-point group ``memos.policies``. The built-in ones are registered
exactly so in memos' own ``pyproject.toml``::

    [project.entry-points."memos.policies"]
    decay = "memos.policies.decay"

and implement the one hook, :meth:`PolicyHooks.memos_policies`, with
``@hookimpl``::

    from memos.policies.spec import hookimpl

    @hookimpl
    def memos_policies():
        return [Decay]

A :class:`Policy` never changes anything itself. The scheduler (in memosd)
calls :meth:`Policy.propose` with a :class:`Context`, a read-only view of the
cubes, their memories and read counts, and the read operations of the daemon;
the policy returns a :class:`Plan`: what it looked at and the
:class:`Action` s it proposes, each a request (an operation and its arguments)
with the reason for it. The scheduler then makes each request through the
same code paths as a client's, as the agent ``policy:<name>``, so every
change is checked, versioned and audited like any other, carries the policy
in its provenance, and can be rolled back. A dry run returns the plan
without making any request. Each run is recorded (``policy_history``).

Threads: ``propose`` runs on one of the scheduler's threads, never twice at
once for one policy; it may take seconds, not hours (start a job for longer work).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any, ClassVar

import pluggy
from pydantic import BaseModel, ConfigDict, Field

from memos.models import Memory

PROJECT = "memos"
GROUP = "memos.policies"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class PolicyHooks:
    """The hook specifications of memos' policy plugins."""

    @hookspec
    def memos_policies(self) -> list[type[Policy]]:  # type: ignore[empty-body]
        """The policy classes this plugin provides (each with a unique ``name``)."""


class Settings(BaseModel):
    """Base of a policy's thresholds: its section of ``etc/policies.toml``, unknown keys refused."""

    model_config = ConfigDict(extra="forbid")


class Action(BaseModel):
    """One request a policy proposes: a write or a job on a cube, and why."""

    model_config = ConfigDict(extra="forbid")

    op: str = Field(max_length=64)  # an operation of the daemon that writes or starts a job
    args: dict[str, Any]  # its arguments, as a client sends them (``cube`` among them)
    reason: str = Field(max_length=2000)  # for the run's record: the thresholds that were met


class Plan(BaseModel):
    """What a run looked at (counts, for the record) and what it proposes."""

    model_config = ConfigDict(extra="forbid")

    looked_at: dict[str, Any] = Field(default_factory=dict)
    actions: list[Action] = Field(default_factory=list)


class Context(ABC):
    """What a policy may read during one run. Everything is read as the policy's own agent."""

    now: float  # the daemon's clock (memos.clock) when the run started
    dry_run: bool

    @abstractmethod
    def cubes(self) -> list[str]:
        """Every cube's name."""

    @abstractmethod
    def memories(self, cube: str, type: str | None = None) -> Iterator[Memory]:
        """The cube's active memories (of ``type``), with their read counts (``usage``), a page at a
        time: keep what you need of them, not all of them (a cube may hold millions)."""

    @abstractmethod
    def changed_at(self, memory: Memory) -> float:
        """When the commit that made ``memory``'s current version was made (a rollback that restored it
        counts: its ``updated_at`` is restored with it). For memories from :meth:`memories`."""

    @abstractmethod
    def call(self, op: str, **args: Any) -> Any:
        """A read operation of the daemon (``activations``, ``adapters``, ``model_list``, ``jobs``,
        ``history``...), its result as plain data. Agents, the audit and policy runs are not for
        policies to read (``invalid_request``)."""

    def load(self) -> float:
        """The machine's load: the 1-minute load average per CPU (1.0: every CPU busy)."""
        return os.getloadavg()[0] / (os.cpu_count() or 1)


class Policy(ABC):
    """A rule that proposes changes from cube state and read counts."""

    name: ClassVar[str]  # unique; also the section of etc/policies.toml and the agent "policy:<name>"
    description: ClassVar[str]
    settings_model: ClassVar[type[Settings]] = Settings

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @abstractmethod
    def propose(self, ctx: Context) -> Plan:
        """Look at the cubes through ``ctx`` and propose actions. May raise: the run is recorded as failed."""


def last_used(ctx: Context, memory: Memory) -> float:
    """When a memory was last read or changed (or restored): what "unused for a while" measures from."""
    read = memory.usage.last_read if memory.usage is not None else None
    return max(read or 0.0, ctx.changed_at(memory))


def reads(memory: Memory) -> int:
    return memory.usage.reads if memory.usage is not None else 0


def running(ctx: Context, cube: str, kind: str) -> bool:
    """Whether a job of ``kind`` is under way on ``cube`` (so a run does not start it twice)."""
    return any(j["cube"] == cube and j["kind"] == kind and j["state"] == "running" for j in ctx.call("jobs"))
