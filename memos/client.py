"""The client library: :class:`AsyncClient`, and :class:`Client` generated from it.

Its operation methods are generated from the operations' declarations
(:mod:`memos.catalog` and each registered memory type): the same names,
arguments and result types the daemon serves, never a hand-written copy.

One DEALER connection carries many concurrent requests; a reader task matches
replies to callers by request id. A request that gets no reply in time is
resent with the *same* id, so a retried write is applied once. Errors come
back as the same exception classes the daemon raised (``memos.errors``).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import itertools
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio

from . import catalog, endpoints, watching
from . import protocol as p
from .errors import InvalidRequest, MemosError, Timeout, TooLarge, Unavailable, from_wire
from .extraction import messages_to_memories
from .liveness import check_daemon
from .memtypes import load_types
from .models import Event, Memory, plain
from .operations import Operation


def default_socket() -> Path | str:
    """Where memosd listens unless told otherwise: MEMOS_SOCKET, else the configured default."""
    named = os.environ.get("MEMOS_SOCKET") or os.environ.get("MEMOS_DAEMON__SOCKET")
    if named:
        return endpoints.target(named)
    from .config import load

    return load().daemon.socket_path()


_LOOK_EVERY_MS = 1000  # a blocking call checks that the daemon is still there this often while it waits
_LOOK_WHILE_RESTARTING_MS = 50  # ...and this often while memosd restarts in place, to resend at once


def _went_away(exc: Unavailable, op: str) -> Unavailable:
    return Unavailable(f"{exc.message} (it went away while {op!r} waited for its reply, "
                       "which may or may not have been applied)", **exc.details)


class _RequestIds:
    """Request ids: a random prefix per process and one counter for all its clients.

    Unique without a syscall per request. The daemon keys retries by agent and
    request id, so a forked child must not repeat its parent's ids: it draws a
    new prefix.
    """

    def __init__(self) -> None:
        self.renew()

    def renew(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.counter = itertools.count(1)


_rids = _RequestIds()


def _ignore(part: Any) -> None:
    """Where a stream's pieces go when the caller does not listen."""
os.register_at_fork(after_in_child=_rids.renew)


