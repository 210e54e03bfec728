"""Following change events: a ``watch`` request that stays open on a connection of its own.

memosd answers ``watch`` with an acknowledgement, then one partial reply per
event of a cube the agent may read (checked at each event), and a final reply
when it stops. Going over the request socket, events are authenticated like
every request. A daemon that dies sends nothing more: while waiting, the
follower checks every second that the daemon is still there and raises
Unavailable when it is not.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from typing import TYPE_CHECKING, Any

import zmq

from . import protocol as p
from .endpoints import connect
from .errors import Timeout, Unavailable, from_wire
from .liveness import check_daemon
from .models import Event

if TYPE_CHECKING:
    from .client import AsyncClient, Client

_LOOK_EVERY_MS = 1000
_END = object()
_MAX_EVENT_BYTES = 1 << 30


def _piece(reply: dict[str, Any], rid: str) -> Any:
    """A ``watch`` reply: its Event, ``_END`` when the stream is over, None if it is not ours.
    An error reply raises the daemon's error."""
    if reply.get("id") != rid:
        return None
    if "partial" in reply:
        return Event.model_validate(reply["partial"])
    if not reply.get("ok"):
        error = reply.get("error") or {}
        raise from_wire(str(error.get("code", "internal")), str(error.get("message", "")),
                        error.get("details") if isinstance(error.get("details"), dict) else None)
    return _END


def _acknowledged(frame: bytes | None, client: Any, rid: str, deadline: float) -> bool:
    """One step of waiting for a watch's acknowledgement: ``frame`` received, or None after a quiet
    look. True once acknowledged; the daemon's refusal, its stop, its absence or the deadline raise."""
    if frame is not None:
        piece = _piece(p.decode(frame, _MAX_EVENT_BYTES), rid)
        if piece is _END:
            raise Unavailable("memosd is stopping")
        if piece is not None:
            return True
    else:
        check_daemon(client.socket_path)
    if time.monotonic() >= deadline:
        raise Timeout(f"memosd at {client.socket_path} did not acknowledge watch in {client.timeout}s")
    return False


def follow(client: Client, cube: str | None, timeout: float | None) -> Iterator[Event]:
    """Subscribe now (acknowledged or raised before this returns); the events as they come."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        check_daemon(client.socket_path)
        connect(sock, client.socket_path, client.server_key)
        rid, frame = client._frame("watch", {"cube": cube})
        sock.send(frame)
        deadline = time.monotonic() + client.timeout
        while not _acknowledged(sock.recv() if sock.poll(_LOOK_EVERY_MS) else None, client, rid, deadline):
            pass
    except BaseException:
        sock.close(linger=0)
        raise
    return _events(client, sock, rid, timeout)


def _events(client: Client, sock: zmq.Socket, rid: str, timeout: float | None) -> Iterator[Event]:
    try:
        quiet_since = time.monotonic()
        while True:
            if not sock.poll(_LOOK_EVERY_MS):
                if timeout is not None and time.monotonic() - quiet_since >= timeout:
                    return
                check_daemon(client.socket_path)  # a daemon that died sends nothing more: say so
                continue
            piece = _piece(p.decode(sock.recv(), _MAX_EVENT_BYTES), rid)
            if piece is _END:
                return
            if piece is not None:
                quiet_since = time.monotonic()
                yield piece
    finally:
        sock.close(linger=0)


async def subscribe(client: AsyncClient, cube: str | None) -> AsyncIterator[Event]:
    """Subscribe now: returns once memosd has acknowledged (or raises its refusal); then the events."""
    check_daemon(client.socket_path)
    sock = client._ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    connect(sock, client.socket_path, client.server_key)
    rid, frame = client._frame("watch", {"cube": cube})
    try:
        await sock.send(frame)
        deadline = time.monotonic() + client.timeout
        while not _acknowledged(await sock.recv() if await sock.poll(_LOOK_EVERY_MS) else None,
                                client, rid, deadline):
            pass
    except BaseException:
        sock.close(linger=0)
        raise
    return _events_async(client, sock, rid)


async def _events_async(client: AsyncClient, sock: Any, rid: str) -> AsyncIterator[Event]:
    try:
        while True:
            if not await sock.poll(_LOOK_EVERY_MS):
                check_daemon(client.socket_path)  # a daemon that died sends nothing more: say so
                continue
            piece = _piece(p.decode(await sock.recv(), _MAX_EVENT_BYTES), rid)
            if piece is _END:
                return
            if piece is not None:
                yield piece
    finally:
        sock.close(linger=0)
