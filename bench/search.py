"""Search at scale through memosd: latency, ANN recall, add throughput, index builds, memory.

For each size N (default 10k, 100k, 1M) a private memosd is started on a fresh
temporary store and one cube of N synthetic memories is inserted through it
with ``add_many`` (batches of 5,000). Embedding a million texts with MiniLM is
out of reach on a small machine, so these memories carry client-made vectors
(``vector`` + the daemon's embedder identity): unit vectors scattered around a
few thousand random cluster centres with anisotropic noise (a low effective
dimension, as real sentence embeddings have), and texts of ~20 words drawn
from a Zipf-distributed vocabulary of pseudo-words (for BM25). Then:

* search: 200 plain-text queries (6 Zipf words) through ``Client.search``,
  k=10, p50/p99. "Embedding included" is the end-to-end latency; the daemon
  embeds the query with MiniLM. "Embedding excluded" is, per query, that
  latency minus the fastest of 3 runs of the same MiniLM embedder on the
  same query text in this process, then p50/p99 over queries.
  The query vectors of these searches are MiniLM's, unrelated to the synthetic
  vector space: they cost the same, but their hits mean nothing;
* RSS of the daemon after the cube is loaded (and after the rebuild below);
* index build: the daemon is stopped, ``<data>/index`` deleted, the daemon
  started again, and ``jobs()`` polled until the cube's ``build_index`` job is
  done: its duration (started to finished: building and saving the index from
  the memories already decoded from LMDB), and the wall time from starting the
  process to the job's end (reading and decoding LMDB included);
  then one more restart times loading the saved index (start to first search);
* ANN recall@10 where the cube is at or above ``ann_threshold``: the index the
  daemon rebuilt and saved is loaded in this process (``HybridIndex.load``);
  for 200 synthetic query vectors (new points around the same centres) the
  exact dense top-10 is computed with numpy over the vectors that were
  inserted, and compared with (a) the HNSW top-10 (``ann_search(q, 10)``) and
  (b) the engine's dense candidates: the exact top-10 among the ANN's
  ``candidates`` rows, which is what candidate-mode scoring ranks. (c) is the
  overlap of the final hybrid top-10 in exact and in ANN mode, same queries.

Add throughput: 2,000 short English sentences are added with ``add_many``
(batches of 500) to a fresh daemon that embeds them with MiniLM, against the
same embedder's rate on the same texts in this process (3 rounds, fresh texts
each round; median of the ratios).

Usage: python bench/search.py [--sizes 10000,100000,1000000] [--queries 200]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

import memosd  # bench/memosd.py
from memos.client import Client

DIM = 384
CUBE = "bench"
TARGET_P50_MS_100K = 15.0
TARGET_RECALL_1M = 0.95
TARGET_ADD_RATIO = 0.80


# -- synthetic data -----------------------------------------------------------------

def pseudo_words(n: int, rng: np.random.Generator) -> list[str]:
    """n distinct pronounceable words that survive the tokenizer (no stopwords, no digits)."""
    cons, vows = "bcdfghjklmnprstvz", "aeiou"
    syll = [c + v for c in cons for v in vows]
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < n:
        w = "".join(rng.choice(syll, rng.integers(2, 5)))
        if w not in seen:
            seen.add(w)
            words.append(w)
    return words


class Corpus:
    """Deterministic synthetic memories: Zipf texts and clustered unit vectors."""

    def __init__(self, seed: int = 7, vocab: int = 30_000, clusters: int = 3_000, zipf_s: float = 1.07,
                 noise: float = 1.0) -> None:
        rng = np.random.default_rng(seed)
        self.seed = seed
        self.words = np.array(pseudo_words(vocab, rng))
        p = 1.0 / np.arange(1, vocab + 1) ** zipf_s
        self.cdf = np.cumsum(p / p.sum())
        c = rng.standard_normal((clusters, DIM)).astype(np.float32)
        self.centres = c / np.linalg.norm(c, axis=1, keepdims=True)
        # anisotropic noise in a random basis: variance of component i ~ 1/(i+1), total norm ~ noise
        scales = 1.0 / np.sqrt(np.arange(1, DIM + 1))
        self.scales = (noise * scales / np.linalg.norm(scales)).astype(np.float32)
        self.rotation = np.linalg.qr(rng.standard_normal((DIM, DIM)))[0].astype(np.float32)

    def _words(self, rng: np.random.Generator, rows: int, per: int) -> list[str]:
        idx = np.searchsorted(self.cdf, rng.random((rows, per)))
        idx = np.minimum(idx, len(self.words) - 1)
        return [" ".join(r) for r in self.words[idx].tolist()]

    def vectors(self, rng: np.random.Generator, rows: int) -> np.ndarray:
        which = rng.integers(0, len(self.centres), rows)
        noise = (rng.standard_normal((rows, DIM)).astype(np.float32) * self.scales) @ self.rotation
        v = self.centres[which] + noise
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    def batch(self, index: int, rows: int) -> tuple[list[str], np.ndarray]:
        rng = np.random.default_rng((self.seed, index))
        return self._words(rng, rows, 20), self.vectors(rng, rows)

    def queries(self, n: int) -> tuple[list[str], np.ndarray]:
        rng = np.random.default_rng((self.seed, 1_000_003, n))
        return self._words(rng, n, 6), self.vectors(rng, n)


NAMES = "Alice Bruno Chen Dana Emeka Farah Goran Hana Ivan Julia Kofi Lena Mateo Nadia Omar Priya".split()
VERBS = ("visited", "cooked", "painted", "repaired", "talked about", "forgot", "bought", "sold", "planned",
         "photographed", "wrote about", "lost", "found", "cleaned", "borrowed", "recommended")
THINGS = ("an old bicycle", "the garden shed", "a birthday cake", "the quarterly report", "a jazz record",
          "her grandmother's ring", "the hiking trail", "a vegetable soup", "the broken laptop", "a marathon plan",
          "the kitchen window", "a novel about whales", "the school fundraiser", "a pottery class",
          "the train tickets", "a new guitar")
PLACES = ("at the market", "near the lake", "in Lisbon", "at work", "at the library", "on the balcony",
          "in the mountains", "downtown", "at her sister's house", "by the river")
WHEN = ("last Monday", "this morning", "two weeks ago", "on Saturday", "after dinner", "in early spring",
        "yesterday", "during the holidays", "before the meeting", "at midnight")


def sentences(n: int, seed: int) -> list[str]:
    """n distinct short English sentences (~10-14 words)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        out.append(f"{rng.choice(NAMES)} {rng.choice(VERBS)} {rng.choice(THINGS)} {rng.choice(PLACES)} "
                   f"{rng.choice(WHEN)}, note {seed}-{i}.")
    return out


