"""The append-only, hash-chained audit log.

Record ``n`` stores the hash of record ``n-1``; its own hash covers every field
including that link, so changing, removing or reordering any record breaks the
chain from that point. Records are appended inside the transaction of the
change they describe, so a change is durable exactly when its record is.
Truncating the tail leaves a valid chain: an exported :class:`Checkpoint`
(sequence number + head hash) is what detects that.
"""

from __future__ import annotations

from typing import Any

import lmdb

from . import clock, codec
from .errors import IntegrityError
from .models import AuditRecord, Checkpoint, VerifyReport
from .storage import Store

GENESIS = "0" * 64
_HEAD_KEY = b"audit_head"
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

    def verify(self, txn: lmdb.Transaction, checkpoint: Checkpoint | None = None) -> VerifyReport:
        """Walk the whole chain; report the first record that does not hold."""
        expected, prev, count = 1, GENESIS, 0
        hashes_at_checkpoint: str | None = None
        for key, raw in txn.cursor(db=self.db):
            seq = codec.from_u64(key)
            if seq != expected:
                return _bad(count, expected, f"record {expected} is missing (next present is {seq})")
            try:
                record = AuditRecord.model_validate(codec.unpack(raw))
            except (IntegrityError, ValueError) as exc:
                return _bad(count, seq, f"record {seq} cannot be decoded: {exc}")
            if record.seq != seq:
                return _bad(count, seq, f"record {seq} claims sequence {record.seq}")
            if record.prev != prev:
                return _bad(count, seq, f"record {seq} does not chain to record {seq - 1}")
            if codec.sha256_hex(record.body_bytes()) != record.hash:
                return _bad(count, seq, f"record {seq} was altered (hash mismatch)")
            if checkpoint is not None and seq == checkpoint.seq:
                hashes_at_checkpoint = record.hash
            prev, expected, count = record.hash, seq + 1, count + 1
        last = expected - 1
        head = self.head(txn)
        if head.seq != last or head.head != prev:
            return _bad(count, last + 1 if head.seq > last else head.seq + 1,
                        f"log ends at record {last} but its head names record {head.seq}")
        if checkpoint is not None:
            if checkpoint.seq > last:
                return _bad(count, last + 1,
                            f"log was truncated: checkpoint names record {checkpoint.seq}, log ends at {last}")
            if checkpoint.seq > 0 and hashes_at_checkpoint != checkpoint.head:
                return _bad(count, checkpoint.seq, f"record {checkpoint.seq} differs from the checkpoint")
        return VerifyReport(ok=True, records=count, head=Checkpoint(seq=last, head=prev))


def _bad(count: int, seq: int, reason: str) -> VerifyReport:
    return VerifyReport(ok=False, records=count, first_bad=seq, reason=reason)


def _bounded(detail: dict[str, Any]) -> dict[str, Any]:
    out = dict(detail)
    ids = out.get("memories")
    if isinstance(ids, list) and len(ids) > _DETAIL_LIMIT:
        out["memories"] = ids[:_DETAIL_LIMIT]
        out["memories_total"] = len(ids)
    return out
