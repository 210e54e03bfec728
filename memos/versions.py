"""Versions: a cube's history, the diff of two versions, and rollback by a new commit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lmdb

from . import catalog, codec
from . import validation as check
from .access import Actor
from .core import Core
from .errors import Denied, NotFound
from .ledger import ABSENT
from .memories import _once, version_in
from .models import Change, Commit, Cube, DiffEntry, Memory, Role
from .writes import Applied, Write


class Versions:
    operations = catalog.VERSIONS_OPERATIONS

    def __init__(self, core: Core) -> None:
        self.core = core

    def history(self, actor: Actor, cube: str, *, memory_id: str | None = None,
                limit: int | None = None, before: int | None = None) -> list[Commit]:
        """Commits newest first; with ``memory_id``, only those that touched it.

        At most ``limit`` (itself at most ``max_page``); without one, all of them if they fit in
        a page, else ``too_large``: page with ``before``, the version of the last commit of a page.
        """
        core = self.core
        ledger = core.ledger

        def fn(txn: lmdb.Transaction) -> list[Commit]:
            found = core.require(txn, actor, cube, Role.read, shared=True)
            wanted_n = check.page(limit, core.limits, least=1)
            room = check.room(wanted_n, core.limits)
            hi = found.version if before is None else check.version(before, "before") - 1
            out: list[Commit] = []
            if memory_id is not None:
                wanted = check.memory_id(memory_id)
                versions = [v for v in ledger.memory_versions(txn, found.name, wanted) if v <= hi]
                if not versions and hi >= found.version:
                    raise NotFound(f"no memory {wanted} in cube {found.name!r}", memory=wanted)
                # A record whose commit compaction dropped still serves kept versions: it is not listed.
                versions = [v for v in versions if ledger.has_commit(txn, found.name, v)]
                versions.reverse()
                out = [ledger.commit(txn, found.name, v) for v in versions[:room]]
            else:
                for commit in ledger.commits(txn, found.name, 0, hi, newest_first=True):
                    if len(out) >= room:
                        break
                    out.append(commit)
            return check.bounded(out, wanted_n, core.limits, "commits", "before (the version of a page's last commit)")

        return self.core.read(actor, "history", cube, fn)

    def diff(self, actor: Actor, cube: str, v1: int, v2: int, *, limit: int | None = None,
             after: str | None = None) -> list[DiffEntry]:
        """What changed from version ``v1`` to ``v2`` (either order), in the order the memories were
        first touched. Paged like ``list``: at most ``limit``, continuing ``after`` a memory id."""
        core = self.core
        ledger = core.ledger

        def fn(txn: lmdb.Transaction) -> list[DiffEntry]:
            found = core.require(txn, actor, cube, Role.read, shared=True)
            a, b = version_in(found, v1, ledger, txn), version_in(found, v2, ledger, txn)
            wanted_n = check.page(limit, core.limits)
            room = check.room(wanted_n, core.limits)
            touched = ledger.touched_between(txn, found.name, min(a, b), max(a, b))
            if after is not None:
                start = check.memory_id(after)
                touched = touched[touched.index(start) + 1:] if start in touched else []
            out: list[DiffEntry] = []
            for memory_id in touched:
                if len(out) >= room:
                    break
                old = ledger.state_at(txn, found.name, memory_id, a)
                new = ledger.state_at(txn, found.name, memory_id, b)
                if (old and old[1]) == (new and new[1]):
                    continue
                before = Memory.from_state_bytes(old[1], old[0]) if old else None
                after_ = Memory.from_state_bytes(new[1], new[0]) if new else None
                change = "added" if before is None else "removed" if after_ is None else "modified"
                out.append(DiffEntry(memory_id=memory_id, change=change, before=before, after=after_))
            return check.bounded(out, wanted_n, core.limits, "memories differ", "after (the last memory id of a page)")

        return core.read(actor, "diff", cube, fn)

    def write_rollback(self, actor: Actor, cube: Any, to_version: Any,
                       memory_ids: Sequence[str] | None = None, request_id: str | None = None) -> Write:
        """Restore the cube (or chosen memories) to ``to_version`` by a new commit.

        Governed: the rules (:mod:`memos.governance`) must let ``actor`` roll this cube back directly.
        """
        core = self.core
        memory_ids = _once(memory_ids)

        def fn(txn: lmdb.Transaction) -> Applied:
            found = core.require(txn, actor, cube, Role.admin)
            mode = core.governance.rollback_mode(found.name, actor.name)
            if mode != "direct":
                raise Denied(
                    f"agent {actor.name!r} may not roll back cube {found.name!r} directly"
                    + (": propose it (rollback_propose) for another admin to approve" if mode == "propose" else ""),
                    cube=found.name, agent=actor.name, rule=mode,
                )
            target = version_in(found, to_version, core.ledger, txn)
            plan = rollback_plan(core, txn, found, target, memory_ids)
            info = {"to_version": target, "memory_ids": None if memory_ids is None else list(memory_ids)}
            return apply_plan(core, txn, actor, found, target, plan, info)

        return Write(actor, "rollback", cube, fn, request_id)


Step = tuple[str, bytes, bytes]  # memory id, its state now, the state it returns to (ABSENT: none)


def rollback_plan(core: Core, txn: lmdb.Transaction, found: Cube, target: int,
                  memory_ids: Any = None) -> list[Step]:
    """What restoring ``found`` (or ``memory_ids`` in it) to version ``target`` changes, in id order."""
    ledger = core.ledger
    touched = ledger.touched_between(txn, found.name, target, found.version)
    if memory_ids is not None:
        chosen = {check.memory_id(m) for m in check.ids(memory_ids, core.limits, "memory_ids")}
        for memory_id in sorted(chosen):
            if not ledger.memory_versions(txn, found.name, memory_id):
                raise NotFound(f"no memory {memory_id} in cube {found.name!r}", memory=memory_id)
        touched = [m for m in touched if m in chosen]
    plan = []
    for memory_id in touched:
        old = ledger.state_at(txn, found.name, memory_id, target)
        now = ledger.head(txn, found.name, memory_id)
        old_state = old[1] if old else ABSENT
        now_state = now[1] if now else ABSENT
        if old_state != now_state:
            plan.append((memory_id, now_state, old_state))
    return plan


def plan_hashes(plan: Sequence[Step]) -> list[list[str | None]]:
    """A plan as [memory id, content hash now, content hash restored] triples (None: absent)."""
    return [[m, codec.sha256_hex(now) if now else None, codec.sha256_hex(old) if old else None]
            for m, now, old in plan]


def plan_diff(plan: Sequence[Step], found: Cube, target: int) -> list[DiffEntry]:
    """A plan as the diff it would make: from the memories now to those restored."""
    out = []
    for memory_id, now, old in plan:
        before = Memory.from_state_bytes(now, found.version) if now else None
        after = Memory.from_state_bytes(old, target) if old else None
        change = "added" if before is None else "removed" if after is None else "modified"
        out.append(DiffEntry(memory_id=memory_id, change=change, before=before, after=after))
    return out


def apply_plan(core: Core, txn: lmdb.Transaction, actor: Actor, found: Cube, target: int,
               plan: Sequence[Step], info: dict[str, Any]) -> Applied:
    """Write a plan as one ``rollback`` commit: each memory's old state bytes, exactly."""
    version = found.version + 1
    changes = []
    for memory_id, now_state, old_state in plan:
        blob = Memory.from_state_bytes(old_state, target).blob if old_state else None
        core.ledger.write_state(txn, found.name, memory_id, version, old_state, blob.sha256 if blob else None)
        changes.append(Change(
            memory_id=memory_id,
            before=codec.sha256_hex(now_state) if now_state else None,
            after=codec.sha256_hex(old_state) if old_state else None,
        ))
    commit = core.commit(txn, actor, found, "rollback", changes, info)
    return Applied(commit, version, [c.memory_id for c in changes], {"to_version": target})
