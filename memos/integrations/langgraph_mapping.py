"""The mapping under :class:`memos.integrations.langgraph.MemosStore`: tags, filters, items, the key index.

Plain functions and small classes; see the store's module docstring for the mapping itself.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import operator
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from langgraph.store.base import (
    Item,
    MatchCondition,
    SearchItem,
)

from memos.client import AsyncClient
from memos.errors import InvalidRequest
from memos.models import Memory

NS_FIELD = "lg_ns"
KEY_FIELD = "lg_key"
VALUE_FIELD = "lg_value"
FILTER_FIELD = "lg_f:"  # + a top-level field of the value: a copy the daemon's metadata filter reads
ITEM_TAG = "lg:item"
KEY_TAG = "lg:key:"
NS_TAG = "lg:ns:"
TAGGED_DEPTH = 16  # namespace prefixes tagged per item; deeper prefixes are checked here
FILTER_STRING_BYTES = 64  # longer strings are filtered here, not copied into metadata
MAX_K = 1000  # the daemon's largest search
RESCAN_AFTER = 5000  # versions behind: list the cube again rather than diff

_ORDER: dict[str, Callable[[Any, Any], bool]] = {
    "$gt": operator.gt, "$gte": operator.ge, "$lt": operator.lt, "$lte": operator.le,
}
_NOT_PUSHED = object()


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, ensure_ascii=False).encode()).hexdigest()[:32]


def _ident(namespace: Sequence[str], key: str) -> str:
    """An item's identity: the hash in its ``lg:key:`` tag."""
    return _digest([list(namespace), key])


def key_tag(namespace: Sequence[str], key: str) -> str:
    """The tag that marks the memory of one item (``memosctl list CUBE --tag ...``)."""
    return KEY_TAG + _ident(namespace, key)


def namespace_tag(namespace: Sequence[str]) -> str:
    """The tag every item under ``namespace`` carries (for depths up to 16)."""
    return NS_TAG + _digest(list(namespace))


def _origin(mem: Memory) -> tuple[tuple[str, ...], str] | None:
    """The namespace and key a memory stores, if it is a store item."""
    ns, key = mem.metadata.get(NS_FIELD), mem.metadata.get(KEY_FIELD)
    if (isinstance(ns, list) and ns and all(isinstance(x, str) for x in ns) and isinstance(key, str)
            and ITEM_TAG in mem.tags):
        return tuple(ns), key
    return None


def _filterable(value: Any) -> bool:
    """Whether a top-level field's value is copied into metadata for the daemon's equality filter."""
    if value is None or isinstance(value, (bool, int, float)):
        return True
    return isinstance(value, str) and len(value.encode()) <= FILTER_STRING_BYTES


def _pushed(wanted: Any) -> Any:
    """The value a filter condition asks the field to equal, if the daemon can check it; else _NOT_PUSHED."""
    if isinstance(wanted, dict) and set(wanted) == {"$eq"}:
        wanted = wanted["$eq"]
    return wanted if _filterable(wanted) else _NOT_PUSHED


def _orderable(value: Any) -> float | str | None:
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    return value if isinstance(value, str) else None


def _operator(actual: Any, op: str, arg: Any) -> bool:
    if op == "$eq":
        return bool(actual == arg)
    if op == "$ne":
        return bool(actual != arg)
    compare = _ORDER.get(op)
    if compare is None:
        raise InvalidRequest(f"unsupported filter operator {op!r}", field="filter")
    a, b = _orderable(actual), _orderable(arg)
    return a is not None and b is not None and type(a) is type(b) and compare(a, b)


def _compare(actual: Any, wanted: Any) -> bool:
    """LangGraph's filter semantics: equality, nested objects, lists, operators."""
    if isinstance(wanted, dict):
        if any(k.startswith("$") for k in wanted):
            return all(_operator(actual, op, arg) for op, arg in wanted.items())
        return isinstance(actual, dict) and all(_compare(actual.get(k), v) for k, v in wanted.items())
    if isinstance(wanted, (list, tuple)):
        return (isinstance(actual, list) and len(actual) == len(wanted)
                and all(_compare(a, w) for a, w in zip(actual, wanted)))
    return bool(actual == wanted)


