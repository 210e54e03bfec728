"""memosd: the socket loop, peer identity, and the daemon's lifecycle.

Threads and who owns what:

* the **main thread** owns the ROUTER. It decodes, validates and
  authenticates each request and routes it by its operation's declared
  ``where`` (:mod:`memos.operations`): ``inline`` reads are answered at once,
  other reads go to the worker pool, writes to the writer (through the
  prepare stage of the memory types that prepare them, ``prepare.py``);
  their replies come back over an inproc PULL socket and go out.
* **workers** run the slower reads against LMDB snapshots (and decode frames
  too big to decode on the main thread).
* the **writer** (``writer.py``) owns LMDB writes, group commit and the PUB
  socket of change events.
* memory types (``types.py``) run their own threads behind the contract of
  :mod:`memos.memtypes`; the daemon knows them only through it.
* the **ZAP thread** answers libzmq's authentication hook: it sees each
  connecting peer's uid and refuses users other than ours (and allowed ones).
"""

from __future__ import annotations

import fcntl
import functools
import gc
import logging
import os
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import zmq
from pydantic import ValidationError

from memos import clock
from memos import protocol as p
from memos.api import LOCAL_ADMIN, Actor
from memos.config import Settings
from memos.errors import (
    ConfigError,
    InternalError,
    InvalidRequest,
    MemosError,
    Unauthenticated,
    Unavailable,
    UnknownOperation,
)
from memos.liveness import check_daemon
from memos.models import plain
from memos.operations import Route, bind
from memos.writes import Write

from .scheduler import Scheduler
from .types import MemoryTypes
from .writer import Job, Writer, wait_for

log = logging.getLogger("memosd")

_OUT = "inproc://memosd-out"
_ZAP = "inproc://zeromq.zap.01"
_MAX_IN_FLIGHT = 10_000  # past this the ROUTER is not read, so zmq's HWM pushes back
_INLINE_MAX_FRAME = 64 << 10
_PARTIAL = b"partial"  # third frame of a partial reply on its way to the main thread
# Plain ints: pyzmq's enum flags cost microseconds per operation on the hot path.
_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)
_SNDMORE_NOBLOCK = int(zmq.SNDMORE) | _NOBLOCK
_ANONYMOUS = Actor("anonymous")  # who a request that fails before authentication is audited as
_ENDS_TOKENS = ("agent_remove", "agent_rotate")  # after their commit, tokens checked before are forgotten


