"""History retention in process: which versions compaction keeps, what it frees, and what a
dropped version answers (docs/storage.md, Retention)."""

from __future__ import annotations

import pytest
from conftest import ALICE, BOB, observable
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from retention_check import check_minimal, check_store, snapshot_kept

from memos import clock
from memos.api import LOCAL_ADMIN, Memos
from memos.catalog_retention import DAY_S, RetentionRules
from memos.errors import Conflict, Denied, InvalidRequest, NotFound, VersionCompacted
from memos.retention import kept_versions

T0 = 1_700_000_000.0
DROP_ALL = {"all_days": 0, "daily_days": 0, "keep_versions": 1}  # keeps the head and what is protected


@pytest.fixture
def at(monkeypatch):
    """The clock, set by the test: ``at(days)`` moves it to T0 + days."""
    now = [T0]
    monkeypatch.setattr(clock, "_source", lambda: now[0])

    def move(days: float) -> None:
        now[0] = T0 + days * DAY_S

    return move


def edits(m: Memos, cube: str, n: int, at=None, every_days: float = 0.0) -> tuple[str, list[int]]:
    """A memory added then updated ``n`` times; its id and the version of each change."""
    mem = m.add(ALICE, cube, "v0")
    versions = [mem.version]
    for i in range(n):
        if at is not None:
            at((i + 1) * every_days)
        versions.append(m.update(ALICE, cube, mem.id, f"v{i + 1}").version)
    return mem.id, versions


def test_the_rules_keep_recent_versions_one_a_day_the_newest_and_the_protected():
    day = DAY_S
    times = [(v, v * day / 4) for v in range(41)]  # four versions a day for ten days
    now = 10 * day
    rules = RetentionRules(all_days=2, daily_days=6, keep_versions=3)
    kept = kept_versions(times, 40, rules, now, protected={1, 99})
    assert set(range(33, 41)) <= kept and 32 not in kept  # younger than 2 days (32 is just 2 days old)
    assert {19, 23, 27, 31} <= kept  # the newest of each day younger than 6 days
    assert 1 in kept and 99 not in kept  # protected, if it still exists
    assert not kept & {0, 2, 3, 4, 15, 18, 20}
    # A clock that stepped back never drops a version newer than one kept for being recent.
    stepped = [(v, t if v != 39 else 0.0) for v, t in times]
    assert 39 in kept_versions(stepped, 40, rules, now, protected=())


def test_a_pinned_version_survives_compaction_readable_and_restorable(memos, cube):
    memos.cube_retention(ALICE, cube, DROP_ALL)
    mid, versions = edits(memos, cube, 6)
    pinned = versions[2]
    memos.pin(ALICE, cube, pinned, name="good")
    assert memos.get_cube(ALICE, cube).pins == {"good": pinned}
    before = memos.state(ALICE, cube, at=pinned)
    report = memos.compact(ALICE, cube)
    assert report.versions_dropped > 0 and report.oldest_kept == pinned
    assert memos.state(ALICE, cube, at=pinned) == before
    assert memos.get(ALICE, cube, mid, at=pinned).text == "v2"
    memos.rollback(ALICE, cube, pinned)
    assert memos.get(ALICE, cube, mid).text == "v2"
    assert memos.audit_verify(LOCAL_ADMIN).ok


def test_a_dropped_version_is_refused_with_the_oldest_kept_named(memos, cube):
    memos.cube_retention(ALICE, cube, DROP_ALL)
    mid, versions = edits(memos, cube, 5)
    memos.pin(ALICE, cube, versions[3])
    head = memos.get_cube(ALICE, cube).version
    memos.compact(ALICE, cube)
    dropped = versions[1]
    calls = [
        lambda: memos.get(ALICE, cube, mid, at=dropped),
        lambda: memos.list(ALICE, cube, at=dropped),
        lambda: memos.state(ALICE, cube, at=dropped),
        lambda: memos.diff(ALICE, cube, dropped, head),
        lambda: memos.rollback(ALICE, cube, dropped),
        lambda: memos.propose(ALICE, cube, dropped),
        lambda: memos.pin(ALICE, cube, dropped),
    ]
    for call in calls:
        with pytest.raises(VersionCompacted) as info:
            call()
        assert info.value.code == "compacted" and isinstance(info.value, NotFound)
        assert info.value.details["oldest_kept"] == versions[3]
        assert info.value.details["kept"] == [versions[3]]  # the nearest kept: none before, v3 after
    assert [c.version for c in memos.history(ALICE, cube)] == [head, versions[3]]
    assert [c.version for c in memos.history(ALICE, cube, memory_id=mid)] == [head, versions[3]]
    # The diff between kept versions sees the changes the dropped commits made.
    assert [d.memory_id for d in memos.diff(ALICE, cube, versions[3], head)] == [mid]


