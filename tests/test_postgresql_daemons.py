"""Two memosd processes over one PostgreSQL database: one store, served by both.

Each daemon has its own socket and data folder (its indexes, its keys) and
shares the store. A write through one is read, versioned and searched through
the other; concurrent writes to one cube from both get contiguous versions and
one valid audit chain; a daemon killed while writing loses nothing it acknowledged.
"""

from __future__ import annotations

import signal
import threading
import time

import pytest
from daemon_fixtures import Daemon

from memos.errors import InvalidRequest, MemosError, Unauthenticated


def _until(check, timeout: float = 10.0):
    """``check()`` once it is truthy; the follower applies others' commits within its poll interval."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.02)


@pytest.fixture
def pair(pg_url):
    daemons = [Daemon(env={"MEMOS_STORAGE": pg_url}) for _ in range(2)]
    try:
        for d in daemons:
            d.start()
        yield daemons
        for d in daemons:
            if d.alive():
                d.stop()
    finally:
        for d in daemons:
            d.cleanup()


def test_a_write_through_one_is_read_versioned_and_searched_through_the_other(pair):
    a, b = (d.client() for d in pair)
    a.cube_create("shared")
    first = a.add("shared", "the launch moved to thursday because of the storm")
    a.update("shared", first.id, text="the launch moved to friday because of the storm")
    assert b.get("shared", first.id).text.endswith("friday because of the storm")
    assert [c.version for c in b.history("shared")] == [2, 1, 0]
    assert b.get("shared", first.id, at=1).text.endswith("thursday because of the storm")
    # b's index learns a's commits from the store's notices, and a search waits for the version it read
    hits = b.search("shared", "when is the launch", k=3)
    assert [h.memory.id for h in hits] == [first.id]
    assert "friday" in hits[0].memory.text
    second = b.add("shared", "the rocket is painted blue")
    assert [h.memory.id for h in a.search("shared", "rocket colour", k=1)] == [second.id]
    assert a.audit_verify().ok and b.audit_verify().ok


def test_events_of_one_daemons_commits_reach_the_others_watchers(pair):
    a, b = (d.client() for d in pair)
    b.cube_create("watched")
    events = b.events("watched", timeout=10)
    added = a.add("watched", "seen from the other daemon")
    event = next(events)
    assert (event.op, event.cube, event.version, event.memories) == ("add", "watched", 1, [added.id])
    assert event.actor == "admin"


def test_a_token_rotated_through_one_daemon_is_refused_by_the_other(pair):
    a_admin = pair[0].client()
    token = a_admin.agent_add("roamer")["token"]
    agent_on_b = pair[1].client(token=token)
    assert agent_on_b.whoami()["agent"] == "roamer"  # checked, and cached, by b
    a_admin.agent_rotate("roamer")

    def refused() -> bool:
        try:
            pair[1].client(token=token).whoami()
        except Unauthenticated:
            return True
        return False

    assert _until(refused, timeout=5)


def test_concurrent_writes_from_both_daemons_give_contiguous_versions_and_one_chain(pair):
    pair[0].client().cube_create("busy")
    acked: list[tuple[str, str]] = []
    lock = threading.Lock()

    def writer(daemon: Daemon, name: str) -> None:
        c = daemon.client()
        for i in range(40):
            mem = c.add("busy", f"{name} note {i}")
            with lock:
                acked.append((mem.id, f"{name} note {i}"))

    threads = [threading.Thread(target=writer, args=(d, f"{i}-{j}")) for i, d in enumerate(pair) for j in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for client in (d.client() for d in pair):
        versions = sorted(c.version for c in client.history("busy", limit=1000))
        assert versions == list(range(0, 241))
        assert client.audit_verify().ok
        got = {m.id: m.text for m in client.list("busy", limit=1000)}
        assert got == dict(acked)


def test_a_daemon_killed_while_writing_loses_no_acknowledged_write(pair):
    victim, survivor = pair
    victim.client().cube_create("kill")
    acked: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        c = victim.client(retries=0, timeout=2)
        i = 0
        while not stop.is_set():
            try:
                acked.append(c.add("kill", f"note {i}").id)
            except MemosError:
                return  # the daemon is gone: what was not acknowledged may or may not be there
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    _until(lambda: len(acked) >= 30)
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait()
    stop.set()
    thread.join()
    c = survivor.client()
    present = {m.id for m in c.list("kill", limit=1000)}
    assert set(acked) <= present and len(acked) >= 30
    versions = sorted(x.version for x in c.history("kill", limit=1000))
    assert versions == list(range(len(versions)))
    assert c.audit_verify().ok
    victim.restart()  # its data folder (indexes, keys) and the shared store open again
    assert {m.id for m in victim.client().list("kill", limit=1000)} == present


def test_what_stays_lmdbs_is_refused_by_name_and_store_stats_reports_tables(pair, tmp_path):
    c = pair[0].client()
    c.cube_create("sized")
    c.add("sized", "some bytes to count")
    stats = c.store_stats()
    assert stats["backend"] == "postgresql" and stats["pages"] is None
    assert stats["databases"]["versions"]["entries"] == 1 and stats["databases"]["versions"]["bytes"] > 0
    assert stats["file_bytes"] == sum(d["bytes"] for d in stats["databases"].values())
    assert stats["cubes"]["sized"]["version"] == 1
    with pytest.raises(InvalidRequest, match="pg_dump"):
        c.store_backup(str(tmp_path / "backup"))
    with pytest.raises(InvalidRequest, match="VACUUM"):
        c.store_compact(str(pair[0].data_dir))
    assert not (tmp_path / "backup").exists()


def test_replies_and_logs_name_the_store_without_its_password():
    from memos.pgstore import redacted

    assert redacted("postgresql://memos:s3cret@db.internal:5432/memos") == "postgresql://memos:***@db.internal:5432/memos"
    assert redacted("postgresql://memos@db.internal/memos") == "postgresql://memos@db.internal/memos"
    assert redacted("postgresql://memos:a/b@h/db?password=x&sslmode=require") == \
        "postgresql://memos:***@h/db?password=***&sslmode=require"


def test_the_storage_setting_comes_from_memos_storage_and_is_checked(monkeypatch):
    from memos import config

    monkeypatch.setenv("MEMOS_STORAGE", "postgresql://memos@db.internal/memos")
    assert config.load().storage == "postgresql://memos@db.internal/memos"
    monkeypatch.setenv("MEMOS_STORAGE", "mysql://nope")
    with pytest.raises(ValueError, match="postgresql:// URL"):
        config.load()
    monkeypatch.delenv("MEMOS_STORAGE")
    assert config.load().storage == "lmdb"


def test_cubes_move_between_a_postgresql_and_an_lmdb_daemon_with_their_whole_history(pg_url, tmp_path):
    from test_backup import everything

    from memos.api import LOCAL_ADMIN, Memos

    on_pg, on_lmdb = Daemon(env={"MEMOS_STORAGE": pg_url}), Daemon(env={"MEMOS_STORAGE": "lmdb"})
    try:
        clients = {"pg": on_pg.start().client(), "lmdb": on_lmdb.start().client()}
        for source, target in (("pg", "lmdb"), ("lmdb", "pg")):
            a, b, cube = clients[source], clients[target], f"from-{source}"
            a.cube_create(cube)
            first = a.add(cube, "Ada prefers tea")
            a.update(cube, first.id, "Ada prefers coffee")
            a.add(cube, "a cache", type="opaque", blob=bytes(range(256)) * 24)
            a.delete(cube, first.id)
            a.cube_export(cube, str(tmp_path / f"{cube}.cube"))
            b.cube_import(str(tmp_path / f"{cube}.cube"))
            assert [h.model_dump() for h in b.history(cube)] == [h.model_dump() for h in a.history(cube)]
            assert b.get(cube, first.id, at=2).text == "Ada prefers coffee"
        on_pg.stop()
        on_lmdb.stop()
        with Memos(on_pg.data_dir, storage=pg_url) as pg, Memos(on_lmdb.data_dir) as lmdb:
            for cube in ("from-pg", "from-lmdb"):
                assert everything(pg, cube) == everything(lmdb, cube)
            assert pg.audit_verify(LOCAL_ADMIN).ok and lmdb.audit_verify(LOCAL_ADMIN).ok
    finally:
        on_pg.cleanup()
        on_lmdb.cleanup()
