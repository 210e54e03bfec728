"""A store written by the previous release (schema 2) opens, upgrades and keeps everything.

``data/store-schema2.tar.gz`` is the LMDB file of a real memosd of that release
(hashing embedder): a cube with adds, an update, an add_many and a rollback,
an agent with a read grant, and the stored vectors of every text. Its memory
ids and the agent's token are below.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest

from daemon_fixtures import Daemon
from memos import storage
from memos.api import LOCAL_ADMIN, Memos

ARCHIVE = Path(__file__).parent / "data" / "store-schema2.tar.gz"
ADA, DEPLOY = "01M8JHPDM37MB2NAZ7FNABME6P", "01M8JHPDM6EQVAH0RVKHQBPA1H"
TOKEN = "planner.6jr0l8lUUlGvNYL46KgvToepnQEeIeiMgJ-jSsLQ-3k"


@pytest.fixture
def old_store(tmp_path) -> Path:
    folder = tmp_path / "data"
    folder.mkdir(mode=0o700)
    with tarfile.open(ARCHIVE) as tar:
        tar.extractall(folder, filter="data")
    return folder


def test_the_previous_schema_is_upgraded_in_place(old_store):
    with Memos(old_store) as m:
        assert m.store.schema_version == storage.SCHEMA_VERSION == 4
        stats = m.store.stats()
        assert stats["plaintext/vectors"] == 5  # every text's vector, moved to the type's own sub-database
        with m.store.read() as txn:
            with pytest.raises(Exception):
                m.store.env.open_db(b"vectors", txn=txn, create=False)  # and the old one is gone
        ada = m.get(LOCAL_ADMIN, "notes", ADA)
        assert ada.text == "Ada prefers coffee in the morning"
        assert [c.op for c in m.history(LOCAL_ADMIN, "notes")] == [
            "rollback", "add_many", "update", "add", "add", "create_cube"]
        assert m.get(LOCAL_ADMIN, "notes", ADA, at=2).text == "Ada prefers tea in the morning"
        assert len(m.list(LOCAL_ADMIN, "notes")) == 2  # the rollback to version 3 undid the add_many
        assert m.audit_verify(LOCAL_ADMIN).ok
        # Schema 4: the agent has a stable id, and its grant references the id, shown by name.
        (planner,) = m.agents.list(LOCAL_ADMIN)
        assert planner.name == "planner" and planner.id.startswith("agent:")
        with m.store.read() as txn:
            stored = m.ledger.cube(txn, "notes")
        assert planner.id in stored.acl and "planner" not in stored.acl
        assert m.get_cube(LOCAL_ADMIN, "notes").acl["planner"] == "read"
        assert m.agents.authenticate(TOKEN).id == planner.id  # the token still works, now salted
    secret = TOKEN.split(".", 1)[1].encode()
    assert secret not in (old_store / "data.mdb").read_bytes()  # the stored reply that held it is gone


def test_memosd_serves_an_upgraded_store_without_embedding_again(old_store):
    d = Daemon(env={"MEMOS_SEARCH__EMBEDDER": "hashing"})
    d.data_dir.rmdir() if d.data_dir.exists() else None
    old_store.rename(d.data_dir)
    d.start()
    try:
        admin = d.client(timeout=30)
        hits = admin.search("notes", "when does the deploy key rotate?", k=1)
        assert [h.memory.id for h in hits] == [DEPLOY]
        planner = d.client(token=TOKEN)  # the agent and its grant survived
        assert planner.get("notes", ADA).text == "Ada prefers coffee in the morning"
        assert admin.audit_verify().ok
    finally:
        d.stop()
    with Memos(d.data_dir) as m:
        assert m.store.stats()["plaintext/vectors"] == 5  # the saved vectors served the index: none were added
    d.cleanup()
