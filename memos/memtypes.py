"""The memory-type contract: what a kind of memory must provide, and what the core gives it.

A memory type (plaintext, activation, parameter, or a third party's) is a
subclass of :class:`MemoryType`, registered under the entry-point group
``memos.memory_types``::

    [project.entry-points."memos.memory_types"]
    plaintext = "memos.plugins.plaintext:Plaintext"

The built-in types are registered exactly so in memos' own ``pyproject.toml``.
The core stores every memory the same way (versioned state bytes, blobs,
commits, audit); a type adds what is particular to it:

* **its name and sub-databases** (``name``, ``databases``): rows only it
  reads and writes, in LMDB sub-databases named ``<type>/<db>``;
* **validation** of its items against the configured limits (:meth:`validate`);
* **operations** beyond the core's add/get/list/update/delete/history/diff/
  rollback (``operations``, each an :class:`~memos.operations.Operation`
  served by a method of the type): reads, jobs, and writes of its own rows
  (``Services.own_write``); memories themselves are always written through
  the core (``add``..., or ``Services.add`` from a job);
* **work before a commit, off the writer thread** (:meth:`prepare`), whose
  rows are written in the same transaction as the memory;
* **derived state kept after commits** (:meth:`after_commit`): indexes and the
  like, with read-your-writes for the type's own operations;
* **long jobs** with progress and cancellation, through ``services.jobs``;
* **start and stop** with the daemon (:meth:`start`, :meth:`stop`, :meth:`close`).

The core hands a type a :class:`Services` object at start: read snapshots
whose access check is done, ledger and blob reads, its own rows, the job
runner and one executor shared by all model work. A type never sees the
store, the writer or the daemon.

Embedded use (:class:`memos.api.Memos` without the daemon) calls only
:meth:`MemoryType.validate`; everything else is the daemon's.

Threads, in the daemon: the **socket thread** decodes and routes requests,
the **worker pool** runs reads, the **prepare thread** of each type runs its
:meth:`prepare`, the **writer thread** commits and calls :meth:`after_commit`,
the **model executor** runs model work and jobs.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any, ClassVar

from pydantic import BaseModel

from .errors import ConfigError, InvalidRequest, MemosError
from .jobs import Jobs
from .models import Cube, Memory
from .operations import Args, Operation
from .validation import Limits
from .writes import Write

GROUP = "memos.memory_types"


@dataclass
class Item:
    """A memory about to be written (by ``add``, ``add_many`` or ``update``), its common fields checked.

    The core has checked types and sizes of every field; :meth:`MemoryType.validate`
    checks what this type requires of them.
    """

    type: str
    text: str | None
    blob: bytes | None
    media_type: str
    tags: list[str]
    metadata: dict[str, Any]
    has_blob: bool  # a blob is given, or (on update) already stored


class Rows(ABC):
    """A type's own sub-databases inside one transaction (names as in ``databases``)."""

    @abstractmethod
    def get(self, db: str, key: bytes) -> bytes | None:
        """The value under ``key``, or None."""

    @abstractmethod
    def put(self, db: str, key: bytes, value: bytes, overwrite: bool = True) -> bool:
        """Store ``value``; False if ``overwrite`` is off and the key exists. Only in write transactions."""

    @abstractmethod
    def delete(self, db: str, key: bytes) -> bool:
        """Remove ``key``; False if it was absent. Only in write transactions."""

    @abstractmethod
    def items(self, db: str, start: bytes = b"") -> Iterator[tuple[bytes, bytes]]:
        """(key, value) pairs from ``start`` on, in key order."""


