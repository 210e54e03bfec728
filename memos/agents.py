"""Named agents: their stable ids, their tokens, and what removing one takes away.

An agent has a name (what people type and what logs show) and an id made
when it is added and never reused (``agent:<hex>``, which no name can be).
Ownership, grants and stored replies reference the id, so an agent added
again under a removed one's name starts with nothing. Removing an agent
removes its grants, hands the cubes it owned to the local administrator and
forgets its stored replies, in the same commit.

Tokens are made and checked by :mod:`memos.tokens`; a reply that carries one
is never kept for retries (see :attr:`memos.writes.Applied.secret`).
"""

from __future__ import annotations

import secrets
from typing import Any

import lmdb

from . import catalog, clock, codec, principals, tokens
from . import validation as check
from .access import LOCAL_ADMIN, Actor
from .core import Core
from .errors import Conflict, Denied, InvalidRequest, NotFound, Unauthenticated
from .storage import request_time_key
from .writes import Applied, Write

RESERVED = {"admin"}  # the local administrator's name; never an agent's
_ADMIN_TOKEN_KEY = b"admin_token"  # in meta: the administrator's token hash, when tokens are required


def new_agent_id() -> str:
    return principals.ID_PREFIX + secrets.token_hex(8)


class Agents:
    operations = catalog.AGENTS_OPERATIONS

    def __init__(self, core: Core) -> None:
        self.core = core
        self.db = core.store.db["agents"]
        self.ids = core.store.db["agent_ids"]
        self.meta = core.store.db["meta"]

    def _admin(self, actor: Actor, op: str) -> None:
        if not actor.admin:
            raise Denied(f"{op} needs the local administrator", agent=actor.name)

    def record(self, txn: lmdb.Transaction, name: Any) -> dict[str, Any]:
        return principals.record(self.core.store, txn, name)

    # -- writes -----------------------------------------------------------

    def write_add(self, actor: Actor, name: Any, request_id: str | None = None) -> Write:
        """Register ``name``; the result carries the token, shown only this once."""

        def fn(txn: lmdb.Transaction) -> Applied:
            self._admin(actor, "agent_add")
            agent = check.name(name, "agent")
            if agent in RESERVED:
                raise Conflict(f"{agent!r} is reserved for the local administrator", agent=agent)
            if txn.get(agent.encode(), db=self.db) is not None:
                raise Conflict(f"agent {agent!r} already exists", agent=agent)
            agent_id = new_agent_id()
            record = {"id": agent_id, "name": agent, "created_at": clock.now(), "created_by": actor.name}
            token = self._new_token(record)
            txn.put(agent.encode(), codec.pack(record), db=self.db)
            txn.put(agent_id.encode(), agent.encode(), db=self.ids)
            return Applied({"name": agent, "id": agent_id, "token": token},
                           detail={"agent": agent, "agent_id": agent_id}, secret=True)

        return Write(actor, "agent_add", None, fn, request_id)

    def write_rotate(self, actor: Actor, name: Any, request_id: str | None = None) -> Write:
        """A new token for ``name`` (the administrator, or the agent itself); the old one stops at once."""

        def fn(txn: lmdb.Transaction) -> Applied:
            agent = check.name(name, "agent")
            if not actor.admin and actor.name != agent:
                raise Denied("an agent may rotate only its own token", agent=actor.name)
            if agent == LOCAL_ADMIN.name:
                return Applied({"name": agent, "id": LOCAL_ADMIN.key, "token": self.new_admin_token(txn)},
                               detail={"agent": agent}, secret=True)
            record = self.record(txn, agent)
            if not actor.admin and record["id"] != actor.id:
                raise Denied("an agent may rotate only its own token", agent=actor.name)
            token = self._new_token(record)
            record["rotated_at"] = clock.now()
            txn.put(agent.encode(), codec.pack(record), db=self.db)
            return Applied({"name": agent, "id": record["id"], "token": token},
                           detail={"agent": agent, "agent_id": record["id"]}, secret=True)

        return Write(actor, "agent_rotate", None, fn, request_id)

    def new_admin_token(self, txn: lmdb.Transaction) -> str:
        """A new token for the local administrator (the only one from now on)."""
        record = {"name": LOCAL_ADMIN.name}
        token = self._new_token(record)
        txn.put(_ADMIN_TOKEN_KEY, codec.pack(record), db=self.meta)
        return token

    @staticmethod
    def _new_token(record: dict[str, Any]) -> str:
        secret, salt = tokens.new_secret(), tokens.new_salt()
        record["salt"], record["token_hash"] = salt, tokens.salted_hash(salt, secret)
        return f"{record['name']}.{secret}"

    def write_remove(self, actor: Actor, name: Any, request_id: str | None = None) -> Write:
        def fn(txn: lmdb.Transaction) -> Applied:
            self._admin(actor, "agent_remove")
            record = self.record(txn, name)
            agent, agent_id = record["name"], record["id"]
            txn.delete(agent.encode(), db=self.db)
            txn.delete(agent_id.encode(), db=self.ids)
            grants, owned = self._take_rights(txn, agent_id)
            replies = self._forget_replies(txn, agent_id)
            return Applied({"name": agent, "removed": True, "grants_removed": grants, "cubes_to_admin": owned},
                           detail={"agent": agent, "agent_id": agent_id, "grants_removed": grants,
                                   "cubes_to_admin": owned, "replies_forgotten": replies})

        return Write(actor, "agent_remove", None, fn, request_id)

    def _take_rights(self, txn: lmdb.Transaction, agent_id: str) -> tuple[list[str], list[str]]:
        """Remove the agent's grants and hand its cubes to the administrator; the cubes touched."""
        ledger = self.core.ledger
        grants, owned = [], []
        for cube in list(ledger.cubes(txn)):
            changed = False
            if cube.acl.pop(agent_id, None) is not None:
                grants.append(cube.name)
                changed = True
            if cube.owner == agent_id:
                cube.owner = LOCAL_ADMIN.key
                owned.append(cube.name)
                changed = True
            if changed:
                ledger.put_cube(txn, cube)
        return grants, owned

    def _forget_replies(self, txn: lmdb.Transaction, agent_id: str) -> int:
        requests, times = self.core.store.db["requests"], self.core.store.db["request_times"]
        prefix = f"{agent_id}\0".encode()
        cur = txn.cursor(db=requests)
        found = []
        if cur.set_range(prefix):
            for key, raw in cur:
                if not key.startswith(prefix):
                    break
                found.append((bytes(key), codec.unpack(raw)["time"]))
        for key, stored_at in found:
            txn.delete(key, db=requests)
            txn.delete(request_time_key(stored_at, key), db=times)
        return len(found)

    # -- reads ------------------------------------------------------------

    def list(self, actor: Actor, limit: int | None = None, after: str | None = None) -> list[catalog.Agent]:
        """Agents by name: at most ``limit``, those named after ``after``."""
        limits = self.core.limits

        def fn(txn: lmdb.Transaction) -> list[catalog.Agent]:
            self._admin(actor, "agent_list")
            wanted = check.page(limit, limits, least=1)
            cur = txn.cursor(db=self.db)
            out: list[catalog.Agent] = []
            ok = cur.set_range(after.encode()) if after else cur.first()
            while ok and len(out) < check.room(wanted, limits):
                if not after or bytes(cur.key()) != after.encode():
                    out.append(catalog.Agent.model_validate(codec.unpack(cur.value())))
                ok = cur.next()
            return check.bounded(out, wanted, limits, "agents", "after (the last name of a page)")

        return self.core.read(actor, "agent_list", None, fn)

    def authenticate(self, token: str) -> Actor:
        """The agent a token belongs to, or Unauthenticated."""
        parts = tokens.split(token)
        if parts is None:
            raise Unauthenticated("malformed token")
        name, secret = parts
        is_admin = name == LOCAL_ADMIN.name
        with self.core.store.read() as txn:
            raw = txn.get(_ADMIN_TOKEN_KEY, db=self.meta) if is_admin else txn.get(name.encode(), db=self.db)
        if raw is None:
            raise Unauthenticated("unknown or revoked token")
        record = codec.unpack(raw)
        if not tokens.matches(record, secret):
            raise Unauthenticated("unknown or revoked token")
        return LOCAL_ADMIN if is_admin else Actor(name, id=record["id"])

    def agent_for(self, name: str) -> Actor:
        """The agent ``name`` (a uid mapped by configuration acts as it); Unauthenticated if none."""
        with self.core.store.read() as txn:
            try:
                return Actor(name, id=self.record(txn, name)["id"])
            except (NotFound, InvalidRequest):
                raise Unauthenticated(f"this user is mapped to agent {name!r}, which does not exist") from None
