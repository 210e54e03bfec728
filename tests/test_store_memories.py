"""Memories, blobs, provenance and usage counters."""

from __future__ import annotations

import hashlib
import time

import pytest

from conftest import ALICE, BOB
from memos.api import Memos, NewMemory
from memos.errors import Conflict, Denied, InvalidRequest, NotFound
from memos.ids import is_id
from memos.models import Memory, SourceRef, Status


# -- memories ----------------------------------------------------------------


def test_add_and_get(memos, cube):
    mem = memos.add(ALICE, cube, "the sky is blue", tags=["fact", "sky"], metadata={"n": 1})
    assert is_id(mem.id)
    assert mem.version == 1
    got = memos.get(ALICE, cube, mem.id)
    assert (got.text, got.tags, got.metadata, got.status) == ("the sky is blue", ["fact", "sky"], {"n": 1}, Status.active)
    assert got.type == "plaintext"
    assert got.state_bytes() == mem.state_bytes()
    assert got.content_hash == hashlib.sha256(mem.state_bytes()).hexdigest()


def test_add_many_is_one_commit(memos, cube):
    mems = memos.add_many(ALICE, cube, [NewMemory(text=f"m{i}") for i in range(5)])
    assert {m.version for m in mems} == {1}
    assert memos.get_cube(ALICE, cube).version == 1
    commits = memos.history(ALICE, cube)
    assert [c.version for c in commits] == [1, 0]
    assert [ch.memory_id for ch in commits[0].changes] == [m.id for m in mems]
    assert [m.text for m in memos.list(ALICE, cube)] == [f"m{i}" for i in range(5)]


def test_add_many_with_one_bad_item_adds_nothing(memos, cube):
    with pytest.raises(InvalidRequest):
        memos.add_many(ALICE, cube, [NewMemory(text="ok"), NewMemory(text=123)])
    assert memos.list(ALICE, cube) == []
    assert memos.get_cube(ALICE, cube).version == 0


def test_update_changes_only_given_fields(memos, cube):
    mem = memos.add(ALICE, cube, "v1", tags=["a"], metadata={"k": "v"})
    up = memos.update(ALICE, cube, mem.id, text="v2")
    assert (up.text, up.tags, up.metadata, up.version) == ("v2", ["a"], {"k": "v"}, 2)
    up = memos.update(ALICE, cube, mem.id, tags=["b", "c"], status="archived")
    assert (up.text, up.tags, up.status) == ("v2", ["b", "c"], Status.archived)
    assert up.created_at == mem.created_at and up.updated_at >= mem.updated_at
    with pytest.raises(InvalidRequest):
        memos.update(ALICE, cube, mem.id)
    assert memos.get_cube(ALICE, cube).version == 3


def test_expected_version_conflict(memos, cube):
    mem = memos.add(ALICE, cube, "v1")
    memos.update(ALICE, cube, mem.id, text="v2", expected_version=1)
    with pytest.raises(Conflict) as err:
        memos.update(ALICE, cube, mem.id, text="stale", expected_version=1)
    assert err.value.code == "conflict"
    with pytest.raises(Conflict):
        memos.delete(ALICE, cube, mem.id, expected_version=1)
    assert memos.get(ALICE, cube, mem.id).text == "v2"
    memos.delete(ALICE, cube, mem.id, expected_version=2)
    assert memos.get(ALICE, cube, mem.id, include_deleted=True).status is Status.deleted


def test_deleted_memory(memos, cube):
    mem = memos.add(ALICE, cube, "gone soon")
    deleted = memos.delete(ALICE, cube, mem.id)
    assert deleted.status is Status.deleted and deleted.version == 2
    with pytest.raises(NotFound) as err:
        memos.get(ALICE, cube, mem.id)
    assert err.value.code == "not_found"
    assert memos.get(ALICE, cube, mem.id, include_deleted=True).text == "gone soon"
    with pytest.raises(NotFound):
        memos.update(ALICE, cube, mem.id, text="edit a deleted memory")
    assert memos.list(ALICE, cube) == []
    assert [m.id for m in memos.list(ALICE, cube, status=None)] == [mem.id]
    assert [m.id for m in memos.list(ALICE, cube, status="deleted")] == [mem.id]
    # Restoring through a status change is allowed and is a new version.
    back = memos.update(ALICE, cube, mem.id, status="active")
    assert back.version == 3 and memos.get(ALICE, cube, mem.id).text == "gone soon"


