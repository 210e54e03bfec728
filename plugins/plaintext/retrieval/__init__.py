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

* ``_vecs``        float32 (capacity, dim) dense vectors (the index's own).
* own terms         flat arrays ``context.own_terms``/``context.own_cnt`` + per-row offset/length
                    (append-only; garbage from replaced/removed docs is compacted when it exceeds the
                    live part).
* ``context.nb/nbw`` neighbour table (capacity, 2R+1): neighbour rows (self where missing) and the
                    normalised window weights (0 where missing).
* ``speakers.codes`` per-row speaker code (-1: none).
* postings          ``context.post``: per term, append-only arrays (row, generation, contextual tf). A row's generation
                    is bumped whenever its contextual document is recomputed or its slot is vacated;
                    entries whose generation is not the row's current one are stale and ignored at
                    query time; a posting drops its stale entries whenever it has to grow, so stale
                    entries never exceed the live ones (amortised O(1) per append).

A change (insert, replace, remove) recomputes the contextual document of the changed rows and of their
neighbours within the window radius only; BM25 statistics (df, avgdl, N) are read at query time from
the postings and a running total of document lengths, so nothing is rebuilt.

Above ``ann_threshold`` docs, an HNSW index (usearch) supplies dense candidates, the inverted index
supplies lexical candidates, and only the union is scored exactly.

Modules of the package:

* ``text``        tokenizer (stopwords, light stemming), ``key_text``, ``Doc`` and ``doc_for``.
* ``config``      ``RetrievalConfig``, ``Hit``, ``IndexCorruptError``.
* ``locks``       the readers-writer lock of an index.
* ``postings``    one term's append-only posting list.
* ``context``     ``ContextualDocuments``: own terms, group windows, contextual documents and their BM25
                  (incremental maintenance).
* ``speakers``    ``Speakers``: speaker codes and the speaker named by a query.
* ``ann``         ``AnnIndex``: the usearch HNSW index used in candidate mode.
* ``persistence`` the saved form of an index: a versioned, checksummed folder.
* ``index``       ``HybridIndex``: rows and vectors, upsert, remove, search, save, load; it owns one
                  ``ContextualDocuments``, one ``Speakers`` and one ``AnnIndex`` and tells each of them
                  about every row that comes, changes, moves or goes.
"""
from __future__ import annotations

from .config import Hit, IndexCorruptError, RetrievalConfig
from .index import HybridIndex
from .text import Doc, doc_for, key_text, tokenize

__all__ = [
    "Doc", "Hit", "HybridIndex", "IndexCorruptError", "RetrievalConfig", "doc_for", "key_text", "tokenize",
]
