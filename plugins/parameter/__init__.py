"""Parameter memory: LoRA adapters distilled from memories, fused, and used in generation (``parameter``).

A parameter memory is a LoRA adapter of one base model, trained on plaintext
memories so that the model answers from them without them in the prompt. It
is stored as a safetensors blob (never a pickle) with the identity of its
base model, its shape (rank, alpha, target modules), the memories it learnt
(``facts``, with their versions), its provenance and its training report. The
type adds to what the core stores:

* ``distill``: a job that trains one (:mod:`.distilling`, :mod:`.trainer`);
* ``fuse``: a job that merges several into a new one;
* ``adapters``: a cube's parameter memories, stale or not.

``generate`` (the activation type's) loads a cube's adapter onto the base
model (:mod:`.adapters` chooses it). Importing this module imports neither
torch nor transformers. docs/parameter.md is the full account.
"""

from __future__ import annotations

from typing import Any

from memos.errors import InvalidRequest, Unavailable
from memos.memtypes import Item, MemoryType, Services
from memos.plugins.models import ModelIdentity
from memos.validation import Limits

from . import adapters
from .ops import OPERATIONS, AdapterInfo, AdaptersArgs, DistillArgs, FuseArgs
from .settings import ParameterSettings

__all__ = ["AdapterInfo", "AdaptersArgs", "DistillArgs", "FuseArgs", "Parameter", "ParameterSettings"]


class Parameter(MemoryType):
    """LoRA adapters of a base model, distilled from plaintext memories."""

    name = "parameter"
    operations = OPERATIONS
    settings_model = ParameterSettings
    config_section = "parameter"

    def __init__(self) -> None:
        self._distiller: Any = None

    # -- the contract ---------------------------------------------------

    def validate(self, item: Item, limits: Limits) -> None:
        if not item.has_blob:
            raise InvalidRequest("a parameter memory needs its adapter as a blob", field="blob")
        if item.blob is not None and item.media_type != adapters.MEDIA_TYPE:
            raise InvalidRequest(f"a parameter memory's blob has media type {adapters.MEDIA_TYPE!r}",
                                 field="media_type")
        meta = item.metadata
        if meta.get("format") != adapters.FORMAT:
            raise InvalidRequest(f"a parameter memory needs metadata format {adapters.FORMAT}", field="metadata")
        try:
            ModelIdentity.model_validate(meta.get("model"))
        except ValueError:
            raise InvalidRequest("a parameter memory needs metadata model: the identity of its base model",
                                 field="metadata") from None
        rank = meta.get("rank")
        if type(rank) is not int or rank < 1:
            raise InvalidRequest("a parameter memory needs metadata rank: a positive integer", field="metadata")
        targets = meta.get("target_modules")
        if not (isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
            raise InvalidRequest("a parameter memory needs metadata target_modules: module names",
                                 field="metadata")
        facts = meta.get("facts")
        if not isinstance(facts, list) or len(adapters.facts_of(meta)) != len(facts):
            raise InvalidRequest("a parameter memory needs metadata facts: the memories it learnt, each a "
                                 "memory_id and a version", field="metadata")

    def start(self, services: Services) -> None:
        from .distilling import Distiller

        super().start(services)
        settings = services.settings
        if not isinstance(settings, ParameterSettings):
            settings = ParameterSettings.model_validate(settings.model_dump() if settings is not None else {})
        self._distiller = Distiller(services, settings)

    def stop(self) -> None:
        """Cancel the jobs still running: their training processes are killed, nothing is added."""
        if self._distiller is not None:
            self._distiller.stop()

    # -- operations -----------------------------------------------------

    def distill(self, actor: Any, cube: str, ids: list[str] | None = None, tag: str | None = None,
                model: str | None = None, recipe: Any = None) -> Any:
        return self._started().distill(actor, cube, ids, tag, model, recipe)

    def fuse(self, actor: Any, cube: str, ids: list[str], weights: list[float] | None = None,
             combination: str = "linear", density: float | None = None, svd_rank: int | None = None) -> Any:
        return self._started().fuse(actor, cube, ids, weights, combination, density, svd_rank)

    def adapters(self, actor: Any, cube: str) -> list[AdapterInfo]:
        self._started()
        with self.services.snapshot(actor, cube, op="adapters") as snap:
            return [adapters.info(c) for c in adapters.adapters(snap)]  # type: ignore[misc]

    def _started(self) -> Any:
        if self._distiller is None:
            raise Unavailable("parameter memory has not been started")
        return self._distiller
