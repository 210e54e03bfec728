"""Signed audit checkpoints and audit retention.

Whoever can write the store can rewrite the audit chain and re-hash it: the
unsigned verify cannot tell. A checkpoint signed with a key kept outside the
data folder can, and so can memosd, which refuses to sign a chain that no
longer continues its last signature. Archiving moves the oldest records out
only behind a signed checkpoint, leaving a boundary that a signature vouches
for; records deleted by hand still fail verification.
"""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

import pytest
from conftest import ALICE, register
from daemon_fixtures import make_daemon, memosctl  # noqa: F401 (a fixture)

from memos import codec, config
from memos.api import LOCAL_ADMIN, Memos
from memos.checkpoints import CheckpointLog, Signer, public_key_path
from memos.errors import ConfigError, Denied, IntegrityError, InvalidRequest
from memos.models import AuditRecord, Boundary


class Signed:
    """A store with a signing key and checkpoint file outside it, as memosd sets them up."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.key = root / "config" / "audit-signing.key"
        self.file = root / "config" / "audit-checkpoints.jsonl"
        self.store = root / "store"
        self.log = CheckpointLog.open(self.key, self.file, self.store)
        self.m = Memos(self.store, checkpoints=self.log)
        register(self.m, ALICE)
        self.m.create_cube(ALICE, "notes")

    def add(self, n: int) -> None:
        for i in range(n):
            self.m.add(ALICE, "notes", f"memory {i}")

    def sign(self):
        return self.m.audit_sign(LOCAL_ADMIN)

    def lines(self) -> list[dict]:
        return [json.loads(line) for line in self.file.read_text().splitlines()]

    def verify(self, **kw):
        return self.m.audit_verify(LOCAL_ADMIN, signed=self.lines(), **kw)

    def seq(self) -> int:
        return self.m.audit_checkpoint(LOCAL_ADMIN).seq


@pytest.fixture
def s(tmp_path):
    signed = Signed(tmp_path)
    yield signed
    signed.m.close()


def forge(m: Memos, seq: int, **changes) -> None:
    """What an attacker who can write the store does: rewrite record ``seq``, then re-hash it, every
    later record and the head with the same unkeyed hashing, so the chain holds again."""
    audit, meta = m.store.db["audit"], m.store.db["meta"]
    with m.store.env.begin(write=True) as txn:
        prev = last = None
        for key, raw in list(txn.cursor(db=audit)):
            record = AuditRecord.model_validate(codec.unpack(raw))
            if record.seq < seq:
                continue
            if record.seq == seq:
                for name, value in changes.items():
                    setattr(record, name, value)
            else:
                record.prev = prev
            record.hash = codec.sha256_hex(record.body_bytes())
            txn.put(bytes(key), codec.pack(record.model_dump(mode="json")), db=audit)
            prev, last = record.hash, record
        txn.put(b"audit_head", codec.pack({"seq": last.seq, "head": last.hash}), db=meta)


def delete_records(m: Memos, before: int, boundary: bool) -> None:
    """Remove records by hand; with ``boundary``, also write the boundary an archive would have."""
    audit, meta = m.store.db["audit"], m.store.db["meta"]
    with m.store.env.begin(write=True) as txn:
        prev = codec.unpack(txn.get(codec.u64(before - 1), db=audit))["hash"]
        for seq in range(1, before):
            txn.delete(codec.u64(seq), db=audit)
        if boundary:
            txn.put(b"audit_start", codec.pack({"seq": before, "prev": prev}), db=meta)


# -- signing -----------------------------------------------------------------------------

def test_a_rewritten_chain_passes_the_unsigned_verify_but_not_the_signed_checkpoints(s):
    s.add(4)
    first = s.sign()  # record 5
    s.add(6)
    second = s.sign()  # record 11
    assert (first.seq, second.seq) == (5, 11)
    assert s.verify().ok and s.verify().checkpoints == 2
    unsigned = s.m.audit_checkpoint(LOCAL_ADMIN)

    forge(s.m, 8, detail={"memories": ["01FORGED0000000000000000AA"]})

    plain = s.m.audit_verify(LOCAL_ADMIN)
    assert plain.ok and plain.records == 11  # the forgery is a valid chain
    assert not s.m.audit_verify(LOCAL_ADMIN, unsigned).ok  # (an unsigned head only helps if kept safe)
    report = s.verify()
    assert not report.ok and report.first_bad == 11
    assert "line 2" in report.reason and "one of records 6 to 11 was rewritten" in report.reason
    # memosd will not sign the rewritten head: that would vouch for the forgery.
    with pytest.raises(IntegrityError, match="no longer continues the last signed checkpoint"):
        s.sign()
    with pytest.raises(IntegrityError):
        s.m.audit_admin.export()
    assert len(s.lines()) == 2
    assert s.m.audit_tail(LOCAL_ADMIN, 1)[0].op == "audit_sign"  # the refusal is audited


def test_a_rewritten_tail_after_the_last_signature_is_not_signed_either(s):
    s.add(3)
    s.sign()  # record 4
    s.add(3)
    forge(s.m, 6, actor="mallory")  # after the signature: its chain still continues record 4
    assert s.verify().ok  # nothing signed covers record 6 yet: the window is checkpoint_every_s
    forge(s.m, 3, actor="mallory")  # before it: the next signature is refused
    with pytest.raises(IntegrityError, match=r"record 5 does not chain to record 4"):
        s.m.audit_admin.export()


def test_export_appends_only_when_the_head_moved(s):
    assert s.m.audit_admin.export().seq == 1
    assert s.m.audit_admin.export() is None
    s.add(1)
    assert s.m.audit_admin.export().seq == 2
    assert [line["seq"] for line in s.lines()] == [1, 2]
    assert stat.S_IMODE(s.file.stat().st_mode) == 0o600


@pytest.mark.parametrize("field", ["seq", "head", "time", "boundary", "signature", "key_id"])
def test_a_tampered_checkpoint_line_is_rejected(s, field):
    s.add(3)
    s.sign()
    s.add(2)
    s.sign()
    lines = s.lines()
    line = lines[1]
    if field == "seq":
        line["seq"] -= 1
    elif field == "head":
        line["head"] = ("0" if line["head"][0] != "0" else "1") + line["head"][1:]
    elif field == "time":
        line["time"] += 1
    elif field == "boundary":
        line["boundary"]["seq"] = 3
    elif field == "signature":
        line["signature"] = line["signature"][:-1] + ("0" if line["signature"][-1] != "0" else "1")
    else:
        line["key_id"] = "0" * 16
    report = s.m.audit_verify(LOCAL_ADMIN, signed=lines)
    assert not report.ok and report.reason.startswith("checkpoint line 2"), report.reason
    assert ("names key" if field == "key_id" else "signature does not verify") in report.reason


def test_checkpoints_signed_by_another_key_are_rejected(s, tmp_path):
    s.add(2)
    s.sign()
    other = Signer.load(tmp_path / "other" / "key")
    forged = other.sign(s.seq(), s.m.audit_checkpoint(LOCAL_ADMIN).head, Boundary())
    report = s.m.audit_verify(LOCAL_ADMIN, signed=[*s.lines(), forged.model_dump(mode="json")])
    assert not report.ok and "line 2" in report.reason and "names key" in report.reason
    # ... unless it is the key the caller names, and then the store's own lines are the strangers.
    pem = public_key_path(tmp_path / "other" / "key").read_text()
    assert s.m.audit_verify(LOCAL_ADMIN, signed=[forged.model_dump(mode="json")], public_key=pem).ok
    assert not s.m.audit_verify(LOCAL_ADMIN, signed=s.lines(), public_key=pem).ok
    with pytest.raises(InvalidRequest):
        s.m.audit_verify(LOCAL_ADMIN, signed=s.lines(), public_key="not a key")


def test_a_malformed_line_is_rejected(s):
    s.sign()
    report = s.m.audit_verify(LOCAL_ADMIN, signed=[{"seq": 1, "head": "x"}])
    assert not report.ok and "line 1 is not a signed checkpoint" in report.reason


def test_signing_and_archiving_are_for_the_administrator_and_need_a_key(s, tmp_path):
    s.sign()
    with pytest.raises(Denied):
        s.m.audit_sign(ALICE)
    with pytest.raises(Denied):
        s.m.audit_archive(ALICE, 2, str(tmp_path / "a"))
    with Memos(tmp_path / "plain") as m:
        with pytest.raises(ConfigError, match="no audit signing key"):
            m.audit_sign(LOCAL_ADMIN)
        with pytest.raises(InvalidRequest, match="public_key"):
            m.audit_verify(LOCAL_ADMIN, signed=s.lines())


# -- the key -------------------------------------------------------------------------------

def test_the_key_is_made_private_with_its_public_key_beside_it(s):
    assert stat.S_IMODE(s.key.stat().st_mode) == 0o600
    assert stat.S_IMODE(s.key.parent.stat().st_mode) == 0o700
    pub = public_key_path(s.key)
    assert pub.name == "audit-signing.key.pub" and b"PRIVATE" not in pub.read_bytes()
    again = CheckpointLog.open(s.key, s.file, s.store)  # loaded, not made again
    assert again.signer.key_id == s.log.signer.key_id


def test_a_key_readable_by_others_is_refused(s):
    os.chmod(s.key, 0o644)
    with pytest.raises(ConfigError, match="readable by other users.*0600"):
        CheckpointLog.open(s.key, s.file, s.store)


@pytest.mark.parametrize("which", ["key", "file"])
def test_a_key_or_checkpoint_file_inside_the_data_folder_is_refused(tmp_path, which):
    data = tmp_path / "data"
    inside, outside = data / "audit" / "x", tmp_path / "config" / "x"
    key, file = (inside, outside) if which == "key" else (outside, inside)
    with pytest.raises(ConfigError, match="inside the data folder"):
        CheckpointLog.open(key, file, data)
    assert not inside.parent.exists()


def test_a_public_key_that_is_not_the_keys_is_refused(s, tmp_path):
    public_key_path(s.key).write_bytes(Signer.load(tmp_path / "other" / "key").public_pem())
    with pytest.raises(ConfigError, match="not the public key"):
        CheckpointLog.open(s.key, s.file, s.store)


def test_settings_name_the_key_and_file(monkeypatch, tmp_path):
    monkeypatch.delenv("MEMOS_AUDIT__SIGNING_KEY", raising=False)
    monkeypatch.delenv("MEMOS_AUDIT__CHECKPOINT_FILE", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    audit = config.load(types={}).audit
    assert audit.key_path() == tmp_path / "xdg" / "memos" / "audit-signing.key"
    assert audit.checkpoint_path() == tmp_path / "xdg" / "memos" / "audit-checkpoints.jsonl"
    assert audit.checkpoint_every_s == 300
    monkeypatch.setenv("MEMOS_AUDIT__SIGNING_KEY", str(tmp_path / "k" / "key"))
    monkeypatch.setenv("MEMOS_AUDIT__CHECKPOINT_EVERY_S", "7.5")
    audit = config.load(types={}).audit
    assert audit.checkpoint_path() == tmp_path / "k" / "audit-checkpoints.jsonl"  # beside the key
    assert audit.checkpoint_every_s == 7.5


# -- retention -------------------------------------------------------------------------------

def test_archive_then_verify(s, tmp_path):
    s.add(9)
    s.sign()  # record 10
    report = s.m.audit_archive(LOCAL_ADMIN, 6, str(tmp_path / "a1.msgpack"))
    assert (report.first, report.last, report.checkpoint, report.boundary.seq) == (1, 5, 10, 6)
    assert stat.S_IMODE((tmp_path / "a1.msgpack").stat().st_mode) == 0o600
    record = s.m.audit_tail(LOCAL_ADMIN, 1)[0]
    assert (record.seq, record.op, record.outcome, record.detail["last"]) == (11, "audit_archive", "ok", 5)
    assert record.detail["sha256"] == report.sha256

    alone = s.m.audit_verify(LOCAL_ADMIN)
    assert alone.ok and alone.records == 6 and alone.boundary.seq == 6  # records 6..11
    assert s.verify().ok
    whole = s.verify(archives=[str(tmp_path / "a1.msgpack")])
    assert whole.ok and whole.records == 11 and whole.unchecked == 0

    s.add(5)
    s.sign()  # record 16
    s.m.audit_archive(LOCAL_ADMIN, 15, str(tmp_path / "a2.msgpack"))
    archives = [str(tmp_path / "a1.msgpack"), str(tmp_path / "a2.msgpack")]
    assert s.verify().ok
    assert s.verify(archives=archives).ok and s.verify(archives=archives).records == 17
    assert s.verify().unchecked == 2  # the two checkpoints of record 10 name archived records
    assert "record 1 is missing" in s.verify(archives=archives[1:]).reason
    assert "the archives end at record 5, but the store's chain begins after record 14" in \
        s.verify(archives=archives[:1]).reason
    assert not s.verify(archives=archives[::-1]).ok
    assert s.m.audit_admin.export() is not None  # the schedule goes on signing after an archive


def test_an_altered_archive_fails_verification(s, tmp_path):
    s.add(5)
    s.sign()
    path = tmp_path / "a.msgpack"
    s.m.audit_archive(LOCAL_ADMIN, 5, str(path))
    data = bytearray(path.read_bytes())
    at = data.index(b"memory") if b"memory" in data else len(data) - 10
    data[at] ^= 1
    path.write_bytes(bytes(data))
    report = s.verify(archives=[str(path)])
    assert not report.ok


def test_archive_beyond_a_signed_checkpoint_is_refused(s, tmp_path):
    s.add(4)
    s.sign()  # record 5
    s.add(4)
    target = tmp_path / "a.msgpack"
    with pytest.raises(InvalidRequest, match="no signed checkpoint covers record 6"):
        s.m.audit_archive(LOCAL_ADMIN, 6, str(target))
    assert not target.exists()
    assert s.m.audit_verify(LOCAL_ADMIN).boundary.seq == 1
    refusal = s.m.audit_tail(LOCAL_ADMIN, 1)[0]
    assert (refusal.op, refusal.outcome) == ("audit_archive", "error")
    for before, to, match in [(1, str(target), "before"), (3, "relative.msgpack", "absolute"),
                              (3, str(tmp_path), "exists already")]:
        with pytest.raises(InvalidRequest, match=match):
            s.m.audit_archive(LOCAL_ADMIN, before, to)
    s.m.audit_archive(LOCAL_ADMIN, 5, str(target))  # at the signed checkpoint: allowed
    with pytest.raises(InvalidRequest, match="archived already"):
        s.m.audit_archive(LOCAL_ADMIN, 4, str(tmp_path / "b.msgpack"))


def test_archive_is_refused_when_the_chain_does_not_verify(s, tmp_path):
    s.add(4)
    s.sign()
    forge(s.m, 2, actor="mallory")
    with pytest.raises(IntegrityError, match="nothing is archived"):
        s.m.audit_archive(LOCAL_ADMIN, 3, str(tmp_path / "a.msgpack"))
    assert not (tmp_path / "a.msgpack").exists()
    assert s.m.audit_verify(LOCAL_ADMIN).records == 6


def test_records_deleted_by_hand_fail_verification(s):
    s.add(6)
    s.sign()
    delete_records(s.m, 4, boundary=False)
    report = s.m.audit_verify(LOCAL_ADMIN)
    assert (report.ok, report.first_bad) == (False, 1) and "record 1 is missing" in report.reason


def test_a_forged_boundary_fails_against_the_signed_checkpoints(s, tmp_path):
    s.add(6)
    s.sign()  # record 7
    delete_records(s.m, 4, boundary=True)
    assert s.m.audit_verify(LOCAL_ADMIN).ok  # without signatures, a boundary cannot be told from an archive
    report = s.verify()
    assert not report.ok and "removed without `audit archive`" in report.reason
    with pytest.raises(IntegrityError, match="removed without `audit archive`"):
        s.m.audit_admin.export()


def test_deleting_past_an_archives_boundary_fails(s, tmp_path):
    s.add(8)
    s.sign()  # record 9
    s.m.audit_archive(LOCAL_ADMIN, 4, str(tmp_path / "a.msgpack"))
    assert s.verify().ok
    delete_records(s.m, 7, boundary=True)
    assert not s.verify().ok
    assert not s.verify(archives=[str(tmp_path / "a.msgpack")]).ok


# -- memosd ------------------------------------------------------------------------------------

def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for(predicate, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = predicate()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s")


def test_memosd_signs_on_its_schedule_and_at_shutdown(make_daemon, tmp_path):  # noqa: F811
    d = make_daemon(env={"MEMOS_AUDIT__CHECKPOINT_EVERY_S": "0.2"}).start()
    assert stat.S_IMODE(d.signing_key.stat().st_mode) == 0o600
    admin = d.client()
    admin.cube_create("signed")
    admin.add("signed", "one")
    head = admin.audit_checkpoint()
    _wait_for(lambda: any(line["seq"] == head.seq for line in _lines(d.checkpoint_file)))
    assert json.loads(memosctl(d, "audit", "checkpoint", "--sign", "--json").stdout)["seq"] == head.seq
    out = memosctl(d, "audit", "verify", "--checkpoint", str(d.checkpoint_file), "--strict").stdout
    assert "audit chain ok" in out and "matches" in out
    pub = public_key_path(d.signing_key)
    memosctl(d, "audit", "verify", "--checkpoint", str(d.checkpoint_file), "--public-key", str(pub), "--strict")

    lines = d.checkpoint_file.read_text().splitlines()
    forged = json.loads(lines[-1])
    forged["seq"] += 1
    bad = tmp_path / "forged.jsonl"
    bad.write_text("\n".join([*lines[:-1], json.dumps(forged)]) + "\n")
    failed = memosctl(d, "audit", "verify", "--checkpoint", str(bad), "--strict", ok=False)
    assert failed.returncode == 3 and "forged" in failed.stdout

    archive = tmp_path / "early.msgpack"
    memosctl(d, "audit", "archive", "--before", "2", "--to", str(archive))
    whole = json.loads(memosctl(d, "audit", "verify", "--checkpoint", str(d.checkpoint_file), "--archive",
                                str(archive), "--strict", "--json").stdout)
    assert whole["ok"] and whole["boundary"]["seq"] == 2

    d.env["MEMOS_AUDIT__CHECKPOINT_EVERY_S"] = "3600"  # from now on only the shutdown signs
    d.restart()
    admin = d.client()
    admin.add("signed", "two")
    final = admin.audit_checkpoint()
    before = len(_lines(d.checkpoint_file))
    d.stop()
    after = _lines(d.checkpoint_file)
    assert len(after) == before + 1 and (after[-1]["seq"], after[-1]["head"]) == (final.seq, final.head)


def test_memosd_refuses_an_unsafe_key(make_daemon):  # noqa: F811
    d = make_daemon()
    (d.root / "run").mkdir(mode=0o700)
    proc = d.spawn(env={"MEMOS_AUDIT__SIGNING_KEY": str(d.data_dir / "audit-signing.key")})
    assert proc.wait(30) == 2
    assert "inside the data folder" in d.log()
    d.signing_key.parent.mkdir(mode=0o700)
    Signer.load(d.signing_key)
    os.chmod(d.signing_key, 0o640)
    proc = d.spawn()
    assert proc.wait(30) == 2
    assert "readable by other users" in d.log()