# -- the daemon -----------------------------------------------------------------------

class Daemon:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.socket = str(root / "memosd.sock")
        self.data = root / "data"
        self.proc: subprocess.Popen | None = None
        self.started = 0.0

    def start(self) -> None:
        self.started = time.time()
        self.proc = memosd.spawn(self.data, self.socket, timeout=60)

    def client(self, timeout: float = 600.0) -> Client:
        return Client(self.socket, timeout=timeout, retries=0)

    def memory(self) -> tuple[float, float]:
        """RSS and RSS minus file-backed pages (LMDB's map), in MiB."""
        info = psutil.Process(self.proc.pid).memory_info()
        return info.rss / 2**20, (info.rss - info.shared) / 2**20

    def stop(self) -> float:
        """SIGTERM (the daemon saves its indexes) and wait; seconds taken."""
        t = time.perf_counter()
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(900)
        return time.perf_counter() - t


def wait_build(client: Client, cube: str, since: float, timeout: float = 1800) -> dict:
    """The cube's build_index job started after ``since``, once it has ended."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            jobs = [j for j in client.jobs() if j["kind"] == "build_index" and j["cube"] == cube
                    and j["started"] >= since]
        except Exception:
            jobs = []
        if jobs and jobs[-1]["state"] != "running":
            if jobs[-1]["state"] != "done":
                raise SystemExit(f"index build failed: {jobs[-1]}")
            return jobs[-1]
        time.sleep(0.2)
    raise SystemExit(f"index build of {cube} did not finish in {timeout}s")


def first_search(client: Client, query: str, timeout: float = 900) -> None:
    deadline = time.time() + timeout
    while True:
        try:
            client.search(CUBE, query, k=10)
            return
        except Exception:
            if time.time() > deadline:
                raise
            time.sleep(0.1)


# -- measurements ------------------------------------------------------------------------

def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, max(0, int(round(q * len(s))) - 1))]


def embed_times(embedder, texts: list[str], repeats: int = 3) -> list[float]:
    """Seconds MiniLM takes on each text alone, in this process: the fastest of ``repeats`` runs
    (so that a stall on a busy machine is not subtracted from the daemon's latency)."""
    embedder.embed(["warm up the model once"])
    out = []
    for t in texts:
        runs = []
        for _ in range(repeats):
            s = time.perf_counter()
            embedder.embed([t])
            runs.append(time.perf_counter() - s)
        out.append(min(runs))
    return out


def recall(index_dir: Path, ids_by_row: list[str], vectors: np.ndarray, q_texts: list[str],
           q_vecs: np.ndarray) -> dict:
    from memos.plugins.plaintext.retrieval import HybridIndex

    index = HybridIndex.load(index_dir)
    row_of = {d: i for i, d in enumerate(ids_by_row)}
    mine = np.array([row_of[d] for d in index._ids], np.int64)  # index row -> inserted row
    cands = index.config.candidates
    exact: list[np.ndarray] = []
    for s in range(0, len(q_vecs), 50):  # exact dense top-10 over what was inserted
        sims = q_vecs[s:s + 50] @ vectors.T
        top = np.argpartition(-sims, 9, axis=1)[:, :10]
        exact.extend(top)
    r_ann, r_cand, overlap = [], [], []
    for qi, (text, q) in enumerate(zip(q_texts, q_vecs)):
        truth = set(exact[qi].tolist())
        ann = mine[index.ann_search(q, 10)]
        r_ann.append(len(truth & set(ann.tolist())) / 10)
        pool = mine[index.ann_search(q, cands)]
        best = pool[np.argsort(-(vectors[pool] @ q))[:10]]
        r_cand.append(len(truth & set(best.tolist())) / 10)
        a = {h.id for h in index.search(text, q, 10, exact=True)}
        b = {h.id for h in index.search(text, q, 10, exact=False)}
        overlap.append(len(a & b) / 10)
    return {"hnsw": float(np.mean(r_ann)), "candidates": float(np.mean(r_cand)),
            "hybrid_overlap": float(np.mean(overlap)), "candidates_n": cands}


def run_size(n: int, root: Path, corpus: Corpus, batch: int, q_texts: list[str], q_embed: list[float],
             q_vecs: np.ndarray, ann_threshold: int, log) -> dict:
    d = Daemon(root / f"n{n}")
    d.start()
    c = d.client()
    c.cube_create(CUBE)
    identity = c.embedder()["identity"]
    vectors = np.empty((n, DIM), np.float32)
    ids: list[str] = []
    spent_client = 0.0
    t0 = time.perf_counter()
    for b, start in enumerate(range(0, n, batch)):
        rows = min(batch, n - start)
        s = time.perf_counter()
        texts, vecs = corpus.batch(b, rows)
        vectors[start:start + rows] = vecs
        items = [{"text": t, "vector": v.tobytes()} for t, v in zip(texts, vecs)]
        spent_client += time.perf_counter() - s
        ids.extend(m.id for m in c.add_many(CUBE, items, embedder=identity))
        if (b + 1) % 20 == 0:
            el = time.perf_counter() - t0
            log(f"  n={n}: {start + rows:,} inserted, {(start + rows) / el:,.0f}/s")
    insert_s = time.perf_counter() - t0
    out: dict = {"n": n, "insert_s": insert_s, "insert_rate": n / insert_s,
                 "insert_rate_daemon": n / (insert_s - spent_client)}
    out["rss_mb"], out["private_mb"] = d.memory()
    log(f"  n={n}: inserted in {insert_s:.1f}s ({n / insert_s:,.0f}/s); rss {out['rss_mb']:.0f} MiB "
        f"(anonymous {out['private_mb']:.0f} MiB)")

    for q in ("warm one", "warm two", *q_texts[:5]):
        c.search(CUBE, q, k=10)
    lat = []
    for q in q_texts:
        s = time.perf_counter()
        c.search(CUBE, q, k=10)
        lat.append(time.perf_counter() - s)
    excl = [a - e for a, e in zip(lat, q_embed)]
    out.update(p50=1e3 * pct(lat, .5), p99=1e3 * pct(lat, .99), p50_ex=1e3 * pct(excl, .5),
               p99_ex=1e3 * pct(excl, .99))
    log(f"  n={n}: search p50 {out['p50']:.1f} ms, p99 {out['p99']:.1f} ms "
        f"(excl. embedding {out['p50_ex']:.1f} / {out['p99_ex']:.1f})")
    c.close()
    out["stop_s"] = d.stop()

    shutil.rmtree(d.data / "types" / "plaintext")  # the saved indexes (plaintext's state folder)
    d.start()
    c = d.client()
    job = wait_build(c, CUBE, d.started)
    out["build_s"] = job["finished"] - job["started"]
    out["build_wall_s"] = job["finished"] - d.started
    first_search(c, q_texts[0])
    out["rss_rebuilt_mb"], out["private_rebuilt_mb"] = d.memory()
    log(f"  n={n}: rebuilt index in {out['build_s']:.1f}s (start to done {out['build_wall_s']:.1f}s); "
        f"rss {out['rss_rebuilt_mb']:.0f} MiB (anonymous {out['private_rebuilt_mb']:.0f} MiB)")
    c.close()
    d.stop()

    d.start()
    c = d.client()
    first_search(c, q_texts[0])
    out["load_wall_s"] = time.time() - d.started
    c.close()
    d.stop()
    log(f"  n={n}: start with saved index to first search {out['load_wall_s']:.1f}s")

    if n >= ann_threshold:
        t = time.perf_counter()
        out["recall"] = recall(d.data / "types" / "plaintext" / CUBE / "index", ids, vectors, q_texts, q_vecs)
        log(f"  n={n}: recall {out['recall']} ({time.perf_counter() - t:.0f}s)")
    shutil.rmtree(d.root, ignore_errors=True)
    return out


def add_throughput(root: Path, embedder, count: int, batch: int, rounds: int, log) -> dict:
    d = Daemon(root / "add")
    d.start()
    c = d.client()
    c.cube_create("add")
    c.add_many("add", sentences(128, seed=999))  # the daemon's model is loaded and warm
    embedder.embed(sentences(128, seed=998))
    daemon_rates, raw_rates = [], []
    for r in range(rounds):
        texts = sentences(count, seed=r)
        t = time.perf_counter()
        for s in range(0, count, batch):
            c.add_many("add", texts[s:s + batch])
        daemon_rates.append(count / (time.perf_counter() - t))
        t = time.perf_counter()
        embedder.embed(texts)
        raw_rates.append(count / (time.perf_counter() - t))
        log(f"  add round {r}: daemon {daemon_rates[-1]:.0f}/s, raw embedder {raw_rates[-1]:.0f}/s")
    c.close()
    d.stop()
    shutil.rmtree(d.root, ignore_errors=True)
    ratios = [a / b for a, b in zip(daemon_rates, raw_rates)]
    return {"daemon": statistics.median(daemon_rates), "raw": statistics.median(raw_rates),
            "ratio": statistics.median(ratios), "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated cube sizes")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--batch", type=int, default=5000, help="memories per add_many when loading cubes")
    parser.add_argument("--add-texts", type=int, default=2000, help="sentences per add-throughput round")
    parser.add_argument("--add-batch", type=int, default=500)
    parser.add_argument("--add-rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from memos.plugins.plaintext import SearchSettings
    from memos.plugins import embedders

    ann_threshold = SearchSettings().ann_threshold
    began = time.perf_counter()
    load0 = os.getloadavg()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - began:7.1f}s] {msg}", file=sys.stderr, flush=True)

    root = Path(tempfile.mkdtemp(prefix="memos-search-", dir="/tmp"))
    os.chmod(root, 0o700)
    corpus = Corpus()
    q_texts, q_vecs = corpus.queries(args.queries)
    minilm = embedders.load("minilm")
    q_embed = embed_times(minilm, q_texts)
    log(f"query embedding in-process: p50 {1e3 * pct(q_embed, .5):.1f} ms")
    rows = []
    try:
        add = add_throughput(root, minilm, args.add_texts, args.add_batch, args.add_rounds, log)
        for n in sizes:
            rows.append(run_size(n, root, corpus, args.batch, q_texts, q_embed, q_vecs, ann_threshold, log))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"# bench/search.py  {time.strftime('%Y-%m-%d %H:%M')}  {platform.machine()} cpus={os.cpu_count()} "
          f"python={platform.python_version()}  queries={args.queries} k=10 ann_threshold={ann_threshold:,} "
          f"total {time.perf_counter() - began:.0f}s  load average at start {load0[0]:.1f}, at end "
          f"{os.getloadavg()[0]:.1f}")
    from memos.plugins.plaintext.retrieval import RetrievalConfig

    rc = RetrievalConfig()
    print(f"engine: HNSW M={rc.hnsw_m} ef_construction={rc.hnsw_ef_construction} ef_search={rc.hnsw_ef_search} "
          f"dtype={rc.hnsw_dtype} dense candidates={rc.candidates} lexical candidates={rc.lexical_candidates}")
    print(f"query embedding alone (MiniLM, in-process, 1 text): p50 {1e3 * pct(q_embed, .5):.1f} ms, "
          f"p99 {1e3 * pct(q_embed, .99):.1f} ms")
    print(f"{'memories':>10} {'index':>6} {'insert/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'p50 -emb':>8} "
          f"{'p99 -emb':>8} {'build s':>8} {'start->built s':>14} {'load s':>7} {'RSS MiB':>8} {'anon MiB':>8} "
          f"{'rebuilt RSS':>11} {'anon':>6} {'R@10 hnsw':>9} {'R@10 cand':>9} {'hybrid ov':>9}")
    for r in rows:
        rc = r.get("recall")
        ann = "hnsw" if r["n"] >= ann_threshold else "exact"
        tail = (f"{rc['hnsw']:9.3f} {rc['candidates']:9.3f} {rc['hybrid_overlap']:9.3f}" if rc
                else f"{'-':>9} {'-':>9} {'-':>9}")
        print(f"{r['n']:>10,} {ann:>6} {r['insert_rate']:9,.0f} {r['p50']:7.1f} {r['p99']:7.1f} {r['p50_ex']:8.1f} "
              f"{r['p99_ex']:8.1f} {r['build_s']:8.1f} {r['build_wall_s']:14.1f} {r['load_wall_s']:7.1f} "
              f"{r['rss_mb']:8.0f} {r['private_mb']:8.0f} {r['rss_rebuilt_mb']:11.0f} {r['private_rebuilt_mb']:6.0f} {tail}")
    print(f"add_many of {args.add_texts} sentences (batches of {args.add_batch}, daemon embeds): "
          f"{add['daemon']:.0f}/s; raw MiniLM in-process: {add['raw']:.0f}/s; "
          f"ratio {add['ratio']:.2f} (rounds: {', '.join(f'{x:.2f}' for x in add['ratios'])})")
    by = {r["n"]: r for r in rows}
    if 100_000 in by:
        v = by[100_000]["p50"]
        print(f"target: search p50 at 100k, embedding included <= {TARGET_P50_MS_100K:.0f} ms: {v:.1f} ms "
              f"{'met' if v <= TARGET_P50_MS_100K else 'MISSED'}")
    if 1_000_000 in by and by[1_000_000].get("recall"):
        v = by[1_000_000]["recall"]["candidates"]
        print(f"target: ANN recall@10 at 1M >= {TARGET_RECALL_1M}: {v:.3f} (dense candidates; raw HNSW top-10 "
              f"{by[1_000_000]['recall']['hnsw']:.3f}) {'met' if v >= TARGET_RECALL_1M else 'MISSED'}")
    print(f"target: batched add >= {TARGET_ADD_RATIO:.0%} of the raw embedder: {add['ratio']:.0%} "
          f"{'met' if add['ratio'] >= TARGET_ADD_RATIO else 'MISSED'}")
    if args.json:
        print(json.dumps({"sizes": rows, "add": add, "query_embed_p50_ms": 1e3 * pct(q_embed, .5)}))


if __name__ == "__main__":
    main()
