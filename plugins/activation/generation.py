"""Memory-augmented generation: retrieve, choose an activation memory, compose, generate, stream.

The steps of ``generate`` (docs/activation.md):

1. the caller's read role is checked (a refusal is audited as ``generate``);
2. plaintext memories are retrieved for the prompt: ``search`` when a type
   serves it, else the cube's most recent active plaintext memories;
3. in one snapshot of the cube: the activation memory is chosen (or the one
   named is checked), its blob read and its sha256 checked before anything
   parses it; a failure here is audited;
4. outside the snapshot, holding the model's lock: the chat is composed and
   tokenised, the cache's tokens are checked to start it, and the model
   continues a copy of the cache, streaming pieces of text as they come.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from memos.errors import (Conflict, IntegrityError, InvalidRequest, ModelMismatch, NotFound, Unavailable,
                          UnknownOperation)
from memos.memtypes import Services, Snapshot
from memos.plugins.models import ModelIdentity, adapted_key

from . import preamble
from .building import NAME, PLAINTEXT
from .registry import Registry
from .settings import ActivationSettings

log = logging.getLogger("memos.activation")

_QUERY_CHARS = 8192  # the longest query search takes: a longer prompt is searched by its start


@dataclass
class Candidate:
    """An activation memory of the cube, read from its state."""

    memory_id: str
    version: int
    model: str  # identity key ("" if the metadata holds none)
    sources: list[tuple[str, int]]
    stale_sources: list[str]
    mem: dict[str, Any] = field(repr=False)
    mismatch: bool = False  # no sources, or a preamble of another format or text: never injected

    @property
    def stale(self) -> bool:
        return bool(self.stale_sources) or self.mismatch


def model_key(metadata: Any) -> str:
    """The key of the model that made an activation memory ("" if none can be read).

    Its identity key, extended by its adapter's (:func:`adapted_key`) when it
    was built with a parameter memory's adapter active."""
    raw = metadata.get("model") if isinstance(metadata, dict) else None
    try:
        key = ModelIdentity.model_validate(raw).key
    except ValueError:
        return ""
    adapter = metadata.get("adapter")
    if adapter is None:
        return key
    sha = adapter.get("sha256") if isinstance(adapter, dict) else None
    return adapted_key(key, sha) if isinstance(sha, str) and sha else ""


def candidate(snap: Snapshot, mem: dict[str, Any]) -> Candidate:
    """An activation memory and which of its sources changed since it was built.

    Stale: a source whose head version is not the recorded one (an update,
    delete or rollback writes a new version), or which is no longer an active
    plaintext memory; or a preamble of another format.
    """
    sources = [(s["memory_id"], s["version"]) for s in mem["provenance"].get("sources", [])]
    heads = snap.get_many([memory_id for memory_id, _ in sources])
    stale = []
    for memory_id, version in sources:
        head = heads.get(memory_id)
        if (head is None or head["version"] != version or head["status"] != "active"
                or head["type"] != PLAINTEXT or not head.get("text")):
            stale.append(memory_id)
    metadata = mem.get("metadata") or {}
    mismatch = not sources  # a cache that names no memories holds nothing anyone can check
    if not stale and (metadata.get("format") != preamble.FORMAT or metadata.get("preamble_sha256")
                      != preamble.sha256([heads[memory_id]["text"] for memory_id, _ in sources])):
        stale = [memory_id for memory_id, _ in sources]  # built from another preamble: rebuild it
        mismatch = True
    return Candidate(mem["id"], mem["version"], model_key(metadata), sources, stale, mem, mismatch)


def activations(snap: Snapshot) -> list[Candidate]:
    """The cube's active activation memories, oldest first."""
    return [candidate(snap, m.model_dump(mode="json")) for m in snap.memories(type=NAME)
            if m.status.value == "active"]


def choose(candidates: Sequence[Candidate], key: str, retrieved: set[str]) -> Candidate | None:
    """The activation memory to inject: documented in docs/activation.md.

    Among the active, non-stale activation memories made by this model
    (identity key), those holding at least one retrieved memory; the one
    holding the most retrieved memories wins, then the one holding fewer
    memories in all (less unasked-for context), then the newest (highest
    version, then id). Never two: caches computed separately are not
    concatenated.
    """
    fitting = []
    for c in candidates:
        covered = len(retrieved & {memory_id for memory_id, _ in c.sources})
        if not c.stale and c.model == key and covered:
            fitting.append((covered, -len(c.sources), c.version, c.memory_id, c))
    return max(fitting, key=lambda t: t[:4])[4] if fitting else None


