"""The in-process API: the facade the daemon calls for every request.

Each method checks its input and the actor's role, does its work in one LMDB
transaction and appends the audit record in that same transaction. Failures
(denials included) are audited too, in their own commit. Writes are built as
:class:`Write` units so a caller holding many of them (the daemon's writer)
can make them durable together with :meth:`Memos.apply` (group commit).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import lmdb

from . import codec, validation as check
from .audit import AuditLog
from .errors import Conflict, Denied, InvalidRequest, MemosError, NotFound, TooLarge
from .ids import is_id, new_id
from .ledger import ABSENT, Ledger, memory_key
from .models import (
    NAME_PATTERN, AuditRecord, BlobRef, Change, Checkpoint, Commit, Cube, DiffEntry, Memory, MemoryType,
    Provenance, Role, SourceRef, Status, Usage, VerifyReport,
)
from .storage import Store, StoreOptions
from .validation import Limits


@dataclass(frozen=True)
class Actor:
    """Who asks. ``admin`` is the local administrator: every role on every cube."""

    name: str
    admin: bool = False


LOCAL_ADMIN = Actor("admin", admin=True)


@dataclass
class NewMemory:
    """One memory to add (the arguments of ``add``, for batches)."""

    text: str | None = None
    type: MemoryType | str = MemoryType.plaintext
    tags: Sequence[str] | None = None
    metadata: dict[str, Any] | None = None
    blob: bytes | None = None
    media_type: str = "application/octet-stream"
    sources: Sequence[SourceRef | dict[str, Any]] = ()
    policy: str | None = None


@dataclass
class Write:
    """A unit of write work: ``fn(txn)`` returns (result, version, audit detail)."""

    actor: Actor
    op: str
    cube: str | None
    fn: Callable[[lmdb.Transaction], tuple[Any, int | None, dict[str, Any]]]
    request_id: str | None = None


@dataclass
class _UsageBuffer:
    """Read counts gathered in memory and written with the next commit."""

    pending: dict[tuple[str, str], list[float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, cube: str, ids: Iterable[str]) -> None:
        now = time.time()
        with self.lock:
            for memory_id in ids:
                entry = self.pending.setdefault((cube, memory_id), [0, now])
                entry[0] += 1
                entry[1] = now

    def peek(self, cube: str, memory_id: str) -> tuple[int, float | None]:
        with self.lock:
            count, last = self.pending.get((cube, memory_id), (0, None))
        return int(count), last

    def take(self) -> dict[tuple[str, str], list[float]]:
        with self.lock:
            out, self.pending = self.pending, {}
        return out


class Memos:
    """Cubes, versioned memories, rollback and audit over one LMDB store."""

    def __init__(
        self, path: str | os.PathLike[str], *, options: StoreOptions | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.store = Store(path, options)
        self.ledger = Ledger(self.store)
        self.audit = AuditLog(self.store)
        self.limits = limits or Limits()
        self._usage = _UsageBuffer()

    def close(self) -> None:
        self.flush_usage()
        self.store.close()

    def __enter__(self) -> Memos:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the write path -------------------------------------------------

    def apply(self, writes: Sequence[Write]) -> list[Any]:
        """Make several writes durable in one commit; each slot is a result or a MemosError."""
        usage = self._usage.take()
        fns: list[Callable[[lmdb.Transaction], Any]] = [self._unit(w) for w in writes]
        if usage:
            fns.append(lambda txn: self._write_usage(txn, usage))

        def on_error(txn: lmdb.Transaction, i: int, exc: MemosError) -> None:
            if i < len(writes):
                self._audit_failure(txn, writes[i], exc)

        results = self.store.transact(fns, on_error)
        return results[: len(writes)]

    def run(self, write: Write) -> Any:
        result = self.apply([write])[0]
        if isinstance(result, MemosError):
            raise result
        return result

    def _unit(self, w: Write) -> Callable[[lmdb.Transaction], Any]:
        def unit(txn: lmdb.Transaction) -> Any:
            result, version, detail = w.fn(txn)
            if w.request_id is not None:
                detail = {**detail, "request_id": w.request_id}
            self.audit.append(txn, actor=w.actor.name, op=w.op, outcome="ok",
                              cube=w.cube, version=version, detail=detail)
            return result

        return unit

    def _audit_failure(self, txn: lmdb.Transaction, w: Write, exc: MemosError) -> None:
        detail: dict[str, Any] = {"code": exc.code, "message": _encodable(exc.message[:500])}
        if w.request_id is not None:
            detail["request_id"] = _encodable(w.request_id)
        # The record of a failure must always encode: if it raised here, the
        # whole group commit (other callers' writes included) would be lost.
        self.audit.append(txn, actor=w.actor.name, op=w.op,
                          outcome="denied" if isinstance(exc, Denied) else "error",
                          cube=_encodable(w.cube[:200]) if isinstance(w.cube, str) else None, detail=detail)

    def read(self, actor: Actor, op: str, cube: Any, fn: Callable[[lmdb.Transaction], Any]) -> Any:
        """Run a read; a failed read is audited like a failed write."""
        try:
            with self.store.read() as txn:
                return fn(txn)
        except MemosError as exc:
            failed = Write(actor=actor, op=op, cube=cube if isinstance(cube, str) else None, fn=_never)
            self.store.write(lambda txn, exc=exc: self._audit_failure(txn, failed, exc))
            raise

    def _require(self, txn: lmdb.Transaction, actor: Actor, cube: Any, role: Role, shared: bool = False) -> Cube:
        """The cube, if ``actor`` holds ``role`` on it.

        ``shared``: a cached object other readers share, for callers that
        neither modify the cube nor hand it out.
        """
        name = check.name(cube, "cube")
        found = self.ledger.shared_cube(txn, name) if shared else self.ledger.cube(txn, name)
        if actor.admin or found.owner == actor.name:
            return found
        held = found.acl.get(actor.name)
        if held is None or not held.allows(role):
            raise Denied(
                f"agent {actor.name!r} needs {role.value} on cube {found.name!r}",
                cube=found.name, agent=actor.name, needed=role.value,
            )
        return found

    def _commit(
        self, txn: lmdb.Transaction, actor: Actor, cube: Cube, op: str,
        changes: list[Change], info: dict[str, Any] | None = None,
    ) -> Commit:
        cube.version += 1
        commit = Commit(cube=cube.name, version=cube.version, actor=actor.name,
                        time=time.time(), op=op, changes=changes, info=info or {})
        self.ledger.put_commit(txn, commit)
        self.ledger.put_cube(txn, cube)
        return commit

    # -- cubes ----------------------------------------------------------

    def write_create_cube(self, actor: Actor, name: Any, settings: dict[str, Any] | None = None) -> Write:
        def fn(txn: lmdb.Transaction):
            cube_name = check.name(name, "cube")
            if settings is not None and not isinstance(settings, dict):
                raise InvalidRequest("settings must be a map", field="settings")
            if self.ledger.has_cube(txn, cube_name):
                raise Conflict(f"cube {cube_name!r} already exists", cube=cube_name)
            now = time.time()
            cube = Cube(name=cube_name, owner=actor.name, acl={actor.name: Role.admin},
                        settings=check.metadata(settings, self.limits), version=0, created_at=now)
            self.ledger.put_commit(txn, Commit(cube=cube_name, version=0, actor=actor.name,
                                               time=now, op="create_cube"))
            self.ledger.put_cube(txn, cube)
            return cube, 0, {}

        return Write(actor, "create_cube", name, fn)

    def create_cube(self, actor: Actor, name: str, settings: dict[str, Any] | None = None) -> Cube:
        return self.run(self.write_create_cube(actor, name, settings))

    def write_grant(self, actor: Actor, cube: Any, agent: Any, role: Any) -> Write:
        """Give ``agent`` a role on ``cube``; ``role=None`` revokes."""

        def fn(txn: lmdb.Transaction):
            found = self._require(txn, actor, cube, Role.admin)
            agent_name = check.name(agent, "agent")
            if role is None:
                found.acl.pop(agent_name, None)
            else:
                found.acl[agent_name] = check.role(role)
            self.ledger.put_cube(txn, found)
            return found, found.version, {"agent": agent_name, "role": None if role is None else str(role)}

        return Write(actor, "grant", cube, fn)

    def grant(self, actor: Actor, cube: str, agent: str, role: Role | str | None) -> Cube:
        return self.run(self.write_grant(actor, cube, agent, role))

    def check_role(self, actor: Actor, cube: str, role: Role | str) -> Cube:
        """The cube, if ``actor`` holds ``role`` on it (a refusal is audited)."""
        return self.read(actor, f"check_{check.role(role).value}", cube,
                         lambda txn: self._require(txn, actor, cube, check.role(role)))

    def get_cube(self, actor: Actor, cube: str) -> Cube:
        return self.read(actor, "get_cube", cube, lambda txn: self._require(txn, actor, cube, Role.read))

    def list_cubes(self, actor: Actor) -> list[Cube]:
        """Cubes the actor may read."""

        def fn(txn: lmdb.Transaction) -> list[Cube]:
            return [
                c for c in self.ledger.cubes(txn)
                if actor.admin or c.owner == actor.name or actor.name in c.acl
            ]

        return self.read(actor, "list_cubes", None, fn)

    # -- memories: writes -----------------------------------------------

    def _build(self, txn: lmdb.Transaction, actor: Actor, cube: Cube, item: NewMemory,
               request_id: str | None) -> Memory:
        kind = check.memory_type(item.type)
        text = check.text(item.text, self.limits, required=kind is MemoryType.plaintext)
        data = check.blob(item.blob, self.limits)
        if kind is not MemoryType.plaintext and data is None:
            raise InvalidRequest(f"a {kind.value} memory needs a blob", field="blob")
        blob_ref = None
        if data is not None:
            if not isinstance(item.media_type, str) or len(item.media_type) > 128:
                raise InvalidRequest("media_type must be a short string", field="media_type")
            blob_ref = BlobRef(sha256=self.ledger.put_blob(txn, data), size=len(data),
                               media_type=item.media_type)
        sources = self._sources(txn, cube, item.sources)
        if item.policy is not None and not isinstance(item.policy, str):
            raise InvalidRequest("policy must be a string", field="policy")
        now = time.time()
        return Memory(
            id=new_id(), cube=cube.name, type=kind, text=text, blob=blob_ref,
            tags=check.tags(item.tags, self.limits), metadata=check.metadata(item.metadata, self.limits),
            provenance=Provenance(actor=actor.name, time=now, sources=sources,
                                  policy=item.policy, request_id=request_id),
            status=Status.active, created_at=now, updated_at=now,
        )

    def _sources(self, txn: lmdb.Transaction, cube: Cube, sources: Any) -> list[SourceRef]:
        if isinstance(sources, (str, bytes)) or not isinstance(sources, Iterable):
            raise InvalidRequest("sources must be a list of {memory_id, version}", field="sources")
        refs = []
        for raw in sources:
            try:
                # strict: lax mode would turn version "3" or True into an int
                ref = raw if isinstance(raw, SourceRef) else SourceRef.model_validate(raw, strict=True)
            except ValueError:
                raise InvalidRequest("each source needs memory_id and version", field="sources") from None
            check.memory_id(ref.memory_id)
            check.version(ref.version)
            # A version past the cube's latest would read as the head: not a real reference.
            if (ref.version > cube.version
                    or self.ledger.state_at(txn, cube.name, ref.memory_id, ref.version) is None):
                raise NotFound(f"source {ref.memory_id} does not exist at version {ref.version}",
                               memory=ref.memory_id, version=ref.version)
            refs.append(ref)
        if len(refs) > self.limits.max_sources:
            raise TooLarge(f"{len(refs)} sources exceed the limit of {self.limits.max_sources}", field="sources")
        return refs

    def _store_state(self, txn: lmdb.Transaction, mem: Memory, version: int) -> bytes:
        state = mem.state_bytes()
        self.ledger.write_state(txn, mem.cube, mem.id, version, state,
                                mem.blob.sha256 if mem.blob else None)
        mem.version = version
        mem.content_hash = codec.sha256_hex(state)
        return state

    def write_add_many(self, actor: Actor, cube: Any, items: Sequence[NewMemory],
                       request_id: str | None = None, op: str = "add_many") -> Write:
        items = _once(items)
        if isinstance(items, list):
            items = [replace(it, tags=_once(it.tags), sources=_once(it.sources)) if isinstance(it, NewMemory) else it
                     for it in items]

        def fn(txn: lmdb.Transaction):
            found = self._require(txn, actor, cube, Role.write)
            if not items:
                raise InvalidRequest("nothing to add", field="items")
            if len(items) > self.limits.max_batch:
                raise TooLarge(f"{len(items)} memories exceed the batch limit of {self.limits.max_batch}", field="items")
            mems = [self._build(txn, actor, found, item, request_id) for item in items]
            version = found.version + 1
            for m in mems:
                self._store_state(txn, m, version)
            changes = [Change(memory_id=m.id, before=None, after=m.content_hash) for m in mems]
            self._commit(txn, actor, found, op, changes)
            return mems, version, {"memories": [m.id for m in mems]}

        return Write(actor, op, cube, fn, request_id)

    def write_add(self, actor: Actor, cube: Any, item: NewMemory, request_id: str | None = None) -> Write:
        inner = self.write_add_many(actor, cube, [item], request_id, op="add")

        def fn(txn: lmdb.Transaction):
            mems, version, detail = inner.fn(txn)
            return mems[0], version, detail

        return Write(actor, "add", cube, fn, request_id)

    def add(self, actor: Actor, cube: str, text: str | None = None, **fields: Any) -> Memory:
        return self.run(self.write_add(actor, cube, NewMemory(text=text, **fields)))

    def add_many(self, actor: Actor, cube: str, items: Sequence[NewMemory]) -> list[Memory]:
        return self.run(self.write_add_many(actor, cube, items))

    def write_update(
        self, actor: Actor, cube: Any, memory_id: Any, *, text: Any = None, tags: Any = None,
        metadata: Any = None, status: Any = None, expected_version: Any = None,
        request_id: str | None = None, op: str = "update",
    ) -> Write:
        """Change text, tags, metadata or status; only the fields given change."""
        tags = _once(tags)

        def fn(txn: lmdb.Transaction):
            found = self._require(txn, actor, cube, Role.write)
            mem = self._current(txn, found.name, memory_id)
            if expected_version is not None and check.version(expected_version, "expected_version") != mem.version:
                raise Conflict(
                    f"memory {mem.id} is at version {mem.version}, not {expected_version}",
                    memory=mem.id, version=mem.version,
                )
            if mem.status is Status.deleted and status is None:
                raise NotFound(f"memory {mem.id} was deleted", memory=mem.id)
            before = mem.content_hash
            if text is not None:
                mem.text = check.text(text, self.limits, required=mem.type is MemoryType.plaintext)
            if tags is not None:
                mem.tags = check.tags(tags, self.limits)
            if metadata is not None:
                mem.metadata = check.metadata(metadata, self.limits)
            if status is not None:
                mem.status = check.status(status)
            if text is None and tags is None and metadata is None and status is None:
                raise InvalidRequest("nothing to update", field="text")
            mem.updated_at = time.time()
            version = found.version + 1
            self._store_state(txn, mem, version)
            after = mem.content_hash
            self._commit(txn, actor, found, op, [Change(memory_id=mem.id, before=before, after=after)])
            return mem, version, {"memories": [mem.id]}

        return Write(actor, op, cube, fn, request_id)

    def update(self, actor: Actor, cube: str, memory_id: str, **fields: Any) -> Memory:
        return self.run(self.write_update(actor, cube, memory_id, **fields))

    def write_delete(self, actor: Actor, cube: Any, memory_id: Any, expected_version: Any = None,
                     request_id: str | None = None) -> Write:
        """Soft delete: the memory keeps its history and can be rolled back."""
        return self.write_update(actor, cube, memory_id, status=Status.deleted,
                                 expected_version=expected_version, request_id=request_id, op="delete")

    def delete(self, actor: Actor, cube: str, memory_id: str, expected_version: int | None = None) -> Memory:
        return self.run(self.write_delete(actor, cube, memory_id, expected_version))

    # -- memories: reads ------------------------------------------------

    def _current(self, txn: lmdb.Transaction, cube: str, memory_id: Any) -> Memory:
        head = self.ledger.head(txn, cube, check.memory_id(memory_id))
        if head is None:
            raise NotFound(f"no memory {memory_id} in cube {cube!r}", cube=cube, memory=memory_id)
        return Memory.from_state_bytes(head[1], head[0])

    def get(self, actor: Actor, cube: str, memory_id: str, at: int | None = None,
            include_deleted: bool = False) -> Memory:
        """A memory now, or as it was at cube version ``at``."""
        return Memory.model_validate(self.get_plain(actor, cube, memory_id, at, include_deleted))

    def get_plain(self, actor: Actor, cube: str, memory_id: str, at: int | None = None,
                  include_deleted: bool = False) -> dict[str, Any]:
        """``get`` as plain data (``Memory.model_dump(mode="json")``) straight from the state bytes.

        The daemon's point read: building and dumping a pydantic model per
        read cost more than the read itself.
        """

        def fn(txn: lmdb.Transaction) -> dict[str, Any]:
            found = self._require(txn, actor, cube, Role.read, shared=True)
            wanted = check.memory_id(memory_id)
            if at is None:
                row = self.ledger.head(txn, found.name, wanted)
                if row is None:
                    raise NotFound(f"no memory {memory_id} in cube {found.name!r}", cube=found.name, memory=memory_id)
            else:
                version = self._version_in(found, at)
                row = self.ledger.state_at(txn, found.name, wanted, version)
                if row is None:
                    raise NotFound(f"memory {memory_id} did not exist at version {version}",
                                   cube=found.name, memory=memory_id, version=version)
            mem = _plain_memory(row)
            if mem["status"] == Status.deleted.value and not include_deleted:
                raise NotFound(f"memory {mem['id']} was deleted", cube=found.name, memory=mem["id"])
            mem["usage"] = self._usage_plain(txn, found.name, wanted)
            return mem

        mem = self.read(actor, "get", cube, fn)
        self._usage.record(mem["cube"], [mem["id"]])
        return mem

    def get_many(self, actor: Actor, cube: str, memory_ids: Iterable[str], at: int | None = None) -> dict[str, Memory]:
        """Several memories in one snapshot (missing ones left out); counts no reads."""
        return {k: Memory.model_validate(v) for k, v in self.get_many_plain(actor, cube, memory_ids, at).items()}

    def get_many_plain(self, actor: Actor, cube: str, memory_ids: Iterable[str],
                       at: int | None = None) -> dict[str, dict[str, Any]]:
        """``get_many`` as plain data (``Memory.model_dump(mode="json")``), for search results."""

        def fn(txn: lmdb.Transaction) -> dict[str, dict[str, Any]]:
            found = self._require(txn, actor, cube, Role.read, shared=True)
            version = None if at is None else self._version_in(found, at)
            out = {}
            for memory_id in memory_ids:
                row = (self.ledger.head(txn, found.name, check.memory_id(memory_id)) if version is None
                       else self.ledger.state_at(txn, found.name, check.memory_id(memory_id), version))
                if row is not None:
                    out[memory_id] = _plain_memory(row)
            return out

        return self.read(actor, "get_many", cube, fn)

    @staticmethod
    def _version_in(cube: Cube, at: Any) -> int:
        version = check.version(at, "at")
        if version > cube.version:
            raise NotFound(f"cube {cube.name!r} has no version {version} (latest is {cube.version})",
                           cube=cube.name, version=version)
        return version

    def list(
        self, actor: Actor, cube: str, *, at: int | None = None, status: Status | str | None = Status.active,
        tag: str | None = None, limit: int | None = None, after: str | None = None,
    ) -> list[Memory]:
        """Memories in id (creation) order, filtered; ``status=None`` lists all."""

        def fn(txn: lmdb.Transaction) -> list[Memory]:
            found = self._require(txn, actor, cube, Role.read, shared=True)
            if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
                raise InvalidRequest("limit must be a non-negative integer", field="limit")
            wanted = None if status is None else check.status(status)
            start = None if after is None else check.memory_id(after)
            rows = (self.ledger.iter_heads(txn, found.name, start) if at is None
                    else self.ledger.iter_state_at(txn, found.name, self._version_in(found, at), start))
            out: list[Memory] = []
            for _, version, state in rows:
                if limit is not None and len(out) >= limit:
                    break
                mem = Memory.from_state_bytes(state, version)
                if (wanted is None or mem.status is wanted) and (tag is None or tag in mem.tags):
                    out.append(mem)
            return out

        return self.read(actor, "list", cube, fn)

    def state(self, actor: Actor, cube: str, at: int | None = None) -> dict[str, bytes]:
        """Every memory's exact state bytes (all statuses), now or at a version."""

        def fn(txn: lmdb.Transaction) -> dict[str, bytes]:
            found = self._require(txn, actor, cube, Role.read, shared=True)
            rows = (self.ledger.iter_heads(txn, found.name) if at is None
                    else self.ledger.iter_state_at(txn, found.name, self._version_in(found, at)))
            return {memory_id: state for memory_id, _, state in rows}

        return self.read(actor, "state", cube, fn)

    def get_blob(self, actor: Actor, cube: str, sha256: str) -> bytes:
        def fn(txn: lmdb.Transaction) -> bytes:
            self._require(txn, actor, cube, Role.read, shared=True)
            if not isinstance(sha256, str) or len(sha256) != 64:
                raise InvalidRequest("blob id must be a sha256 hex digest", field="sha256")
            return self.ledger.get_blob(txn, sha256, cube)

        return self.read(actor, "get_blob", cube, fn)

    # -- usage ----------------------------------------------------------

    def record_reads(self, cube: str, memory_ids: Iterable[str]) -> None:
        """Count reads (by search, by generation) without writing per read."""
        # Counts are written inside other callers' commits: a malformed key
        # must be dropped here, not fail their writes later.
        if isinstance(cube, str) and NAME_PATTERN.match(cube):
            self._usage.record(cube, [m for m in memory_ids if is_id(m)])

    def _usage_plain(self, txn: lmdb.Transaction, cube: str, memory_id: str) -> dict[str, Any]:
        """Stored read counts plus those not yet written, as ``Usage`` plain data."""
        raw = txn.get(memory_key(cube, memory_id), db=self.store.db["usage"])
        usage = codec.unpack(raw) if raw is not None else {"reads": 0, "last_read": None}
        count, last = self._usage.peek(cube, memory_id)
        usage["reads"] += count
        if last is not None:
            usage["last_read"] = last
        return usage

    def _write_usage(self, txn: lmdb.Transaction, pending: dict[tuple[str, str], list[float]]) -> None:
        db = self.store.db["usage"]
        for (cube, memory_id), (count, last) in pending.items():
            key = memory_key(cube, memory_id)
            raw = txn.get(key, db=db)
            usage = Usage.model_validate(codec.unpack(raw)) if raw is not None else Usage()
            usage.reads += int(count)
            usage.last_read = max(usage.last_read or 0.0, last)
            txn.put(key, codec.pack_unsorted(usage.model_dump(mode="json")), db=db)

    def flush_usage(self) -> None:
        pending = self._usage.take()
        if pending:
            self.store.write(lambda txn: self._write_usage(txn, pending))

    # -- versions -------------------------------------------------------

    def history(self, actor: Actor, cube: str, *, memory_id: str | None = None,
                limit: int | None = None, before: int | None = None) -> list[Commit]:
        """Commits newest first; with ``memory_id``, only those that touched it."""

        def fn(txn: lmdb.Transaction) -> list[Commit]:
            found = self._require(txn, actor, cube, Role.read, shared=True)
            if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
                raise InvalidRequest("limit must be a positive integer", field="limit")
            hi = found.version if before is None else check.version(before, "before") - 1
            if memory_id is not None:
                wanted = check.memory_id(memory_id)
                versions = [v for v in self.ledger.memory_versions(txn, found.name, wanted) if v <= hi]
                if not versions and hi >= found.version:
                    raise NotFound(f"no memory {wanted} in cube {found.name!r}", memory=wanted)
                versions.reverse()
                return [self.ledger.commit(txn, found.name, v) for v in versions[:limit]]
            out = []
            for commit in self.ledger.commits(txn, found.name, 0, hi, newest_first=True):
                out.append(commit)
                if limit is not None and len(out) >= limit:
                    break
            return out

        return self.read(actor, "history", cube, fn)

    def diff(self, actor: Actor, cube: str, v1: int, v2: int) -> list[DiffEntry]:
        """What changed from version ``v1`` to ``v2`` (either order)."""

        def fn(txn: lmdb.Transaction) -> list[DiffEntry]:
            found = self._require(txn, actor, cube, Role.read, shared=True)
            a, b = self._version_in(found, v1), self._version_in(found, v2)
            out = []
            for memory_id in self.ledger.touched_between(txn, found.name, min(a, b), max(a, b)):
                old = self.ledger.state_at(txn, found.name, memory_id, a)
                new = self.ledger.state_at(txn, found.name, memory_id, b)
                if (old and old[1]) == (new and new[1]):
                    continue
                before = Memory.from_state_bytes(old[1], old[0]) if old else None
                after = Memory.from_state_bytes(new[1], new[0]) if new else None
                change = "added" if before is None else "removed" if after is None else "modified"
                out.append(DiffEntry(memory_id=memory_id, change=change, before=before, after=after))
            return out

        return self.read(actor, "diff", cube, fn)

    def write_rollback(self, actor: Actor, cube: Any, to_version: Any,
                       memory_ids: Sequence[str] | None = None, request_id: str | None = None) -> Write:
        """Restore the cube (or chosen memories) to ``to_version`` by a new commit."""
        memory_ids = _once(memory_ids)

        def fn(txn: lmdb.Transaction):
            found = self._require(txn, actor, cube, Role.admin)
            target = self._version_in(found, to_version)
            touched = self.ledger.touched_between(txn, found.name, target, found.version)
            chosen: list[str] = []
            if memory_ids is not None:
                if isinstance(memory_ids, (str, bytes)) or not isinstance(memory_ids, Iterable):
                    raise InvalidRequest("memory_ids must be a list of ids", field="memory_ids")
                chosen = [check.memory_id(m) for m in memory_ids]
                for memory_id in chosen:
                    if not self.ledger.memory_versions(txn, found.name, memory_id):
                        raise NotFound(f"no memory {memory_id} in cube {found.name!r}", memory=memory_id)
                touched = [m for m in touched if m in set(chosen)]
            version = found.version + 1
            changes = []
            for memory_id in touched:
                old = self.ledger.state_at(txn, found.name, memory_id, target)
                now = self.ledger.head(txn, found.name, memory_id)
                old_state = old[1] if old else ABSENT
                now_state = now[1] if now else ABSENT
                if old_state == now_state:
                    continue
                blob = Memory.from_state_bytes(old_state, target).blob if old_state else None
                self.ledger.write_state(txn, found.name, memory_id, version, old_state,
                                        blob.sha256 if blob else None)
                changes.append(Change(
                    memory_id=memory_id,
                    before=codec.sha256_hex(now_state) if now_state else None,
                    after=codec.sha256_hex(old_state) if old_state else None,
                ))
            info = {"to_version": target, "memory_ids": None if memory_ids is None else chosen}
            commit = self._commit(txn, actor, found, "rollback", changes, info)
            return commit, version, {"to_version": target, "memories": [c.memory_id for c in changes]}

        return Write(actor, "rollback", cube, fn, request_id)

    def rollback(self, actor: Actor, cube: str, to_version: int,
                 memory_ids: Sequence[str] | None = None) -> Commit:
        return self.run(self.write_rollback(actor, cube, to_version, memory_ids))

    # -- audit ----------------------------------------------------------

    def _admin_only(self, actor: Actor, op: str) -> None:
        if not actor.admin:
            exc = Denied(f"{op} needs the local administrator", agent=actor.name)
            self.store.write(lambda txn: self._audit_failure(txn, Write(actor, op, None, _never), exc))
            raise exc

    def audit_verify(self, actor: Actor, checkpoint: Checkpoint | dict[str, Any] | None = None) -> VerifyReport:
        self._admin_only(actor, "audit_verify")
        if checkpoint is not None and not isinstance(checkpoint, Checkpoint):
            try:
                checkpoint = Checkpoint.model_validate(checkpoint)
            except ValueError:
                raise InvalidRequest("checkpoint needs seq and head", field="checkpoint") from None
        with self.store.read() as txn:
            return self.audit.verify(txn, checkpoint)

    def audit_checkpoint(self, actor: Actor) -> Checkpoint:
        self._admin_only(actor, "audit_checkpoint")
        with self.store.read() as txn:
            return self.audit.head(txn)

    def audit_tail(self, actor: Actor, n: int = 20, after: int | None = None) -> list[AuditRecord]:
        self._admin_only(actor, "audit_tail")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 10_000:
            raise InvalidRequest("n must be an integer from 1 to 10000", field="n")
        if after is not None:
            check.version(after, "after")  # a negative or non-int seq cannot be encoded as a key
        with self.store.read() as txn:
            return self.audit.tail(txn, n, after)


def _once(value: Any) -> Any:
    """A one-shot iterator as a list, taken when a Write is built.

    A unit may run again after the map grows; an iterator consumed by the
    first run would be empty the second time.
    """
    return list(value) if isinstance(value, Iterator) else value


def _encodable(value: Any) -> Any:
    """A string that UTF-8 can encode (lone surrogates escaped), for audit records."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def _never(txn: lmdb.Transaction) -> Any:
    """The work of a Write that only exists to be audited as failed."""
    raise AssertionError("an audit-only write is never applied")


def _plain_memory(row: tuple[int, bytes]) -> dict[str, Any]:
    """A memory's (version, state bytes) as ``Memory.model_dump(mode="json")`` would give it."""
    version, state = row
    mem = codec.unpack(state)
    mem["version"] = version
    mem["content_hash"] = codec.sha256_hex(state)
    mem["usage"] = None
    return mem
