"""Bad input: each request raises its typed error, leaves the store unchanged
and is recorded in the audit log as an error."""

from __future__ import annotations

import pytest

from conftest import ALICE, audit_seq, observable
from memos.api import LOCAL_ADMIN, NewMemory
from memos.errors import InvalidRequest, NotFound, TooLarge
from memos.validation import Limits

ID = "01HZZZZZZZZZZZZZZZZZZZZZZZ"  # well-formed, never issued


@pytest.fixture
def populated(memos, cube):
    memos.create_cube(ALICE, "other")
    first = memos.add(ALICE, cube, "first", tags=["t"])
    memos.add(ALICE, cube, None, type="opaque", blob=b"kv" * 100)
    memos.update(ALICE, cube, first.id, text="first, edited")
    memos.get(ALICE, cube, first.id)
    memos.flush_usage()
    return memos, cube, first.id


BIG = "x" * (Limits().max_text_bytes + 1)

CASES = {
    # name: (call(m, cube, mid), error class, code)
    "unknown cube get": (lambda m, c, i: m.get(ALICE, "nope", i), NotFound, "not_found"),
    "unknown cube add": (lambda m, c, i: m.add(ALICE, "nope", "x"), NotFound, "not_found"),
    "unknown cube rollback": (lambda m, c, i: m.rollback(ALICE, "nope", 0), NotFound, "not_found"),
    "unknown memory get": (lambda m, c, i: m.get(ALICE, c, ID), NotFound, "not_found"),
    "unknown memory update": (lambda m, c, i: m.update(ALICE, c, ID, text="y"), NotFound, "not_found"),
    "unknown memory delete": (lambda m, c, i: m.delete(ALICE, c, ID), NotFound, "not_found"),
    "memory of another cube": (lambda m, c, i: m.update(ALICE, "other", i, text="y"), NotFound, "not_found"),
    "malformed id": (lambda m, c, i: m.get(ALICE, c, "not-an-id"), InvalidRequest, "invalid_request"),
    "lowercase id": (lambda m, c, i: m.update(ALICE, c, i.lower(), text="y"), InvalidRequest, "invalid_request"),
    "id with newline": (lambda m, c, i: m.update(ALICE, c, i + "\n", text="y"), InvalidRequest, "invalid_request"),
    "id not a string": (lambda m, c, i: m.get(ALICE, c, 42), InvalidRequest, "invalid_request"),
    "text int": (lambda m, c, i: m.add(ALICE, c, 123), InvalidRequest, "invalid_request"),
    "text empty": (lambda m, c, i: m.add(ALICE, c, "   "), InvalidRequest, "invalid_request"),
    "text int on update": (lambda m, c, i: m.update(ALICE, c, i, text=123), InvalidRequest, "invalid_request"),
    "tags string": (lambda m, c, i: m.add(ALICE, c, "x", tags="x"), InvalidRequest, "invalid_request"),
    "tag not a string": (lambda m, c, i: m.add(ALICE, c, "x", tags=[1]), InvalidRequest, "invalid_request"),
    "tag with control char": (lambda m, c, i: m.add(ALICE, c, "x", tags=["a\nb"]), InvalidRequest, "invalid_request"),
    "tag with trailing newline": (lambda m, c, i: m.update(ALICE, c, i, tags=["a\n"]), InvalidRequest, "invalid_request"),
    "too many tags": (lambda m, c, i: m.add(ALICE, c, "x", tags=[f"t{n}" for n in range(65)]), TooLarge, "too_large"),
    "metadata int key": (lambda m, c, i: m.add(ALICE, c, "x", metadata={1: "a"}), InvalidRequest, "invalid_request"),
    "metadata nested int key": (lambda m, c, i: m.add(ALICE, c, "x", metadata={"a": {2: "b"}}), InvalidRequest, "invalid_request"),
    "metadata object": (lambda m, c, i: m.add(ALICE, c, "x", metadata={"a": object()}), InvalidRequest, "invalid_request"),
    "metadata bytes": (lambda m, c, i: m.update(ALICE, c, i, metadata={"a": b"raw"}), InvalidRequest, "invalid_request"),
    "metadata not a map": (lambda m, c, i: m.add(ALICE, c, "x", metadata=["a"]), InvalidRequest, "invalid_request"),
    "metadata too large": (lambda m, c, i: m.add(ALICE, c, "x", metadata={"a": BIG}), TooLarge, "too_large"),
    "version string": (lambda m, c, i: m.get(ALICE, c, i, at="3"), InvalidRequest, "invalid_request"),
    "version bool": (lambda m, c, i: m.get(ALICE, c, i, at=True), InvalidRequest, "invalid_request"),
    "version negative": (lambda m, c, i: m.list(ALICE, c, at=-1), InvalidRequest, "invalid_request"),
    "version float": (lambda m, c, i: m.state(ALICE, c, at=1.0), InvalidRequest, "invalid_request"),
    "expected_version string": (lambda m, c, i: m.update(ALICE, c, i, text="y", expected_version="3"), InvalidRequest, "invalid_request"),
    "expected_version bool": (lambda m, c, i: m.delete(ALICE, c, i, expected_version=True), InvalidRequest, "invalid_request"),
    "rollback version string": (lambda m, c, i: m.rollback(ALICE, c, "1"), InvalidRequest, "invalid_request"),
    "rollback version bool": (lambda m, c, i: m.rollback(ALICE, c, False), InvalidRequest, "invalid_request"),
    "diff version bool": (lambda m, c, i: m.diff(ALICE, c, True, 2), InvalidRequest, "invalid_request"),
    "version beyond latest": (lambda m, c, i: m.get(ALICE, c, i, at=99), NotFound, "not_found"),
    "cube name over 64 bytes": (lambda m, c, i: m.create_cube(ALICE, "c" * 65), TooLarge, "too_large"),
    "cube name over key size": (lambda m, c, i: m.get(ALICE, "c" * 600, i), TooLarge, "too_large"),
    "oversized text": (lambda m, c, i: m.add(ALICE, c, BIG), TooLarge, "too_large"),
    "oversized text on update": (lambda m, c, i: m.update(ALICE, c, i, text=BIG), TooLarge, "too_large"),
    "empty name": (lambda m, c, i: m.create_cube(ALICE, ""), InvalidRequest, "invalid_request"),
    "name with space": (lambda m, c, i: m.create_cube(ALICE, "a b"), InvalidRequest, "invalid_request"),
    "name with path": (lambda m, c, i: m.create_cube(ALICE, "../x"), InvalidRequest, "invalid_request"),
    "name with NUL": (lambda m, c, i: m.create_cube(ALICE, "\x00"), InvalidRequest, "invalid_request"),
    "name with inner NUL": (lambda m, c, i: m.create_cube(ALICE, "a\x00b"), InvalidRequest, "invalid_request"),
    "name with trailing newline": (lambda m, c, i: m.create_cube(ALICE, "ok\n"), InvalidRequest, "invalid_request"),
    "name with lone surrogate": (lambda m, c, i: m.create_cube(ALICE, "a\ud800"), InvalidRequest, "invalid_request"),
    "name not a string": (lambda m, c, i: m.create_cube(ALICE, 7), InvalidRequest, "invalid_request"),
    "agent name invalid": (lambda m, c, i: m.grant(ALICE, c, "../bob", "read"), InvalidRequest, "invalid_request"),
    "settings not a map": (lambda m, c, i: m.create_cube(ALICE, "fresh", settings=[1]), InvalidRequest, "invalid_request"),
    "empty add_many": (lambda m, c, i: m.add_many(ALICE, c, []), InvalidRequest, "invalid_request"),
    "add_many bad item": (lambda m, c, i: m.add_many(ALICE, c, [NewMemory(text="ok"), NewMemory(tags="x", text="y")]),
                          InvalidRequest, "invalid_request"),
    "unknown type": (lambda m, c, i: m.add(ALICE, c, "x", type="episodic"), InvalidRequest, "invalid_request"),
    "blob not bytes": (lambda m, c, i: m.add(ALICE, c, None, type="opaque", blob="text"), InvalidRequest, "invalid_request"),
    "unknown status": (lambda m, c, i: m.update(ALICE, c, i, status="gone"), InvalidRequest, "invalid_request"),
    "sources not a list": (lambda m, c, i: m.add(ALICE, c, "x", sources="abc"), InvalidRequest, "invalid_request"),
    "source missing": (lambda m, c, i: m.add(ALICE, c, "x", sources=[{"memory_id": ID, "version": 1}]), NotFound, "not_found"),
    "source version string": (lambda m, c, i: m.add(ALICE, c, "x", sources=[{"memory_id": i, "version": "1"}]),
                              InvalidRequest, "invalid_request"),
    "source version bool": (lambda m, c, i: m.add(ALICE, c, "x", sources=[{"memory_id": i, "version": True}]),
                            InvalidRequest, "invalid_request"),
    "source id not a string": (lambda m, c, i: m.add(ALICE, c, "x", sources=[{"memory_id": 5, "version": 1}]),
                               InvalidRequest, "invalid_request"),
    "policy not a string": (lambda m, c, i: m.add(ALICE, c, "x", policy=5), InvalidRequest, "invalid_request"),
    "list limit negative": (lambda m, c, i: m.list(ALICE, c, limit=-1), InvalidRequest, "invalid_request"),
    "list after malformed": (lambda m, c, i: m.list(ALICE, c, after="zz"), InvalidRequest, "invalid_request"),
    "history limit zero": (lambda m, c, i: m.history(ALICE, c, limit=0), InvalidRequest, "invalid_request"),
    "rollback ids a string": (lambda m, c, i: m.rollback(ALICE, c, 1, memory_ids=i), InvalidRequest, "invalid_request"),
    "rollback unknown id": (lambda m, c, i: m.rollback(ALICE, c, 1, memory_ids=[ID]), NotFound, "not_found"),
    "blob id malformed": (lambda m, c, i: m.get_blob(ALICE, c, "abc"), InvalidRequest, "invalid_request"),
    "blob unknown": (lambda m, c, i: m.get_blob(ALICE, c, "0" * 64), NotFound, "not_found"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_bad_input_is_typed_and_changes_nothing(populated, case):
    m, cube, mid = populated
    call, cls, code = CASES[case]
    before, seq = observable(m), audit_seq(m)
    with pytest.raises(cls) as err:
        call(m, cube, mid)
    assert type(err.value) is cls
    assert err.value.code == code
    assert observable(m) == before
    # The failure itself is recorded: exactly one new audit record, outcome error.
    assert audit_seq(m) == seq + 1
    record = m.audit_tail(LOCAL_ADMIN, 1)[0]
    assert record.outcome == "error"
    assert record.detail["code"] == code
    assert m.audit_verify(LOCAL_ADMIN).ok


def test_failed_unit_in_a_group_commit_leaves_the_others(populated):
    m, cube, mid = populated
    writes = [
        m.write_add(ALICE, cube, "good 1"),
        m.write_create_cube(ALICE, "bad\ud800"),
        m.write_add(ALICE, cube, 123),
        m.write_add(ALICE, cube, "good 2"),
    ]
    results = m.apply(writes)
    assert [type(r).__name__ for r in results] == ["Memory", "InvalidRequest", "InvalidRequest", "Memory"]
    assert [x.text for x in m.list(ALICE, cube)][-2:] == ["good 1", "good 2"]
    outcomes = [(r.op, r.outcome) for r in m.audit_tail(LOCAL_ADMIN, 4)]
    assert outcomes == [("add", "ok"), ("create_cube", "error"), ("add", "error"), ("add", "ok")]
    assert m.audit_verify(LOCAL_ADMIN).ok
