"""Activation memory: KV caches of a real model, and memory-augmented generation (``activation``).

An activation memory is the KV cache a model computed for a *memory
preamble* (:mod:`.preamble`): a system message listing plaintext memories,
in the model's chat template. It is stored as a safetensors blob (never a
pickle) with the identity of the model that made it, its token count, its
dtype and its provenance (the plaintext memories and their versions). The
type adds to what the core stores:

* ``activate``: a job that builds one (:mod:`.building`);
* ``activations``: a cube's activation memories, stale or not;
* ``generate``: answers a prompt from a cube's memories, injecting the best
  fitting activation memory as the cache prefix, streaming the text
  (:mod:`.generation`);
* ``model_list``, ``model_add``, ``model_prepare``: the models
  (:mod:`.registry`), configured in ``[activation]`` or added at run time
  into the ``models`` sub-database.

This module stays light: importing it loads neither torch nor transformers;
a model is loaded on its first use. docs/activation.md is the full account.
"""

from __future__ import annotations

import logging
from typing import Any

from memos.errors import Conflict, Denied, InvalidRequest, Unavailable
from memos.memtypes import Item, MemoryType, Services
from memos.plugins.models import ModelIdentity, ModelSpec
from memos.validation import Limits

from . import preamble
from .ops import OPERATIONS, ActivateArgs, ActivationInfo, GenerateArgs, Generated, ModelEntry, ModelInfo
from .settings import ActivationSettings

log = logging.getLogger("memos.activation")

__all__ = ["ActivateArgs", "Activation", "ActivationInfo", "ActivationSettings", "GenerateArgs", "Generated",
           "ModelEntry", "ModelInfo"]

_DTYPES = ("float32", "bfloat16")


class Activation(MemoryType):
    """KV caches of plaintext memories, injected into generation."""

    name = "activation"
    databases = {"models": "model name -> ModelSpec (JSON) added with model_add"}
    operations = OPERATIONS
    settings_model = ActivationSettings
    config_section = "activation"

    def __init__(self) -> None:
        self._registry: Any = None
        self._builder: Any = None
        self._generator: Any = None

    # -- the contract ---------------------------------------------------

    def validate(self, item: Item, limits: Limits) -> None:
        if not item.has_blob:
            raise InvalidRequest("an activation memory needs its KV cache as a blob", field="blob")
        if item.blob is not None and item.media_type != preamble.MEDIA_TYPE:
            raise InvalidRequest(f"an activation memory's blob has media type {preamble.MEDIA_TYPE!r}",
                                 field="media_type")
        meta = item.metadata
        if meta.get("format") != preamble.FORMAT:
            raise InvalidRequest(f"an activation memory needs metadata format {preamble.FORMAT}", field="metadata")
        try:
            ModelIdentity.model_validate(meta.get("model"))
        except ValueError:
            raise InvalidRequest("an activation memory needs metadata model: the identity of the model that "
                                 "made it", field="metadata") from None
        tokens = meta.get("tokens")
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise InvalidRequest("an activation memory needs metadata tokens: a positive integer", field="metadata")
        if meta.get("dtype") not in _DTYPES:
            raise InvalidRequest(f"an activation memory needs metadata dtype, one of {list(_DTYPES)}",
                                 field="metadata")
        sha = meta.get("preamble_sha256")
        if not (isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)):
            raise InvalidRequest("an activation memory needs metadata preamble_sha256: a sha256 hex digest",
                                 field="metadata")

    def start(self, services: Services) -> None:
        from .building import Builder
        from .generation import Generator
        from .registry import Registry

        super().start(services)
        settings = services.settings
        if not isinstance(settings, ActivationSettings):
            settings = ActivationSettings.model_validate(settings.model_dump() if settings is not None else {})
        self._registry = Registry(services, settings)
        self._builder = Builder(services, settings, self._registry)
        self._generator = Generator(services, settings, self._registry)

    def stop(self) -> None:
        """Cancel the builds still running (each stops at its next chunk)."""
        if self._builder is not None:
            self._builder.stop()

    def close(self) -> None:
        if self._registry is not None:
            self._registry.forget()

    # -- operations -----------------------------------------------------

    def model_list(self, actor: Any) -> list[ModelInfo]:
        registry = self._started()[0]
        return [registry.info(name, spec, source) for name, (spec, source) in registry.specs().items()]

    def model_add(self, actor: Any, name: str, path: str, backend: str = "transformers", dtype: str = "float32",
                  threads: int | None = None, description: str = "", request_id: str | None = None) -> Any:
        registry = self._started()[0]
        spec = ModelSpec(backend=backend, path=path, dtype=dtype, threads=threads,  # type: ignore[arg-type]
                         description=description)
        configured = set(registry.settings.models)

        def fn(rows: Any) -> ModelEntry:
            # Checked inside the commit: the refusal is audited once, like every write's.
            if not getattr(actor, "admin", False):
                raise Denied("only the local administrator adds models", op="model_add")
            if name in configured:
                raise Conflict(f"model {name!r} is configured in memosd.toml; choose another name", model=name)
            if path != "prepared" and not path.startswith("/"):
                raise InvalidRequest("path must be an absolute folder, or 'prepared'", field="path")
            rows.put("models", name.encode(), spec.model_dump_json().encode())
            return {"name": name, "spec": spec.model_dump(mode="json")}  # type: ignore[typeddict-item]

        return self.services.own_write(actor, "model_add", None, fn, request_id)

    def model_prepare(self, actor: Any, name: str) -> Any:
        from memos.plugins.models.prepare import SOURCES, prepare

        self._started()

        def check(rows: Any) -> None:
            if not getattr(actor, "admin", False):
                raise Denied("only the local administrator prepares models", op="model_prepare")

        self.services.submit(self.services.own_write(actor, "model_prepare", None, check))  # audited either way
        if name not in SOURCES:
            raise InvalidRequest(f"no model named {name!r} can be prepared; known: {sorted(SOURCES)}", field="name")

        def work(progress: Any) -> str:
            progress.check()
            folder = prepare(name)
            progress.advance(1, folder=str(folder))
            return str(folder)

        job, _ = self.services.jobs.run(self.services.executor, "model_prepare", None, 1, work,
                                        detail={"model": name})
        return job.to_wire()

    def activate(self, actor: Any, cube: str, ids: list[str] | None = None, tag: str | None = None,
                 model: str | None = None, adapter: str | None = None) -> Any:
        return self._started()[1].start(actor, cube, ids, tag, model, adapter)

    def activations(self, actor: Any, cube: str) -> list[ActivationInfo]:
        from .generation import activations

        generator = self._started()[2]
        with self.services.snapshot(actor, cube, op="activations") as snap:
            return [generator.info(c) for c in activations(snap)]

    def generate(self, actor: Any, cube: str, prompt: str, model: str | None = None, activation: str | None = None,
                 use_activation: bool = True, adapter: str | None = None, use_adapter: bool = True,
                 k: int | None = None, max_tokens: int | None = None, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None, stop: list[str] | None = None, emit: Any = None) -> Generated:
        from .generation import Request

        request = Request(prompt, model, activation, use_activation, adapter, use_adapter, k, max_tokens,
                          temperature, top_p, seed, stop)
        return self._started()[2].generate(actor, cube, request, emit or (lambda part: None))

    def _started(self) -> tuple[Any, Any, Any]:
        if self._registry is None:
            raise Unavailable("activation memory has not been started")
        return self._registry, self._builder, self._generator
