"""The PostgreSQL backend: the store's model in PostgreSQL, shared by several daemons.

The same sub-databases as the LMDB store (memos.storage.DATABASES and the memory
types'), each a table of the schema ``memos`` (memos.pgkv), read and written
through the same transaction interface, so everything above the store runs
unchanged. What PostgreSQL adds and LMDB's single writer gave for free:

* **One order of commits across daemons.** Every write transaction first takes
  the row lock of the ``meta`` row ``writer`` (``SELECT ... FOR UPDATE``) and
  holds it to its commit. The audit log is one hash chain over every change, so
  its commits must be totally ordered anyway; the lock makes each daemon's group
  commit read the heads and versions the previous commit left (READ COMMITTED
  statements after the lock see it), so versions stay contiguous per cube.
* **Notice of others' commits.** A commit that appended audit records sends
  ``NOTIFY memos_commits`` with the node that made it and the records' first and
  last sequence numbers, delivered by PostgreSQL when (and only if) it commits, in
  commit order; :meth:`PgStore.follow` hands them to the daemon (daemon/follower.py).
* **Snapshots.** A read is one REPEATABLE READ READ ONLY transaction, the
  consistent snapshot an LMDB read transaction is.
"""

from __future__ import annotations

import logging
import re
import secrets
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
from psycopg.pq import TransactionStatus

from . import codec
from .errors import MemosError, StorageError
from .pgkv import Table, Transaction, quote
from .storage import DATABASES, SCHEMA_VERSION, StoreOptions

log = logging.getLogger(__name__)
T = TypeVar("T")

SCHEMA = "memos"
CHANNEL = "memos_commits"
_AUDIT_HEAD = b"audit_head"  # memos.audit's meta key: the seq of the last record
_WRITER = b"writer"  # the meta row whose lock orders every write transaction


def redacted(url: str) -> str:
    """The URL without its password, for logs and replies."""
    url = re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)
    return re.sub(r"([?&]password=)[^&]*", r"\1***", url)


class _Read:
    """A read-only snapshot on a pooled connection (``with store.read() as txn``)."""

    __slots__ = ("store", "_ctx", "_cur")

    def __init__(self, store: PgStore) -> None:
        self.store = store

    def __enter__(self) -> Transaction:
        for attempt in (1, 2):
            self._ctx = self.store._pool.connection()
            try:
                conn = self._ctx.__enter__()
            except psycopg.Error as exc:  # no connection to be had: the server is away
                raise _storage_error(exc) from exc
            try:
                self._cur = conn.cursor(binary=True)
                self._cur.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                return Transaction(self._cur, write=False)
            except psycopg.Error as exc:
                self._ctx.__exit__(type(exc), exc, None)
                if attempt == 2 or not self.store._reconnect(exc):
                    raise _storage_error(exc) from exc
        raise AssertionError("unreachable")

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        try:
            self._cur.execute("ROLLBACK")
        except psycopg.Error:
            pass  # a broken connection: the pool closes it
        finally:
            self._ctx.__exit__(kind, exc, tb)
        if isinstance(exc, psycopg.Error):
            raise _storage_error(exc) from exc


