"""The LMDB layer: one environment, named sub-databases, typed errors.

Everything above this module sees transactions, never lmdb exceptions. Writes
are expressed as functions of a transaction so that a full map can be grown
and the same work replayed: nothing is lost to ``MapFullError``.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import lmdb

from . import codec, tokens
from .durable import fsync_path
from .errors import InvalidRequest, MemosError, StorageError, TooLarge

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_KEY_BYTES = 511

# name -> what it holds. Declared once; opened together at start-up.
DATABASES: dict[str, str] = {
    "meta": "schema version, audit head, store-wide settings",
    "cubes": "cube name -> Cube record",
    "heads": "cube\\0memory id -> u64 version + current state bytes",
    "versions": "cube\\0memory id\\0u64 version -> state bytes ('' = absent)",
    "commits": "cube\\0u64 version -> Commit record",
    "audit": "u64 seq -> AuditRecord",
    "blobs": "sha256 hex -> blob bytes",
    "blob_refs": "sha256 hex -> u64 count of version records referring to it",
    "cube_blobs": "cube\\0sha256 hex -> u64 count of that cube's version records using it",
    "usage": "cube\\0memory id -> Usage record",
    "agents": "agent name -> Agent record (stable id, salted token hash, created)",
    "agent_ids": "agent id -> agent name (ids are what cubes' owners and access lists hold)",
    "requests": "agent id (or admin)\\0request id -> {time, reply}: a write's stored reply (idempotent retries)",
    "proposals": "proposal id -> rollback proposal record",
    "policy_runs": "run id -> policy run record (what a policy looked at, did and why)",
    "policy_state": "policy name -> {last run, its time}: schedules resume from it after a restart",
    "request_times": "u64 ms stored + agent\\0request id -> '' (stored replies oldest first, for pruning)",
}
# Memory types declare their own sub-databases; they are opened as "<type>/<name>".

SCHEMA_VERSION = 4

# from-version -> function upgrading a store in place to from-version + 1.
Migration = Callable[["Store", lmdb.Transaction], None]


_REWRITE_PENDING = b"rewrite_pending"  # meta: the file still holds freed pages that must go
# ...its value: b"" (set by a migration) or a store_compact request (msgpack; memos.store_admin)
LAST_REWRITE = b"last_compaction"  # meta: what the last requested rewrite did (memos.store_admin audits it)


def request_time_key(stored_at: float, key: bytes) -> bytes:
    """The ``request_times`` key of a reply stored under ``key`` at ``stored_at`` (epoch seconds)."""
    return codec.u64(max(0, int(stored_at * 1000))) + key


def _index_stored_replies(store: Store, txn: lmdb.Transaction) -> None:
    """Schema 2: index stored replies by time, so that pruning reads only expired ones."""
    for key, raw in txn.cursor(db=store.db["requests"]):
        txn.put(request_time_key(codec.unpack(raw)["time"], bytes(key)), b"", db=store.db["request_times"])


def _vectors_to_plaintext(store: Store, txn: lmdb.Transaction) -> None:
    """Schema 3: sub-databases of memory types are named "<type>/<name>": ``vectors`` is plaintext's."""
    try:
        old = store.env.open_db(b"vectors", txn=txn, create=False)
    except lmdb.NotFoundError:
        return
    new = store.env.open_db(b"plaintext/vectors", txn=txn)
    for key, value in txn.cursor(db=old):
        txn.put(key, value, db=new)
    txn.drop(old, delete=True)


def _agent_ids(store: Store, txn: lmdb.Transaction) -> None:
    """Schema 4: agents get stable ids, which cubes and stored replies reference instead of names;
    token hashes get a salt; stored replies that held a token are forgotten."""
    agents, ids, cubes = store.db["agents"], store.db["agent_ids"], store.db["cubes"]
    by_name = {"admin": "admin"}
    for key, raw in list(txn.cursor(db=agents)):
        record = codec.unpack(raw)
        if "id" not in record:
            record["id"] = "agent:" + secrets.token_hex(8)
            record["salt"] = tokens.new_salt()
            record["token_hash"] = tokens.salted_from_plain(record["salt"], record.pop("token_sha256"))
            txn.put(bytes(key), codec.pack(record), db=agents)
        txn.put(record["id"].encode(), bytes(key), db=ids)
        by_name[record["name"]] = record["id"]
    for key, raw in list(txn.cursor(db=cubes)):
        cube = codec.unpack(raw)  # an owner no agent holds any more: the administrator's now
        cube["owner"] = by_name.get(cube["owner"], "admin")
        cube["acl"] = {by_name[name]: role for name, role in cube["acl"].items() if name in by_name}
        txn.put(bytes(key), codec.pack_unsorted(cube), db=cubes)
    requests, times = store.db["requests"], store.db["request_times"]
    for key, raw in list(txn.cursor(db=requests)):
        key = bytes(key)
        stored = codec.unpack(raw)
        txn.delete(key, db=requests)
        txn.delete(request_time_key(stored["time"], key), db=times)
        result = (stored.get("reply") or {}).get("result")
        if isinstance(result, dict) and "token" in result:
            # A token must not stay in the store, nor on the page that held it.
            txn.put(_REWRITE_PENDING, b"", db=store.db["meta"])
            continue
        name, _, rid = key.partition(b"\0")
        moved = by_name.get(name.decode(), name.decode()).encode() + b"\0" + rid
        txn.put(moved, codec.pack_unsorted(stored), db=requests)
        txn.put(request_time_key(stored["time"], moved), b"", db=times)


