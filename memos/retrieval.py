"""Hybrid retrieval engine: contextual BM25 + window-smoothed dense cosine + speaker prior.

    score(doc) = z(BM25_ctx) + dense_weight * z(cos_ctx) + speaker_boost * [doc.speaker is the one person the query names]

* BM25_ctx: BM25 over a *contextual* document per memory: its own term counts plus the counts of its
  neighbours in the same group (conversation session / thread), weighted 1, .5, .25 for offsets 0, 1, 2.
* cos_ctx: cosine(query, doc) averaged over the same window (weights renormalised over the neighbours
  that exist).
* z(.): z-normalisation of each score over the whole corpus, so the two can simply be added.
* speaker prior: when the query names exactly one known speaker (by first name), that speaker's docs
  get +speaker_boost (z units).

See docs/retrieval.md for the measurements behind each part.

Data layout (everything is indexed by a dense *row* number, 0..n-1; removal swaps the last row into
the hole so the live rows always form a prefix):

* ``_vecs``        float32 (capacity, dim) dense vectors.
* own terms         flat arrays ``_own_terms``/``_own_cnt`` + per-row offset/length (append-only;
                    garbage from replaced/removed docs is compacted when it exceeds the live part).
* ``_nb/_nbw``      neighbour table (capacity, 2R+1): neighbour rows (self where missing) and the
                    normalised window weights (0 where missing).
* postings          per term, append-only arrays (row, generation, contextual tf). A row's generation
                    is bumped whenever its contextual document is recomputed or its slot is vacated;
                    entries whose generation is not the row's current one are stale and ignored at
                    query time; a posting drops its stale entries whenever it has to grow, so stale
                    entries never exceed the live ones (amortised O(1) per append).

A change (insert, replace, remove) recomputes the contextual document of the changed rows and of their
neighbours within the window radius only; BM25 statistics (df, avgdl, N) are read at query time from
the postings and a running total of document lengths, so nothing is rebuilt.

Above ``ann_threshold`` docs, an HNSW index (usearch) supplies dense candidates, the inverted index
supplies lexical candidates, and only the union is scored exactly.
"""
from __future__ import annotations

import bisect
import functools
import json
import math
import os
import re
import shutil
import tempfile
import threading
import zlib
from dataclasses import asdict, dataclass, fields
from typing import Any, Collection, Iterable, Mapping, Sequence

import numpy as np

__all__ = [
    "Doc", "Hit", "HybridIndex", "IndexCorruptError", "RetrievalConfig", "doc_for", "key_text", "tokenize",
]

FORMAT_VERSION = 1

# ---------------------------------------------------------------------------------------------- text

# Small English stopword list (function words + chat filler). Content words are kept.
_STOP = frozenset("""a an the and or but if of to in on at by for with from about as into through over after
before between is am are was were be been being do does did doing have has had having i me my mine we us our
you your yours he him his she her hers it its they them their theirs this that these those what which who whom
whose when where why how will would can could should shall may might must not no so than too very just also
there here then up down out off s t don didn doesn isn wasn aren weren haven hasn hadn won wouldn couldn
shouldn let lets oh yeah yes hey hi wow really like get got go going gone went any some all each other more
most much many such only own same again ever im ive youre thats dont""".split())

_SUFFIXES = (("ies", "y"), ("sses", "ss"), ("ness", ""), ("ments", "ment"), ("ing", ""), ("edly", ""),
             ("ed", ""), ("ly", ""), ("es", ""), ("s", ""))
_WORD = re.compile(r"[a-z0-9]+")


@functools.lru_cache(maxsize=1 << 16)
def _stem(w: str) -> str:
    """Very light suffix stripping (first matching rule, keep >= 3 chars): paint/painting/painted."""
    for suf, rep in _SUFFIXES:
        if w.endswith(suf) and len(w) - len(suf) >= 3:
            return w[: len(w) - len(suf)] + rep
    return w


def tokenize(text: str) -> list[str]:
    """Lowercase, drop apostrophes, alphanumeric runs, stopwords removed, light stemming."""
    words = _WORD.findall(text.lower().replace("'", "").replace("\u2019", ""))
    return [_stem(w) for w in words if w not in _STOP]


def key_text(text: str, metadata: Mapping[str, Any]) -> str:
    """'(date) speaker: text [image: caption]' from metadata keys speaker, date, caption (each optional)."""
    s = str(text)
    speaker = metadata.get("speaker")
    if speaker:
        s = f"{speaker}: {s}"
    caption = metadata.get("caption")
    if caption:
        s += f" [image: {caption}]"
    date = metadata.get("date")
    if date:
        s = f"({date}) {s}"
    return s


# ---------------------------------------------------------------------------------------------- API types

