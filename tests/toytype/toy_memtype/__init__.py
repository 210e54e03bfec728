"""``tally``: a toy memory type, registered the way any third party's type is.

It exists to exercise every part of the memory-type contract
(:mod:`memos.memtypes`) from outside memos: it is registered by the entry
point in ``toy_memtype-0.1.dist-info`` next to this package, found when
``tests/toytype`` is on the path, and served by memosd like a built-in type.

A tally memory is a count: ``metadata={"count": <int>}``, optionally with a
text label.

* :meth:`Tally.validate` refuses an item without an integer count, or with a blob.
* :meth:`Tally.prepare` sees ``add``, ``add_many`` and ``update`` before they
  are committed: it refuses a negative count (``Pending.fail``) and records
  the counts a write carries in the type's own sub-database ``weights``, in
  the write's own transaction (``Pending.also``).
* :meth:`Tally.after_commit` keeps each cube's total of active counts in
  memory (derived state), read back by ``tally_total`` with read-your-writes.
* ``tally_recount`` recounts a cube as a job, one memory a step, with
  progress, and stops when cancelled.
* Settings: the section ``[tally]`` (``MEMOS_TALLY__STEP_DELAY_S``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, Field
from typing_extensions import TypedDict

from memos.errors import Cancelled, InvalidRequest, MemosError
from memos.ids import new_id
from memos.jobs import JobInfo, Progress
from memos.memtypes import Item, MemoryType, Pending, Services
from memos.operations import Args, Operation
from memos.validation import Limits

log = logging.getLogger("memos.tally")

NAME = "tally"


class TallySettings(BaseModel):
    """The ``[tally]`` section of memosd.toml."""

    step_delay_s: float = Field(0.0, ge=0, le=10, description="Pause between two steps of a recount.")


class TallyArgs(Args):
    cube: str = Field(max_length=200)


class RecountArgs(TallyArgs):
    record: bool = False  # also add a tally memory (count 0) that records the result, as the caller


class NoteArgs(TallyArgs):
    note: str = Field(max_length=200)


class Note(TypedDict):
    cube: str
    note: str


class TallyTotal(TypedDict):
    cube: str
    total: int  # sum of the counts of the cube's active tally memories
    memories: int  # how many active tally memories
    version: int  # the cube version the total is up to


class Weight(TypedDict):
    op: str  # the write that carried the counts
    counts: list[int]


def count_of(metadata: Any) -> int | None:
    """The count in a memory's metadata, or None if there is no integer count."""
    count = metadata.get("count") if isinstance(metadata, dict) else None
    return None if isinstance(count, bool) or not isinstance(count, int) else count


@dataclass
class _Totals:
    """One cube's derived state: the count of each active tally memory, up to a version."""

    version: int
    counts: dict[str, int] = field(default_factory=dict)

    def apply(self, memories: dict[str, dict[str, Any]]) -> None:
        for memory_id, mem in memories.items():
            count = count_of(mem.get("metadata"))
            if mem.get("type") == NAME and mem.get("status") == "active" and count is not None:
                self.counts[memory_id] = count
            else:
                self.counts.pop(memory_id, None)


