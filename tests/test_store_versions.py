"""Version history, diffs, reads at past versions and rollback."""

from __future__ import annotations

import pytest

from conftest import ALICE, BOB
from memos.api import LOCAL_ADMIN, NewMemory
from memos.errors import Denied, InvalidRequest, NotFound
from memos.models import Status


@pytest.fixture
def story(memos, cube):
    """v1 add a,b; v2 update a; v3 delete b; v4 add c; v5 update a again."""
    a, b = memos.add_many(ALICE, cube, [NewMemory(text="a1", tags=["x"]), NewMemory(text="b1")])
    memos.update(ALICE, cube, a.id, text="a2")
    memos.delete(ALICE, cube, b.id)
    c = memos.add(ALICE, cube, "c1")
    memos.update(ALICE, cube, a.id, text="a3", tags=["y"])
    return a.id, b.id, c.id


def texts(mems):
    return {m.id: (m.text, m.status.value) for m in mems}


def test_history_newest_first(memos, cube, story):
    a, b, c = story
    hist = memos.history(ALICE, cube)
    assert [h.version for h in hist] == [5, 4, 3, 2, 1, 0]
    assert [h.op for h in hist] == ["update", "add", "delete", "update", "add_many", "create_cube"]
    assert all(h.actor == "alice" for h in hist)
    assert [h.version for h in memos.history(ALICE, cube, limit=2)] == [5, 4]
    assert [h.version for h in memos.history(ALICE, cube, before=3)] == [2, 1, 0]


def test_history_of_one_memory(memos, cube, story):
    a, b, c = story
    assert [h.version for h in memos.history(ALICE, cube, memory_id=a)] == [5, 2, 1]
    assert [h.version for h in memos.history(ALICE, cube, memory_id=b)] == [3, 1]
    assert [h.version for h in memos.history(ALICE, cube, memory_id=c)] == [4]
    assert [h.version for h in memos.history(ALICE, cube, memory_id=a, limit=1)] == [5]
    with pytest.raises(NotFound):
        memos.history(ALICE, cube, memory_id="0" * 26)


def test_get_and_list_at_past_versions(memos, cube, story):
    a, b, c = story
    assert memos.get(ALICE, cube, a, at=1).text == "a1"
    assert memos.get(ALICE, cube, a, at=4).text == "a2"
    assert memos.get(ALICE, cube, a, at=5).text == "a3"
    assert memos.get(ALICE, cube, a, at=2).version == 2
    assert memos.get(ALICE, cube, b, at=2).text == "b1"
    with pytest.raises(NotFound):
        memos.get(ALICE, cube, b, at=3)  # deleted by then
    assert memos.get(ALICE, cube, b, at=3, include_deleted=True).status is Status.deleted
    with pytest.raises(NotFound):
        memos.get(ALICE, cube, c, at=3)  # not yet created
    with pytest.raises(NotFound):
        memos.get(ALICE, cube, a, at=0)
    assert texts(memos.list(ALICE, cube, at=0)) == {}
    assert texts(memos.list(ALICE, cube, at=1)) == {a: ("a1", "active"), b: ("b1", "active")}
    assert texts(memos.list(ALICE, cube, at=3)) == {a: ("a2", "active")}
    assert texts(memos.list(ALICE, cube, at=3, status=None)) == {a: ("a2", "active"), b: ("b1", "deleted")}
    assert texts(memos.list(ALICE, cube, at=4, tag="x")) == {a: ("a2", "active")}
    assert [m.id for m in memos.list(ALICE, cube, at=4, status=None, after=a)] == [b, c]
    assert [m.id for m in memos.list(ALICE, cube, at=4, status=None, limit=1)] == [a]


def test_state_at_versions(memos, cube, story):
    a, b, c = story
    assert memos.state(ALICE, cube, at=0) == {}
    assert set(memos.state(ALICE, cube, at=1)) == {a, b}
    assert set(memos.state(ALICE, cube, at=4)) == {a, b, c}
    assert memos.state(ALICE, cube, at=5) == memos.state(ALICE, cube)
    assert memos.state(ALICE, cube, at=2)[a] == memos.get(ALICE, cube, a, at=2).state_bytes()


def test_version_beyond_latest_is_not_found(memos, cube, story):
    a, _, _ = story
    for call in (lambda: memos.get(ALICE, cube, a, at=6), lambda: memos.list(ALICE, cube, at=6),
                 lambda: memos.state(ALICE, cube, at=6), lambda: memos.diff(ALICE, cube, 0, 6),
                 lambda: memos.rollback(ALICE, cube, 6)):
        with pytest.raises(NotFound) as err:
            call()
        assert err.value.details["version"] == 6
    assert memos.get_cube(ALICE, cube).version == 5


