"""The services a memory type gets from the core (the concrete side of :class:`memos.memtypes.Services`)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import lmdb
from pydantic import BaseModel, ValidationError

from . import validation as check
from .api import Memos
from .errors import ConfigError, InvalidRequest, MemosError, UnknownOperation
from .jobs import Jobs
from .memories import memories_at, rows_at, version_in
from .memtypes import Rows, Services, Snapshot
from .models import Cube, Memory, plain
from .writes import Applied, Write


class _Rows(Rows):
    __slots__ = ("txn", "dbs", "type_name")

    def __init__(self, txn: lmdb.Transaction, dbs: dict[str, Any], type_name: str) -> None:
        self.txn = txn
        self.dbs = dbs
        self.type_name = type_name

    def _db(self, name: str) -> Any:
        try:
            return self.dbs[name]
        except KeyError:
            raise ConfigError(f"memory type {self.type_name!r} declares no sub-database {name!r}") from None

    def get(self, db: str, key: bytes) -> bytes | None:
        raw = self.txn.get(key, db=self._db(db))
        return None if raw is None else bytes(raw)

    def put(self, db: str, key: bytes, value: bytes, overwrite: bool = True) -> bool:
        return self.txn.put(key, value, db=self._db(db), overwrite=overwrite)

    def delete(self, db: str, key: bytes) -> bool:
        return self.txn.delete(key, db=self._db(db))

    def items(self, db: str, start: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        cur = self.txn.cursor(db=self._db(db))
        if cur.set_range(start):
            for key, value in cur:
                yield bytes(key), bytes(value)


class _Snapshot(Snapshot):
    def __init__(self, memos: Memos, txn: lmdb.Transaction, cube: Cube, version: int | None, rows: Rows) -> None:
        self._core = memos.core
        self._txn = txn
        self._at = version  # None: the head
        self.cube = cube
        self.version = cube.version if version is None else version
        self.rows = rows

    def get_many(self, memory_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        return rows_at(self._core, self._txn, self.cube, memory_ids, self._at)

    def memories(self, type: str | None = None) -> Iterator[Memory]:
        for mem in memories_at(self._core, self._txn, self.cube, self._at):
            if type is None or mem.type == type:
                yield mem

    def blob(self, sha256: str) -> bytes:
        return self._core.ledger.get_blob(self._txn, sha256, self.cube.name)


class TypeServices(Services):
    """One memory type's view of the core: its own rows, access-checked reads, jobs, the model executor."""

    def __init__(self, memos: Memos, name: str, settings: BaseModel | None, state_dir: Path,
                 jobs: Jobs, executor: Executor) -> None:
        self._memos = memos
        self.name = name
        self.settings = settings
        self.limits = memos.limits
        self.state_dir = state_dir
        self.jobs = jobs
        self.executor = executor
        self._routes: dict[str, Any] | None = None  # the daemon's routing table, once it is bound
        # How submit() makes a write durable: at once here; the daemon routes it through its writer.
        self.submitter: Callable[[Write], Any] = self._apply_now
        prefix = f"{name}/"
        self._dbs = {k[len(prefix):]: v for k, v in memos.store.db.items() if k.startswith(prefix)}

    def rows_in(self, txn: lmdb.Transaction) -> Rows:
        """The type's rows inside a transaction the core opened (the daemon's prepare stage)."""
        return _Rows(txn, self._dbs, self.name)

    @contextmanager
    def snapshot(self, actor: Any, cube: str, *, op: str, role: str = "read",
                 at: int | None = None) -> Iterator[Snapshot]:
        core = self._memos.core
        try:
            with core.store.read() as txn:
                found = core.require(txn, actor, cube, check.role(role), shared=True)
                version = None if at is None else version_in(found, at, core.ledger, txn)
                yield _Snapshot(self._memos, txn, found, version, self.rows_in(txn))
        except MemosError as exc:
            raise core.refused(actor, op, cube if isinstance(cube, str) else None, exc) from None

    @contextmanager
    def system_snapshot(self, cube: str, at: int | None = None) -> Iterator[Snapshot]:
        core = self._memos.core
        with core.store.read() as txn:
            found = core.ledger.shared_cube(txn, check.name(cube, "cube"))
            version = None if at is None else version_in(found, at, core.ledger, txn)
            yield _Snapshot(self._memos, txn, found, version, self.rows_in(txn))

    def cubes(self) -> list[str]:
        with self._memos.store.read() as txn:
            return [c.name for c in self._memos.ledger.cubes(txn)]

    @contextmanager
    def read_rows(self) -> Iterator[Rows]:
        with self._memos.store.read() as txn:
            yield self.rows_in(txn)

    def write_rows(self, fn: Callable[[Rows], Any]) -> Any:
        return self._memos.store.write(lambda txn: fn(self.rows_in(txn)))

    def record_reads(self, cube: str, memory_ids: Sequence[str]) -> None:
        self._memos.core.usage.record_checked(cube, memory_ids)

    def check_role(self, actor: Any, cube: str, role: str, op: str) -> Cube:
        return self._memos.cubes.check_role(actor, cube, role, op)

    def own_write(self, actor: Any, op: str, cube: str | None, fn: Callable[[Rows], Any],
                  request_id: str | None = None, role: str = "write") -> Write:
        core = self._memos.core

        def run(txn: lmdb.Transaction) -> Applied:
            if cube is not None:  # checked in the commit, like the core's writes: a refusal is audited once
                core.require(txn, actor, cube, check.role(role))
            applied = fn(self.rows_in(txn))
            return applied if isinstance(applied, Applied) else Applied(applied)

        return Write(actor, op, cube, run, request_id)

    def attach(self, submitter: Callable[[Write], Any], routes: dict[str, Any]) -> None:
        """In the daemon: writes go through its writer, calls through its routing table."""
        self.submitter = submitter
        self._routes = routes

    def call(self, op: str, actor: Any, **args: Any) -> Any:
        if self._routes is None:  # embedded use: the table of this process's Memos, bound once
            self._routes = self._memos.routes()
        route = self._routes.get(op)
        if route is None or route.op.where not in ("inline", "worker") or route.op.streams:
            raise UnknownOperation(f"no read operation {op!r} to call", op=op)
        try:
            parsed = route.op.args.model_validate(args)
        except ValidationError as exc:
            raise InvalidRequest(f"{op}: {exc.errors(include_url=False)[0]['msg']}") from None
        return plain(route(actor, parsed))

    def submit(self, write: Write) -> Any:
        return self.submitter(write)

    def add(self, actor: Any, cube: str, text: str | None = None, **fields: Any) -> Memory:
        return Memory.model_validate(self.submit(self._memos.memories.write_add(actor, cube, text, **fields)))

    def _apply_now(self, write: Write) -> Any:
        """Embedded use: apply the write in this thread (the daemon replaces it by its writer)."""
        return plain(self._memos.core.run(write))
