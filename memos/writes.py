"""A change as a value: a :class:`Write` is a function of one transaction returning what it :class:`Applied`.

Kept apart from :mod:`memos.core` (which opens LMDB) so that memory types and
the catalog can name writes without importing the store.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import lmdb

    from .access import Actor


@dataclass
class Applied:
    """What a write did: its result, the cube version it made and the memories it touched."""

    result: Any
    # The cube version the change is at (a grant: the cube's current one); None: no cube changed
    # (agents). A write with a cube and a version is announced: after_commit, then an Event.
    version: int | None = None
    memories: list[str] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)  # more for the audit record
    # The result holds a secret shown only once (a token): it is never stored for retries.
    secret: bool = False


@dataclass
class Write:
    """A unit of write work: ``fn(txn)`` returns what it Applied."""

    actor: Actor
    op: str
    cube: str | None
    fn: Callable[[lmdb.Transaction], Applied]
    request_id: str | None = None

    def then(self, after: Callable[[lmdb.Transaction, Applied], None]) -> Write:
        """This write, followed by ``after`` in the same transaction (both or neither)."""
        inner = self.fn

        def fn(txn: lmdb.Transaction) -> Applied:
            applied = inner(txn)
            after(txn, applied)
            return applied

        return Write(self.actor, self.op, self.cube, fn, self.request_id)