MIGRATIONS: dict[int, Migration] = {1: _index_stored_replies, 2: _vectors_to_plaintext, 3: _agent_ids}


@dataclass(frozen=True)
class StoreOptions:
    map_size: int = 64 << 30  # sparse on 64-bit: reserves address space, not disk
    max_readers: int = 512
    sync: bool = True  # durable commits; only benchmarks of the raw floor turn it off


class _ResizeGate:
    """Lets transactions run together but resizes the map only when none is open."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active = 0
        self._resizing = False

    def enter(self) -> None:
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._active += 1

    def leave(self) -> None:
        with self._cond:
            self._active -= 1
            if self._resizing and not self._active:  # only a resize waits on this
                self._cond.notify_all()

    @contextmanager
    def open(self) -> Iterator[None]:
        self.enter()
        try:
            yield
        finally:
            self.leave()

    def exclusive(self, fn: Callable[[], None]) -> None:
        with self._cond:
            while self._resizing:
                self._cond.wait()
            self._resizing = True
            while self._active:
                self._cond.wait()
        try:
            fn()
        finally:
            with self._cond:
                self._resizing = False
                self._cond.notify_all()


def check_key(key: bytes) -> bytes:
    if len(key) > MAX_KEY_BYTES:
        raise TooLarge(f"key of {len(key)} bytes exceeds LMDB's {MAX_KEY_BYTES}", size=len(key))
    return key


class _Snapshot:
    """A read transaction inside the resize gate; a class, not a generator: every read pays for it."""

    __slots__ = ("store", "txn")

    def __init__(self, store: Store) -> None:
        self.store = store
        self.txn: lmdb.Transaction | None = None

    def __enter__(self) -> lmdb.Transaction:
        store = self.store
        for _ in range(3):
            store._gate.enter()
            try:
                self.txn = store.env.begin(write=False)
                return self.txn
            except lmdb.MapResizedError:
                store._gate.leave()
                # Adopting needs every transaction of this process closed, this
                # read's gate slot included: doing it inside the gate deadlocked.
                store._adopt_resize()
            except lmdb.Error as exc:
                store._gate.leave()
                raise _translate(exc) from exc
        raise StorageError("map keeps being resized by another process; retry")

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        try:
            self.txn.abort()
        finally:
            self.store._gate.leave()
        if exc is not None and isinstance(exc, lmdb.Error):
            raise _translate(exc) from exc


class Store:
    """An LMDB environment with the sub-databases memos declares."""

    backend = "lmdb"

    def __init__(self, path: str | os.PathLike[str], options: StoreOptions | None = None,
                 extra_databases: dict[str, str] | None = None) -> None:
        """``extra_databases``: the sub-databases of memory types, "<type>/<name>" -> what they hold."""
        self.path = os.fspath(path)
        self.databases = {**DATABASES, **(extra_databases or {})}
        self.options = options or StoreOptions()
        self._gate = _ResizeGate()
        os.makedirs(self.path, mode=0o700, exist_ok=True)
        os.chmod(self.path, 0o700)
        self._open()
        try:
            self._migrate()
            with self.read() as txn:
                pending = txn.get(_REWRITE_PENDING, db=self.db["meta"])
            if pending is not None:  # set by a migration or store_compact, cleared once done:
                try:  # a crash in between redoes it
                    done = self._rewrite_live_pages()
                except (OSError, lmdb.Error) as exc:
                    if not pending:  # a migration's: the pages it freed held secrets, they must go
                        raise
                    # A full disk, say: the old file is whole (a crash could leave it too), so the
                    # store opens as it was, and the requested rewrite is tried at the next opening.
                    log.error("compacting the store failed; it is used as it was: %s", exc)
                    shutil.rmtree(os.path.join(self.path, "compacting"), ignore_errors=True)
                    if not self._is_open():
                        self._open()
                else:
                    self.write(lambda txn: self._rewritten(txn, bytes(pending), done))
        except BaseException as exc:
            # An environment left open blocks every later open of this path in
            # this process, so a refused store must be closed before raising.
            self.env.close()
            if isinstance(exc, lmdb.Error):
                raise _translate(exc) from exc
            raise

    def _open(self) -> None:
        try:
            self.env = lmdb.open(
                self.path,
                map_size=self.options.map_size,
                max_dbs=len(self.databases) + 8,
                max_readers=self.options.max_readers,
                mode=0o600,
                sync=self.options.sync,
                metasync=self.options.sync,
            )
        except lmdb.Error as exc:
            raise StorageError(f"cannot open store at {self.path}: {exc}") from exc
        try:
            stale = self.env.reader_check()  # slots of readers that died holding them
            if stale:
                log.warning("cleared %d stale LMDB reader slots", stale)
            self.db = {name: self.env.open_db(name.encode()) for name in self.databases}
        except BaseException:
            self.env.close()
            raise

    def _rewrite_live_pages(self) -> dict[str, Any]:
        """Replace the file by a compacting copy of itself: pages a migration or deletions freed
        (which LMDB keeps, bytes and all, until it reuses them) are gone from the disk too. A crash
        leaves the old file or the new one, each a whole store: the copy is flushed before the
        atomic rename, and the rename before the copy's folder goes. Runs at open, before anything
        else in this process uses the environment, so no write can land in the old file after the
        copy began. What it did: the file's size before and after, and the seconds it took."""
        began, data = time.monotonic(), os.path.join(self.path, "data.mdb")
        before = os.stat(data).st_size
        folder = os.path.join(self.path, "compacting")
        shutil.rmtree(folder, ignore_errors=True)
        os.mkdir(folder, mode=0o700)
        self.env.copy(folder, compact=True)
        hold_at("compact:copied")
        copy = os.path.join(folder, "data.mdb")
        fsync_path(copy)
        hold_at("compact:synced")
        self.env.close()
        os.replace(copy, data)
        hold_at("compact:renamed")
        fsync_path(self.path)  # the rename itself
        os.rmdir(folder)
        self._open()
        hold_at("compact:reopened")
        done = {"bytes_before": before, "bytes_after": os.stat(data).st_size,
                "copy_s": round(time.monotonic() - began, 6), "done_at": time.time()}
        log.info("store rewritten without freed pages", extra={"path": self.path, **done})
        return done

    def _is_open(self) -> bool:
        try:
            self.env.info()
        except lmdb.Error:
            return False
        return True

    def _rewritten(self, txn: lmdb.Transaction, request: bytes, done: dict[str, Any]) -> None:
        """The rewrite is over: no longer pending, and what a requested one did is kept to be audited."""
        txn.delete(_REWRITE_PENDING, db=self.db["meta"])
        if request:  # a migration's rewrite (b"") was asked for by nobody
            record = {**codec.unpack(request), **done, "audited": False}
            txn.put(LAST_REWRITE, codec.pack_unsorted(record), db=self.db["meta"])

    def request_rewrite(self, txn: lmdb.Transaction, request: dict[str, Any]) -> None:
        """Rewrite the file as a compacting copy when the store is next opened (``store_compact``)."""
        txn.put(_REWRITE_PENDING, codec.pack_unsorted(request), db=self.db["meta"])

    def rewrite_pending(self) -> bool:
        with self.read() as txn:
            return txn.get(_REWRITE_PENDING, db=self.db["meta"]) is not None

    # -- schema ---------------------------------------------------------

    def _migrate(self) -> None:
        def step(txn: lmdb.Transaction) -> int:
            raw = txn.get(b"schema_version", db=self.db["meta"])
            if raw is None:
                txn.put(b"schema_version", codec.u64(SCHEMA_VERSION), db=self.db["meta"])
                return SCHEMA_VERSION
            found = codec.from_u64(raw)
            if found > SCHEMA_VERSION:
                raise StorageError(
                    f"store schema {found} is newer than this memos ({SCHEMA_VERSION})",
                    found=found, supported=SCHEMA_VERSION,
                )
            while found < SCHEMA_VERSION:
                migration = MIGRATIONS.get(found)
                if migration is None:
                    raise StorageError(f"no migration from schema {found}", found=found)
                migration(self, txn)
                found += 1
                txn.put(b"schema_version", codec.u64(found), db=self.db["meta"])
            return found

        self.schema_version = self.write(step)

    # -- transactions ---------------------------------------------------

    def read(self) -> _Snapshot:
        """A consistent snapshot for reads (``with store.read() as txn``); several may run at once."""
        return _Snapshot(self)

    def write(self, fn: Callable[[lmdb.Transaction], T]) -> T:
        """Run ``fn`` in one durable write transaction; replay it if the map fills."""
        result = self.transact([fn])[0]
        if isinstance(result, BaseException):
            raise result
        return result

    def transact(
        self,
        fns: Sequence[Callable[[lmdb.Transaction], Any]],
        on_error: Callable[[lmdb.Transaction, int, MemosError], None] | None = None,
    ) -> list[Any]:
        """Run several units of work in one durable commit (group commit).

        Each unit runs in a child transaction: one that raises a MemosError is
        rolled back alone, its exception is returned in its slot, and
        ``on_error`` may record it in the same commit. Everything becomes
        durable together when this returns.
        """
        while True:
            try:
                with self._gate.open():
                    return self._transact_once(fns, on_error)
            except lmdb.MapFullError:
                self._grow()
            except lmdb.MapResizedError:
                self._adopt_resize()

    def _transact_once(self, fns, on_error) -> list[Any]:
        results: list[Any] = []
        try:
            with self.env.begin(write=True) as outer:
                single = len(fns) == 1 and on_error is None
                for i, fn in enumerate(fns):
                    if single:
                        results.append(fn(outer))
                        continue
                    child = self.env.begin(write=True, parent=outer)
                    try:
                        results.append(fn(child))
                        child.commit()
                    except MemosError as exc:
                        child.abort()
                        results.append(exc)
                        if on_error is not None:
                            on_error(outer, i, exc)
                    except BaseException:
                        child.abort()
                        raise
        except (lmdb.MapFullError, lmdb.MapResizedError):
            raise
        except lmdb.Error as exc:
            raise _translate(exc) from exc
        except MemosError as exc:
            if len(fns) == 1 and on_error is None:
                return [exc]
            raise
        return results

    def _grow(self) -> None:
        def grow() -> None:
            new = max(self.env.info()["map_size"] * 2, 1 << 20)
            log.info("growing LMDB map to %d bytes", new)
            self.env.set_mapsize(new)

        self._gate.exclusive(grow)

    def _adopt_resize(self) -> None:
        self._gate.exclusive(lambda: self.env.set_mapsize(0))

    # -- housekeeping ---------------------------------------------------

    def sync(self) -> None:
        self.env.sync(True)

    def close(self) -> None:
        try:
            self.env.close()
        except lmdb.Error as exc:  # pragma: no cover - closing a broken env
            raise StorageError(f"closing store: {exc}") from exc

    def space(self, databases: dict[str, dict[str, int]]) -> dict[str, Any]:
        """Where the bytes go (``store_stats``): the file, the map and its pages, used by the
        sub-databases (``databases``: their ``txn.stat``) or free for LMDB to reuse."""
        info, psize = self.env.info(), self.env.stat()["psize"]
        used = _META_PAGES + _pages(self.env.stat()) + sum(_pages(s) for s in databases.values())
        total = info["last_pgno"] + 1
        return {"file_bytes": os.stat(os.path.join(self.path, "data.mdb")).st_size, "map_size": info["map_size"],
                "page_size": psize, "pages": {"total": total, "used": used, "free": max(0, total - used)},
                "databases": {name: {"entries": s["entries"], "pages": _pages(s)} for name, s in databases.items()}}

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"path": self.path, "map_size": self.env.info()["map_size"]}
        with self.read() as txn:
            for name, db in self.db.items():
                out[name] = txn.stat(db)["entries"]
        return out


_META_PAGES = 2  # LMDB's two meta pages: in use, though no database counts them


def _pages(stat: dict[str, int]) -> int:
    return stat["branch_pages"] + stat["leaf_pages"] + stat["overflow_pages"]


def hold_at(step: str) -> None:
    """Crash tests stop the daemon at a named step of a store compaction (``MEMOS_TEST_HOLD_AT``)
    and SIGKILL it there; without that variable this does nothing."""
    if os.environ.get("MEMOS_TEST_HOLD_AT") == step:
        log.warning("holding at %s", step)
        while True:
            time.sleep(1)


def _translate(exc: lmdb.Error) -> MemosError:
    if isinstance(exc, lmdb.BadValsizeError):
        return InvalidRequest(f"key or value size rejected by LMDB: {exc}")
    return StorageError(f"LMDB error: {exc}")
