"""Every operation through the blocking Client against a real memosd."""

from __future__ import annotations

import pytest

from memos.errors import Conflict, Denied, InvalidRequest, NotFound, TooLarge, Unauthenticated, UnknownOperation

from daemon_fixtures import admin, daemon, frame  # noqa: F401  (fixtures)


def snapshot(mems):
    return sorted((m.id, m.text, m.status.value, m.content_hash) for m in mems)


def test_cubes(admin):
    cube = admin.cube_create("ops-cubes", settings={"purpose": "test"})
    assert (cube.name, cube.owner, cube.version, cube.settings) == ("ops-cubes", "admin", 0, {"purpose": "test"})
    assert "ops-cubes" in [c.name for c in admin.cube_list()]
    assert admin.cube_get("ops-cubes").owner == "admin"
    with pytest.raises(NotFound):
        admin.cube_grant("ops-cubes", "someone", "read")  # no such agent yet
    admin.agent_add("someone")
    granted = admin.cube_grant("ops-cubes", "someone", "read")
    assert granted.acl["someone"].value == "read"
    assert admin.cube_get("ops-cubes").acl["someone"].value == "read"
    revoked = admin.cube_grant("ops-cubes", "someone", None)
    assert "someone" not in revoked.acl
    with pytest.raises(Conflict):
        admin.cube_create("ops-cubes")
    with pytest.raises(NotFound):
        admin.cube_get("ops-no-such-cube")
    with pytest.raises(InvalidRequest) as info:
        admin.cube_create("bad name!")
    assert type(info.value) is InvalidRequest


def test_memories_versions_and_rollback(admin):
    c = "ops-mem"
    admin.cube_create(c)
    m1 = admin.add(c, "first", tags=["t1"], metadata={"k": 1})
    m2 = admin.add(c, "second", tags=["t2"])
    assert (m1.version, m2.version) == (1, 2)
    assert m1.metadata == {"k": 1} and m1.provenance.actor == "admin"
    many = admin.add_many(c, ["third", {"text": "fourth", "tags": ["t1"]}])
    assert [m.version for m in many] == [3, 3] and [m.text for m in many] == ["third", "fourth"]
    m3, m4 = many

    got = admin.get(c, m1.id)
    assert (got.text, got.tags, got.version, got.content_hash) == ("first", ["t1"], 1, m1.content_hash)

    u = admin.update(c, m1.id, text="first v2", expected_version=1)
    assert (u.version, u.text) == (4, "first v2")
    with pytest.raises(Conflict):
        admin.update(c, m1.id, text="stale", expected_version=1)
    assert admin.get(c, m1.id, at=1).text == "first"
    assert admin.get(c, m1.id).text == "first v2"
    with pytest.raises(NotFound):
        admin.get(c, m3.id, at=2)  # did not exist yet

    d = admin.delete(c, m2.id)
    assert (d.version, d.status.value) == (5, "deleted")
    with pytest.raises(NotFound):
        admin.get(c, m2.id)
    assert admin.get(c, m2.id, include_deleted=True).status.value == "deleted"

    active = admin.list(c)
    assert [m.id for m in active] == [m1.id, m3.id, m4.id]
    assert [m.id for m in admin.list(c, status="all")] == [m1.id, m2.id, m3.id, m4.id]
    assert [m.id for m in admin.list(c, status="deleted")] == [m2.id]
    assert [m.id for m in admin.list(c, limit=2)] == [m1.id, m3.id]
    assert [m.id for m in admin.list(c, tag="t1")] == [m1.id, m4.id]
    assert [m.id for m in admin.list(c, after=m1.id)] == [m3.id, m4.id]

    history = admin.history(c)
    assert [h.version for h in history] == [5, 4, 3, 2, 1, 0]
    assert [h.op for h in history[:3]] == ["delete", "update", "add_many"]
    assert [h.version for h in admin.history(c, memory_id=m1.id)] == [4, 1]
    assert [h.version for h in admin.history(c, limit=2)] == [5, 4]

    diff = {e.memory_id: e for e in admin.diff(c, 2, 5)}
    assert diff[m3.id].change == "added" and diff[m4.id].change == "added"
    assert diff[m1.id].change == "modified" and diff[m1.id].before.text == "first"
    assert diff[m2.id].change == "modified" and diff[m2.id].after.status.value == "deleted"

    at2 = snapshot(admin.list(c, at=2, status="all"))
    commit = admin.rollback(c, 2)
    assert commit.version == 6 and commit.op == "rollback"
    assert snapshot(admin.list(c, status="all")) == at2
    assert [m.text for m in admin.list(c)] == ["first", "second"]
    assert admin.cube_get(c).version == 6

    with pytest.raises(NotFound):
        admin.get(c, "01" + "0" * 24)
    with pytest.raises(NotFound):
        admin.list(c, at=99)


def test_blobs(admin):
    c = "ops-blob"
    admin.cube_create(c)
    data = bytes(range(256)) * 64
    m = admin.add(c, "kv cache", type="opaque", blob=data, media_type="application/x-kv")
    assert m.blob is not None and m.blob.size == len(data)
    assert admin.get_blob(c, m.blob.sha256) == data
    with pytest.raises(InvalidRequest):
        admin.add(c, "no blob", type="opaque")
    with pytest.raises(NotFound):
        admin.get_blob(c, "0" * 64)


def test_audit(admin):
    admin.cube_create("ops-audit")
    admin.add("ops-audit", "audited")
    report = admin.audit_verify()
    assert report.ok and report.records > 0
    checkpoint = admin.audit_checkpoint()
    assert checkpoint.seq == report.head.seq
    assert admin.audit_verify(checkpoint).ok
    tail = admin.audit_tail(2)
    assert [r.seq for r in tail] == [checkpoint.seq - 1, checkpoint.seq]
    assert (tail[-1].op, tail[-1].cube, tail[-1].outcome, tail[-1].actor) == ("add", "ops-audit", "ok", "admin")
    assert tail[-1].hash == checkpoint.head
    with pytest.raises(InvalidRequest):
        admin.audit_verify({"seq": "x"})


def test_typed_errors(daemon, admin):
    with pytest.raises(TooLarge):
        admin.cube_create("x" * 65)
    admin.cube_create("ops-errors")
    with pytest.raises(TooLarge):
        admin.add("ops-errors", "x" * (64 * 1024 + 1))
    with pytest.raises(InvalidRequest):
        admin.add("ops-errors", "   ")
    with pytest.raises(Unauthenticated):
        daemon.client(token="nobody.secret").ping()
    with pytest.raises(Unauthenticated):
        daemon.client(token="malformed").ping()
    token = admin.agent_add("ops-stranger")["token"]
    with pytest.raises(Denied) as info:
        daemon.client(token=token).list("ops-errors")
    assert type(info.value) is Denied
    with daemon.raw() as raw:
        reply = raw.exchange(frame("no_such_op"))
    assert reply["ok"] is False and reply["error"]["code"] == UnknownOperation.code


def test_whoami_and_agents(daemon, admin):
    assert admin.whoami() == {"agent": "admin", "id": "admin", "admin": True}
    added = admin.agent_add("ops-who")
    token = added["token"]
    assert token.startswith("ops-who.") and added["id"].startswith("agent:")
    assert daemon.client(token=token).whoami() == {"agent": "ops-who", "id": added["id"], "admin": False}
    assert "ops-who" in [a.name for a in admin.agent_list()]
    with pytest.raises(Conflict):
        admin.agent_add("ops-who")
    with pytest.raises(Conflict):
        admin.agent_add("admin")