def test_list_filters_and_pagination(memos, cube):
    mems = [memos.add(ALICE, cube, f"m{i}", tags=["even" if i % 2 == 0 else "odd"]) for i in range(7)]
    memos.update(ALICE, cube, mems[3].id, status="archived")
    ids = [m.id for m in mems]
    assert ids == sorted(ids)
    assert [m.id for m in memos.list(ALICE, cube)] == ids[:3] + ids[4:]
    assert [m.id for m in memos.list(ALICE, cube, status=None)] == ids
    assert [m.id for m in memos.list(ALICE, cube, status="archived")] == [ids[3]]
    assert [m.id for m in memos.list(ALICE, cube, tag="even")] == ids[0:7:2]
    assert [m.id for m in memos.list(ALICE, cube, tag="odd", status=None)] == ids[1:7:2]
    assert memos.list(ALICE, cube, tag="missing") == []
    # Page through everything, three at a time.
    pages, after = [], None
    while True:
        page = memos.list(ALICE, cube, status=None, limit=3, after=after)
        if not page:
            break
        pages.append([m.id for m in page])
        after = page[-1].id
    assert pages == [ids[0:3], ids[3:6], ids[6:7]]
    assert memos.list(ALICE, cube, limit=0) == []


def test_memories_are_per_cube(memos, cube):
    memos.create_cube(ALICE, "other")
    mem = memos.add(ALICE, cube, "here")
    with pytest.raises(NotFound):
        memos.get(ALICE, "other", mem.id)
    assert memos.list(ALICE, "other") == []


# -- blobs -------------------------------------------------------------------


def test_each_type_validates_its_items(memos, cube):
    with pytest.raises(InvalidRequest) as err:  # the opaque test type needs a blob
        memos.add(ALICE, cube, None, type="opaque")
    assert err.value.details["field"] == "blob"
    with pytest.raises(InvalidRequest) as err:  # plaintext needs a text
        memos.add(ALICE, cube, None)
    assert err.value.details["field"] == "text"
    with pytest.raises(InvalidRequest) as err:  # and only registered types exist
        memos.add(ALICE, cube, "x", type="activation-of-nothing")
    assert err.value.details["field"] == "type"
    assert memos.list(ALICE, cube, status=None) == []


def test_blob_is_content_addressed_and_deduplicated(memos, cube):
    data = b"\x00kv-cache\xff" * 1000
    a = memos.add(ALICE, cube, None, type="opaque", blob=data, media_type="application/x-kv")
    b = memos.add(ALICE, cube, "same adapter", type="opaque", blob=data)
    assert a.blob.sha256 == b.blob.sha256 == hashlib.sha256(data).hexdigest()
    assert a.blob.size == len(data) and a.blob.media_type == "application/x-kv"
    assert memos.get_blob(ALICE, cube, a.blob.sha256) == data
    assert memos.store.stats()["blobs"] == 1
    with memos.store.read() as txn:
        assert memos.ledger.blob_refs(txn, a.blob.sha256) == 2
    with pytest.raises(NotFound):
        memos.get_blob(ALICE, cube, "0" * 64)
    with pytest.raises(InvalidRequest):
        memos.get_blob(ALICE, cube, "abc")


def test_blob_survives_update_delete_and_rollback(memos, cube):
    data = b"layer tensors" * 500
    mem = memos.add(ALICE, cube, None, type="opaque", blob=data)
    sha = mem.blob.sha256

    def refs() -> int:
        with memos.store.read() as txn:
            assert memos.ledger.unreferenced_blobs(txn) == []
            return memos.ledger.blob_refs(txn, sha)

    assert refs() == 1
    memos.update(ALICE, cube, mem.id, tags=["t"])
    assert refs() == 2
    deleted = memos.delete(ALICE, cube, mem.id)
    assert deleted.blob is None and refs() == 2  # a deleted memory keeps no blob; its earlier versions do
    with pytest.raises(InvalidRequest):
        memos.update(ALICE, cube, mem.id, status="active")  # undeleting would lose the blob: roll back instead
    memos.rollback(ALICE, cube, 0)  # the memory is absent at version 0
    assert memos.list(ALICE, cube, status=None) == []
    assert refs() == 2
    assert memos.get_blob(ALICE, cube, sha) == data
    assert memos.get(ALICE, cube, mem.id, at=1).blob.sha256 == sha
    memos.rollback(ALICE, cube, 2)  # brings the blob's memory back, exactly
    assert refs() == 3
    assert memos.get(ALICE, cube, mem.id).blob.sha256 == sha
    assert memos.get_blob(ALICE, cube, sha) == data


def test_blob_needs_read_access_to_a_cube_that_uses_it(memos, cube):
    secret = b"bob's private kv cache"
    memos.create_cube(BOB, "bobs")
    mem = memos.add(BOB, "bobs", None, type="opaque", blob=secret)
    # alice can read her own cube, but the blob belongs to bob's cube only.
    with pytest.raises(NotFound):
        memos.get_blob(ALICE, cube, mem.blob.sha256)
    assert memos.get_blob(BOB, "bobs", mem.blob.sha256) == secret


# -- provenance --------------------------------------------------------------


