"""Backups taken while memosd serves restore to identical stores; a cube exported from one daemon
is imported by another with its whole history, and an altered export is refused whole."""

from __future__ import annotations

import hashlib
import json
import threading

import msgpack
import pytest
from daemon_fixtures import admin, daemon, fresh_daemon, make_daemon  # noqa: F401  (fixtures)
from daemon_fixtures import memosctl

from memos import codec
from memos.api import LOCAL_ADMIN, Memos
from memos.backup import restore
from memos.errors import Conflict, Denied, IntegrityError


def everything(m: Memos, cube: str, version: int | None = None) -> dict:
    """A cube's history and every version record's exact bytes, up to ``version``."""
    with m.store.read() as txn:
        found = m.ledger.cube(txn, cube)
        top = found.version if version is None else version
        commits = [c.model_dump() for c in m.ledger.commits(txn, cube, 0, top)]
        prefix = cube.encode() + b"\0"
        states = {}
        cur = txn.cursor(db=m.store.db["versions"])
        ok = cur.set_range(prefix)
        while ok and cur.key().startswith(prefix):
            if codec.from_u64(cur.key()[-8:]) <= top:
                states[bytes(cur.key())] = bytes(cur.value())
            ok = cur.next()
        blobs = {sha: m.ledger.get_blob(txn, sha) for sha in _blob_shas(m, txn, states)}
    return {"commits": commits, "states": states, "blobs": blobs}


def _blob_shas(m: Memos, txn, states: dict) -> set[str]:
    from memos.models import Memory

    out = set()
    for key, state in states.items():
        if state:
            blob = Memory.from_state_bytes(state, codec.from_u64(key[-8:])).blob
            if blob is not None:
                out.add(blob.sha256)
    return out


@pytest.mark.lmdb_only
def test_a_backup_taken_while_writes_go_on_restores_to_an_identical_store(fresh_daemon, tmp_path):
    d = fresh_daemon
    admin_client = d.client()
    admin_client.cube_create("busy")
    blob = admin_client.add("busy", "a blob", type="opaque", blob=b"\x07" * 5000)
    stop = threading.Event()
    acknowledged: list[int] = []

    def write():
        writer = d.client()
        i = 0
        while not stop.is_set():
            acknowledged.append(writer.add("busy", f"note {i}").version)
            i += 1

    thread = threading.Thread(target=write)
    thread.start()
    while len(acknowledged) < 20:
        threading.Event().wait(0.01)
    out = memosctl(d, "backup", str(tmp_path / "backup"), "--json")
    stop.set()
    thread.join()
    manifest = json.loads(out.stdout)
    assert manifest["sha256"] and (tmp_path / "backup" / "manifest.json").exists()
    d.stop()

    report = restore(tmp_path / "backup", tmp_path / "restored")
    assert report["audit"]["ok"]
    with Memos(tmp_path / "restored") as copy, Memos(d.data_dir) as source:
        restored_version = copy.get_cube(LOCAL_ADMIN, "busy").version
        assert manifest["audit_at_least"]["seq"] <= copy.audit_verify(LOCAL_ADMIN).records
        assert 20 <= restored_version <= source.get_cube(LOCAL_ADMIN, "busy").version
        # A prefix of the source's history, byte for byte: one consistent snapshot.
        assert everything(copy, "busy") == everything(source, "busy", restored_version)
        assert copy.get(LOCAL_ADMIN, "busy", blob.id).blob.sha256 == blob.blob.sha256

    with pytest.raises(Conflict):
        restore(tmp_path / "backup", tmp_path / "restored")  # never over a store
    data = tmp_path / "backup" / "data.mdb"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError):
        restore(tmp_path / "backup", tmp_path / "other")
    assert not (tmp_path / "other" / "data.mdb").exists()


