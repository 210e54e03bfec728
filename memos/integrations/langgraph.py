"""LangGraph's long-term memory store over memosd: :class:`MemosStore` (extra ``memos[langgraph]``).

``MemosStore`` is a ``langgraph.store.base.BaseStore``: a graph compiled with
``builder.compile(store=MemosStore(token=...))`` keeps what its nodes ``put`` as
memos memories, versioned, audited and checked against the agent's token like
any other write. ``batch`` runs on the blocking :class:`~memos.client.Client`,
``abatch`` on :class:`~memos.client.AsyncClient` (one per event loop, requests
of one batch in flight together). Both run the same code.

The mapping, in short (``docs/langgraph.md`` has it in full): a namespace's
first label selects the cube (``("users", "ada")`` lives in ``lg-users``;
``MemosStore(cube=...)`` keeps one cube for all); an item is one plaintext
memory whose metadata holds the namespace, key and value, tagged by key and by
namespace prefixes, its text the value's ``index`` fields; ``put`` of an
existing key is a new version of the same memory, ``delete`` soft-deletes it,
so ``history`` and ``rollback`` see every value a key had. Keys are found
through a per-cube index kept current by ``diff``; ``search`` with a query is
memos' hybrid search. TTLs are not supported.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import weakref
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Self

from langgraph.store.base import (
    BaseStore,
    GetOp,
    InvalidNamespaceError,
    Item,
    ListNamespacesOp,
    Op,
    PutOp,
    Result,
    SearchItem,
    SearchOp,
    get_text_at_path,
    validate_op_namespace,
)

from memos.client import AsyncClient, Client
from memos.errors import Conflict, InvalidRequest, NotFound
from memos.models import NAME_PATTERN, Memory

__all__ = ["MemosStore"]

from .langgraph_mapping import (  # noqa: F401  (key_tag, namespace_tag: part of this module's API)
    _NOT_PUSHED, _ORDER, FILTER_FIELD, FILTER_STRING_BYTES, ITEM_TAG, KEY_FIELD, KEY_TAG, MAX_K, NS_FIELD,
    NS_TAG, RESCAN_AFTER, TAGGED_DEPTH, VALUE_FIELD, _compare, _Conn, _CubeIndex, _digest, _drive, _Entry,
    _filterable, _ident, _item, _matches, _namespace_matches, _operator, _orderable, _origin, _present,
    _pushed, _search_item, _when, key_tag, namespace_tag,
)

# -- the store -------------------------------------------------------------------------


class MemosStore(BaseStore):
    """A LangGraph store whose items are versioned memos memories (see the module's docstring).

    ``socket`` and ``token`` default to ``MEMOS_SOCKET`` and ``MEMOS_TOKEN``
    (no token: the daemon's local administrator). ``cube_prefix`` names the
    cubes (``f"{cube_prefix}-{namespace[0]}"``); ``cube`` puts every namespace
    in one cube instead. ``index={"fields": [...]}`` chooses the value's fields
    that make a memory's searchable text (the daemon embeds it; ``dims`` and
    ``embed`` are not used). ``max_text_bytes`` bounds that text.
    """

    supports_ttl = False

    def __init__(
        self, socket: str | None = None, token: str | None = None, *, cube_prefix: str = "lg",
        cube: str | None = None, create_cubes: bool = True, index: dict[str, Any] | None = None,
        timeout: float = 30.0, max_text_bytes: int = 32 * 1024,
    ) -> None:
        if not NAME_PATTERN.match(cube_prefix) or len(cube_prefix) > 32:
            raise ValueError(f"cube_prefix {cube_prefix!r}: 1-32 letters, digits, '_.-', starting with one of the first two")
        if cube is not None and not NAME_PATTERN.match(cube):
            raise ValueError(f"cube {cube!r} is not a valid cube name")
        self.socket = socket
        self.token = token
        self.cube_prefix = cube_prefix
        self.cube = cube
        self.create_cubes = create_cubes
        fields = (index or {}).get("fields")
        self.fields: list[str] | None = None if fields is None else [str(f) for f in fields]
        self.timeout = timeout
        self.max_text_bytes = max_text_bytes
        self._client = Client(socket, token=token, timeout=timeout)
        self._aclients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, AsyncClient] = weakref.WeakKeyDictionary()
        self._lock = threading.RLock()
        self._indexes: dict[str, _CubeIndex] = {}

    # -- lifecycle ----------------------------------------------------------

    def close(self) -> None:
        """Close the blocking client's sockets (and those of event loops that have ended)."""
        self._client.close()
        with self._lock:
            for loop, client in list(self._aclients.items()):
                if loop.is_closed() or not loop.is_running():
                    sock = client._sock
                    if sock is not None:
                        sock.close(linger=0)
                        client._sock = None
                    del self._aclients[loop]

    async def aclose(self) -> None:
        """Close the asyncio client of the running event loop."""
        with self._lock:
            client = self._aclients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _aclient(self) -> AsyncClient:
        loop = asyncio.get_running_loop()
        with self._lock:
            client = self._aclients.get(loop)
            if client is None:
                # A client's reader task holds its loop, so the weak key alone never lets go of
                # a finished loop's client: drop those of loops that are closed now.
                for old in [other for other in self._aclients if other.is_closed()]:
                    self._aclients.pop(old).discard()
                client = self._aclients[loop] = AsyncClient(self.socket, token=self.token, timeout=self.timeout)
            return client

    # -- BaseStore --------------------------------------------------------------

    def batch(self, ops: Iterable[Op]) -> list[Result]:
        return _drive(self._batch(_Conn(self._client, False), ops))

    async def abatch(self, ops: Iterable[Op]) -> list[Result]:
        return await self._batch(_Conn(self._aclient(), True), ops)

    # -- where a key's memory is -------------------------------------------------

    def locate(self, namespace: tuple[str, ...], key: str) -> tuple[str, str] | None:
        """The cube and memory id that hold an item (deleted or not), for memos' history and rollback."""
        return _drive(self._locate(_Conn(self._client, False), tuple(namespace), str(key)))

    async def alocate(self, namespace: tuple[str, ...], key: str) -> tuple[str, str] | None:
        return await self._locate(_Conn(self._aclient(), True), tuple(namespace), str(key))

    def cube_for(self, namespace: tuple[str, ...]) -> str:
        """The cube a namespace's items live in."""
        if self.cube is not None:
            return self.cube
        if not namespace:
            raise InvalidNamespaceError("Namespace cannot be empty.")
        name = f"{self.cube_prefix}-{namespace[0]}"
        if NAME_PATTERN.match(name) and len(name.encode()) <= 64:
            return name
        return f"{self.cube_prefix}--{hashlib.sha256(namespace[0].encode()).hexdigest()[:24]}"

    async def _locate(self, conn: _Conn, namespace: tuple[str, ...], key: str) -> tuple[str, str] | None:
        validate_op_namespace(GetOp(namespace, key))
        cube = self.cube_for(namespace)
        mem = await self._find(conn, cube, namespace, key)
        return None if mem is None else (cube, mem.id)

    # -- the batch --------------------------------------------------------------

    async def _batch(self, conn: _Conn, ops: Iterable[Op]) -> list[Result]:
        reads: list[tuple[int, Awaitable[Result]]] = []
        puts: dict[tuple[tuple[str, ...], str], PutOp] = {}  # the last put of a key wins
        results: list[Result] = []
        for i, op in enumerate(ops):
            results.append(None)
            validate_op_namespace(op)
            if isinstance(op, GetOp):
                reads.append((i, self._get(conn, tuple(op.namespace), str(op.key))))
            elif isinstance(op, SearchOp):
                reads.append((i, self._search(conn, op)))
            elif isinstance(op, ListNamespacesOp):
                reads.append((i, self._list_namespaces(conn, op)))
            elif isinstance(op, PutOp):
                if not op.namespace:
                    raise InvalidNamespaceError("Namespace cannot be empty.")
                if op.ttl is not None:  # LangGraph's own refusal for a store with supports_ttl = False
                    raise NotImplementedError("MemosStore does not support TTLs; put with ttl=None")
                puts[(tuple(op.namespace), str(op.key))] = op
            else:
                raise TypeError(f"unknown operation type: {type(op).__name__}")
        # Reads first, as in LangGraph's InMemoryStore: they see the store before this batch's writes.
        for (i, _), result in zip(reads, await conn.all(coro for _, coro in reads)):
            results[i] = result
        if puts:
            by_cube: dict[str, list[PutOp]] = {}
            for (namespace, key), op in puts.items():
                by_cube.setdefault(self.cube_for(namespace), []).append(op._replace(namespace=namespace, key=key))
            await conn.all(self._put_cube(conn, cube, cube_ops) for cube, cube_ops in by_cube.items())
        return results

    # -- the index ------------------------------------------------------------------

    def _index(self, cube: str) -> _CubeIndex:
        with self._lock:
            index = self._indexes.get(cube)
            if index is None:
                index = self._indexes[cube] = _CubeIndex()
            return index

    def _learn(self, cube: str, mems: Iterable[Memory]) -> None:
        index = self._index(cube)
        with self._lock:
            for mem in mems:
                index.learn(mem)

    async def _sync(self, conn: _Conn, cube: str) -> int | None:
        """Bring the cube's index up to the cube's version; that version, or None without the cube."""
        index = self._index(cube)
        try:
            now = (await conn.call("cube_get", cube)).version
        except NotFound:
            with self._lock:
                index.version, index.entries = None, {}
            return None
        base = index.version
        if base is not None and now <= base:
            return now
        if base is None or now - base > RESCAN_AFTER:
            mems = await self._scan(conn, cube)
            fresh = _CubeIndex()
            for mem in mems:
                fresh.learn(mem)
            with self._lock:
                if index.version is None or now > index.version:
                    index.version, index.entries = now, fresh.entries
            return now
        changes = await conn.call("diff", cube, base, now)
        with self._lock:
            if index.version is not None and now > index.version:
                for change in changes:
                    if change.after is None:
                        index.forget(change.memory_id)
                    else:
                        index.learn(change.after)
                index.version = now
        return now

    async def _scan(self, conn: _Conn, cube: str, tag: str = ITEM_TAG,
                    keep: Callable[[Memory], bool] | None = None, need: int | None = None) -> list[Memory]:
        """The cube's memories with ``tag`` (every status) in creation order, ``need`` of them kept at most."""
        page = 500 if need is None else min(MAX_K, max(64, need))
        out: list[Memory] = []
        after = None
        while need is None or len(out) < need:
            mems = await conn.call("list", cube, status="all", tag=tag, limit=page, after=after)
            out.extend(m for m in mems if keep is None or keep(m))
            if len(mems) < page:
                break
            after = mems[-1].id
        return out if need is None else out[:need]

    async def _find(self, conn: _Conn, cube: str, namespace: tuple[str, ...], key: str) -> Memory | None:
        """The memory that holds an item, deleted or not; None if the key was never stored."""
        ident = _ident(namespace, key)
        index = self._index(cube)
        for attempt in range(2):
            with self._lock:
                memory_id = index.lookup(ident)
            if memory_id is not None:
                try:
                    mem = await conn.call("get", cube, memory_id, include_deleted=True)
                except NotFound:  # rolled back to before it existed
                    mem = None
                if mem is not None and _origin(mem) == (namespace, key):
                    return mem
                with self._lock:
                    index.forget(memory_id)
            if attempt == 0 and await self._sync(conn, cube) is None:
                return None
        return None

    # -- reads ----------------------------------------------------------------------

    async def _get(self, conn: _Conn, namespace: tuple[str, ...], key: str) -> Item | None:
        mem = await self._find(conn, self.cube_for(namespace), namespace, key)
        return _item(mem, namespace, key) if mem is not None and _present(mem) else None

    async def _cubes(self, conn: _Conn, first: str | None) -> list[str]:
        """The cubes that may hold namespaces starting with ``first`` (None: any), sorted."""
        if self.cube is not None:
            return [self.cube]
        if first is not None and first != "*":
            return [self.cube_for((first,))]
        mine = f"{self.cube_prefix}-"
        return sorted(c.name for c in await conn.call("cube_list") if c.name.startswith(mine))

    async def _search(self, conn: _Conn, op: SearchOp) -> list[SearchItem]:
        prefix = tuple(op.namespace_prefix)
        limit, offset = max(0, op.limit), max(0, op.offset)
        need = offset + limit
        if need == 0:
            return []
        tag = namespace_tag(prefix[:TAGGED_DEPTH]) if prefix else ITEM_TAG
        pushed: dict[str, Any] = {}
        exact = len(prefix) <= TAGGED_DEPTH
        for field, wanted in (op.filter or {}).items():
            value = _pushed(wanted)
            if value is _NOT_PUSHED:
                exact = False
            else:
                pushed[FILTER_FIELD + field] = value

        def keep(mem: Memory) -> bool:
            origin = _origin(mem)
            return (origin is not None and origin[0][:len(prefix)] == prefix and _present(mem)
                    and _matches(mem.metadata.get(VALUE_FIELD) or {}, op.filter))

        cubes = await self._cubes(conn, prefix[0] if prefix else None)
        query = (op.query or "").strip()
        if not query:
            out: list[Memory] = []
            for cube in cubes:
                try:
                    out.extend(await self._scan(conn, cube, tag, keep, need - len(out)))
                except NotFound:
                    continue
                if len(out) >= need:
                    break
            return [_search_item(m, None) for m in out[offset:need]]

        async def ranked(cube: str) -> list[tuple[float, Memory]]:
            k = min(MAX_K, need if exact else max(2 * need, 20))
            while True:
                try:
                    hits = await conn.call("search", cube, query, k=k, tags=[tag], status="all",
                                           metadata=pushed or None)
                except NotFound:
                    return []
                found = [(h.score, h.memory) for h in hits if keep(h.memory)]
                if len(found) >= need or len(hits) < k or k >= MAX_K:
                    return found[:need]
                k = min(MAX_K, 4 * k)

        merged = [hit for found in await conn.all(ranked(c) for c in cubes) for hit in found]
        merged.sort(key=lambda hit: -hit[0])
        return [_search_item(m, score) for score, m in merged[offset:need]]

    async def _list_namespaces(self, conn: _Conn, op: ListNamespacesOp) -> list[tuple[str, ...]]:
        conditions = tuple(op.match_conditions or ())
        first = next((c.path[0] for c in conditions if c.match_type == "prefix" and c.path), None)
        cubes = await self._cubes(conn, first)
        await conn.all(self._sync(conn, cube) for cube in cubes)
        found: set[tuple[str, ...]] = set()
        with self._lock:
            for cube in cubes:
                index = self._indexes.get(cube)
                if index is not None:
                    found.update(e.namespace for e in index.entries.values() if e.alive)
        namespaces = [ns for ns in found if all(_namespace_matches(c, ns) for c in conditions)]
        if op.max_depth is not None:
            namespaces = list({ns[:op.max_depth] for ns in namespaces})
        return sorted(namespaces)[op.offset:op.offset + op.limit]

    # -- writes ------------------------------------------------------------------------

    def _text(self, key: str, value: dict[str, Any], index: Any) -> str:
        """What search reads of an item: its index fields, else its JSON; the key if that is empty."""
        if index is False:
            text = key
        else:
            fields = index if index is not None else self.fields
            if fields is None:
                text = json.dumps(value, ensure_ascii=False)
            else:
                text = "\n".join(t for f in fields for t in get_text_at_path(value, f))
        if not text.strip():
            text = key
        data = text.encode()
        if len(data) > self.max_text_bytes:
            text = data[:self.max_text_bytes].decode(errors="ignore")
        return text

    def _fields(self, op: PutOp) -> dict[str, Any]:
        """A put's memory: text, tags and metadata."""
        namespace, key = tuple(op.namespace), str(op.key)
        try:
            value = json.loads(json.dumps(dict(op.value)))  # type: ignore[arg-type]
        except (TypeError, ValueError) as exc:
            raise InvalidRequest(f"the value of {namespace}/{key} is not JSON: {exc}", field="value") from None
        metadata: dict[str, Any] = {NS_FIELD: list(namespace), KEY_FIELD: key, VALUE_FIELD: value}
        metadata.update((FILTER_FIELD + k, v) for k, v in value.items() if _filterable(v))
        tags = [ITEM_TAG, key_tag(namespace, key)]
        tags += [namespace_tag(namespace[:depth]) for depth in range(1, min(len(namespace), TAGGED_DEPTH) + 1)]
        return {"text": self._text(key, value, op.index), "tags": tags, "metadata": metadata}

    async def _write(self, conn: _Conn, cube: str, memory_id: str, op: PutOp) -> bool:
        """Put or delete through the memory that holds the key; False if that memory is gone."""
        try:
            if op.value is None:
                mem = await conn.call("get", cube, memory_id, include_deleted=True)
                if _present(mem):
                    mem = await conn.call("delete", cube, memory_id)
            else:
                fields = self._fields(op)
                mem = await conn.call("update", cube, memory_id, fields["text"], tags=fields["tags"],
                                      metadata=fields["metadata"], status="active")
        except NotFound:
            index = self._index(cube)
            with self._lock:
                index.forget(memory_id)
            return False
        self._learn(cube, [mem])
        return True

    async def _put_cube(self, conn: _Conn, cube: str, ops: list[PutOp]) -> None:
        index = self._index(cube)

        def holder(op: PutOp) -> str | None:
            with self._lock:
                return index.lookup(_ident(op.namespace, op.key))

        known = [(op, holder(op)) for op in ops]
        written = await conn.all(self._write(conn, cube, mid, op) for op, mid in known if mid is not None)
        done = iter(written)
        unknown = [op for op, mid in known if mid is None or not next(done)]
        if not unknown:
            return
        base = await self._sync(conn, cube)
        if base is None:
            if all(op.value is None for op in unknown):
                return
            if not self.create_cubes:
                raise NotFound(f"no cube {cube!r} (MemosStore(create_cubes=False))", cube=cube)
            try:
                await conn.call("cube_create", cube)
            except Conflict:
                pass  # created meanwhile
            base = await self._sync(conn, cube)
            if base is None:
                raise NotFound(f"cube {cube!r} vanished after it was created", cube=cube)
        new: list[PutOp] = []
        for op in unknown:
            mid = holder(op)
            if mid is not None and await self._write(conn, cube, mid, op):
                continue
            if op.value is not None:
                new.append(op)
        if not new:
            return
        items = [self._fields(op) for op in new]
        if len(items) == 1:
            fields = items[0]
            mems = [await conn.call("add", cube, fields.pop("text"), **fields)]
        else:
            mems = await conn.call("add_many", cube, items)
        self._learn(cube, mems)
        if mems and mems[0].version != base + 1:
            # Someone wrote between our look and our add: maybe the same new key. The older memory keeps it.
            await self._sync(conn, cube)
            for op, mem in zip(new, mems):
                mid = holder(op)
                if mid is not None and mid != mem.id:
                    await self._write(conn, cube, mid, op)
                    await conn.call("delete", cube, mem.id)
