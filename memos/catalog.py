"""Every operation of the core, declared once: arguments, result, where it runs, who serves it.

The concern that serves each group names it as its ``operations``
(:class:`~memos.cubes.Cubes` serves ``CUBES_OPERATIONS``...); memory types
declare theirs on their class. This module imports no storage or transport,
so the client library derives its methods from it without loading either.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field
from typing_extensions import TypedDict

from .catalog_retention import RETENTION_OPERATIONS
from .jobs import JobInfo
from .models import (
    DEFAULT_TYPE,
    ArchiveReport,
    AuditRecord,
    Checkpoint,
    Commit,
    Cube,
    DiffEntry,
    Event,
    Memory,
    Proposal,
    SignedCheckpoint,
    VerifyReport,
)
from .catalog_store import STORE_OPERATIONS
from .operations import Args, NoArgs, Operation

PROTOCOL_VERSION = 1


class Pong(TypedDict):
    pong: bool
    pid: int
    protocol: int


class WhoAmI(TypedDict):
    agent: str
    id: str  # the agent's stable id ("admin" for the administrator)
    admin: bool


class JobArgs(Args):
    id: str = Field(max_length=64)


SESSION_OPERATIONS = (
    Operation("ping", NoArgs, Pong, "inline", "Liveness check; returns the daemon's pid and protocol version.", "ping"),
    Operation("whoami", NoArgs, WhoAmI, "inline", "The agent name (or admin) the daemon sees.", "whoami"),
)

class WatchArgs(Args):
    cube: str | None = Field(None, max_length=200)  # None: every cube the caller may read


# Served by memosd itself (daemon/watchers.py): the request stays open and each event is a partial
# reply. The client library's ``events()`` makes it.
WATCH_OPERATIONS = (
    Operation("watch", WatchArgs, Event, "worker",
              "Follow change events of a cube, or of every cube the caller may read (a stream that "
              "stays open; the first piece acknowledges it).", "watch", ("cube",), streams=True),
)

JOB_OPERATIONS = (
    Operation("jobs", NoArgs, list[JobInfo], "worker", "Background jobs on cubes the caller may read, with progress.",
              "list_jobs"),
    Operation("job_cancel", JobArgs, JobInfo, "worker",
              "Ask a running job to stop (admin of its cube); it ends as `cancelled`.", "cancel_job", ("id",)),
)


Name = str  # checked by memos.validation; the schema only bounds the length
RoleName = Literal["read", "write", "admin"]


class NamesPage(Args):
    limit: int | None = Field(None, ge=1)  # at most [limits] max_page
    after: str | None = Field(None, max_length=200)  # a name: the page after it


class CubeArgs(Args):
    cube: Name = Field(max_length=200)


class CubeCreateArgs(Args):
    name: Name = Field(max_length=200)
    settings: dict[str, Any] | None = None


class GrantArgs(CubeArgs):
    agent: Name = Field(max_length=200)
    role: RoleName | None


CUBES_OPERATIONS = (
    Operation("cube_create", CubeCreateArgs, Cube, "writer", "Create a cube owned by the caller.",
              "write_create_cube", ("name", "settings")),
    Operation("cube_list", NamesPage, list[Cube], "worker", "Cubes the caller may read, by name.", "list_cubes"),
    Operation("cube_get", CubeArgs, Cube, "inline", "One cube: owner, ACL, version.", "get_cube", ("cube",)),
    Operation("cube_grant", GrantArgs, Cube, "writer",
              "Set or (role null) remove an agent's role (cube admin).", "write_grant", ("cube", "agent", "role")),
)


StatusName = Literal["active", "archived", "deleted"]


class Source(Args):
    memory_id: str = Field(max_length=64)
    version: int = Field(ge=0)


class NewMemoryArgs(Args):
    text: str | None = None
    type: str = Field(DEFAULT_TYPE, max_length=64)
    tags: list[str] | None = None
    metadata: dict[str, Any] | None = None
    blob: bytes | None = None
    media_type: str = Field("application/octet-stream", max_length=128)
    sources: list[Source] = Field(default_factory=list)
    policy: str | None = Field(None, max_length=64)
    # A precomputed embedding of the text, for types that embed (checked by their prepare()).
    vector: bytes | None = Field(None, max_length=16384, exclude=True)


class AddArgs(NewMemoryArgs):
    cube: str = Field(max_length=200)
    embedder: str | None = Field(None, max_length=200, exclude=True)  # identity of the model that made ``vector``


class AddManyArgs(Args):
    cube: str = Field(max_length=200)
    items: list[NewMemoryArgs | str]  # a text alone, or a map of add's fields
    embedder: str | None = Field(None, max_length=200, exclude=True)


class GetArgs(Args):
    cube: str = Field(max_length=200)
    id: str = Field(max_length=64)
    at: int | None = Field(None, ge=0)
    include_deleted: bool = False


class UpdateArgs(Args):
    cube: str = Field(max_length=200)
    id: str = Field(max_length=64)
    text: str | None = None
    tags: list[str] | None = None
    metadata: dict[str, Any] | None = None
    status: StatusName | None = None
    expected_version: int | None = Field(None, ge=0)


class DeleteArgs(Args):
    cube: str = Field(max_length=200)
    id: str = Field(max_length=64)
    expected_version: int | None = Field(None, ge=0)


class ListArgs(Args):
    cube: str = Field(max_length=200)
    at: int | None = Field(None, ge=0)
    status: StatusName | Literal["all"] = "active"
    tag: str | None = Field(None, max_length=64)
    limit: int | None = Field(None, ge=0)  # at most [limits] max_page
    after: str | None = Field(None, max_length=64)
    usage: bool = False  # fill in each memory's read counts


class MergeArgs(Args):
    cube: str = Field(max_length=200)
    ids: list[str] = Field(min_length=2, max_length=100)
    text: str | None = None  # default: the text of the most recently updated of them
    tags: list[str] | None = None  # default: all of theirs
    metadata: dict[str, Any] | None = None  # default: that of the most recently updated
    expected_versions: list[int] | None = Field(None, max_length=100)  # of ids, in order: else conflict


class BlobArgs(Args):
    cube: str = Field(max_length=200)
    sha256: str = Field(min_length=64, max_length=64)


MEMORIES_OPERATIONS = (
    Operation("add", AddArgs, Memory, "writer", "Add one memory; returns it with id and version.",
              "write_add", ("cube", "text")),
    Operation("add_many", AddManyArgs, list[Memory], "writer", "Add many memories in one commit.",
              "write_add_many", ("cube", "items")),
    Operation("get", GetArgs, Memory, "inline", "One memory, now or at version `at`.", "get_plain", ("cube", "id")),
    Operation("update", UpdateArgs, Memory, "writer", "Change a memory's text, tags, metadata or status.",
              "write_update", ("cube", "id", "text")),
    Operation("delete", DeleteArgs, Memory, "writer", "Soft-delete a memory (history kept).",
              "write_delete", ("cube", "id")),
    Operation("merge", MergeArgs, Memory, "writer",
              "Merge memories of one type into a new one whose sources list them; the originals are archived.",
              "write_merge", ("cube", "ids")),
    Operation("list", ListArgs, list[Memory], "worker", "Memories in creation order, filtered.", "list", ("cube",)),
    Operation("get_blob", BlobArgs, bytes, "worker", "A KV cache or adapter blob by sha256.",
              "get_blob", ("cube", "sha256")),
)


class HistoryArgs(Args):
    cube: str = Field(max_length=200)
    memory_id: str | None = Field(None, max_length=64)
    limit: int | None = Field(None, ge=1)  # at most [limits] max_page
    before: int | None = Field(None, ge=0)


class DiffArgs(Args):
    cube: str = Field(max_length=200)
    v1: int = Field(ge=0)
    v2: int = Field(ge=0)
    limit: int | None = Field(None, ge=0)  # at most [limits] max_page
    after: str | None = Field(None, max_length=64)  # a memory id: the page after it


class RollbackArgs(Args):
    cube: str = Field(max_length=200)
    to_version: int = Field(ge=0)
    memory_ids: list[str] | None = None


class ProposeArgs(RollbackArgs):
    reason: str = Field("", max_length=2000)


class ProposalArgs(Args):
    id: str = Field(max_length=64)


class RejectArgs(ProposalArgs):
    reason: str = Field("", max_length=2000)


class ProposalsArgs(Args):
    cube: str | None = Field(None, max_length=200)
    status: Literal["pending", "applied", "rejected", "expired", "all"] = "pending"
    limit: int | None = Field(None, ge=1)  # at most [limits] max_page
    before: str | None = Field(None, max_length=64)  # a proposal id: the older ones


class ProposalDetail(BaseModel):
    proposal: Proposal
    diff: list[DiffEntry]  # what approving it would change now: the memories now (before), restored (after)


VERSIONS_OPERATIONS = (
    Operation("history", HistoryArgs, list[Commit], "worker", "Commits, newest first.", "history", ("cube",)),
    Operation("diff", DiffArgs, list[DiffEntry], "worker", "Memories that differ between two versions.",
              "diff", ("cube", "v1", "v2")),
    Operation("rollback", RollbackArgs, Commit, "writer",
              "Restore the cube or chosen memories to a version (cube admin).",
              "write_rollback", ("cube", "to_version", "memory_ids")),
)

PROPOSAL_OPERATIONS = (
    Operation("rollback_propose", ProposeArgs, Proposal, "writer",
              "Propose a rollback for another admin of the cube to approve (write on the cube).",
              "write_propose", ("cube", "to_version", "memory_ids")),
    Operation("rollback_show", ProposalArgs, ProposalDetail, "worker",
              "A proposal and the diff approving it would make now.", "show", ("id",)),
    Operation("rollback_approve", ProposalArgs, Commit, "writer",
              "Apply a proposal (admin of the cube, not the proposer); refused if expired or stale.",
              "write_approve", ("id",)),
    Operation("rollback_reject", RejectArgs, Proposal, "writer",
              "Reject a proposal (admin of the cube), or withdraw one's own.", "write_reject", ("id", "reason")),
    Operation("rollback_proposals", ProposalsArgs, list[Proposal], "worker",
              "Proposals on cubes the caller may read, newest first.", "list", ("cube",)),
)


class VerifyArgs(Args):
    checkpoint: dict[str, Any] | None = None  # {seq, head}, as audit_checkpoint gave it
    signed: list[dict[str, Any]] | None = None  # the lines of a checkpoint file (SignedCheckpoint maps)
    public_key: str | None = Field(None, max_length=4096)  # PEM; default: the daemon's signing key's
    archives: list[str] | None = Field(None, max_length=100_000)  # absolute paths, oldest first


class TailArgs(Args):
    n: int = Field(20, ge=1, le=10_000)
    after: int | None = Field(None, ge=0)


class ArchiveArgs(Args):
    before: int = Field(ge=2)
    to: str = Field(max_length=4096)  # an absolute path to a file that does not exist yet


AUDIT_OPERATIONS = (
    Operation("audit_verify", VerifyArgs, VerifyReport, "worker", "Check the audit chain (admin).",
              "audit_verify", ("checkpoint",)),
    Operation("audit_tail", TailArgs, list[AuditRecord], "worker", "Last audit records (admin).",
              "audit_tail", ("n",)),
    Operation("audit_checkpoint", NoArgs, Checkpoint, "worker", "Export the audit head (admin).",
              "audit_checkpoint"),
    Operation("audit_sign", NoArgs, SignedCheckpoint, "worker",
              "Sign the audit head now and append it to the checkpoint file (admin).", "audit_sign"),
    Operation("audit_archive", ArchiveArgs, ArchiveReport, "worker",
              "Move the records before `before` to the new file `to`, if a signed checkpoint covers them; "
              "audited (admin).", "audit_archive", ("before", "to")),
)


class Agent(BaseModel):
    name: str
    id: str  # stable: what ownership and grants reference; never reused
    created_at: float
    created_by: str
    rotated_at: float | None = None


class AgentToken(TypedDict):
    name: str
    id: str
    token: str  # shown this once; only a salted hash is stored, and a retry does not get it again


class AgentRemoved(TypedDict):
    name: str
    removed: bool
    grants_removed: list[str]  # cubes whose access list named the agent
    cubes_to_admin: list[str]  # cubes it owned, now the local administrator's


class AgentArgs(Args):
    name: str = Field(max_length=200)


AGENTS_OPERATIONS = (
    Operation("agent_add", AgentArgs, AgentToken, "writer", "Register an agent; returns its token (admin).",
              "write_add", ("name",)),
    Operation("agent_list", NamesPage, list[Agent], "worker", "Registered agents by name (admin).", "list"),
    Operation("agent_remove", AgentArgs, AgentRemoved, "writer",
              "Remove an agent: its token stops at once, its grants go, its cubes pass to the admin (admin).",
              "write_remove", ("name",)),
    Operation("agent_rotate", AgentArgs, AgentToken, "writer",
              "A new token for an agent (admin, or the agent itself); the old one stops at once.",
              "write_rotate", ("name",)),
)


class PolicyNameArgs(Args):
    name: str = Field(max_length=64)


class PolicyRunArgs(PolicyNameArgs):
    dry_run: bool = False


class PolicyHistoryArgs(Args):
    policy: str | None = Field(None, max_length=64)
    limit: int = Field(20, ge=1, le=1000)


class ActionOutcome(BaseModel):
    """One action of a policy run: the request, why, and what came of it."""

    op: str
    args: dict[str, Any]
    reason: str
    outcome: Literal["planned", "ok", "error"]  # planned: a dry run's
    result: dict[str, Any] = Field(default_factory=dict)  # version and memories, or the job started
    error: dict[str, Any] | None = None  # code and message


class PolicyRun(BaseModel):
    """One run of a policy: what it looked at, what it did and why."""

    id: str
    policy: str
    trigger: Literal["schedule", "manual"]
    requested_by: str  # "scheduler", or the agent that asked
    dry_run: bool
    started: float
    finished: float
    looked_at: dict[str, Any] = Field(default_factory=dict)
    actions: list[ActionOutcome] = Field(default_factory=list)
    error: str | None = None  # the policy itself failed


class PolicyInfo(BaseModel):
    name: str
    description: str
    schedule: str  # "every 3600 s", "cron 0 3 * * * (UTC)", "on demand" or "disabled"
    next_run: float | None
    running: bool
    last_run: PolicyRun | None
    settings: dict[str, Any]


POLICY_OPERATIONS = (
    Operation("policy_list", NoArgs, list[PolicyInfo], "worker",
              "The scheduler's policies: schedule, next and last run, settings (local admin).", "list_policies"),
    Operation("policy_run", PolicyRunArgs, PolicyRun, "worker",
              "Run a policy now, or plan a dry run that changes nothing (local admin).", "run_now", ("name",)),
    Operation("policy_history", PolicyHistoryArgs, list[PolicyRun], "worker",
              "Recorded policy runs, newest first (local admin).", "history", ("policy",)),
)


class PathArgs(Args):
    path: str = Field(max_length=4096)  # absolute, on the daemon's machine


class ExportArgs(CubeArgs):
    path: str = Field(max_length=4096)  # absolute: a file that does not exist yet


class Backup(TypedDict):
    path: str
    format: str
    version: int
    schema: int
    time: float
    audit_at_least: dict[str, Any]  # the audit head when the snapshot began
    bytes: int
    sha256: str


class Exported(TypedDict):
    cube: str
    path: str
    head: int
    records: int
    blobs: int
    sha256: str
    bytes: int


class Imported(TypedDict):
    cube: str
    head: int
    commits: int
    memories: int
    blobs: int
    sha256: str


# The daemon reads and writes these paths as its own user: the local administrator only.
BACKUP_OPERATIONS = (
    Operation("store_backup", PathArgs, Backup, "worker",
              "A consistent copy of the whole store into a new folder, while serving (admin).",
              "store_backup", ("path",)),
)

TRANSFER_OPERATIONS = (
    Operation("cube_export", ExportArgs, Exported, "worker",
              "Write a cube with its whole history to a new file (admin; docs/storage.md).",
              "cube_export", ("cube", "path")),
    Operation("cube_import", PathArgs, Imported, "writer",
              "Add the cube of an export file, history and all, after checking every hash (admin).",
              "write_cube_import", ("path",)),
)


def core_operations() -> tuple[Operation, ...]:
    """The core's operations, in the order the documentation lists them."""
    return (SESSION_OPERATIONS + AGENTS_OPERATIONS + CUBES_OPERATIONS + MEMORIES_OPERATIONS
            + VERSIONS_OPERATIONS + RETENTION_OPERATIONS + PROPOSAL_OPERATIONS + JOB_OPERATIONS + AUDIT_OPERATIONS
            + POLICY_OPERATIONS
            + BACKUP_OPERATIONS + STORE_OPERATIONS + TRANSFER_OPERATIONS + WATCH_OPERATIONS)
