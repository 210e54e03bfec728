"""memosctl migrate --to postgresql://: an LMDB store with its whole history, into PostgreSQL."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ALICE, BOB, observable, register
from daemon_fixtures import Daemon

from memos.api import LOCAL_ADMIN, Memos

MEMOSCTL = [sys.executable, "-m", "memos.cli"]


def memosctl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*MEMOSCTL, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.fixture
def lmdb_store(tmp_path):
    """A store with history: cubes, grants, updates, a delete, a rollback, a blob, agents."""
    folder = tmp_path / "data"
    with Memos(folder) as m:
        register(m, ALICE, BOB)
        m.create_cube(ALICE, "notes")
        m.grant(ALICE, "notes", "bob", "write")
        mems = [m.add(ALICE, "notes", f"note {i}", tags=["t"]) for i in range(20)]
        m.update(BOB, "notes", mems[0].id, text="changed by bob")
        m.delete(ALICE, "notes", mems[1].id)
        m.rollback(ALICE, "notes", 10)
        m.add(ALICE, "notes", None, type="opaque", blob=os.urandom(70_000))  # a blob in its own rows
        m.create_cube(BOB, "other")
        m.add(BOB, "other", "bob's own")
        before = observable(m)
    return folder, before


def test_migrate_copies_every_version_and_the_audit_chain_verifies_on_both_sides(lmdb_store, pg_url):
    folder, before = lmdb_store
    done = memosctl("migrate", "--to", pg_url, "--data-dir", str(folder), "--json")
    assert done.returncode == 0, done.stderr
    with Memos(folder, storage=pg_url) as migrated:
        assert observable(migrated) == before
        head = migrated.history(LOCAL_ADMIN, "notes")[0].version
        assert [c.version for c in migrated.history(LOCAL_ADMIN, "notes")] == list(range(head, -1, -1))
        assert migrated.audit_verify(LOCAL_ADMIN).ok
        first = migrated.list(LOCAL_ADMIN, "notes")[0]
        assert migrated.get(LOCAL_ADMIN, "notes", first.id, at=1).text == "note 0"  # a past version
    with Memos(folder) as source:  # the source is left as it was
        assert observable(source) == before and source.audit_verify(LOCAL_ADMIN).ok


def test_a_daemon_serves_the_migrated_store(lmdb_store, pg_url):
    folder, before = lmdb_store
    assert memosctl("migrate", "--to", pg_url, "--data-dir", str(folder)).returncode == 0
    d = Daemon(env={"MEMOS_STORAGE": pg_url})
    try:
        d.start()
        c = d.client()
        assert {m.text for m in c.list("other")} == {"bob's own"}
        assert [h.memory.text for h in c.search("other", "bob's own", k=1)] == ["bob's own"]
        assert c.audit_verify().ok
    finally:
        d.cleanup()


def test_migrate_is_refused_into_a_database_that_holds_a_store(lmdb_store, pg_url):
    folder, _ = lmdb_store
    assert memosctl("migrate", "--to", pg_url, "--data-dir", str(folder)).returncode == 0
    again = memosctl("migrate", "--to", pg_url, "--data-dir", str(folder))
    assert again.returncode != 0 and "already holds a memos store" in again.stderr


def test_migrate_is_refused_while_memosd_serves_the_folder(pg_url):
    d = Daemon(env={"MEMOS_STORAGE": "lmdb"})
    try:
        d.start()
        refused = memosctl("migrate", "--to", pg_url, "--data-dir", str(d.data_dir))
        assert refused.returncode != 0 and "memosd is running" in refused.stderr
        with Memos(d.root / "elsewhere", storage=pg_url) as target:  # nothing was copied
            assert target.list_cubes(LOCAL_ADMIN) == []
    finally:
        d.cleanup()


def test_migrate_takes_only_a_postgresql_url(lmdb_store):
    folder, before = lmdb_store
    for target in ("lmdb", "mysql://db/memos", str(folder)):
        refused = memosctl("migrate", "--to", target, "--data-dir", str(folder))
        assert refused.returncode != 0 and "invalid_request" in refused.stderr and "postgresql://" in refused.stderr
    with Memos(folder) as source:
        assert observable(source) == before


def test_migrate_from_a_folder_without_a_store_is_refused(tmp_path, pg_url):
    refused = memosctl("migrate", "--to", pg_url, "--data-dir", str(tmp_path))
    assert refused.returncode != 0 and "no LMDB store" in refused.stderr


def test_a_copy_that_differs_from_its_source_is_rolled_back_whole(lmdb_store, pg_url, monkeypatch):
    from memos import migrate, pgkv
    from memos.errors import IntegrityError

    folder, _ = lmdb_store
    real = pgkv.Transaction.load

    def lossy(txn, db, rows):  # one version record goes missing on the way
        rows = list(rows)
        return real(txn, db, rows[:-1] if db.name == "versions" else rows)

    monkeypatch.setattr(pgkv.Transaction, "load", lossy)
    with pytest.raises(IntegrityError, match="versions"):
        migrate.migrate(folder, pg_url)
    with Memos(folder, storage=pg_url) as target:
        assert target.list_cubes(LOCAL_ADMIN) == [] and target.store.stats()["versions"] == 0
