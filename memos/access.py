"""Who asks, and whether they may: actors, roles on cubes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lmdb

from . import validation as check
from .errors import Denied
from .ledger import Ledger
from .models import Cube, Role


@dataclass(frozen=True)
class Actor:
    """Who asks. ``admin``: every role on every cube (the local administrator, and policies).

    ``policy``: the policy acting, when a policy of the scheduler asks; what it
    adds records the policy in its provenance.
    ``id``: an agent's stable id (:mod:`memos.agents`); ownership and grants
    reference it (its :attr:`key`), so a name given again later inherits nothing.
    """

    name: str
    admin: bool = False
    policy: str | None = None
    id: str | None = None

    @property
    def key(self) -> str:
        """What cubes' owner and access lists hold for this actor."""
        return self.id or self.name


LOCAL_ADMIN = Actor("admin", admin=True)


def require(ledger: Ledger, txn: lmdb.Transaction, actor: Actor, cube: Any, role: Role,
            shared: bool = False) -> Cube:
    """The cube, if ``actor`` holds ``role`` on it; Denied otherwise.

    ``shared``: a cached object other readers share, for callers that
    neither modify the cube nor hand it out.
    """
    name = check.name(cube, "cube")
    found = ledger.shared_cube(txn, name) if shared else ledger.cube(txn, name)
    if actor.admin or found.owner == actor.key:
        return found
    held = found.acl.get(actor.key)
    if held is None or not held.allows(role):
        raise Denied(
            f"agent {actor.name!r} needs {role.value} on cube {found.name!r}",
            cube=found.name, agent=actor.name, needed=role.value,
        )
    return found


def may_read(actor: Actor, cube: Cube) -> bool:
    return actor.admin or cube.owner == actor.key or actor.key in cube.acl
