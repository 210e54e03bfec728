"""Recall of the HNSW graph alone, on bench/search.py's synthetic vectors.

Builds usearch's index with the engine's settings over N clustered vectors and
reports the share of the exact top-10 (numpy) found among the 200 candidates
the engine takes from the graph, for 200 query vectors, and the build time.

Usage: python bench/hnsw_recall.py [--n 1000000] [--m 24] [--ef-construction 128]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from usearch.index import Index

from search import Corpus  # bench/search.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--m", type=int, default=24)
    parser.add_argument("--ef-construction", type=int, default=128)
    parser.add_argument("--ef-search", type=int, default=256)
    parser.add_argument("--candidates", type=int, default=200)
    args = parser.parse_args()
    corpus = Corpus()
    vectors = np.concatenate([corpus.batch(i, 10_000)[1] for i in range(args.n // 10_000)])
    _, queries = corpus.queries(200)
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    index = Index(ndim=vectors.shape[1], metric="cos", dtype="f16", connectivity=args.m,
                  expansion_add=args.ef_construction, expansion_search=args.ef_search)
    start = time.time()
    index.add(np.arange(len(vectors)), vectors, threads=2)
    build = time.time() - start
    found = index.search(queries, args.candidates).keys
    recall = np.mean([len(set(exact[i]) & set(found[i].tolist())) / 10 for i in range(len(queries))])
    print(f"# bench/hnsw_recall.py  {time.strftime('%Y-%m-%d %H:%M')}  n={len(vectors):,} M={args.m} "
          f"ef_construction={args.ef_construction} ef_search={args.ef_search}")
    print(f"build {build:.0f} s ({len(vectors) / build:,.0f} vectors/s); recall@10 within {args.candidates} "
          f"candidates {recall:.3f} (target >= 0.95)")


if __name__ == "__main__":
    main()