class AsyncClient:
    """Talk to memosd from asyncio code."""

    def __init__(
        self, socket: str | os.PathLike[str] | None = None, *, token: str | None = None,
        timeout: float = 30.0, retries: int = 2, max_message_bytes: int = 64 << 20,
        server_key: str | bytes | None = None,
    ) -> None:
        # An ipc path, or "tcp://HOST:PORT" with memosd's CURVE public key (memos.endpoints).
        self.socket_path = endpoints.target(socket) if socket is not None else default_socket()
        self.server_key = endpoints.server_key(server_key, self.socket_path)
        self.token = token if token is not None else os.environ.get("MEMOS_TOKEN") or None
        self.timeout = timeout
        self.retries = retries
        self.max_message_bytes = max_message_bytes
        self._ctx = zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket | None = None
        self._pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._partials: dict[str, list[Any]] = {}  # request id -> [callback, when the last piece came]
        self._reader: asyncio.Task[None] | None = None

    # -- plumbing -------------------------------------------------------

    def _connect(self) -> zmq.asyncio.Socket:
        if self._sock is None:
            check_daemon(self.socket_path)  # no daemon: fail now, not after every timeout
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            endpoints.connect(sock, self.socket_path, self.server_key)
            self._sock = sock
            self._reader = asyncio.get_running_loop().create_task(self._read_replies())
        return self._sock

    async def _read_replies(self) -> None:
        assert self._sock is not None
        while True:
            try:
                frame = await self._sock.recv()
            except (zmq.ZMQError, asyncio.CancelledError):
                return
            try:
                reply = p.decode(frame, 1 << 62)
            except MemosError:
                continue
            rid = reply.get("id")
            if not isinstance(rid, str):
                continue
            if "partial" in reply:  # a streaming operation's piece: the request goes on
                listener = self._partials.get(rid)
                if listener is not None:
                    listener[1] = time.monotonic()
                    try:
                        listener[0](reply["partial"])
                    except Exception as exc:  # the caller's callback failed: its call fails, not the reader
                        future = self._pending.pop(rid, None)
                        if future is not None and not future.done():
                            future.set_exception(exc)
                continue
            future = self._pending.pop(rid, None)
            if future is not None and not future.done():
                future.set_result(reply)

    def _frame(self, op: str, args: dict[str, Any]) -> tuple[str, bytes]:
        """A request frame and its id."""
        spec = OPERATIONS.get(op)
        if spec is None:
            raise InvalidRequest(f"unknown operation {op!r}")
        rid = f"{_rids.prefix}{next(_rids.counter):x}"
        # None means "not given", except for a required field whose value may be
        # null (cube_grant's role: null revokes), which must be sent as such.
        required = spec.required
        message: dict[str, Any] = {"v": p.PROTOCOL_VERSION, "id": rid, "op": op,
                                   "args": {k: v for k, v in args.items() if v is not None or k in required}}
        if self.token:
            message["token"] = self.token
        frame = p.encode(message)
        if len(frame) > self.max_message_bytes:
            raise TooLarge(f"request of {len(frame)} bytes exceeds {self.max_message_bytes}", size=len(frame))
        return rid, frame

    @staticmethod
    def _result(reply: dict[str, Any]) -> Any:
        if reply.get("ok"):
            return reply.get("result")
        error = reply.get("error") or {}
        raise from_wire(str(error.get("code", "internal")), str(error.get("message", "")),
                        error.get("details") if isinstance(error.get("details"), dict) else None)

    def _tries(self, op: str) -> int:
        """Sends of one request: a timed-out one is resent with the same id, except a stream's."""
        spec = OPERATIONS.get(op)
        return 1 if spec is not None and spec.streams else self.retries + 1

    def _gave_up(self, tries: int) -> Timeout:
        return Timeout(f"no reply from memosd at {self.socket_path} after {tries} tries of {self.timeout}s")

    async def call(self, op: str, on_partial: Callable[[Any], None] | None = None, **args: Any) -> Any:
        """Send one request and return its result, raising the daemon's error.

        ``on_partial`` gets each partial result of a streaming operation as it
        arrives; each one also restarts the wait for the next. A streaming
        operation is never resent: a second run would stream its pieces too.
        """
        rid, frame = self._frame(op, args)
        tries = self._tries(op)
        while tries > 0:
            future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
            self._pending[rid] = future
            self._partials[rid] = [on_partial or _ignore, time.monotonic()]
            sent_to = _inode(self.socket_path)
            await self._connect().send(frame)  # a new socket if another call gave up meanwhile
            try:
                while True:
                    try:
                        wait = min(self.timeout, _LOOK_EVERY_MS / 1000)
                        reply = await asyncio.wait_for(asyncio.shield(future), wait)
                    except asyncio.TimeoutError:
                        listener = self._partials.get(rid)
                        if listener is None or time.monotonic() - listener[1] >= self.timeout:
                            raise
                        await self._still_there(op)  # a daemon that died will not answer: say so now
                        continue
                    if _restarting(reply) and self._tries(op) > 1:  # (a stream is never sent twice)
                        break  # taken by a process that restarts in place: sent again to the new one
                    return self._result(reply)
            except asyncio.TimeoutError:
                tries -= 1
                continue  # resend with the same id: the daemon applies a write once
            finally:
                self._pending.pop(rid, None)
                self._partials.pop(rid, None)
            await self._restarted(sent_to, op)  # then the same frame again, applied once
        # ZeroMQ keeps frames queued while it reconnects: a request given up on must not reach a
        # daemon that comes back later, so its socket goes (the next call opens a new one).
        await self.close()
        raise self._gave_up(self._tries(op))

    async def _restarted(self, sent_to: Any, op: str) -> None:
        """Wait, at most a timeout, until memosd restarting in place listens again."""
        deadline = time.monotonic() + self.timeout
        while (listening := _inode(self.socket_path)) is None or listening == sent_to:
            if time.monotonic() >= deadline:
                raise Timeout(f"memosd at {self.socket_path} did not come back from its restart within "
                              f"{self.timeout}s ({op!r} was not applied)")
            await asyncio.sleep(_LOOK_WHILE_RESTARTING_MS / 1000)

    async def _still_there(self, op: str) -> None:
        """While a call waits: if the daemon is gone, drop the socket (what is queued on it must not
        reach a successor) and say so, rather than wait out every try."""
        try:
            check_daemon(self.socket_path)
        except Unavailable as exc:
            await self.close()
            raise _went_away(exc, op) from None

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except asyncio.CancelledError:
                pass
            self._reader = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def discard(self) -> None:
        """Close the socket of a client whose event loop is gone (``close`` needs that loop)."""
        self._reader = None
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- operations -----------------------------------------------------
    # Every operation's method is generated from its declaration (see _operation_method).

    async def add_messages(
        self, cube: str, messages: Sequence[dict[str, Any]], *, session: str | None = None,
        date: str | None = None, tags: Sequence[str] = (),
    ) -> list[Memory]:
        """Store a conversation: one memory per message with speaker, date, session, position."""
        # AsyncClient's own coroutine: on the blocking Client, self.add_many is already blocking.
        items = messages_to_memories(messages, session=session, date=date, tags=tags)
        return await AsyncClient.add_many(self, cube, items)

    async def events(self, cube: str | None = None) -> AsyncIterator[Event]:
        """Change events as they happen, of one cube or of every cube this agent may read
        (:mod:`memos.watching`); ends when memosd stops, raises Unavailable if it dies. The
        subscription is made at the first ``__anext__``; ``subscribe`` makes it at once."""
        async for event in await self.subscribe(cube):
            yield event

    async def subscribe(self, cube: str | None = None) -> AsyncIterator[Event]:
        """Subscribe to change events now: returns once memosd has acknowledged (a cube this
        agent may not read raises here), so what follows is seen; iterate the result."""
        return await watching.subscribe(self, cube)


