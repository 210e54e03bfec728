"""The data model: cubes, memories, commits and audit records.

A memory's *state* is everything that a version of it fixes (text, blob, tags,
metadata, provenance, status, times). Its state bytes are canonical msgpack;
the content hash is their sha256. Bookkeeping that is not state (the version
that wrote it, usage counters) rides along on the model but never enters the
bytes, so a rollback restores state byte for byte.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from . import codec

# \Z, not $: "$" also matches before a trailing newline, which would let "name\n" through.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
TAG_PATTERN = re.compile(r"^[^\x00-\x1f\x7f]{1,64}\Z")


def plain(value: Any) -> Any:
    """Plain data (for msgpack or JSON) from models and lists of models."""
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


# The type of a memory added without one. Types are plugins (memos.memtypes); this is only a name.
DEFAULT_TYPE = "plaintext"


class Status(StrEnum):
    active = "active"
    archived = "archived"
    deleted = "deleted"


class Role(StrEnum):
    read = "read"
    write = "write"
    admin = "admin"

    @property
    def rank(self) -> int:
        return _ROLE_RANK[self]

    def allows(self, needed: Role) -> bool:
        return self.rank >= needed.rank


_ROLE_RANK = {Role.read: 1, Role.write: 2, Role.admin: 3}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False, use_enum_values=False)


class SourceRef(_Model):
    """A memory this one was derived from, at the version it was read."""

    memory_id: str
    version: int


class Provenance(_Model):
    """Who wrote a memory, from what, through which policy, when."""

    actor: str
    time: float
    sources: list[SourceRef] = Field(default_factory=list)
    policy: str | None = None
    request_id: str | None = None


class BlobRef(_Model):
    """A content-addressed blob (KV cache, adapter) stored beside the memory."""

    sha256: str
    size: int
    media_type: str = "application/octet-stream"


class Usage(_Model):
    """Read statistics; kept outside versions so reads never write versions."""

    reads: int = 0
    last_read: float | None = None


STATE_FIELDS = (
    "id", "cube", "type", "text", "blob", "tags", "metadata",
    "provenance", "status", "created_at", "updated_at",
)


class Memory(_Model):
    id: str
    cube: str
    type: str = DEFAULT_TYPE  # a registered memory type's name
    text: str | None = None
    blob: BlobRef | None = None
    tags: list[str] = Field(default_factory=list)
    metadata: dict[str, Any] = Field(default_factory=dict)
    provenance: Provenance
    status: Status = Status.active
    created_at: float
    updated_at: float
    # Not state: filled in on read.
    version: int = 0
    content_hash: str = ""
    usage: Usage | None = None

    def state(self) -> dict[str, Any]:
        return self.model_dump(mode="json", include=set(STATE_FIELDS))

    def state_bytes(self) -> bytes:
        return codec.pack(self.state())

    @classmethod
    def from_state_bytes(cls, data: bytes, version: int) -> Memory:
        mem = cls.model_validate(codec.unpack(data))
        mem.version = version
        mem.content_hash = codec.sha256_hex(data)
        return mem


class SearchHit(_Model):
    """One search result: the memory (with provenance and version) and why it ranked."""

    memory: Memory
    score: float
    lexical: float
    dense: float


class Cube(_Model):
    name: str
    owner: str
    acl: dict[str, Role] = Field(default_factory=dict)
    settings: dict[str, Any] = Field(default_factory=dict)
    version: int = 0
    created_at: float
    pins: dict[str, int] = Field(default_factory=dict)  # name -> version compaction keeps (cube_pin)


class Change(_Model):
    """One memory touched by a commit: its content hash before and after."""

    memory_id: str
    before: str | None
    after: str | None


class Commit(_Model):
    cube: str
    version: int
    actor: str
    time: float
    op: str
    changes: list[Change] = Field(default_factory=list)
    info: dict[str, Any] = Field(default_factory=dict)


class DiffEntry(_Model):
    memory_id: str
    change: Literal["added", "removed", "modified"]
    before: Memory | None = None
    after: Memory | None = None


class Proposal(_Model):
    """A rollback waiting for another agent's approval (``rollback_propose``).

    ``plan`` is the dry run when it was made: [memory id, content hash now,
    content hash restored] (None: absent). Approval recomputes it and refuses
    if the cube has changed what the rollback would do (``stale``).
    """

    id: str
    cube: str
    to_version: int
    memory_ids: list[str] | None = None
    proposer: str
    proposer_id: str | None = None  # the proposer's stable id (memos.agents)
    reason: str = ""
    created_at: float
    expires_at: float
    base_version: int  # the cube's version when proposed
    plan: list[list[str | None]] = Field(default_factory=list)
    status: Literal["pending", "applied", "rejected"] = "pending"
    decided_by: str | None = None
    decided_at: float | None = None
    decision: str = ""  # why it was rejected
    applied_version: int | None = None
    # Not stored: filled in on read.
    expired: bool = False  # pending past expires_at: it can no longer be approved
    stale: bool | None = None  # the cube changed what the rollback would do (shown by rollback_show)


class AuditRecord(_Model):
    seq: int
    time: float
    actor: str
    op: str
    outcome: Literal["ok", "denied", "error"]
    cube: str | None = None
    version: int | None = None
    detail: dict[str, Any] = Field(default_factory=dict)
    prev: str
    hash: str = ""

    def body_bytes(self) -> bytes:
        """What the chain hashes: every field but the hash itself."""
        return codec.pack(self.model_dump(mode="json", exclude={"hash"}))


class Event(_Model):
    """A change, sent to the clients that ``watch`` its cube (and may read it) once it is durable.

    Jobs are announced the same way, with ``op`` ``"job"``: as they start, advance
    and end, under their cube's name (or ``""`` for a job of no cube), with
    ``job`` the job as ``jobs`` lists it and ``version`` 0.
    """

    op: str
    cube: str
    actor: str
    time: float
    version: int
    memories: list[str] = Field(default_factory=list)
    job: dict[str, Any] | None = None


class Checkpoint(_Model):
    """An exported audit head: a later verify proves nothing was cut or rewritten."""

    seq: int
    head: str


_HEX64 = r"^[0-9a-f]{64}\z"  # pydantic's (Rust) regex: \z is the end of the text


class Boundary(_Model):
    """Where the audit chain kept in the store begins: records before ``seq`` were archived,
    and ``prev`` is the hash of the last of them (the genesis hash when none were)."""

    seq: int = Field(1, ge=1)
    prev: str = Field("0" * 64, pattern=_HEX64)


class SignedCheckpoint(_Model):
    """An audit head signed with the daemon's Ed25519 key (memos.checkpoints): one line of the checkpoint file.

    ``boundary`` is where the store's chain began when it was signed, so records
    removed from the store without ``audit_archive`` are noticed.
    """

    seq: int = Field(ge=0)
    head: str = Field(pattern=_HEX64)
    time: float
    boundary: Boundary = Field(default_factory=Boundary)
    key_id: str = Field(pattern=r"^[0-9a-f]{16}\z")
    signature: str = Field(pattern=r"^[0-9a-f]{128}\z")

    def checkpoint(self) -> Checkpoint:
        return Checkpoint(seq=self.seq, head=self.head)


class VerifyReport(_Model):
    ok: bool
    records: int
    head: Checkpoint | None = None
    first_bad: int | None = None
    reason: str | None = None
    boundary: Boundary | None = None  # where the chain kept in the store begins
    checkpoints: int = 0  # checkpoints the chain was checked against
    unchecked: int = 0  # checkpoints of records archived and not given back: not checked


class ArchiveReport(_Model):
    """What ``audit_archive`` moved out of the store."""

    file: str
    first: int  # the first and last record written to the file
    last: int
    sha256: str  # of the file
    checkpoint: int  # the signed checkpoint (its record) that covers them
    boundary: Boundary  # where the store's chain now begins
