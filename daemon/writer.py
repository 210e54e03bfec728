"""The one writer thread: group commit and idempotent retries.

LMDB allows one write transaction at a time, so every write request lands
here. Requests that queue up while a commit is being fsynced are taken
together and made durable by one commit (each in its own child transaction,
so one failure does not sink the others). A reply leaves only after its
commit returns, so nothing is acknowledged before it is durable.

A write's reply is stored under (agent, request id) in the same transaction;
a retry with the same id gets that reply instead of a second application.
Stored replies are also indexed by time and forgotten after the retention
period, a bounded batch at a time between group commits, so pruning reads
only what expired and never holds writers up for long.

Housekeeping runs on this thread too, between commits: pruning, and writing
read counts that no write has carried to disk for a while.

Refused requests are audited through here as well, without a commit each:
:meth:`Core.refused <memos.core.Core.refused>` queues their records
(:mod:`memos.refusals`), the next group commit carries them, and when no
write comes within ``refusal_delay_s`` they are committed alone. A burst of
refusals thus costs a few commits a second at most, and the socket thread
that answers them never waits for a disk.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import lmdb

from memos import codec
from memos.api import Actor, Memos
from memos.errors import Conflict, InternalError, MemosError, from_wire
from memos.models import plain
from memos.protocol import error_reply, ok_reply
from memos.refusals import Refusals
from memos.storage import request_time_key
from memos.writes import Applied, Write

log = logging.getLogger("memosd.writer")

Reply = Callable[[dict[str, Any]], None]
Deliver = Callable[[list[tuple[Reply, dict[str, Any]]]], None]  # a commit's replies, together
Publish = Callable[[str, dict[str, Any]], None]
OnCommit = Callable[[str, int, list[str]], None]  # what a commit changed, before its reply leaves


@dataclass
class Job:
    actor: Actor
    request_id: str
    write: Write
    reply: Reply
    idempotent: bool = True  # False for refusals: nothing to replay

    @property
    def key(self) -> bytes:
        return f"{self.actor.key}\0{self.request_id}".encode()


def wait_for(send: Callable[[Job], None], write: Write) -> Any:
    """Make ``write`` durable through ``send`` (the writer, or a prepare stage before it) and wait:
    its result as plain data, or its error raised. For the daemon's own threads (jobs, policies)."""
    done = threading.Event()
    replies: list[dict[str, Any]] = []

    def reply(message: dict[str, Any]) -> None:
        replies.append(message)
        done.set()

    send(Job(write.actor, "", write, reply, idempotent=False))
    done.wait()
    message = replies[0]
    if message.get("ok"):
        return message.get("result")
    error = message.get("error") or {}
    raise from_wire(str(error.get("code", "internal")), str(error.get("message", "")), error.get("details"))


_STOP = object()
_REFUSALS_SOON = object()  # refusal records wait: commit them within refusal_delay_s
_REFUSALS_NOW = object()  # a reader of the audit log waits for them: commit them at once
_HOUSEKEEPING_EVERY_S = 60.0  # at most this much of read counts is lost if the daemon is killed
_PRUNE_BATCH = 250  # stored replies forgotten per transaction: ~10 ms between group commits


def _withheld(job: Job, op: str) -> dict[str, Any]:
    """What a retry of a request whose reply held a secret gets: the secret is never stored."""
    return error_reply(job.request_id, Conflict(
        f"this {op} was applied, and its reply held a token that is shown only once and not kept; "
        "rotate the agent's token (memosctl agent rotate NAME) to get a new one", op=op, withheld=True))


def _one_by_one(replies: list[tuple[Reply, dict[str, Any]]]) -> None:
    for reply, message in replies:
        reply(message)


