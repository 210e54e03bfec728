"""Change events for the clients that ``watch``: each gets only the cubes it may read.

A ``watch`` request stays open: its events come back as partial replies on
the client's own connection, so they are authenticated like every request and
checked, event by event, against the cube's access list as it is at that
moment (a revoked grant stops the flow at once). The first piece is an
acknowledgement (an event of op ``watch``): the client knows it is subscribed
before it starts what it wants to watch.

Events of a cube that no longer exists (its deletion) reach the administrator
and the agent that made the change; events of no cube (jobs of no cube: model
loads) reach the administrator only. A watcher whose connection has gone is
dropped at its next event; one that falls too far behind (ZeroMQ's high-water
mark) misses events rather than holding the daemon up. One connection may hold
several watches (each answered under its own request id), up to
``PER_CONNECTION``, so that one client cannot take every slot.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from memos import catalog
from memos import protocol as p
from memos.access import Actor, may_read
from memos.api import Memos
from memos.errors import InvalidRequest, NotFound, Unavailable
from memos.models import Cube, Role

log = logging.getLogger("memosd.watchers")

Send = Callable[[bytes, bytes], None]  # (client identity, encoded partial reply)
PER_CONNECTION = 16


@dataclass(frozen=True)
class Watcher:
    identity: bytes
    actor: Actor
    cube: str | None  # None: every cube it may read
    request_id: str


class Watchers:
    operations = catalog.WATCH_OPERATIONS

    def __init__(self, memos: Memos, send: Send, limit: int) -> None:
        self.memos = memos
        self.send = send
        self.limit = limit
        self._lock = threading.Lock()
        self._watchers: dict[tuple[bytes, str], Watcher] = {}
        self._closed = False

    def add(self, watcher: Watcher) -> None:
        """Register ``watcher`` and acknowledge it (its first partial reply)."""
        with self._lock:
            if self._closed:
                raise Unavailable("memosd is stopping")
            key = (watcher.identity, watcher.request_id)
            if key not in self._watchers:
                if len(self._watchers) >= self.limit:
                    raise Unavailable(f"memosd already serves {self.limit} watchers; try again later",
                                      limit=self.limit)
                if sum(k[0] == watcher.identity for k in self._watchers) >= PER_CONNECTION:
                    raise Unavailable(f"one connection may watch {PER_CONNECTION} times at most",
                                      limit=PER_CONNECTION)
            if watcher.cube is not None:
                self._readable(watcher.actor, watcher.cube)  # a cube it may not read: refused now
            self._watchers[key] = watcher
        self._send(watcher, {"op": "watch", "cube": watcher.cube or "", "actor": watcher.actor.name,
                             "time": 0.0, "version": 0, "memories": []})

    def _readable(self, actor: Actor, cube: str) -> None:
        with self.memos.store.read() as txn:
            self.memos.core.require(txn, actor, cube, Role.read, shared=True)

    def watch(self, actor: Actor, cube: str | None = None) -> None:
        """Reached only by a request that did not come over the socket (a policy's)."""
        raise InvalidRequest("watch is served to clients on memosd's socket only", op="watch")

    def drop(self, identity: bytes) -> None:
        """Forget every watch of a connection that has gone."""
        with self._lock:
            for key in [k for k in self._watchers if k[0] == identity]:
                del self._watchers[key]

    def __len__(self) -> int:
        return len(self._watchers)

    def publish(self, cube: str, event: dict[str, Any]) -> None:
        """Send ``event`` (of ``cube``; "" for none) to each watcher that may read it."""
        watchers = [w for w in list(self._watchers.values()) if w.cube is None or w.cube == cube]
        if not watchers:
            return
        found: Cube | None = None
        if cube:
            try:
                with self.memos.store.read() as txn:
                    found = self.memos.ledger.shared_cube(txn, cube)
            except NotFound:
                found = None
        for watcher in watchers:
            if _may_see(watcher.actor, cube, found, event):
                self._send(watcher, event)

    def _send(self, watcher: Watcher, event: dict[str, Any]) -> None:
        self.send(watcher.identity, p.encode(p.partial_reply(watcher.request_id, event)))

    def close(self) -> list[Watcher]:
        """Stop taking watchers; the ones left, for their final replies."""
        with self._lock:
            self._closed = True
            left = list(self._watchers.values())
            self._watchers.clear()
        return left


def _may_see(actor: Actor, cube: str, found: Cube | None, event: dict[str, Any]) -> bool:
    if actor.admin:
        return True
    if found is not None:
        return may_read(actor, found)
    # No cube (a job of none), or a cube gone with its access list: only whoever made the change.
    return bool(cube) and event.get("actor") == actor.name and event.get("op") != "job"