def test_diff_both_orders(memos, cube, story):
    a, b, c = story
    forward = {d.memory_id: d for d in memos.diff(ALICE, cube, 1, 4)}
    assert set(forward) == {a, b, c}
    assert forward[a].change == "modified" and (forward[a].before.text, forward[a].after.text) == ("a1", "a2")
    assert forward[b].change == "modified" and forward[b].after.status is Status.deleted
    assert forward[c].change == "added" and forward[c].before is None and forward[c].after.text == "c1"
    backward = {d.memory_id: d for d in memos.diff(ALICE, cube, 4, 1)}
    assert backward[c].change == "removed" and backward[c].after is None and backward[c].before.text == "c1"
    assert (backward[a].before.text, backward[a].after.text) == ("a2", "a1")
    assert memos.diff(ALICE, cube, 3, 3) == []
    assert {d.memory_id for d in memos.diff(ALICE, cube, 0, 5)} == {a, b, c}
    # An edit undone by a rollback shows no difference.
    memos.rollback(ALICE, cube, 4)
    assert memos.diff(ALICE, cube, 4, 6) == []
    assert [d.memory_id for d in memos.diff(ALICE, cube, 5, 6)] == [a]


def test_rollback_whole_cube_restores_state_bytes(memos, cube, story):
    a, b, c = story
    for target in (3, 1, 4, 0, 5):
        commit = memos.rollback(ALICE, cube, target)
        assert commit.op == "rollback" and commit.info["to_version"] == target
        assert memos.state(ALICE, cube) == memos.state(ALICE, cube, at=target)
        assert memos.state(ALICE, cube, at=commit.version) == memos.state(ALICE, cube, at=target)
    # History stays complete: every earlier version still reads as it was.
    assert [h.version for h in memos.history(ALICE, cube)] == list(range(10, -1, -1))
    assert memos.get(ALICE, cube, a, at=2).text == "a2"
    assert texts(memos.list(ALICE, cube, at=6)) == {a: ("a2", "active")}


def test_rollback_removes_memories_created_after_target(memos, cube, story):
    a, b, c = story
    memos.rollback(ALICE, cube, 3)
    assert c not in memos.state(ALICE, cube)
    with pytest.raises(NotFound):
        memos.get(ALICE, cube, c, include_deleted=True)
    with pytest.raises(NotFound):
        memos.update(ALICE, cube, c, text="edit an absent memory")
    assert memos.get(ALICE, cube, c, at=5).text == "c1"
    assert [h.version for h in memos.history(ALICE, cube, memory_id=c)] == [6, 4]


def test_rollback_chosen_memories(memos, cube, story):
    a, b, c = story
    before = memos.state(ALICE, cube)
    at1 = memos.state(ALICE, cube, at=1)
    commit = memos.rollback(ALICE, cube, 1, memory_ids=[a, c])
    now = memos.state(ALICE, cube)
    assert now[a] == at1[a]
    assert c not in now
    assert now[b] == before[b]  # not chosen: unchanged
    assert {ch.memory_id for ch in commit.changes} == {a, c}
    assert commit.info["memory_ids"] == [a, c]
    with pytest.raises(NotFound):
        memos.rollback(ALICE, cube, 1, memory_ids=["0" * 26])
    with pytest.raises(InvalidRequest):
        memos.rollback(ALICE, cube, 1, memory_ids=a)


def test_rollback_with_one_shot_iterator_of_ids(memos, cube, story):
    a, b, c = story
    memos.rollback(ALICE, cube, 1, memory_ids=(m for m in [a]))
    assert memos.state(ALICE, cube)[a] == memos.state(ALICE, cube, at=1)[a]
    assert memos.history(ALICE, cube, limit=1)[0].info["memory_ids"] == [a]


def test_rollback_needs_admin(memos, cube, story):
    memos.grant(ALICE, cube, "bob", "write")
    before = memos.state(ALICE, cube)
    with pytest.raises(Denied) as err:
        memos.rollback(BOB, cube, 0)
    assert err.value.code == "denied"
    assert memos.state(ALICE, cube) == before
    assert memos.get_cube(LOCAL_ADMIN, cube).version == 5


def test_rollback_to_head_changes_nothing_but_adds_a_version(memos, cube, story):
    before = memos.state(ALICE, cube)
    commit = memos.rollback(ALICE, cube, 5)
    assert commit.version == 6 and commit.changes == []
    assert memos.state(ALICE, cube) == before
