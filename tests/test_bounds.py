"""The work one request can cause is bounded, and refusals do not cost a durable commit each.

In process: listings past the largest page, id lists past the batch limit, and searches of past
versions past their bounds are refused with typed errors naming the field. The refusal queue
summarises bursts and stays bounded.

Against a real memosd, with ``tests/faults/faults.c`` preloaded to count the flushes of the LMDB
data file (``MEMOS_SYNC_COUNT``: one fsync/fdatasync per durable commit): a burst of 200 denied
reads costs a few commits, not 200, and every one of them is still in the audit log, recorded
or counted in a summary.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import ALICE, register
from daemon_fixtures import ROOT, Daemon, frame, make_daemon  # noqa: F401  (a fixture)
from memos.api import LOCAL_ADMIN, Memos
from memos.errors import Denied, InvalidRequest, TooLarge, Unauthenticated, Unavailable
from memos.jobs import Jobs
from memos.paging import every
from memos.plugins.plaintext import SearchSettings
from memos.refusals import Refusals
from memos.services import TypeServices
from memos.validation import Limits

LIMITS = Limits(max_page=5, max_batch=3, max_tags=4, max_past_search_memories=3, past_search_builds=1)


@pytest.fixture
def small(store_dir):
    """A store whose limits are small enough to reach in a test."""
    m = Memos(store_dir, limits=LIMITS)
    register(m, ALICE)
    m.create_cube(ALICE, "notes")
    yield m
    m.close()


def refused_with(info: pytest.ExceptionInfo, field: str) -> None:
    assert type(info.value) is TooLarge, info.value
    assert info.value.details.get("field") == field, info.value.details


def last_refusal(m: Memos):
    return m.audit_tail(LOCAL_ADMIN, 1)[0]


# -- pages ------------------------------------------------------------------------------

def test_list_is_paged_and_a_listing_past_the_largest_page_is_refused(small):
    ids = [small.add(ALICE, "notes", f"note {i}").id for i in range(7)]
    with pytest.raises(TooLarge) as info:
        small.list(ALICE, "notes", limit=6)
    refused_with(info, "limit")
    assert info.value.details["limit"] == 5
    assert last_refusal(small).detail["code"] == "too_large"
    with pytest.raises(TooLarge, match="page with after") as info:  # no limit, more than a page
        small.list(ALICE, "notes")
    refused_with(info, "limit")
    pages, after = [], None
    while True:
        page = small.list(ALICE, "notes", limit=5, after=after)
        pages.append(len(page))
        if len(page) < 5:
            break
        after = page[-1].id
    assert pages == [5, 2]
    assert [m.id for m in small.list(ALICE, "notes", tag="none")] == []  # a filtered listing that fits
    assert len(small.list(ALICE, "notes", limit=5, after=ids[1])) == 5


def test_history_diff_and_proposals_are_paged_likewise(small):
    for i in range(6):
        small.add(ALICE, "notes", f"note {i}")  # versions 1..6 (0: the cube made)
    with pytest.raises(TooLarge) as info:
        small.history(ALICE, "notes", limit=6)
    refused_with(info, "limit")
    with pytest.raises(TooLarge, match="before"):
        small.history(ALICE, "notes")
    versions, before = [], None
    while True:
        page = small.history(ALICE, "notes", limit=5, before=before)
        versions += [c.version for c in page]
        if len(page) < 5:
            break
        before = page[-1].version
    assert versions == [6, 5, 4, 3, 2, 1, 0]

    with pytest.raises(TooLarge, match="after"):
        small.diff(ALICE, "notes", 0, 6)
    first = small.diff(ALICE, "notes", 0, 6, limit=5)
    rest = small.diff(ALICE, "notes", 0, 6, limit=5, after=first[-1].memory_id)
    assert len(first) == 5 and len(rest) == 1

    for v in range(6):
        small.propose(ALICE, "notes", v)
    with pytest.raises(TooLarge, match="before"):
        small.proposals.list(ALICE, "notes")
    first = small.proposals.list(ALICE, "notes", limit=5)
    rest = small.proposals.list(ALICE, "notes", limit=5, before=first[-1].id)
    assert [p.to_version for p in first + rest] == [5, 4, 3, 2, 1, 0]  # newest first


# -- lists in requests ----------------------------------------------------------------------

def test_id_lists_and_batches_past_their_limits_are_refused_and_audited(small):
    ids = [m.id for m in small.add_many(ALICE, "notes", ["a", "b", "c"])]
    with pytest.raises(TooLarge) as info:
        small.add_many(ALICE, "notes", ["a", "b", "c", "d"])
    refused_with(info, "items")
    assert (last_refusal(small).op, last_refusal(small).detail["code"]) == ("add_many", "too_large")
    for call in (lambda many: small.rollback(ALICE, "notes", 0, memory_ids=many),
                 lambda many: small.propose(ALICE, "notes", 0, memory_ids=many)):
        with pytest.raises(TooLarge) as info:
            call([*ids, ids[0].replace(ids[0][-1], "0")])
        refused_with(info, "memory_ids")
    # A huge tag list is refused once past the limit, not deduplicated first (that was quadratic).
    started = time.monotonic()
    with pytest.raises(TooLarge) as info:
        small.update(ALICE, "notes", ids[0], tags=[f"t{i}" for i in range(300_000)])
    refused_with(info, "tags")
    assert time.monotonic() - started < 5


# -- searches of past versions ------------------------------------------------------------

@pytest.fixture
def searching(small, tmp_path):
    executor = ThreadPoolExecutor(1, thread_name_prefix="test-model")
    memtype = small.types["plaintext"]
    memtype.start(TypeServices(small, "plaintext", SearchSettings(embedder="hashing"), tmp_path / "state",
                               Jobs(), executor))
    memtype.booted.result(timeout=60)
    yield memtype
    memtype.stop()
    executor.shutdown(wait=True)
    memtype.close()


def test_a_past_version_too_big_to_index_is_refused(small, searching):
    versions = [small.add(ALICE, "notes", f"note {i} about the move").version for i in range(4)]
    assert len(searching.search(ALICE, "notes", "move", at=versions[2])) == 3  # three: at the bound
    with pytest.raises(TooLarge, match="without at") as info:
        searching.search(ALICE, "notes", "move", at=versions[3])
    refused_with(info, "at")
    assert (last_refusal(small).op, last_refusal(small).detail["code"]) == ("search", "too_large")


def test_past_version_indexes_are_built_a_bounded_number_at_a_time(small, searching):
    versions = [small.add(ALICE, "notes", f"note {i} about the move").version for i in range(2)]
    searching.search(ALICE, "notes", "move", at=versions[0])  # built and kept
    builds = searching._searcher._builds
    assert builds.acquire(blocking=False)  # another search is building (past_search_builds = 1)
    try:
        with pytest.raises(Unavailable, match="retry shortly"):
            searching.search(ALICE, "notes", "move", at=versions[1])
        assert len(searching.search(ALICE, "notes", "move", at=versions[0])) == 1  # kept: no build
    finally:
        builds.release()
    assert len(searching.search(ALICE, "notes", "move", at=versions[1])) == 2
    assert builds.acquire(blocking=False)  # every search gave its build back
    builds.release()


def test_search_filters_are_bounded_like_a_memorys_own_fields(small, searching):
    small.add(ALICE, "notes", "a note")
    with pytest.raises(TooLarge) as info:
        searching.search(ALICE, "notes", "note", tags=[f"t{i}" for i in range(5)])
    refused_with(info, "tags")
    with pytest.raises(TooLarge) as info:
        searching.search(ALICE, "notes", "note", metadata={"k": "x" * 70_000})
    refused_with(info, "metadata")


# -- the refusal queue -------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_a_burst_is_summarised_per_agent_op_and_code():
    clock, wakes = Clock(), []
    q = Refusals(per_agent=3, wake=wakes.append, clock=clock)
    for i in range(10):
        q.add("eve", "get", "private", Denied("no"), f"r{i}")
    q.add("eve", "list", "private", Denied("no"))
    q.add("bob", "get", None, InvalidRequest("bad"))
    assert wakes == [False]  # one wake-up for the writer, not one per refusal
    taken = q.take()
    single = [r for r in taken.records if "count" not in r["detail"]]
    summaries = {(r["actor"], r["op"]): r for r in taken.records if "count" in r["detail"]}
    assert [(r["actor"], r["op"]) for r in single] == [("eve", "get")] * 3 + [("bob", "get")]
    assert summaries[("eve", "get")]["detail"]["count"] == 7
    assert summaries[("eve", "get")]["cube"] == "private" and "request_id" not in summaries[("eve", "get")]["detail"]
    assert summaries[("eve", "list")]["detail"]["count"] == 1
    assert sum(r["detail"].get("count", 1) for r in taken.records) == 12  # every refusal accounted for
    clock.t += 1.0  # a new second: each agent's first three are recorded again
    q.add("eve", "get", "private", Denied("no"))
    assert "count" not in q.take().records[0]["detail"]


def test_the_queue_stays_bounded(monkeypatch):
    from memos import refusals

    monkeypatch.setattr(refusals, "MAX_PENDING", 5)
    monkeypatch.setattr(refusals, "MAX_SUMMARIES", 2)
    q = Refusals(per_agent=1000, clock=Clock())
    for i in range(50):
        q.add("anonymous", f"op{i}", None, InvalidRequest("unknown operation"))
    records = q.take().records
    assert len(records) == 5 + 3  # five waiting records, two counters, the catch-all
    assert records[-1]["actor"] == "*" and records[-1]["detail"]["count"] == 50 - 5 - 2


def test_a_reader_waits_for_the_records_it_should_see():
    q = Refusals(per_agent=10)
    written = threading.Event()

    def writer(urgent: bool) -> None:
        if urgent:  # the writer commits at once for a reader that waits
            threading.Timer(0.05, lambda: (q.written(q.take()), written.set())).start()

    q.wake = writer
    q.add("eve", "get", "c", Denied("no"))
    assert q.settle(timeout=5) and written.is_set()
    assert q.settle(timeout=0)  # nothing left: no wait


# -- a real memosd ----------------------------------------------------------------------------

SHIM = ROOT / "tests" / "faults" / "faults.c"
BURST = 200


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    """A memosd with small limits whose LMDB flushes are counted."""
    if shutil.which("gcc") is None:
        pytest.skip("no C compiler to build the flush-counting shim")
    folder = tmp_path_factory.mktemp("shim")
    shim = folder / "faults.so"
    subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(shim), str(SHIM), "-ldl"], check=True)
    count = folder / "syncs"
    d = Daemon(env={"LD_PRELOAD": str(shim), "MEMOS_SYNC_COUNT": str(count),
                    "MEMOS_LIMITS__MAX_PAGE": "50", "MEMOS_LIMITS__MAX_BATCH": "5",
                    "MEMOS_LIMITS__MAX_PAST_SEARCH_MEMORIES": "3",
                    "MEMOS_LIMITS__REFUSAL_RECORDS_PER_S": "20"})
    d.start()
    d.count_file = count  # type: ignore[attr-defined]
    try:
        yield d
        if d.alive():
            d.stop()
    finally:
        d.cleanup()


def syncs(d: Daemon) -> int:
    path: Path = d.count_file  # type: ignore[attr-defined]
    return int(path.read_text() or 0) if path.exists() else 0


def quiet_syncs(d: Daemon) -> int:
    """The flush count once the daemon has committed what it queued (no change for 0.3 s)."""
    last = syncs(d)
    while True:
        time.sleep(0.3)
        now = syncs(d)
        if now == last:
            return now
        last = now


def test_a_burst_of_denied_reads_costs_a_few_commits_and_is_all_audited(counted):
    admin = counted.client()
    admin.cube_create("burst-private")
    mem = admin.add("burst-private", "secret")
    eve = counted.client(token=admin.agent_add("burst-eve")["token"])
    since = admin.audit_checkpoint().seq
    before = quiet_syncs(counted)
    for _ in range(BURST):
        with pytest.raises(Denied):
            eve.get("burst-private", mem.id)
    after = quiet_syncs(counted)
    # Measured: 1-3 flushes here; one commit each, on the socket thread, made 200.
    assert after - before < 20, f"{BURST} denied reads cost {after - before} flushes"

    records = [r for r in admin.audit_tail(1000, after=since)
               if (r.actor, r.op, r.outcome) == ("burst-eve", "get", "denied")]
    assert sum(r.detail.get("count", 1) for r in records) == BURST
    assert any(r.detail.get("summary") for r in records)  # past 20 a second they are counted
    assert len(records) < BURST


def test_a_burst_of_unauthenticated_requests_costs_a_few_commits(counted):
    admin = counted.client()
    since = admin.audit_checkpoint().seq
    stranger = counted.client(token="nobody.secret")
    before = quiet_syncs(counted)
    for _ in range(BURST):
        with pytest.raises(Unauthenticated):
            stranger.ping()
    after = quiet_syncs(counted)
    assert after - before < 20, f"{BURST} unauthenticated requests cost {after - before} flushes"
    records = [r for r in admin.audit_tail(1000, after=since) if r.detail.get("code") == "unauthenticated"]
    assert sum(r.detail.get("count", 1) for r in records) == BURST


def test_the_daemon_refuses_each_bound_with_a_typed_error(counted):
    admin = counted.client()
    admin.cube_create("bounds")
    versions = [m.version for m in admin.add_many("bounds", ["one move", "two moves", "three moves"])]
    admin.add("bounds", "four moves")
    with counted.raw() as raw:
        for op, args, field in (
            ("list", {"cube": "bounds", "limit": 51}, "limit"),
            ("history", {"cube": "bounds", "limit": 51}, "limit"),
            ("diff", {"cube": "bounds", "v1": 0, "v2": 2, "limit": 51}, "limit"),
            ("rollback_proposals", {"limit": 51}, "limit"),
            ("add_many", {"cube": "bounds", "items": ["x"] * 6}, "items"),
            ("rollback", {"cube": "bounds", "to_version": 0, "memory_ids": ["0" * 26] * 6}, "memory_ids"),
            ("search", {"cube": "bounds", "query": "moves", "at": 2}, "at"),
        ):
            reply = raw.exchange(frame(op, args))
            error = reply.get("error") or {}
            assert (error.get("code"), error.get("details", {}).get("field")) == ("too_large", field), (op, reply)
    assert len(admin.search("bounds", "moves", at=versions[-1])) == 3  # three memories: within the bound
    assert len(admin.list("bounds", limit=50)) == 4


def test_a_refusal_is_in_the_audit_log_as_soon_as_a_reader_asks(counted):
    admin = counted.client()
    admin.cube_create("settle-private")
    mem = admin.add("settle-private", "secret")
    mallory = counted.client(token=admin.agent_add("settle-mallory")["token"])
    since = admin.audit_checkpoint().seq
    with pytest.raises(Denied):
        mallory.get("settle-private", mem.id)
    # No wait: the reader's request commits the queued record first.
    assert [(r.actor, r.op, r.outcome) for r in admin.audit_tail(10, after=since)] == [
        ("settle-mallory", "get", "denied")]


def test_cube_and_agent_lists_are_paged_by_name(make_daemon):
    d = make_daemon(env={"MEMOS_LIMITS__MAX_PAGE": "3"}).start()
    c = d.client()
    names = [f"pg-{i}" for i in range(7)]
    for name in names:
        c.cube_create(name)
        c.agent_add(name)
    with pytest.raises(TooLarge):
        c.cube_list()  # more than a page, and no limit: refused rather than cut short
    with pytest.raises(TooLarge):
        c.cube_list(limit=4)
    assert [x.name for x in c.cube_list(limit=3, after="pg-2")] == ["pg-3", "pg-4", "pg-5"]
    assert [x.name for x in every(lambda n, after: c.cube_list(limit=n, after=after), lambda x: x.name)] == names
    assert [x.name for x in every(lambda n, after: c.agent_list(limit=n, after=after), lambda x: x.name)] == names
    assert [x.name for x in c.agent_list(limit=2, after="pg-5")] == ["pg-6"]
