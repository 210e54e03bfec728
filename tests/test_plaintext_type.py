"""The plaintext memory type in process: its writes carry vectors, its indexes follow commits
(read-your-writes), are saved and loaded, and rebuild as jobs without losing concurrent commits.

The daemon's part (prepare before the commit, after_commit after it) is played here by ``Harness``.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import ALICE, BOB
from memos.catalog import AddArgs, AddManyArgs, NewMemoryArgs, UpdateArgs
from memos.errors import Denied, InvalidRequest, MemosError, ModelMismatch
from memos.jobs import Jobs
from memos.memtypes import Item, Pending
from memos.plugins.plaintext import Plaintext, SearchSettings
from memos.services import TypeServices
from memos.validation import Limits


class Harness:
    """One started plaintext type over ``memos``, with writes passed through prepare and after_commit."""

    def __init__(self, memos, state_dir, settings=None):
        self.memos = memos
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="test-model")
        self.jobs = Jobs()
        self.services = TypeServices(memos, "plaintext", settings or SearchSettings(embedder="hashing"),
                                     state_dir, self.jobs, self.executor)
        self.type = Plaintext()
        self.type.start(self.services)
        self.type.booted.result(timeout=60)

    def write(self, op, args, write):
        pending = Pending(op, args, args.cube)
        self.type.prepare([pending])
        if pending.error is not None:
            raise pending.error
        if pending.rows:
            rows = list(pending.rows)
            write = write.then(lambda txn, applied: [fn(self.services.rows_in(txn)) for fn in rows])
        applied = self.memos.core.apply([write])[0]
        if isinstance(applied, MemosError):
            raise applied
        self.type.after_commit(args.cube, applied.version, applied.memories)
        return applied.result

    def add(self, cube, text, **fields):
        args = AddArgs(cube=cube, text=text, **fields)
        extra = {k: v for k, v in fields.items() if k not in ("vector", "embedder")}
        return self.write("add", args, self.memos.memories.write_add(ALICE, cube, text, **extra))

    def update(self, cube, id, **fields):
        return self.write("update", UpdateArgs(cube=cube, id=id, **fields),
                          self.memos.memories.write_update(ALICE, cube, id, **fields))

    def search(self, cube, query, actor=ALICE, **kw):
        return self.type.search(actor, cube, query, **kw)

    def texts(self, cube, query, **kw):
        return [h["memory"]["text"] for h in self.search(cube, query, **kw)]

    def vectors(self):
        with self.services.read_rows() as rows:
            return dict(rows.items("vectors"))

    def wait_jobs(self, timeout=30.0):
        deadline = time.time() + timeout
        while any(j["state"] == "running" for j in self.jobs.list()):
            assert time.time() < deadline, self.jobs.list()
            time.sleep(0.01)
        return self.jobs.list()

    def close(self):
        self.type.stop()
        self.executor.shutdown(wait=True)
        self.type.close()


@pytest.fixture
def harness(memos, tmp_path):
    h = Harness(memos, tmp_path / "state")
    yield h
    h.close()


def test_validate_requires_text():
    item = Item(type="plaintext", text=None, blob=None, media_type="text/plain", tags=[], metadata={}, has_blob=False)
    with pytest.raises(InvalidRequest, match="text is required for a plaintext memory"):
        Plaintext().validate(item, Limits())
    item.text = "  \n"
    with pytest.raises(InvalidRequest, match="text is empty"):
        Plaintext().validate(item, Limits())
    item.text = "fine"
    Plaintext().validate(item, Limits())


def test_writes_carry_their_vectors_and_searches_see_them_at_once(harness, memos):
    memos.create_cube(ALICE, "notes")
    assert harness.search("notes", "anything") == []  # a new cube: an empty index, no build
    first = harness.add("notes", "the office moves to Lisbon in May", metadata={"speaker": "Ann"})
    assert len(harness.vectors()) == 1
    assert harness.texts("notes", "office move") == ["the office moves to Lisbon in May"]
    harness.add("notes", "the office moves to Lisbon in May", metadata={"speaker": "Ann"})
    assert len(harness.vectors()) == 1  # same search key: the stored vector serves both
    harness.update("notes", first.id, text="the office stays in Porto")
    hits = harness.search("notes", "Porto")
    assert hits[0]["memory"]["id"] == first.id and hits[0]["memory"]["text"] == "the office stays in Porto"
    assert len(harness.vectors()) == 2
    harness.update("notes", first.id, status="deleted")
    assert first.id not in {h["memory"]["id"] for h in harness.search("notes", "Porto")}
    assert not harness.jobs.list()  # nothing was built


def test_add_many_and_client_made_vectors(harness, memos):
    memos.create_cube(ALICE, "notes")
    model = harness.type.embedder_info(ALICE)
    assert model["name"] == "hashing" and model["dim"] == 256
    vec = np.ones(model["dim"], np.float32).tobytes()
    wrong = AddArgs(cube="notes", text="mine", vector=vec, embedder="some-other-model")
    with pytest.raises(ModelMismatch):
        harness.write("add", wrong, memos.memories.write_add(ALICE, "notes", "mine"))
    short = AddArgs(cube="notes", text="mine", vector=vec[:8], embedder=model["identity"])
    with pytest.raises(InvalidRequest, match="float32"):
        harness.write("add", short, memos.memories.write_add(ALICE, "notes", "mine"))
    items = [NewMemoryArgs(text="made by the client", vector=vec), "a text alone",
             NewMemoryArgs(text="kv", type="plaintext", metadata={"speaker": "Bo"})]
    args = AddManyArgs(cube="notes", items=items, embedder=model["identity"])
    harness.write("add_many", args, memos.memories.write_add_many(ALICE, "notes", items))
    stored = harness.vectors()
    assert len(stored) == 3
    client = [np.frombuffer(v, np.float32) for v in stored.values()]
    assert any(np.allclose(v, np.ones(256) / 16) for v in client)  # normalised as sent
    texts = harness.texts("notes", "alone")
    assert texts[0] == "a text alone" and set(texts) == {"a text alone", "made by the client", "kv"}


def test_filters_find_low_ranked_matches(harness, memos):
    memos.create_cube(ALICE, "notes")
    for i in range(60):
        harness.add("notes", f"lunch menu {i} soup", tags=["menu"])
    rare = harness.add("notes", "soup of the day", tags=["special"], metadata={"kind": "x"})
    assert [h["memory"]["id"] for h in harness.search("notes", "lunch menu soup", k=3, tags=["special"])] == [rare.id]
    assert [h["memory"]["id"] for h in harness.search("notes", "menu", k=2, metadata={"kind": "x"})] == [rare.id]
    harness.update("notes", rare.id, status="archived")
    assert harness.search("notes", "soup", tags=["special"]) == []
    assert len(harness.search("notes", "soup", tags=["special"], status="archived")) == 1
    assert len(harness.search("notes", "soup", k=100, status="all")) == 61
    assert harness.search("notes", "soup", since=time.time() + 60) == []
    with pytest.raises(InvalidRequest, match="query is empty"):
        harness.search("notes", "  ")


def test_access_is_checked(harness, memos):
    memos.create_cube(ALICE, "notes")
    harness.add("notes", "secret")
    with pytest.raises(Denied):
        harness.search("notes", "secret", actor=BOB)
    with pytest.raises(Denied):
        harness.type.reindex(BOB, "notes")


def test_saved_indexes_load_when_current_and_rebuild_when_stale(memos, tmp_path):
    memos.create_cube(ALICE, "notes")
    h = Harness(memos, tmp_path / "state")
    for i in range(5):
        h.add("notes", f"note {i} about the garden")
    h.close()
    assert (tmp_path / "state" / "notes" / "manifest.json").exists()

    h = Harness(memos, tmp_path / "state")
    assert len(h.texts("notes", "garden")) == 5 and not h.jobs.list()  # loaded, not built
    h.close()

    memos.add(ALICE, "notes", "note 5 about the garden")  # a commit the saved index never saw
    h = Harness(memos, tmp_path / "state")
    assert len(h.texts("notes", "garden")) == 6
    assert [j["kind"] for j in h.wait_jobs()] == ["build_index"]
    h.close()


def test_reindex_keeps_commits_made_while_it_builds(harness, memos, monkeypatch):
    memos.create_cube(ALICE, "notes")
    for i in range(5):
        harness.add("notes", f"note {i} about the harbour")
    assert len(harness.search("notes", "harbour")) == 5
    building, release = threading.Event(), threading.Event()
    vectors_for = harness.type._vectors.vectors_for

    def slow(keys, job=None, cube=None):
        if job is not None:  # the build, after reading the cube
            building.set()
            assert release.wait(30)
        return vectors_for(keys, job, cube)

    monkeypatch.setattr(harness.type._vectors, "vectors_for", slow)
    started = harness.type.reindex(ALICE, "notes")
    assert started["started"] and started["cube"] == "notes"
    assert building.wait(30)
    assert harness.type.reindex(ALICE, "notes")["job"] == started["job"]  # not started twice
    late = harness.add("notes", "note 5 about the harbour")  # served by the old index meanwhile
    assert late.id in {h["memory"]["id"] for h in harness.search("notes", "harbour")}
    release.set()
    assert [j["state"] for j in harness.wait_jobs()] == ["done"]
    harness.add("notes", "note 6 about the harbour")
    assert len(harness.search("notes", "harbour")) == 7
    index = harness.type._indexes.index_for("notes", 0)
    assert late.id in index and len(index) == 7


def test_a_cancelled_build_leaves_the_old_index_serving(harness, memos, monkeypatch):
    memos.create_cube(ALICE, "notes")
    harness.add("notes", "a note about bees")
    assert len(harness.search("notes", "bees")) == 1  # the index has it: the build replaces a working index
    _cancel_a_reindex_midway(harness, monkeypatch)
    assert [j["state"] for j in harness.wait_jobs()] == ["cancelled"]
    harness.add("notes", "another note about bees")
    assert len(harness.search("notes", "bees")) == 2


def test_search_off(memos, tmp_path):
    memos.create_cube(ALICE, "notes")
    h = Harness(memos, tmp_path / "state", SearchSettings(embedder="none"))
    h.add("notes", "stored without vectors")
    assert h.vectors() == {}
    with pytest.raises(MemosError, match="turned off"):
        h.search("notes", "stored")
    h.close()


def test_a_failed_first_build_is_retried_by_the_next_commit(harness, memos, monkeypatch):
    memos.create_cube(ALICE, "notes")
    memos.add(ALICE, "notes", "a note about wasps")  # committed behind the type's back: no index yet
    _cancel_a_reindex_midway(harness, monkeypatch)
    harness.wait_jobs()
    with pytest.raises(MemosError, match="failed to build"):
        harness.search("notes", "wasps")
    harness.add("notes", "another note about wasps")
    assert len(harness.search("notes", "wasps")) == 2
    assert [j["state"] for j in harness.wait_jobs()] == ["cancelled", "done"]


def _cancel_a_reindex_midway(harness, monkeypatch) -> None:
    """Start a reindex of "notes", cancel it while it builds, then let it see the cancellation."""
    building, release = threading.Event(), threading.Event()
    vectors_for = harness.type._vectors.vectors_for

    def slow(keys, job=None, cube=None):
        if job is not None and not release.is_set():
            building.set()
            assert release.wait(30)
            job.check()
        return vectors_for(keys, job, cube)

    monkeypatch.setattr(harness.type._vectors, "vectors_for", slow)
    job = harness.type.reindex(ALICE, "notes")["job"]
    assert building.wait(30)
    harness.jobs.cancel(job)
    release.set()


def test_an_embedding_failure_refuses_only_the_writes_that_needed_it(harness, memos, monkeypatch):
    from memos.catalog import AddArgs
    from memos.errors import Unavailable
    from memos.memtypes import Pending

    memos.create_cube(ALICE, "notes")
    harness.type.booted.result(timeout=60)

    def broken(texts):
        raise Unavailable("the embedder stopped")

    monkeypatch.setattr(harness.type._vectors, "embed", broken)
    needs = Pending("add", AddArgs.model_validate({"cube": "notes", "text": "a new text to embed"}), "notes")
    other = Pending("add", AddArgs.model_validate({"cube": "notes", "type": "opaque", "blob": b"kv"}), "notes")
    harness.type.prepare([needs, other])
    assert needs.error is not None and needs.error.code == "unavailable"
    assert other.error is None  # it needed no model: it goes on to the writer
