"""Group commit on both backends: many writes in one commit, a failing one rolled back alone."""

from __future__ import annotations

from conftest import ALICE, BOB, audit_seq

from memos.api import LOCAL_ADMIN
from memos.errors import Conflict, Denied, NotFound
from memos.ids import new_id


def test_a_failing_write_in_a_group_fails_alone_and_is_audited(memos, cube):
    before = audit_seq(memos)
    first = memos.add(ALICE, cube, "kept before")
    writes = [memos.memories.write_add(ALICE, cube, "one"),
              memos.memories.write_add(BOB, cube, "bob may not write here"),  # denied
              memos.memories.write_update(ALICE, cube, new_id(), text="no such memory"),
              memos.memories.write_update(ALICE, cube, first.id, text="kept, changed"),
              memos.memories.write_add(ALICE, cube, "three")]
    results = memos.apply(writes)
    assert isinstance(results[1], Denied) and isinstance(results[2], NotFound)
    assert [r.text for i, r in enumerate(results) if i in (0, 3, 4)] == ["one", "kept, changed", "three"]
    assert sorted(m.text for m in memos.list(LOCAL_ADMIN, cube)) == ["kept, changed", "one", "three"]
    assert [c.version for c in memos.history(LOCAL_ADMIN, cube)] == [4, 3, 2, 1, 0]  # nothing skipped
    records = memos.audit_tail(LOCAL_ADMIN, 10, after=before)
    assert [(r.op, r.outcome) for r in records][-5:] == [("add", "ok"), ("add", "denied"), ("update", "error"),
                                                         ("update", "ok"), ("add", "ok")]
    assert memos.audit_verify(LOCAL_ADMIN).ok


def test_a_write_that_fails_after_writing_leaves_nothing_of_itself(memos, cube):
    def refuse(txn, applied):
        raise Conflict("refused after the memory was written")

    results = memos.apply([memos.memories.write_add(ALICE, cube, "before"),
                           memos.memories.write_add(ALICE, cube, "half done").then(refuse),
                           memos.memories.write_add(ALICE, cube, "after")])
    assert isinstance(results[1], Conflict)
    assert [m.text for m in memos.list(LOCAL_ADMIN, cube)] == ["before", "after"]
    assert [m.version for m in memos.list(LOCAL_ADMIN, cube)] == [1, 2]
    assert memos.store.stats()["versions"] == 2 and memos.audit_verify(LOCAL_ADMIN).ok


def test_a_group_of_good_writes_is_one_commit_with_contiguous_versions(memos, cube):
    results = memos.apply([memos.memories.write_add(ALICE, cube, f"m{i}") for i in range(50)])
    assert [r.version for r in results] == list(range(1, 51))
    assert len(memos.list(LOCAL_ADMIN, cube, limit=100)) == 50
