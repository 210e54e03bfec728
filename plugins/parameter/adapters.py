"""A cube's parameter memories as read from a snapshot: which are fresh, which to use, their checked weights.

Light: reading the blob into an :class:`~memos.plugins.models.lora.Adapter`
imports torch, and only :func:`load` does that. Generation (the activation
type's ``generate``) uses this module to choose and load a cube's adapter.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from memos.errors import Conflict, IntegrityError, InvalidRequest, ModelMismatch, NotFound
from memos.memtypes import Snapshot
from memos.plugins.models import ModelIdentity

log = logging.getLogger("memos.parameter")

NAME = "parameter"
PLAINTEXT = "plaintext"
FORMAT = "memos-lora"
MEDIA_TYPE = "application/vnd.memos.lora+safetensors"


@dataclass
class Candidate:
    """A parameter memory of the cube, read from its state."""

    memory_id: str
    version: int
    model: str  # identity key of its base model ("" if the metadata holds none)
    sha256: str
    facts: list[tuple[str, int]]
    stale_facts: list[str]
    mem: dict[str, Any] = field(repr=False)

    @property
    def stale(self) -> bool:
        return bool(self.stale_facts) or not self.facts


def model_key(metadata: Any) -> str:
    raw = metadata.get("model") if isinstance(metadata, dict) else None
    try:
        return ModelIdentity.model_validate(raw).key
    except ValueError:
        return ""


def facts_of(metadata: Any) -> list[tuple[str, int]]:
    """The plaintext memories an adapter learnt, as recorded in its metadata ([] if unreadable)."""
    raw = metadata.get("facts") if isinstance(metadata, dict) else None
    out = []
    for f in raw if isinstance(raw, list) else []:
        if isinstance(f, dict) and isinstance(f.get("memory_id"), str) and type(f.get("version")) is int:
            out.append((f["memory_id"], f["version"]))
    return out


def candidate(snap: Snapshot, mem: dict[str, Any]) -> Candidate:
    """A parameter memory and which of its facts changed since it learnt them.

    Stale: a fact whose head version is not the recorded one (an update,
    delete or rollback writes a new version), or which is no longer an active
    plaintext memory. A stale adapter still holds the old facts, so it is not
    used until distilled again; one that names no facts is never used either.
    """
    metadata = mem.get("metadata") or {}
    facts = facts_of(metadata)
    heads = snap.get_many([memory_id for memory_id, _ in facts])
    stale = []
    for memory_id, version in facts:
        head = heads.get(memory_id)
        if head is None or head["version"] != version or head["status"] != "active" or head["type"] != PLAINTEXT:
            stale.append(memory_id)
    blob = mem.get("blob") or {}
    return Candidate(mem["id"], mem["version"], model_key(metadata), str(blob.get("sha256", "")), facts, stale,
                     mem)


def adapters(snap: Snapshot) -> list[Candidate]:
    """The cube's active parameter memories, oldest first."""
    return [candidate(snap, m.model_dump(mode="json")) for m in snap.memories(type=NAME)
            if m.status.value == "active"]


def choose(candidates: Sequence[Candidate], key: str, retrieved: set[str]) -> Candidate | None:
    """The adapter generation uses (docs/parameter.md).

    Among the active, fresh parameter memories trained for this model
    (identity key): the one holding the most retrieved memories, then the one
    holding the most facts, then the newest. One adapter at a time: to
    combine adapters, fuse them.
    """
    fitting = [(len(retrieved & {i for i, _ in c.facts}), len(c.facts), c.version, c.memory_id, c)
               for c in candidates if not c.stale and c.model == key]
    return max(fitting, key=lambda t: t[:4])[4] if fitting else None


def named(snap: Snapshot, memory_id: str, key: str | None) -> Candidate:
    """The parameter memory ``memory_id``, checked: present, active, fresh and (if ``key``) this model's."""
    mem = snap.get_many([memory_id]).get(memory_id)
    if mem is None or mem["status"] == "deleted":
        raise NotFound(f"no parameter memory {memory_id} in cube {snap.cube.name!r}", memory=memory_id)
    if mem["type"] != NAME:
        raise InvalidRequest(f"memory {memory_id} is a {mem['type']} memory, not a parameter memory", field="ids")
    if mem["status"] != "active":
        raise Conflict(f"parameter memory {memory_id} is {mem['status']}", memory=memory_id)
    c = candidate(snap, mem)
    if key is not None and c.model != key:
        raise ModelMismatch(f"parameter memory {memory_id} was trained for model {c.model or 'unknown'!r}, "
                            f"not for {key!r}", expected=key, got=c.model, memory=memory_id)
    if c.stale:
        raise Conflict(f"parameter memory {memory_id} is stale: {', '.join(c.stale_facts) or 'no facts'} changed "
                       "since it was distilled; distil again", memory=memory_id, stale=c.stale_facts)
    return c


def read(snap: Snapshot, c: Candidate) -> bytes:
    """The adapter's stored bytes, their sha256 checked before anything parses them."""
    data = snap.blob(c.sha256) if c.sha256 else b""
    got = hashlib.sha256(data).hexdigest()
    if got != c.sha256:
        log.error("parameter memory blob failed its sha256 check",
                  extra={"cube": snap.cube.name, "memory": c.memory_id, "expected": c.sha256, "got": got})
        raise IntegrityError(f"the adapter of parameter memory {c.memory_id} does not match its sha256: not "
                             "loaded", memory=c.memory_id, expected=c.sha256, got=got)
    return data


def load(data: bytes, c: Candidate, key: str) -> Any:
    """An :class:`~memos.plugins.models.lora.Adapter` from checked bytes; ModelMismatch if another model's."""
    from memos.plugins.models.lora import Adapter

    try:
        adapter = Adapter.from_safetensors(data)
    except IntegrityError as exc:
        raise IntegrityError(f"parameter memory {c.memory_id}: {exc.message}", memory=c.memory_id) from exc
    adapter.check(key)
    return adapter


def info(c: Candidate) -> dict[str, Any]:
    metadata = c.mem.get("metadata") or {}
    blob = c.mem.get("blob") or {}
    sources = [{"memory_id": s["memory_id"], "version": s["version"]}
               for s in c.mem.get("provenance", {}).get("sources", [])]
    return {"memory_id": c.memory_id, "version": c.version, "model": c.model,
            "model_name": str(metadata.get("model_name", "")), "rank": int(metadata.get("rank", 0)),
            "alpha": float(metadata.get("alpha", 0.0)), "target_modules": list(metadata.get("target_modules", [])),
            "parameters": int(metadata.get("parameters", 0)), "size": int(blob.get("size", 0)),
            "sha256": c.sha256, "sources": sources,
            "facts": [{"memory_id": i, "version": v} for i, v in c.facts],
            "stale": c.stale, "stale_facts": c.stale_facts, "fused": metadata.get("fused"),
            "report": metadata.get("report") or {}, "created_at": c.mem["created_at"]}