def test_the_audit_chain_is_untouched_and_still_verifies(memos, cube):
    memos.cube_retention(ALICE, cube, DROP_ALL)
    edits(memos, cube, 8)
    records = memos.audit_tail(LOCAL_ADMIN, 1000)
    memos.compact(ALICE, cube)
    after = memos.audit_tail(LOCAL_ADMIN, 1000)
    assert after[:len(records)] == records and len(after) == len(records) + 1
    assert after[-1].op == "cube_compact" and after[-1].detail["versions_dropped"] > 0
    assert memos.audit_verify(LOCAL_ADMIN).ok


def test_a_pending_proposals_target_and_base_survive(memos, cube):
    memos.grant(ALICE, cube, "bob", "admin")
    memos.cube_retention(ALICE, cube, DROP_ALL)
    mid, versions = edits(memos, cube, 5)
    proposal = memos.propose(BOB, cube, versions[1])
    memos.compact(ALICE, cube)
    assert memos.get(ALICE, cube, mid, at=versions[1]).text == "v1"
    memos.approve(ALICE, proposal.id)
    assert memos.get(ALICE, cube, mid).text == "v1"
    with pytest.raises(VersionCompacted):
        memos.get(ALICE, cube, mid, at=versions[2])


def test_a_dry_run_changes_nothing_and_reports_what_compaction_does(memos, cube):
    memos.cube_retention(ALICE, cube, DROP_ALL)
    edits(memos, cube, 4)
    memos.add(ALICE, cube, "blob", type="opaque", blob=b"k" * 5000)
    mid = memos.add(ALICE, cube, "blob2", type="opaque", blob=b"q" * 7000).id
    memos.delete(ALICE, cube, mid)
    memos.rollback(ALICE, cube, memos.get_cube(ALICE, cube).version - 2, memory_ids=[mid])  # never added
    seen = observable(memos)
    planned = memos.compact_plan(ALICE, cube)
    dry = memos.compact(ALICE, cube, dry_run=True)
    assert observable(memos) == seen
    done = memos.compact(ALICE, cube)
    assert dry.model_dump(exclude={"dry_run"}) == done.model_dump(exclude={"dry_run"})
    assert planned.model_dump(exclude={"dry_run"}) == done.model_dump(exclude={"dry_run"})
    assert done.blobs_freed == 1 and done.bytes_freed == 7000
    assert observable(memos) != seen
    check_store(memos)


def test_only_the_cubes_admin_compacts_pins_or_sets_rules(memos, cube):
    memos.grant(ALICE, cube, "bob", "write")
    for call in (lambda: memos.compact(BOB, cube), lambda: memos.pin(BOB, cube, 0),
                 lambda: memos.cube_retention(BOB, cube, DROP_ALL), lambda: memos.compact_plan(BOB, cube)):
        with pytest.raises(Denied):
            call()


def test_rules_are_checked_and_fall_back_to_the_daemons_defaults(store_dir, at):
    with Memos(store_dir, retention=RetentionRules(all_days=1, daily_days=1, keep_versions=1)) as m:
        m.create_cube(LOCAL_ADMIN, "c")
        for bad in ({"all_days": -1}, {"nope": 1}, {"keep_versions": "3"}, "x"):
            with pytest.raises(InvalidRequest):
                m.cube_retention(LOCAL_ADMIN, "c", bad)
        with pytest.raises(InvalidRequest):
            m.create_cube(LOCAL_ADMIN, "d", settings={"retention": {"all_days": "7"}})
        m.add(LOCAL_ADMIN, "c", "a")
        at(3)
        m.add(LOCAL_ADMIN, "c", "b")
        assert m.compact_plan(LOCAL_ADMIN, "c").versions_dropped == 2  # v0, v1: over a day old
        m.cube_retention(LOCAL_ADMIN, "c", {"all_days": 30})
        assert m.get_cube(LOCAL_ADMIN, "c").settings["retention"] == {"all_days": 30}
        assert m.compact_plan(LOCAL_ADMIN, "c").versions_dropped == 0
        m.cube_retention(LOCAL_ADMIN, "c", None)
        assert "retention" not in m.get_cube(LOCAL_ADMIN, "c").settings


def test_unpinned_versions_go_at_the_next_compaction(memos, cube):
    memos.cube_retention(ALICE, cube, DROP_ALL)
    mid, versions = edits(memos, cube, 3)
    memos.pin(ALICE, cube, versions[1], name="a")
    memos.compact(ALICE, cube)
    memos.unpin(ALICE, cube, "a")
    with pytest.raises(NotFound):
        memos.unpin(ALICE, cube, "a")
    memos.compact(ALICE, cube)
    with pytest.raises(VersionCompacted):
        memos.get(ALICE, cube, mid, at=versions[1])


