"""Memories: add, update, delete, and reads now or at a version. Every type is stored alike;
each type's :meth:`~memos.memtypes.MemoryType.validate` says what its items need."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import lmdb

from . import catalog, clock, codec
from . import validation as check
from .access import Actor
from .core import Core
from .errors import Conflict, IntegrityError, InvalidRequest, NotFound, TooLarge
from .ids import new_id
from .ledger import Ledger
from .memtypes import Item, check_type
from .models import (
    DEFAULT_TYPE,
    BlobRef,
    Change,
    Cube,
    Memory,
    Provenance,
    Role,
    SourceRef,
    Status,
    Usage,
)
from .writes import Applied, Write


@dataclass
class NewMemory:
    """One memory to add (the arguments of ``add``, for batches)."""

    text: str | None = None
    type: str = DEFAULT_TYPE
    tags: Sequence[str] | None = None
    metadata: dict[str, Any] | None = None
    blob: bytes | None = None
    media_type: str = "application/octet-stream"
    sources: Sequence[SourceRef | dict[str, Any]] = ()
    policy: str | None = None


class Memories:
    operations = catalog.MEMORIES_OPERATIONS

    def __init__(self, core: Core) -> None:
        self.core = core

    # -- writes ---------------------------------------------------------

    def write_add_many(self, actor: Actor, cube: Any, items: Sequence[Any],
                       request_id: str | None = None, op: str = "add_many") -> Write:
        """Add ``items`` (NewMemory, maps of its fields, or argument models) in one commit."""
        core = self.core
        items = _once(items)
        if isinstance(items, list):
            # Checked here too, before the write is queued: a memory type's prepare stage (embedding)
            # must not work through a batch the commit would refuse.
            items = [_new_memory(it) for it in _batch(items, core)]

        def fn(txn: lmdb.Transaction) -> Applied:
            found = core.require(txn, actor, cube, Role.write)
            if not isinstance(items, list) or not items:
                raise InvalidRequest("nothing to add", field="items")
            _batch(items, core)
            mems = [self._build(txn, actor, found, item, request_id) for item in items]
            version = found.version + 1
            for m in mems:
                self._store_state(txn, m, version)
            changes = [Change(memory_id=m.id, before=None, after=m.content_hash) for m in mems]
            core.commit(txn, actor, found, op, changes)
            return Applied(mems, version, [m.id for m in mems])

        return Write(actor, op, cube, fn, request_id)

    def write_add(self, actor: Actor, cube: Any, text: str | None = None, *, request_id: str | None = None,
                  **fields: Any) -> Write:
        """Add one memory: ``text`` and the other fields of :class:`NewMemory`."""
        try:
            item = NewMemory(text=text, **fields)
        except TypeError as exc:
            raise InvalidRequest(f"add: {exc}") from None
        inner = self.write_add_many(actor, cube, [item], request_id, op="add")

        def fn(txn: lmdb.Transaction) -> Applied:
            applied = inner.fn(txn)
            applied.result = applied.result[0]
            return applied

        return Write(actor, "add", cube, fn, request_id)

    def write_update(
        self, actor: Actor, cube: Any, id: Any, text: Any = None, *, tags: Any = None,
        metadata: Any = None, status: Any = None, expected_version: Any = None,
        request_id: str | None = None, op: str = "update",
    ) -> Write:
        """Change text, tags, metadata or status; only the fields given change."""
        core = self.core
        tags = _once(tags)

        def fn(txn: lmdb.Transaction) -> Applied:
            found = core.require(txn, actor, cube, Role.write)
            mem = self._current(txn, found.name, id)
            if expected_version is not None and check.version(expected_version, "expected_version") != mem.version:
                raise Conflict(f"memory {mem.id} is at version {mem.version}, not {expected_version}",
                               memory=mem.id, version=mem.version)
            if mem.status is Status.deleted and status is None:
                raise NotFound(f"memory {mem.id} was deleted", memory=mem.id)
            if text is None and tags is None and metadata is None and status is None:
                raise InvalidRequest("nothing to update", field="text")
            before = mem.content_hash
            if text is not None:
                mem.text = check.text(text, core.limits)
            if tags is not None:
                mem.tags = check.tags(tags, core.limits)
            if metadata is not None:
                mem.metadata = check.metadata(metadata, core.limits)
            if status is not None:
                new_status = check.status(status)
                if mem.status is Status.deleted and new_status is not Status.deleted:
                    self._check_undelete(txn, found.name, mem)
                if new_status is Status.deleted:
                    # A deleted memory keeps no blob: its versions before the delete do, so a rollback
                    # restores it exactly, and once retention drops those versions the blob is freed.
                    mem.blob = None
                mem.status = new_status
            if text is not None or metadata is not None:
                self._validate(mem.type, mem.text, None, "", mem.tags, mem.metadata, mem.blob)
            mem.updated_at = clock.now()
            version = found.version + 1
            self._store_state(txn, mem, version)
            core.commit(txn, actor, found, op, [Change(memory_id=mem.id, before=before, after=mem.content_hash)])
            return Applied(mem, version, [mem.id])

        return Write(actor, op, cube, fn, request_id)

    def write_merge(self, actor: Actor, cube: Any, ids: Sequence[str], text: Any = None, *, tags: Any = None,
                    metadata: Any = None, expected_versions: Sequence[int] | None = None,
                    request_id: str | None = None) -> Write:
        """One new memory in place of ``ids``: its sources are them at their versions, and they are
        archived (not erased) in the same commit, so rolling the commit back restores them exactly.

        What is not given comes from the most recently updated of them (text, metadata) or all
        of them (tags, in order, as many as the limit allows). ``expected_versions``: each memory's
        version, in the order of ``ids``; a memory changed since gets ``conflict``. Memories with
        blobs are not merged: their types fuse them.
        """
        core = self.core
        ids = _once(ids)

        def fn(txn: lmdb.Transaction) -> Applied:
            found = core.require(txn, actor, cube, Role.write)
            if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or len(set(ids)) < 2:
                raise InvalidRequest("merge needs two or more distinct memory ids", field="ids")
            if len(ids) > 100:
                raise TooLarge("merge takes at most 100 memories", field="ids")
            olds = [self._current(txn, found.name, m) for m in dict.fromkeys(ids)]
            if expected_versions is not None:
                if len(expected_versions) != len(ids) or len(olds) != len(ids):
                    raise InvalidRequest("expected_versions needs one version for each of ids", field="expected_versions")
                for old, expected in zip(olds, expected_versions):
                    if check.version(expected, "expected_versions") != old.version:
                        raise Conflict(f"memory {old.id} is at version {old.version}, not {expected}",
                                       memory=old.id, version=old.version)
            for old in olds:
                if old.status is not Status.active:
                    raise Conflict(f"memory {old.id} is {old.status.value}, not active", memory=old.id)
                if old.blob is not None:
                    raise InvalidRequest(f"memory {old.id} holds a blob; its type fuses such memories",
                                         memory=old.id)
            if len({old.type for old in olds}) > 1:
                raise InvalidRequest("merged memories must be of one type", field="ids")
            newest = max(olds, key=lambda m: (m.updated_at, m.id))
            merged_tags = (tags if tags is not None
                           else list(dict.fromkeys(t for m in olds for t in m.tags))[: core.limits.max_tags])
            item = NewMemory(
                text=newest.text if text is None else text, type=newest.type, tags=merged_tags,
                metadata=newest.metadata if metadata is None else metadata,
                sources=[SourceRef(memory_id=m.id, version=m.version) for m in olds],
            )
            mem = self._build(txn, actor, found, item, request_id)
            version = found.version + 1
            self._store_state(txn, mem, version)
            changes = [Change(memory_id=mem.id, before=None, after=mem.content_hash)]
            for old in olds:
                before = old.content_hash
                old.status, old.updated_at = Status.archived, mem.created_at
                self._store_state(txn, old, version)
                changes.append(Change(memory_id=old.id, before=before, after=old.content_hash))
            core.commit(txn, actor, found, "merge", changes, {"merged": [m.id for m in olds]})
            return Applied(mem, version, [c.memory_id for c in changes])

        return Write(actor, "merge", cube, fn, request_id)

    def write_delete(self, actor: Actor, cube: Any, id: Any, expected_version: Any = None,
                     request_id: str | None = None) -> Write:
        """Soft delete: the memory keeps its history and can be rolled back."""
        return self.write_update(actor, cube, id, status=Status.deleted,
                                 expected_version=expected_version, request_id=request_id, op="delete")

    def _validate(self, kind: str, text: str | None, blob: bytes | None, media_type: str,
                  tags: list[str], metadata: dict[str, Any], blob_ref: BlobRef | None = None) -> None:
        item = Item(type=kind, text=text, blob=blob, media_type=media_type, tags=tags, metadata=metadata,
                    has_blob=blob is not None or blob_ref is not None)
        self.core.types[kind].validate(item, self.core.limits)

    def _build(self, txn: lmdb.Transaction, actor: Actor, cube: Cube, item: NewMemory,
               request_id: str | None) -> Memory:
        limits = self.core.limits
        kind = check_type(item.type, self.core.types)
        text = check.text(item.text, limits)
        data = check.blob(item.blob, limits)
        if not isinstance(item.media_type, str) or len(item.media_type) > 128:
            raise InvalidRequest("media_type must be a short string", field="media_type")
        tags = check.tags(item.tags, limits)
        metadata = check.metadata(item.metadata, limits)
        self._validate(kind, text, data, item.media_type, tags, metadata)
        blob_ref = None
        if data is not None:
            blob_ref = BlobRef(sha256=self.core.ledger.put_blob(txn, data), size=len(data),
                               media_type=item.media_type)
        sources = self._sources(txn, cube, item.sources)
        if item.policy is not None and not isinstance(item.policy, str):
            raise InvalidRequest("policy must be a string", field="policy")
        now = clock.now()
        return Memory(
            id=new_id(), cube=cube.name, type=kind, text=text, blob=blob_ref, tags=tags, metadata=metadata,
            provenance=Provenance(actor=actor.name, time=now, sources=sources,
                                  policy=item.policy or actor.policy, request_id=request_id),
            status=Status.active, created_at=now, updated_at=now,
        )

    def _sources(self, txn: lmdb.Transaction, cube: Cube, sources: Any) -> list[SourceRef]:
        if isinstance(sources, (str, bytes)) or not isinstance(sources, Iterable):
            raise InvalidRequest("sources must be a list of {memory_id, version}", field="sources")
        refs = []
        for raw in sources:
            try:
                # strict: lax mode would turn version "3" or True into an int
                ref = raw if isinstance(raw, SourceRef) else SourceRef.model_validate(
                    raw.model_dump() if isinstance(raw, catalog.Source) else raw, strict=True)
            except ValueError:
                raise InvalidRequest("each source needs memory_id and version", field="sources") from None
            check.memory_id(ref.memory_id)
            check.version(ref.version)
            # A version past the cube's latest would read as the head: not a real reference.
            if (ref.version > cube.version
                    or self.core.ledger.state_at(txn, cube.name, ref.memory_id, ref.version) is None):
                raise NotFound(f"source {ref.memory_id} does not exist at version {ref.version}",
                               memory=ref.memory_id, version=ref.version)
            refs.append(ref)
        if len(refs) > self.core.limits.max_sources:
            raise TooLarge(f"{len(refs)} sources exceed the limit of {self.core.limits.max_sources}", field="sources")
        return refs

    def _check_undelete(self, txn: lmdb.Transaction, cube: str, mem: Memory) -> None:
        """An update may undelete a memory, unless the delete dropped its blob: only a rollback restores that."""
        before = self.core.ledger.state_at(txn, cube, mem.id, mem.version - 1)
        if before is not None and Memory.from_state_bytes(before[1], before[0]).blob is not None:
            raise InvalidRequest(f"memory {mem.id} held a blob, which its delete let go; roll the delete back "
                                 "to restore it exactly", memory=mem.id, field="status")

    def _store_state(self, txn: lmdb.Transaction, mem: Memory, version: int) -> bytes:
        state = mem.state_bytes()
        self.core.ledger.write_state(txn, mem.cube, mem.id, version, state, mem.blob.sha256 if mem.blob else None)
        mem.version = version
        mem.content_hash = codec.sha256_hex(state)
        return state

    def _current(self, txn: lmdb.Transaction, cube: str, memory_id: Any) -> Memory:
        head = self.core.ledger.head(txn, cube, check.memory_id(memory_id))
        if head is None:
            raise NotFound(f"no memory {memory_id} in cube {cube!r}", cube=cube, memory=memory_id)
        return Memory.from_state_bytes(head[1], head[0])

    # -- reads ----------------------------------------------------------

    def get(self, actor: Actor, cube: str, id: str, at: int | None = None, include_deleted: bool = False) -> Memory:
        """A memory now, or as it was at cube version ``at``."""
        return Memory.model_validate(self.get_plain(actor, cube, id, at, include_deleted))

    def get_plain(self, actor: Actor, cube: str, id: str, at: int | None = None,
                  include_deleted: bool = False) -> dict[str, Any]:
        """``get`` as plain data (``Memory.model_dump(mode="json")``) straight from the state bytes.

        The daemon's point read: building and dumping a pydantic model per
        read cost more than the read itself.
        """
        core = self.core

        def fn(txn: lmdb.Transaction) -> dict[str, Any]:
            found = core.require(txn, actor, cube, Role.read, shared=True)
            wanted = check.memory_id(id)
            if at is None:
                row = core.ledger.head(txn, found.name, wanted)
                if row is None:
                    raise NotFound(f"no memory {id} in cube {found.name!r}", cube=found.name, memory=id)
            else:
                version = version_in(found, at, core.ledger, txn)
                row = core.ledger.state_at(txn, found.name, wanted, version)
                if row is None:
                    raise NotFound(f"memory {id} did not exist at version {version}",
                                   cube=found.name, memory=id, version=version)
            mem = plain_memory(row)
            if mem["status"] == Status.deleted.value and not include_deleted:
                raise NotFound(f"memory {mem['id']} was deleted", cube=found.name, memory=mem["id"])
            mem["usage"] = core.usage.plain(txn, found.name, wanted)
            return mem

        mem = core.read(actor, "get", cube, fn)
        core.usage.record(mem["cube"], [mem["id"]])
        return mem

    def get_many(self, actor: Actor, cube: str, memory_ids: Iterable[str], at: int | None = None) -> dict[str, Memory]:
        """Several memories in one snapshot (missing ones left out); counts no reads."""
        return {k: Memory.model_validate(v) for k, v in self.get_many_plain(actor, cube, memory_ids, at).items()}

    def get_many_plain(self, actor: Actor, cube: str, memory_ids: Iterable[str],
                       at: int | None = None) -> dict[str, dict[str, Any]]:
        """``get_many`` as plain data (``Memory.model_dump(mode="json")``, usage left out)."""
        def fn(txn: lmdb.Transaction) -> dict[str, dict[str, Any]]:
            found = self.core.require(txn, actor, cube, Role.read, shared=True)
            version = None if at is None else version_in(found, at, self.core.ledger, txn)
            return rows_at(self.core, txn, found, memory_ids, version)

        return self.core.read(actor, "get_many", cube, fn)

    def list(self, actor: Actor, cube: str, *, at: int | None = None, status: Status | str | None = Status.active,
             tag: str | None = None, limit: int | None = None, after: str | None = None,
             usage: bool = False) -> list[Memory]:
        """Memories in id (creation) order, filtered; ``status`` None or "all" lists all.

        At most ``limit`` (itself at most ``max_page``); without one, all of them if they fit in
        a page, else ``too_large``: page with ``after``, the last id of the previous page.
        ``usage``: with each memory's read counts (those not yet written included).
        """
        core = self.core

        def fn(txn: lmdb.Transaction) -> list[Memory]:
            found = core.require(txn, actor, cube, Role.read, shared=True)
            wanted_n = check.page(limit, core.limits)
            room = check.room(wanted_n, core.limits)
            wanted = None if status is None or status == "all" else check.status(status)
            start = None if after is None else check.memory_id(after)
            out: list[Memory] = []
            version = None if at is None else version_in(found, at, core.ledger, txn)
            for mem in memories_at(core, txn, found, version, start):
                if len(out) >= room:
                    break
                if (wanted is None or mem.status is wanted) and (tag is None or tag in mem.tags):
                    out.append(mem)
            out = check.bounded(out, wanted_n, core.limits, "memories match", "after (the last id of a page)")
            if usage:  # only for the page returned
                for mem in out:
                    mem.usage = Usage.model_validate(core.usage.plain(txn, found.name, mem.id))
            return out

        return core.read(actor, "list", cube, fn)

    def state(self, actor: Actor, cube: str, at: int | None = None) -> dict[str, bytes]:
        """Every memory's exact state bytes (all statuses), now or at a version."""
        core = self.core

        def fn(txn: lmdb.Transaction) -> dict[str, bytes]:
            found = core.require(txn, actor, cube, Role.read, shared=True)
            rows = (core.ledger.iter_heads(txn, found.name) if at is None
                    else core.ledger.iter_state_at(txn, found.name, version_in(found, at, core.ledger, txn)))
            return {memory_id: state for memory_id, _, state in rows}

        return core.read(actor, "state", cube, fn)

    def get_blob(self, actor: Actor, cube: str, sha256: str) -> bytes:
        core = self.core

        def fn(txn: lmdb.Transaction) -> bytes:
            core.require(txn, actor, cube, Role.read, shared=True)
            if not isinstance(sha256, str) or len(sha256) != 64:
                raise InvalidRequest("blob id must be a sha256 hex digest", field="sha256")
            data = core.ledger.get_blob(txn, sha256, cube)
            # Served only as what it claims to be: a blob damaged on disk is refused, not passed on.
            if codec.sha256_hex(data) != sha256:
                raise IntegrityError(f"blob {sha256} does not match its hash: it was damaged on disk",
                                     blob=sha256, cube=cube)
            return data

        return core.read(actor, "get_blob", cube, fn)

    def record_reads(self, cube: str, memory_ids: Iterable[str]) -> None:
        """Count reads (by search, by generation) without writing per read."""
        self.core.usage.record_checked(cube, memory_ids)


