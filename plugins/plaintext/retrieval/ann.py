"""The HNSW graph (usearch) that supplies dense candidates above ``ann_threshold`` docs.

A collaborator of :class:`~.index.HybridIndex`, keyed by the index's row
numbers: the index tells it which rows are new, changed, moved or gone, and
asks it for the rows nearest a query. usearch is imported only when a graph
is first built or loaded, so small indexes never load it.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from .config import IndexCorruptError, RetrievalConfig


class AnnIndex:
    """The graph over the index's vectors, or none while the corpus is below the threshold."""

    def __init__(self, dim: int, config: RetrievalConfig) -> None:
        self.dim = dim
        self.config = config
        self.index: Any = None  # usearch.index.Index, keys = row numbers

    def _new(self) -> Any:
        from usearch.index import Index
        cfg = self.config
        return Index(ndim=self.dim, metric="ip", dtype=cfg.hnsw_dtype, connectivity=cfg.hnsw_m,
                     expansion_add=cfg.hnsw_ef_construction, expansion_search=cfg.hnsw_ef_search)

    @property
    def built(self) -> bool:
        return self.index is not None

    def sync(self, n: int, vecs: np.ndarray, new_rows: list[int], changed_rows: list[int]) -> None:
        """Follow an upsert: build the graph once ``n`` reaches the threshold, else update its rows."""
        threads = self.config.threads
        if self.index is None:
            if n >= self.config.ann_threshold:
                self.index = self._new()
                self.index.add(np.arange(n, dtype=np.uint64), vecs[:n], threads=threads)
            return
        if changed_rows:
            keys = np.array(changed_rows, np.uint64)
            self.index.remove(keys)
            self.index.add(keys, vecs[keys.astype(np.int64)], threads=threads)
        if new_rows:
            keys = np.array(new_rows, np.uint64)
            self.index.add(keys, vecs[keys.astype(np.int64)], threads=threads)

    def remove(self, row: int) -> None:
        if self.index is not None:
            self.index.remove(row)

    def rename(self, src: int, dst: int) -> None:
        """The doc of row ``src`` moved into the vacated row ``dst``."""
        if self.index is not None:
            self.index.rename(src, dst)

    def clear(self) -> None:
        self.index = None

    def search(self, query_vec: np.ndarray, count: int) -> np.ndarray:
        """Rows of the graph's ``count`` nearest neighbours of ``query_vec``."""
        if self.index is None:
            raise RuntimeError("no ANN index (corpus below ann_threshold)")
        return np.asarray(self.index.search(np.asarray(query_vec, np.float32), count).keys, np.int64)

    def save(self, path: str) -> None:
        self.index.save(path)

    def load(self, path: str, n: int) -> None:
        """Load a saved graph, which must hold exactly the ``n`` rows of the index."""
        index = self._new()
        index.load(path)
        if len(index) != n:
            raise IndexCorruptError(f"{path}: ANN index holds {len(index)} vectors, expected {n}")
        self.index = index
