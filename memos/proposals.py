"""Governed rollback: proposals that another agent with admin rights approves or rejects.

A proposal records the rollback asked for and its dry run (the plan: each
memory's content hash now and restored). Approval applies it as one
``rollback`` commit, unless it has expired or the cube has since changed what
it would do (stale: the approver would be approving a diff they never saw).
Every step is a write, so every step is audited; proposals are announced on
their cube's events like other changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lmdb

from . import catalog, clock, codec
from . import validation as check
from .access import Actor, may_read
from .core import Core
from .errors import Conflict, Denied, Expired, InvalidRequest, MemosError, NotFound
from .ids import is_id, new_id
from .memories import _once, version_in
from .models import Cube, Proposal, Role
from .versions import apply_plan, plan_diff, plan_hashes, rollback_plan
from .writes import Applied, Write


class Proposals:
    operations = catalog.PROPOSAL_OPERATIONS

    def __init__(self, core: Core) -> None:
        self.core = core
        self.db = core.store.db["proposals"]

    # -- writes ---------------------------------------------------------

    def write_propose(self, actor: Actor, cube: Any, to_version: Any, memory_ids: Sequence[str] | None = None,
                      reason: str = "", request_id: str | None = None) -> Write:
        core = self.core
        memory_ids = _once(memory_ids)

        def fn(txn: lmdb.Transaction) -> Applied:
            found = core.require(txn, actor, cube, Role.write)
            if core.governance.rollback_mode(found.name, actor.name) == "deny":
                raise Denied(f"agent {actor.name!r} may not roll back cube {found.name!r}",
                             cube=found.name, agent=actor.name, rule="deny")
            if not isinstance(reason, str) or len(reason) > 2000:
                raise InvalidRequest("reason must be a string of at most 2000 characters", field="reason")
            target = version_in(found, to_version, core.ledger, txn)
            plan = rollback_plan(core, txn, found, target, memory_ids)
            if not plan:
                raise InvalidRequest(f"cube {found.name!r} would not change: nothing to propose", field="to_version")
            now = clock.now()
            proposal = Proposal(
                id=new_id(), cube=found.name, to_version=target, proposer=actor.name, proposer_id=actor.key,
                reason=reason,
                memory_ids=None if memory_ids is None else [check.memory_id(m) for m in memory_ids],
                created_at=now, expires_at=now + core.governance.proposal_ttl_s,
                base_version=found.version, plan=plan_hashes(plan),
            )
            self._put(txn, proposal)
            return Applied(proposal, found.version, [], self._detail(proposal))

        return Write(actor, "rollback_propose", cube, fn, request_id)

    def write_approve(self, actor: Actor, id: Any, request_id: str | None = None) -> Write:
        core = self.core

        def fn(txn: lmdb.Transaction) -> Applied:
            proposal, found = self._decidable(txn, actor, id)
            if _proposed_by(proposal, actor):
                raise Denied("a proposal must be approved by an agent other than its proposer",
                             proposal=proposal.id, agent=actor.name)
            if core.governance.rollback_mode(found.name, actor.name) == "deny":
                raise Denied(f"agent {actor.name!r} may not roll back cube {found.name!r}, nor approve rollbacks",
                             cube=found.name, agent=actor.name, rule="deny")
            target = version_in(found, proposal.to_version, core.ledger, txn)
            plan = rollback_plan(core, txn, found, target, proposal.memory_ids)
            if plan_hashes(plan) != proposal.plan:
                raise Conflict(
                    f"proposal {proposal.id} is stale: cube {found.name!r} changed since v{proposal.base_version} "
                    "in what the rollback would do; propose it again", proposal=proposal.id, version=found.version)
            info = {"to_version": target, "memory_ids": proposal.memory_ids, "proposal": proposal.id,
                    "proposer": proposal.proposer}
            applied = apply_plan(core, txn, actor, found, target, plan, info)
            proposal.status, proposal.decided_by, proposal.decided_at = "applied", actor.name, clock.now()
            proposal.applied_version = applied.version
            self._put(txn, proposal)
            applied.detail.update(self._detail(proposal))
            return applied

        return Write(actor, "rollback_approve", self._cube_of(id), fn, request_id)

    def write_reject(self, actor: Actor, id: Any, reason: str = "", request_id: str | None = None) -> Write:
        def fn(txn: lmdb.Transaction) -> Applied:
            proposal, found = self._decidable(txn, actor, id, withdraw=True)
            if not isinstance(reason, str) or len(reason) > 2000:
                raise InvalidRequest("reason must be a string of at most 2000 characters", field="reason")
            proposal.status, proposal.decided_by, proposal.decided_at = "rejected", actor.name, clock.now()
            proposal.decision = reason
            self._put(txn, proposal)
            return Applied(proposal, found.version, [], self._detail(proposal))

        return Write(actor, "rollback_reject", self._cube_of(id), fn, request_id)

    def _decidable(self, txn: lmdb.Transaction, actor: Actor, id: Any, withdraw: bool = False) -> tuple[Proposal, Cube]:
        """A pending proposal and its cube, if ``actor`` may decide it (the proposer may withdraw)."""
        proposal = self._get(txn, id)
        if withdraw and _proposed_by(proposal, actor):
            found = self.core.require(txn, actor, proposal.cube, Role.read)
        else:
            found = self.core.require(txn, actor, proposal.cube, Role.admin)
        if proposal.status != "pending":
            raise Conflict(f"proposal {proposal.id} was already {proposal.status}", proposal=proposal.id)
        if clock.now() >= proposal.expires_at:
            raise Expired(f"proposal {proposal.id} expired; propose it again", proposal=proposal.id)
        return proposal, found

    # -- reads ----------------------------------------------------------

    def show(self, actor: Actor, id: str) -> catalog.ProposalDetail:
        core = self.core

        def fn(txn: lmdb.Transaction) -> catalog.ProposalDetail:
            proposal = self._get(txn, id)
            found = core.require(txn, actor, proposal.cube, Role.read, shared=True)
            if proposal.status != "pending":
                return catalog.ProposalDetail(proposal=proposal, diff=[])
            target = version_in(found, proposal.to_version, core.ledger, txn)
            plan = rollback_plan(core, txn, found, target, proposal.memory_ids)
            proposal.stale = plan_hashes(plan) != proposal.plan
            return catalog.ProposalDetail(proposal=proposal, diff=plan_diff(plan, found, target))

        return core.read(actor, "rollback_show", None, fn)

    def list(self, actor: Actor, cube: str | None = None, status: str = "pending", *,
             limit: int | None = None, before: str | None = None) -> list[Proposal]:
        """Proposals newest first. Paged like ``history``: at most ``limit``, continuing ``before``
        a proposal id (the last of the previous page)."""
        core = self.core

        def fn(txn: lmdb.Transaction) -> list[Proposal]:
            if cube is not None:
                core.require(txn, actor, cube, Role.read, shared=True)
            wanted_n = check.page(limit, core.limits, least=1)
            room = check.room(wanted_n, core.limits)
            if before is not None and not is_id(before):
                raise InvalidRequest("before is a proposal id", field="before")
            readable: dict[str, bool] = {}
            out: list[Proposal] = []
            cur = txn.cursor(db=self.db)
            # Ids sort by creation time: walk back from the newest (or from ``before``).
            if before is not None and cur.set_range(before.encode()):  # the first id at or after it
                ok = cur.prev()
            else:  # from the newest, or every id is older than ``before``
                ok = cur.last()
            while ok and len(out) < room:
                proposal = self._load(cur.value())
                ok = cur.prev()
                if cube is not None and proposal.cube != cube:
                    continue
                if proposal.cube not in readable:
                    try:
                        readable[proposal.cube] = may_read(actor, core.ledger.shared_cube(txn, proposal.cube))
                    except NotFound:
                        readable[proposal.cube] = False
                if not readable[proposal.cube]:
                    continue
                shown = "expired" if proposal.expired else proposal.status
                if status in ("all", shown):
                    out.append(proposal)
            return check.bounded(out, wanted_n, core.limits, "proposals", "before (the last id of a page)")

        return core.read(actor, "rollback_proposals", cube, fn)

    # -- records --------------------------------------------------------

    def _cube_of(self, id: Any) -> str | None:
        """The cube of proposal ``id`` (it never changes), for the write's audit record and event;
        None when there is no such proposal (the write itself then says why)."""
        try:
            with self.core.store.read() as txn:
                return self._get(txn, id).cube
        except MemosError:
            return None

    def _get(self, txn: lmdb.Transaction, id: Any) -> Proposal:
        if not isinstance(id, str) or not is_id(id):
            raise InvalidRequest("a proposal id is a 26-character id", field="id")
        raw = txn.get(id.encode(), db=self.db)
        if raw is None:
            raise NotFound(f"no proposal {id}", proposal=id)
        return self._load(raw)

    @staticmethod
    def _load(raw: bytes) -> Proposal:
        proposal = Proposal.model_validate(codec.unpack(raw))
        proposal.expired = proposal.status == "pending" and clock.now() >= proposal.expires_at
        return proposal

    def _put(self, txn: lmdb.Transaction, proposal: Proposal) -> None:
        record = proposal.model_dump(mode="json", exclude={"expired", "stale"})
        txn.put(proposal.id.encode(), codec.pack(record), db=self.db)

    @staticmethod
    def _detail(proposal: Proposal) -> dict[str, Any]:
        return {"proposal": proposal.id, "proposer": proposal.proposer, "to_version": proposal.to_version,
                "status": proposal.status}


def _proposed_by(proposal: Proposal, actor: Actor) -> bool:
    """By the agent itself, not one that took its name later (ids are never reused)."""
    return proposal.proposer_id == actor.key if proposal.proposer_id else proposal.proposer == actor.name