def test_a_compacted_cube_is_not_exported(memos, cube, tmp_path):
    memos.cube_retention(ALICE, cube, DROP_ALL)
    edits(memos, cube, 2)
    memos.compact(ALICE, cube)
    with pytest.raises(InvalidRequest):
        memos.cube_export(LOCAL_ADMIN, cube, str(tmp_path / "x.cube"))
    assert not (tmp_path / "x.cube").exists()


# -- the property: compaction never loses what a kept version reads ----------------------------

BLOBS = [bytes([i]) * (100 + i) for i in range(4)]  # shared by memories and cubes, as blobs are

step = st.one_of(
    st.tuples(st.just("add"), st.sampled_from(["a", "b"]), st.integers(0, len(BLOBS))),  # len: no blob
    st.tuples(st.just("update"), st.sampled_from(["a", "b"]), st.integers(0, 20)),
    st.tuples(st.just("delete"), st.sampled_from(["a", "b"]), st.integers(0, 20)),
    st.tuples(st.just("rollback"), st.sampled_from(["a", "b"]), st.integers(0, 20)),
    st.tuples(st.just("pin"), st.sampled_from(["a", "b"]), st.integers(0, 20)),
    st.tuples(st.just("compact"), st.sampled_from(["a", "b"]), st.just(0)),
    st.tuples(st.just("hours"), st.just("a"), st.integers(1, 60)),
)
rules = st.fixed_dictionaries({"all_days": st.sampled_from([0, 0.5, 1, 3]),
                               "daily_days": st.sampled_from([0, 1, 2, 5]),
                               "keep_versions": st.integers(1, 4)})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(step, min_size=4, max_size=40), rules_a=rules, rules_b=rules)
# A memory added then rolled back out of existence (its records: present, then absent), and a
# blob shared by two memories, one of them so retired.
@example(steps=[("add", "a", 0), ("add", "a", 0), ("rollback", "a", 1), ("compact", "a", 0)],
         rules_a={"all_days": 0, "daily_days": 0, "keep_versions": 1},
         rules_b={"all_days": 0, "daily_days": 0, "keep_versions": 1})
@pytest.mark.parametrize("backend", ["lmdb", "postgresql"])
def test_compaction_keeps_every_kept_versions_state_and_counts_blobs_exactly(tmp_path_factory, monkeypatch, request,
                                                                            backend, steps, rules_a, rules_b):
    now = [T0]
    monkeypatch.setattr(clock, "_source", lambda: now[0])
    server = request.getfixturevalue("pg_server") if backend == "postgresql" else None
    database = server.new_database() if server else None  # a store of its own for each example
    storage = server.url(database) if server else "lmdb"
    with Memos(tmp_path_factory.mktemp("store"), storage=storage) as m:
        for name, r in (("a", rules_a), ("b", rules_b)):
            m.create_cube(LOCAL_ADMIN, name, settings={"retention": r})
        ids: dict[str, list[str]] = {"a": [], "b": []}
        for kind, cube, n in steps:
            now[0] += 1  # every commit a second older than the next: all_days 0 keeps none for its age
            head = m.get_cube(LOCAL_ADMIN, cube).version
            try:
                if kind == "add":
                    blob = BLOBS[n] if n < len(BLOBS) else None
                    ids[cube].append(m.add(LOCAL_ADMIN, cube, f"t{len(ids[cube])}", type="opaque" if blob else
                                           "plaintext", blob=blob).id)
                elif kind in ("update", "delete") and ids[cube]:
                    mid = ids[cube][n % len(ids[cube])]
                    if kind == "update":
                        m.update(LOCAL_ADMIN, cube, mid, f"u{n}", status="active")
                    else:
                        m.delete(LOCAL_ADMIN, cube, mid)
                elif kind == "rollback":
                    m.rollback(LOCAL_ADMIN, cube, n % (head + 1))
                elif kind == "pin":
                    m.pin(LOCAL_ADMIN, cube, n % (head + 1), name=f"p{n}")
                elif kind == "hours":
                    now[0] += n * 3600
                elif kind == "compact":
                    before = snapshot_kept(m, cube)
                    m.compact(LOCAL_ADMIN, cube)
                    after = snapshot_kept(m, cube, only=before)
                    assert after == {v: before[v] for v in after}
                    check_store(m)
                    check_minimal(m, cube)
            except (NotFound, InvalidRequest, Conflict):
                pass  # a compacted target, a deleted memory, nothing to roll back: refused, nothing written
        for cube in ("a", "b"):
            before = snapshot_kept(m, cube)
            m.compact(LOCAL_ADMIN, cube)
            after = snapshot_kept(m, cube, only=before)
            assert after == {v: before[v] for v in after}
            check_minimal(m, cube)
        check_store(m)
        assert m.audit_verify(LOCAL_ADMIN).ok
    if server:
        server.drop_database(database)