def declared_operations() -> dict[str, Operation]:
    """Every operation a daemon of this installation serves: the core's and each memory type's."""
    ops = {op.name: op for op in catalog.core_operations()}
    for cls in load_types().values():
        ops.update((op.name, op) for op in cls.operations)
    return ops


def _operation_method(op: Operation) -> Callable[..., Any]:
    """``AsyncClient.<op>``: its signature from the argument model, its return value the declared result."""
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for name in op.positional:
        default = inspect.Parameter.empty if name in op.required else None
        params.append(inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default,
                                        annotation=op.args.model_fields[name].annotation))
    for name, info in op.args.model_fields.items():
        if name not in op.positional:
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=info.annotation,
                                            default=inspect.Parameter.empty if name in op.required else None))
    if op.streams:
        params.append(inspect.Parameter("on_partial", inspect.Parameter.KEYWORD_ONLY, default=None,
                                        annotation=Callable[[Any], None] | None))
    signature = inspect.Signature(params, return_annotation=op.result)
    adapter, name, positional = op.result_type, op.name, op.positional
    fields, required, streams = frozenset(op.args.model_fields), op.required, op.streams

    async def method(self: AsyncClient, *args: Any, **kwargs: Any) -> Any:
        # signature.bind's checks, by hand: bind costs microseconds on every call.
        if len(args) > len(positional):
            raise TypeError(f"{name}() takes {len(positional)} positional arguments, {len(args)} given")
        values = {key: plain(value) for key, value in zip(positional, args)}
        on_partial = kwargs.pop("on_partial", None) if streams else None
        for key, value in kwargs.items():
            if key not in fields or key in values:
                raise TypeError(f"{name}() got an unexpected or repeated argument {key!r}")
            values[key] = plain(value)
        if not required <= values.keys():
            raise TypeError(f"{name}() is missing {sorted(required - values.keys())}")
        return adapter.validate_python(await self.call(name, on_partial, **values))

    method.__name__ = method.__qualname__ = op.name
    method.__doc__ = op.doc
    method.__signature__ = signature  # type: ignore[attr-defined]
    return method


OPERATIONS = declared_operations()
for _op in OPERATIONS.values():
    if _op.name != "watch":  # events() makes it: the stream stays open
        setattr(AsyncClient, _op.name, _operation_method(_op))