@dataclass(frozen=True)
class Request:
    """What ``generate`` was asked (GenerateArgs less the cube)."""

    prompt: str
    model: str | None = None
    activation: str | None = None
    use_activation: bool = True
    adapter: str | None = None
    use_adapter: bool = True
    k: int | None = None
    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] | None = None


@dataclass
class Plan:
    """What one generation uses: the adapter and the cache (if any), the preamble's and the prompt's memories."""

    adapter: Any = None  # a parameter memory (adapters.Candidate)
    weights: Any = None  # its Adapter
    cache: Any = None  # a KVCache
    activation: Candidate | None = None
    cached: list[dict[str, Any]] = field(default_factory=list)  # memories of the preamble, in order
    others: list[dict[str, Any]] = field(default_factory=list)  # retrieved, written into the user turn


class Generator:
    def __init__(self, services: Services, settings: ActivationSettings, registry: Registry) -> None:
        self.services = services
        self.settings = settings
        self.registry = registry

    def retrieve(self, actor: Any, cube: str, prompt: str, k: int) -> list[str]:
        """Ids of the plaintext memories the prompt needs, best first."""
        if k == 0:
            return []
        try:
            hits = self.services.call("search", actor, cube=cube, query=prompt[:_QUERY_CHARS], k=k)
        except (UnknownOperation, Unavailable) as exc:
            log.info("generate without search (%s): the most recent memories instead", exc.code)
        else:
            return [h["memory"]["id"] for h in hits if h["memory"]["type"] == PLAINTEXT]
        with self.services.snapshot(actor, cube, op="generate") as snap:
            recent = [m for m in snap.memories(type=PLAINTEXT) if m.status.value == "active" and m.text]
        return [m.id for m in recent[-k:]][::-1]

    def plan(self, actor: Any, cube: str, key: str, retrieved: list[str], request: Request) -> Plan:
        """Choose and read the adapter, the activation memory and the memories' texts, in one snapshot.

        Failures are audited. With an adapter, only caches built with that
        adapter active fit (a cache of the bare model is not what the adapted
        model computes)."""
        from memos.plugins.parameter import adapters

        with self.services.snapshot(actor, cube, op="generate") as snap:
            found = snap.get_many(retrieved)
            live = {i: m for i, m in found.items()
                    if m["type"] == PLAINTEXT and m["status"] == "active" and m.get("text")}
            plan = Plan()
            if request.adapter is not None:
                plan.adapter = adapters.named(snap, request.adapter, key)
            elif request.use_adapter:
                plan.adapter = adapters.choose(adapters.adapters(snap), key, set(live))
            if plan.adapter is not None:
                plan.weights = adapters.load(adapters.read(snap, plan.adapter), plan.adapter, key)
                key = adapted_key(key, plan.adapter.sha256)
            if request.activation is not None:
                plan.activation = self._named(snap, request.activation, key)
            elif request.use_activation:
                plan.activation = choose(activations(snap), key, set(live))
            if plan.activation is None:
                plan.cached = sorted(live.values(), key=lambda m: m["id"])
                return plan
            chosen = plan.activation
            holds = snap.get_many([memory_id for memory_id, _ in chosen.sources])
            plan.cached = [holds[memory_id] for memory_id, _ in chosen.sources]
            covered = {memory_id for memory_id, _ in chosen.sources}
            plan.others = sorted((m for i, m in live.items() if i not in covered), key=lambda m: m["id"])
            plan.cache = self._load(snap, chosen, key)
            return plan

    def _named(self, snap: Snapshot, memory_id: str, key: str) -> Candidate:
        mem = snap.get_many([memory_id]).get(memory_id)
        if mem is None or mem["status"] == "deleted":
            raise NotFound(f"no activation memory {memory_id} in cube {snap.cube.name!r}", memory=memory_id)
        if mem["type"] != NAME:
            raise InvalidRequest(f"memory {memory_id} is a {mem['type']} memory, not an activation memory",
                                 field="activation")
        if mem["status"] != "active":
            raise Conflict(f"activation memory {memory_id} is {mem['status']}", memory=memory_id)
        c = candidate(snap, mem)
        if c.model != key:
            raise ModelMismatch(f"activation memory {memory_id} was built by model {c.model or 'unknown'!r}, "
                                f"not by {key!r}", expected=key, got=c.model, memory=memory_id)
        if c.stale:
            raise Conflict(f"activation memory {memory_id} is stale: {', '.join(c.stale_sources)} changed "
                           "since it was built; activate again", memory=memory_id, stale=c.stale_sources)
        return c

    def _load(self, snap: Snapshot, chosen: Candidate, key: str) -> Any:
        """The chosen cache from its blob: sha256 checked first, then its structure and its model."""
        from memos.plugins.models.kv import KVCache

        ref = chosen.mem.get("blob") or {}
        expected = ref.get("sha256")
        data = snap.blob(expected) if isinstance(expected, str) else b""
        got = hashlib.sha256(data).hexdigest()
        if got != expected:
            log.error("activation memory blob failed its sha256 check",
                      extra={"cube": snap.cube.name, "memory": chosen.memory_id, "expected": expected, "got": got})
            raise IntegrityError(f"the KV cache of activation memory {chosen.memory_id} does not match its "
                                 "sha256: not loaded", memory=chosen.memory_id, expected=expected, got=got)
        cache = KVCache.from_safetensors(data)
        if cache.model != key:
            raise ModelMismatch(f"the KV cache of {chosen.memory_id} was made by {cache.model!r}, not {key!r}",
                                expected=key, got=cache.model, memory=chosen.memory_id)
        return cache

    def generate(self, actor: Any, cube: str, request: Request, emit: Callable[[Any], None]) -> dict[str, Any]:
        if request.activation is not None and not request.use_activation:
            raise InvalidRequest("an activation memory was named but use_activation is false", field="activation")
        if request.adapter is not None and not request.use_adapter:
            raise InvalidRequest("a parameter memory was named but use_adapter is false", field="adapter")
        cube_name = self.services.check_role(actor, cube, "read", "generate").name
        name, identity = self.registry.identity(request.model)
        k = self.settings.retrieve_k if request.k is None else request.k
        retrieved = self.retrieve(actor, cube_name, request.prompt, k)
        plan = self.plan(actor, cube_name, identity.key, retrieved, request)
        used = [m["id"] for m in (*plan.cached, *plan.others)]
        for chosen in (plan.activation, plan.adapter):
            if chosen is not None:
                used.append(chosen.memory_id)
        self.services.record_reads(cube_name, used)

        messages = preamble.chat([m["text"] for m in plan.cached], [m["text"] for m in plan.others], request.prompt)
        with self.registry.generating(name) as lm, lm.adapter(plan.weights):
            ids = lm.chat_ids(messages)
            cache = plan.cache
            if cache is not None:
                start = cache.ids if cache.ids is not None else lm.chat_ids(
                    preamble.preamble_messages([m["text"] for m in plan.cached]), add_generation_prompt=False)
                if ids[:cache.tokens] != list(start) or len(ids) <= cache.tokens:
                    raise Conflict(f"the cached preamble of {plan.activation.memory_id} does not start this "
                                   "chat's tokens; activate again", memory=plan.activation.memory_id)
                ids = ids[cache.tokens:]
            gen = lm.generate(ids, cache, request.max_tokens or self.settings.max_new_tokens,
                              temperature=request.temperature, top_p=request.top_p, seed=request.seed,
                              stop=request.stop or (), on_token=lambda piece: emit({"text": piece}))
            key = lm.identity.key
        how = "cache" if cache is not None else "prompt"
        memories = [{"memory_id": m["id"], "version": m["version"], "type": m["type"], "how": how}
                    for m in plan.cached]
        memories += [{"memory_id": m["id"], "version": m["version"], "type": m["type"], "how": "prompt"}
                     for m in plan.others]
        if plan.activation is not None:
            memories.insert(0, {"memory_id": plan.activation.memory_id, "version": plan.activation.version,
                                "type": NAME, "how": "cache"})
        if plan.adapter is not None:
            memories.insert(0, {"memory_id": plan.adapter.memory_id, "version": plan.adapter.version,
                                "type": "parameter", "how": "adapter"})
        return {"text": gen.text, "model": key, "model_name": name,
                "activation": plan.activation.memory_id if plan.activation is not None else None,
                "adapter": plan.adapter.memory_id if plan.adapter is not None else None,
                "memories": memories,
                "timings": {"ttft_s": gen.ttft_s, "total_s": gen.total_s, "prefill_tokens": gen.prefill_tokens,
                            "cached_tokens": gen.cached_tokens, "tokens": gen.tokens},
                "stopped": gen.stopped}

    def info(self, c: Candidate) -> dict[str, Any]:
        metadata = c.mem.get("metadata") or {}
        blob = c.mem.get("blob") or {}
        adapter = metadata.get("adapter")
        return {"memory_id": c.memory_id, "version": c.version, "model": c.model,
                "model_name": str(metadata.get("model_name", (metadata.get("model") or {}).get("name", ""))),
                "adapter": adapter.get("memory_id") if isinstance(adapter, dict) else None,
                "tokens": int(metadata.get("tokens", 0)), "dtype": str(metadata.get("dtype", "")),
                "size": int(blob.get("size", 0)),
                "sources": [{"memory_id": i, "version": v} for i, v in c.sources],
                "stale": c.stale, "stale_sources": c.stale_sources, "created_at": c.mem["created_at"]}
