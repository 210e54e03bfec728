"""Who a cube's owner and access list name: agents' stable ids, shown to people as names.

Cubes store principal keys: an agent's id (``agent:<hex>``, made when it is
added, never reused) or ``admin``. Requests name agents, and replies show
them, by name; the two lookups here are the only translation.
"""

from __future__ import annotations

from typing import Any

import lmdb

from . import codec
from . import validation as check
from .access import LOCAL_ADMIN
from .errors import NotFound
from .models import Cube
from .storage import Store

ID_PREFIX = "agent:"


def record(store: Store, txn: lmdb.Transaction, name: Any) -> dict[str, Any]:
    """An agent's record by name; NotFound if there is no such agent."""
    agent = check.name(name, "agent")
    raw = txn.get(agent.encode(), db=store.db["agents"])
    if raw is None:
        raise NotFound(f"no agent {agent!r}", agent=agent)
    return codec.unpack(raw)


def key_of(store: Store, txn: lmdb.Transaction, name: Any) -> str:
    """The key a grant to ``name`` stores: the agent's id ("admin" for the administrator)."""
    if name == LOCAL_ADMIN.name:
        return LOCAL_ADMIN.key
    return record(store, txn, name)["id"]


def name_of(store: Store, txn: lmdb.Transaction, key: str) -> str:
    """The name behind a key, for showing; an id no agent holds any more is shown as itself."""
    if not key.startswith(ID_PREFIX):
        return key
    raw = txn.get(key.encode(), db=store.db["agent_ids"])
    return key if raw is None else bytes(raw).decode()


def shown(store: Store, txn: lmdb.Transaction, cube: Cube) -> Cube:
    """A copy of ``cube`` naming its owner and grantees by name, as replies show them."""
    return cube.model_copy(update={
        "owner": name_of(store, txn, cube.owner),
        "acl": {name_of(store, txn, key): role for key, role in cube.acl.items()},
    })
