"""What every part of the core shares: the store, the ledger, the audit log, and the write path.

Each change is a :class:`~memos.writes.Write`: a function of one LMDB
transaction that returns what it :class:`~memos.writes.Applied`. The audit record of a write is appended in
the same transaction, so a change is durable exactly when its record is.
:meth:`Core.apply` makes many writes durable in one commit (group commit),
each in its own child transaction, so one failure does not sink the others.
Failures (denials included) are audited too.
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

    # -- writes ---------------------------------------------------------

    def apply(self, writes: Sequence[Write]) -> list[Applied | MemosError]:
        """Make several writes durable in one commit; each slot is what it Applied or its MemosError."""
        pending = self.usage.take()
        fns: list[Callable[[lmdb.Transaction], Any]] = [self._audited(w) for w in writes]
        if pending:
            fns.append(lambda txn: self.usage.write(txn, pending))

        def on_error(txn: lmdb.Transaction, i: int, exc: MemosError) -> None:
            if i < len(writes):
                self.audit_failure(txn, writes[i].actor, writes[i].op, writes[i].cube, exc, writes[i].request_id)

        return self.store.transact(fns, on_error)[: len(writes)]

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
        detail: dict[str, Any] = {"code": exc.code, "message": _encodable(exc.message[:500])}
        if request_id is not None:
            detail["request_id"] = _encodable(request_id)
        # The record of a failure must always encode: if it raised here, the
        # whole group commit (other callers' writes included) would be lost.
        self.audit.append(txn, actor=actor.name, op=op,
                          outcome="denied" if isinstance(exc, Denied) else "error",
                          cube=_encodable(cube[:200]) if isinstance(cube, str) else None, detail=detail)

    def refused(self, actor: Actor, op: str, cube: Any, exc: MemosError) -> MemosError:
        """Audit a refusal in its own commit; returns ``exc`` for the caller to raise."""
        self.store.write(lambda txn: self.audit_failure(txn, actor, op, cube, exc))
        return exc

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


def _encodable(value: Any) -> Any:
    """A string that UTF-8 can encode (lone surrogates escaped), for audit records."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value
