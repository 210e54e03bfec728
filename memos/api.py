"""The in-process API: one store, its memory types, and every operation of the core.

:class:`Memos` is what the daemon serves and what embedded users call. It
owns the :class:`~memos.core.Core` (store, ledger, audit log, write path) and
one collaborator per concern, each declaring its operations:

* :class:`~memos.cubes.Cubes` — cubes and their access lists;
* :class:`~memos.memories.Memories` — add, update, delete, reads;
* :class:`~memos.versions.Versions` — history, diff, rollback;
* :class:`~memos.auditing.AuditAdmin` — verify, tail, checkpoint, sign, archive;
* :class:`~memos.agents.Agents` — agents and their tokens;
* :class:`~memos.session.Session` and :class:`~memos.session.JobControl` — ping, whoami, jobs.

Writes are written once, as ``write_X`` returning a :class:`~memos.core.Write`
(the daemon's writer groups many into one commit); the blocking ``X`` that
applies one at once is derived from it. ``memos.X`` finds ``X`` on whichever
collaborator declares it.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .access import LOCAL_ADMIN, Actor
from .agents import Agents
from .auditing import AuditAdmin
from .backends import open_store
from .backup import Backups
from .checkpoints import CheckpointLog
from .core import Core
from .cubes import Cubes
from .errors import MemosError
from .governance import Governance
from .jobs import Jobs
from .memories import Memories, NewMemory
from .memtypes import MemoryType, load_types
from .operations import Route, bind
from .proposals import Proposals
from .retention import Retention, RetentionRules
from .session import JobControl, Session
from .storage import Store, StoreOptions
from .store_admin import StoreAdmin
from .transfer import Transfers
from .validation import Limits
from .versions import Versions
from .writes import Applied, Write

__all__ = ["LOCAL_ADMIN", "Actor", "Applied", "Memos", "NewMemory", "Write"]


def type_databases(types: Mapping[str, MemoryType]) -> dict[str, str]:
    """The sub-databases memory types own, by their LMDB names ("<type>/<name>")."""
    return {f"{name}/{db}": doc for name, t in types.items() for db, doc in t.databases.items()}


class Memos:
    """Cubes, versioned memories, rollback and audit over one LMDB store."""

    def __init__(
        self, path: str | os.PathLike[str], *, options: StoreOptions | None = None,
        limits: Limits | None = None, types: Mapping[str, MemoryType] | None = None,
        governance: Governance | None = None, checkpoints: CheckpointLog | None = None,
        retention: RetentionRules | None = None, storage: str = "lmdb",
    ) -> None:
        """``types``: memory-type instances by name; default: one of each registered type.
        ``governance``: the rules of rollback; default: every cube admin rolls back directly.
        ``checkpoints``: the key and file that signed audit checkpoints go to; default: none
        (``audit_sign`` and ``audit_archive`` are refused).
        ``retention``: the default rules of compaction (``[retention]``); a cube may have its own.
        ``storage``: ``"lmdb"``, the store in ``path``, or a ``postgresql://`` URL (memos.backends)."""
        self.types = dict(types) if types is not None else {n: cls() for n, cls in load_types().items()}
        store = open_store(storage, path, options, extra_databases=type_databases(self.types))
        self.core = Core(store, limits or Limits(), self.types, governance)
        self.cubes = Cubes(self.core)
        self.memories = Memories(self.core)
        self.versions = Versions(self.core)
        self.proposals = Proposals(self.core)
        self.audit_admin = AuditAdmin(self.core, checkpoints)
        self.agents = Agents(self.core)
        self.jobs = Jobs()
        self.retention = Retention(self.core, retention)
        self.parts: tuple[Any, ...] = (Session(), self.cubes, self.memories, self.versions, self.proposals,
                                       self.audit_admin, self.agents, JobControl(self.jobs, self.cubes),
                                       Backups(self.core), StoreAdmin(self.core), Transfers(self.core), self.retention)

    def routes(self) -> dict[str, Route]:
        """Every operation, the core's and each memory type's, bound to what serves it."""
        table = bind([*self.parts, *self.types.values()])
        # Readers of the audit log see every refusal answered before they asked: refusals queued
        # for a later group commit (memos.refusals) are written first.
        for name, route in table.items():
            if getattr(route.call, "__self__", None) is self.audit_admin:
                table[name] = Route(route.op, _settled(self.core, route.call))
        return table

    @property
    def store(self) -> Store:
        return self.core.store

    @property
    def ledger(self) -> Any:
        return self.core.ledger

    @property
    def limits(self) -> Limits:
        return self.core.limits

    def apply(self, writes: Sequence[Write]) -> list[Any]:
        """Make several writes durable in one commit (group commit); each slot is a result or a MemosError."""
        return [a if isinstance(a, MemosError) else a.result for a in self.core.apply(writes)]

    def run(self, write: Write) -> Any:
        return self.core.run(write)

    def flush_usage(self) -> None:
        """Write buffered read counts now."""
        pending = self.core.usage.take()
        if pending:
            self.core.store.write(lambda txn: self.core.usage.write(txn, pending))

    def flush_refusals(self) -> None:
        """Write queued refusal records now (those that came after the writer stopped)."""
        refusals = self.core.refusals
        if refusals is not None and refusals.pending():
            taken = refusals.take()
            try:
                self.core.store.write(lambda txn: taken.write(txn, self.core.audit.append))
            finally:
                refusals.written(taken)

    def close(self) -> None:
        self.flush_usage()
        self.flush_refusals()
        self.core.store.close()

    def __enter__(self) -> Memos:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        # Only reached for names Memos itself lacks: the concerns' operations. What is found
        # is kept on the instance, so the search happens once per name.
        for part in self.__dict__.get("parts", ()):
            found = getattr(part, name, None)
            if found is None and (write := getattr(part, f"write_{name}", None)) is not None:
                found = _applied_at_once(self.core, write)
            if found is not None:
                setattr(self, name, found)
                return found
        raise AttributeError(f"{type(self).__name__!r} has no attribute {name!r}")

    def __dir__(self) -> list[str]:
        names = set(super().__dir__())
        for part in self.parts:
            for attr in dir(part):
                if not attr.startswith("_"):
                    names.add(attr[len("write_"):] if attr.startswith("write_") else attr)
        return sorted(names)


def _applied_at_once(core: Core, write: Callable[..., Write]) -> Callable[..., Any]:
    """``X`` from ``write_X``: build the write and apply it alone, now.

    A write refused while it is built (a batch over its limit) is audited like one refused
    in its commit; the daemon does the same for the writes it is sent.
    """

    takes_cube = list(inspect.signature(write).parameters)[1:2] == ["cube"]  # after the actor

    @functools.wraps(write)
    def run(actor: Actor, *args: Any, **kwargs: Any) -> Any:
        try:
            built = write(actor, *args, **kwargs)
        except MemosError as exc:
            cube = kwargs.get("cube", args[0] if args else None) if takes_cube else None
            raise core.refused(actor, write.__name__.removeprefix("write_"), cube, exc) from None
        return core.run(built)

    return run


def _settled(core: Core, call: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(call)
    def read(*args: Any, **kwargs: Any) -> Any:
        core.settle_refusals()
        return call(*args, **kwargs)

    return read