def _matches(value: dict[str, Any], filter: dict[str, Any] | None) -> bool:
    return all(_compare(value.get(k), v) for k, v in (filter or {}).items())


def _namespace_matches(condition: MatchCondition, namespace: tuple[str, ...]) -> bool:
    path = tuple(condition.path)
    if len(namespace) < len(path):
        return False
    if condition.match_type == "prefix":
        pairs = zip(namespace, path)
    elif condition.match_type == "suffix":
        pairs = zip(reversed(namespace), reversed(path))
    else:
        raise InvalidRequest(f"unsupported namespace match type {condition.match_type!r}", field="match_type")
    return all(p == "*" or n == p for n, p in pairs)


def _when(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, tz=UTC)


def _item(mem: Memory, namespace: tuple[str, ...], key: str) -> Item:
    return Item(value=dict(mem.metadata.get(VALUE_FIELD) or {}), key=key, namespace=namespace,
                created_at=_when(mem.created_at), updated_at=_when(mem.updated_at))


def _search_item(mem: Memory, score: float | None) -> SearchItem:
    namespace, key = _origin(mem)  # type: ignore[misc]  # only store items get here
    return SearchItem(namespace=namespace, key=key, value=dict(mem.metadata.get(VALUE_FIELD) or {}),
                      created_at=_when(mem.created_at), updated_at=_when(mem.updated_at), score=score)


def _present(mem: Memory) -> bool:
    return str(mem.status) != "deleted"


# -- the index of one cube: key -> memory id ------------------------------------------


@dataclass
class _Entry:
    id: str
    namespace: tuple[str, ...]
    alive: bool


class _CubeIndex:
    """Which memory holds each key of one cube, as of cube version ``version``.

    Entries learned from the store's own writes may be newer than ``version``;
    a later ``diff`` from ``version`` confirms them. Of two memories holding
    the same key (two writers racing to create it), the older one keeps it.
    """

    __slots__ = ("entries", "version")

    def __init__(self) -> None:
        self.version: int | None = None
        self.entries: dict[str, _Entry] = {}

    def learn(self, mem: Memory) -> None:
        origin = _origin(mem)
        if origin is None:
            return
        ident = _ident(*origin)
        current = self.entries.get(ident)
        if current is None or mem.id <= current.id:
            self.entries[ident] = _Entry(mem.id, origin[0], _present(mem))

    def forget(self, memory_id: str) -> None:
        for ident, entry in list(self.entries.items()):
            if entry.id == memory_id:
                del self.entries[ident]

    def lookup(self, ident: str) -> str | None:
        entry = self.entries.get(ident)
        return None if entry is None else entry.id


# -- running the same code on either client -------------------------------------------


class _Conn:
    """The client operations the store's code awaits, and how it runs several at once.

    On the blocking :class:`Client` every awaited call completes without
    suspending, so one coroutine of the store runs to its end in one step
    (:func:`_drive`); on :class:`AsyncClient` independent calls run together.
    """

    __slots__ = ("client", "concurrent")

    def __init__(self, client: AsyncClient, concurrent: bool) -> None:
        self.client = client
        self.concurrent = concurrent

    async def call(self, op: str, *args: Any, **kwargs: Any) -> Any:
        # AsyncClient's coroutine even on a Client: there it awaits the blocking call().
        return await getattr(AsyncClient, op)(self.client, *args, **kwargs)

    async def all(self, coros: Iterable[Coroutine[Any, Any, Any]]) -> list[Any]:
        pending = list(coros)
        if self.concurrent:
            return list(await asyncio.gather(*pending))
        out = []
        try:
            for i, coro in enumerate(pending):
                out.append(await coro)
        except BaseException:
            for coro in pending[i + 1:]:
                coro.close()
            raise
        return out


def _drive(coro: Coroutine[Any, Any, Any]) -> Any:
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("a blocking store operation suspended")