class Writer(threading.Thread):
    def __init__(self, memos: Memos, *, max_group: int, retention_s: float, publish: Publish,
                 on_commit: OnCommit | None = None, deliver: Deliver | None = None,
                 commit_delay_s: float = 0.0005, refusal_delay_s: float = 0.05) -> None:
        super().__init__(name="memosd-writer", daemon=True)
        self.memos = memos
        self.max_group = max_group
        self.commit_delay_s = commit_delay_s
        self.on_commit = on_commit or (lambda cube, version, memory_ids: None)
        self.deliver = deliver or _one_by_one
        self.retention_s = retention_s
        self.publish = publish
        self.queue: queue.Queue[Any] = queue.Queue()
        self.db = memos.store.db["requests"]
        self.times = memos.store.db["request_times"]
        self.commits = 0
        self.writes = 0
        self.refusal_delay_s = refusal_delay_s
        self._refusals_due = math.inf  # when queued refusal records are committed if no write carries them first
        # From now on refusals are audited through this thread's commits.
        memos.core.refusals = Refusals(memos.limits.refusal_records_per_s, wake=self._wake)

    def _wake(self, urgent: bool) -> None:
        self.queue.put(_REFUSALS_NOW if urgent else _REFUSALS_SOON)

    def submit(self, job: Job) -> None:
        self.queue.put(job)

    def stop(self) -> None:
        """Finish everything queued so far, then end."""
        self.queue.put(_STOP)
        self.join()

    def run(self) -> None:
        expected = 1  # size of the last group: how many writers are active
        next_chores = 0.0  # at once: replies may have expired while the daemon was down
        backlog = False  # expired replies left over from the last pass
        while True:
            if time.monotonic() >= self._refusals_due:
                self._refusals_due = math.inf
                self._commit_refusals()
            if time.monotonic() >= next_chores:
                try:
                    backlog = self._housekeeping(backlog)
                except Exception:  # a bug here must not kill the writer: writes come first
                    log.exception("housekeeping failed")
                    backlog = False
                next_chores = time.monotonic() + (0.0 if backlog else _HOUSEKEEPING_EVERY_S)
            try:
                first = self.queue.get(timeout=max(min(next_chores, self._refusals_due) - time.monotonic(), 0.001))
            except queue.Empty:
                continue
            if self._refusals_wait(first):
                continue
            batch, stopping = self._gather(first, expected)
            if batch:
                self._commit(batch)  # it carries the refusals queued so far
                expected = len(batch)
            if stopping:
                self._commit_refusals()
                return

    def _gather(self, first: Any, expected: int) -> tuple[list[Job], bool]:
        """Take what is queued; while busy, wait briefly for the usual group to arrive.

        With several writers active, their next requests arrive within a
        fraction of a commit: waiting up to ``commit_delay_s`` for them turns
        many small commits into one (PostgreSQL's commit_delay, made
        adaptive). A lone writer never waits.
        """
        if first is _STOP:
            return [], True
        batch = [first]
        deadline = time.monotonic() + self.commit_delay_s
        while len(batch) < self.max_group:
            try:
                if len(batch) < expected and (left := deadline - time.monotonic()) > 0:
                    item = self.queue.get(timeout=left)
                else:
                    item = self.queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            if not self._refusals_wait(item):
                batch.append(item)
        return batch, False

    def _refusals_wait(self, item: Any) -> bool:
        """True if ``item`` says refusal records wait: they are then due within the delay (at once if
        urgent). A group commit before then carries them; the check when due then finds nothing left."""
        if item is not _REFUSALS_SOON and item is not _REFUSALS_NOW:
            return False
        delay = 0.0 if item is _REFUSALS_NOW else self.refusal_delay_s
        self._refusals_due = min(self._refusals_due, time.monotonic() + delay)
        return True

    def _commit_refusals(self) -> None:
        """Commit the queued refusal records alone (no write came to carry them)."""
        refusals = self.memos.core.refusals
        if refusals is None or not refusals.pending():
            return
        try:
            self.memos.core.apply([])
        except Exception:  # the records are lost, not the writer: writes come first
            log.exception("auditing refusals failed")
        self.commits += 1

    def _commit(self, batch: list[Job]) -> None:
        fresh: list[Job] = []
        waiting: dict[bytes, list[Job]] = {}
        with self.memos.store.read() as txn:
            for job in batch:
                stored = txn.get(job.key, db=self.db) if job.idempotent else None
                if not job.idempotent:
                    fresh.append(job)
                elif stored is not None:
                    job.reply(codec.unpack(stored)["reply"])
                elif job.key in waiting:
                    waiting[job.key].append(job)  # same id twice in one batch: apply once
                else:
                    waiting[job.key] = []
                    fresh.append(job)
        if not fresh:
            return
        try:
            results = self.memos.core.apply([self._recording(job) for job in fresh])
        except MemosError as exc:
            results = [exc] * len(fresh)
        except Exception as exc:  # a bug must not kill the writer: fail the batch loudly
            log.exception("group commit failed")
            results = [InternalError(f"write failed: {type(exc).__name__}")] * len(fresh)
        self.commits += 1
        self.writes += len(fresh)
        out: list[tuple[Reply, dict[str, Any]]] = []
        for job, result in zip(fresh, results):
            if isinstance(result, MemosError):
                reply = error_reply(job.request_id or None, result)
            else:
                reply = result.result
                self._announce(job, result)
            for j in [job, *waiting.get(job.key, [])] if job.idempotent else [job]:
                out.append((j.reply, reply))
        self.deliver(out)

    def _recording(self, job: Job) -> Write:
        """The job's write, also storing its reply for retries in the same transaction."""
        inner = job.write

        def fn(txn: lmdb.Transaction) -> Applied:
            applied = inner.fn(txn)
            # What the writer hands back in each slot: the reply, ready to send.
            applied.result = reply = ok_reply(job.request_id, plain(applied.result))
            if job.idempotent:
                now = time.time()
                kept = _withheld(job, inner.op) if applied.secret else reply
                txn.put(job.key, codec.pack_unsorted({"time": now, "reply": kept}), db=self.db)
                txn.put(request_time_key(now, job.key), b"", db=self.times)
            return applied

        return Write(inner.actor, inner.op, inner.cube, fn, inner.request_id)

    def _announce(self, job: Job, applied: Applied) -> None:
        """Tell derived state, then subscribers, about a durable change to a cube."""
        cube = job.write.cube
        if not isinstance(cube, str) or applied.version is None:
            return
        try:
            self.on_commit(cube, applied.version, applied.memories)
        except Exception:  # the write is durable; a stale index must not fail its reply
            log.exception("updating derived state after a commit failed", extra={"cube": cube})
        # An Event (memos.models) as plain data: building the model for every write costs the
        # writer thread, which sets the pace of group commit; clients validate it as an Event.
        self.publish(cube, {"op": job.write.op, "cube": cube, "actor": job.actor.name, "time": time.time(),
                            "version": applied.version, "memories": applied.memories})

    def _housekeeping(self, backlog: bool) -> bool:
        """Prune a batch of stored replies; True if more are due.

        A regular pass also writes pending read counts; the batches that work
        off a backlog do not, so they cost one commit each, not two.
        """
        if not backlog:
            try:
                self.memos.flush_usage()
            except MemosError:
                log.exception("writing read counts failed")
        return self._prune_some()

    def _prune_some(self) -> bool:
        """Forget up to a batch of stored replies older than the retention period; True if more are due."""
        cutoff = request_time_key(time.time() - self.retention_s, b"")

        def prune(txn: lmdb.Transaction) -> tuple[int, bool]:
            cur = txn.cursor(db=self.times)
            removed = 0
            cur.first()
            while (key := cur.key()) and key[:8] < cutoff:
                if removed == _PRUNE_BATCH:
                    return removed, True
                txn.delete(key[8:], db=self.db)
                cur.delete()  # and move to the next, oldest first
                removed += 1
            return removed, False

        try:
            removed, more = self.memos.store.write(prune)
        except MemosError:
            log.exception("pruning stored replies failed")
            return False
        if removed:
            log.debug("pruned %d stored replies", removed)
        return more