class Snapshot(ABC):
    """One consistent read of a cube, its access check already passed (and audited if refused).

    Valid inside its ``with`` block only. Memories come as plain data, the
    JSON form of :class:`~memos.models.Memory` (usage left out), or as models
    where said.
    """

    cube: Cube
    version: int  # the version read: the head, or the ``at`` asked for
    rows: Rows  # the type's own rows in the same snapshot

    @abstractmethod
    def get_many(self, memory_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        """Those of ``memory_ids`` present at this version (any status), as plain data."""

    @abstractmethod
    def memories(self, type: str | None = None) -> Iterator[Memory]:
        """Every memory present at this version (any status), optionally of one type, in id order."""

    @abstractmethod
    def blob(self, sha256: str) -> bytes:
        """A blob that a memory of this cube refers to (NotFound otherwise)."""


class Services(ABC):
    """What the core gives a memory type: narrow on purpose."""

    name: str  # the type's name
    settings: BaseModel | None  # the type's configuration section, validated by its ``settings_model``
    limits: Limits
    state_dir: Path  # a private folder for derived state the type saves (indexes); the store stays the truth
    jobs: Jobs  # long jobs: progress, cancellation, listing
    executor: Executor  # one thread shared by in-process model work (embedding, KV builds)

    @abstractmethod
    def snapshot(self, actor: Any, cube: str, *, op: str, role: str = "read",
                 at: int | None = None) -> AbstractContextManager[Snapshot]:
        """A read of ``cube`` (as of version ``at``) for ``actor`` holding ``role``, audited as ``op`` if refused."""

    @abstractmethod
    def system_snapshot(self, cube: str, at: int | None = None) -> AbstractContextManager[Snapshot]:
        """A read of ``cube`` with no access check: for derived state, never for answering a request."""

    @abstractmethod
    def cubes(self) -> list[str]:
        """Every cube's name (for building derived state at start)."""

    @abstractmethod
    def read_rows(self) -> AbstractContextManager[Rows]:
        """The type's own rows in a read snapshot."""

    @abstractmethod
    def write_rows(self, fn: Callable[[Rows], Any]) -> Any:
        """Run ``fn`` on the type's own rows in one durable transaction of its own.

        For rows that are a cache of what memories already hold (vectors of a
        rebuilt index): a memory's own rows are written by :meth:`MemoryType.prepare`.
        """

    @abstractmethod
    def record_reads(self, cube: str, memory_ids: Sequence[str]) -> None:
        """Count reads of these memories (usage statistics), written with a later commit."""

    @abstractmethod
    def check_role(self, actor: Any, cube: str, role: str, op: str) -> Cube:
        """The cube if ``actor`` holds ``role`` on it; Denied (audited as ``op``) otherwise."""

    @abstractmethod
    def own_write(self, actor: Any, op: str, cube: str | None, fn: Callable[[Rows], Any],
                  request_id: str | None = None, role: str = "write") -> Write:
        """A write of the type's own rows, as a request's: audited, group-committed, applied once.

        What an operation with ``where="writer"`` returns (pass its
        ``request_id``). Inside the commit, on the writer thread, ``actor``'s
        ``role`` on ``cube`` is checked, then ``fn(rows)`` runs and returns
        the result (or an Applied; own rows make no cube version).
        """

    @abstractmethod
    def call(self, op: str, actor: Any, **args: Any) -> Any:
        """Run another read operation (the core's or another type's) as ``actor``; its result as plain data.

        How types use each other without importing each other: activation
        asks plaintext's ``search`` for the memories a prompt needs. Only
        operations that run on a worker or inline; UnknownOperation if no
        registered type declares ``op``.
        """

    @abstractmethod
    def submit(self, write: Write) -> Any:
        """Make ``write`` durable through the core's write path and return its result (plain data).

        Blocks until the commit: for jobs and the type's own threads, never
        for a handler on the socket thread. Raises the write's error.
        """

    @abstractmethod
    def add(self, actor: Any, cube: str, text: str | None = None, **fields: Any) -> Memory:
        """Add a memory as ``actor`` (``fields`` as the core's ``add``), like a client request.

        Versioned, audited, announced; blocks until durable (see :meth:`submit`).
        A job that derives memories (a KV cache of plaintext ones) writes them so.
        """


@dataclass
class Pending:
    """A write on its way to the writer, shown to the types that :meth:`~MemoryType.prepare` its operation."""

    op: str
    args: Args
    cube: str
    rows: list[Callable[[Rows], None]] = field(default_factory=list)
    error: MemosError | None = None

    def also(self, fn: Callable[[Rows], None]) -> None:
        """Write ``fn``'s rows in the same transaction as the write itself (both or neither)."""
        self.rows.append(fn)

    def fail(self, exc: MemosError) -> None:
        """Refuse the write: it is audited and answered with ``exc``; nothing of it is committed."""
        self.error = exc


class MemoryType(ABC):
    """The contract of a memory type. Subclass it, fill in the class attributes, register the class."""

    name: ClassVar[str]
    """The type's name: the ``type`` of its memories and its entry point's name."""

    databases: ClassVar[Mapping[str, str]] = {}
    """Its own sub-databases: name -> what they hold (opened at start as ``<type>/<name>``)."""

    operations: ClassVar[tuple[Operation, ...]] = ()
    """Operations it serves, each by a method of this class named by ``Operation.handler``."""

    prepares: frozenset[str] = frozenset()
    """Write operations (core ones included) that :meth:`prepare` must see before they are committed.

    Read by the daemon after :meth:`start`, which may narrow it on the instance (a type with
    nothing to prepare in its configuration spares those writes a hop through its thread)."""

    settings_model: ClassVar[type[BaseModel] | None] = None
    """Its configuration: the section ``[<config_section>]`` of ``memosd.toml``, ``MEMOS_<SECTION>__<KEY>``."""

    config_section: ClassVar[str | None] = None
    """The section's name; the type's name if None."""

    services: Services

    @abstractmethod
    def validate(self, item: Item, limits: Limits) -> None:
        """Refuse an item this type cannot hold, raising InvalidRequest or TooLarge naming the field.

        Called by the core inside the write transaction of ``add``, ``add_many``
        and ``update`` (on the writer thread in the daemon, on the caller's in
        embedded use), before anything of the write is stored. Pure: it may
        read only ``item`` and ``limits``. Also called before :meth:`start`.
        """

    def start(self, services: Services) -> None:
        """Take the services and begin: load models, open or rebuild derived state.

        Called once by the daemon on its main thread before it serves
        requests; slow work belongs on ``services.executor`` so start-up is
        not held up (operations that need it wait or answer ``unavailable``).
        """
        self.services = services

    def prepare(self, pending: Sequence[Pending]) -> None:
        """Do the slow work of writes before they are committed (embedding, ...).

        Called on this type's prepare thread with every queued write whose
        operation is in :attr:`prepares`, batched (one forward pass serves
        many requests). For each, add rows with ``Pending.also`` or refuse it
        with ``Pending.fail``; the writer commits them after this returns.
        Reads what it needs through ``services``; never writes otherwise.
        """

    def after_commit(self, cube: str, version: int, memory_ids: Sequence[str]) -> None:
        """Bring derived state up to a durable commit that touched ``memory_ids`` (any type).

        Called on the writer thread after each commit that changed a cube,
        before the commit's replies leave: it must be quick (queue the work).
        The type's own operations must still see every acknowledged write
        (read-your-writes): apply it here, or make those reads wait for it.
        """

    def stop(self) -> None:
        """Stop the type's own threads and model work (cancel its long jobs).

        Called once at shutdown on the main thread, after the socket stops
        taking requests and the prepare stage has handed every write it held
        to the writer, and before the writer's last commit and the shutdown
        of the model executor.
        """

    def close(self) -> None:
        """Apply the last commits to derived state and save it. Called after the writer has stopped."""


def available() -> dict[str, Any]:
    """Registered memory types by name: entry points, not yet imported."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def load_types() -> dict[str, type[MemoryType]]:
    """Every registered memory type's class, checked against the contract."""
    out: dict[str, type[MemoryType]] = {}
    for name, ep in sorted(available().items()):
        try:
            cls = ep.load()
        except Exception as exc:
            raise ConfigError(f"memory type {name!r} ({ep.value}) cannot be imported: {exc}") from exc
        if not (isinstance(cls, type) and issubclass(cls, MemoryType)):
            raise ConfigError(f"memory type {name!r} ({ep.value}) is not a MemoryType subclass")
        if cls.name != name:
            raise ConfigError(f"memory type {ep.value} calls itself {cls.name!r} but is registered as {name!r}")
        out[name] = cls
    return out


def check_type(name: Any, types: Mapping[str, Any]) -> str:
    """``name`` if it is a registered memory type, else InvalidRequest listing them."""
    if not isinstance(name, str) or name not in types:
        raise InvalidRequest(f"memory type must be one of {sorted(types)}", field="type")
    return name
