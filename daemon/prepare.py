"""The prepare stage: writes that memory types must see before they are committed.

A memory type names the write operations it prepares (a type that searches
by meaning embeds the texts of ``add``, ``add_many`` and ``update``). Such
writes pass through one thread per type, which hands its type everything
queued at once, so one batched model call serves many requests, then on to
the next type that prepares the operation, and finally to the writer. The rows a type adds are
written in the write's own transaction.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence
from typing import Any

import lmdb

from memos.errors import InternalError, MemosError
from memos.memtypes import MemoryType, Pending, Rows
from memos.writes import Applied

from .writer import Job

log = logging.getLogger("memosd.prepare")

_BATCH = 256  # writes handed to a type at once


class _Item:
    __slots__ = ("pending", "job", "stages")

    def __init__(self, pending: Pending, job: Job, stages: list[Stage]) -> None:
        self.pending = pending
        self.job = job
        self.stages = stages  # the stages still to pass, this one first


class Stage(threading.Thread):
    """One memory type's prepare thread."""

    def __init__(self, memtype: MemoryType, rows: Callable[[lmdb.Transaction], Rows],
                 commit: Callable[[Job], None], fail: Callable[[Job, MemosError], None]) -> None:
        super().__init__(name=f"memosd-prepare-{memtype.name}", daemon=True)
        self.memtype = memtype
        self.rows = rows
        self.commit = commit
        self.fail = fail
        self.queue: queue.Queue[_Item | None] = queue.Queue()

    def run(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < _BATCH:
                try:
                    item = self.queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self.queue.put(None)  # finish this batch, then stop
                    break
                batch.append(item)
            self._prepare(batch)

    def _prepare(self, batch: list[_Item]) -> None:
        start = [len(item.pending.rows) for item in batch]
        try:
            self.memtype.prepare([item.pending for item in batch])
        except MemosError as exc:  # the store unreachable, say: each write gets that error, typed
            log.warning("prepare failed: %s", exc, extra={"type": self.memtype.name})
            for item in batch:
                item.pending.fail(exc)
        except Exception as exc:  # a bug: fail the batch, keep the stage alive
            log.exception("prepare failed", extra={"type": self.memtype.name})
            for item in batch:
                item.pending.fail(InternalError(f"{self.memtype.name} prepare failed: {type(exc).__name__}"))
        for item, first_row in zip(batch, start):
            if item.pending.error is not None:
                self.fail(item.job, item.pending.error)
                continue
            fns = item.pending.rows[first_row:]
            if fns:
                item.job.write = item.job.write.then(self._rows_writer(fns))
            rest = item.stages[1:]
            if rest:
                rest[0].queue.put(_Item(item.pending, item.job, rest))
            else:
                self.commit(item.job)

    def _rows_writer(self, fns: Sequence[Callable[[Rows], None]]) -> Callable[[lmdb.Transaction, Applied], None]:
        def write(txn: lmdb.Transaction, applied: Applied) -> None:
            rows = self.rows(txn)
            for fn in fns:
                fn(rows)

        return write

    def stop(self) -> None:
        """Hand on everything queued so far, then end."""
        self.queue.put(None)
        self.join()


class PrepareStages:
    """Routes each write to the stages of the types that prepare its operation."""

    def __init__(self, stages: Sequence[Stage]) -> None:
        self.stages = list(stages)
        self.by_op: dict[str, list[Stage]] = {}
        for stage in self.stages:
            for op in stage.memtype.prepares:
                self.by_op.setdefault(op, []).append(stage)

    def start(self) -> None:
        for stage in self.stages:
            stage.start()

    def wants(self, op: str) -> bool:
        return op in self.by_op

    def submit(self, op: str, args: Any, job: Job) -> None:
        stages = self.by_op[op]
        stages[0].queue.put(_Item(Pending(op, args, getattr(args, "cube", None)), job, stages))

    def stop(self) -> None:
        """Drain in pipeline order, so that a write passing several stages finishes them all."""
        for stage in self.stages:
            stage.stop()
