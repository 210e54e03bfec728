"""Commits made by the other daemons that share this one's PostgreSQL store.

Each daemon keeps derived state of its own: the memory types' indexes and
loaded models, the cached token checks, its watchers. Its own commits reach
them through the writer (``after_commit``, then an event); the others' come
here. The store notifies every commit that appended audit records (memos.pgstore),
in commit order; the follower reads the audit records it has not seen, skips the
ones this process wrote, and for each commit of another daemon calls
``after_commit`` with the memories the commit touched and publishes its event.

Staleness: another daemon's commit reaches this one's derived state as soon as
PostgreSQL delivers its notice (milliseconds). Without notices (a lost listening
connection) the follower still reads the log every ``poll_s``, so the bound is
``poll_s`` plus the time to apply the commits. A query of a cube's index here waits
for the index to reach the version of the cube it read, so it never answers from an
index older than the store it read, whichever daemon wrote.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from memos import codec
from memos.api import Memos
from memos.errors import MemosError
from memos.models import Commit

log = logging.getLogger(__name__)

OnCommit = Callable[[str, int, Sequence[str]], None]
Publish = Callable[[str, dict[str, Any]], None]
_BATCH = 512  # audit records read per snapshot


class Follower:
    def __init__(self, memos: Memos, on_commit: OnCommit, publish: Publish, forget_tokens: Callable[[], None],
                 poll_s: float = 1.0) -> None:
        self.store = memos.store
        self.memos = memos
        self.on_commit, self.publish, self.forget_tokens = on_commit, publish, forget_tokens
        self.poll_s = poll_s
        self.store.own_seqs = set()
        with self.store.read() as txn:  # derived state starts from the store as it is now
            self.seen = memos.core.audit.head(txn).seq
        self.applied = 0  # others' commits applied: for tests and logs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self.store.follow, args=(self._notified, self._stop, poll_s),
                                        name="memosd-follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _notified(self, node: str | None, first: int, last: int) -> None:
        try:
            upto = last if node is not None else self._head()
            self._catch_up(upto)
        except Exception:  # the next notice or poll tries again from the same place
            log.exception("following other daemons' commits failed", extra={"seen": self.seen})

    def _head(self) -> int:
        with self.store.read() as txn:
            return self.memos.core.audit.head(txn).seq

    def _catch_up(self, upto: int) -> None:
        own = self.store.own_seqs
        while self.seen < upto:
            lo, hi = self.seen + 1, min(upto, self.seen + _BATCH)
            theirs = [seq for seq in range(lo, hi + 1) if seq not in own]
            if theirs:
                self._apply(theirs[0], theirs[-1], set(theirs))
            own.difference_update(range(lo, hi + 1))
            self.seen = hi

    def _apply(self, lo: int, hi: int, theirs: set[int]) -> None:
        audit, ledger = self.memos.core.audit, self.memos.ledger
        commits: list[tuple[dict[str, Any], list[str]]] = []
        agents_changed = False
        with self.store.read() as txn:
            cur = txn.cursor(db=audit.db)
            if not cur.set_range(codec.u64(lo)):
                return
            for key, raw in cur:
                seq = codec.from_u64(key)
                if seq > hi:
                    break
                if seq not in theirs:
                    continue
                record = codec.unpack(raw)
                agents_changed |= record["op"].startswith("agent")
                if record["outcome"] != "ok" or record["cube"] is None or record["version"] is None:
                    continue
                try:
                    commit: Commit = ledger.commit(txn, record["cube"], record["version"])
                except MemosError:  # compacted away since: nothing left to index for it
                    continue
                commits.append((record, [change.memory_id for change in commit.changes]))
        if agents_changed:  # a token rotated or an agent removed elsewhere: check tokens afresh
            self.forget_tokens()
        for record, memory_ids in commits:
            cube, version = record["cube"], record["version"]
            self.on_commit(cube, version, memory_ids)
            self.publish(cube, {"op": record["op"], "cube": cube, "actor": record["actor"], "time": record["time"],
                                "version": version, "memories": memory_ids})
            self.applied += 1
