"""History retention in a real memosd: a KV-cache-like memory rebuilt round after round stops
growing the store once each round compacts; the compact policy asks for compaction where the
rules (here from MEMOS_RETENTION__*) let versions go; memosctl pins and compacts."""

from __future__ import annotations

import os

import pytest
from daemon_fixtures import Daemon, memosctl
from test_scheduler import SimClock

from memos.errors import VersionCompacted

DAY = 86_400.0
RULES = {"MEMOS_RETENTION__ALL_DAYS": "1", "MEMOS_RETENTION__DAILY_DAYS": "0",
         "MEMOS_RETENTION__KEEP_VERSIONS": "1"}


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    d = Daemon(env=dict(RULES))
    (d.root / "policies.toml").write_text("[compact]\nmin_versions = 2\n")  # only when asked
    sim = SimClock(d.root / "clock")
    d.env.update({"MEMOS_DAEMON__POLICIES": str(d.root / "policies.toml"),
                  "MEMOS_DAEMON__CLOCK_FILE": str(sim.path)})
    d.start()
    try:
        yield d, sim
        d.stop()
    finally:
        d.cleanup()


def blob_bytes(d: Daemon) -> int:
    """The bytes held in the blob sub-database, read beside the running daemon."""
    store = d.store()
    try:
        with store.read() as txn:
            return sum(len(v) for _, v in txn.cursor(db=store.db["blobs"]))
    finally:
        store.close()


def test_a_rebuilt_cache_stops_growing_the_store_when_each_round_compacts(running):
    d, sim = running
    admin = d.client(timeout=60)
    # Three versions kept: the one before the last cache was added stays, to retire it to.
    admin.cube_create("kv", {"retention": {"all_days": 0, "keep_versions": 3}})
    size = 300_000
    prev, before_prev = None, None
    sizes, freed = [], []
    for i in range(20):
        sim.advance(3600)
        head = admin.cube_get("kv").version
        made = admin.add("kv", f"cache {i}", type="opaque", blob=os.urandom(size))
        if prev is not None:  # the old cache is retired: rolled back to before it was added
            admin.rollback("kv", before_prev, memory_ids=[prev])
        freed.append(admin.cube_compact("kv").blobs_freed)
        sizes.append(blob_bytes(d))
        prev, before_prev = made.id, head
    # The retired cache is read by a kept version for one more round; from then on each round
    # frees one blob as it adds one.
    assert freed[2:] == [1] * 18, freed
    assert set(sizes[2:]) == {2 * size}, sizes
    assert admin.get_blob("kv", admin.get("kv", prev).blob.sha256) and admin.audit_verify().ok


def test_the_compact_policy_asks_where_versions_may_go_and_memosctl_pins(running):
    d, sim = running
    admin = d.client(timeout=60)
    admin.cube_create("notes")
    mem = admin.add("notes", "v0")
    versions = [mem.version] + [admin.update("notes", mem.id, f"v{i}").version for i in range(1, 5)]
    memosctl(d, "cube", "retention", "notes", "--all-days", "0.5", "--keep-versions", "1")
    assert admin.cube_get("notes").settings["retention"] == {"all_days": 0.5, "keep_versions": 1}
    memosctl(d, "cube", "retention", "notes")  # none given: back to the daemon's rules
    assert "retention" not in admin.cube_get("notes").settings
    memosctl(d, "cube", "pin", "notes", str(versions[2]), "--name", "keep")
    assert admin.cube_get("notes").pins == {"keep": versions[2]}
    run = admin.policy_run("compact", dry_run=True)
    assert not [a for a in run.actions if a.args["cube"] == "notes"]  # all younger than a day
    sim.advance(2 * DAY)
    shown = memosctl(d, "cube", "compact", "notes", "--dry-run").stdout
    assert "versions_dropped" in shown and "3" in shown, shown
    run = admin.policy_run("compact")
    [action] = [a for a in run.actions if a.args["cube"] == "notes"]
    assert action.outcome == "ok", action
    assert admin.get("notes", mem.id, at=versions[2]).text == "v2"
    with pytest.raises(VersionCompacted) as info:
        admin.get("notes", mem.id, at=versions[1])
    assert info.value.details["oldest_kept"] == versions[2]
    assert [c.version for c in admin.history("notes")] == [versions[-1], versions[2]]
    assert admin.audit_verify().ok


def test_a_cache_retired_by_delete_is_freed_once_its_versions_go(running):
    """How demote retires a cache: a delete, which keeps no blob; compaction frees the blob with the
    last version that still read the cache alive."""
    d, sim = running
    admin = d.client(timeout=60)
    admin.cube_create("kv-del", {"retention": {"all_days": 0, "keep_versions": 3}})
    size = 200_000
    prev = None
    sizes, freed = [], []
    others = blob_bytes(d)  # blobs of the module's other cubes
    for i in range(20):
        sim.advance(3600)
        made = admin.add("kv-del", f"cache {i}", type="opaque", blob=os.urandom(size))
        if prev is not None:
            admin.delete("kv-del", prev)
        freed.append(admin.cube_compact("kv-del").blobs_freed)
        sizes.append(blob_bytes(d) - others)
        prev = made.id
    assert all(n == 1 for n in freed[3:]), freed
    assert len(set(sizes[3:])) == 1 and sizes[-1] <= 2 * size, sizes  # flat: the store stopped growing
    assert admin.audit_verify().ok
