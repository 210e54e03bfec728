"""The hash-chained audit log: a valid log verifies, every kind of tampering is caught."""

from __future__ import annotations

import pytest

from conftest import ALICE, BOB
from memos import codec
from memos.api import LOCAL_ADMIN
from memos.errors import Denied, InvalidRequest, NotFound


@pytest.fixture
def logged(memos, cube):
    """A log of 1 (create_cube) + 9 (adds) + 1 (update) = 11 records."""
    mems = [memos.add(ALICE, cube, f"m{i}") for i in range(9)]
    memos.update(ALICE, cube, mems[0].id, text="changed")
    return memos


def raw_records(m):
    with m.store.read() as txn:
        return [(codec.from_u64(k), bytes(v)) for k, v in txn.cursor(db=m.store.db["audit"])]


def test_valid_log_verifies(logged):
    report = logged.audit_verify(LOCAL_ADMIN)
    assert report.ok and report.records == 11 and report.first_bad is None
    assert report.head == logged.audit_checkpoint(LOCAL_ADMIN)
    assert [s for s, _ in raw_records(logged)] == list(range(1, 12))
    tail = logged.audit_tail(LOCAL_ADMIN, 3)
    assert [(r.seq, r.op, r.outcome, r.version) for r in tail] == [(9, "add", "ok", 8), (10, "add", "ok", 9),
                                                                   (11, "update", "ok", 10)]
    assert [r.seq for r in logged.audit_tail(LOCAL_ADMIN, 2, after=3)] == [4, 5]
    assert logged.audit_verify(LOCAL_ADMIN, logged.audit_checkpoint(LOCAL_ADMIN)).ok


@pytest.mark.parametrize("offset", [0, 7, 20, 40, -3, -20])
def test_flipped_byte_is_detected(logged, offset):
    seq, value = raw_records(logged)[5]
    assert seq == 6
    damaged = bytearray(value)
    damaged[offset] ^= 0x01
    logged.store.write(lambda txn: txn.put(codec.u64(seq), bytes(damaged), db=logged.store.db["audit"]))
    report = logged.audit_verify(LOCAL_ADMIN)
    assert not report.ok
    assert report.first_bad == 6
    assert report.records == 5


def test_rewritten_record_with_fixed_hash_breaks_the_next_link(logged):
    from memos.models import AuditRecord

    seq, value = raw_records(logged)[4]
    record = AuditRecord.model_validate(codec.unpack(value))
    record.actor = "mallory"
    record.hash = codec.sha256_hex(record.body_bytes())  # a consistent forgery of one record
    logged.store.write(lambda txn: txn.put(codec.u64(seq), codec.pack(record.model_dump(mode="json")),
                                           db=logged.store.db["audit"]))
    report = logged.audit_verify(LOCAL_ADMIN)
    assert (report.ok, report.first_bad) == (False, 6)


def test_deleted_middle_record_is_detected(logged):
    assert logged.store.write(lambda txn: txn.delete(codec.u64(7), db=logged.store.db["audit"]))
    report = logged.audit_verify(LOCAL_ADMIN)
    assert (report.ok, report.first_bad, report.records) == (False, 7, 6)
    assert "missing" in report.reason


def _truncate(m, k, rewrite_head):
    records = raw_records(m)

    def cut(txn):
        for seq, _ in records[-k:]:
            txn.delete(codec.u64(seq), db=m.store.db["audit"])
        if rewrite_head:
            last = codec.unpack(records[-k - 1][1])
            txn.put(b"audit_head", codec.pack({"seq": last["seq"], "head": last["hash"]}), db=m.store.db["meta"])

    m.store.write(cut)


def test_truncated_tail_is_detected(logged):
    checkpoint = logged.audit_checkpoint(LOCAL_ADMIN)
    _truncate(logged, 3, rewrite_head=False)
    report = logged.audit_verify(LOCAL_ADMIN)
    assert (report.ok, report.first_bad) == (False, 9)
    assert logged.audit_verify(LOCAL_ADMIN, checkpoint).first_bad == 9


def test_clean_truncation_needs_a_checkpoint(logged):
    checkpoint = logged.audit_checkpoint(LOCAL_ADMIN)
    assert checkpoint.seq == 11
    _truncate(logged, 3, rewrite_head=True)
    # Without a checkpoint a cut tail plus a rewritten head is a valid shorter chain.
    plain = logged.audit_verify(LOCAL_ADMIN)
    assert plain.ok and plain.records == 8
    report = logged.audit_verify(LOCAL_ADMIN, checkpoint)
    assert (report.ok, report.first_bad) == (False, 9)
    assert "truncated" in report.reason
    assert logged.audit_verify(LOCAL_ADMIN, checkpoint.model_dump()).first_bad == 9


def test_checkpoint_with_a_different_hash_is_detected(logged):
    checkpoint = logged.audit_checkpoint(LOCAL_ADMIN)
    logged.add(ALICE, "notes", "later")
    assert logged.audit_verify(LOCAL_ADMIN, checkpoint).ok  # a log that grew is fine
    forged = checkpoint.model_copy(update={"head": "f" * 64})
    report = logged.audit_verify(LOCAL_ADMIN, forged)
    assert (report.ok, report.first_bad) == (False, 11)


def test_denials_and_errors_are_audited(memos, cube):
    memos.add(ALICE, cube, "x")
    with pytest.raises(Denied):
        memos.add(BOB, cube, "not allowed")
    record = memos.audit_tail(LOCAL_ADMIN, 1)[0]
    assert (record.outcome, record.actor, record.op, record.cube) == ("denied", "bob", "add", cube)
    assert record.detail["code"] == "denied"
    with pytest.raises(NotFound):
        memos.get(ALICE, cube, "0" * 26)  # failed reads are audited too
    record = memos.audit_tail(LOCAL_ADMIN, 1)[0]
    assert (record.outcome, record.op, record.detail["code"]) == ("error", "get", "not_found")
    with pytest.raises(Denied):
        memos.audit_verify(BOB)
    record = memos.audit_tail(LOCAL_ADMIN, 1)[0]
    assert (record.outcome, record.op, record.actor) == ("denied", "audit_verify", "bob")
    assert memos.audit_verify(LOCAL_ADMIN).ok


def test_audit_record_lists_memories_and_version(memos, cube):
    from memos.api import NewMemory

    mems = memos.add_many(ALICE, cube, [NewMemory(text=f"t{i}") for i in range(150)])
    record = memos.audit_tail(LOCAL_ADMIN, 1)[0]
    assert (record.op, record.version, record.cube) == ("add_many", 1, cube)
    assert record.detail["memories"] == [m.id for m in mems[:100]]
    assert record.detail["memories_total"] == 150


def test_audit_tail_checks_its_arguments(logged):
    for kwargs in ({"n": 0}, {"n": True}, {"n": 2, "after": -1}, {"n": 2, "after": "3"}):
        with pytest.raises(InvalidRequest) as err:
            logged.audit_tail(LOCAL_ADMIN, **kwargs)
        assert err.value.code == "invalid_request", kwargs
    assert logged.audit_tail(LOCAL_ADMIN, 5, after=11) == []
