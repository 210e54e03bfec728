"""Contextual documents and their BM25: each row's own term counts, its group window (neighbour
table), and the contextual term frequencies appended to the postings.

A collaborator of :class:`~.index.HybridIndex`. The index numbers the rows
(0..n-1, the live ones a prefix) and owns the vectors; this object owns
everything the lexical side and the window need per row, and recomputes the
contextual documents of only the rows a change touches (the changed rows and
their neighbours within the window radius). The index reads ``nb``/``nbw``
(neighbour rows and normalised window weights) to smooth dense scores over
the same window.
"""
from __future__ import annotations

import bisect
import math
from typing import Any

import numpy as np

from .config import IndexCorruptError
from .postings import _Posting
from .text import tokenize


def _grow(arr: np.ndarray, cap: int, fill: Any = 0) -> np.ndarray:
    new = np.full((cap,) + arr.shape[1:], fill, dtype=arr.dtype)
    new[: len(arr)] = arr
    return new


class ContextualDocuments:
    """Own terms, groups, windows and contextual postings of the rows of one index.

    ``ids`` is the index's list of doc ids by row, shared (the index mutates it
    in place); it is read here only to order docs at the same position.
    """

    def __init__(self, window: tuple[float, ...], ids: list[str]) -> None:
        self.ids = ids
        self.R = R = len(window) - 1
        self.wraw = np.array([window[abs(c - R)] for c in range(2 * R + 1)], np.float32)
        cap = 16
        self.gen = np.zeros(cap, np.uint32)      # bumped when a row's contextual doc changes or it is vacated
        self.dl = np.zeros(cap, np.float64)      # contextual document length
        self.pos = np.zeros(cap, np.float64)
        self.grp = np.full(cap, -1, np.int64)
        self.nb = np.zeros((cap, 2 * R + 1), np.int32)
        self.nbw = np.zeros((cap, 2 * R + 1), np.float32)
        self.own_off = np.zeros(cap, np.int64)
        self.own_len = np.zeros(cap, np.int32)
        self.own_terms = np.zeros(64, np.int32)
        self.own_cnt = np.zeros(64, np.float32)
        self.own_used = 0
        self.own_garbage = 0
        self.sum_dl = 0.0
        self.vocab: dict[str, int] = {}
        self.terms: list[str] = []
        self.post: list[_Posting] = []
        self.groups: list[str] = []
        self.grp_code: dict[str, int] = {}
        self.grp_pos: list[list[float]] = []   # per group: positions, sorted
        self.grp_rows: list[list[int]] = []    # per group: rows in the same order

    def ensure_capacity(self, cap: int) -> None:
        if cap <= len(self.gen):
            return
        self.gen = _grow(self.gen, cap)
        self.dl = _grow(self.dl, cap)
        self.pos = _grow(self.pos, cap)
        self.grp = _grow(self.grp, cap, -1)
        self.nb = _grow(self.nb, cap)
        self.nbw = _grow(self.nbw, cap)
        self.own_off = _grow(self.own_off, cap)
        self.own_len = _grow(self.own_len, cap)

    # ------------------------------------------------------------------ rows coming and going
    def new_row(self, row: int) -> None:
        self.own_len[row] = 0
        self.dl[row] = 0.0

    def place(self, row: int, key: str, group: str | None, position: float, affected: set[int]) -> None:
        """Set the text, group and position of ``row`` and insert it into its group's window."""
        self._set_own_terms(row, key)
        self.pos[row] = float(position)
        if group is None:
            self.grp[row] = -1
        else:
            g = self.grp_code.get(group)
            if g is None:
                g = self.grp_code[group] = len(self.groups)
                self.groups.append(group)
                self.grp_pos.append([])
                self.grp_rows.append([])
            self.grp[row] = g
        self._attach(row, affected)

    def unplace(self, row: int, affected: set[int]) -> None:
        """Take ``row`` out of its group's window (before it is placed again)."""
        self._detach(row, affected)

    def remove(self, row: int, affected: set[int]) -> None:
        """Take the doc of ``row`` out: its window, its length, its own terms."""
        self._detach(row, affected)
        affected.discard(row)
        self.sum_dl -= float(self.dl[row])
        self.own_garbage += int(self.own_len[row])

    def vacate(self, row: int) -> None:
        """``row`` is past the end now: its postings become stale."""
        self.gen[row] += 1
        self.dl[row] = 0.0
        self.own_len[row] = 0

    def move(self, src: int, dst: int) -> None:
        """Move the doc in row ``src`` into the vacated row ``dst`` (the index moved its id and vector)."""
        for arr in (self.dl, self.pos, self.grp, self.own_off, self.own_len):
            arr[dst] = arr[src]
        self.gen[dst] += 1
        self.dl[src] = 0.0
        g = int(self.grp[dst])
        if g >= 0:
            self.grp_rows[g][self._group_index_of(g, src, float(self.pos[dst]))] = dst
        # the moved doc's postings and its neighbours' neighbour tables name the old row
        ctx = {dst}
        if g >= 0:
            rows = self.grp_rows[g]
            i = self._group_index(g, dst)
            ctx.update(rows[max(0, i - self.R): i + self.R + 1])
        for r in ctx:
            self._refresh_neighbours(r)
        self._recompute_chunk(np.array([dst], np.int64))

    # ------------------------------------------------------------------ own terms
    def _set_own_terms(self, row: int, key: str) -> None:
        counts: dict[int, int] = {}
        vocab = self.vocab
        for tok in tokenize(key):
            t = vocab.get(tok)
            if t is None:
                t = vocab[tok] = len(self.terms)
                self.terms.append(tok)
                self.post.append(_Posting())
            counts[t] = counts.get(t, 0) + 1
        self.own_garbage += int(self.own_len[row])
        self.own_len[row] = 0
        k = len(counts)
        need = self.own_used + k
        if need > len(self.own_terms):
            if self.own_garbage > self.own_used // 2:
                self._compact_own(len(self.ids))
                need = self.own_used + k
            if need > len(self.own_terms):
                cap = max(need, 2 * len(self.own_terms))
                self.own_terms = _grow(self.own_terms, cap)
                self.own_cnt = _grow(self.own_cnt, cap)
        s = self.own_used
        if k:
            self.own_terms[s: s + k] = list(counts.keys())
            self.own_cnt[s: s + k] = list(counts.values())
        self.own_off[row] = s
        self.own_len[row] = k
        self.own_used = s + k

    def _own_rows(self, n: int) -> np.ndarray:
        """Positions in own_terms/own_cnt of the live own terms of rows 0..n-1, row by row."""
        lens = self.own_len[:n].astype(np.int64)
        total = int(lens.sum())
        starts = np.repeat(self.own_off[:n], lens)
        return starts + np.arange(total) - np.repeat(np.cumsum(lens) - lens, lens)

    def _compact_own(self, n: int) -> None:
        src = self._own_rows(n)
        total = len(src)
        terms, cnt = self.own_terms[src], self.own_cnt[src]
        self.own_terms[:total] = terms
        self.own_cnt[:total] = cnt
        lens = self.own_len[:n].astype(np.int64)
        self.own_off[:n] = np.cumsum(lens) - lens
        self.own_used = total
        self.own_garbage = 0

    # ------------------------------------------------------------------ groups
    def _group_index(self, g: int, row: int) -> int:
        return self._group_index_of(g, row, float(self.pos[row]))

    def _group_index_of(self, g: int, row: int, p: float) -> int:
        pos, rows = self.grp_pos[g], self.grp_rows[g]
        i = bisect.bisect_left(pos, p)
        while rows[i] != row:
            i += 1
        return i

    def _attach(self, row: int, affected: set[int]) -> None:
        g = int(self.grp[row])
        if g < 0:
            affected.add(row)
            return
        pos, rows = self.grp_pos[g], self.grp_rows[g]
        p = float(self.pos[row])
        lo, hi = bisect.bisect_left(pos, p), bisect.bisect_right(pos, p)
        my = self.ids[row]
        i = lo
        while i < hi and self.ids[rows[i]] < my:   # ties in position: order by id
            i += 1
        pos.insert(i, p)
        rows.insert(i, row)
        R = self.R
        affected.update(rows[max(0, i - R): i + R + 1])

    def _detach(self, row: int, affected: set[int]) -> None:
        g = int(self.grp[row])
        if g < 0:
            return
        i = self._group_index(g, row)
        pos, rows = self.grp_pos[g], self.grp_rows[g]
        del pos[i]
        del rows[i]
        R = self.R
        affected.update(rows[max(0, i - R): i + R])

    def _refresh_neighbours(self, row: int) -> None:
        R = self.R
        nb = np.full(2 * R + 1, row, np.int32)
        w = np.zeros(2 * R + 1, np.float32)
        w[R] = self.wraw[R]
        g = int(self.grp[row])
        if g >= 0 and R:
            rows = self.grp_rows[g]
            i = self._group_index(g, row)
            for c in range(2 * R + 1):
                q = i + c - R
                if c != R and 0 <= q < len(rows):
                    nb[c] = rows[q]
                    w[c] = self.wraw[c]
        self.nb[row] = nb
        self.nbw[row] = w / w.sum()

    # ------------------------------------------------------------------ contextual documents
    def recompute(self, rows_set: set[int]) -> None:
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
        nb = self.nb[A]                                     # (m, 2R+1)
        w = np.where(self.nbw[A] > 0, self.wraw[None, :], 0.0).astype(np.float32)
        valid = w > 0
        pair_i = np.nonzero(valid)[0]                       # local row index per (row, neighbour) pair
        pair_j = nb[valid].astype(np.int64)
        pair_w = w[valid]
        lens = self.own_len[pair_j].astype(np.int64)
        total = int(lens.sum())
        starts = np.repeat(self.own_off[pair_j], lens)
        within = np.arange(total, dtype=np.int64) - np.repeat(np.cumsum(lens) - lens, lens)
        src = starts + within
        terms = self.own_terms[src].astype(np.int64)
        vals = self.own_cnt[src] * np.repeat(pair_w, lens)
        local = np.repeat(pair_i, lens)
        V = max(len(self.terms), 1)
        key = local * V + terms
        ukey, inv = np.unique(key, return_inverse=True)
        tf = np.bincount(inv, weights=vals, minlength=len(ukey)).astype(np.float32)
        u_local = ukey // V
        u_term = ukey % V
        # document lengths
        dl = np.bincount(u_local, weights=tf, minlength=m)
        self.sum_dl += float(dl.sum() - self.dl[A].sum())
        self.dl[A] = dl
        self.gen[A] += 1
        if not len(u_term):  # these rows have no terms at all (e.g. only stopwords)
            return
        rows = A[u_local].astype(np.int32)
        gens = self.gen[rows]
        order = np.argsort(u_term, kind="stable")
        u_term, rows, gens, tf = u_term[order], rows[order], gens[order], tf[order]
        cuts = np.flatnonzero(np.diff(u_term)) + 1
        bounds = np.concatenate(([0], cuts, [len(u_term)]))
        post, row_gen = self.post, self.gen
        for a, b in zip(bounds[:-1].tolist(), bounds[1:].tolist()):
            post[int(u_term[a])].extend(rows[a:b], gens[a:b], tf[a:b], row_gen)

    # ------------------------------------------------------------------ contextual BM25
    def lexical(self, query: str, n: int, k1: float, b: float) -> tuple[np.ndarray, list[np.ndarray]]:
        """Contextual BM25 of every row (dense array of length n) and the rows each term touched."""
        lex = np.zeros(n, np.float32)
        touched: list[np.ndarray] = []
        if not n:
            return lex, touched
        avgdl = self.sum_dl / n if self.sum_dl > 0 else 1.0
        # sorted by term text: deterministic float summation order whatever the insertion history
        for tok in sorted(set(tokenize(query))):
            t = self.vocab.get(tok)
            if t is None:
                continue
            rows, tf = self.post[t].live(self.gen)
            df = len(rows)
            if not df:
                continue
            idf = math.log(1.0 + (n - df + 0.5) / (df + 0.5))
            norm = (k1 * (1.0 - b)) + (k1 * b / avgdl) * self.dl[rows]
            lex[rows] += (idf * tf * (k1 + 1.0) / (tf + norm)).astype(np.float32)
            touched.append(rows)
        return lex, touched

    @staticmethod
    def lexical_candidates(lex: np.ndarray, touched: list[np.ndarray], L: int) -> np.ndarray:
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

    # ------------------------------------------------------------------ saved form
    def state(self, n: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """What a saved index holds of the contextual side: postings compacted to their live entries."""
        src = self._own_rows(n)
        live = [p.live(self.gen) for p in self.post]
        arrays = dict(
            dl=self.dl[:n], pos=self.pos[:n], grp=self.grp[:n], nb=self.nb[:n], nbw=self.nbw[:n],
            own_len=self.own_len[:n], own_terms=self.own_terms[src], own_cnt=self.own_cnt[src],
            post_len=np.array([len(r) for r, _ in live], np.int64),
            post_rows=np.concatenate([r for r, _ in live]) if live else np.zeros(0, np.int32),
            post_tf=np.concatenate([t for _, t in live]) if live else np.zeros(0, np.float32),
        )
        strings = dict(terms=self.terms, groups=self.groups, grp_rows=[list(map(int, r)) for r in self.grp_rows])
        return arrays, strings

    def restore(self, n: int, sum_dl: float, a: dict[str, np.ndarray], s: dict[str, Any]) -> None:
        self.ensure_capacity(max(n, 16))
        for name in ("dl", "pos", "grp", "nb", "nbw", "own_len"):
            getattr(self, name)[:n] = a[name]
        lens = a["own_len"].astype(np.int64)
        self.own_off[:n] = np.cumsum(lens) - lens
        total = int(lens.sum())
        self.own_terms = np.array(a["own_terms"], np.int32)
        self.own_cnt = np.array(a["own_cnt"], np.float32)
        if len(self.own_terms) != total or len(self.own_cnt) != total:
            raise IndexCorruptError("inconsistent saved index (terms)")
        self.own_used = total
        self.own_garbage = 0
        self.sum_dl = sum_dl
        self.terms = list(s["terms"])
        self.vocab = {t: i for i, t in enumerate(self.terms)}
        plen = a["post_len"]
        if len(plen) != len(self.terms):
            raise IndexCorruptError("inconsistent saved index (postings)")
        off = np.concatenate(([0], np.cumsum(plen)))
        rows_all, tf_all = a["post_rows"], a["post_tf"]
        if len(rows_all) != off[-1] or (len(rows_all) and (rows_all.min() < 0 or rows_all.max() >= n)):
            raise IndexCorruptError("inconsistent saved index (posting rows)")
        self.gen[:] = 0
        self.post = []
        for t in range(len(self.terms)):
            p = _Posting()
            r, f = rows_all[off[t]: off[t + 1]], tf_all[off[t]: off[t + 1]]
            p.rows, p.tf = np.array(r, np.int32), np.array(f, np.float32)
            p.gens = np.zeros(len(r), np.uint32)
            p.size = len(r)
            if not p.size:
                p.rows, p.gens, p.tf = np.empty(4, np.int32), np.empty(4, np.uint32), np.empty(4, np.float32)
            self.post.append(p)
        self.groups = list(s["groups"])
        self.grp_code = {x: i for i, x in enumerate(self.groups)}
        self.grp_rows = [list(r) for r in s["grp_rows"]]
        self.grp_pos = [[float(self.pos[r]) for r in rows] for rows in self.grp_rows]
        if len(self.grp_rows) != len(self.groups):
            raise IndexCorruptError("inconsistent saved index (groups)")
        if (self.nb[:n] < 0).any() or (self.nb[:n] >= max(n, 1)).any():
            raise IndexCorruptError("inconsistent saved index (neighbours)")
