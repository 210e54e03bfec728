"""LMDB's transaction and cursor, over PostgreSQL tables: what memos.pgstore hands to the code above.

Every part of memos reads and writes the store through a transaction's
``get``/``put``/``delete``/``cursor`` on named sub-databases, in key order.
PostgreSQL holds each sub-database as a table ``(k bytea PRIMARY KEY, v bytea)``
(bytea sorts byte by byte, as LMDB's keys do), so the same code runs on both.

A cursor reads ahead in small, growing batches in the direction it moves, and
drops what it read ahead whenever its transaction writes, so that it sees the
transaction's own writes exactly as an LMDB cursor does.

Plain puts are held back and sent together (one ``executemany``, one round trip)
when the store ends a unit of work, or before anything reads the table they
change through SQL: an add writes half a dozen rows, and round trips are what a
write to PostgreSQL costs. ``get`` reads the held-back rows first.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

import psycopg

from .errors import StorageError

_FIRST_BATCH, _MAX_BATCH = 1, 256


class Table:
    """The handle of one sub-database (``store.db[name]``): its table and the statements on it."""

    __slots__ = ("name", "ident", "_sql")

    def __init__(self, schema: str, name: str) -> None:
        self.name = name
        self.ident = f"{quote(schema)}.{quote(name)}"
        t = self.ident
        self._sql: dict[tuple[str, bool], str] = {}
        for values in (True, False):
            cols = "k, v" if values else "k, NULL::bytea"
            self._sql.update({
                ("ge", values): f"SELECT {cols} FROM {t} WHERE k >= %b ORDER BY k LIMIT %s",
                ("gt", values): f"SELECT {cols} FROM {t} WHERE k > %b ORDER BY k LIMIT %s",
                ("le", values): f"SELECT {cols} FROM {t} WHERE k <= %b ORDER BY k DESC LIMIT %s",
                ("lt", values): f"SELECT {cols} FROM {t} WHERE k < %b ORDER BY k DESC LIMIT %s",
                ("first", values): f"SELECT {cols} FROM {t} ORDER BY k LIMIT %s",
                ("last", values): f"SELECT {cols} FROM {t} ORDER BY k DESC LIMIT %s",
            })
        self._sql[("get", True)] = f"SELECT v FROM {t} WHERE k = %b"
        self._sql[("put", True)] = (f"INSERT INTO {t} (k, v) VALUES (%b, %b) "
                                    "ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v")
        self._sql[("put_new", True)] = f"INSERT INTO {t} (k, v) VALUES (%b, %b) ON CONFLICT (k) DO NOTHING"
        self._sql[("delete", True)] = f"DELETE FROM {t} WHERE k = %b"
        self._sql[("count", True)] = f"SELECT count(*) FROM {t}"

    def sql(self, kind: str, values: bool = True) -> str:
        return self._sql[(kind, values)]

    def create(self) -> str:
        return f"CREATE TABLE IF NOT EXISTS {self.ident} (k bytea PRIMARY KEY, v bytea NOT NULL)"


def quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


class Transaction:
    """One PostgreSQL transaction with LMDB's ``Transaction`` methods that memos uses."""

    __slots__ = ("_cur", "write", "writes", "_held")

    def __init__(self, cur: psycopg.Cursor[Any], write: bool) -> None:
        self._cur = cur
        self.write = write
        self.writes = 0  # bumped by every change: cursors drop what they read ahead
        self._held: dict[Table, dict[bytes, bytes]] = {}  # puts not sent yet, by table

    def flush(self, table: Table | None = None) -> None:
        """Send the held-back puts (of ``table``, or all): before SQL reads that table, and at the
        end of each unit of work."""
        for t in [table] if table is not None else list(self._held):
            rows = self._held.pop(t, None)
            if rows:
                self._cur.executemany(t.sql("put"), list(rows.items()))

    def discard(self) -> None:
        """Forget the held-back puts: their unit of work is rolled back."""
        self._held.clear()
        self.writes += 1

    def _rows(self, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
        self._cur.execute(sql, params)
        return self._cur.fetchall()

    def _change(self, sql: str, params: tuple[Any, ...]) -> int:
        if not self.write:
            raise StorageError("a write in a read-only transaction")
        self.writes += 1
        self._cur.execute(sql, params)
        return self._cur.rowcount

    def get(self, key: bytes, default: Any = None, db: Table | None = None) -> Any:
        table = _table(db)
        held = self._held.get(table)
        if held is not None and (value := held.get(bytes(key))) is not None:
            return value
        rows = self._rows(table.sql("get"), (bytes(key),))
        return rows[0][0] if rows else default

    def put(self, key: bytes, value: bytes, db: Table | None = None, overwrite: bool = True) -> bool:
        table = _table(db)
        if not overwrite:  # whether the key was there decides: asked now
            self.flush(table)
            return self._change(table.sql("put_new"), (bytes(key), bytes(value))) == 1
        if not self.write:
            raise StorageError("a write in a read-only transaction")
        self.writes += 1
        self._held.setdefault(table, {})[bytes(key)] = bytes(value)
        return True

    def delete(self, key: bytes, value: bytes = b"", db: Table | None = None) -> bool:
        table = _table(db)
        self.flush(table)
        return self._change(table.sql("delete"), (bytes(key),)) == 1

    def cursor(self, db: Table | None = None) -> Cursor:
        return Cursor(self, _table(db))

    def load(self, db: Table, rows: Iterable[tuple[bytes, bytes]]) -> int:
        """Append rows whose keys the table does not hold yet, by COPY (memosctl migrate); how many."""
        if not self.write:
            raise StorageError("a write in a read-only transaction")
        self.flush(db)
        self.writes += 1
        n = 0
        with self._cur.copy(f"COPY {db.ident} (k, v) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(["bytea", "bytea"])
            for key, value in rows:
                copy.write_row((bytes(key), bytes(value)))
                n += 1
        return n

    def stat(self, db: Table) -> dict[str, int]:
        self.flush(db)
        return {"entries": self._rows(db.sql("count"), ())[0][0]}


def _table(db: Table | None) -> Table:
    if db is None:  # LMDB's main database: memos never uses it
        raise StorageError("no sub-database named")
    return db


class Cursor:
    """LMDB's cursor: a position in one table's key order, moved by seeks and steps.

    Where LMDB leaves an unpositioned cursor after a failed move matters to the next step
    (``_ghost``): past the end, after a failed seek or a step off the last item (``next``
    fails again, ``prev`` finds the item before); before the start, after a step off the first
    item; or in the gap where a key ``set_key`` missed would be. tests/test_pgkv.py checks
    every answer against LMDB's own cursor.
    """

    __slots__ = ("_txn", "_t", "_item", "_ahead", "_dir", "_stamp", "_batch", "_ghost")

    def __init__(self, txn: Transaction, table: Table) -> None:
        self._txn, self._t = txn, table
        self._item: tuple[bytes, bytes | None] | None = None  # value None: not read yet
        self._ahead: deque[tuple[bytes, bytes | None]] = deque()  # what follows, in direction _dir
        self._dir = 0
        self._stamp = -1
        self._batch = _FIRST_BATCH
        self._ghost: tuple[str, bytes | None] | None = None  # unpositioned after a failed move: where

    # -- positioning --------------------------------------------------

    def _rows(self, kind: str, key: bytes | None, n: int, values: bool = True) -> list[tuple[bytes, Any]]:
        params: tuple[Any, ...] = (n,) if key is None else (bytes(key), n)
        self._txn.flush(self._t)
        return [(bytes(k), v) for k, v in self._txn._rows(self._t.sql(kind, values), params)]

    def _land(self, rows: list[tuple[bytes, Any]], direction: int) -> None:
        self._item, self._ahead = rows[0], deque(rows[1:])
        self._dir, self._stamp, self._ghost = direction, self._txn.writes, None

    def _move(self, kind: str, key: bytes | None, direction: int, values: bool, fail: Any) -> bool:
        rows = self._rows(kind, key, self._batch, values)
        self._batch = min(self._batch * 4, _MAX_BATCH)
        if rows:
            self._land(rows, direction)
            return True
        self._item, self._ghost = None, fail
        self._ahead.clear()
        return False

    def _seek(self, kind: str, key: bytes | None, direction: int, values: bool = True) -> bool:
        self._batch = _FIRST_BATCH
        return self._move(kind, key, direction, values, ("end", None))

    def first(self) -> bool:
        return self._seek("first", None, 1)

    def last(self) -> bool:
        return self._seek("last", None, -1)

    def set_range(self, key: bytes) -> bool:
        return self._seek("ge", key, 1)

    def set_key(self, key: bytes) -> bool:
        value = self._txn.get(key, db=self._t)
        self._ahead.clear()
        if value is not None:
            self._item, self._ghost = (bytes(key), value), None
            return True
        self._item = None  # where the key would be: past the end, or between two items
        self._ghost = ("gap", bytes(key)) if self._rows("gt", key, 1, False) else ("end", None)
        return False

    def _step(self, direction: int, values: bool = True) -> bool:
        forward = direction > 0
        if self._item is None:
            if self._ghost is None:  # never positioned: from the first (or the last) item
                return self._seek("first" if forward else "last", None, direction, values)
            place, ref = self._ghost
            self._batch = _FIRST_BATCH
            if place == "gap" and forward:  # LMDB steps over the item that took the missing key's place
                rows = self._rows("gt", ref, 2, values)
                if len(rows) < 2:  # ran off the end from that item
                    self._ghost = ("end", rows[0][0]) if rows else ("end", None)
                    return False
                self._land(rows[1:], direction)
                return True
            if (place == "end" and forward) or (place == "start" and not forward):
                return False
            if ref is None:
                return self._move("last", None, direction, values, ("start", None))
            kind = ("gt" if forward else "lt") if place != "gap" else "lt"
            return self._move(kind, ref, direction, values, ("start", None) if not forward else ("end", None))
        if self._dir == direction and self._ahead and self._stamp == self._txn.writes:
            self._item = self._ahead.popleft()
            return True
        here = self._item[0]
        return self._move("gt" if forward else "lt", here, direction, values,
                          ("end", here) if forward else ("start", here))

    def next(self) -> bool:
        return self._step(1)

    def prev(self) -> bool:
        return self._step(-1)

    # -- reading ------------------------------------------------------

    def key(self) -> bytes:
        return b"" if self._item is None else self._item[0]

    def value(self) -> bytes:
        if self._item is None:
            return b""
        k, v = self._item
        if v is None:  # stepped to by a keys-only iteration
            v = self._txn.get(k, default=b"", db=self._t)
            self._item = (k, v)
        return v

    def item(self) -> tuple[bytes, bytes]:
        return self.key(), self.value()

    def _iter(self, direction: int, keys: bool, values: bool) -> Iterator[Any]:
        # Unpositioned (never, or after a failed move): from the first item, as LMDB's iterators do.
        if self._item is None and not self._seek("first" if direction > 0 else "last", None, direction, values):
            return
        while True:
            if keys and values:
                yield self.item()
            elif keys:
                yield self.key()
            else:
                yield self.value()
            if not self._step(direction, values):
                return

    def iternext(self, keys: bool = True, values: bool = True) -> Iterator[Any]:
        return self._iter(1, keys, values)

    def iterprev(self, keys: bool = True, values: bool = True) -> Iterator[Any]:
        return self._iter(-1, keys, values)

    def __iter__(self) -> Iterator[Any]:
        return self._iter(1, True, True)

    # -- changing -----------------------------------------------------

    def delete(self) -> bool:
        """Delete the current item; the cursor is then on the item that followed it, as LMDB's is."""
        if self._item is None:
            return False
        key = self._item[0]
        self._txn.delete(key, db=self._t)
        self._batch = _FIRST_BATCH
        self._move("gt", key, 1, True, ("end", None))
        return True