class PgStore:
    """The store's sub-databases as tables in one PostgreSQL database."""

    backend = "postgresql"

    def __init__(self, url: str, options: StoreOptions | None = None,
                 extra_databases: dict[str, str] | None = None, *, pool_size: int = 16) -> None:
        self.url = url
        self.path = redacted(url)  # what replies and logs name the store by
        self.databases = {**DATABASES, **(extra_databases or {})}
        self.options = options or StoreOptions()
        self.node = secrets.token_hex(8)  # names this process's commits in notifications
        # With a follower (daemon/follower.py): the audit seqs of this process's own commits, put in
        # before COMMIT (so that no read can see them first) and taken out by the follower.
        self.own_seqs: set[int] | None = None
        self.db = {name: Table(SCHEMA, name) for name in self.databases}
        self._pool = _Pool(url, pool_size)
        try:
            try:
                self._create()
            except psycopg.Error as exc:  # refused, unknown host, no such database, timed out
                raise StorageError(f"cannot reach PostgreSQL at {self.path}: {exc}") from exc
            self.schema_version = self.write(self._check_schema)
        except BaseException:
            self._pool.close()
            raise

    def _create(self) -> None:
        """The schema and every table, if missing; safe when several daemons start at once."""
        with self._pool.connection() as conn:
            # One creator at a time: concurrent CREATE ... IF NOT EXISTS can still collide.
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(hashtext('memos schema'))")
                conn.execute(f"CREATE SCHEMA IF NOT EXISTS {quote(SCHEMA)}")
                for table in self.db.values():
                    conn.execute(table.create())
                meta = self.db["meta"]
                conn.execute(meta.sql("put_new"), (_WRITER, b""))

    def _check_schema(self, txn: Transaction) -> int:
        meta = self.db["meta"]
        raw = txn.get(b"schema_version", db=meta)
        if raw is None:
            txn.put(b"schema_version", codec.u64(SCHEMA_VERSION), db=meta)
            return SCHEMA_VERSION
        found = codec.from_u64(raw)
        if found != SCHEMA_VERSION:  # a store is copied in by memosctl migrate, upgraded first
            raise StorageError(f"store schema {found} in PostgreSQL; this memos reads {SCHEMA_VERSION}",
                               found=found, supported=SCHEMA_VERSION)
        return found

    # -- transactions ---------------------------------------------------

    def read(self) -> _Read:
        return _Read(self)

    def write(self, fn: Callable[[Transaction], T]) -> T:
        result = self.transact([fn])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def transact(self, fns: Sequence[Callable[[Transaction], Any]],
                 on_error: Callable[[Transaction, int, MemosError], None] | None = None) -> list[Any]:
        """Several units of work in one commit, each failing alone (see memos.storage.Store.transact).
        Under the writer row lock no two write transactions overlap, so PostgreSQL has no
        serialization failure or deadlock to report: any error of its is a storage error."""
        try:
            return self._transact_once(fns, on_error)
        except psycopg.Error as exc:
            raise _storage_error(exc) from exc

    def _reconnect(self, exc: psycopg.Error) -> bool:
        """After a connection failed before its transaction began (the server restarted, failed
        over): drop every broken pooled connection, so that one new attempt can succeed."""
        if not isinstance(exc, psycopg.OperationalError):
            return False
        log.warning("PostgreSQL connection lost (%s); reconnecting", exc)
        self._pool.drop_idle()  # the others were made before the loss too
        return True

    def _transact_once(self, fns: Sequence[Callable[[Transaction], Any]],
                       on_error: Callable[[Transaction, int, MemosError], None] | None) -> list[Any]:
        """The group without savepoints first (each costs round trips, and a unit rarely fails);
        if one fails, the group again with one savepoint per unit, so that it fails alone. Also
        once again on a new connection if the pooled one was found dead at BEGIN."""
        guarded, reconnected = False, False
        while True:
            try:
                return self._transact_on(fns, on_error, guarded)
            except _UnitFailed:
                guarded = True  # nothing of it was committed: the units are replayable
            except _NotBegun as exc:
                if reconnected:
                    raise exc.lost from exc
                reconnected = self._reconnect(exc.lost)

    def _transact_on(self, fns: Sequence[Callable[[Transaction], Any]],
                     on_error: Callable[[Transaction, int, MemosError], None] | None, guarded: bool) -> list[Any]:
        results: list[Any] = []
        meta = self.db["meta"]
        with self._pool.connection() as conn:
            cur = conn.cursor(binary=True)
            try:
                cur.execute("BEGIN")
            except psycopg.OperationalError as exc:
                raise _NotBegun(exc) from exc
            try:
                cur.execute(f"SELECT v FROM {meta.ident} WHERE k = %b FOR UPDATE", (_WRITER,))
                txn = Transaction(cur, write=True)
                first = _seq(txn.get(_AUDIT_HEAD, db=meta)) + 1
                single = len(fns) == 1 and on_error is None
                for i, fn in enumerate(fns):
                    if single:
                        results.append(fn(txn))
                        continue
                    if not guarded:
                        try:
                            results.append(fn(txn))
                        except MemosError as exc:
                            raise _UnitFailed() from exc
                        continue
                    txn.flush()  # the savepoint holds only this unit's rows
                    cur.execute("SAVEPOINT unit")
                    try:
                        results.append(fn(txn))
                        txn.flush()
                        cur.execute("RELEASE SAVEPOINT unit")
                    except MemosError as exc:
                        txn.discard()
                        cur.execute("ROLLBACK TO SAVEPOINT unit")
                        results.append(exc)
                        if on_error is not None:
                            on_error(txn, i, exc)
                last = _seq(txn.get(_AUDIT_HEAD, db=meta))
                if last >= first:  # sent at commit, in commit order, and only if it commits
                    cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL, f"{self.node} {first} {last}"))
                    if self.own_seqs is not None:
                        self.own_seqs.update(range(first, last + 1))
                txn.flush()
            except MemosError as exc:
                cur.execute("ROLLBACK")
                if len(fns) == 1 and on_error is None:
                    return [exc]
                raise
            except BaseException:
                try:
                    cur.execute("ROLLBACK")
                except psycopg.Error:
                    pass
                raise
            try:
                cur.execute("COMMIT")
            except BaseException:
                if last >= first and self.own_seqs is not None:  # not ours: another commit takes them
                    self.own_seqs.difference_update(range(first, last + 1))
                raise
        return results

    # -- other daemons' commits ----------------------------------------

    def follow(self, on_commits: Callable[[str | None, int, int], None], stop: threading.Event,
               poll_s: float = 1.0) -> None:
        """Call ``on_commits(node, first, last)`` for each notified commit, in commit order, and
        ``on_commits(None, 0, 0)`` every ``poll_s`` and after a reconnection (when notices may
        have been missed): the caller then reads the audit log past what it has seen. Runs until
        ``stop`` is set; meant for a thread of its own."""
        while not stop.is_set():
            try:
                with psycopg.connect(self.url, autocommit=True) as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    on_commits(None, 0, 0)
                    while not stop.is_set():
                        got = False
                        for note in conn.notifies(timeout=poll_s, stop_after=64):
                            node, first, last = note.payload.split()
                            on_commits(node, int(first), int(last))
                            got = True
                        if not got:
                            on_commits(None, 0, 0)
            except psycopg.Error as exc:
                log.warning("listening for other daemons' commits: %s; reconnecting", exc)
                stop.wait(poll_s)

    # -- housekeeping ---------------------------------------------------

    def sync(self) -> None:
        """Commits are durable when they return (PostgreSQL's synchronous_commit)."""

    def close(self) -> None:
        self._pool.close()

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path}
        with self.read() as txn:
            for name, db in self.db.items():
                out[name] = txn.stat(db)["entries"]
        return out

    def space(self, databases: dict[str, dict[str, int]]) -> dict[str, Any]:
        """Where the bytes go (``store_stats``): each sub-database's table on disk, its indexes and
        TOAST included; PostgreSQL has no map nor pages to show."""
        with self.read() as txn:
            sizes = {name: txn._rows("SELECT pg_total_relation_size(%s::regclass)", (db.ident,))[0][0]
                     for name, db in self.db.items()}
        return {"file_bytes": sum(sizes.values()), "map_size": None, "page_size": None, "pages": None,
                "databases": {name: {"entries": s["entries"], "bytes": sizes[name]} for name, s in databases.items()}}

    def rewrite_pending(self) -> bool:
        return False  # PostgreSQL gives space back itself (VACUUM); there is no file to rewrite


