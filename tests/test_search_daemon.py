"""Search through a real memosd with the real MiniLM embedder."""

from __future__ import annotations

import shutil
import threading
import time

import numpy as np
import pytest

from memos.errors import Denied, InvalidRequest, ModelMismatch, NotFound

from daemon_fixtures import Daemon

MINILM = {"MEMOS_SEARCH__EMBEDDER": "minilm"}

FACTS = [
    ("Ada's cat is called Pixel and sleeps on the radiator", ["pets"]),
    ("The quarterly budget review moved to Thursday afternoon", ["work"]),
    ("Ada is allergic to peanuts and carries an epinephrine pen", ["health"]),
    ("The team's Kubernetes cluster runs in the Frankfurt region", ["work"]),
    ("Grandma's apple pie recipe needs cinnamon and nutmeg", ["food"]),
    ("Ada ran the Berlin marathon in three hours and fifty minutes", ["sport"]),
]


@pytest.fixture(scope="module")
def searchd():
    d = Daemon(env=MINILM).start()
    try:
        yield d
    finally:
        d.cleanup()


@pytest.fixture(scope="module")
def facts(searchd):
    c = searchd.client(timeout=60)
    c.cube_create("facts")
    mems = c.add_many("facts", [{"text": t, "tags": tags} for t, tags in FACTS])
    return c, {m.text: m for m in mems}


def top(c, cube, query, **kw):
    return [h.memory.text for h in c.search(cube, query, **kw)]


