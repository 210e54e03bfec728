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
    """LMDB's cursor: a position in one table's key order, moved by seeks and steps."""

    __slots__ = ("_txn", "_t", "_item", "_ahead", "_dir", "_stamp", "_batch", "_deleted")

    def __init__(self, txn: Transaction, table: Table) -> None:
        self._txn, self._t = txn, table
        self._item: tuple[bytes, bytes | None] | None = None  # value None: not read yet
        self._ahead: deque[tuple[bytes, bytes | None]] = deque()  # what follows, in direction _dir
        self._dir = 0
        self._stamp = -1
        self._batch = _FIRST_BATCH
        self._deleted = False  # delete() moved to the following item: the next step stays there

    # -- positioning --------------------------------------------------

    def _load(self, kind: str, key: bytes | None, direction: int, values: bool = True) -> bool:
        params: tuple[Any, ...] = (self._batch,) if key is None else (bytes(key), self._batch)
        self._txn.flush(self._t)
        rows = self._txn._rows(self._t.sql(kind, values), params)
        self._batch = min(self._batch * 4, _MAX_BATCH)
        self._deleted = False
        if not rows:
            self._item = None
            self._ahead.clear()
            return False
        self._item = (bytes(rows[0][0]), rows[0][1])
        self._ahead = deque((bytes(k), v) for k, v in rows[1:])
        self._dir, self._stamp = direction, self._txn.writes
        return True

    def _seek(self, kind: str, key: bytes | None, direction: int, values: bool = True) -> bool:
        self._batch = _FIRST_BATCH
        return self._load(kind, key, direction, values)

    def first(self) -> bool:
        return self._seek("first", None, 1)

    def last(self) -> bool:
        return self._seek("last", None, -1)

    def set_range(self, key: bytes) -> bool:
        return self._seek("ge", key, 1)

    def set_key(self, key: bytes) -> bool:
        value = self._txn.get(key, db=self._t)
        self._ahead.clear()
        self._deleted = False
        self._item = None if value is None else (bytes(key), value)
        return value is not None

    def _step(self, direction: int, values: bool = True) -> bool:
        if self._item is None:
            return self._seek("first" if direction > 0 else "last", None, direction, values)
        if self._deleted and direction > 0:
            self._deleted = False
            return True
        if self._dir == direction and self._ahead and self._stamp == self._txn.writes:
            self._item = self._ahead.popleft()
            return True
        return self._load("gt" if direction > 0 else "lt", self._item[0], direction, values)

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
        """Delete the current item and move to the one following it, as LMDB's cursor does."""
        if self._item is None:
            return False
        key = self._item[0]
        self._txn.delete(key, db=self._t)
        moved = self._load("gt", key, 1)
        self._deleted = moved
        return True

    def put(self, key: bytes, value: bytes, overwrite: bool = True) -> bool:
        done = self._txn.put(key, value, db=self._t, overwrite=overwrite)
        self._item, self._deleted = (bytes(key), bytes(value)), False
        self._ahead.clear()
        return done
