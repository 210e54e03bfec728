"""Refused requests waiting for their audit records: written by a later group commit, summarised in bursts.

A refused request (denied, malformed, not found...) is audited like a
change. A refusal changes nothing, so its record need not be durable before
the reply leaves: in the daemon, :meth:`Core.refused <memos.core.Core.refused>`
queues it here and the writer appends what is queued to its next group commit
(within ``refusal_delay_s`` when no write comes sooner). A burst of failed
reads then costs a few commits, not one fsync each on the thread that
answers requests. Readers of the audit log first :meth:`Refusals.settle`, so
they see every refusal answered before they asked.

**Bursts are summarised.** Each agent's first ``per_agent`` refusals in a
second are recorded one by one. Past that, and whenever ``MAX_PENDING``
records are already waiting, refusals are counted instead: one record per
(agent, op, code) for each commit that carries them, with ``detail.count``
(how many), ``detail.first`` and ``detail.last`` (when, Unix seconds) and the
first one's message and cube. Memory stays bounded: at most ``MAX_PENDING``
records and ``MAX_SUMMARIES`` counters wait; past those, counts fold into one
record whose agent, op and code are ``*``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import lmdb

from .errors import Denied, MemosError

MAX_PENDING = 10_000  # records waiting for a commit
MAX_SUMMARIES = 1_000  # (agent, op, code) counters waiting for a commit
_ANY = ("*", "*", "*")  # where counts go once MAX_SUMMARIES are waiting


def failure_record(actor: str, op: str, cube: Any, exc: MemosError, request_id: Any = None) -> dict[str, Any]:
    """The audit record of a refusal, as keyword arguments of :meth:`AuditLog.append`.

    It must always encode: if it raised, the whole group commit (other callers' writes
    included) would be lost.
    """
    detail: dict[str, Any] = {"code": exc.code, "message": encodable(exc.message[:500])}
    if request_id is not None:
        detail["request_id"] = encodable(request_id)
    return {"actor": actor, "op": op, "outcome": "denied" if isinstance(exc, Denied) else "error",
            "cube": encodable(cube[:200]) if isinstance(cube, str) else None, "detail": detail}


def encodable(value: Any) -> Any:
    """A string that UTF-8 can encode (lone surrogates escaped), for audit records."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


@dataclass
class _Summary:
    record: dict[str, Any]  # the first refusal's record: its outcome, cube and message
    first: float
    last: float
    count: int = 0
    cubes: set[Any] = field(default_factory=set)


@dataclass
class Taken:
    """Records taken for one commit, and how many refusals they account for."""

    records: list[dict[str, Any]]
    upto: int  # refusals added before the take

    def write(self, txn: lmdb.Transaction, append: Callable[..., None]) -> None:
        for record in self.records:
            append(txn, **record)


class Refusals:
    """Refusal records waiting for the writer; see the module's docstring for the rule."""

    def __init__(self, per_agent: int, wake: Callable[[bool], None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``wake(urgent)``: asks the writer for a commit, soon (or at once, for a reader waiting
        in :meth:`settle`); called when the first record starts waiting."""
        self.per_agent = per_agent
        self.wake = wake or (lambda urgent: None)
        self.clock = clock
        self._cond = threading.Condition()
        self._records: list[dict[str, Any]] = []
        self._summaries: dict[tuple[str, str, str], _Summary] = {}
        self._window = clock()  # start of the second whose refusals ``_counts`` holds
        self._counts: dict[str, int] = {}
        self._added = 0
        self._written = 0
        self.summarised = 0  # refusals counted rather than recorded, since start

    def add(self, actor: str, op: str, cube: Any, exc: MemosError, request_id: Any = None) -> None:
        record = failure_record(actor, op, cube, exc, request_id)
        with self._cond:
            was_empty = not self._records and not self._summaries
            now = self.clock()
            if now - self._window >= 1.0:
                self._window, self._counts = now, {}
            seen = self._counts[actor] = self._counts.get(actor, 0) + 1
            if seen <= self.per_agent and len(self._records) < MAX_PENDING:
                self._records.append(record)
            else:
                self._summarise(record, exc.code)
            self._added += 1
        if was_empty:
            self.wake(False)

    def _summarise(self, record: dict[str, Any], code: str) -> None:
        key = (record["actor"], record["op"], code)
        if key not in self._summaries and len(self._summaries) >= MAX_SUMMARIES:
            key = _ANY
        wall = time.time()
        summary = self._summaries.get(key)
        if summary is None:
            summary = self._summaries[key] = _Summary(record, wall, wall)
        summary.count += 1
        summary.last = wall
        if len(summary.cubes) < 2:  # only whether they were all on one cube matters
            summary.cubes.add(record["cube"])
        self.summarised += 1

    def pending(self) -> bool:
        with self._cond:
            return bool(self._records or self._summaries)

    def take(self) -> Taken:
        """Everything waiting, as records to append in one transaction; call :meth:`written` after it."""
        with self._cond:
            records, summaries = self._records, self._summaries
            self._records, self._summaries = [], {}
            upto = self._added
        for key, s in summaries.items():
            detail = {**s.record["detail"], "count": s.count, "first": s.first, "last": s.last,
                      "summary": True}
            detail.pop("request_id", None)  # one of many: it names none of the others
            records.append({**s.record, "cube": s.record["cube"] if len(s.cubes) == 1 else None,
                            "detail": detail} if key != _ANY else
                           {"actor": "*", "op": "*", "outcome": "error", "cube": None,
                            "detail": {"code": "*", "message": "refusals past the counters' limit",
                                       "count": s.count, "first": s.first, "last": s.last, "summary": True}})
        return Taken(records, upto)

    def written(self, taken: Taken) -> None:
        """The commit carrying ``taken`` ended (or failed: its records are lost, nobody waits for them)."""
        with self._cond:
            self._written = max(self._written, taken.upto)
            self._cond.notify_all()

    def settle(self, timeout: float = 5.0) -> bool:
        """Wait until every refusal added before this call is written; False if that took too long."""
        with self._cond:
            target = self._added
            if self._written >= target:
                return True
        self.wake(True)
        with self._cond:
            return self._cond.wait_for(lambda: self._written >= target, timeout)
