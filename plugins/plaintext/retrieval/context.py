"""Contextual documents: each row's own term counts, its group window (neighbour table) and the
contextual term frequencies appended to the postings; recomputed only for the rows a change touches."""
from __future__ import annotations

import bisect
from typing import Any

import numpy as np

from memos.retrieval.postings import _Posting
from memos.retrieval.text import tokenize


def _grow(arr: np.ndarray, cap: int, fill: Any = 0) -> np.ndarray:
    new = np.full((cap,) + arr.shape[1:], fill, dtype=arr.dtype)
    new[: len(arr)] = arr
    return new


class _ContextualDocuments:
    """HybridIndex methods that maintain own terms, group windows and contextual postings."""

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

    def _group_index_of(self, g: int, row: int, p: float) -> int:
        pos, rows = self._grp_pos[g], self._grp_rows[g]
        i = bisect.bisect_left(pos, p)
        while rows[i] != row:
            i += 1
        return i
