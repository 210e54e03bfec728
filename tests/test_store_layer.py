"""The LMDB layer: schema and migrations, file modes, stale readers, map growth."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from conftest import ALICE
from memos import codec, storage
from conftest import TOYTYPE
from memos.api import LOCAL_ADMIN, Memos, NewMemory
from memos.errors import InvalidRequest, StorageError, TooLarge
from memos.storage import Store, StoreOptions, check_key


def test_schema_version_recorded_in_meta(store_dir):
    store = Store(store_dir)
    try:
        assert store.schema_version == storage.SCHEMA_VERSION
        with store.read() as txn:
            raw = txn.get(b"schema_version", db=store.db["meta"])
        assert codec.from_u64(raw) == storage.SCHEMA_VERSION
    finally:
        store.close()


def _set_schema(path, version: int) -> None:
    store = Store(path)
    store.write(lambda txn: txn.put(b"schema_version", codec.u64(version), db=store.db["meta"]))
    store.close()


def test_newer_schema_is_refused_and_leaves_store_reopenable(store_dir, monkeypatch):
    _set_schema(store_dir, storage.SCHEMA_VERSION + 1)
    with pytest.raises(StorageError) as err:
        Memos(store_dir)
    assert err.value.code == "storage_error"
    assert err.value.details["found"] == storage.SCHEMA_VERSION + 1
    # The refused environment was closed: a newer build can open the same path.
    monkeypatch.setattr(storage, "SCHEMA_VERSION", storage.SCHEMA_VERSION + 1)
    Store(store_dir).close()


def test_migration_hook_runs(store_dir, monkeypatch):
    current = storage.SCHEMA_VERSION
    with Memos(store_dir) as m:
        m.create_cube(ALICE, "c")
        m.add(ALICE, "c", "written under the current schema")
    calls = []

    def upgrade(store, txn):
        calls.append(store.schema_version if hasattr(store, "schema_version") else None)
        txn.put(b"migrated", b"yes", db=store.db["meta"])

    monkeypatch.setattr(storage, "SCHEMA_VERSION", current + 1)
    monkeypatch.setattr(storage, "MIGRATIONS", {**storage.MIGRATIONS, current: upgrade})
    with Memos(store_dir) as m:
        assert m.store.schema_version == current + 1
        assert [x.text for x in m.list(ALICE, "c")] == ["written under the current schema"]
        with m.store.read() as txn:
            assert txn.get(b"migrated", db=m.store.db["meta"]) == b"yes"
            assert codec.from_u64(txn.get(b"schema_version", db=m.store.db["meta"])) == current + 1
    assert len(calls) == 1
    Store(store_dir).close()  # already upgraded: the migration does not run again
    assert len(calls) == 1


def test_missing_migration_is_refused(store_dir, monkeypatch):
    current = storage.SCHEMA_VERSION
    Store(store_dir).close()
    monkeypatch.setattr(storage, "SCHEMA_VERSION", current + 2)
    monkeypatch.setattr(storage, "MIGRATIONS", {**storage.MIGRATIONS, current: lambda store, txn: None})
    with pytest.raises(StorageError) as err:
        Store(store_dir)
    assert err.value.details["found"] == current + 1
    # The failed migration rolled back: the store is still at the current schema.
    monkeypatch.setattr(storage, "SCHEMA_VERSION", current)
    store = Store(store_dir)
    assert store.schema_version == current
    store.close()


def test_schema_1_stores_get_their_stored_replies_indexed_by_time(store_dir):
    """Schema 2 added ``request_times``; upgrading indexes the replies a schema 1 store kept."""
    store = Store(store_dir)
    kept = {b"alice\0r1": 1_700_000_000.5, b"bob\0r2": 1_600_000_000.25}

    def as_schema_1(txn):
        for key, stored_at in kept.items():
            txn.put(key, codec.pack_unsorted({"time": stored_at, "reply": {"ok": True}}), db=store.db["requests"])
        txn.drop(store.db["request_times"], delete=False)
        txn.put(b"schema_version", codec.u64(1), db=store.db["meta"])

    store.write(as_schema_1)
    store.close()
    store = Store(store_dir)
    try:
        assert store.schema_version == storage.SCHEMA_VERSION
        with store.read() as txn:
            index = [bytes(k) for k, _ in txn.cursor(db=store.db["request_times"])]
        assert index == [storage.request_time_key(kept[b"bob\0r2"], b"bob\0r2"),
                         storage.request_time_key(kept[b"alice\0r1"], b"alice\0r1")]  # oldest first
    finally:
        store.close()


def test_files_are_owner_only(store_dir):
    old = os.umask(0o022)
    try:
        Store(store_dir).close()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(store_dir).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(store_dir / "data.mdb").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(store_dir / "lock.mdb").st_mode) == 0o600


def test_existing_directory_is_made_owner_only(store_dir):
    store_dir.mkdir(mode=0o755)
    os.chmod(store_dir, 0o755)
    Store(store_dir).close()
    assert stat.S_IMODE(os.stat(store_dir).st_mode) == 0o700


_HOLD = """
import lmdb, sys, time
env = lmdb.open(sys.argv[1], max_dbs=32)
txn = env.begin() if sys.argv[2] == "reader" else None
print("open", flush=True)
time.sleep(60)
"""


def _hold(path, what):
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(path), what], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "open"
    return proc


def test_stale_reader_slot_is_cleared_at_open(store_dir, caplog):
    Store(store_dir).close()
    # While another process keeps the environment open, LMDB does not reset its
    # reader table, so a reader killed mid-transaction keeps its slot.
    holder = _hold(store_dir, "env")
    try:
        reader = _hold(store_dir, "reader")
        reader.kill()
        reader.wait()
        with caplog.at_level(logging.WARNING, logger="memos.storage"):
            store = Store(store_dir)
        try:
            assert "cleared 1 stale LMDB reader slots" in caplog.text
            assert store.env.reader_check() == 0
        finally:
            store.close()
    finally:
        holder.kill()
        holder.wait()


def test_check_key():
    assert check_key(b"k" * 511) == b"k" * 511
    with pytest.raises(TooLarge) as err:
        check_key(b"k" * 512)
    assert err.value.code == "too_large" and err.value.details["size"] == 512


def test_map_grows_for_many_memories(store_dir):
    m = Memos(store_dir, options=StoreOptions(map_size=64 * 1024))
    start = m.store.env.info()["map_size"]
    m.create_cube(ALICE, "c")
    added = []
    for batch in range(5):
        added += m.add_many(ALICE, "c", [NewMemory(text=f"memory {batch}-{i} " + "x" * 200) for i in range(200)])
    assert m.store.env.info()["map_size"] > start
    assert len(m.list(ALICE, "c")) == 1000
    assert m.get_cube(ALICE, "c").version == 5
    m.close()
    with Memos(store_dir, options=StoreOptions(map_size=64 * 1024)) as m:
        assert {x.id: x.text for x in m.list(ALICE, "c")} == {x.id: x.text for x in added}
        assert m.audit_verify(LOCAL_ADMIN).ok


def test_map_grows_for_a_large_blob(store_dir):
    data = os.urandom(1 << 20)
    m = Memos(store_dir, options=StoreOptions(map_size=64 * 1024))
    m.create_cube(ALICE, "c")
    small = m.add(ALICE, "c", "before the blob")
    mem = m.add(ALICE, "c", None, type="opaque", blob=data)
    assert m.store.env.info()["map_size"] >= 1 << 20
    assert m.get_blob(ALICE, "c", mem.blob.sha256) == data
    m.close()
    with Memos(store_dir, options=StoreOptions(map_size=64 * 1024)) as m:
        assert m.get_blob(ALICE, "c", mem.blob.sha256) == data
        assert m.get(ALICE, "c", small.id).text == "before the blob"
        assert m.get_cube(ALICE, "c").version == 2
        # Still growing after a reopen with a small map.
        big = m.add(ALICE, "c", None, type="opaque", blob=os.urandom(2 << 20))
        assert len(m.get_blob(ALICE, "c", big.blob.sha256)) == 2 << 20


def test_map_growth_replays_a_group_commit(store_dir):
    """A group commit that fills the map is replayed whole: every unit lands once."""
    m = Memos(store_dir, options=StoreOptions(map_size=64 * 1024))
    m.create_cube(ALICE, "c")
    writes = [m.write_add(ALICE, "c", f"w{i} " + "y" * 500) for i in range(100)]
    writes.append(m.write_add(ALICE, "missing", "fails"))
    results = m.apply(writes)
    assert [r.text.split()[0] for r in results[:100]] == [f"w{i}" for i in range(100)]
    assert results[100].code == "not_found"
    assert m.get_cube(ALICE, "c").version == 100
    assert len(m.list(ALICE, "c")) == 100
    assert m.audit_tail(LOCAL_ADMIN, 1)[0].outcome == "error"
    assert m.audit_verify(LOCAL_ADMIN).records == 1 + 100 + 1
    m.close()


def test_lmdb_errors_are_typed(store_dir):
    store = Store(store_dir)
    try:
        with pytest.raises(InvalidRequest) as err:  # not lmdb.BadValsizeError
            store.write(lambda txn: txn.put(b"", b"v", db=store.db["meta"]))  # LMDB refuses empty keys
        assert err.value.code == "invalid_request"
    finally:
        store.close()


_GROW_ELSEWHERE = """
import os, sys
from memos.api import LOCAL_ADMIN, Memos
from memos.storage import StoreOptions
with Memos(sys.argv[1], options=StoreOptions(map_size=64 * 1024)) as m:
    mem = m.add(LOCAL_ADMIN, "c", None, type="opaque", blob=os.urandom(3 << 20))
    print(m.store.env.info()["map_size"], mem.id, flush=True)
