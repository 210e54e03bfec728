"""tcp listeners beside the ipc socket, encrypted and authenticated with ZeroMQ CURVE.

Over ipc the kernel vouches for the peer (its uid) and the socket's folder keeps
others out. Over tcp neither holds: anyone on the network may connect and read
the wire. So every tcp endpoint uses CURVE: traffic is encrypted, the client
proves it holds the secret of the public key it presents, and the client
checks the server's public key, which it was given out of band. The server's
key pair lives in the data folder, made at first start:

* ``curve.key``: the z85 secret key, 0600;
* ``curve.key.pub``: the z85 public key, for the operator to hand to clients
  (it is logged at every start too).

CURVE options are per socket, but libzmq copies them into each endpoint when
it binds: the ROUTER binds its ipc socket first, as a plain one, then turns
CURVE on and binds the tcp endpoints. The ZAP handler (``identity.py``) names a
CURVE peer ``curve:<z85 key>``, which no uid ever equals, and tokens are
required of it.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import zmq

from memos.config import DaemonSettings
from memos.errors import ConfigError

log = logging.getLogger("memosd.transport")

KEY_FILE = "curve.key"
CURVE_PREFIX = "curve:"  # the User-Id of a CURVE peer: never a decimal uid


def server_keys(cfg: DaemonSettings, data_dir: Path) -> tuple[bytes, bytes] | None:
    """The server's (public, secret) z85 keys when tcp listeners are configured, else None.

    Raises ConfigError when libzmq lacks CURVE or the key cannot be read or made: a tcp
    listener without it would be open to, and readable by, the whole network."""
    if not cfg.listen:
        return None
    if not zmq.has("curve"):
        raise ConfigError(f"listen {cfg.listen} needs CURVE, which this libzmq {zmq.zmq_version()} lacks")
    path = data_dir / KEY_FILE
    try:
        secret = _read_or_make(path)
        public = zmq.curve_public(secret)
    except (OSError, ValueError, zmq.ZMQError) as exc:
        raise ConfigError(f"cannot read or make the CURVE key {path} that tcp listeners need: {exc}") from None
    return public, secret


def _read_or_make(path: Path) -> bytes:
    try:
        secret = path.read_bytes().strip()
    except FileNotFoundError:
        public, secret = zmq.curve_keypair()
        _write(path, secret, 0o600)
        _write(Path(f"{path}.pub"), public, 0o644)
        log.info("made the CURVE key pair for tcp listeners", extra={"path": str(path)})
        return secret
    if len(secret) != 40:
        raise ValueError(f"not a z85 CURVE secret key ({len(secret)} characters, not 40)")
    if os.stat(path).st_mode & 0o077:
        raise ValueError("it is readable by other users; chmod 600")
    public = zmq.curve_public(secret)
    pub = Path(f"{path}.pub")
    if not pub.exists() or pub.read_bytes().strip() != public:  # the operator's copy follows the secret
        _write(pub, public, 0o644)
    return secret


def _write(path: Path, data: bytes, mode: int) -> None:
    """Replace ``path`` atomically; mkstemp makes it 0600 from its first byte."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.write(fd, data + b"\n")
        os.fsync(fd)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def bind_tcp(router: zmq.Socket, endpoints: list[str], keys: tuple[bytes, bytes] | None) -> None:
    """Bind ``router`` on each tcp endpoint with CURVE on; call after its ipc bind, which stays plain."""
    if not endpoints:
        return
    assert keys is not None
    public, secret = keys
    router.setsockopt(zmq.CURVE_SERVER, 1)
    router.setsockopt(zmq.CURVE_SECRETKEY, secret)
    for endpoint in endpoints:
        router.bind(endpoint)
    log.info("listening on tcp with CURVE", extra={"listen": endpoints, "server_key": public.decode()})
