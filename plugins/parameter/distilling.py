"""Distillation and fusion jobs: choose the memories, run the training process, add the parameter memory.

The memories are chosen and read when ``distill`` (or ``fuse``) is asked,
with the caller's write role; the model work runs as a job on the type's own
threads, one job per model at a time (others wait), in the training process
(:mod:`.process`). The memory is added as the caller once the adapter is
complete and checked: a job cancelled or failed at any moment adds nothing.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pydantic import ValidationError

from memos.errors import ConfigError, IntegrityError, InvalidRequest, NotFound, TooLarge, UnknownOperation
from memos.jobs import JobGroup, Progress
from memos.memtypes import Services
from memos.plugins.activation.building import select
from memos.plugins.models.recipe import Recipe

from . import adapters, process
from .examples import example
from .settings import ParameterSettings

log = logging.getLogger("memos.parameter")


class Distiller:
    """Starts and runs distillations and fusions; cancels them at shutdown."""

    def __init__(self, services: Services, settings: ParameterSettings) -> None:
        self.services = services
        self.settings = settings
        self.group = JobGroup(services.jobs)
        self.executor = ThreadPoolExecutor(settings.concurrent_jobs, thread_name_prefix="memosd-distill")
        self._lock = threading.Lock()
        self._models: dict[str, threading.Lock] = {}  # one job per model at a time
        # Work folders of jobs a killed daemon left behind (their processes exit with it).
        shutil.rmtree(services.state_dir / "work", ignore_errors=True)

    # -- requests ------------------------------------------------------------

    def model(self, actor: Any, model: str | None) -> dict[str, Any]:
        """The model's ``model_list`` entry (the default model's if None): served by the activation type."""
        try:
            entries = self.services.call("model_list", actor)
        except UnknownOperation:
            raise ConfigError("parameter memory needs the models of the activation type, which is not "
                              "installed") from None
        for entry in entries:
            if entry["name"] == model or (model is None and entry["default"]):
                if entry["error"] is not None or entry["identity"] is None:
                    raise ConfigError(f"model {entry['name']!r} cannot be used: {entry['error']}",
                                      model=entry["name"])
                return entry
        raise NotFound(f"no model named {model!r}; known: {[e['name'] for e in entries]}", model=model)

    def recipe(self, overrides: Any) -> Recipe:
        given = overrides.model_dump(exclude_none=True) if overrides is not None else {}
        try:
            return Recipe.model_validate({**self.settings.recipe.model_dump(), **given})
        except ValidationError as exc:
            first = exc.errors()[0]
            raise InvalidRequest(f"recipe: {'.'.join(map(str, first['loc']))}: {first['msg']}",
                                 field="recipe") from None

    def distill(self, actor: Any, cube: str, ids: list[str] | None, tag: str | None, model: str | None,
                overrides: Any) -> dict[str, Any]:
        recipe = self.recipe(overrides)
        entry = self.model(actor, model)
        limit = min(self.settings.max_facts, self.services.limits.max_sources)
        with self.services.snapshot(actor, cube, op="distill", role="write") as snap:
            cube_name = snap.cube.name
            sources = select(snap, ids, tag, op="distil", most=limit)
        if len(sources) > limit:
            raise TooLarge(f"{len(sources)} memories exceed the {limit} one distillation takes", field="ids")
        examples = [example(s.text, s.metadata) for s in sources]
        facts = [{"memory_id": s.memory_id, "version": s.version} for s in sources]
        request = {"task": "train", "examples": [e.model_dump() for e in examples],
                   "recipe": recipe.model_dump(mode="json")}
        text = (f"LoRA adapter (rank {recipe.rank}, {'+'.join(recipe.target_modules)}) distilled from "
                f"{len(sources)} memories for model {entry['name']}")
        work = self._work(actor, cube_name, entry, request, facts, facts, text, None)
        return self._start("distill", cube_name, work, {"model": entry["name"], "memories": len(sources)})

    def fuse(self, actor: Any, cube: str, ids: list[str], weights: list[float] | None, combination: str,
             density: float | None, svd_rank: int | None) -> dict[str, Any]:
        if len(set(ids)) != len(ids):
            raise InvalidRequest("ids name the same parameter memory twice", field="ids")
        if weights is None:
            weights = [1.0 / len(ids)] * len(ids)
        if len(weights) != len(ids):
            raise InvalidRequest(f"{len(weights)} weights for {len(ids)} adapters", field="weights")
        with self.services.snapshot(actor, cube, op="fuse", role="write") as snap:
            cube_name = snap.cube.name
            chosen = [adapters.named(snap, memory_id, None) for memory_id in ids]
            blobs = [adapters.read(snap, c) for c in chosen]
        keys = {c.model for c in chosen}
        if len(keys) != 1:
            raise InvalidRequest(f"adapters of different models cannot be fused: {sorted(keys)}", field="ids")
        names = {str((c.mem.get("metadata") or {}).get("model_name", "")) for c in chosen}
        entry = self.model(actor, names.pop() if len(names) == 1 else None)
        if entry["identity"] != keys.pop():
            raise InvalidRequest("the adapters' base model is not the configured model of that name now",
                                 field="ids")
        facts: dict[tuple[str, int], None] = {}
        for c in chosen:
            facts.update(dict.fromkeys(c.facts))
        sources = [{"memory_id": c.memory_id, "version": c.version} for c in chosen]
        fused = {"combination": combination, "weights": weights, "density": density, "svd_rank": svd_rank}
        request = {"task": "fuse", "weights": weights, "combination": combination, "density": density,
                   "svd_rank": svd_rank}
        text = f"LoRA adapter fused ({combination}) from {len(chosen)} parameter memories for model {entry['name']}"
        work = self._work(actor, cube_name, entry, request, sources,
                          [{"memory_id": i, "version": v} for i, v in facts], text, fused, blobs)
        return self._start("fuse", cube_name, work, {"model": entry["name"], "adapters": len(chosen)})

    def stop(self) -> None:
        """Cancel the jobs still running (each kills its process) and wait for them."""
        self.group.stop()
        self.executor.shutdown(wait=True, cancel_futures=False)

    # -- jobs ----------------------------------------------------------------

    def _start(self, kind: str, cube: str, work: Callable[[Progress], str], detail: dict[str, Any]) -> dict[str, Any]:
        return self.group.run(self.executor, kind, cube, 1, work, detail=detail).to_wire()

    def _work(self, actor: Any, cube: str, entry: dict[str, Any], request: dict[str, Any],
              sources: list[dict[str, Any]], facts: list[dict[str, Any]], text: str, fused: dict[str, Any] | None,
              blobs: Sequence[bytes] = ()) -> Callable[[Progress], str]:
        name = entry["name"]

        def work(progress: Progress) -> str:
            with self._lock:
                gate = self._models.setdefault(name, threading.Lock())
            progress.advance(0, stage="waiting")
            while not gate.acquire(timeout=0.2):  # one job per model at a time
                self.group.check(progress)
            work_dir = self.services.state_dir / "work" / progress.id
            try:
                self.group.check(progress)
                work_dir.mkdir(parents=True, exist_ok=True)
                paths = []
                for i, blob in enumerate(blobs):
                    (work_dir / f"in-{i}.safetensors").write_bytes(blob)
                    paths.append(str(work_dir / f"in-{i}.safetensors"))
                out = work_dir / "adapter.safetensors"
                full = {**request, "name": name, "spec": entry["spec"], "identity": entry["identity"],
                        "out": str(out), "adapters": paths}
                if self.settings.threads is not None:
                    full["spec"] = {**full["spec"], "threads": self.settings.threads}
                progress.advance(0, stage="loading")
                identity: dict[str, Any] = {}

                def on_event(event: dict[str, Any]) -> None:
                    if event["event"] == "loaded":
                        identity.update(event["identity"])
                        progress.advance(0, stage="training" if request["task"] == "train" else "fusing")
                    elif event["event"] == "step":
                        progress.total = event["steps"] + 1
                        progress.advance(1, step=event["step"], steps=event["steps"], loss=event["loss"],
                                         kl=event["kl"])

                done = process.run(full, work_dir, self.settings.nice, self.settings.idle, on_event,
                                   lambda: self.group.stopped(progress))
                self.group.check(progress)
                blob = out.read_bytes()
                self._verify(blob, done, entry["identity"])
                metadata = {"format": adapters.FORMAT, "model": identity, "model_name": name, "rank": done["rank"],
                            "alpha": done["alpha"], "target_modules": done["target_modules"],
                            "parameters": done["parameters"], "facts": facts, "report": done["report"]}
                if fused is not None:
                    metadata["fused"] = fused
                made = self.services.add(actor, cube, text, type=adapters.NAME, blob=blob,
                                         media_type=adapters.MEDIA_TYPE, metadata=metadata, sources=sources)
            finally:
                gate.release()
                shutil.rmtree(work_dir, ignore_errors=True)
            progress.advance(1, stage="done", memory=made.id, version=made.version, size=len(blob))
            log.info("parameter memory made", extra={"cube": cube, "memory": made.id, "model": name,
                                                     "bytes": len(blob), "kind": request["task"]})
            return made.id

        return work

    @staticmethod
    def _verify(blob: bytes, done: dict[str, Any], key: str) -> None:
        """The file is the adapter the process reported, for this model, and well formed."""
        import hashlib

        from memos.plugins.models.lora import Adapter

        if hashlib.sha256(blob).hexdigest() != done.get("sha256"):
            raise IntegrityError("the adapter file does not match what the training process reported")
        Adapter.from_safetensors(blob).check(key)