@dataclass(frozen=True)
class Doc:
    id: str                 # memory id (26-char sortable id; sorts by creation time)
    key: str                # text both retrievers see, built by key_text()
    group: str | None       # neighbours = docs of the same group, ordered by position; None = no neighbours
    position: float         # order within the group
    speaker: str | None


def doc_for(memory_id: str, text: str, metadata: Mapping[str, Any], created_at: float) -> Doc:
    """group = metadata 'session' (or 'thread'/'conversation') if present else None;
    position = metadata 'position' if numeric else created_at; speaker = metadata 'speaker'."""
    group = None
    for name in ("session", "thread", "conversation"):
        v = metadata.get(name)
        if v is not None and v != "":
            group = str(v)
            break
    pos = metadata.get("position")
    if isinstance(pos, (int, float)) and not isinstance(pos, bool) and math.isfinite(pos):
        position = float(pos)
    else:
        position = float(created_at)
    speaker = metadata.get("speaker")
    speaker = str(speaker) if speaker else None
    return Doc(id=memory_id, key=key_text(text, metadata), group=group, position=position, speaker=speaker)


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
    hnsw_ef_search: int = 256     # >= candidates
    hnsw_dtype: str = "f16"       # storage of the ANN copy of the vectors (exact rescoring uses float32)
    threads: int = 0              # threads for bulk ANN insertion (0 = all cores)

    def __post_init__(self) -> None:
        self.window = tuple(float(w) for w in self.window)
        if not self.window or self.window[0] <= 0 or any(w < 0 for w in self.window):
            raise ValueError("window must start with a positive weight and have no negative weights")
        if self.ann_threshold < 1 or self.candidates < 1 or self.lexical_candidates < 1 or self.stats_sample < 2:
            raise ValueError("ann_threshold, candidates, lexical_candidates must be >= 1, stats_sample >= 2")


class IndexCorruptError(ValueError):
    """A saved index is missing, truncated, corrupt or of an unknown format."""


# ---------------------------------------------------------------------------------------------- locking

