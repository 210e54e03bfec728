"""Scale check for memos.plugins.plaintext.retrieval.HybridIndex on synthetic data.

Vectors: unit vectors drawn around 4000 random cluster centres (noise of the same norm as the centre,
cos(doc, centre) ~ 0.7), so nearest neighbours are a few hundred near-ties in a cluster: not trivial
for HNSW. Texts: 8-20 tokens from a 50k-word vocabulary with a Zipf(1.1) distribution, 100 speakers,
sessions of 20 consecutive docs. Queries: 3-5 Zipf words (+ a speaker name half the time), vector =
noisy cluster centre.

The index is grown in chunks of 100k (ANN built when it crosses ann_threshold=50k) and measured at
10k, 100k and 1M docs: search p50/p95 (query embedding excluded, one query at a time), ANN recall@10
(top-10 of the HNSW vs exact dense top-10; and exact top-10 covered by the dense candidate list),
build time, RSS.

Usage: python bench/engine_scale.py [--max 1000000]
"""
from __future__ import annotations
import argparse
import gc
import time

import numpy as np
from memos.plugins.plaintext.retrieval import Doc, HybridIndex, RetrievalConfig

DIM, CENTRES, VOCAB = 384, 4000, 50_000


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0


rng0 = np.random.default_rng(0)
C = rng0.standard_normal((CENTRES, DIM)).astype(np.float32)
C /= np.linalg.norm(C, axis=1, keepdims=True)
ZP = 1.0 / np.arange(1, VOCAB + 1) ** 1.1
ZP /= ZP.sum()
WORDS = np.array([f"w{i}" for i in range(VOCAB)])
NAMES = [f"Person{i} Lastname" for i in range(100)]


def noisy(rng, centres):
    v = C[centres] + rng.standard_normal((len(centres), DIM)).astype(np.float32) / np.sqrt(DIM)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def make_docs(start, n, rng):
    lens = rng.integers(8, 21, n)
    toks = WORDS[rng.choice(VOCAB, int(lens.sum()), p=ZP)]
    ends = np.cumsum(lens)
    docs = []
    spk = rng.integers(0, 100, n)
    for i in range(n):
        j = start + i
        text = " ".join(toks[ends[i] - lens[i]: ends[i]])
        name = NAMES[spk[i]]
        docs.append(Doc(f"d{j:09d}", f"{name}: {text}", f"s{j // 20}", float(j % 20), name))
    vecs = noisy(rng, rng.integers(0, CENTRES, n))
    return docs, vecs


def queries(rng, m):
    out = []
    for i in range(m):
        words = " ".join(WORDS[rng.choice(VOCAB, int(rng.integers(3, 6)), p=ZP)])
        if i % 2:
            words += " " + NAMES[int(rng.integers(0, 100))].split()[0]
        out.append((words, noisy(rng, rng.integers(0, CENTRES, 1))[0]))
    return out


def time_search(ix, qs, **kw):
    for q, v in qs[:10]:
        ix.search(q, v, 10, **kw)
    ts = []
    for q, v in qs:
        t = time.perf_counter()
        ix.search(q, v, 10, **kw)
        ts.append(1000 * (time.perf_counter() - t))
    return np.percentile(ts, 50), np.percentile(ts, 95)


def ann_recall(ix, qs, ef_values):
    n = len(ix)
    V = ix._vecs[:n]
    exact = [np.argpartition(-(V @ v), 10)[:10] for _, v in qs]
    out = []
    for ef in ef_values:
        ix.ann.index.expansion_search = ef
        r10 = rc = 0.0
        t = time.perf_counter()
        for (_, v), ex in zip(qs, exact):
            keys = ix.ann_search(v, max(ix.config.candidates, 10))
            r10 += len(set(keys[:10].tolist()) & set(ex.tolist())) / 10
            rc += len(set(keys.tolist()) & set(ex.tolist())) / 10
        dt = 1000 * (time.perf_counter() - t) / len(qs)
        out.append((ef, r10 / len(qs), rc / len(qs), dt))
    ix.ann.index.expansion_search = ix.config.hnsw_ef_search
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max", type=int, default=1_000_000)
    ap.add_argument("--nq", type=int, default=200)
    args = ap.parse_args()
    cfg = RetrievalConfig()
    print(f"config: M={cfg.hnsw_m} ef_construction={cfg.hnsw_ef_construction} ef_search={cfg.hnsw_ef_search} "
          f"dtype={cfg.hnsw_dtype} ann_threshold={cfg.ann_threshold} candidates={cfg.candidates}", flush=True)
    rng = np.random.default_rng(1)
    qs = queries(np.random.default_rng(2), args.nq)
    ix = HybridIndex(DIM, cfg)
    gc.collect()
    rss0 = rss_mb()
    t_build = t_gen = 0.0
    checkpoints = [c for c in (10_000, 100_000, 1_000_000) if c <= args.max]
    done = 0
    for target in checkpoints:
        while done < target:
            m = min(100_000, target - done)
            t = time.perf_counter()
            docs, vecs = make_docs(done, m, rng)
            t_gen += time.perf_counter() - t
            t = time.perf_counter()
            ix.upsert(docs, vecs)
            dt = time.perf_counter() - t
            t_build += dt
            done += m
            del docs, vecs
            print(f"  upserted {done:>9,d} docs: chunk {dt:6.1f}s, total build {t_build:7.1f}s, rss {rss_mb():8.0f} MB",
                  flush=True)
        gc.collect()
        rss = rss_mb() - rss0
        mode = "ANN" if ix.ann_active else "exact"
        p50, p95 = time_search(ix, qs)
        line = f"n={done:>9,d} mode={mode:5s} search p50 {p50:6.2f} ms p95 {p95:6.2f} ms"
        if ix.ann_active:
            e50, e95 = time_search(ix, qs[:50], exact=True)
            line += f" | exact mode p50 {e50:6.2f} ms p95 {e95:6.2f} ms"
        print(line + f" | build {t_build:.1f}s | RSS +{rss:.0f} MB ({1e6 * rss / 2**20 * 2**20 / 1e6 / done * 1024:.0f} B/doc... "
              f"{rss * 2**20 / done:.0f} B/doc)", flush=True)
        if ix.ann_active:
            for ef, r10, rc, dt in ann_recall(ix, qs[:100], (64, 128, 256, 512)):
                print(f"   ef_search={ef:4d}: ANN recall@10 {r10:.3f} | exact top-10 in {cfg.candidates} candidates {rc:.3f}"
                      f" | {dt:.2f} ms/ANN query", flush=True)
    print(f"data generation {t_gen:.1f}s (not in build)")


if __name__ == "__main__":
    main()
