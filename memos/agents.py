"""Named agents and their tokens.

A token is ``<agent>.<secret>``: the name finds the record, the secret is
checked against its stored sha256 with a constant-time compare. Only the hash
is stored, so a copy of the store does not reveal working tokens. Secrets are
256 random bits, so a plain hash (no slow KDF) is enough.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

import lmdb

from . import catalog, clock, codec
from . import validation as check
from .access import Actor
from .core import Core
from .errors import Conflict, Denied, NotFound, Unauthenticated
from .writes import Applied, Write


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Agents:
    operations = catalog.AGENTS_OPERATIONS

    def __init__(self, core: Core) -> None:
        self.core = core
        self.db = core.store.db["agents"]

    def _admin(self, actor: Actor, op: str) -> None:
        if not actor.admin:
            raise Denied(f"{op} needs the local administrator", agent=actor.name)

    def write_add(self, actor: Actor, name: Any, request_id: str | None = None) -> Write:
        """Register ``name``; the result carries the token, shown only this once."""

        def fn(txn: lmdb.Transaction):
            self._admin(actor, "agent_add")
            agent = check.name(name, "agent")
            if agent == "admin":
                raise Conflict("'admin' is reserved for the local administrator", agent=agent)
            if txn.get(agent.encode(), db=self.db) is not None:
                raise Conflict(f"agent {agent!r} already exists", agent=agent)
            secret = secrets.token_urlsafe(32)
            record = {"name": agent, "created_at": clock.now(), "created_by": actor.name,
                      "token_sha256": _hash(secret)}
            txn.put(agent.encode(), codec.pack(record), db=self.db)
            return Applied({"name": agent, "token": f"{agent}.{secret}"}, detail={"agent": agent})

        return Write(actor, "agent_add", None, fn, request_id)

    def write_remove(self, actor: Actor, name: Any, request_id: str | None = None) -> Write:
        def fn(txn: lmdb.Transaction):
            self._admin(actor, "agent_remove")
            agent = check.name(name, "agent")
            if not txn.delete(agent.encode(), db=self.db):
                raise NotFound(f"no agent {agent!r}", agent=agent)
            return Applied({"name": agent, "removed": True}, detail={"agent": agent})

        return Write(actor, "agent_remove", None, fn, request_id)

    def list(self, actor: Actor) -> list[catalog.Agent]:
        def fn(txn: lmdb.Transaction) -> list[catalog.Agent]:
            self._admin(actor, "agent_list")
            return [catalog.Agent.model_validate({k: v for k, v in codec.unpack(raw).items() if k != "token_sha256"})
                    for _, raw in txn.cursor(db=self.db)]

        return self.core.read(actor, "agent_list", None, fn)

    def authenticate(self, token: str) -> Actor:
        """The agent a token belongs to, or Unauthenticated."""
        name, sep, secret = token.partition(".")
        if not name or not sep or not secret or len(name.encode()) > 64:
            raise Unauthenticated("malformed token")
        with self.core.store.read() as txn:
            raw = txn.get(name.encode(), db=self.db)
        if raw is None:
            raise Unauthenticated("unknown or revoked token")
        record = codec.unpack(raw)
        if not hmac.compare_digest(record["token_sha256"], _hash(secret)):
            raise Unauthenticated("unknown or revoked token")
        return Actor(name)
