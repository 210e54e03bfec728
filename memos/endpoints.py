"""Where a client connects: an ipc socket path (the default), or ``tcp://HOST:PORT`` with CURVE.

Over tcp the client pins the server's public key (``server_key``, z85; or
MEMOS_SERVER_KEY) and makes a fresh key pair of its own for each connection:
a daemon without the matching secret key never completes the handshake, so
nothing is sent to it in clear and no reply is taken from it. memosd asks
every tcp client for a token (docs/security.md).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING, TypeGuard

from .errors import InvalidRequest, Unavailable

if TYPE_CHECKING:
    import zmq

TCP = "tcp://"


def target(where: str | os.PathLike[str]) -> Path | str:
    """An ipc socket path as a Path; a tcp endpoint kept as its string (a Path would fold its //)."""
    text = os.fspath(where)
    return text if text.startswith(TCP) else Path(text)


def is_tcp(where: object) -> TypeGuard[str]:
    return isinstance(where, str) and where.startswith(TCP)


def server_key(given: str | bytes | None, where: Path | str) -> bytes | None:
    """The server's public key to pin (``given``, else MEMOS_SERVER_KEY); a tcp endpoint needs one,
    checked here, when the client is made, rather than at its first call."""
    key = given if given is not None else os.environ.get("MEMOS_SERVER_KEY") or None
    key = key.encode().strip() if isinstance(key, str) else key.strip() if key is not None else None
    if is_tcp(where) and (key is None or len(key) != 40):
        raise InvalidRequest(f"connecting to {where} needs memosd's z85 public key of 40 characters "
                             "(server_key, MEMOS_SERVER_KEY or memosctl --server-key): its data folder's "
                             "curve.key.pub")
    return key


def connect(sock: zmq.Socket, where: Path | str, key: bytes | None) -> None:
    """Connect ``sock`` to memosd: ipc as always, tcp with CURVE and the server's key pinned."""
    if not is_tcp(where):
        sock.connect(f"ipc://{where}")
        return
    import zmq  # here: memos.liveness uses this module's tcp check, and needs no zmq for it

    assert key is not None  # server_key made sure of it
    public, secret = zmq.curve_keypair()
    sock.setsockopt(zmq.CURVE_SERVERKEY, key)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, public)
    sock.setsockopt(zmq.CURVE_SECRETKEY, secret)
    sock.connect(str(where))


def check_tcp(endpoint: str) -> None:
    """Return if something accepts tcp connections at ``endpoint``; raise Unavailable if not.
    (That it is memosd, holding the pinned key, only the CURVE handshake shows.)"""
    host, _, port = endpoint[len(TCP):].rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
            return
    except TimeoutError:
        return  # a daemon too busy to accept at once is still there
    except (OSError, ValueError) as exc:
        raise Unavailable(f"cannot reach memosd at {endpoint}: {getattr(exc, 'strerror', None) or exc}",
                          socket=endpoint) from None
