"""Building an activation memory: plaintext memories -> preamble -> KV cache -> a new memory.

The memories are chosen and read when ``activate`` is asked (with the
caller's write role); the model work runs as a job on the model executor:
load the model, tokenise the preamble, prefill it a chunk at a time (progress
and cancellation between chunks, the model's lock held per chunk so that
generations interleave), serialise the cache and add the memory as the caller.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from memos.errors import InvalidRequest, NotFound, TooLarge
from memos.jobs import JobGroup, Progress
from memos.memtypes import Services, Snapshot

from . import preamble
from .registry import Registry
from .settings import ActivationSettings

log = logging.getLogger("memos.activation")

NAME = "activation"
PLAINTEXT = "plaintext"
CHUNK = 256  # tokens prefilled per step of a build
PROBE = "?"  # a question appended to check that the preamble's tokens start the whole chat's


@dataclass(frozen=True)
class Source:
    memory_id: str
    version: int
    text: str
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)


def select(snap: Snapshot, ids: list[str] | None, tag: str | None, op: str = "activate",
           most: int | None = None) -> list[Source]:
    """The active plaintext memories to build from (or distil), in id (creation) order.

    ``most``: how many one memory may be built from; more ids are refused before any is read.
    """
    if ids is not None and tag is not None:
        raise InvalidRequest("give ids or a tag, not both", field="tag")
    if ids is not None:
        if not ids:
            raise InvalidRequest("ids is empty", field="ids")
        if most is not None and len(set(ids)) > most:
            raise TooLarge(f"{len(set(ids))} memories exceed the {most} one {op} takes", field="ids", limit=most)
        found = snap.get_many(sorted(set(ids)))
        out = []
        for memory_id in sorted(set(ids)):
            mem = found.get(memory_id)
            if mem is None or mem["status"] == "deleted":
                raise NotFound(f"no memory {memory_id} in cube {snap.cube.name!r}", memory=memory_id)
            if mem["type"] != PLAINTEXT or not mem.get("text"):
                raise InvalidRequest(f"memory {memory_id} is a {mem['type']} memory, not a plaintext one",
                                     field="ids")
            if mem["status"] != "active":
                raise InvalidRequest(f"memory {memory_id} is {mem['status']}, not active", field="ids")
            out.append(Source(memory_id, mem["version"], mem["text"], mem.get("metadata") or {}))
        return out
    out = []
    for m in snap.memories(type=PLAINTEXT):
        if m.status.value == "active" and m.text and (tag is None or tag in m.tags):
            out.append(Source(m.id, m.version, m.text, m.metadata))
            if most is not None and len(out) > most:
                raise TooLarge(f"more than {most} memories{f' tagged {tag!r}' if tag else ''}: one {op} takes at "
                               f"most {most}; tag fewer, or name them with ids", field="tag" if tag else "cube",
                               limit=most)
    if not out:
        what = f" tagged {tag!r}" if tag is not None else ""
        raise InvalidRequest(f"cube {snap.cube.name!r} has no active plaintext memories{what} to {op}",
                             field="tag" if tag is not None else "cube")
    return out


def preamble_ids(model: Any, texts: list[str]) -> list[int]:
    """The preamble's token ids; InvalidRequest if a question appended would not extend them exactly."""
    ids = model.chat_ids(preamble.preamble_messages(texts), add_generation_prompt=False)
    probe = model.chat_ids(preamble.chat(texts, [], PROBE))
    if probe[:len(ids)] != ids:
        raise InvalidRequest(f"model {model.name!r}: its chat template does not continue a system turn "
                             "token for token, so a cached preamble cannot be reused", field="model")
    return ids


class Builder:
    """Starts and runs the build jobs; cancels them at shutdown."""

    def __init__(self, services: Services, settings: ActivationSettings, registry: Registry) -> None:
        self.services = services
        self.settings = settings
        self.registry = registry
        self.group = JobGroup(services.jobs)

    def start(self, actor: Any, cube: str, ids: list[str] | None, tag: str | None,
              model: str | None, adapter: str | None = None) -> dict[str, Any]:
        from memos.plugins.parameter import adapters

        name, identity = self.registry.identity(model)  # NotFound before any job starts
        with self.services.snapshot(actor, cube, op="activate", role="write") as snap:
            cube_name = snap.cube.name
            sources = select(snap, ids, tag, most=self.services.limits.max_sources)
            weights = None
            if adapter is not None:  # read and checked now: the job builds with what was asked
                chosen = adapters.named(snap, adapter, identity.key)
                weights = (chosen, adapters.load(adapters.read(snap, chosen), chosen, identity.key))
        if len(sources) > self.services.limits.max_sources:
            raise TooLarge(f"{len(sources)} memories exceed the limit of {self.services.limits.max_sources} "
                           "sources of one memory", field="ids")
        work = self._work(actor, cube_name, name, sources, weights)
        job = self.group.run(self.services.executor, "activate", cube_name, 3, work,
                             detail={"model": name, "memories": len(sources)})
        return job.to_wire()

    def stop(self) -> None:
        self.group.stop()

    def _work(self, actor: Any, cube: str, name: str, sources: list[Source],
              adapter: tuple[Any, Any] | None) -> Callable[[Progress], str]:
        settings = self.settings
        weights = adapter[1] if adapter is not None else None

        def work(progress: Progress) -> str:
            self.group.check(progress)
            lm = self.registry.get(name)
            progress.advance(1, stage="tokenize", model=lm.identity.key)
            texts = [s.text for s in sources]
            with lm.lock:
                ids = preamble_ids(lm, texts)
            if len(ids) > settings.max_cache_tokens:
                raise TooLarge(f"the preamble of {len(sources)} memories is {len(ids)} tokens; at most "
                               f"{settings.max_cache_tokens} are cached ([activation] max_cache_tokens)",
                               field="ids", tokens=len(ids), limit=settings.max_cache_tokens)
            chunks = [ids[i:i + CHUNK] for i in range(0, len(ids), CHUNK)]
            progress.total = 2 + len(chunks)
            progress.advance(0, stage="prefill", tokens=len(ids))
            cache = None
            for chunk in chunks:
                self.group.check(progress)
                with lm.lock, lm.adapter(weights):  # generations between chunks run with their own
                    cache = lm.prefill(chunk, prefix=cache)
                progress.advance(1, prefilled=cache.tokens)
            assert cache is not None
            self.group.check(progress)
            stored = cache.astype(settings.kv_dtype)
            blob = stored.to_safetensors()
            metadata = {
                "format": preamble.FORMAT,
                "model": lm.identity.model_dump(mode="json"),
                "model_name": name,
                "tokens": stored.tokens,
                "dtype": stored.dtype,
                "preamble_sha256": preamble.sha256(texts),
            }
            if adapter is not None:
                metadata["adapter"] = {"memory_id": adapter[0].memory_id, "version": adapter[0].version,
                                       "sha256": adapter[0].sha256}
            text = (f"KV cache of {len(sources)} memories ({stored.tokens} tokens, {stored.dtype}) "
                    f"for model {name}" + (f" with adapter {adapter[0].memory_id}" if adapter is not None else ""))
            made = self.services.add(actor, cube, text, type=NAME, blob=blob, media_type=preamble.MEDIA_TYPE,
                                     metadata=metadata,
                                     sources=[{"memory_id": s.memory_id, "version": s.version} for s in sources])
            progress.advance(1, stage="done", memory=made.id, version=made.version, size=len(blob))
            log.info("activation memory built", extra={"cube": cube, "memory": made.id, "model": name,
                                                       "tokens": stored.tokens, "bytes": len(blob)})
            return made.id

        return work
