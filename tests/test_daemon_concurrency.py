"""Many writers at once: agent processes and client threads against one memosd."""

from __future__ import annotations

import threading
from collections import Counter

import pytest
from daemon_fixtures import admin, daemon, run_agents  # noqa: F401  (fixtures)

AGENTS = 4
ADDS = 50


def assert_contiguous_history(admin, cube: str, commits: int) -> None:
    versions = [h.version for h in admin.history(cube)]
    assert versions == list(range(commits, -1, -1)), "versions must be 0..N, no gaps, no repeats"
    assert admin.cube_get(cube).version == commits


def test_agent_processes_share_a_cube_and_keep_their_own(daemon, admin):
    names = [f"conc-agent{i}" for i in range(AGENTS)]
    admin.cube_create("conc-shared")
    tokens = {}
    for name in names:
        tokens[name] = admin.agent_add(name)["token"]
        admin.cube_create(f"conc-p-{name}")
        admin.cube_grant(f"conc-p-{name}", name, "write")
        admin.cube_grant("conc-shared", name, "write")
    since = admin.audit_checkpoint().seq

    configs = [{"name": name, "token": tokens[name], "n": ADDS, "shared": "conc-shared",
                "private": f"conc-p-{name}", "foreign": f"conc-p-{names[(i + 1) % AGENTS]}"}
               for i, name in enumerate(names)]
    reports = run_agents(daemon, configs)

    # every acknowledged write is there exactly once, and nothing else is
    acked = [tuple(row[:2]) for r in reports for row in r["shared"]]
    assert len(acked) == AGENTS * ADDS and len(set(acked)) == len(acked)
    stored = [(m.id, m.text) for m in admin.list("conc-shared", status="all")]
    assert sorted(stored) == sorted(acked)
    assert Counter(text.split()[0] for _, text in stored) == {name: ADDS for name in names}
    # one commit per add, versions 1..N each used once
    assert sorted(row[2] for r in reports for row in r["shared"]) == list(range(1, AGENTS * ADDS + 1))
    assert_contiguous_history(admin, "conc-shared", AGENTS * ADDS)

    for name, report in zip(names, reports):
        cube = f"conc-p-{name}"
        stored = [(m.id, m.text, m.provenance.actor) for m in admin.list(cube, status="all")]
        assert stored == [(i, t, name) for i, t, _ in report["private"]]
        assert_contiguous_history(admin, cube, ADDS)
        # nobody got into a neighbour's private cube, and every try was audited
        assert report["leaked"] == 0 and report["denied"] == ADDS // 10
        assert admin.cube_get(cube).acl.keys() == {"admin", name}

    records = []
    after = since
    while batch := admin.audit_tail(1000, after=after):
        records += batch
        after = batch[-1].seq
    for i, name in enumerate(names):
        refused = [r for r in records if r.actor == name and r.outcome == "denied"]
        assert len(refused) == ADDS // 10
        assert {(r.op, r.cube) for r in refused} == {("add", f"conc-p-{names[(i + 1) % AGENTS]}")}
        ok = [r for r in records if r.actor == name and r.outcome == "ok"]
        assert {r.cube for r in ok} == {"conc-shared", f"conc-p-{name}"}
        assert len(ok) == 2 * ADDS
    assert admin.audit_verify().ok


def test_concurrent_clients_get_contiguous_versions(daemon, admin):
    """Writes that arrive together are grouped into commits, yet each is its own version."""
    cube = "conc-threads"
    admin.cube_create(cube)
    threads, per_thread = 8, 15
    results: list[list[tuple[str, int]]] = [[] for _ in range(threads)]
    errors: list[BaseException] = []
    start = threading.Barrier(threads)

    def work(i: int) -> None:
        c = daemon.client()
        try:
            start.wait()
            for j in range(per_thread):
                m = c.add(cube, f"thread {i} item {j}")
                results[i].append((m.id, m.version))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(60)
    assert not errors, errors
    total = threads * per_thread
    versions = sorted(v for r in results for _, v in r)
    assert versions == list(range(1, total + 1))
    ids = {i for r in results for i, _ in r}
    assert len(ids) == total
    assert {m.id for m in admin.list(cube)} == ids
    assert_contiguous_history(admin, cube, total)
    # each thread saw its own writes in order
    for r in results:
        assert [v for _, v in r] == sorted(v for _, v in r)
    # the audit chain records them in commit order
    records = [rec for rec in admin.audit_tail(total + 50) if rec.cube == cube and rec.op == "add"]
    assert [rec.version for rec in records] == list(range(1, total + 1))
    assert admin.audit_verify().ok


def lmdb_transactions(daemon) -> int:
    """Write transactions committed to the store so far (read from its meta page)."""
    import lmdb

    env = lmdb.open(str(daemon.data_dir), readonly=True, max_dbs=0)
    try:
        return env.info()["last_txnid"]
    finally:
        env.close()


@pytest.mark.lmdb_only
def test_pipelined_writes_are_group_committed_and_fail_alone(daemon, admin):
    """64 writes sent at once take fewer commits; the bad ones among them fail alone."""
    from daemon_fixtures import frame
    from memos.ids import new_id

    cube = "conc-group"
    admin.cube_create(cube)
    good = {new_id(): f"good {i}" for i in range(64)}
    bad = {new_id(): "bad" for _ in range(8)}
    frames = [frame("add", {"cube": cube, "text": text}, rid=rid) for rid, text in good.items()]
    for i, rid in enumerate(bad):  # a missing cube among the good ones
        frames.insert(i * 8 + 3, frame("add", {"cube": "conc-missing", "text": "x"}, rid=rid))
    before = lmdb_transactions(daemon)
    with daemon.raw() as raw:
        for f in frames:
            raw.send(f)
        replies = [raw.recv(timeout=30) for _ in frames]
        assert raw.nothing_more(0.1)
    commits = lmdb_transactions(daemon) - before
    by_id = {r["id"]: r for r in replies}
    assert set(by_id) == set(good) | set(bad)
    assert all(by_id[rid]["ok"] and by_id[rid]["result"]["text"] == good[rid] for rid in good)
    assert all(by_id[rid]["error"]["code"] == "not_found" for rid in bad)
    assert sorted(by_id[rid]["result"]["version"] for rid in good) == list(range(1, 65))
    assert_contiguous_history(admin, cube, 64)
    assert 0 < commits < len(good), f"{commits} commits for {len(frames)} pipelined writes"
    assert admin.audit_verify().ok