def private_dir(path: Path) -> Path:
    """Create ``path`` 0700, or check that an existing one is ours and closed to others."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid():
        raise ConfigError(f"{path} belongs to uid {info.st_uid}, not to this user")
    if stat.S_IMODE(info.st_mode) & 0o077:
        raise ConfigError(f"{path} is open to other users (mode {stat.S_IMODE(info.st_mode):o}); use 0700")
    return path


class _Lock:
    """An flock held for the daemon's life; the kernel drops it if the process dies."""

    def __init__(self, path: Path, what: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise ConfigError(f"another memosd is running on this {what} ({path})") from None
        os.ftruncate(self.fd, 0)
        os.write(self.fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        os.close(self.fd)


class _Queued:
    """A reply sent from another thread: it reaches the ROUTER through the main thread."""

    __slots__ = ("server", "identity")

    def __init__(self, server: Server, identity: bytes) -> None:
        self.server = server
        self.identity = identity

    def __call__(self, reply: dict[str, Any]) -> None:
        self.server._out().send_multipart([self.identity, p.encode(reply)])

    def partial(self, message: dict[str, Any]) -> None:
        """A partial reply: it goes out at once and the request stays in flight."""
        self.server._out().send_multipart([self.identity, p.encode(message), _PARTIAL])


class Server:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cfg = settings.daemon
        self.socket_path = self.cfg.socket_path()
        self.events_path = Path(f"{self.socket_path}.events")
        self._stop = threading.Event()
        self._local = threading.local()
        self._in_flight = 0
        self._out_sockets: list[zmq.Socket] = []
        self._out_lock = threading.Lock()
        self._tokens: dict[str, Actor] = {}
        self._tokens_lock = threading.Lock()
        self._tokens_generation = 0  # bumped by forget_tokens: older lookups are not cached

    # -- lifecycle ------------------------------------------------------

    def start(self) -> None:
        private_dir(self.socket_path.parent)
        self._socket_lock = _Lock(Path(f"{self.socket_path}.lock"), "socket")
        data_dir = private_dir(Path(self.cfg.data_dir).expanduser())
        self._data_lock = _Lock(data_dir / "memosd.lock", "data folder")
        for stale in (self.socket_path, self.events_path):
            if stale.exists():  # we hold the lock, so no memosd made it; is another program there?
                try:
                    check_daemon(stale)
                except Unavailable:  # nobody listens: left by a memosd that was killed
                    log.info("removing stale socket %s", stale)
                    stale.unlink()
                else:
                    raise ConfigError(f"another program listens on {stale}; memosd will not take its socket over")
        if self.cfg.clock_file is not None:
            clock.use_file(self.cfg.clock_file)
        self.types = MemoryTypes(self.settings, data_dir)
        self.memos = self.types.memos
        self.routes: dict[str, Route] = self.memos.routes()
        self.scheduler = Scheduler(self.memos, self.cfg.policies, self.perform,
                                   functools.partial(wait_for, self._commit), self.routes)
        self.routes.update(bind([self.scheduler]))
        self.zmq = zmq.Context()
        self._pull = self.zmq.socket(zmq.PULL)
        self._pull.bind(_OUT)
        self._zap_ready = threading.Event()
        self._zap_thread = threading.Thread(target=self._zap_loop, name="memosd-zap", daemon=True)
        self._zap_thread.start()
        self._zap_ready.wait()
        self.router = self.zmq.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.ZAP_DOMAIN, b"memos")
        self.router.setsockopt(zmq.MAXMSGSIZE, 2 * self.cfg.max_message_bytes)  # hard cap; soft check replies
        self.router.setsockopt(zmq.LINGER, 1000)
        self.router.bind(f"ipc://{self.socket_path}")
        self.pub = self.zmq.socket(zmq.PUB)
        self.pub.setsockopt(zmq.ZAP_DOMAIN, b"memos")
        self.pub.bind(f"ipc://{self.events_path}")
        self._pub_lock = threading.Lock()
        self._pub_closed = False
        self.memos.jobs.listen(self._publish_job)
        os.chmod(self.socket_path, 0o600)
        os.chmod(self.events_path, 0o600)
        self.pool = ThreadPoolExecutor(self.cfg.read_workers, thread_name_prefix="memosd-worker")
        self.writer = Writer(self.memos, max_group=self.cfg.max_group,
                             retention_s=self.cfg.request_retention_s, publish=self._publish,
                             on_commit=self.types.after_commit, deliver=self._deliver)
        self.writer.start()
        self.types.start(commit=self.writer.submit, fail=self._fail_job)
        self.scheduler.start()
        # Everything loaded so far (the interpreter, torch, the models' modules) lives as long as
        # the daemon: frozen, full garbage collections no longer walk it, so their pauses, which
        # stop every thread, stay short while background work allocates.
        gc.freeze()
        log.info("memosd listening", extra={"socket": str(self.socket_path), "data_dir": str(data_dir),
                                            "pid": os.getpid()})

    def stop(self) -> None:
        """Ask the loop to end; safe from a signal handler."""
        self._stop.set()

    def serve_forever(self) -> None:
        everything = [(self._pull, _POLLIN), (self.router, _POLLIN)]
        replies_only = everything[:1]  # when too much is in flight, stop reading requests
        while not self._stop.is_set():
            ready = zmq.zmq_poll(everything if self._in_flight < _MAX_IN_FLIGHT else replies_only, 100)
            for sock, _ in ready:
                if sock is self._pull:
                    self._forward()
                else:
                    self._receive()
        self._drain()

    def _drain(self) -> None:
        """Finish what was accepted: answer in-flight requests, then close everything."""
        log.info("stopping: %d requests in flight", self._in_flight)
        self.scheduler.stop()
        self.pool.shutdown(wait=True)
        self.types.stop()  # writes being prepared reach the writer first
        self.writer.stop()
        self.types.close()
        while self._in_flight > 0 and self._pull.poll(2000):
            self._forward()
        self.memos.close()
        self._zap_thread.join()  # it sees _stop within one poll; its socket must close before term()
        with self._out_lock:
            for sock in self._out_sockets:
                sock.close(linger=0)
        with self._pub_lock:
            self._pub_closed = True
        for sock in (self.router, self.pub, self._pull):
            sock.close(linger=1000)
        self.zmq.term()
        for path in (self.socket_path, self.events_path):
            path.unlink(missing_ok=True)
        self._socket_lock.release()
        self._data_lock.release()
        log.info("memosd stopped")

    # -- the main thread ------------------------------------------------

    def _receive(self) -> None:
        # EVENTS is checked before each recv: a raised zmq.Again costs more than the check.
        for _ in range(1000):
            if not self.router.getsockopt(_EVENTS) & _POLLIN:
                return
            frames = self.router.recv_multipart(copy=False)
            identity = frames[0].bytes
            uid = frames[-1].get("User-Id")
            payloads = [f.bytes for f in frames[1:]]
            if len(payloads) == 1 and len(payloads[0]) <= _INLINE_MAX_FRAME:
                self._serve(identity, uid, payloads, inline=True)
            else:  # decoding a big frame must not stall the loop
                self._in_flight += 1
                self.pool.submit(self._serve, identity, uid, payloads)

    def _send_now(self, identity: bytes):
        def send(reply: dict[str, Any]) -> None:
            try:  # two plain sends: send_multipart's generality costs on this path
                self.router.send(identity, _SNDMORE_NOBLOCK)
                self.router.send(p.encode(reply), _NOBLOCK)
            except zmq.ZMQError as exc:
                log.debug("reply dropped: %s", exc)

        return send

    def _forward(self) -> None:
        """Send replies finished elsewhere: each message is identity, reply[, identity, reply...],
        or identity, partial reply, ``_PARTIAL`` (odd length: the request stays in flight)."""
        while self._pull.getsockopt(_EVENTS) & _POLLIN:
            frames = self._pull.recv_multipart()
            if len(frames) == 3 and frames[2] == _PARTIAL:
                try:
                    self.router.send(frames[0], _SNDMORE_NOBLOCK)
                    self.router.send(frames[1], _NOBLOCK)
                except zmq.ZMQError as exc:
                    log.debug("partial reply dropped: %s", exc)
                continue
            for i in range(0, len(frames), 2):
                self._in_flight -= 1
                try:
                    self.router.send(frames[i], _SNDMORE_NOBLOCK)
                    self.router.send(frames[i + 1], _NOBLOCK)
                except zmq.ZMQError as exc:  # the client left before its reply
                    log.debug("reply dropped: %s", exc)

    # -- workers ----------------------------------------------------------

    def _out(self) -> zmq.Socket:
        sock = getattr(self._local, "out", None)
        if sock is None:
            sock = self.zmq.socket(zmq.PUSH)
            sock.connect(_OUT)
            self._local.out = sock
            with self._out_lock:
                self._out_sockets.append(sock)
        return sock

    def _reply_to(self, identity: bytes) -> _Queued:
        return _Queued(self, identity)

    def _deliver(self, replies: list[tuple[Any, dict[str, Any]]]) -> None:
        """The writer's replies of one commit: one message to the main thread, not one each."""
        frames: list[bytes] = []
        for reply, message in replies:
            if isinstance(reply, _Queued):
                frames += (reply.identity, p.encode(message))
            else:
                reply(message)
        if frames:
            self._out().send_multipart(frames)

    def _publish(self, cube: str, event: dict[str, Any]) -> None:
        # The writer and the jobs' threads publish: a ZeroMQ socket is used by one thread at a time.
        with self._pub_lock:
            if not self._pub_closed:
                self.pub.send_multipart([cube.encode(), p.encode(event)])

    def _publish_job(self, job: dict[str, Any]) -> None:
        self._publish(job["cube"] or "", {"op": "job", "cube": job["cube"] or "", "actor": "memosd",
                                          "time": time.time(), "version": 0, "memories": [], "job": job})

    def _serve(self, identity: bytes, uid: str | None, payloads: list[bytes], inline: bool = False) -> None:
        """Decode, check and route one request.

        ``inline`` (main thread): answer point reads here, hand the rest on.
        Every request gets exactly one reply, from whoever finishes it.
        """
        queued = self._reply_to(identity)

        def hand_off() -> None:
            if inline:  # its reply will come back through the PULL socket
                self._in_flight += 1

        message: Any = None
        actor = _ANONYMOUS
        op = "request"
        try:
            if len(payloads) != 1:
                raise p.InvalidRequest(f"a request is one frame, not {len(payloads)}")
            message = p.decode(payloads[0], self.cfg.max_message_bytes)
            if isinstance(message.get("op"), str):
                op = message["op"][:64]
            envelope, route, args = p.parse_request(message, self.routes)
            actor = self._authenticate(uid, envelope.token)
            where = route.op.where
            if where == "writer":
                write = route(actor, args, envelope.id)
                hand_off()
                reply = self._forgetting_tokens(queued) if envelope.op in _ENDS_TOKENS else queued
                self._commit(Job(actor, envelope.id, write, reply), envelope.op, args)
            elif inline and where != "inline":
                hand_off()
                self.pool.submit(self._read, envelope, route, actor, args, queued)
            else:
                self._read(envelope, route, actor, args, self._send_now(identity) if inline else queued)
        except MemosError as exc:
            hand_off()
            self._fail(actor, op, p.request_id_of(message), exc, queued)
        except Exception as exc:  # a bug: answer, log, keep serving
            log.exception("request failed")
            hand_off()
            self._fail(actor, op, p.request_id_of(message), InternalError(f"{type(exc).__name__}"), queued)

    def _commit(self, job: Job, op: str | None = None, args: Any = None) -> None:
        """A write on its way: through the prepare stages of the types that prepare ``op``, then the writer."""
        if op is not None and self.types.prepares(op):
            self.types.prepare(op, args, job)
        else:
            self.writer.submit(job)

    def perform(self, actor: Actor, op: str, args: dict[str, Any]) -> Any:
        """A request made by the daemon itself (a policy): parsed, routed, checked, prepared, committed
        and audited as a client's would be. Writes wait for their commit. The result as plain data."""
        route = self.routes.get(op)
        try:
            if route is None:
                raise UnknownOperation(f"unknown operation {op!r}", op=op)
            try:
                parsed = route.op.args.model_validate(args)
            except ValidationError as exc:
                raise InvalidRequest(f"{op}: {exc.errors(include_url=False)[0]['msg']}", op=op) from None
        except MemosError as exc:  # refused before it reached the store: audited as a client's would be
            raise self.memos.core.refused(actor, op[:64], args.get("cube"), exc) from None
        if route.op.writes:
            write = route(actor, parsed)
            return wait_for(lambda job: self._commit(job, op, parsed), write)
        return plain(route(actor, parsed))

    def _fail_job(self, job: Job, exc: MemosError) -> None:
        """A write refused before the writer (by a memory type's prepare)."""
        self._fail(job.actor, job.write.op, job.request_id, exc, job.reply)

    def _read(self, envelope: p.Envelope, route: Route, actor: Actor, args: Any, reply) -> None:
        """Run a read; the core has already audited any failure it raises."""
        emit = None
        if route.op.streams:
            def emit(part: Any) -> None:
                reply.partial(p.partial_reply(envelope.id, plain(part)))
        try:
            result = plain(route(actor, args, emit=emit))
        except MemosError as exc:
            reply(p.error_reply(envelope.id, exc))
        except Exception as exc:  # a bug: answer, log, keep serving
            log.exception("read failed")
            reply(p.error_reply(envelope.id, InternalError(type(exc).__name__)))
        else:
            reply(p.ok_reply(envelope.id, result))

    def _fail(self, actor: Actor, op: str, rid: str | None, exc: MemosError, reply) -> None:
        """Audit a request refused before it reached the store (via the writer), then answer."""

        def fail(txn: Any) -> Any:
            raise exc

        self.writer.submit(Job(actor, rid or "", Write(actor, op, None, fail), reply, idempotent=False))

    def _authenticate(self, uid: str | None, token: str | None) -> Actor:
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
        if uid == str(os.getuid()):
            return LOCAL_ADMIN
        raise Unauthenticated("this user must present an agent token")

    def forget_tokens(self) -> None:
        with self._tokens_lock:
            self._tokens_generation += 1
            self._tokens.clear()

    def _forgetting_tokens(self, reply):
        """Wrap an agent_remove's reply: once its commit is durable, drop verified tokens."""

        def send(message: dict[str, Any]) -> None:
            self.forget_tokens()  # runs in the writer after the commit, before the reply leaves
            reply(message)

        return send

    # -- ZAP ----------------------------------------------------------------

    def _zap_loop(self) -> None:
        sock = self.zmq.socket(zmq.REP)
        sock.bind(_ZAP)
        sock.setsockopt(zmq.LINGER, 0)
        self._zap_ready.set()
        allowed = {os.getuid(), *self.cfg.allow_uids}
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(200):
                continue
            version, request_id, _domain, address, *_ = sock.recv_multipart()
            # For ipc peers libzmq passes "<host>:<uid>:<gid>:<pid>" as the address.
            parts = address.decode(errors="replace").split(":")
            uid = int(parts[-3]) if len(parts) >= 3 and parts[-3].isdigit() else None
            if uid in allowed:
                sock.send_multipart([version, request_id, b"200", b"OK", str(uid).encode(), b""])
            else:
                log.warning("refused connection from uid %s", uid)
                sock.send_multipart([version, request_id, b"400", b"user not allowed", b"", b""])
        sock.close()