class _RWLock:
    """Many readers or one writer; a waiting writer blocks new readers (no writer starvation)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    def acquire_read(self) -> None:
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1

    def release_read(self) -> None:
        with self._cond:
            self._readers -= 1
            if not self._readers:
                self._cond.notify_all()

    def acquire_write(self) -> None:
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True

    def release_write(self) -> None:
        with self._cond:
            self._writer = False
            self._cond.notify_all()


class _Read:
    def __init__(self, lock: _RWLock) -> None:
        self.lock = lock

    def __enter__(self) -> None:
        self.lock.acquire_read()

    def __exit__(self, *exc: object) -> None:
        self.lock.release_read()


class _Write(_Read):
    def __enter__(self) -> None:
        self.lock.acquire_write()

    def __exit__(self, *exc: object) -> None:
        self.lock.release_write()


# ---------------------------------------------------------------------------------------------- postings

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


# ---------------------------------------------------------------------------------------------- index

def _grow(arr: np.ndarray, cap: int, fill: Any = 0) -> np.ndarray:
    new = np.full((cap,) + arr.shape[1:], fill, dtype=arr.dtype)
    new[: len(arr)] = arr
    return new


def _matvec(m: np.ndarray, v: np.ndarray) -> np.ndarray:
    """m @ v without the BLAS thread pool: a multithreaded sgemv waits for its worker threads, which
    costs milliseconds on a busy machine (measured 12 ms vs 0.6 ms for 10k x 384 with 2 busy cores)."""
    return np.einsum("ij,j->i", m, v)


def _z_params(mean: float, var: float) -> tuple[float, float]:
    sd = math.sqrt(max(var, 0.0))
    return mean, (sd if sd > 1e-9 else 1.0)


class HybridIndex:
    """Incrementally maintained hybrid index (see module docstring). Thread-safe: searches share a
    read lock, upsert/remove take the write lock."""

    def __init__(self, dim: int, config: RetrievalConfig | None = None):
        if dim < 1:
            raise ValueError("dim must be >= 1")
        self.dim = int(dim)
        self.config = config or RetrievalConfig()
        cfg = self.config
        self._R = len(cfg.window) - 1
        w = cfg.window
        self._wraw = np.array([w[abs(c - self._R)] for c in range(2 * self._R + 1)], np.float32)
        self._lock = _RWLock()
        self._save_lock = threading.Lock()
        self._n = 0
        cap = 16
        self._vecs = np.zeros((cap, self.dim), np.float32)
        self._gen = np.zeros(cap, np.uint32)
        self._dl = np.zeros(cap, np.float64)
        self._spk = np.full(cap, -1, np.int32)
        self._pos = np.zeros(cap, np.float64)
        self._grp = np.full(cap, -1, np.int64)
        self._nb = np.zeros((cap, 2 * self._R + 1), np.int32)
        self._nbw = np.zeros((cap, 2 * self._R + 1), np.float32)
        self._own_off = np.zeros(cap, np.int64)
        self._own_len = np.zeros(cap, np.int32)
        self._own_terms = np.zeros(64, np.int32)
        self._own_cnt = np.zeros(64, np.float32)
        self._own_used = 0
        self._own_garbage = 0
        self._ids: list[str] = []
        self._row: dict[str, int] = {}
        self._sum_dl = 0.0
        self._vocab: dict[str, int] = {}
        self._terms: list[str] = []
        self._post: list[_Posting] = []
        self._speakers: list[str] = []
        self._spk_code: dict[str, int] = {}
        self._spk_count: list[int] = []
        self._first: dict[str, set[int]] = {}   # first-name token -> speaker codes with live docs
        self._groups: list[str] = []
        self._grp_code: dict[str, int] = {}
        self._grp_pos: list[list[float]] = []   # per group: positions, sorted
        self._grp_rows: list[list[int]] = []    # per group: rows in the same order
        self._ann: Any = None

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return self._n

    def __contains__(self, id: object) -> bool:
        return id in self._row

    def ids(self) -> list[str]:
        with _Read(self._lock):
            return list(self._ids)

    @property
    def ann_active(self) -> bool:
        """True when searches take dense candidates from the ANN index."""
        return self._ann is not None and self._n >= self.config.ann_threshold

    def _ensure_capacity(self, n: int) -> None:
        cap = len(self._gen)
        if n <= cap:
            return
        cap = max(n, 2 * cap)
        self._vecs = _grow(self._vecs, cap)
        self._gen = _grow(self._gen, cap)
        self._dl = _grow(self._dl, cap)
        self._spk = _grow(self._spk, cap, -1)
        self._pos = _grow(self._pos, cap)
        self._grp = _grow(self._grp, cap, -1)
        self._nb = _grow(self._nb, cap)
        self._nbw = _grow(self._nbw, cap)
        self._own_off = _grow(self._own_off, cap)
        self._own_len = _grow(self._own_len, cap)

    # ------------------------------------------------------------------ own terms
    def _set_own_terms(self, row: int, key: str) -> None:
        counts: dict[int, int] = {}
        vocab = self._vocab
        for tok in tokenize(key):
            t = vocab.get(tok)
            if t is None:
                t = vocab[tok] = len(self._terms)
                self._terms.append(tok)
                self._post.append(_Posting())
            counts[t] = counts.get(t, 0) + 1
        self._own_garbage += int(self._own_len[row])
        self._own_len[row] = 0
        k = len(counts)
        need = self._own_used + k
        if need > len(self._own_terms):
            if self._own_garbage > self._own_used // 2:
                self._compact_own()
                need = self._own_used + k
            if need > len(self._own_terms):
                cap = max(need, 2 * len(self._own_terms))
                self._own_terms = _grow(self._own_terms, cap)
                self._own_cnt = _grow(self._own_cnt, cap)
        s = self._own_used
        if k:
            self._own_terms[s: s + k] = list(counts.keys())
            self._own_cnt[s: s + k] = list(counts.values())
        self._own_off[row] = s
        self._own_len[row] = k
        self._own_used = s + k

    def _compact_own(self) -> None:
        n = self._n
        lens = self._own_len[:n].astype(np.int64)
        total = int(lens.sum())
        starts = np.repeat(self._own_off[:n], lens)
        within = np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens)
        src = starts + within
        terms, cnt = self._own_terms[src], self._own_cnt[src]
        self._own_terms[:total] = terms
        self._own_cnt[:total] = cnt
        self._own_off[:n] = np.cumsum(lens) - lens
        self._own_used = total
        self._own_garbage = 0

    # ------------------------------------------------------------------ groups
    def _group_index(self, g: int, row: int) -> int:
        pos, rows = self._grp_pos[g], self._grp_rows[g]
        p = self._pos[row]
        i = bisect.bisect_left(pos, p)
        while rows[i] != row:
            i += 1
        return i

    def _attach(self, row: int, affected: set[int]) -> None:
        g = int(self._grp[row])
        if g < 0:
            affected.add(row)
            return
        pos, rows = self._grp_pos[g], self._grp_rows[g]
        p = float(self._pos[row])
        lo, hi = bisect.bisect_left(pos, p), bisect.bisect_right(pos, p)
        my = self._ids[row]
        i = lo
        while i < hi and self._ids[rows[i]] < my:   # ties in position: order by id
            i += 1
        pos.insert(i, p)
        rows.insert(i, row)
        R = self._R
        affected.update(rows[max(0, i - R): i + R + 1])

    def _detach(self, row: int, affected: set[int]) -> None:
        g = int(self._grp[row])
        if g < 0:
            return
        i = self._group_index(g, row)
        pos, rows = self._grp_pos[g], self._grp_rows[g]
        del pos[i]
        del rows[i]
        R = self._R
        affected.update(rows[max(0, i - R): i + R])

    def _refresh_neighbours(self, row: int) -> None:
        R = self._R
        nb = np.full(2 * R + 1, row, np.int32)
        w = np.zeros(2 * R + 1, np.float32)
        w[R] = self._wraw[R]
        g = int(self._grp[row])
        if g >= 0 and R:
            rows = self._grp_rows[g]
            i = self._group_index(g, row)
            for c in range(2 * R + 1):
                q = i + c - R
                if c != R and 0 <= q < len(rows):
                    nb[c] = rows[q]
                    w[c] = self._wraw[c]
        self._nb[row] = nb
        self._nbw[row] = w / w.sum()

    # ------------------------------------------------------------------ contextual documents
    def _recompute(self, rows_set: set[int]) -> None:
        """Rebuild the contextual term frequencies of these rows and append their postings."""
        if not rows_set:
            return
        for r in rows_set:
            self._refresh_neighbours(r)
        A = np.fromiter(sorted(rows_set), np.int64, len(rows_set))
        chunk = 65536
        for s in range(0, len(A), chunk):
            self._recompute_chunk(A[s: s + chunk])

    def _recompute_chunk(self, A: np.ndarray) -> None:
        m = len(A)
        nb = self._nb[A]                                    # (m, 2R+1)
        w = np.where(self._nbw[A] > 0, self._wraw[None, :], 0.0).astype(np.float32)
        valid = w > 0
        pair_i = np.nonzero(valid)[0]                       # local row index per (row, neighbour) pair
        pair_j = nb[valid].astype(np.int64)
        pair_w = w[valid]
        lens = self._own_len[pair_j].astype(np.int64)
        total = int(lens.sum())
        starts = np.repeat(self._own_off[pair_j], lens)
        within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
        src = starts + within
        terms = self._own_terms[src].astype(np.int64)
        vals = self._own_cnt[src] * np.repeat(pair_w, lens)
        local = np.repeat(pair_i, lens)
        V = max(len(self._terms), 1)
        key = local * V + terms
        ukey, inv = np.unique(key, return_inverse=True)
        tf = np.bincount(inv, weights=vals, minlength=len(ukey)).astype(np.float32)
        u_local = ukey // V
        u_term = ukey % V
        # document lengths
        dl = np.bincount(u_local, weights=tf, minlength=m)
        self._sum_dl += float(dl.sum() - self._dl[A].sum())
        self._dl[A] = dl
        self._gen[A] += 1
        if not len(u_term):  # these rows have no terms at all (e.g. only stopwords)
            return
        rows = A[u_local].astype(np.int32)
        gens = self._gen[rows]
        order = np.argsort(u_term, kind="stable")
        u_term, rows, gens, tf = u_term[order], rows[order], gens[order], tf[order]
        cuts = np.flatnonzero(np.diff(u_term)) + 1
        bounds = np.concatenate(([0], cuts, [len(u_term)]))
        post, row_gen = self._post, self._gen
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            post[int(u_term[a])].extend(rows[a:b], gens[a:b], tf[a:b], row_gen)

    # ------------------------------------------------------------------ speakers
    def _speaker_code(self, speaker: str | None) -> int:
        if not speaker:
            return -1
        c = self._spk_code.get(speaker)
        if c is None:
            c = self._spk_code[speaker] = len(self._speakers)
            self._speakers.append(speaker)
            self._spk_count.append(0)
        if self._spk_count[c] == 0:
            first = _WORD.findall(speaker.lower())
            if first:
                self._first.setdefault(first[0], set()).add(c)
        self._spk_count[c] += 1
        return c

    def _speaker_release(self, c: int) -> None:
        if c < 0:
            return
        self._spk_count[c] -= 1
        if self._spk_count[c] == 0:
            first = _WORD.findall(self._speakers[c].lower())
            if first:
                s = self._first.get(first[0])
                if s is not None:
                    s.discard(c)
                    if not s:
                        del self._first[first[0]]

    def _named_speaker(self, query: str) -> int:
        """Code of the single known speaker the query names by first name, else -1."""
        hits: set[int] = set()
        for w in set(_WORD.findall(query.lower())):
            hits |= self._first.get(w, set())
        return next(iter(hits)) if len(hits) == 1 else -1

    # ------------------------------------------------------------------ mutation
    def upsert(self, docs: Sequence[Doc], vectors: np.ndarray) -> None:
        """Add new docs or replace existing ids (text, vector, group, position, speaker)."""
        vecs = np.asarray(vectors, dtype=np.float32)
        if vecs.ndim == 1 and len(docs) == 1:
            vecs = vecs[None, :]
        if vecs.ndim != 2 or vecs.shape != (len(docs), self.dim):
            raise ValueError(f"vectors must have shape ({len(docs)}, {self.dim}), got {vecs.shape}")
        if not np.isfinite(vecs).all():
            raise ValueError("vectors contain non-finite values")
        norms = np.linalg.norm(vecs, axis=1, keepdims=True)
        vecs = vecs / np.where(norms > 0, norms, 1.0)
        last: dict[str, int] = {}
        for i, d in enumerate(docs):
            if not isinstance(d, Doc):
                raise TypeError("docs must be Doc instances")
            last[d.id] = i
        if not last:
            return
        with _Write(self._lock):
            affected: set[int] = set()
            changed_vec: list[int] = []
            new_rows: list[int] = []
            self._ensure_capacity(self._n + len(last))
            for did, i in last.items():
                d = docs[i]
                row = self._row.get(did)
                if row is None:
                    row = self._n
                    self._n += 1
                    self._ids.append(did)
                    self._row[did] = row
                    self._own_len[row] = 0
                    self._dl[row] = 0.0
                    new_rows.append(row)
                else:
                    self._detach(row, affected)
                    self._speaker_release(int(self._spk[row]))
                    changed_vec.append(row)
                self._vecs[row] = vecs[i]
                self._set_own_terms(row, d.key)
                self._spk[row] = self._speaker_code(d.speaker)
                self._pos[row] = float(d.position)
                if d.group is None:
                    self._grp[row] = -1
                else:
                    g = self._grp_code.get(d.group)
                    if g is None:
                        g = self._grp_code[d.group] = len(self._groups)
                        self._groups.append(d.group)
                        self._grp_pos.append([])
                        self._grp_rows.append([])
                    self._grp[row] = g
                self._attach(row, affected)
            self._recompute(affected)
            self._ann_sync(new_rows, changed_vec)

    def remove(self, ids: Iterable[str]) -> None:
        """Remove docs by id; unknown ids are ignored."""
        if isinstance(ids, str):
            ids = [ids]
        with _Write(self._lock):
            affected: set[int] = set()
            for did in dict.fromkeys(ids):
                row = self._row.get(did)
                if row is None:
                    continue
                self._detach(row, affected)
                affected.discard(row)
                self._speaker_release(int(self._spk[row]))
                self._sum_dl -= float(self._dl[row])
                self._own_garbage += int(self._own_len[row])
                if self._ann is not None:
                    self._ann.remove(row)
                last = self._n - 1
                if row != last:
                    self._move(last, row)
                    if last in affected:
                        affected.discard(last)
                        affected.add(row)
                del self._row[did]
                self._ids.pop()
                self._n -= 1
                self._gen[last] += 1   # vacated slot: its postings become stale
                self._dl[last] = 0.0
                self._own_len[last] = 0
            self._recompute(affected)
            if self._ann is not None and self._n == 0:
                self._ann = None

    def _move(self, src: int, dst: int) -> None:
        """Move the doc in row src into the (vacated) row dst."""
        did = self._ids[src]
        self._ids[dst] = did
        self._row[did] = dst
        for arr in (self._vecs, self._dl, self._spk, self._pos, self._grp, self._own_off, self._own_len):
            arr[dst] = arr[src]
        self._gen[dst] += 1
        self._dl[src] = 0.0
        g = int(self._grp[dst])
        if g >= 0:
            self._grp_rows[g][self._group_index_of(g, src, float(self._pos[dst]))] = dst
        if self._ann is not None:
            self._ann.rename(src, dst)
        # the moved doc's postings and its neighbours' neighbour tables name the old row
        ctx = {dst}
        if g >= 0:
            rows = self._grp_rows[g]
            i = self._group_index(g, dst)
            ctx.update(rows[max(0, i - self._R): i + self._R + 1])
        for r in ctx:
            self._refresh_neighbours(r)
        self._recompute_chunk(np.array([dst], np.int64))

    def _group_index_of(self, g: int, row: int, p: float) -> int:
        pos, rows = self._grp_pos[g], self._grp_rows[g]
        i = bisect.bisect_left(pos, p)
        while rows[i] != row:
            i += 1
        return i

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

    # ------------------------------------------------------------------ search
    def _lexical(self, query: str) -> tuple[np.ndarray, list[np.ndarray]]:
        """Contextual BM25 of every row (dense array of length n) and the rows each term touched."""
        n = self._n
        lex = np.zeros(n, np.float32)
        touched: list[np.ndarray] = []
        if not n:
            return lex, touched
        cfg = self.config
        k1, b = cfg.k1, cfg.b
        avgdl = self._sum_dl / n if self._sum_dl > 0 else 1.0
        # sorted by term text: deterministic float summation order whatever the insertion history
        for tok in sorted(set(tokenize(query))):
            t = self._vocab.get(tok)
            if t is None:
                continue
            rows, tf = self._post[t].live(self._gen)
            df = len(rows)
            if not df:
                continue
            idf = math.log(1.0 + (n - df + 0.5) / (df + 0.5))
            norm = (k1 * (1.0 - b)) + (k1 * b / avgdl) * self._dl[rows]
            lex[rows] += (idf * tf * (k1 + 1.0) / (tf + norm)).astype(np.float32)
            touched.append(rows)
        return lex, touched

    @staticmethod
    def _lexical_candidates(lex: np.ndarray, touched: list[np.ndarray], L: int) -> np.ndarray:
        """The (up to) L rows with the highest lexical score among the rows the query terms touched.
        A row occurs at most once per term, so the top L*len(touched) entries hold the top L rows."""
        allt = np.concatenate(touched)
        m = L * len(touched)
        if len(allt) > m:
            allt = allt[np.argpartition(-lex[allt], m - 1)[:m]]
        u = np.unique(allt)
        if len(u) > L:
            u = u[np.argpartition(-lex[u], L - 1)[:L]]
        return u

    def _smoothed_cos(self, rows: np.ndarray, q: np.ndarray) -> np.ndarray:
        nb = self._nb[rows]
        u, inv = np.unique(nb, return_inverse=True)
        cos = _matvec(self._vecs[u], q)
        return (cos[inv.reshape(nb.shape)] * self._nbw[rows]).sum(1)

    def search(self, query: str, query_vec: np.ndarray, k: int, allow: Collection[str] | None = None,
               exact: bool | None = None) -> list[Hit]:
        """Top-k hits, best first. allow: restrict to these ids (scored exactly). exact: force exact
        (True) or candidate (False) scoring; default exact below config.ann_threshold docs."""
        q = np.asarray(query_vec, dtype=np.float32).reshape(-1)
        if q.shape[0] != self.dim:
            raise ValueError(f"query_vec must have {self.dim} dims")
        nq = float(np.linalg.norm(q))
        if nq > 0:
            q = q / nq
        if k <= 0:
            return []
        cfg = self.config
        with _Read(self._lock):
            n = self._n
            if not n:
                return []
            if exact is None:
                exact = not self.ann_active
            if not exact and self._ann is None:
                raise RuntimeError("candidate mode needs the ANN index (corpus below ann_threshold)")
            lex, touched = self._lexical(query)
            lmean, lsd = _z_params(float(lex.mean(dtype=np.float64)),
                                   float(np.square(lex, dtype=np.float64).mean()) - float(lex.mean(dtype=np.float64)) ** 2)
            allow_rows = None
            if allow is not None:
                allow_rows = np.array(sorted({self._row[a] for a in allow if a in self._row}), np.int64)
                if not len(allow_rows):
                    return []
            if exact:
                cos = _matvec(self._vecs[:n], q)
                dense_all = (cos[self._nb[:n]] * self._nbw[:n]).sum(1)
                dm = float(dense_all.mean(dtype=np.float64))
                dmean, dsd = _z_params(dm, float(np.square(dense_all, dtype=np.float64).mean()) - dm * dm)
                rows = allow_rows if allow_rows is not None else np.arange(n)
                dense = dense_all[rows] if allow_rows is not None else dense_all
            else:
                # dense statistics: deterministic random sample of rows (all rows when few)
                S = cfg.stats_sample
                sample = np.arange(n) if n <= S else np.random.default_rng(n).integers(0, n, S)
                if allow_rows is not None:
                    rows = allow_rows
                else:
                    kk = max(cfg.candidates, k)
                    ann_rows = np.asarray(self._ann.search(q, min(kk, n)).keys, np.int64)
                    # a doc whose neighbour is close to the query gets a high smoothed score:
                    # the window around each dense candidate is a candidate too
                    parts = [self._nb[ann_rows].ravel().astype(np.int64)]
                    if touched:
                        parts.append(self._lexical_candidates(lex, touched, max(cfg.lexical_candidates, k)))
                    rows = np.unique(np.concatenate(parts))
                both = np.concatenate([rows, sample])
                sm = self._smoothed_cos(both, q)
                dense, ds = sm[: len(rows)], sm[len(rows):]
                dm = float(ds.mean(dtype=np.float64))
                dmean, dsd = _z_params(dm, float(np.square(ds, dtype=np.float64).mean()) - dm * dm)
            lx = lex[rows]
            score = (lx - lmean) / lsd + cfg.dense_weight * (dense - dmean) / dsd
            who = self._named_speaker(query) if cfg.speaker_boost else -1
            if who >= 0:
                score = score + cfg.speaker_boost * (self._spk[rows] == who)
            kk = min(k, len(rows))
            top = np.argpartition(-score, kk - 1)[:kk] if kk < len(rows) else np.arange(len(rows))
            top = top[np.lexsort((rows[top], -score[top]))]
            ids = self._ids
            return [Hit(ids[int(rows[i])], float(score[i]), float(lx[i]), float(dense[i])) for i in top]

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Write the index into folder `path` atomically: a new version folder is written and fsynced,
        then the CURRENT pointer file is replaced (os.replace), then older versions are deleted."""
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        with self._save_lock, _Read(self._lock):
            n = self._n
            tmp = tempfile.mkdtemp(prefix=".tmp-", dir=path)
            try:
                lens = self._own_len[:n].astype(np.int64)
                total = int(lens.sum())
                starts = np.repeat(self._own_off[:n], lens)
                src = starts + np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens)
                live = [p.live(self._gen) for p in self._post]
                plen = np.array([len(r) for r, _ in live], np.int64)
                arrays = dict(
                    vecs=self._vecs[:n], dl=self._dl[:n], spk=self._spk[:n], pos=self._pos[:n], grp=self._grp[:n],
                    nb=self._nb[:n], nbw=self._nbw[:n], own_len=self._own_len[:n],
                    own_terms=self._own_terms[src], own_cnt=self._own_cnt[src],
                    post_len=plen,
                    post_rows=np.concatenate([r for r, _ in live]) if live else np.zeros(0, np.int32),
                    post_tf=np.concatenate([t for _, t in live]) if live else np.zeros(0, np.float32),
                )
                files = {}
                with open(os.path.join(tmp, "arrays.npz"), "wb") as f:
                    np.savez(f, **arrays)
                strings = dict(ids=self._ids, terms=self._terms, speakers=self._speakers, groups=self._groups,
                               grp_rows=[list(map(int, r)) for r in self._grp_rows])
                with open(os.path.join(tmp, "strings.json"), "w", encoding="utf-8") as f:
                    json.dump(strings, f, ensure_ascii=False)
                if self._ann is not None:
                    self._ann.save(os.path.join(tmp, "ann.usearch"))
                for name in sorted(os.listdir(tmp)):
                    files[name] = _file_crc(os.path.join(tmp, name))
                meta = dict(format=FORMAT_VERSION, dim=self.dim, n=n, sum_dl=self._sum_dl,
                            config=_config_to_json(self.config), files=files)
                with open(os.path.join(tmp, "meta.json"), "w", encoding="utf-8") as f:
                    json.dump(meta, f)
                for name in os.listdir(tmp):
                    _fsync_file(os.path.join(tmp, name))
                version = _next_version(path)
                final = os.path.join(path, version)
                os.rename(tmp, final)
                _fsync_dir(path)
                ptr = os.path.join(path, ".CURRENT.tmp")
                with open(ptr, "w") as f:
                    f.write(version + "\n")
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(ptr, os.path.join(path, "CURRENT"))
                _fsync_dir(path)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            for name in os.listdir(path):
                if (name.startswith("v-") and name != version) or name.startswith(".tmp-"):
                    shutil.rmtree(os.path.join(path, name), ignore_errors=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "HybridIndex":
        """Load a folder written by save(). Raises IndexCorruptError on missing/corrupt/unknown files."""
        path = os.fspath(path)
        try:
            with open(os.path.join(path, "CURRENT"), encoding="utf-8") as f:
                version = f.read().strip()
            if not re.fullmatch(r"v-\d+", version):
                raise IndexCorruptError(f"{path}: bad CURRENT pointer {version!r}")
            folder = os.path.join(path, version)
            with open(os.path.join(folder, "meta.json"), encoding="utf-8") as f:
                meta = json.load(f)
            if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
                raise IndexCorruptError(f"{path}: unknown index format {meta.get('format') if isinstance(meta, dict) else meta!r}")
            for name, crc in meta["files"].items():
                if _file_crc(os.path.join(folder, name)) != crc:
                    raise IndexCorruptError(f"{path}: checksum mismatch in {name}")
            cfg = _config_from_json(meta["config"])
            self = cls(int(meta["dim"]), cfg)
            with np.load(os.path.join(folder, "arrays.npz"), allow_pickle=False) as z:
                a = {k: z[k] for k in z.files}
            with open(os.path.join(folder, "strings.json"), encoding="utf-8") as f:
                s = json.load(f)
            n = int(meta["n"])
            self._restore(n, float(meta["sum_dl"]), a, s)
            if "ann.usearch" in meta["files"]:
                ann = self._new_ann()
                ann.load(os.path.join(folder, "ann.usearch"))
                if len(ann) != n:
                    raise IndexCorruptError(f"{path}: ANN index holds {len(ann)} vectors, expected {n}")
                self._ann = ann
            return self
        except IndexCorruptError:
            raise
        except (OSError, KeyError, TypeError, ValueError, IndexError, RuntimeError, zlib.error) as e:
            raise IndexCorruptError(f"{path}: cannot load index: {type(e).__name__}: {e}") from e

    def _restore(self, n: int, sum_dl: float, a: dict[str, np.ndarray], s: dict[str, Any]) -> None:
        if len(s["ids"]) != n or a["vecs"].shape != (n, self.dim):
            raise IndexCorruptError("inconsistent saved index (sizes)")
        self._ensure_capacity(max(n, 16))
        self._n = n
        self._ids = list(s["ids"])
        self._row = {d: i for i, d in enumerate(self._ids)}
        if len(self._row) != n:
            raise IndexCorruptError("duplicate ids in saved index")
        for name in ("vecs", "dl", "spk", "pos", "grp", "nb", "nbw", "own_len"):
            getattr(self, "_" + name)[:n] = a[name]
        lens = a["own_len"].astype(np.int64)
        self._own_off[:n] = np.cumsum(lens) - lens
        total = int(lens.sum())
        self._own_terms = np.array(a["own_terms"], np.int32)
        self._own_cnt = np.array(a["own_cnt"], np.float32)
        if len(self._own_terms) != total or len(self._own_cnt) != total:
            raise IndexCorruptError("inconsistent saved index (terms)")
        self._own_used = total
        self._sum_dl = sum_dl
        self._terms = list(s["terms"])
        self._vocab = {t: i for i, t in enumerate(self._terms)}
        plen = a["post_len"]
        if len(plen) != len(self._terms):
            raise IndexCorruptError("inconsistent saved index (postings)")
        off = np.concatenate(([0], np.cumsum(plen)))
        rows_all, tf_all = a["post_rows"], a["post_tf"]
        if len(rows_all) != off[-1] or (len(rows_all) and (rows_all.min() < 0 or rows_all.max() >= n)):
            raise IndexCorruptError("inconsistent saved index (posting rows)")
        self._gen[:] = 0
        self._post = []
        for t in range(len(self._terms)):
            p = _Posting()
            r, f = rows_all[off[t]: off[t + 1]], tf_all[off[t]: off[t + 1]]
            p.rows, p.tf = np.array(r, np.int32), np.array(f, np.float32)
            p.gens = np.zeros(len(r), np.uint32)
            p.size = len(r)
            if not p.size:
                p.rows, p.gens, p.tf = np.empty(4, np.int32), np.empty(4, np.uint32), np.empty(4, np.float32)
            self._post.append(p)
        self._speakers = list(s["speakers"])
        self._spk_code = {x: i for i, x in enumerate(self._speakers)}
        self._spk_count = [0] * len(self._speakers)
        for c in self._spk[:n].tolist():
            if c >= 0:
                self._spk_count[c] += 1
        self._first = {}
        for c, x in enumerate(self._speakers):
            first = _WORD.findall(x.lower())
            if self._spk_count[c] and first:
                self._first.setdefault(first[0], set()).add(c)
        self._groups = list(s["groups"])
        self._grp_code = {x: i for i, x in enumerate(self._groups)}
        self._grp_rows = [list(r) for r in s["grp_rows"]]
        self._grp_pos = [[float(self._pos[r]) for r in rows] for rows in self._grp_rows]
        if len(self._grp_rows) != len(self._groups):
            raise IndexCorruptError("inconsistent saved index (groups)")
        if (self._nb[:n] < 0).any() or (self._nb[:n] >= max(n, 1)).any():
            raise IndexCorruptError("inconsistent saved index (neighbours)")


# ---------------------------------------------------------------------------------------------- helpers

def _config_to_json(cfg: RetrievalConfig) -> dict[str, Any]:
    d = asdict(cfg)
    d["window"] = list(cfg.window)
    return d


def _config_from_json(d: Mapping[str, Any]) -> RetrievalConfig:
    names = {f.name for f in fields(RetrievalConfig)}
    return RetrievalConfig(**{k: (tuple(v) if k == "window" else v) for k, v in d.items() if k in names})


def _file_crc(p: str) -> int:
    crc = 0
    with open(p, "rb") as f:
        while True:
            b = f.read(1 << 22)
            if not b:
                return crc
            crc = zlib.crc32(b, crc)


def _fsync_file(p: str) -> None:
    fd = os.open(p, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(p: str) -> None:
    try:
        fd = os.open(p, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _next_version(path: str) -> str:
    nums = [int(x[2:]) for x in os.listdir(path) if re.fullmatch(r"v-\d+", x)]
    return f"v-{max(nums, default=0) + 1}"
