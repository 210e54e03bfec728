"""The append-only, hash-chained audit log.

Record ``n`` stores the hash of record ``n-1``; its own hash covers every field
including that link, so changing, removing or reordering any record breaks the
chain from that point. Records are appended inside the transaction of the
change they describe, so a change is durable exactly when its record is.
Truncating the tail leaves a valid chain: an exported :class:`Checkpoint`
(sequence number + head hash) is what detects that, and a signed one
(:mod:`memos.checkpoints`) also detects a chain rewritten and re-hashed.
Records before a signed checkpoint may be archived (:mod:`memos.auditing`):
the store then keeps a :class:`Boundary`, where its chain begins.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import lmdb

from . import clock, codec
from .errors import IntegrityError
from .models import AuditRecord, Boundary, Checkpoint, VerifyReport
from .storage import Store

GENESIS = "0" * 64
_HEAD_KEY = b"audit_head"
_START_KEY = b"audit_start"  # the Boundary, once records were archived
_DETAIL_LIMIT = 100  # ids listed per record; the commit holds the full list


class AuditLog:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.db = store.db["audit"]
        self.meta = store.db["meta"]

    def head(self, txn: lmdb.Transaction) -> Checkpoint:
        raw = txn.get(_HEAD_KEY, db=self.meta)
        if raw is None:
            return Checkpoint(seq=0, head=GENESIS)
        return Checkpoint.model_validate(codec.unpack(raw))

    def append(
        self, txn: lmdb.Transaction, *, actor: str, op: str, outcome: str,
        cube: str | None = None, version: int | None = None, detail: dict[str, Any] | None = None,
    ) -> None:
        raw = txn.get(_HEAD_KEY, db=self.meta)
        head = {"seq": 0, "head": GENESIS} if raw is None else codec.unpack(raw)
        seq, prev = head["seq"], head["head"]
        # Plain data in AuditRecord's JSON form (fields in its order): this runs
        # in every write, and verify() re-derives the same body from the model.
        record: dict[str, Any] = {
            "seq": seq + 1, "time": clock.now(), "actor": actor, "op": op, "outcome": outcome,
            "cube": cube, "version": version, "detail": _bounded(detail or {}), "prev": prev,
        }
        record["hash"] = codec.sha256_hex(codec.pack(record))
        txn.put(codec.u64(seq + 1), codec.pack_unsorted(record), db=self.db)
        txn.put(_HEAD_KEY, codec.pack_unsorted({"seq": seq + 1, "head": record["hash"]}), db=self.meta)

    def tail(self, txn: lmdb.Transaction, n: int = 20, after: int | None = None) -> list[AuditRecord]:
        """The last ``n`` records, or up to ``n`` records following seq ``after``."""
        cur = txn.cursor(db=self.db)
        out: list[AuditRecord] = []
        if after is not None:
            if cur.set_range(codec.u64(after + 1)):
                for _, raw in cur:
                    out.append(AuditRecord.model_validate(codec.unpack(raw)))
                    if len(out) >= n:
                        break
            return out
        ok = cur.last()
        while ok and len(out) < n:
            out.append(AuditRecord.model_validate(codec.unpack(cur.value())))
            ok = cur.prev()
        out.reverse()
        return out

    def boundary(self, txn: lmdb.Transaction) -> Boundary:
        """Where the chain kept in the store begins (record 1 until records are archived)."""
        raw = txn.get(_START_KEY, db=self.meta)
        return Boundary() if raw is None else Boundary.model_validate(codec.unpack(raw))

    def records(self, txn: lmdb.Transaction, first: int, before: int) -> list[bytes]:
        """The stored bytes of records ``first`` to ``before - 1``."""
        out: list[bytes] = []
        cur = txn.cursor(db=self.db)
        if cur.set_range(codec.u64(first)):
            for key, raw in cur:
                if codec.from_u64(key) >= before:
                    break
                out.append(bytes(raw))
        return out

    def cut(self, txn: lmdb.Transaction, before: int, prev: str) -> None:
        """Remove the records before ``before``; the chain kept now begins there, after ``prev``."""
        cur = txn.cursor(db=self.db)
        while cur.first() and codec.from_u64(cur.key()) < before:
            cur.delete()
        txn.put(_START_KEY, codec.pack_unsorted(Boundary(seq=before, prev=prev).model_dump()), db=self.meta)

    def verify(self, txn: lmdb.Transaction, checkpoints: Sequence[tuple[str, Checkpoint]] = (),
               archived: Iterable[tuple[int, Any]] | None = None,
               vouched: Sequence[Boundary] | None = None) -> VerifyReport:
        """Walk the chain; report the first record that does not hold.

        ``checkpoints``: (name, checkpoint) pairs each record they name must match.
        ``archived``: (seq, record) of records moved out by an archive, oldest first:
        the walk then starts at genesis and the store must continue them. Without
        them it starts at the store's boundary, which, when ``vouched`` (the
        boundaries signed checkpoints name) is given, must be one of those.
        """
        start = self.boundary(txn)
        walk = _Walk(Boundary() if archived is not None else start, checkpoints)
        report = walk.bad or self._walk(txn, walk, start, archived, vouched)
        report.boundary, report.checkpoints, report.unchecked = start, walk.checked, walk.unchecked
        return report

    def _walk(self, txn: lmdb.Transaction, walk: _Walk, start: Boundary,
              archived: Iterable[tuple[int, Any]] | None, vouched: Sequence[Boundary] | None) -> VerifyReport:
        if archived is not None:
            for seq, record in archived:
                if not walk.step(seq, record):
                    return walk.bad
            if walk.expected != start.seq or walk.prev != start.prev:
                return _bad(walk.count, walk.expected, f"the archives end at record {walk.expected - 1}, but the "
                            f"store's chain begins after record {start.seq - 1} (hash {start.prev[:12]})")
        elif vouched is not None and start.seq > 1 and start not in vouched:
            return _bad(0, 1, f"records 1 to {start.seq - 1} are gone from the store and no signed checkpoint "
                              f"names a boundary at record {start.seq}: they were removed without `audit archive`")
        for key, raw in txn.cursor(db=self.db):
            if not walk.step(codec.from_u64(key), raw):
                return walk.bad
        return walk.finish(self.head(txn))

    def extends(self, txn: lmdb.Transaction, last: Checkpoint) -> str | None:
        """Why the log no longer continues the chain ``last`` saw; None when it does.

        Only the records after ``last`` are read: those before it are pinned by it.
        """
        walk = _Walk(Boundary(seq=last.seq + 1, prev=last.head), ())
        cur = txn.cursor(db=self.db)
        if cur.set_range(codec.u64(last.seq + 1)):
            for key, raw in cur:
                if not walk.step(codec.from_u64(key), raw):
                    return walk.bad.reason
        head = self.head(txn)
        if head.seq != walk.expected - 1 or head.head != walk.prev:
            return f"the log's head (record {head.seq}) does not continue record {last.seq}"
        return None


class _Walk:
    """The chain followed record by record from a boundary; ``bad`` is the first thing that did not hold."""

    def __init__(self, start: Boundary, checkpoints: Sequence[tuple[str, Checkpoint]]) -> None:
        self.expected, self.prev, self.count = start.seq, start.prev, 0
        self.bad: VerifyReport | None = None
        self.checked = self.unchecked = 0
        self.vouched_to = start.seq - 1  # the last record the start or a checkpoint matched
        self.pending: dict[int, list[tuple[str, Checkpoint]]] = {}
        for name, checkpoint in checkpoints:
            if checkpoint.seq < start.seq - 1:  # archived and not given back: nothing to compare with
                self.unchecked += 1
            elif checkpoint.seq == start.seq - 1:
                self._match(checkpoint.seq, start.prev, name, checkpoint)
            else:
                self.pending.setdefault(checkpoint.seq, []).append((name, checkpoint))

    def step(self, seq: int, raw: Any) -> bool:
        if seq != self.expected:
            return self.fail(self.expected, f"record {self.expected} is missing (next present is {seq})")
        try:
            record = AuditRecord.model_validate(codec.unpack(raw) if isinstance(raw, (bytes, memoryview)) else raw)
        except (IntegrityError, ValueError) as exc:
            return self.fail(seq, f"record {seq} cannot be decoded: {exc}")
        if record.seq != seq:
            return self.fail(seq, f"record {seq} claims sequence {record.seq}")
        if record.prev != self.prev:
            return self.fail(seq, f"record {seq} does not chain to record {seq - 1}")
        if codec.sha256_hex(record.body_bytes()) != record.hash:
            return self.fail(seq, f"record {seq} was altered (hash mismatch)")
        for name, checkpoint in self.pending.pop(seq, ()):
            if not self._match(seq, record.hash, name, checkpoint):
                return False
        self.prev, self.expected, self.count = record.hash, seq + 1, self.count + 1
        return True

    def _match(self, seq: int, hash: str, name: str, checkpoint: Checkpoint) -> bool:
        if checkpoint.head != hash:
            # The chain itself held: someone altered a record and re-hashed everything after it.
            which = f"one of records {self.vouched_to + 1} to {seq}" if self.vouched_to + 1 < seq else f"record {seq}"
            return self.fail(seq, f"record {seq} differs from {name}: {which} was rewritten and the chain re-hashed")
        self.checked += 1
        self.vouched_to = max(self.vouched_to, seq)
        return True

    def finish(self, head: Checkpoint) -> VerifyReport:
        last = self.expected - 1
        if head.seq != last or head.head != self.prev:
            return _bad(self.count, last + 1 if head.seq > last else head.seq + 1,
                        f"log ends at record {last} but its head names record {head.seq}")
        for seq in sorted(self.pending):
            name = self.pending[seq][0][0]
            return _bad(self.count, last + 1, f"log was truncated: {name} names record {seq}, log ends at {last}")
        return VerifyReport(ok=True, records=self.count, head=Checkpoint(seq=last, head=self.prev))

    def fail(self, seq: int, reason: str) -> bool:
        self.bad = _bad(self.count, seq, reason)
        return False


def _bad(count: int, seq: int, reason: str) -> VerifyReport:
    return VerifyReport(ok=False, records=count, first_bad=seq, reason=reason)


def _bounded(detail: dict[str, Any]) -> dict[str, Any]:
    out = dict(detail)
    ids = out.get("memories")
    if isinstance(ids, list) and len(ids) > _DETAIL_LIMIT:
        out["memories"] = ids[:_DETAIL_LIMIT]
        out["memories_total"] = len(ids)
    return out
