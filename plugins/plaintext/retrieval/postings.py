"""Posting list of one term in the contextual BM25 inverted index."""
from __future__ import annotations

import numpy as np


class _Posting:
    """Append-only (row, generation, contextual tf) entries of one term."""

    __slots__ = ("rows", "gens", "tf", "size")

    def __init__(self) -> None:
        self.rows = np.empty(4, np.int32)
        self.gens = np.empty(4, np.uint32)
        self.tf = np.empty(4, np.float32)
        self.size = 0

    def extend(self, rows: np.ndarray, gens: np.ndarray, tf: np.ndarray, row_gen: np.ndarray) -> None:
        k = len(rows)
        if self.size + k > len(self.rows):
            self.drop_stale(row_gen)
            if self.size + k > len(self.rows) // 2:
                cap = max(4, 2 * (self.size + k))
                for name in ("rows", "gens", "tf"):
                    old = getattr(self, name)
                    new = np.empty(cap, old.dtype)
                    new[: self.size] = old[: self.size]
                    setattr(self, name, new)
        s = self.size
        self.rows[s: s + k] = rows
        self.gens[s: s + k] = gens
        self.tf[s: s + k] = tf
        self.size = s + k

    def drop_stale(self, row_gen: np.ndarray) -> None:
        s = self.size
        if not s:
            return
        keep = row_gen[self.rows[:s]] == self.gens[:s]
        m = int(keep.sum())
        if m < s:
            for name in ("rows", "gens", "tf"):
                arr = getattr(self, name)
                arr[:m] = arr[:s][keep]
            self.size = m

    def live(self, row_gen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        s = self.size
        rows = self.rows[:s]
        keep = row_gen[rows] == self.gens[:s]
        return rows[keep], self.tf[:s][keep]
