"""What every part of the core shares: the store, the ledger, the audit log, and the write path.

Each change is a :class:`~memos.writes.Write`: a function of one LMDB
transaction that returns what it :class:`~memos.writes.Applied`. The audit record of a write is appended in
the same transaction, so a change is durable exactly when its record is.
:meth:`Core.apply` makes many writes durable in one commit (group commit),
each in its own child transaction, so one failure does not sink the others.
Failures (denials included) are audited too: a failed write in its own
commit, a refused read by :meth:`Core.refused`, which in the daemon hands its
record to the writer's next group commit (:mod:`memos.refusals`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import lmdb

from . import clock
from .access import Actor, require
from .audit import AuditLog
from .errors import Denied, MemosError
from .governance import Governance
from .ledger import Ledger
from .models import Change, Commit, Cube, Role
from .refusals import Refusals, failure_record
from .storage import Store
from .usage import UsageCounts
from .validation import Limits
from .writes import Applied, Write


class Core:
    """The store and what every concern of the core shares."""

    def __init__(self, store: Store, limits: Limits, types: Mapping[str, Any],
                 governance: Governance | None = None) -> None:
        self.store = store
        self.ledger = Ledger(store)
        self.audit = AuditLog(store)
        self.usage = UsageCounts(store)
        self.limits = limits
        self.types = types  # memory types by name (their validate() checks items)
        self.governance = governance or Governance()
        # Where refusals are queued for a later group commit (the daemon's writer sets it);
        # None: each is written at once, in a commit of its own (embedded use).
        self.refusals: Refusals | None = None

    # -- writes ---------------------------------------------------------

    def apply(self, writes: Sequence[Write]) -> list[Applied | MemosError]:
        """Make several writes durable in one commit; each slot is what it Applied or its MemosError."""
        pending = self.usage.take()
        fns: list[Callable[[lmdb.Transaction], Any]] = []
        # Queued refusals first: they were answered before this commit's writes, mostly.
        refused = self.refusals.take() if self.refusals is not None else None
        if refused is not None and refused.records:
            fns.append(lambda txn: refused.write(txn, self.audit.append))
        first = len(fns)
        fns += [self._audited(w) for w in writes]
        if pending:
            fns.append(lambda txn: self.usage.write(txn, pending))

        def on_error(txn: lmdb.Transaction, i: int, exc: MemosError) -> None:
            if first <= i < first + len(writes):
                w = writes[i - first]
                self.audit_failure(txn, w.actor, w.op, w.cube, exc, w.request_id)

        try:
            return self.store.transact(fns, on_error)[first:first + len(writes)]
        finally:
            if refused is not None and self.refusals is not None:
                self.refusals.written(refused)

    def run(self, write: Write) -> Any:
        """Apply one write now; its result, or its error raised."""
        applied = self.apply([write])[0]
        if isinstance(applied, MemosError):
            raise applied
        return applied.result

    def _audited(self, w: Write) -> Callable[[lmdb.Transaction], Applied]:
        def unit(txn: lmdb.Transaction) -> Applied:
            applied = w.fn(txn)
            detail = dict(applied.detail)
            if applied.memories:
                detail["memories"] = applied.memories
            if w.request_id is not None:
                detail["request_id"] = w.request_id
            self.audit.append(txn, actor=w.actor.name, op=w.op, outcome="ok",
                              cube=w.cube, version=applied.version, detail=detail)
            return applied

        return unit

    def audit_failure(self, txn: lmdb.Transaction, actor: Actor, op: str, cube: Any, exc: MemosError,
                      request_id: Any = None) -> None:
        self.audit.append(txn, **failure_record(actor.name, op, cube, exc, request_id))

    def refused(self, actor: Actor, op: str, cube: Any, exc: MemosError, request_id: Any = None) -> MemosError:
        """Audit a refusal; returns ``exc`` for the caller to raise.

        With :attr:`refusals` set (the daemon) the record is queued for the writer's next group
        commit, so a refusal never costs the calling thread a durable commit; otherwise it is
        written at once.
        """
        if self.refusals is not None:
            self.refusals.add(actor.name, op, cube, exc, request_id)
        else:
            self.store.write(lambda txn: self.audit_failure(txn, actor, op, cube, exc, request_id))
        return exc

    def settle_refusals(self, timeout: float = 5.0) -> None:
        """Wait until the refusals queued so far are in the audit log (for readers of the log)."""
        if self.refusals is not None:
            self.refusals.settle(timeout)

    def commit(self, txn: lmdb.Transaction, actor: Actor, cube: Cube, op: str,
               changes: list[Change], info: dict[str, Any] | None = None) -> Commit:
        """Record a new cube version made of ``changes``."""
        cube.version += 1
        commit = Commit(cube=cube.name, version=cube.version, actor=actor.name,
                        time=clock.now(), op=op, changes=changes, info=info or {})
        self.ledger.put_commit(txn, commit)
        self.ledger.put_cube(txn, cube)
        return commit

    # -- reads ----------------------------------------------------------

    def read(self, actor: Actor, op: str, cube: Any, fn: Callable[[lmdb.Transaction], Any]) -> Any:
        """Run a read in one snapshot; a failed read is audited like a failed write."""
        try:
            with self.store.read() as txn:
                return fn(txn)
        except MemosError as exc:
            raise self.refused(actor, op, cube if isinstance(cube, str) else None, exc) from None

    def require(self, txn: lmdb.Transaction, actor: Actor, cube: Any, role: Role, shared: bool = False) -> Cube:
        return require(self.ledger, txn, actor, cube, role, shared)

    def admin_only(self, actor: Actor, op: str) -> None:
        if not actor.admin:
            raise self.refused(actor, op, None, Denied(f"{op} needs the local administrator", agent=actor.name))

