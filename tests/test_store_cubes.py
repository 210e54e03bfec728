"""Cubes: creation, listing, roles and their enforcement."""

from __future__ import annotations

import pytest

from conftest import ALICE, BOB, CAROL
from memos.api import LOCAL_ADMIN
from memos.errors import Conflict, Denied, InvalidRequest, NotFound
from memos.models import Role


def test_create_cube_records_owner_and_admin_role(memos):
    cube = memos.create_cube(ALICE, "notes", {"lang": "en"})
    assert cube.owner == "alice"
    assert cube.acl == {"alice": Role.admin}
    assert cube.version == 0
    again = memos.get_cube(ALICE, "notes")
    assert again.settings == {"lang": "en"}
    assert [c.op for c in memos.history(ALICE, "notes")] == ["create_cube"]


def test_duplicate_cube_is_a_conflict(memos, cube):
    with pytest.raises(Conflict) as err:
        memos.create_cube(BOB, cube)
    assert err.value.code == "conflict"
    assert memos.get_cube(LOCAL_ADMIN, cube).owner == "alice"


def test_list_cubes_shows_only_readable_cubes(memos):
    memos.create_cube(ALICE, "a1")
    memos.create_cube(ALICE, "a2")
    memos.create_cube(BOB, "b1")
    assert sorted(c.name for c in memos.list_cubes(ALICE)) == ["a1", "a2"]
    assert [c.name for c in memos.list_cubes(BOB)] == ["b1"]
    assert memos.list_cubes(CAROL) == []
    assert sorted(c.name for c in memos.list_cubes(LOCAL_ADMIN)) == ["a1", "a2", "b1"]
    memos.grant(ALICE, "a2", "carol", "read")
    assert [c.name for c in memos.list_cubes(CAROL)] == ["a2"]
    memos.grant(ALICE, "a2", "carol", None)
    assert memos.list_cubes(CAROL) == []


def test_read_role_allows_reads_but_not_writes(memos, cube):
    mem = memos.add(ALICE, cube, "alice's note")
    with pytest.raises(Denied) as err:
        memos.get(BOB, cube, mem.id)
    assert err.value.code == "denied"
    memos.grant(ALICE, cube, "bob", Role.read)
    assert memos.get(BOB, cube, mem.id).text == "alice's note"
    assert [m.id for m in memos.list(BOB, cube)] == [mem.id]
    with pytest.raises(Denied):
        memos.add(BOB, cube, "bob writes")
    with pytest.raises(Denied):
        memos.update(BOB, cube, mem.id, text="changed")
    with pytest.raises(Denied):
        memos.delete(BOB, cube, mem.id)
    assert memos.get(ALICE, cube, mem.id).text == "alice's note"
    assert memos.get_cube(ALICE, cube).version == 1


def test_write_role_allows_writes_but_not_admin(memos, cube):
    memos.grant(ALICE, cube, "bob", "write")
    mem = memos.add(BOB, cube, "bob writes")
    assert mem.provenance.actor == "bob"
    memos.update(BOB, cube, mem.id, text="bob edits")
    with pytest.raises(Denied):
        memos.grant(BOB, cube, "carol", "read")
    with pytest.raises(Denied):
        memos.rollback(BOB, cube, 0)
    assert "carol" not in memos.get_cube(ALICE, cube).acl
    assert memos.get(ALICE, cube, mem.id).text == "bob edits"


def test_admin_role_can_grant_and_rollback(memos, cube):
    memos.grant(ALICE, cube, "bob", "admin")
    memos.add(ALICE, cube, "x")
    memos.grant(BOB, cube, "carol", "read")
    assert memos.get_cube(CAROL, cube).acl["carol"] is Role.read
    memos.rollback(BOB, cube, 0)
    assert memos.list(ALICE, cube) == []


def test_revoke_removes_access(memos, cube):
    memos.grant(ALICE, cube, "bob", "write")
    memos.add(BOB, cube, "one")
    memos.grant(ALICE, cube, "bob", None)
    with pytest.raises(Denied):
        memos.add(BOB, cube, "two")
    with pytest.raises(Denied):
        memos.list(BOB, cube)
    assert [m.text for m in memos.list(ALICE, cube)] == ["one"]


def test_owner_keeps_access_without_acl_entry(memos, cube):
    memos.grant(ALICE, cube, "alice", None)
    assert "alice" not in memos.get_cube(ALICE, cube).acl
    memos.add(ALICE, cube, "still mine")
    memos.rollback(ALICE, cube, 0)
    assert [c.name for c in memos.list_cubes(ALICE)] == [cube]


def test_grant_unknown_role_and_unknown_cube(memos, cube):
    with pytest.raises(InvalidRequest) as err:
        memos.grant(ALICE, cube, "bob", "owner")
    assert err.value.code == "invalid_request"
    with pytest.raises(NotFound) as nf:
        memos.grant(ALICE, "nope", "bob", "read")
    assert nf.value.code == "not_found"
    assert "bob" not in memos.get_cube(ALICE, cube).acl