# -- helpers shared with versions and the services of memory types -------------

def version_in(cube: Cube, at: Any, ledger: Ledger, txn: lmdb.Transaction) -> int:
    """``at`` if the cube has that version, else NotFound naming the latest, or VersionCompacted
    (a NotFound) naming the oldest kept if compaction dropped it."""
    version = check.version(at, "at")
    if version > cube.version:
        raise NotFound(f"cube {cube.name!r} has no version {version} (latest is {cube.version})",
                       cube=cube.name, version=version)
    return ledger.require_kept(txn, cube, version)


def rows_at(core: Core, txn: lmdb.Transaction, cube: Cube, memory_ids: Iterable[str],
            version: int | None) -> dict[str, dict[str, Any]]:
    """Those of ``memory_ids`` present now (or at ``version``), as plain data."""
    out = {}
    for memory_id in memory_ids:
        wanted = check.memory_id(memory_id)
        row = (core.ledger.head(txn, cube.name, wanted) if version is None
               else core.ledger.state_at(txn, cube.name, wanted, version))
        if row is not None:
            out[memory_id] = plain_memory(row)
    return out


def memories_at(core: Core, txn: lmdb.Transaction, cube: Cube, version: int | None,
                after: str | None = None) -> Iterator[Memory]:
    """Every memory present now (or at ``version``), any status, in id order."""
    rows = (core.ledger.iter_heads(txn, cube.name, after) if version is None
            else core.ledger.iter_state_at(txn, cube.name, version, after))
    for _, v, state in rows:
        yield Memory.from_state_bytes(state, v)


