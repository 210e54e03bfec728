"""store_stats and store_compact against a real memosd: the file gives its free pages back and every
cube, version, blob and audit record is the same before and after, byte for byte; memosd serves the
same data again; a compaction SIGKILLed at each of its steps, and at seeded random moments, leaves a
whole store holding everything acknowledged, with the compaction done once when memosd next starts;
a client writing throughout loses nothing it was told was written."""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
import time
from pathlib import Path

import lmdb
import pytest
from daemon_fixtures import Daemon, admin, daemon, make_daemon, memosctl

from memos.client import AsyncClient
from memos.errors import Denied, InvalidRequest, MemosError

FIXTURES = (admin, daemon, make_daemon)  # pytest finds them in this module by name
BLOB = 64 << 10
# Records that a compaction itself adds to (its request and its audit) or that reads and restarts
# touch; every other sub-database must come through byte for byte.
CHANGING = {"meta", "audit", "requests", "request_times", "usage", "policy_state", "policy_runs"}


def dump(data_dir: Path) -> dict[str, dict[bytes, bytes]]:
    """Every record of every sub-database of a stopped memosd's store, as stored."""
    env = lmdb.open(str(data_dir), readonly=True, lock=False, max_dbs=256)
    try:
        with env.begin() as txn:
            names = [bytes(key) for key, _ in txn.cursor()]
            out = {}
            for name in names:
                db = env.open_db(name, txn=txn, create=False)
                out[name.decode()] = {bytes(k): bytes(v) for k, v in txn.cursor(db=db)}
        return out
    finally:
        env.close()


def assert_same_store(before: dict, after: dict, compactions: int = 1) -> None:
    """``after`` holds what ``before`` held; the audit chain only grew by the compactions' records."""
    assert set(before) == set(after)
    for name in set(before) - CHANGING:
        assert before[name] == after[name], f"{name} differs after the compaction"
    old, new = before["audit"], after["audit"]
    assert all(new.get(k) == v for k, v in old.items()), "an audit record changed"
    added = [json.loads(json.dumps(_unpack(v), default=str))["op"] for k, v in new.items() if k not in old]
    assert added.count("store_compacted") == compactions, added
    for key in set(before["meta"]) - {b"audit_head", b"last_compaction"}:
        assert before["meta"][key] == after["meta"][key], key


def _unpack(raw: bytes) -> dict:
    from memos import codec

    return codec.unpack(raw)


def fill(d: Daemon, seed: int = 7, blobs: int = 40, drop: int = 30) -> dict[str, list[str]]:
    """Cubes of text and of blobs, with updates and deletes; the blobs of deleted memories freed."""
    rng = random.Random(seed)
    c = d.client(timeout=60)
    c.cube_create("notes")
    notes = [m.id for m in c.add_many("notes", [f"note {i}" for i in range(50)])]
    for i in range(60):
        c.update("notes", rng.choice(notes), text=f"rewritten {i}")
    c.delete("notes", notes[0])
    c.cube_create("blobs")
    c.cube_retention("blobs", {"all_days": 0, "daily_days": 0, "keep_versions": 1})
    added = [c.add("blobs", f"blob {i}", type="opaque", blob=rng.randbytes(BLOB)) for i in range(blobs)]
    # Back to before the last ``drop`` were added: they are absent from the head on, so compaction
    # drops their records, and with them their blobs' pages.
    c.rollback("blobs", added[blobs - drop - 1].version)
    assert c.cube_compact("blobs").blobs_freed == drop
    return {"notes": notes, "blobs": [m.id for m in added[:blobs - drop]]}


