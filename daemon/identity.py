"""Who a request comes from: the peer's uid, which the kernel vouches for, and its token.

libzmq asks the **ZAP handler** (:meth:`Identity.zap_loop`, its own thread)
about each connecting peer; for ipc it passes the peer's uid, gid and pid.
Users other than the daemon's own, ``allow_uids`` and ``uid_agents`` are
refused there, before they can send anything. Then, request by request
(:meth:`Identity.authenticate`):

* a token names an agent (or the administrator, whose token exists when
  ``require_token`` is on) and is checked against its salted hash;
* without a token, the daemon's own user is the local administrator and a
  user of ``uid_agents`` is its agent, unless ``require_token`` is on, when
  every client must present one;
* anyone else is refused.

Over tcp (``transport.py``) the peer is a CURVE key, not a uid: the ZAP
handler names it ``curve:<z85 key>`` (``curve_clients``, when set, lists the
keys allowed), and every request it sends must carry a token.

With ``require_token`` the administrator's token lives in a 0600 file for the
operator (``admin_token_file``): made at start when missing or no longer valid,
rewritten when the token is rotated.
"""

from __future__ import annotations

import grp
import logging
import os
import stat
import tempfile
import threading
from pathlib import Path

import zmq
from zmq.utils import z85

from memos.access import LOCAL_ADMIN, Actor
from memos.api import Memos
from memos.config import DaemonSettings
from memos.errors import ConfigError, MemosError, Unauthenticated
from memos.writes import Applied, Write

from .transport import CURVE_PREFIX

log = logging.getLogger("memosd.identity")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"


def group_id(group: str | int) -> int:
    if isinstance(group, int) or group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"socket_group {group!r} is not a group on this machine") from None