def plain_memory(row: tuple[int, bytes]) -> dict[str, Any]:
    """A memory's (version, state bytes) as ``Memory.model_dump(mode="json")`` would give it."""
    version, state = row
    mem = codec.unpack(state)
    mem["version"] = version
    mem["content_hash"] = codec.sha256_hex(state)
    mem["usage"] = None
    return mem


def _new_memory(item: Any) -> Any:
    """An item of add_many as NewMemory; anything else is left for _build to refuse."""
    if isinstance(item, NewMemory):
        return replace(item, tags=_once(item.tags), sources=_once(item.sources))
    if isinstance(item, catalog.NewMemoryArgs):
        return NewMemory(**{k: getattr(item, k) for k in NewMemory.__dataclass_fields__})
    if isinstance(item, str):
        return NewMemory(text=item)
    if isinstance(item, dict):
        try:
            return NewMemory(**item)
        except TypeError:
            raise InvalidRequest("items must be maps of add's fields", field="items") from None
    return item


def _batch(items: list[Any], core: Core) -> list[Any]:
    if len(items) > core.limits.max_batch:
        raise TooLarge(f"{len(items)} memories exceed the batch limit of {core.limits.max_batch}",
                       field="items", limit=core.limits.max_batch)
    return items


def _once(value: Any) -> Any:
    """A one-shot iterator as a list, taken when a Write is built.

    A unit may run again after the map grows; an iterator consumed by the
    first run would be empty the second time.
    """
    return list(value) if isinstance(value, Iterator) else value