def wait_jobs(c, kind="build_index", timeout=60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        jobs = [j for j in c.jobs() if j["kind"] == kind]
        if jobs and all(j["state"] != "running" for j in jobs):
            return jobs
        time.sleep(0.1)
    raise AssertionError(f"{kind} jobs still running: {c.jobs()}")


def test_paraphrase_finds_its_memory(facts):
    c, _ = facts
    assert top(c, "facts", "what is the name of Ada's kitten?")[0] == FACTS[0][0]
    assert top(c, "facts", "which food must Ada avoid?")[0] == FACTS[2][0]
    assert top(c, "facts", "where are our servers hosted?")[0] == FACTS[3][0]


def test_hits_carry_score_provenance_and_version(facts):
    c, mems = facts
    hits = c.search("facts", "pie recipe spices", k=3)
    assert len(hits) == 3
    best = hits[0]
    assert best.memory.text == FACTS[4][0]
    assert best.memory.version == mems[FACTS[4][0]].version
    assert best.memory.provenance.actor == "admin"
    assert best.score >= hits[1].score >= hits[2].score
    assert best.lexical > 0  # "pie" and "recipe" are in the text


def test_read_your_writes_and_updates(facts):
    c, _ = facts
    m = c.add("facts", "The office wifi password is orange-giraffe-42")
    assert top(c, "facts", "wifi password", k=1) == [m.text]
    c.update("facts", m.id, "The office wifi password changed to purple-walrus-7")
    assert top(c, "facts", "wifi password", k=1) == ["The office wifi password changed to purple-walrus-7"]
    c.delete("facts", m.id)
    assert "purple-walrus" not in " ".join(top(c, "facts", "wifi password purple walrus"))


def test_filters(facts):
    c, mems = facts
    assert set(top(c, "facts", "Ada", tags=["work"])) == {FACTS[1][0], FACTS[3][0]}
    marathon = mems[FACTS[5][0]]
    c.update("facts", marathon.id, status="archived")
    assert FACTS[5][0] not in top(c, "facts", "marathon running race")
    assert top(c, "facts", "marathon running race", status="archived") == [FACTS[5][0]]
    assert FACTS[5][0] in top(c, "facts", "marathon running race", status="all")
    c.update("facts", marathon.id, status="active")
    later = c.add("facts", "Ada adopted a second cat named Byte", metadata={"source": "chat"})
    assert top(c, "facts", "cat", since=later.created_at) == [later.text]
    assert later.text not in top(c, "facts", "cat", until=later.created_at)
    assert top(c, "facts", "cat", metadata={"source": "chat"}) == [later.text]


def test_search_at_past_version_after_update_and_rollback(searchd):
    c = searchd.client(timeout=60)
    c.cube_create("history")
    m = c.add("history", "The launch is planned for March")
    v1 = m.version
    c.update("history", m.id, "The launch slipped to September")
    assert top(c, "history", "when is the launch?", k=1) == ["The launch slipped to September"]
    assert top(c, "history", "when is the launch?", k=1, at=v1) == ["The launch is planned for March"]
    c.rollback("history", v1)
    assert top(c, "history", "when is the launch?", k=1) == ["The launch is planned for March"]
    with pytest.raises(NotFound):
        c.search("history", "launch", at=999)


def test_repeated_searches_of_a_past_version(searchd):
    """Later queries of a version (its index is kept) see that version, filtered and access-checked each time."""
    c = searchd.client(timeout=60)
    c.cube_create("kept")
    first = c.add("kept", "The office moves to Lisbon in spring", tags=["office"])
    lunch = c.add("kept", "Lunch is served at noon in the canteen", tags=["food"])
    v1 = lunch.version
    assert top(c, "kept", "where is the office moving?", k=1, at=v1) == [first.text]
    c.update("kept", first.id, "The office move to Lisbon is cancelled")
    c.add("kept", "The office gets a new coffee machine", tags=["office"])
    v3 = c.cube_get("kept").version
    for _ in range(2):
        assert top(c, "kept", "where is the office moving?", k=1, at=v1) == [first.text]
        assert set(top(c, "kept", "office", at=v1)) == {first.text, lunch.text}  # not the later changes
        assert top(c, "kept", "office", at=v1, tags=["food"]) == [lunch.text]
        assert top(c, "kept", "office", at=v1, tags=["nothing"]) == []
        assert top(c, "kept", "office", at=v1, status="archived") == []
    assert set(top(c, "kept", "office", at=v3)) == {
        "The office move to Lisbon is cancelled", lunch.text, "The office gets a new coffee machine"}
    c.rollback("kept", v1)
    assert set(top(c, "kept", "office", at=v1)) == {first.text, lunch.text}
    token = c.agent_add("stranger")["token"]
    with pytest.raises(Denied):
        searchd.client(token=token).search("kept", "office", at=v1)


def test_empty_huge_and_unicode_queries(facts):
    c, _ = facts
    with pytest.raises(InvalidRequest):
        c.search("facts", "   ")
    with pytest.raises(InvalidRequest):
        c.search("facts", "x" * 10_000)  # over the protocol's query limit
    long_query = ("tell me about the cat " * 300)[:8000]  # long but allowed: truncated for the model
    assert top(c, "facts", long_query, k=1) == [FACTS[0][0]]
    c.cube_create("unicode")
    c.add("unicode", "東京の本社は品川にあります 🏢")
    c.add("unicode", "Café crème costs €3.50 in Zürich")
    assert top(c, "unicode", "Zürich café", k=1) == ["Café crème costs €3.50 in Zürich"]
    assert top(c, "unicode", "本社 品川", k=1) == ["東京の本社は品川にあります 🏢"]


def test_access_control_and_usage(searchd, facts):
    c, mems = facts
    token = c.agent_add("reader")["token"]
    reader = searchd.client(token=token)
    with pytest.raises(Denied):
        reader.search("facts", "cat")
    c.cube_grant("facts", "reader", "read")
    before = c.get("facts", mems[FACTS[0][0]].id).usage.reads
    assert reader.search("facts", "Pixel the cat", k=1)[0].memory.text == FACTS[0][0]
    assert c.get("facts", mems[FACTS[0][0]].id).usage.reads >= before + 1


def test_client_vectors_must_match_the_embedder(facts):
    c, _ = facts
    info = c.embedder()
    assert info["dim"] == 384
    vec = np.zeros(384, dtype=np.float32)
    vec[0] = 1.0
    with pytest.raises(ModelMismatch):
        c.add_many("facts", [{"text": "made elsewhere", "vector": vec.tobytes()}], embedder="other-model")
    with pytest.raises(InvalidRequest):
        c.add_many("facts", [{"text": "short vector", "vector": vec[:10].tobytes()}], embedder=info["identity"])
    made = c.add_many("facts", [{"text": "zebra crossing", "vector": vec.tobytes()}], embedder=info["identity"])
    assert made[0].text == "zebra crossing"


def test_index_rebuilt_after_its_files_are_deleted(tmp_path):
    d = Daemon(env=MINILM).start()
    try:
        c = d.client(timeout=60)
        c.cube_create("notes")
        c.add_many("notes", ["The red bicycle is in the garage", "Passwords live in the vault"])
        d.stop()
        saved = d.data_dir / "types" / "plaintext"
        assert (saved / "notes").exists()  # saved on shutdown
        shutil.rmtree(saved)
        d.start()
        c = d.client(timeout=60)
        assert top(c, "notes", "where is the bike?", k=1) == ["The red bicycle is in the garage"]
        assert any(j["kind"] == "build_index" and j["cube"] == "notes" for j in wait_jobs(c))
    finally:
        d.cleanup()


def test_embedder_change_reembeds_without_mixing_spaces():
    d = Daemon(env=MINILM).start()
    try:
        c = d.client(timeout=60)
        c.cube_create("notes")
        c.add_many("notes", ["The red bicycle is in the garage", "Passwords live in the vault"])
        first = c.embedder()["identity"]
        d.stop()
        d.env["MEMOS_SEARCH__EMBEDDER"] = "hashing"
        d.start()
        c = d.client(timeout=60)
        assert c.embedder()["identity"] != first
        assert top(c, "notes", "vault passwords", k=1) == ["Passwords live in the vault"]
        jobs = wait_jobs(c)
        assert [j["state"] for j in jobs if j["cube"] == "notes"] == ["done"]
        d.stop()
        d.env["MEMOS_SEARCH__EMBEDDER"] = "minilm"
        d.start()  # back to the first space: its vectors are still stored, nothing mixes
        c = d.client(timeout=60)
        assert top(c, "notes", "where is the bike?", k=1) == ["The red bicycle is in the garage"]
    finally:
        d.cleanup()


def test_every_acknowledged_write_is_searchable_under_a_small_index_lag():
    d = Daemon(env={"MEMOS_SEARCH__EMBEDDER": "hashing", "MEMOS_SEARCH__MAX_INDEX_LAG": "3"}).start()
    try:
        c = d.client(timeout=60)
        c.cube_create("burst")
        words = ["amber", "basalt", "cobalt", "dune", "ember", "fjord", "garnet", "harbor"]

        def writer(word: str) -> None:
            own = d.client(timeout=60)
            own.add_many("burst", [f"{word} note {i}" for i in range(10)])
            own.add("burst", f"{word} final")

        threads = [threading.Thread(target=writer, args=(w,)) for w in words]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for word in words:  # each search sees every write acknowledged before it
            assert f"{word} final" in top(c, "burst", f"{word} final", k=3)
        assert len(c.list("burst")) == 88
    finally:
        d.cleanup()


def test_reindex_is_a_background_job_for_cube_admins():
    d = Daemon(env={"MEMOS_SEARCH__EMBEDDER": "hashing"}).start()
    try:
        c = d.client(timeout=60)
        c.cube_create("ops")
        c.add_many("ops", ["rotate the deploy key", "renew the TLS certificate"])
        token = c.agent_add("viewer")["token"]
        c.cube_grant("ops", "viewer", "read")
        viewer = d.client(token=token)
        with pytest.raises(Denied):
            viewer.reindex("ops")
        started = c.reindex("ops")
        assert started["cube"] == "ops" and started["started"] and started["job"]
        jobs = wait_jobs(c)
        assert any(j["cube"] == "ops" and j["state"] == "done" and j["done"] == j["total"] == 2 for j in jobs)
        assert [j["cube"] for j in viewer.jobs()] == [j["cube"] for j in jobs if j["cube"] == "ops"]
        assert top(c, "ops", "TLS certificate", k=1) == ["renew the TLS certificate"]
    finally:
        d.cleanup()


def test_a_client_vector_serves_only_its_own_cube():
    """A writer of one cube cannot choose the vector that another cube's memory of the same text gets."""
    from memos.plugins.embedders import load

    hashing = load("hashing")
    d = Daemon(env={"MEMOS_SEARCH__EMBEDDER": "hashing"}).start()
    try:
        admin = d.client(timeout=60)
        identity = admin.embedder()["identity"]
        assert identity == hashing.identity
        token = admin.agent_add("vector-planter")["token"]
        planter = d.client(token=token)
        planter.cube_create("planted")
        lure = hashing.embed(["completely unrelated topic zebra"])[0].astype(np.float32)
        planter.add_many("planted", [{"text": "password reset procedure", "vector": lure.tobytes()}],
                         embedder=identity)
        # In the planter's own cube its vector is used...
        hit = planter.search("planted", "completely unrelated topic zebra", k=1)[0]
        assert hit.memory.text == "password reset procedure" and hit.dense > 0.99
        # ...but the same text in another cube gets the daemon's own vector.
        admin.cube_create("victim")
        admin.add("victim", "password reset procedure")
        admin.add("victim", "the zebra crossing by the school")
        hits = admin.search("victim", "completely unrelated topic zebra", k=2)
        by_text = {h.memory.text: h.dense for h in hits}
        assert by_text["password reset procedure"] < 0.9
        d.stop()
    finally:
        d.cleanup()
