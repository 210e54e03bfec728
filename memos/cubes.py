"""Cubes: creation, access lists, listing."""

from __future__ import annotations

from typing import Any

import lmdb

from . import catalog, clock, principals
from . import validation as check
from .access import LOCAL_ADMIN, Actor, may_read
from .core import Core
from .errors import Conflict, InvalidRequest
from .models import Commit, Cube, Role
from .retention import override
from .writes import Applied, Write


class Cubes:
    operations = catalog.CUBES_OPERATIONS

    def __init__(self, core: Core) -> None:
        self.core = core

    def write_create_cube(self, actor: Actor, name: Any, settings: dict[str, Any] | None = None,
                          request_id: str | None = None) -> Write:
        core = self.core

        def fn(txn: lmdb.Transaction) -> Applied:
            cube_name = check.name(name, "cube")
            if settings is not None and not isinstance(settings, dict):
                raise InvalidRequest("settings must be a map", field="settings")
            if settings is not None and "retention" in settings:
                override(settings["retention"])  # the cube's own retention rules, checked
            if core.ledger.has_cube(txn, cube_name):
                raise Conflict(f"cube {cube_name!r} already exists", cube=cube_name)
            now = clock.now()
            cube = Cube(name=cube_name, owner=actor.key, acl={actor.key: Role.admin},
                        settings=check.metadata(settings, core.limits), version=0, created_at=now)
            core.ledger.put_commit(txn, Commit(cube=cube_name, version=0, actor=actor.name,
                                               time=now, op="create_cube"))
            core.ledger.put_cube(txn, cube)
            return Applied(self._shown(txn, cube), 0)

        return Write(actor, "create_cube", name, fn, request_id)

    def write_grant(self, actor: Actor, cube: Any, agent: Any, role: Any, request_id: str | None = None) -> Write:
        """Give ``agent`` a role on ``cube``; ``role=None`` revokes."""
        core = self.core

        def fn(txn: lmdb.Transaction) -> Applied:
            found = core.require(txn, actor, cube, Role.admin)
            agent_name = check.name(agent, "agent")
            if agent_name == LOCAL_ADMIN.name:
                raise InvalidRequest("the local administrator holds every role already", field="agent")
            key = principals.key_of(core.store, txn, agent_name)  # NotFound: no grants to unknown agents
            if role is None:
                found.acl.pop(key, None)
            else:
                found.acl[key] = check.role(role)
            core.ledger.put_cube(txn, found)
            return Applied(self._shown(txn, found), found.version,
                           detail={"agent": agent_name, "agent_id": key,
                                   "role": None if role is None else str(role)})

        return Write(actor, "grant", cube, fn, request_id)

    def check_role(self, actor: Actor, cube: str, role: Role | str, op: str | None = None) -> Cube:
        """The cube, if ``actor`` holds ``role`` on it (a refusal is audited as ``op``)."""
        wanted = check.role(role)
        return self.core.read(actor, op or f"check_{wanted.value}", cube,
                              lambda txn: self.core.require(txn, actor, cube, wanted))

    def get_cube(self, actor: Actor, cube: str) -> Cube:
        return self.core.read(actor, "get_cube", cube,
                              lambda txn: self._shown(txn, self.core.require(txn, actor, cube, Role.read)))

    def list_cubes(self, actor: Actor, limit: int | None = None, after: str | None = None) -> list[Cube]:
        """Cubes the actor may read, by name: at most ``limit``, those named after ``after``."""
        limits = self.core.limits

        def fn(txn: lmdb.Transaction) -> list[Cube]:
            wanted = check.page(limit, limits, least=1)
            out: list[Cube] = []
            for c in self.core.ledger.cubes(txn, after=after):
                if may_read(actor, c):
                    out.append(self._shown(txn, c))
                    if len(out) >= check.room(wanted, limits):
                        break
            return check.bounded(out, wanted, limits, "cubes", "after (the last name of a page)")

        return self.core.read(actor, "list_cubes", None, fn)

    def _shown(self, txn: lmdb.Transaction, cube: Cube) -> Cube:
        return principals.shown(self.core.store, txn, cube)