class _Pool:
    """Connections to the server, reused: opened when asked for (at most ``size`` at once) and
    closed when broken. No background thread and no back-off: after an outage, the next request
    connects at once, and while the server is away a request fails at once."""

    def __init__(self, url: str, size: int, wait_s: float = 30.0, connect_timeout_s: int = 5) -> None:
        self.url, self.size, self.wait_s, self.connect_timeout_s = url, size, wait_s, connect_timeout_s
        self._idle: list[psycopg.Connection[Any]] = []
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(size)

    @contextmanager
    def connection(self) -> Iterator[psycopg.Connection[Any]]:
        if not self._slots.acquire(timeout=self.wait_s):
            raise StorageError(f"all {self.size} connections to PostgreSQL stayed busy for {self.wait_s:.0f} s")
        conn = None
        try:
            with self._lock:
                conn = self._idle.pop() if self._idle else None
            if conn is None:
                conn = psycopg.connect(self.url, autocommit=True, connect_timeout=self.connect_timeout_s)
            yield conn
        finally:
            if conn is not None:
                if conn.closed or conn.info.transaction_status != TransactionStatus.IDLE:
                    conn.close()  # broken, or left inside a transaction: never reused
                else:
                    with self._lock:
                        self._idle.append(conn)
            self._slots.release()

    def drop_idle(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    def close(self) -> None:
        self.drop_idle()


class _UnitFailed(Exception):
    """A unit of a group run without savepoints failed: the group runs again with them."""


class _NotBegun(Exception):
    """A pooled connection failed at BEGIN: nothing of the transaction reached the server."""

    def __init__(self, lost: psycopg.OperationalError) -> None:
        super().__init__(str(lost))
        self.lost = lost


def _seq(raw: bytes | None) -> int:
    return 0 if raw is None else codec.unpack(raw)["seq"]


def _storage_error(exc: psycopg.Error) -> StorageError:
    return StorageError(f"PostgreSQL error: {exc}".strip())
