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
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .access import LOCAL_ADMIN, Actor
from .agents import Agents
from .auditing import AuditAdmin
from .checkpoints import CheckpointLog
from .backup import Backups
from .core import Core
from .cubes import Cubes
from .errors import MemosError
from .governance import Governance
from .jobs import Jobs
from .memories import Memories, NewMemory
from .memtypes import MemoryType, load_types
from .operations import Route, bind
from .proposals import Proposals
from .session import JobControl, Session
from .storage import Store, StoreOptions
from .validation import Limits
from .transfer import Transfers
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
    ) -> None:
        """``types``: memory-type instances by name; default: one of each registered type.
        ``governance``: the rules of rollback; default: every cube admin rolls back directly.
        ``checkpoints``: the key and file that signed audit checkpoints go to; default: none
        (``audit_sign`` and ``audit_archive`` are refused)."""
        self.types = dict(types) if types is not None else {n: cls() for n, cls in load_types().items()}
        store = Store(path, options, extra_databases=type_databases(self.types))
        self.core = Core(store, limits or Limits(), self.types, governance)
        self.cubes = Cubes(self.core)
        self.memories = Memories(self.core)
        self.versions = Versions(self.core)
        self.proposals = Proposals(self.core)
        self.audit_admin = AuditAdmin(self.core, checkpoints)
        self.agents = Agents(self.core)
        self.jobs = Jobs()
        self.parts: tuple[Any, ...] = (Session(), self.cubes, self.memories, self.versions, self.proposals,
                                       self.audit_admin, self.agents, JobControl(self.jobs, self.cubes),
                                       Backups(self.core), Transfers(self.core))

    def routes(self) -> dict[str, Route]:
        """Every operation, the core's and each memory type's, bound to what serves it."""
        return bind([*self.parts, *self.types.values()])

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

    def close(self) -> None:
        self.flush_usage()
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
    """``X`` from ``write_X``: build the write and apply it alone, now."""

    @functools.wraps(write)
    def run(*args: Any, **kwargs: Any) -> Any:
        return core.run(write(*args, **kwargs))

    return run



