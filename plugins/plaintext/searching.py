"""Answering a search: the query embedded beside the lexical scoring, filters, past versions.

Now: the cube's live index, once it reflects the version the search read
(read-your-writes). The index ranks ids only; the memories (and so the
filters: status, tags, time, metadata) are read from the store. Filters are
applied to an oversampled ranking first (``oversample`` candidates per
wanted hit), a page at a time; only when that falls short is every memory
that passes the filters scored (``allow``).

At a past version: an index of the cube as it was, built from the store on
first use and kept for the next few queries (a past version never changes).
Building one costs time and memory in proportion to the cube, so it is
bounded: a cube that held more than ``[limits] max_past_search_memories``
searchable memories at that version is refused (``too_large``), and at most
``[limits] past_search_builds`` such indexes are built at once (more get
``unavailable``: retry shortly).

The query is embedded on a small pool of its own while the index computes
the lexical half, so most of the embedding's time is hidden.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import replace
from typing import Any

import numpy as np

from memos import validation as check
from memos.errors import InvalidRequest, TooLarge, Unavailable
from memos.memtypes import Services, Snapshot

from .indexes import Indexes, doc, searchable
from .retrieval import Hit, HybridIndex
from .settings import SearchSettings
from .vectors import NAME, Vectors

# Indexes of past versions kept for the queries that follow the first: at most this many, holding
# at most this many memories together (~5 kB each in an exact index, plus the records).
_PAST_INDEXES = 4
_PAST_DOCS = 50_000

_STATUSES = {"active": {"active"}, "archived": {"archived"}, "all": {"active", "archived"}}

Filter = Callable[[dict[str, Any]], bool]


def make_filter(status: str, tags: Any, since: float | None, until: float | None,
                metadata: dict[str, Any] | None) -> Filter:
    """The search's filters, as a test of a memory in plain form (or its filtered fields)."""
    if status not in _STATUSES:
        raise InvalidRequest("status must be 'active', 'archived' or 'all'", field="status")
    statuses = _STATUSES[status]
    wanted = set(tags or ())
    meta = dict(metadata or {})

    def keep(m: dict[str, Any]) -> bool:
        return (m["status"] in statuses
                and wanted.issubset(m["tags"])
                and (since is None or m["created_at"] >= since)
                and (until is None or m["created_at"] < until)
                and all(m["metadata"].get(k) == v for k, v in meta.items()))

    return keep


def _fields(mem: Any) -> dict[str, Any]:
    """What the filters read of a Memory model, without dumping all of it."""
    return {"status": str(mem.status), "tags": mem.tags, "created_at": mem.created_at, "metadata": mem.metadata}


