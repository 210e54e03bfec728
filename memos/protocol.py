"""The memos wire protocol, written down in one place.

Transport: ZeroMQ. The daemon binds a ROUTER on ``ipc://<runtime_dir>/memosd.sock``;
a client connects a DEALER and sends **one frame per request**. The daemon
answers with one frame on the same connection. Replies may arrive out of order:
match them by ``id``. Change events go out on a PUB socket next to it
(``memosd.sock.events``): two frames, the cube name (the topic) and an event map.

Every frame is one msgpack map (no ext types; binary fields are msgpack bin).

Request::

    {"v": 1,                 # protocol version (PROTOCOL_VERSION)
     "id": "01J...",         # request id, 1-64 chars; a write resent with the same
                             #   id by the same agent is applied once and answered
                             #   with the first reply (idempotent retry)
     "op": "add",            # operation: a key of OPS
     "args": {...},          # the operation's arguments, validated by OPS[op].args
     "token": "name.secret"} # agent token from `memosctl agent add`; omitted by the
                             #   daemon's own user acting as local administrator

Reply::

    {"v": 1, "id": "01J...", "ok": true,  "result": ...}
    {"v": 1, "id": "01J...", "ok": false, "error": {"code": "not_found",
                                                     "message": "...", "details": {...}}}

Error codes are those of :mod:`memos.errors` (``invalid_request``, ``too_large``,
``unknown_operation``, ``not_found``, ``denied``, ``unauthenticated``,
``conflict``, ``storage_error``, ``unavailable``, ``internal``...). A frame
that cannot be decoded still gets a reply with ``id`` null.

Event (PUB)::

    [b"<cube>", {"op": "add", "cube": "<cube>", "version": 7, "actor": "agent-a",
                 "memories": ["01J..."], "time": 1764159000.1}]
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import InvalidRequest, MemosError, TooLarge, UnknownOperation

PROTOCOL_VERSION = 1

Name = str  # checked by memos.validation where it matters; the schema bounds length
RoleName = Literal["read", "write", "admin"]
StatusName = Literal["active", "archived", "deleted"]
TypeName = Literal["plaintext", "activation", "parameter"]


class _Args(BaseModel):
    # strict: "3" is not a version, 1 is not True. Unknown fields are refused.
    model_config = ConfigDict(extra="forbid", strict=True)


class Envelope(_Args):
    v: int
    id: str = Field(min_length=1, max_length=64)
    op: str = Field(min_length=1, max_length=64)
    args: dict[str, Any] = Field(default_factory=dict)
    token: str | None = Field(None, max_length=256)


class NoArgs(_Args):
    pass


class AgentArgs(_Args):
    name: Name = Field(max_length=200)


class CubeCreateArgs(_Args):
    name: Name = Field(max_length=200)
    settings: dict[str, Any] | None = None


class CubeArgs(_Args):
    cube: Name = Field(max_length=200)


class GrantArgs(CubeArgs):
    agent: Name = Field(max_length=200)
    role: RoleName | None


class Source(_Args):
    memory_id: str = Field(max_length=64)
    version: int = Field(ge=0)


class NewMemoryArgs(_Args):
    text: str | None = None
    type: TypeName = "plaintext"
    tags: list[str] | None = None
    metadata: dict[str, Any] | None = None
    blob: bytes | None = None
    media_type: str = Field("application/octet-stream", max_length=128)
    sources: list[Source] = Field(default_factory=list)
    policy: str | None = Field(None, max_length=64)
    vector: bytes | None = Field(None, max_length=16384)  # float32 row from the daemon's embedder (add_many)


class AddArgs(NewMemoryArgs):
    cube: Name = Field(max_length=200)
    embedder: str | None = Field(None, max_length=200)


class AddManyArgs(CubeArgs):
    items: list[NewMemoryArgs]
    embedder: str | None = Field(None, max_length=200)  # identity of the embedder that made item vectors


class GetArgs(CubeArgs):
    id: str = Field(max_length=64)
    at: int | None = Field(None, ge=0)
    include_deleted: bool = False


class UpdateArgs(CubeArgs):
    id: str = Field(max_length=64)
    text: str | None = None
    tags: list[str] | None = None
    metadata: dict[str, Any] | None = None
    status: StatusName | None = None
    expected_version: int | None = Field(None, ge=0)


class DeleteArgs(CubeArgs):
    id: str = Field(max_length=64)
    expected_version: int | None = Field(None, ge=0)


class ListArgs(CubeArgs):
    at: int | None = Field(None, ge=0)
    status: StatusName | Literal["all"] = "active"
    tag: str | None = Field(None, max_length=64)
    limit: int | None = Field(None, ge=0)
    after: str | None = Field(None, max_length=64)


class HistoryArgs(CubeArgs):
    memory_id: str | None = Field(None, max_length=64)
    limit: int | None = Field(None, ge=1)
    before: int | None = Field(None, ge=0)


class DiffArgs(CubeArgs):
    v1: int = Field(ge=0)
    v2: int = Field(ge=0)


class RollbackArgs(CubeArgs):
    to_version: int = Field(ge=0)
    memory_ids: list[str] | None = None


class SearchArgs(CubeArgs):
    query: str = Field(max_length=8192)
    k: int = Field(10, ge=1, le=1000)
    at: int | None = Field(None, ge=0)
    tags: list[str] | None = None
    status: Literal["active", "archived", "all"] = "active"  # deleted memories are not searchable
    since: float | None = None
    until: float | None = None
    metadata: dict[str, Any] | None = None


class BlobArgs(CubeArgs):
    sha256: str = Field(min_length=64, max_length=64)


class VerifyArgs(_Args):
    checkpoint: dict[str, Any] | None = None


class TailArgs(_Args):
    n: int = Field(20, ge=1, le=10_000)
    after: int | None = Field(None, ge=0)


@dataclass(frozen=True)
class Op:
    """An operation: its argument schema and whether it changes state."""

    args: type[_Args]
    writes: bool
    doc: str

    @functools.cached_property
    def required(self) -> frozenset[str]:
        """Arguments without a default (a client must send them, even as null)."""
        return frozenset(k for k, f in self.args.model_fields.items() if f.is_required())


OPS: dict[str, Op] = {
    "ping": Op(NoArgs, False, "Liveness check; returns the daemon's pid and protocol version."),
    "whoami": Op(NoArgs, False, "The agent name (or admin) the daemon sees."),
    "agent_add": Op(AgentArgs, True, "Register an agent; returns its token (admin)."),
    "agent_list": Op(NoArgs, False, "Registered agents (admin)."),
    "agent_remove": Op(AgentArgs, True, "Revoke an agent's token (admin)."),
    "cube_create": Op(CubeCreateArgs, True, "Create a cube owned by the caller."),
    "cube_list": Op(NoArgs, False, "Cubes the caller may read."),
    "cube_get": Op(CubeArgs, False, "One cube: owner, ACL, version."),
    "cube_grant": Op(GrantArgs, True, "Set or (role null) remove an agent's role (cube admin)."),
    "add": Op(AddArgs, True, "Add one memory; returns it with id and version."),
    "add_many": Op(AddManyArgs, True, "Add many memories in one commit."),
    "get": Op(GetArgs, False, "One memory, now or at version `at`."),
    "update": Op(UpdateArgs, True, "Change a memory's text, tags, metadata or status."),
    "delete": Op(DeleteArgs, True, "Soft-delete a memory (history kept)."),
    "list": Op(ListArgs, False, "Memories in creation order, filtered."),
    "history": Op(HistoryArgs, False, "Commits, newest first."),
    "diff": Op(DiffArgs, False, "Memories that differ between two versions."),
    "rollback": Op(RollbackArgs, True, "Restore the cube or chosen memories to a version (cube admin)."),
    "get_blob": Op(BlobArgs, False, "A KV cache or adapter blob by sha256."),
    "search": Op(SearchArgs, False, "Hybrid (dense + BM25) search, filtered, now or at a version."),
    "reindex": Op(CubeArgs, False, "Rebuild a cube's search index in the background (cube admin)."),
    "jobs": Op(NoArgs, False, "Background jobs and their progress."),
    "embedder": Op(NoArgs, False, "The embedder's identity and dimension (for client-made vectors)."),
    "audit_verify": Op(VerifyArgs, False, "Check the audit chain (admin)."),
    "audit_tail": Op(TailArgs, False, "Last audit records (admin)."),
    "audit_checkpoint": Op(NoArgs, False, "Export the audit head (admin)."),
}


def encode(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def decode(frame: bytes, max_bytes: int) -> dict[str, Any]:
    """Decode one untrusted frame into a map, or raise a typed error."""
    if len(frame) > max_bytes:
        raise TooLarge(f"message of {len(frame)} bytes exceeds {max_bytes}", size=len(frame), limit=max_bytes)
    try:
        value = msgpack.unpackb(frame, raw=False, strict_map_key=True, ext_hook=_refuse_ext)
    except (msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, ValueError,
            UnicodeDecodeError, TypeError, RecursionError) as exc:
        raise InvalidRequest(f"frame is not a msgpack map: {type(exc).__name__}") from None
    if not isinstance(value, dict):
        raise InvalidRequest(f"frame must be a msgpack map, not {type(value).__name__}")
    return value


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"ext type {code} is not accepted")


def parse_request(message: dict[str, Any]) -> tuple[Envelope, _Args]:
    """Validate the envelope and the operation's arguments."""
    envelope = _validate(Envelope, message, "request")
    if envelope.v != PROTOCOL_VERSION:
        raise InvalidRequest(f"protocol version {envelope.v} is not supported (use {PROTOCOL_VERSION})",
                             supported=PROTOCOL_VERSION)
    op = OPS.get(envelope.op)
    if op is None:
        raise UnknownOperation(f"unknown operation {envelope.op[:64]!r}", op=envelope.op[:64])
    return envelope, _validate(op.args, envelope.args, envelope.op)


def _validate(model: type[_Args], data: Any, what: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = [
            {"field": ".".join(str(p) for p in e["loc"]), "problem": e["msg"]}
            for e in exc.errors(include_url=False, include_input=False)[:10]
        ]
        first = errors[0] if errors else {"field": "", "problem": "invalid"}
        raise InvalidRequest(f"{what}: {first['field'] or 'value'}: {first['problem']}", errors=errors) from None


def ok_reply(request_id: str | None, result: Any) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": True, "result": result}


def error_reply(request_id: str | None, error: MemosError) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": request_id, "ok": False, "error": error.to_wire()}


def request_id_of(message: Any) -> str | None:
    """Best-effort id of a request that failed validation, so the client can match it."""
    if isinstance(message, dict):
        rid = message.get("id")
        if isinstance(rid, str) and 0 < len(rid) <= 64:
            return rid
    return None