class Client(AsyncClient):
    """The blocking client: every operation of AsyncClient, without an event loop.

    The operations are AsyncClient's own coroutines; ``call`` is overridden by
    a blocking one that never suspends, so each coroutine runs to completion in
    a single step (see ``_blocking``). Each thread gets its own socket.
    """

    def __init__(self, socket: str | os.PathLike[str] | None = None, **options: Any) -> None:
        super().__init__(socket, **options)
        self._local = threading.local()
        self._sockets: list[zmq.Socket] = []
        self._sockets_lock = threading.Lock()

    def _socket(self) -> zmq.Socket:
        sock = getattr(self._local, "sock", None)
        if sock is None:
            check_daemon(self.socket_path)  # no daemon: fail now, not after every timeout
            sock = zmq.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            self._local.rcvtimeo = sock.RCVTIMEO  # set per wait, only when it changes
            endpoints.connect(sock, self.socket_path, self.server_key)
            self._local.sock = sock
            with self._sockets_lock:
                self._sockets.append(sock)
        return sock

    async def call(self, op: str, on_partial: Callable[[Any], None] | None = None, **args: Any) -> Any:
        return self.request(op, on_partial, **args)

    def request(self, op: str, on_partial: Callable[[Any], None] | None = None, **args: Any) -> Any:
        """Send one request and wait for its result, resending with the same id on timeout.

        ``on_partial`` gets each partial result of a streaming operation; each restarts the wait.
        """
        rid, frame = self._frame(op, args)
        sock = self._socket()
        for _ in range(self._tries(op)):
            sock.send(frame)
            deadline = time.monotonic() + self.timeout
            wait_ms = min(_LOOK_EVERY_MS, max(1, int(self.timeout * 1000)))
            sent_to, told = _inode(self.socket_path), False
            while True:
                if self._local.rcvtimeo != wait_ms:
                    sock.RCVTIMEO = self._local.rcvtimeo = wait_ms
                try:
                    reply = p.decode(sock.recv(), 1 << 62)
                except zmq.Again:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._check_still_there(op)  # a daemon that died meanwhile will not answer: say so now
                    listening = _inode(self.socket_path)
                    if listening is not None and listening != sent_to:
                        # memosd started again (in place: store_compact) since this was sent: a request
                        # the old process had taken but not read went with it. Sent again under the same
                        # id, it is applied once (or answered from its stored reply).
                        sent_to, told = listening, False
                        sock.send(frame)
                        deadline = time.monotonic() + self.timeout
                    # Told so, or no socket while the check above passed: a restart in place is under way.
                    look = _LOOK_WHILE_RESTARTING_MS if told or listening is None else _LOOK_EVERY_MS
                    wait_ms = min(look, max(1, int((deadline - time.monotonic()) * 1000)))
                    continue
                if reply.get("id") == rid:
                    if _restarting(reply):  # taken by a process that restarts in place: sent again
                        told, wait_ms = True, _LOOK_WHILE_RESTARTING_MS  # once the new one listens (above)
                        continue
                    if "partial" not in reply:
                        return self._result(reply)
                    if on_partial is not None:
                        on_partial(reply["partial"])
                    deadline = time.monotonic() + self.timeout  # the stream is alive
                # A late reply to an earlier, abandoned request: drop it, wait out the rest.
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                wait_ms = min(_LOOK_EVERY_MS, max(1, int(left * 1000)))
        self._drop_socket()  # as AsyncClient.call: what is still queued must never be sent
        raise self._gave_up(self._tries(op))

    def _check_still_there(self, op: str) -> None:
        """AsyncClient._still_there, blocking: this thread's socket goes."""
        try:
            check_daemon(self.socket_path)
        except Unavailable as exc:
            self._drop_socket()
            raise _went_away(exc, op) from None

    def _drop_socket(self) -> None:
        sock = getattr(self._local, "sock", None)
        if sock is not None:
            self._local.sock = None
            with self._sockets_lock:
                self._sockets.remove(sock)
            sock.close(linger=0)

    def close(self) -> None:  # type: ignore[override]
        with self._sockets_lock:
            for sock in self._sockets:
                sock.close(linger=0)
            self._sockets.clear()
        self._local = threading.local()

    def events(self, cube: str | None = None, timeout: float | None = None) -> Iterator[Event]:  # type: ignore[override]
        """Change events of one cube, or of every cube this agent may read; stops after ``timeout``
        seconds without one (None: never), or when memosd stops.

        The subscription is acknowledged before this returns, not at the first ``next``: a
        caller can subscribe, then start what it wants to watch. A cube this agent may not
        read raises here (Denied, NotFound). See :mod:`memos.watching`.
        """
        return watching.follow(self, cube, timeout)

    def subscribe(self, cube: str | None = None, timeout: float | None = None) -> Iterator[Event]:  # type: ignore[override]
        """``events``: on the blocking client, subscribing is already done when it returns."""
        return self.events(cube, timeout)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _restarting(reply: dict[str, Any]) -> bool:
    """memosd's answer to a request it took but could not serve before restarting in place."""
    error = reply.get("error")
    return (reply.get("ok") is False and isinstance(error, dict) and error.get("code") == "unavailable"
            and isinstance(error.get("details"), dict) and error["details"].get("restarting") is True)


def _inode(path: Path | str) -> tuple[int, int] | None:
    """Which socket file is there: a daemon that starts again binds a new one (an inode number may
    be reused at once, its change time not). A tcp endpoint has no file: always the same."""
    if endpoints.is_tcp(path):
        return 0, 0
    try:
        found = os.stat(path)
    except OSError:
        return None
    return found.st_ino, found.st_ctime_ns


def _blocking(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def run(self: Client, *args: Any, **kwargs: Any) -> Any:
        coro = method(self, *args, **kwargs)
        try:
            coro.send(None)
        except StopIteration as done:
            return done.value
        coro.close()
        raise RuntimeError(f"{method.__name__} suspended; blocking operations must only await call()")

    return run


_NOT_OPERATIONS = {"call", "close", "events", "subscribe", "__aenter__", "__aexit__"}
for _name, _method in inspect.getmembers(AsyncClient, inspect.iscoroutinefunction):
    if not _name.startswith("_") and _name not in _NOT_OPERATIONS:
        setattr(Client, _name, _blocking(_method))