"""


def test_map_grown_by_another_process_is_adopted(store_dir):
    """A read or write after another process grew the map adopts the new size (no deadlock)."""
    m = Memos(store_dir, options=StoreOptions(map_size=64 * 1024))
    try:
        m.create_cube(ALICE, "c")
        mine = m.add(ALICE, "c", "before")
        ours = m.store.env.info()["map_size"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), str(TOYTYPE)])}
        out = subprocess.run([sys.executable, "-c", _GROW_ELSEWHERE, str(store_dir)], env=env,
                             capture_output=True, text=True, check=True, timeout=60).stdout.split()
        theirs, their_id = int(out[0]), out[1]
        assert theirs > ours
        result: dict = {}

        def read() -> None:
            result["text"] = m.get(ALICE, "c", mine.id).text

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        reader.join(20)
        assert not reader.is_alive(), "read deadlocked adopting the new map size"
        assert result["text"] == "before"
        assert m.store.env.info()["map_size"] >= theirs
        assert len(m.get_blob(ALICE, "c", m.get(ALICE, "c", their_id).blob.sha256)) == 3 << 20
        m.add(ALICE, "c", "after")
        assert m.get_cube(ALICE, "c").version == 3
    finally:
        m.close()


def test_map_grown_by_another_process_is_adopted_by_a_write(store_dir):
    m = Memos(store_dir, options=StoreOptions(map_size=64 * 1024))
    try:
        m.create_cube(ALICE, "c")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), str(TOYTYPE)])}
        subprocess.run([sys.executable, "-c", _GROW_ELSEWHERE, str(store_dir)], env=env,
                       capture_output=True, text=True, check=True, timeout=60)
        m.add(ALICE, "c", "first write after the other process grew the map")
        assert m.get_cube(ALICE, "c").version == 2
    finally:
        m.close()


def test_replay_after_map_growth_keeps_iterator_arguments(store_dir):
    """Units replayed after the map grows see the same tags, sources and ids as the first run."""
    m = Memos(store_dir, options=StoreOptions(map_size=64 * 1024))
    try:
        m.create_cube(ALICE, "c")
        a, b = m.add_many(ALICE, "c", [NewMemory(text="a"), NewMemory(text="b")])
        m.update(ALICE, "c", a.id, text="a2")
        start = m.store.env.info()["map_size"]
        # The iterator units run first, then the fillers overflow the map.
        writes = [
            m.write_update(ALICE, "c", b.id, tags=iter(["from", "iterator"])),
            m.write_add(ALICE, "c", "derived", tags=iter(["t"]),
                        sources=iter([{"memory_id": a.id, "version": 1}])),
            m.write_rollback(ALICE, "c", 1, memory_ids=iter([a.id])),
        ]
        writes += [m.write_add(ALICE, "c", f"filler {i} " + "z" * 30_000) for i in range(40)]
        results = m.apply(writes)
        assert m.store.env.info()["map_size"] > start  # the group was replayed
        assert not [r for r in results if isinstance(r, Exception)]
        assert m.get(ALICE, "c", b.id).tags == ["from", "iterator"]
        derived = results[1]
        assert m.get(ALICE, "c", derived.id).tags == ["t"]
        assert [(s.memory_id, s.version) for s in m.get(ALICE, "c", derived.id).provenance.sources] == [(a.id, 1)]
        assert m.get(ALICE, "c", a.id).text == "a"
        assert results[2].info["memory_ids"] == [a.id]
    finally:
        m.close()
