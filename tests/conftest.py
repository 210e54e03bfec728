"""Shared fixtures for the store tests: a fresh store per test, and helpers
that capture everything a caller can observe so tests can assert "unchanged"."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Memory types of the tests' own (tests/toytype: each package beside its dist-info with the
# entry point), registered like installed types. On the path before anything imports
# memos.client, whose methods come from every registered type's operations.
TOYTYPE = Path(__file__).resolve().parent / "toytype"
if str(TOYTYPE) not in sys.path:
    sys.path.insert(0, str(TOYTYPE))

import pytest

from memos import codec
from memos.api import LOCAL_ADMIN, Actor, Memos
import pgserver

# Agents with ids fixed for readable tests; the memos fixture registers them.
ALICE = Actor("alice", id="agent:alice")
BOB = Actor("bob", id="agent:bob")
CAROL = Actor("carol", id="agent:carol")


def register(m: Memos, *actors: Actor) -> None:
    """Agent records for ``actors`` with their fixed ids (agent_add would draw random ones)."""

    def put(txn):
        for actor in actors:
            record = {"id": actor.id, "name": actor.name, "created_at": 0.0, "created_by": "admin",
                      "salt": "00", "token_hash": "00"}
            txn.put(actor.name.encode(), codec.pack(record), db=m.store.db["agents"])
            txn.put(actor.id.encode(), actor.name.encode(), db=m.store.db["agent_ids"])

    m.store.write(put)


@pytest.fixture
def store_dir(tmp_path):
    return tmp_path / "store"


@pytest.fixture(scope="session")
def pg_server():
    """A PostgreSQL server for the session; where its binaries are missing, the tests that need it are
    skipped, unless MEMOS_REQUIRE_POSTGRESQL is set (CI sets it: there they must run)."""
    try:
        return pgserver.shared()
    except FileNotFoundError as exc:
        if os.environ.get("MEMOS_REQUIRE_POSTGRESQL"):
            raise
        pytest.skip(str(exc))


@pytest.fixture
def pg_url(pg_server):
    """A fresh PostgreSQL database, dropped after the test."""
    name = pg_server.new_database()
    yield pg_server.url(name)
    pg_server.drop_database(name)


@pytest.fixture(params=["lmdb", "postgresql"])
def storage(request):
    """Each backend in turn: the store's tests run against both."""
    return "lmdb" if request.param == "lmdb" else request.getfixturevalue("pg_url")


@pytest.fixture
def memos(store_dir, storage):
    m = Memos(store_dir, storage=storage)
    register(m, ALICE, BOB, CAROL)
    yield m
    m.close()


@pytest.fixture
def cube(memos):
    """A cube named 'notes' owned by alice."""
    memos.create_cube(ALICE, "notes")
    return "notes"


def observable(m: Memos) -> dict:
    """Everything a reader sees: cubes, each cube's exact state bytes and history."""
    out: dict = {"cubes": sorted((c.name, c.owner, sorted(c.acl.items()), c.version)
                                 for c in m.list_cubes(LOCAL_ADMIN))}
    for c in m.list_cubes(LOCAL_ADMIN):
        out[f"state:{c.name}"] = m.state(LOCAL_ADMIN, c.name)
        out[f"history:{c.name}"] = [h.model_dump() for h in m.history(LOCAL_ADMIN, c.name)]
    stats = m.store.stats()
    out["counts"] = {k: stats[k] for k in ("cubes", "heads", "versions", "commits", "blobs", "blob_refs")}
    return out


def audit_seq(m: Memos) -> int:
    return m.audit_checkpoint(LOCAL_ADMIN).seq


def last_audit(m: Memos):
    return m.audit_tail(LOCAL_ADMIN, 1)[0]


def pytest_collection_modifyitems(config, items):
    if os.environ.get("MEMOS_TEST_STORAGE", "lmdb") == "postgresql":
        skip = pytest.mark.skip(reason="reads LMDB's own files or counters (MEMOS_TEST_STORAGE=postgresql)")
        for item in items:
            if "lmdb_only" in item.keywords:
                item.add_marker(skip)
