"""Operations: the one declaration of every request memosd serves.

An :class:`Operation` names the request, its argument model, its result type,
where the daemon runs it and the method that serves it. The core declares its
own operations (cubes, memories, versions, agents, audit, jobs); each memory
type declares those it brings (plaintext: ``search``...). From these
declarations alone

* the daemon routes a request and picks its thread (``where``),
* the wire protocol validates its arguments (``args``),
* the client library builds its method, signature and result type,
* ``docs/protocol.md`` documents it (a test checks that every one is).

Nothing else lists operations.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, TypeAdapter

from .errors import ConfigError

Where = Literal["inline", "worker", "writer", "job"]
WHERE: dict[str, str] = {
    "inline": "the socket thread answers it at once: point reads cheaper than a hop to a worker",
    "worker": "a read on the worker pool, against an LMDB snapshot",
    "writer": "a write: the handler returns a Write that the writer thread makes durable (group commit)",
    "job": "starts a background job (progress in `jobs`, cancellable) and answers with the job at once",
}


class Args(BaseModel):
    """Base of every argument model: strict ("3" is not a version), unknown fields refused."""

    model_config = ConfigDict(extra="forbid", strict=True)


class NoArgs(Args):
    pass


@dataclass(frozen=True)
class Operation:
    """One request: what it takes, what it returns, where it runs, who serves it.

    ``handler`` names the method of the operation's owner (the core or a
    memory type) that serves it, with the argument fields by name. Reads are
    called ``handler(actor, **fields)`` and return the result; writes
    (``where == "writer"``) are called ``handler(actor, **fields,
    request_id=...)`` and return a :class:`memos.core.Write`. ``positional`` are the arguments the client
    method takes by position; the rest are keyword-only.
    """

    name: str
    args: type[Args]
    result: Any
    where: Where
    doc: str
    handler: str
    positional: tuple[str, ...] = ()
    streams: bool = False  # the handler also gets ``emit``: each call sends a partial reply at once

    @property
    def writes(self) -> bool:
        return self.where == "writer"

    @functools.cached_property
    def required(self) -> frozenset[str]:
        """Arguments without a default (a client must send them, even as null)."""
        return frozenset(k for k, f in self.args.model_fields.items() if f.is_required())

    @functools.cached_property
    def fields(self) -> tuple[str, ...]:
        """Arguments handed to the handler by name; fields marked ``exclude`` are for prepare() only."""
        return tuple(k for k, f in self.args.model_fields.items() if not f.exclude)

    @functools.cached_property
    def result_type(self) -> TypeAdapter[Any]:
        """Validates a reply's result into the declared type (the client's return value)."""
        return TypeAdapter(self.result)


@dataclass(frozen=True)
class Route:
    """An operation bound to the object that serves it."""

    op: Operation
    call: Callable[..., Any]

    def __call__(self, actor: Any, args: Args, request_id: str | None = None,
                 emit: Callable[[Any], None] | None = None) -> Any:
        """Serve ``args``: the result of a read, or the Write of a write.

        ``emit``: for a streaming operation, where its partial results go.
        """
        kwargs = {name: getattr(args, name) for name in self.op.fields}
        if self.op.streams:
            kwargs["emit"] = emit if emit is not None else _nowhere
        if self.op.writes:
            return self.call(actor, request_id=request_id, **kwargs)
        return self.call(actor, **kwargs)


def bind(owners: Iterable[Any]) -> dict[str, Route]:
    """The routing table: each owner's ``operations`` bound to its handlers, names unique."""
    table: dict[str, Route] = {}
    for owner in owners:
        for op in owner.operations:
            if op.name in table:
                raise ConfigError(f"operation {op.name!r} is declared twice "
                                  f"({type(owner).__name__} and {table[op.name].call.__qualname__})")
            if op.streams and op.where != "worker":
                raise ConfigError(f"operation {op.name!r} streams, so it must run on a worker")
            handler = getattr(owner, op.handler, None)
            if not callable(handler):
                raise ConfigError(f"{type(owner).__name__} declares {op.name!r} but has no method {op.handler!r}")
            table[op.name] = Route(op, handler)
    return table


def _nowhere(part: Any) -> None:
    """Where partial results go when nobody listens (embedded use)."""
