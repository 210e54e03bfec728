"""Plaintext memories and their hybrid (dense + BM25) search: the ``plaintext`` memory type.

A plaintext memory is a text, with tags and metadata; its search key is the
text with the metadata's speaker, date and caption (``key_text``). The type
adds to what the core stores:

* the ``vectors`` sub-database: each search key's embedding, written with
  the memory itself (:meth:`Plaintext.prepare`), see :mod:`.vectors`;
* one search index per cube, kept after commits, saved in the type's state
  folder and rebuilt as a job when stale, see :mod:`.indexes`;
* the operations ``search``, ``reindex`` and ``embedder``, see
  :mod:`.searching` and :mod:`.ops`. The ranking itself is the engine in
  :mod:`.retrieval` (docs/retrieval.md).

This module stays light: importing it (to list types, validate items, read
the settings or the operations) loads no model, no numpy engine and no
usearch; :meth:`Plaintext.start` imports them.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from memos.errors import InvalidRequest, Unavailable
from memos.memtypes import Item, MemoryType, Pending, Services
from memos.validation import Limits

from .ops import OPERATIONS, EmbedderInfo, ReindexArgs, ReindexStarted, SearchArgs
from .settings import SearchSettings

if TYPE_CHECKING:
    from .indexes import Indexes
    from .searching import Searcher
    from .vectors import Vectors

__all__ = ["EmbedderInfo", "Plaintext", "ReindexArgs", "ReindexStarted", "SearchArgs", "SearchSettings"]


class Plaintext(MemoryType):
    """Texts, searchable by meaning and by words."""

    name = "plaintext"
    databases = {"vectors": "embedder identity hash + sha256 of a search key -> float32 vector"}
    operations = OPERATIONS
    prepares = frozenset({"add", "add_many", "update"})
    settings_model = SearchSettings
    config_section = "search"

    def __init__(self) -> None:
        self._vectors: Vectors | None = None
        self._indexes: Indexes | None = None
        self._searcher: Searcher | None = None
        self.booted: Future | None = None  # done once the embedder and the saved indexes are loaded

    # -- the contract ---------------------------------------------------

    def validate(self, item: Item, limits: Limits) -> None:
        if item.text is None:
            raise InvalidRequest("text is required for a plaintext memory", field="text")
        if not item.text.strip():
            raise InvalidRequest("text is empty", field="text")

    def start(self, services: Services) -> None:
        """Start the indexer; load the embedder, then every cube's index, on the model executor."""
        from .indexes import Indexes
        from .searching import Searcher
        from .vectors import Vectors

        super().start(services)
        settings = services.settings
        if not isinstance(settings, SearchSettings):
            settings = SearchSettings.model_validate(settings.model_dump() if settings is not None else {})
        self._vectors = Vectors(services, settings)
        self._indexes = Indexes(services, settings, self._vectors)
        self._searcher = Searcher(services, settings, self._vectors, self._indexes)
        if self._vectors.enabled:
            self._indexes.start()
        else:  # search is off: nothing to embed, so writes go straight to the writer
            self.prepares = frozenset()
        self.booted = services.executor.submit(self._boot)

    def _boot(self) -> None:
        assert self._vectors is not None and self._indexes is not None
        if self._vectors.load():
            self._indexes.open_all()

    def prepare(self, pending: Sequence[Pending]) -> None:
        if self._vectors is not None:  # not started: vectors are made when an index is built
            self._vectors.prepare(pending)

    def after_commit(self, cube: str, version: int, memory_ids: Sequence[str]) -> None:
        if self._indexes is not None:
            self._indexes.after_commit(cube, version, memory_ids)

    def stop(self) -> None:
        """Stop query embedding and index builds (the writer is fed by the daemon's prepare stage)."""
        if self._searcher is not None:
            self._searcher.stop()
        if self._indexes is not None:
            self._indexes.stop()

    def close(self) -> None:
        """Apply the last commits to the indexes and save them into the state folder."""
        if self._indexes is not None:
            self._indexes.close()

    # -- operations -----------------------------------------------------

    def search(self, actor: Any, cube: str, query: str, k: int = 10, at: int | None = None,
               tags: list[str] | None = None, status: str = "active", since: float | None = None,
               until: float | None = None, metadata: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """The ``k`` memories of ``cube`` that best match ``query`` and pass the filters (SearchHit's plain form)."""
        return self._started()[2].search(actor, cube, query, k=k, at=at, tags=tags, status=status,
                                         since=since, until=until, metadata=metadata)

    def reindex(self, actor: Any, cube: str) -> ReindexStarted:
        """Rebuild ``cube``'s index from the store as a job (cube admin); the job, started or already running."""
        vectors, indexes, _ = self._started()
        self.services.check_role(actor, cube, "admin", op="reindex")
        vectors.model  # noqa: B018  (Unavailable while there is no embedder)
        job = indexes.reindex(cube)
        return {"cube": cube, "started": True, "job": job.id}

    def embedder_info(self, actor: Any) -> EmbedderInfo:
        """The embedder's name, identity and dimension, for clients that send their own vectors."""
        model = self._started()[0].model
        return {"name": model.name, "identity": model.identity, "dim": model.dim}

    def _started(self) -> tuple[Vectors, Indexes, Searcher]:
        if self._vectors is None or self._indexes is None or self._searcher is None:
            raise Unavailable("plaintext search has not been started")
        return self._vectors, self._indexes, self._searcher