@pytest.mark.lmdb_only
def test_memosctl_restore_checks_and_reports(fresh_daemon, tmp_path):
    d = fresh_daemon
    d.client().cube_create("small")
    memosctl(d, "backup", str(tmp_path / "b"))
    memosctl(d, "backup", str(tmp_path / "b"), ok=False)  # the folder is not empty any more
    out = memosctl(d, "restore", str(tmp_path / "b"), "--data-dir", str(tmp_path / "r"), "--json")
    assert [c["name"] for c in json.loads(out.stdout)["cubes"]] == ["small"]


def test_a_cube_moves_between_daemons_with_its_whole_history(make_daemon, tmp_path):
    source, target = make_daemon().start(), make_daemon().start()
    a = source.client()
    a.cube_create("moving")
    first = a.add("moving", "Ada prefers tea", tags=["pref"])
    a.update("moving", first.id, "Ada prefers coffee")
    second = a.add("moving", "the deploy key rotates on Fridays")
    a.add("moving", "a cache", type="opaque", blob=b"\x01\x02" * 3000)
    a.delete("moving", second.id)
    a.rollback("moving", 3)  # brings the deleted memory back
    path = tmp_path / "moving.cube"
    exported = a.cube_export("moving", str(path))
    assert exported["head"] == a.cube_get("moving").version and exported["blobs"] == 1
    with pytest.raises(Conflict):
        a.cube_export("moving", str(path))  # never over a file

    b = target.client()
    imported = b.cube_import(str(path))
    assert imported["head"] == exported["head"]
    assert [h.model_dump() for h in b.history("moving")] == [h.model_dump() for h in a.history("moving")]
    assert b.get("moving", first.id, at=2).text == "Ada prefers coffee"
    assert [h.memory.id for h in b.search("moving", "deploy key", k=1)] == [second.id]  # indexed
    assert b.audit_verify().ok
    with pytest.raises(Conflict):
        b.cube_import(str(path))  # the cube exists now
    source.stop()
    target.stop()
    with Memos(source.data_dir, storage=source.storage) as one, Memos(target.data_dir, storage=target.storage) as two:
        assert everything(one, "moving") == everything(two, "moving")


def test_an_altered_export_is_refused_whole(make_daemon, tmp_path):
    d = make_daemon().start()
    c = d.client()
    c.cube_create("orig")
    m = c.add("orig", "the original text")
    path = tmp_path / "orig.cube"
    c.cube_export("orig", str(path))
    data = path.read_bytes()
    tampered = tmp_path / "tampered.cube"  # the header's owner changed: only the trailer's hash sees it
    at = data.index(b"admin")
    tampered.write_bytes(data[:at] + b"Admin" + data[at + 5:])
    forged = tmp_path / "forged.cube"  # the text changed and the trailer recomputed, as a forger would
    forged.write_bytes(_with_trailer([_poisoned(r) for r in _records(path)]))
    truncated = tmp_path / "cut.cube"
    truncated.write_bytes(data[: len(data) // 2])
    other = make_daemon().start().client()
    for bad in (tampered, forged, truncated):
        with pytest.raises(IntegrityError):
            other.cube_import(str(bad))
    assert other.cube_list() == []
    agent = d.client(token=c.agent_add("mover")["token"])
    with pytest.raises(Denied):
        agent.cube_export("orig", str(tmp_path / "x.cube"))
    assert m.id


def _records(path) -> list:
    with open(path, "rb") as f:
        return list(msgpack.Unpacker(f, raw=False, strict_map_key=False))[:-1]  # without the trailer


def _poisoned(record):
    if isinstance(record, list) and record[0] == "state" and record[3]:
        state = codec.unpack(record[3])
        state["text"] = "the poisoned text"
        return [*record[:3], codec.pack(state)]
    return record


def _with_trailer(records: list) -> bytes:
    body = b"".join(codec.pack(r) for r in records)
    return body + codec.pack({"end": True, "records": len(records) - 1, "sha256": hashlib.sha256(body).hexdigest()})
