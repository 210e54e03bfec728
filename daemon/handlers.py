"""The dispatch table: one handler per operation of ``memos.protocol.OPS``.

A read handler returns the reply's result. A write handler returns a
:class:`~memos.api.Write` plus the function that turns its result into wire
data; the writer thread makes it durable (grouped with others) before anyone
sees the reply.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


from memos import protocol as p
from memos.agents import Agents
from memos.api import Actor, Memos, NewMemory, Write
from memos.models import plain


wire = plain  # what every handler returns: plain msgpack-able data


@dataclass
class Context:
    memos: Memos
    agents: Agents
    search: Any = None  # daemon.search.SearchService
    jobs: Any = None  # daemon.jobs.Jobs


ReadHandler = Callable[[Context, Actor, Any], Any]
WriteHandler = Callable[[Context, Actor, Any, str], Write]

READS: dict[str, ReadHandler] = {}
WRITES: dict[str, WriteHandler] = {}


def reads(op: str) -> Callable[[ReadHandler], ReadHandler]:
    def register(fn: ReadHandler) -> ReadHandler:
        assert op in p.OPS and not p.OPS[op].writes, op
        READS[op] = fn
        return fn

    return register


def writes(op: str) -> Callable[[WriteHandler], WriteHandler]:
    def register(fn: WriteHandler) -> WriteHandler:
        assert op in p.OPS and p.OPS[op].writes, op
        WRITES[op] = fn
        return fn

    return register


def _new_memory(args: p.NewMemoryArgs) -> NewMemory:
    return NewMemory(
        text=args.text, type=args.type, tags=args.tags, metadata=args.metadata, blob=args.blob,
        media_type=args.media_type, sources=[s.model_dump() for s in args.sources], policy=args.policy,
    )


# -- reads --------------------------------------------------------------------

@reads("ping")
def ping(ctx: Context, actor: Actor, args: p.NoArgs) -> Any:
    return {"pong": True, "pid": os.getpid(), "protocol": p.PROTOCOL_VERSION}


@reads("whoami")
def whoami(ctx: Context, actor: Actor, args: p.NoArgs) -> Any:
    return {"agent": actor.name, "admin": actor.admin}


@reads("agent_list")
def agent_list(ctx: Context, actor: Actor, args: p.NoArgs) -> Any:
    return wire(ctx.agents.list(actor))


@reads("cube_list")
def cube_list(ctx: Context, actor: Actor, args: p.NoArgs) -> Any:
    return wire(ctx.memos.list_cubes(actor))


@reads("cube_get")
def cube_get(ctx: Context, actor: Actor, args: p.CubeArgs) -> Any:
    return wire(ctx.memos.get_cube(actor, args.cube))


@reads("get")
def get(ctx: Context, actor: Actor, args: p.GetArgs) -> Any:
    return ctx.memos.get_plain(actor, args.cube, args.id, at=args.at, include_deleted=args.include_deleted)


@reads("list")
def list_(ctx: Context, actor: Actor, args: p.ListArgs) -> Any:
    status = None if args.status == "all" else args.status
    return wire(ctx.memos.list(actor, args.cube, at=args.at, status=status, tag=args.tag,
                               limit=args.limit, after=args.after))


@reads("history")
def history(ctx: Context, actor: Actor, args: p.HistoryArgs) -> Any:
    return wire(ctx.memos.history(actor, args.cube, memory_id=args.memory_id,
                                  limit=args.limit, before=args.before))


@reads("diff")
def diff(ctx: Context, actor: Actor, args: p.DiffArgs) -> Any:
    return wire(ctx.memos.diff(actor, args.cube, args.v1, args.v2))


@reads("get_blob")
def get_blob(ctx: Context, actor: Actor, args: p.BlobArgs) -> Any:
    return ctx.memos.get_blob(actor, args.cube, args.sha256)


@reads("search")
def search(ctx: Context, actor: Actor, args: p.SearchArgs) -> Any:
    return ctx.search.search(actor, args)


@reads("reindex")
def reindex(ctx: Context, actor: Actor, args: p.CubeArgs) -> Any:
    ctx.memos.check_role(actor, args.cube, "admin")
    return {"cube": ctx.search.reindex(args.cube), "started": True}


@reads("jobs")
def jobs(ctx: Context, actor: Actor, args: p.NoArgs) -> Any:
    """Jobs on cubes the caller may read (all of them for the administrator)."""
    readable = None if actor.admin else {c.name for c in ctx.memos.list_cubes(actor)}
    return [j for j in ctx.jobs.list() if readable is None or j["cube"] in readable]


@reads("embedder")
def embedder(ctx: Context, actor: Actor, args: p.NoArgs) -> Any:
    model = ctx.search.embedder
    return {"name": model.name, "identity": model.identity, "dim": model.dim}


@reads("audit_verify")
def audit_verify(ctx: Context, actor: Actor, args: p.VerifyArgs) -> Any:
    return wire(ctx.memos.audit_verify(actor, args.checkpoint))


@reads("audit_tail")
def audit_tail(ctx: Context, actor: Actor, args: p.TailArgs) -> Any:
    return wire(ctx.memos.audit_tail(actor, args.n, args.after))


@reads("audit_checkpoint")
def audit_checkpoint(ctx: Context, actor: Actor, args: p.NoArgs) -> Any:
    return wire(ctx.memos.audit_checkpoint(actor))


# -- writes -------------------------------------------------------------------

@writes("agent_add")
def agent_add(ctx: Context, actor: Actor, args: p.AgentArgs, rid: str) -> Write:
    return ctx.agents.write_add(actor, args.name)


@writes("agent_remove")
def agent_remove(ctx: Context, actor: Actor, args: p.AgentArgs, rid: str) -> Write:
    return ctx.agents.write_remove(actor, args.name)


@writes("cube_create")
def cube_create(ctx: Context, actor: Actor, args: p.CubeCreateArgs, rid: str) -> Write:
    return ctx.memos.write_create_cube(actor, args.name, args.settings)


@writes("cube_grant")
def cube_grant(ctx: Context, actor: Actor, args: p.GrantArgs, rid: str) -> Write:
    return ctx.memos.write_grant(actor, args.cube, args.agent, args.role)


@writes("add")
def add(ctx: Context, actor: Actor, args: p.AddArgs, rid: str) -> Write:
    return ctx.memos.write_add(actor, args.cube, _new_memory(args), request_id=rid)


@writes("add_many")
def add_many(ctx: Context, actor: Actor, args: p.AddManyArgs, rid: str) -> Write:
    return ctx.memos.write_add_many(actor, args.cube, [_new_memory(i) for i in args.items], request_id=rid)


@writes("update")
def update(ctx: Context, actor: Actor, args: p.UpdateArgs, rid: str) -> Write:
    return ctx.memos.write_update(actor, args.cube, args.id, text=args.text, tags=args.tags,
                                  metadata=args.metadata, status=args.status,
                                  expected_version=args.expected_version, request_id=rid)


@writes("delete")
def delete(ctx: Context, actor: Actor, args: p.DeleteArgs, rid: str) -> Write:
    return ctx.memos.write_delete(actor, args.cube, args.id, args.expected_version, request_id=rid)


@writes("rollback")
def rollback(ctx: Context, actor: Actor, args: p.RollbackArgs, rid: str) -> Write:
    return ctx.memos.write_rollback(actor, args.cube, args.to_version, args.memory_ids, request_id=rid)


def check_table() -> None:
    """Every operation has exactly one handler of the right kind."""
    missing = [op for op in p.OPS if op not in READS and op not in WRITES]
    if missing:
        raise RuntimeError(f"operations without a handler: {missing}")
