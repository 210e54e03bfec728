"""Agent identity and cube ACLs, enforced by a real memosd."""

from __future__ import annotations

import pytest

from memos.errors import Denied, Unauthenticated

from daemon_fixtures import admin, daemon  # noqa: F401  (fixtures)


def denied_records(admin, agent: str, op: str, since: int):
    return [r for r in admin.audit_tail(200, after=since)
            if r.outcome == "denied" and r.actor == agent and r.op == op]


def test_roles(daemon, admin):
    admin.cube_create("acl-private")
    mem = admin.add("acl-private", "secret")
    token = admin.agent_add("acl-eve")["token"]
    eve = daemon.client(token=token)
    since = admin.audit_checkpoint().seq

    # no role: neither read nor write, and both refusals are audited
    with pytest.raises(Denied) as info:
        eve.get("acl-private", mem.id)
    assert type(info.value) is Denied
    with pytest.raises(Denied):
        eve.add("acl-private", "intrusion")
    assert "acl-private" not in [c.name for c in eve.cube_list()]
    assert len(denied_records(admin, "acl-eve", "get", since)) == 1
    assert len(denied_records(admin, "acl-eve", "add", since)) == 1
    assert denied_records(admin, "acl-eve", "add", since)[0].cube == "acl-private"

    # read: reads, but no writes
    admin.cube_grant("acl-private", "acl-eve", "read")
    assert eve.get("acl-private", mem.id).text == "secret"
    assert [m.id for m in eve.list("acl-private")] == [mem.id]
    assert "acl-private" in [c.name for c in eve.cube_list()]
    with pytest.raises(Denied):
        eve.add("acl-private", "still no")
    with pytest.raises(Denied):
        eve.update("acl-private", mem.id, text="changed")

    # write: writes, but no rollback or grant (admin)
    admin.cube_grant("acl-private", "acl-eve", "write")
    added = eve.add("acl-private", "by eve")
    assert added.provenance.actor == "acl-eve"
    eve.update("acl-private", mem.id, text="changed")
    with pytest.raises(Denied):
        eve.rollback("acl-private", 1)
    with pytest.raises(Denied):
        eve.cube_grant("acl-private", "acl-eve", "admin")
    assert admin.get("acl-private", mem.id).text == "changed"

    # admin on the cube: rollback allowed
    admin.cube_grant("acl-private", "acl-eve", "admin")
    eve.rollback("acl-private", 1)
    assert [m.text for m in admin.list("acl-private")] == ["secret"]

    # revoke: role None takes everything away
    admin.cube_grant("acl-private", "acl-eve", None)
    with pytest.raises(Denied):
        eve.get("acl-private", mem.id)
    with pytest.raises(Denied):
        eve.add("acl-private", "after revoke")

    # an agent's own cube: it owns it, others are out
    eve.cube_create("acl-eves")
    eve.add("acl-eves", "mine")
    assert admin.cube_get("acl-eves").owner == "acl-eve"
    assert admin.audit_verify().ok


def test_agent_admin_ops_need_local_admin(daemon, admin):
    token = admin.agent_add("acl-mallory")["token"]
    mallory = daemon.client(token=token)
    since = admin.audit_checkpoint().seq
    for call in (lambda: mallory.agent_add("acl-sneaky"), lambda: mallory.agent_remove("acl-mallory"),
                 mallory.agent_list, mallory.audit_verify, mallory.audit_tail, mallory.audit_checkpoint):
        with pytest.raises(Denied) as info:
            call()
        assert type(info.value) is Denied
    assert "acl-sneaky" not in [a.name for a in admin.agent_list()]
    ops = {r.op for r in admin.audit_tail(200, after=since) if r.outcome == "denied" and r.actor == "acl-mallory"}
    assert {"agent_add", "agent_remove", "audit_verify", "audit_tail"} <= ops


def test_agent_remove_revokes_token(daemon, admin):
    token = admin.agent_add("acl-temp")["token"]
    temp = daemon.client(token=token)
    temp.cube_create("acl-temps")
    assert temp.whoami()["agent"] == "acl-temp"  # token verified (and possibly cached)
    admin.agent_remove("acl-temp")
    with pytest.raises(Unauthenticated):
        temp.whoami()
    with pytest.raises(Unauthenticated):
        temp.add("acl-temps", "after removal")
    # a new agent of the same name gets a new token; the old one stays dead
    new_token = admin.agent_add("acl-temp")["token"]
    assert new_token != token
    assert daemon.client(token=new_token).whoami()["agent"] == "acl-temp"
    with pytest.raises(Unauthenticated):
        temp.whoami()
    assert [m.text for m in admin.list("acl-temps")] == []