def private_dir(path: Path, group: int | None = None) -> Path:
    """Create ``path`` 0700 (0710 for ``group``: its members may pass, not list), or check that an
    existing one is ours and closed to others."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid():
        raise ConfigError(f"{path} belongs to uid {info.st_uid}, not to this user")
    if group is not None:
        os.chown(path, -1, group)
        os.chmod(path, 0o710)
        info = path.stat()
    mode = stat.S_IMODE(info.st_mode)
    if mode & 0o007 or mode & 0o060 or (group is None and mode & 0o070):
        raise ConfigError(f"{path} is open to other users (mode {mode:o}); use 0700")
    return path


class Identity:
    def __init__(self, cfg: DaemonSettings, memos: Memos) -> None:
        self.cfg = cfg
        self.memos = memos
        self.group = None if cfg.socket_group is None else group_id(cfg.socket_group)
        if (cfg.allow_uids or cfg.uid_agents) and self.group is None:
            raise ConfigError("allow_uids and uid_agents need socket_group: other users cannot reach a "
                              "socket in a folder only this user may enter")
        self.allowed = {os.getuid(), *cfg.allow_uids, *cfg.uid_agents}
        self._uid_agents = {str(uid): name for uid, name in cfg.uid_agents.items()}
        self._own_uid = str(os.getuid())
        self._curve_clients = set(cfg.curve_clients)
        self._tokens: dict[str, Actor] = {}
        self._tokens_lock = threading.Lock()
        self._tokens_generation = 0  # bumped by forget_tokens: older lookups are not cached

    # -- requests ---------------------------------------------------------

    def authenticate(self, uid: str | None, token: str | None) -> Actor:
        if token is not None:
            actor = self._tokens.get(token)
            if actor is None:
                generation = self._tokens_generation
                actor = self.memos.agents.authenticate(token)
                with self._tokens_lock:
                    # A token checked against a snapshot older than a removal
                    # that has since forgotten tokens must not be cached.
                    if generation == self._tokens_generation:
                        self._tokens[token] = actor
            return actor
        if uid is not None and uid.startswith(CURVE_PREFIX):  # tcp: nobody vouches for a uid
            raise Unauthenticated("a client over tcp must present a token (an agent's, or the "
                                  "administrator's of require_token)")
        if self.cfg.require_token:
            raise Unauthenticated(f"memosd requires a token from every client (require_token); the "
                                  f"administrator's is in {self.cfg.admin_token_file}")
        if uid == self._own_uid:
            return LOCAL_ADMIN
        agent = self._uid_agents.get(uid or "")
        if agent is not None:
            return self.memos.agents.agent_for(agent)  # removed since: refused
        raise Unauthenticated("this user must present an agent token")

    def forget_tokens(self) -> None:
        with self._tokens_lock:
            self._tokens_generation += 1
            self._tokens.clear()

    # -- the administrator's token -----------------------------------------

    def ensure_admin_token(self) -> None:
        """With ``require_token``: keep the administrator's token file, or make a new token and file."""
        if not self.cfg.require_token:
            return
        path = self.cfg.admin_token_file.expanduser()
        try:
            kept = path.read_text().strip()
            if self.memos.agents.authenticate(kept) is LOCAL_ADMIN:
                return
        except (OSError, MemosError):
            pass

        made: list[str] = []

        def issue(txn) -> Applied:
            made.append(self.memos.agents.new_admin_token(txn))  # the last one: a replayed commit makes two
            return Applied({"name": LOCAL_ADMIN.name}, detail={"agent": LOCAL_ADMIN.name})

        self.memos.run(Write(LOCAL_ADMIN, "admin_token", None, issue))
        self.write_admin_token(made[-1])

    def write_admin_token(self, token: str) -> None:
        """Replace the token file atomically, 0600 from its first byte."""
        path = self.cfg.admin_token_file.expanduser()
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".admin.token.")  # mkstemp makes it 0600
        try:
            os.write(fd, f"{token}\n".encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        log.info("administrator token written", extra={"path": str(path)})

    # -- ZAP ----------------------------------------------------------------

    def zap_loop(self, ctx: zmq.Context, stop: threading.Event, ready: threading.Event) -> None:
        sock = ctx.socket(zmq.REP)
        sock.bind(ZAP_ENDPOINT)
        sock.setsockopt(zmq.LINGER, 0)
        ready.set()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        while not stop.is_set():
            if not poller.poll(200):
                continue
            version, request_id, _domain, address, _identity, mechanism, *credentials = sock.recv_multipart()
            if mechanism == b"CURVE":  # a tcp peer (transport.py): no uid, only the key it proved it holds
                sock.send_multipart(self._curve_peer(version, request_id, address, credentials))
                continue
            # For ipc peers libzmq passes "<host>:<uid>:<gid>:<pid>" as the address.
            parts = address.decode(errors="replace").split(":")
            uid = int(parts[-3]) if len(parts) >= 3 and parts[-3].isdigit() else None
            if uid in self.allowed:
                sock.send_multipart([version, request_id, b"200", b"OK", str(uid).encode(), b""])
            else:
                log.warning("refused connection from uid %s", uid)
                sock.send_multipart([version, request_id, b"400", b"user not allowed", b"", b""])
        sock.close()

    def _curve_peer(self, version: bytes, request_id: bytes, address: bytes, credentials: list[bytes]) -> list[bytes]:
        """The ZAP reply for a CURVE peer: any key, or one of ``curve_clients``; its User-Id is
        ``curve:<key>``, which no uid equals, so authenticate gives it nothing without a token."""
        key = z85.encode(credentials[0]).decode() if credentials and len(credentials[0]) == 32 else ""
        if not key or (self._curve_clients and key not in self._curve_clients):
            log.warning("refused CURVE client %s from %s", key or "?", address.decode(errors="replace"))
            return [version, request_id, b"400", b"client key not allowed", b"", b""]
        return [version, request_id, b"200", b"OK", f"{CURVE_PREFIX}{key}".encode(), b""]
