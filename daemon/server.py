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
* the **writer** (``writer.py``) owns LMDB writes and group commit; after
  each commit it hands change events to the watchers (``watchers.py``).
* memory types (``types.py``) run their own threads behind the contract of
  :mod:`memos.memtypes`; the daemon knows them only through it.
* the **ZAP thread** answers libzmq's authentication hook: it sees each
  connecting peer's uid and refuses users other than ours (and allowed ones);
  ``identity.py`` then authenticates each request.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import gc
import logging
import os
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
    Unavailable,
    UnknownOperation,
)
from memos.liveness import check_daemon, restart_marker
from memos.models import plain
from memos.operations import Route, bind

from .audit_export import CheckpointExport
from .follower import Follower
from .identity import Identity, group_id, private_dir
from .scheduler import Scheduler
from .transport import bind_tcp, server_keys
from .types import MemoryTypes
from .watchers import Watcher, Watchers
from .writer import Job, Writer, wait_for

log = logging.getLogger("memosd")

_OUT = "inproc://memosd-out"
_MAX_IN_FLIGHT = 10_000  # past this the ROUTER is not read, so zmq's HWM pushes back
_INLINE_MAX_FRAME = 64 << 10
_PARTIAL = b"partial"  # third frame of a partial reply on its way to the main thread
# Plain ints: pyzmq's enum flags cost microseconds per operation on the hot path.
_EVENTS, _POLLIN, _NOBLOCK = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK)
_SNDMORE_NOBLOCK = int(zmq.SNDMORE) | _NOBLOCK
_ANONYMOUS = Actor("anonymous")  # who a request that fails before authentication is audited as
_ENDS_TOKENS = ("agent_remove", "agent_rotate")  # after their commit, tokens checked before are forgotten


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
        self._stop = threading.Event()
        self._local = threading.local()
        self._in_flight = 0
        self._out_sockets: list[zmq.Socket] = []
        self._out_lock = threading.Lock()
        self.restart_in_place = False  # set by store_compact: main() execs memosd again once drained

    # -- lifecycle ------------------------------------------------------

    def start(self) -> None:
        group = None if self.cfg.socket_group is None else group_id(self.cfg.socket_group)
        private_dir(self.socket_path.parent, group)
        self._socket_lock = _Lock(Path(f"{self.socket_path}.lock"), "socket")
        data_dir = private_dir(Path(self.cfg.data_dir).expanduser())
        self._data_lock = _Lock(data_dir / "memosd.lock", "data folder")
        if self.socket_path.exists():  # we hold the lock, so no memosd made it; is another program there?
            try:
                check_daemon(self.socket_path)
            except Unavailable:  # nobody listens: left by a memosd that was killed
                log.info("removing stale socket %s", self.socket_path)
                self.socket_path.unlink()
            else:
                raise ConfigError(f"another program listens on {self.socket_path}; "
                                  "memosd will not take its socket over")
        if self.cfg.clock_file is not None:
            clock.use_file(self.cfg.clock_file)
        curve = server_keys(self.cfg, data_dir)  # before anything binds: no key, no start
        self.types = MemoryTypes(self.settings, data_dir)
        self.memos = self.types.memos
        self.audit_export = CheckpointExport.start(self.settings, data_dir, self.memos)
        self.identity = Identity(self.cfg, self.memos)
        self.identity.ensure_admin_token()
        self.routes: dict[str, Route] = self.memos.routes()
        self.scheduler = Scheduler(self.memos, self.cfg.policies, self.perform,
                                   functools.partial(wait_for, self._commit), self.routes)
        self.watchers = Watchers(self.memos, self._send_partial, self.cfg.max_watchers)
        self.routes.update(bind([self.scheduler, self.watchers]))
        self.zmq = zmq.Context()
        self._pull = self.zmq.socket(zmq.PULL)
        self._pull.bind(_OUT)
        self._zap_ready = threading.Event()
        self._zap_thread = threading.Thread(target=self.identity.zap_loop, name="memosd-zap", daemon=True,
                                            args=(self.zmq, self._stop, self._zap_ready))
        self._zap_thread.start()
        self._zap_ready.wait()
        self.router = self.zmq.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.router.setsockopt(zmq.ZAP_DOMAIN, b"memos")
        self.router.setsockopt(zmq.MAXMSGSIZE, 2 * self.cfg.max_message_bytes)  # hard cap; soft check replies
        self.router.setsockopt(zmq.LINGER, 1000)
        self.router.bind(f"ipc://{self.socket_path}")
        bind_tcp(self.router, self.cfg.listen, curve)  # after the ipc bind, which stays without CURVE
        restart_marker(self.socket_path).unlink(missing_ok=True)  # listening again after a restart in place
        self.memos.jobs.listen(self._publish_job)
        # The folder (0700, or 0710 for the group) keeps others out until this mode is set.
        if group is None:
            os.chmod(self.socket_path, 0o600)
        else:
            os.chown(self.socket_path, -1, group)
            os.chmod(self.socket_path, 0o660)
        self.pool = ThreadPoolExecutor(self.cfg.read_workers, thread_name_prefix="memosd-worker")
        self.writer = Writer(self.memos, max_group=self.cfg.max_group,
                             retention_s=self.cfg.request_retention_s, publish=self._publish,
                             on_commit=self.types.after_commit, deliver=self._deliver)
        self.writer.start()
        self.follower = None  # others' commits, where other daemons share the store
        # A point read of LMDB takes microseconds: the main thread answers it. One of PostgreSQL waits
        # on round trips, so every read goes to the workers.
        self._inline_reads = self.memos.store.backend == "lmdb"
        if not self._inline_reads:
            self.follower = Follower(self.memos, self.types.after_commit, self._publish, self.identity.forget_tokens)
            self.follower.start()
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
        if self.follower is not None:
            self.follower.stop()
        self.types.close()
        self.audit_export.stop()  # after the last write: the final head is signed
        while self._in_flight > 0 and self._pull.poll(2000):
            self._forward()
        self.memos.close()
        for watcher in self.watchers.close():  # their streams end: the daemon is going
            self._send_now(watcher.identity)(p.ok_reply(watcher.request_id, None))
        self._zap_thread.join()  # it sees _stop within one poll; its socket must close before term()
        with self._out_lock:
            for sock in self._out_sockets:
                sock.close(linger=0)
        if self.restart_in_place:
            self._answer_unread()
        for sock in (self.router, self._pull):
            sock.close(linger=1000)
        self.zmq.term()
        self.socket_path.unlink(missing_ok=True)
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
                    if exc.errno == errno.EHOSTUNREACH:  # the client has gone: so has its watch
                        self.watchers.drop(frames[0])
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
        self.watchers.publish(cube, event)

    def _send_partial(self, identity: bytes, frame: bytes) -> None:
        """A watcher's event: to the main thread, which owns the ROUTER (the writer and jobs publish)."""
        self._out().send_multipart([identity, frame, _PARTIAL])

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
            actor = self.identity.authenticate(uid, envelope.token)
            where = route.op.where
            if envelope.op == "watch":  # stays open, its events sent as they come: never in flight
                self.watchers.add(Watcher(identity, actor, args.cube, envelope.id))
            elif where == "writer":
                write = route(actor, args, envelope.id)
                hand_off()
                reply = self._forgetting_tokens(queued) if envelope.op in _ENDS_TOKENS else queued
                if envelope.op == "store_compact":
                    reply = self._restarting_after(reply)
                self._commit(Job(actor, envelope.id, write, reply), envelope.op, args)
            elif inline and (where != "inline" or not self._inline_reads):
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
        """Answer a request refused before it reached the store; its audit record goes with the
        writer's next group commit (memos.refusals), so a refusal never waits for a disk."""
        self.memos.core.refused(actor, op, None, exc, rid)
        reply(p.error_reply(rid, exc))

    def _forgetting_tokens(self, reply):
        """Wrap the reply of an agent_remove or agent_rotate: once its commit is durable, drop verified
        tokens (the old one stops at once); a rotated administrator's token goes to its file."""

        def send(message: dict[str, Any]) -> None:
            self.identity.forget_tokens()  # runs in the writer after the commit, before the reply leaves
            result = message.get("result") if message.get("ok") else None
            if isinstance(result, dict) and result.get("name") == LOCAL_ADMIN.name and "token" in result \
                    and self.cfg.require_token:
                self.identity.write_admin_token(result["token"])  # the operator's file follows a rotation
            reply(message)

        return send

    def _restarting_after(self, reply):
        """Wrap the reply of a store_compact: once its request is durable and answered, memosd drains
        as on SIGTERM and main() starts it again in place; the new process rewrites the file as it
        opens the store, before anything else uses it. A retry answered from the stored reply, after
        the rewrite is done, finds nothing pending and restarts nothing."""

        def send(message: dict[str, Any]) -> None:
            reply(message)
            if message.get("ok") and self.memos.store.rewrite_pending():
                log.info("restarting in place to compact the store")
                # Announced beside the socket: clients wait for the new process instead of
                # reporting memosd gone (memos.liveness); the new one removes it once it listens.
                marker = restart_marker(self.socket_path)
                marker.write_text(f"{os.getpid()}\n")
                self.restart_in_place = True
                self._stop.set()

        return send

    def _answer_unread(self) -> None:
        """Before a restart in place closes the socket: requests taken but never read would go with
        it, and their clients would wait a look (``memos.client``) to find out. They are told instead
        (unavailable, ``restarting``), and a blocking client sends them again to the new process."""
        restarting = Unavailable("memosd is restarting in place (store_compact); send again", restarting=True)
        while self.router.getsockopt(_EVENTS) & _POLLIN:
            frames = self.router.recv_multipart()
            try:
                rid = p.request_id_of(p.decode(frames[1], self.cfg.max_message_bytes)) if len(frames) == 2 else None
            except MemosError:
                rid = None
            self._send_now(frames[0])(p.error_reply(rid, restarting))