class Searcher:
    def __init__(self, services: Services, settings: SearchSettings, vectors: Vectors, indexes: Indexes) -> None:
        self.services = services
        self.settings = settings
        self.vectors = vectors
        self.indexes = indexes
        # Query embeddings run here while the searching thread scores words.
        self._queries = ThreadPoolExecutor(2, thread_name_prefix="memosd-query")
        self._past: OrderedDict[tuple[Any, ...], tuple[HybridIndex, dict[str, dict[str, Any]]]] = OrderedDict()
        self._lock = threading.Lock()
        self._builds = threading.BoundedSemaphore(services.limits.past_search_builds)

    def stop(self) -> None:
        self._queries.shutdown(wait=True)

    def search(self, actor: Any, cube: str, query: str, k: int = 10, at: int | None = None,
               tags: list[str] | None = None, status: str = "active", since: float | None = None,
               until: float | None = None, metadata: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """The ``k`` best memories of ``cube`` for ``query`` that pass the filters, best first."""
        with ExitStack() as held:  # a past-version build this search holds, released when it ends
            with self.services.snapshot(actor, cube, op="search", at=at) as snap:  # access check, audited on denial
                if not isinstance(query, str) or not query.strip():
                    raise InvalidRequest("query is empty", field="query")
                limits = self.services.limits
                # Each filter is tested against every candidate: its size is bounded like a memory's own.
                if tags is not None and len(tags) > limits.max_tags:
                    raise TooLarge(f"{len(tags)} tags exceed the limit of {limits.max_tags}", field="tags",
                                   limit=limits.max_tags)
                if metadata is not None:
                    check.metadata(metadata, limits)
                keep = make_filter(status, tags, since, until, metadata)
                model = self.vectors.model  # Unavailable now rather than inside the index
                version = snap.version
                key: tuple[Any, ...] = (cube, version, model.identity)
                past = found = None
                if at is not None:
                    past = self._kept(key)
                    if past is None:  # refused here, inside the snapshot, so that the refusal is audited
                        if not self._builds.acquire(blocking=False):
                            raise Unavailable(
                                f"{limits.past_search_builds} searches of past versions are being indexed; "
                                "retry shortly", cube=cube, limit=limits.past_search_builds)
                        held.callback(self._builds.release)
                        found = self._past_memories(snap, limits.max_past_search_memories)
                try:
                    embedding = self._queries.submit(self.vectors.embed, [query])
                except RuntimeError:  # stopped: the daemon is shutting down
                    raise Unavailable("memosd is shutting down") from None

            def qvec() -> np.ndarray:  # the index asks once its lexical scores are done
                return embedding.result()[0]

            if at is not None:
                if past is None:
                    past = self._past_version(key, found or [])
                index, mems = past
                allow = {i for i, m in mems.items() if keep(m)}
                hits = index.search(query, qvec, k, allow=allow)
            else:
                index = self.indexes.index_for(cube, version)
                hits, mems = self._filtered(actor, cube, index, query, qvec, k, keep)
        results = [{"memory": mems[h.id], "score": h.score, "lexical": h.lexical, "dense": h.dense}
                   for h in hits if h.id in mems][:k]
        self.services.record_reads(cube, [r["memory"]["id"] for r in results])
        return results

    # -- past versions --------------------------------------------------------

    @staticmethod
    def _past_memories(snap: Snapshot, most: int) -> list[Any]:
        """The searchable memories of a past version; ``too_large`` as soon as there are more than ``most``."""
        found = []
        for m in snap.memories(type=NAME):
            if searchable(m):
                found.append(m)
                if len(found) > most:
                    raise TooLarge(
                        f"cube {snap.cube.name!r} held more than {most} searchable memories at version "
                        f"{snap.version}, more than a search at a past version indexes: search it as it is "
                        "now (without at), read that version with list (at=, paged), or raise "
                        "[limits] max_past_search_memories", field="at", cube=snap.cube.name, limit=most)
        return found

    def _kept(self, key: tuple[Any, ...]) -> tuple[HybridIndex, dict[str, dict[str, Any]]] | None:
        with self._lock:
            cached = self._past.get(key)
            if cached is not None:
                self._past.move_to_end(key)
            return cached

    def _past_version(self, key: tuple[Any, ...], found: list[Any]) -> tuple[HybridIndex, dict[str, dict[str, Any]]]:
        """An index of the searchable memories ``found`` at a past version, and those memories.

        Built from the store on first use, which is O(n). A past version never
        changes, so the last few are kept: whoever searches one past state
        usually asks more than one question of it. The key names the embedder
        too: its vectors are the index's.
        """
        # Every query of a past version is scored exactly (it passes ``allow``): no HNSW graph to build.
        index = HybridIndex(self.vectors.model.dim, replace(self.indexes.config(), ann_threshold=1 << 62))
        docs = [doc(m) for m in found]
        if docs:
            index.upsert(docs, self.vectors.vectors_for([d.key for d in docs], cube=key[0]))
        built = (index, {m.id: m.model_dump(mode="json") for m in found})
        if len(docs) <= _PAST_DOCS:
            with self._lock:
                self._past[key] = built
                while len(self._past) > _PAST_INDEXES or sum(len(i) for i, _ in self._past.values()) > _PAST_DOCS:
                    self._past.popitem(last=False)
        return built

    # -- now ------------------------------------------------------------------

    def _filtered(self, actor: Any, cube: str, index: HybridIndex, query: str, qvec: Callable[[], np.ndarray],
                  k: int, keep: Filter) -> tuple[list[Hit], dict[str, dict[str, Any]]]:
        """Best hits that pass the filters: oversample first, scan only when that falls short."""
        want = k * self.settings.oversample
        hits = index.search(query, qvec, want)
        passing: list[Hit] = []
        mems: dict[str, dict[str, Any]] = {}
        with self.services.snapshot(actor, cube, op="search") as snap:
            for start in range(0, len(hits), k):  # read k at a time: most searches need only the first k
                page = snap.get_many([h.id for h in hits[start:start + k]])
                mems.update(page)
                passing += [h for h in hits[start:start + k] if h.id in page and keep(page[h.id])]
                if len(passing) >= k:
                    return passing, mems
            if len(hits) < want:
                return passing, mems
            allow = {m.id for m in snap.memories(type=NAME) if searchable(m) and keep(_fields(m))}
            hits = index.search(query, qvec, k, allow=allow)
            return hits, snap.get_many([h.id for h in hits])
