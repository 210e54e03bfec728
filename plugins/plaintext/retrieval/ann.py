"""The HNSW index (usearch) that supplies dense candidates above ``ann_threshold`` docs."""
from __future__ import annotations

from typing import Any

import numpy as np

from memos.retrieval.locks import _Read


class _AnnIndex:
    """HybridIndex methods that build, update and query the ANN index (keys are row numbers)."""

    # ------------------------------------------------------------------ ANN
    def _new_ann(self) -> Any:
        from usearch.index import Index
        cfg = self.config
        return Index(ndim=self.dim, metric="ip", dtype=cfg.hnsw_dtype, connectivity=cfg.hnsw_m,
                     expansion_add=cfg.hnsw_ef_construction, expansion_search=cfg.hnsw_ef_search)

    def _ann_sync(self, new_rows: list[int], changed_rows: list[int]) -> None:
        if self._ann is None:
            if self._n >= self.config.ann_threshold:
                self._ann = self._new_ann()
                n = self._n
                self._ann.add(np.arange(n, dtype=np.uint64), self._vecs[:n], threads=self.config.threads)
            return
        if changed_rows:
            keys = np.array(changed_rows, np.uint64)
            self._ann.remove(keys)
            self._ann.add(keys, self._vecs[keys.astype(np.int64)], threads=self.config.threads)
        if new_rows:
            keys = np.array(new_rows, np.uint64)
            self._ann.add(keys, self._vecs[keys.astype(np.int64)], threads=self.config.threads)

    def ann_search(self, query_vec: np.ndarray, count: int) -> np.ndarray:
        """Rows of the ANN's top `count` dense neighbours (for measurements)."""
        with _Read(self._lock):
            if self._ann is None:
                raise RuntimeError("no ANN index (corpus below ann_threshold)")
            m = self._ann.search(np.asarray(query_vec, np.float32), count)
            return np.asarray(m.keys, np.int64)