class Tally(MemoryType):
    name = NAME
    databases = {"weights": "cube \\0 id -> the counts one write carried (JSON), written by prepare()",
                 "notes": "cube -> a note about its tallies (tally_note, an own-rows write)"}
    prepares = frozenset({"add", "add_many", "update"})
    settings_model = TallySettings
    operations = (
        Operation("tally_total", TallyArgs, TallyTotal, "worker",
                  "The sum of the counts of a cube's active tally memories.", "total", ("cube",)),
        Operation("tally_weights", TallyArgs, list[Weight], "worker",
                  "The counts each committed write carried, oldest first.", "weights", ("cube",)),
        Operation("tally_recount", RecountArgs, JobInfo, "job",
                  "Recount a cube's tallies in the background (write role); progress in `jobs`.",
                  "recount", ("cube",)),
        Operation("tally_stream", TallyArgs, TallyTotal, "worker",
                  "Each active tally's count as a partial reply, then the total.", "stream", ("cube",), streams=True),
        Operation("tally_note", NoteArgs, Note, "writer", "Keep a note about a cube's tallies (write role).",
                  "write_note", ("cube", "note")),
        Operation("tally_notes", TallyArgs, list[Note], "worker", "The note kept about a cube, if any.",
                  "notes", ("cube",)),
        Operation("tally_listed", TallyArgs, int, "worker",
                  "How many tally memories the core's `list` shows (a call through the services).",
                  "listed", ("cube",)),
    )

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals: dict[str, _Totals] = {}  # built on first use, then kept by after_commit
        self._jobs: list[Progress] = []
        self._stopping = threading.Event()
        self.lifecycle: list[str] = []  # what the daemon called, in order

    # -- the contract ---------------------------------------------------

    def validate(self, item: Item, limits: Limits) -> None:
        if count_of(item.metadata) is None:
            raise InvalidRequest("a tally memory needs metadata {'count': <integer>}", field="metadata")
        if item.has_blob:
            raise InvalidRequest("a tally memory holds no blob", field="blob")

    def start(self, services: Services) -> None:
        super().start(services)
        assert isinstance(services.settings, TallySettings), services.settings
        self.lifecycle.append("start")
        log.info("tally started", extra={"step_delay_s": services.settings.step_delay_s})

    def prepare(self, pending: Sequence[Pending]) -> None:
        for p in pending:
            try:
                counts = self._counts(p)
            except MemosError:
                continue  # no such cube or memory: the writer answers that, audited
            if not counts:
                continue
            if any(c < 0 for c in counts):
                p.fail(InvalidRequest("a tally cannot count below zero", field="metadata"))
                continue
            key = f"{p.cube}\0{new_id()}".encode()
            value = json.dumps({"op": p.op, "counts": counts}).encode()
            p.also(lambda rows, key=key, value=value: rows.put("weights", key, value))

    def after_commit(self, cube: str, version: int, memory_ids: Sequence[str]) -> None:
        with self._lock:
            totals = self._totals.get(cube)
            if totals is None or version <= totals.version:
                return  # not built yet (its first read will include this), or already included
            with self.services.system_snapshot(cube, at=version) as snap:
                totals.apply(snap.get_many(memory_ids))
            totals.version = version

    def stop(self) -> None:
        self.lifecycle.append("stop")
        self._stopping.set()
        for job in self._jobs:
            if job.state == "running":
                self.services.jobs.cancel(job.id)
        log.info("tally stopped")

    def close(self) -> None:
        self.lifecycle.append("close")
        with self._lock:
            self._totals.clear()
        log.info("tally closed")

    # -- operations -------------------------------------------------------

    def total(self, actor: Any, cube: str) -> TallyTotal:
        self.services.check_role(actor, cube, "read", "tally_total")
        with self._lock:
            totals = self._built(cube)
            return {"cube": cube, "total": sum(totals.counts.values()), "memories": len(totals.counts),
                    "version": totals.version}

    def weights(self, actor: Any, cube: str) -> list[Weight]:
        with self.services.snapshot(actor, cube, op="tally_weights") as snap:
            prefix = f"{snap.cube.name}\0".encode()
            out = []
            for key, value in snap.rows.items("weights", prefix):
                if not key.startswith(prefix):
                    break
                out.append(json.loads(value))
            return out

    def stream(self, actor: Any, cube: str, emit: Any) -> TallyTotal:
        with self.services.snapshot(actor, cube, op="tally_stream") as snap:
            counts = [count_of(m.metadata) for m in snap.memories(type=NAME) if m.status.value == "active"]
            version = snap.version
        for count in counts:
            emit(count)
        return {"cube": cube, "total": sum(c or 0 for c in counts), "memories": len(counts), "version": version}

    def write_note(self, actor: Any, cube: str, note: str, request_id: str | None = None) -> Any:
        def fn(rows: Any) -> Note:
            rows.put("notes", cube.encode(), note.encode())
            return {"cube": cube, "note": note}

        return self.services.own_write(actor, "tally_note", cube, fn, request_id)

    def listed(self, actor: Any, cube: str) -> int:
        return sum(1 for m in self.services.call("list", actor, cube=cube) if m["type"] == NAME)

    def notes(self, actor: Any, cube: str) -> list[Note]:
        with self.services.snapshot(actor, cube, op="tally_notes") as snap:
            raw = snap.rows.get("notes", cube.encode())
        return [] if raw is None else [{"cube": cube, "note": raw.decode()}]

    def recount(self, actor: Any, cube: str, record: bool = False) -> JobInfo:
        with self.services.snapshot(actor, cube, op="tally_recount", role="write") as snap:
            name, version = snap.cube.name, snap.version
            ids = [m.id for m in snap.memories(type=NAME)]
        delay = self.services.settings.step_delay_s  # type: ignore[union-attr]

        def work(progress: Progress) -> int:
            total = 0
            for memory_id in ids:
                progress.check()
                if self._stopping.is_set():
                    raise Cancelled("the daemon is stopping", job=progress.id)
                time.sleep(delay)
                with self.services.system_snapshot(name, at=version) as s:
                    mem = s.get_many([memory_id]).get(memory_id)
                if mem is not None and mem["status"] == "active":
                    total += count_of(mem["metadata"]) or 0
                progress.advance(1, total=total, version=version)
            progress.advance(0, total=total, version=version)
            if record:  # a job's result becomes a memory, written like a client's add
                made = self.services.add(actor, name, f"recounted {total}", type=NAME,
                                         metadata={"count": 0, "recounted": total}, tags=["recount"])
                progress.advance(0, memory=made.id)
            return total

        job, _ = self.services.jobs.run(self.services.executor, "tally_recount", name, len(ids), work)
        self._jobs = [j for j in self._jobs if j.state == "running"] + [job]
        return job.to_wire()  # type: ignore[return-value]

    # -- helpers ----------------------------------------------------------

    def _built(self, cube: str) -> _Totals:
        """A cube's derived state, built from a snapshot the first time (holding the lock)."""
        totals = self._totals.get(cube)
        if totals is None:
            with self.services.system_snapshot(cube) as snap:
                totals = _Totals(snap.version)
                totals.apply({m.id: m.model_dump(mode="json") for m in snap.memories(type=NAME)})
            self._totals[cube] = totals
        return totals

    def _counts(self, p: Pending) -> list[int]:
        """The counts of the tally items a pending write carries."""
        args = p.args
        if p.op == "add":
            items: list[Any] = [args] if args.type == NAME else []
        elif p.op == "add_many":
            items = [it for it in args.items if not isinstance(it, str) and it.type == NAME]
        elif p.op == "update":
            if args.metadata is None:
                return []
            with self.services.system_snapshot(p.cube) as snap:
                found = snap.get_many([args.id]).get(args.id)
            items = [args] if found is not None and found["type"] == NAME else []
        else:
            return []
        counts = [count_of(it.metadata) for it in items]
        return [c for c in counts if c is not None]  # items without a count: validate() refuses them