def wait_for_log(d: Daemon, text: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while text not in d.log():
        assert d.alive(), d.log()[-3000:]
        assert time.monotonic() < deadline, f"{text!r} not in the log:\n{d.log()[-3000:]}"
        time.sleep(0.05)


def file_size(d: Daemon) -> int:
    return (d.data_dir / "data.mdb").stat().st_size


def test_compaction_gives_free_pages_back_and_keeps_everything(make_daemon):
    d = make_daemon().start()
    kept = fill(d)
    c = d.client()
    stats = c.store_stats()
    assert stats["pages"]["free"] * stats["page_size"] >= 20 * BLOB, stats["pages"]  # the dropped blobs
    d.stop()
    before, size_before = dump(d.data_dir), file_size(d)

    d.start()
    out = json.loads(memosctl(d, "store", "compact", "--json").stdout)
    assert out["bytes_before"] == size_before
    assert out["bytes_after"] < size_before - 20 * BLOB  # the dropped blobs' pages are gone
    assert file_size(d) < size_before - 20 * BLOB  # (writes since, the audit record's, may add a page or two)
    assert out["freed"] == out["bytes_before"] - out["bytes_after"] and out["paused_s"] > 0
    c = d.client()
    assert c.ping()["pid"] == d.pid  # restarted in place: the same process
    stats = c.store_stats()
    assert stats["pages"]["free"] <= 8, stats["pages"]  # a compacting copy has (next to) none
    assert stats["last_compaction"]["id"] == out["id"]
    assert c.audit_verify().ok
    for memory_id in kept["blobs"]:
        memory = c.get("blobs", memory_id)
        assert len(c.get_blob("blobs", memory.blob.sha256)) == BLOB
    assert [m.id for m in c.list("notes", status="all", limit=100)] == kept["notes"]
    record = c.audit_tail(1)[0]
    assert record.op == "store_compacted" and record.detail["bytes_after"] == out["bytes_after"]
    assert not (d.data_dir / "compacting").exists()
    d.stop()
    assert_same_store(before, dump(d.data_dir))

    d.start()  # and a compaction with nothing to free never grows the file
    out = json.loads(memosctl(d, "store", "compact", "--json").stdout)
    assert out["bytes_after"] <= out["bytes_before"]
    d.stop()


STEPS = ["compact:restarting", "compact:copied", "compact:synced", "compact:renamed", "compact:reopened"]


def test_a_compaction_killed_at_each_step_leaves_a_whole_store_and_completes_at_the_next_start(make_daemon):
    d = make_daemon().start()
    fill(d, blobs=12, drop=8)
    d.stop()
    before = dump(d.data_dir)
    for n, step in enumerate(STEPS, 1):
        d.env["MEMOS_TEST_HOLD_AT"] = step
        d.start()
        c = d.client()
        requested = c.store_compact(str(d.data_dir))
        wait_for_log(d, f"holding at {step}")
        d.kill()
        d.env.pop("MEMOS_TEST_HOLD_AT")
        assert (d.data_dir / "data.mdb").is_file()  # the old file or the new one, never neither
        d.start()  # the request is pending in whichever file the kill left: done now, once
        c = d.client()
        stats = c.store_stats()
        assert stats["last_compaction"]["id"] == requested["id"], step
        assert c.audit_verify().ok, step
        d.stop()
        after = dump(d.data_dir)
        assert_same_store(before, after, compactions=n)
        assert not (d.data_dir / "compacting").exists()


def test_a_compaction_killed_at_random_moments_loses_nothing_acknowledged(make_daemon):
    rng = random.Random(20261129)
    d = make_daemon().start()
    fill(d, blobs=12, drop=8)
    c = d.client()
    acknowledged: dict[str, str] = {}
    for round_ in range(6):
        for i in range(5):
            m = c.add("notes", f"round {round_} note {i}")
            acknowledged[m.id] = m.text
        c.store_compact(str(d.data_dir))
        time.sleep(rng.uniform(0.0, 1.5))  # somewhere in the drain, the restart, the copy or after
        d.kill()
        d.start()
        c = d.client()
        assert c.audit_verify().ok, round_
        present = {m.id: m.text for m in c.list("notes", limit=500)}
        assert acknowledged.items() <= present.items(), f"round {round_}: acknowledged writes lost"
        assert c.store_stats()["last_compaction"] is not None
    d.stop()


def test_a_client_writing_throughout_a_compaction_loses_nothing(make_daemon):
    d = make_daemon().start()
    c = d.client()
    c.cube_create("busy")
    stop = threading.Event()
    acknowledged: list[tuple[str, int, str]] = []
    failed: list[str] = []

    def write() -> None:
        writer = d.client(timeout=5, retries=4)  # a retry keeps its request id: applied once
        i = 0
        while not stop.is_set():
            try:
                m = writer.add("busy", f"note {i}", type="opaque", blob=os.urandom(4096))
                acknowledged.append((m.id, m.version, m.text))
            except MemosError as exc:  # not acknowledged: nothing is promised
                failed.append(exc.code)
            i += 1

    thread = threading.Thread(target=write)
    thread.start()
    while len(acknowledged) < 30:
        time.sleep(0.01)
    out = json.loads(memosctl(d, "store", "compact", "--json").stdout)
    mark = len(acknowledged)
    while len(acknowledged) < mark + 30:
        time.sleep(0.01)
    stop.set()
    thread.join()
    assert not failed, failed  # the announced restart: requests waited, none was refused
    c = d.client()
    for memory_id, version, text in acknowledged:
        memory = c.get("busy", memory_id)
        assert (memory.version, memory.text) == (version, text)
    assert sorted(v for _, v, _ in acknowledged) == list(range(1, len(acknowledged) + 1))
    assert c.cube_get("busy").version == len(acknowledged)
    assert c.store_stats()["last_compaction"]["id"] == out["id"]
    assert c.audit_verify().ok
    d.stop()


def test_store_stats_counts_bytes_by_cube_and_type_and_only_the_admin_may_ask(daemon, admin):
    admin.cube_create("stats-a")
    blobs = [admin.add("stats-a", "b", type="opaque", blob=bytes([i]) * 5000) for i in range(3)]
    admin.add("stats-a", "b again", type="opaque", blob=bytes([0]) * 5000)  # the same bytes: one blob
    admin.add("stats-a", "plain words")
    stats = admin.store_stats()
    cube = stats["cubes"]["stats-a"]
    assert cube["version"] == 5 and cube["commits"] == 6 and cube["version_records"] == 5
    assert cube["head_bytes"] == cube["version_bytes"] > 0
    opaque = stats["types"]["opaque"]
    assert opaque["blobs"] >= 3 and opaque["blob_bytes"] >= 15000
    assert stats["blobs"]["references"] >= 4 and stats["blobs"]["count"] >= 3
    pages = stats["pages"]
    assert pages["used"] + pages["free"] == pages["total"]
    assert stats["file_bytes"] >= pages["total"] * stats["page_size"] - stats["page_size"]
    assert blobs[0].blob.sha256
    token = admin.agent_add("stats-agent")["token"]
    agent = daemon.client(token=token)
    with pytest.raises(Denied):
        agent.store_stats()
    with pytest.raises(Denied):
        agent.store_compact(str(daemon.data_dir))
    with pytest.raises(InvalidRequest):  # the request must name the store memosd serves
        admin.store_compact("/tmp/not-this-store")
    assert "stats-a" in memosctl(daemon, "store", "stats").stdout
    assert daemon.alive() and admin.ping()


def test_a_rewrite_that_fails_leaves_the_store_as_it_was_and_is_tried_again(tmp_path):
    """A full disk, say, at open: the store opens unchanged and the request stays pending."""
    from memos.api import LOCAL_ADMIN, Memos

    with Memos(tmp_path) as m:
        m.create_cube(LOCAL_ADMIN, "kept")
        m.add(LOCAL_ADMIN, "kept", "a memory")
        requested = m.store_compact(LOCAL_ADMIN, str(tmp_path))
    (tmp_path / "compacting").write_text("in the way: the copy's folder cannot be made")
    with Memos(tmp_path) as m:
        assert m.list(LOCAL_ADMIN, "kept")[0].text == "a memory"
        assert m.store_stats(LOCAL_ADMIN)["last_compaction"] is None and m.store.rewrite_pending()
    (tmp_path / "compacting").unlink()
    with Memos(tmp_path) as m:
        assert m.store_stats(LOCAL_ADMIN)["last_compaction"]["id"] == requested["id"]
        assert not m.store.rewrite_pending() and m.audit_verify(LOCAL_ADMIN).ok


def test_an_async_client_writing_throughout_a_compaction_loses_nothing(make_daemon):
    d = make_daemon().start()
    d.client().cube_create("async-busy")
    acknowledged: list[tuple[str, int]] = []
    failed: list[str] = []
    compacted = threading.Event()

    async def write() -> None:
        async with AsyncClient(d.socket, timeout=10, retries=2) as writer:
            i, after = 0, 0
            while after < 30:
                try:
                    m = await writer.add("async-busy", f"note {i}")
                    acknowledged.append((m.id, m.version))
                except MemosError as exc:  # not acknowledged: nothing is promised
                    failed.append(exc.code)
                i += 1
                after += compacted.is_set()

    thread = threading.Thread(target=asyncio.run, args=(write(),))
    thread.start()
    while len(acknowledged) < 30:
        time.sleep(0.01)
    memosctl(d, "store", "compact", "--json")
    compacted.set()
    thread.join(120)
    assert not failed, failed  # the announced restart: the request was sent again, not refused
    c = d.client()
    assert sorted(v for _, v in acknowledged) == list(range(1, len(acknowledged) + 1))
    assert c.cube_get("async-busy").version == len(acknowledged)
    d.stop()
