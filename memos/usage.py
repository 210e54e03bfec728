"""Read counts: gathered in memory, written with a later commit, never a write per read."""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

import lmdb

from . import clock, codec
from .ids import is_id
from .ledger import memory_key
from .models import NAME_PATTERN, Usage
from .storage import Store


class UsageCounts:
    """Reads of memories (by get, search, generation): buffered, then stored in ``usage``."""

    def __init__(self, store: Store) -> None:
        self.db = store.db["usage"]
        self.pending: dict[tuple[str, str], list[float]] = {}
        self.lock = threading.Lock()

    def record(self, cube: str, ids: Iterable[str]) -> None:
        now = clock.now()
        with self.lock:
            for memory_id in ids:
                entry = self.pending.setdefault((cube, memory_id), [0, now])
                entry[0] += 1
                entry[1] = now

    def record_checked(self, cube: Any, ids: Iterable[Any]) -> None:
        """``record`` for names from outside: counts are written inside other callers'
        commits, so a malformed key must be dropped here, not fail their writes later."""
        if isinstance(cube, str) and NAME_PATTERN.match(cube):
            self.record(cube, [m for m in ids if is_id(m)])

    def peek(self, cube: str, memory_id: str) -> tuple[int, float | None]:
        with self.lock:
            count, last = self.pending.get((cube, memory_id), (0, None))
        return int(count), last

    def take(self) -> dict[tuple[str, str], list[float]]:
        with self.lock:
            out, self.pending = self.pending, {}
        return out

    def plain(self, txn: lmdb.Transaction, cube: str, memory_id: str) -> dict[str, Any]:
        """Stored read counts plus those not yet written, as ``Usage`` plain data."""
        raw = txn.get(memory_key(cube, memory_id), db=self.db)
        usage = codec.unpack(raw) if raw is not None else {"reads": 0, "last_read": None}
        count, last = self.peek(cube, memory_id)
        usage["reads"] += count
        if last is not None:
            usage["last_read"] = last
        return usage

    def write(self, txn: lmdb.Transaction, pending: dict[tuple[str, str], list[float]]) -> None:
        for (cube, memory_id), (count, last) in pending.items():
            key = memory_key(cube, memory_id)
            raw = txn.get(key, db=self.db)
            usage = Usage.model_validate(codec.unpack(raw)) if raw is not None else Usage()
            usage.reads += int(count)
            usage.last_read = max(usage.last_read or 0.0, last)
            txn.put(key, codec.pack_unsorted(usage.model_dump(mode="json")), db=self.db)
