"""Configuration, result and error types of the retrieval engine."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Hit:
    id: str
    score: float     # fused score (z units)
    lexical: float   # raw contextual BM25
    dense: float     # window-smoothed cosine


@dataclass
class RetrievalConfig:
    # Window weights for offsets 0, 1, 2 within a group: (1, .5), (1, .6, .3, .15) are within ~1 point.
    window: tuple[float, ...] = (1.0, 0.5, 0.25)
    dense_weight: float = 1.0     # z(dense) weight; flat between 0.7 and 1.5 on LoCoMo
    speaker_boost: float = 2.0    # z units; 2-3 equivalent, 0 loses ~2 points of recall@10
    k1: float = 1.2               # BM25; k1 0.9-2 and b 0.5-0.9 are all within 0.6 points
    b: float = 0.75
    ann_threshold: int = 50_000   # from this many docs on, dense candidates come from HNSW
    candidates: int = 200         # dense candidates taken from the ANN index
    lexical_candidates: int = 200  # lexical candidates taken from the inverted index
    stats_sample: int = 256       # rows sampled to estimate mean/std of the dense score in candidate mode
    # HNSW graph: on clustered synthetic data at 100k docs, recall@10 within the 200 candidates is
    # 0.86 for M 16 / ef_construction 64, 0.975 for 16/128, 0.994 for 24/128 (bench/search.py).
    hnsw_m: int = 24              # HNSW connectivity ("M")
    hnsw_ef_construction: int = 128
    hnsw_ef_search: int = 200     # >= candidates (usearch searches with max(ef, count) anyway)
    # Storage of the ANN copy of the vectors (candidates are rescored with the float32 ones). At 100k
    # (bench corpus, M 24 / ef 128, 200 candidates): i8 searches in 1.1 ms and builds in 16 s with
    # candidate recall@10 0.983; f16 2.3 ms / 33 s / 0.991; f32 3.0 ms / 51 s / 0.987.
    hnsw_dtype: str = "i8"
    threads: int = 0              # threads for bulk ANN insertion (0 = all cores)

    def __post_init__(self) -> None:
        self.window = tuple(float(w) for w in self.window)
        if not self.window or self.window[0] <= 0 or any(w < 0 for w in self.window):
            raise ValueError("window must start with a positive weight and have no negative weights")
        if self.ann_threshold < 1 or self.candidates < 1 or self.lexical_candidates < 1 or self.stats_sample < 2:
            raise ValueError("ann_threshold, candidates, lexical_candidates must be >= 1, stats_sample >= 2")


class IndexCorruptError(ValueError):
    """A saved index is missing, truncated, corrupt or of an unknown format."""