def test_provenance_records_actor_sources_policy_and_time(memos, cube):
    memos.grant(ALICE, cube, "bob", "write")
    before = time.time()
    src = memos.add(ALICE, cube, "raw observation")
    memos.update(ALICE, cube, src.id, text="raw observation, edited")
    derived = memos.add(BOB, cube, "summary", sources=[{"memory_id": src.id, "version": 1},
                                                       SourceRef(memory_id=src.id, version=2)],
                        policy="summarise")
    after = time.time()
    prov = memos.get(ALICE, cube, derived.id).provenance
    assert prov.actor == "bob"
    assert prov.policy == "summarise"
    assert [(s.memory_id, s.version) for s in prov.sources] == [(src.id, 1), (src.id, 2)]
    assert before <= prov.time <= after


def test_missing_source_is_not_found(memos, cube):
    src = memos.add(ALICE, cube, "exists from version 1")
    ghost = memos.add(ALICE, cube, "x")
    memos.rollback(ALICE, cube, 1)  # ghost is absent from version 3 on
    cases = [
        [{"memory_id": src.id, "version": 0}],      # before it existed
        [{"memory_id": "0" * 26, "version": 1}],    # never existed
        [{"memory_id": src.id, "version": 99}],     # a version the cube does not have
        [{"memory_id": ghost.id, "version": 3}],    # rolled away
    ]
    for sources in cases:
        with pytest.raises(NotFound) as err:
            memos.add(ALICE, cube, "derived", sources=sources)
        assert err.value.code == "not_found", sources
    with pytest.raises(InvalidRequest):
        memos.add(ALICE, cube, "derived", sources=[{"memory_id": src.id}])
    assert memos.get_cube(ALICE, cube).version == 3


# -- usage -------------------------------------------------------------------


def test_usage_counts_reads_and_flushes_with_next_write(memos, cube):
    mem = memos.add(ALICE, cube, "popular")
    for _ in range(3):
        memos.get(ALICE, cube, mem.id)
    assert memos.get(ALICE, cube, mem.id).usage.reads == 3  # counted in memory so far
    assert memos.store.stats()["usage"] == 0
    memos.add(ALICE, cube, "a write carries the counts")
    assert memos.store.stats()["usage"] == 1
    usage = memos.get(ALICE, cube, mem.id).usage
    assert usage.reads == 4 and usage.last_read is not None
    # Reads never write versions.
    assert memos.get_cube(ALICE, cube).version == 2


def test_usage_flush_and_reopen(store_dir):
    m = Memos(store_dir)
    m.create_cube(ALICE, "c")
    mem = m.add(ALICE, "c", "x")
    m.get(ALICE, "c", mem.id)
    m.record_reads("c", [mem.id, mem.id])
    m.flush_usage()
    with m.store.read() as txn:
        assert m.core.usage.plain(txn, "c", mem.id)["reads"] == 3
    m.get(ALICE, "c", mem.id)
    m.close()  # closing flushes the last read
    m = Memos(store_dir)
    try:
        assert m.get(ALICE, "c", mem.id).usage.reads == 4
    finally:
        m.close()


def test_plain_reads_are_the_models_json_form(memos, cube):
    """The daemon answers get and search from plain data: it must equal Memory.model_dump(mode="json")."""
    src = memos.add(ALICE, cube, "a source")
    mem = memos.add(ALICE, cube, "with everything", tags=["t"], metadata={"k": [1, {"x": None}]},
                    blob=b"\x00\x01", media_type="application/x-kv", sources=[{"memory_id": src.id, "version": 1}],
                    policy="fuse")
    memos.get(ALICE, cube, mem.id)  # one read pending in the usage buffer
    plain = memos.get_plain(ALICE, cube, mem.id)
    assert Memory.model_validate(plain).model_dump(mode="json") == plain
    model = memos.get(ALICE, cube, mem.id).model_dump(mode="json")
    assert {**model, "usage": None} == {**plain, "usage": None}
    assert plain["usage"]["reads"] == 1 and model["usage"]["reads"] == 2
    assert plain["content_hash"] == mem.content_hash
    many = memos.get_many_plain(ALICE, cube, [mem.id, src.id, "01ARZ3NDEKTSV4RRFFQ69G5FAV"])
    assert set(many) == {mem.id, src.id}
    assert many[mem.id] == {**plain, "usage": None}
    updated = memos.update(ALICE, cube, mem.id, text="changed")
    assert memos.get_plain(ALICE, cube, mem.id, at=mem.version)["text"] == "with everything"
    assert memos.get_many_plain(ALICE, cube, [mem.id])[mem.id]["version"] == updated.version


def test_reads_see_every_grant_and_revoke_at_once(memos, cube):
    """Readers share decoded cube records by their bytes; a changed ACL is a different record."""
    mem = memos.add(ALICE, cube, "private")
    for _ in range(3):
        with pytest.raises(Denied):
            memos.get_plain(BOB, cube, mem.id)
        memos.grant(ALICE, cube, BOB.name, "read")
        assert memos.get_plain(BOB, cube, mem.id)["text"] == "private"
        assert memos.get_many_plain(BOB, cube, [mem.id])
        memos.grant(ALICE, cube, BOB.name, None)
    # a write path's cube object is its own: changing it does not leak into readers
    assert BOB.name not in memos.get_cube(ALICE, cube).acl
