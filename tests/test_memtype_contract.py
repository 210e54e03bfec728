"""The memory-type contract (memos.memtypes).

Two halves:

* every registered memory type, built-in or not, keeps the contract: it is
  what its entry point says, its declarations are well formed, its
  ``validate`` refuses with typed errors, its module stays light;
* a type from outside memos (``tally``, in tests/toytype, registered by an
  entry point of its own) is served end to end by a real memosd: stored,
  versioned, rolled back, access-checked, audited, announced, prepared before
  its writes are committed, kept as derived state with read-your-writes, and
  run as a cancellable job with progress.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Mapping

import pytest
from conftest import TOYTYPE
from daemon_fixtures import Daemon, _running, make_daemon  # noqa: F401  (fixture)
from pydantic import BaseModel

from memos import catalog, config
from memos.client import AsyncClient
from memos.errors import Denied, InvalidRequest, NotFound, Timeout
from memos.memtypes import Item, MemoryType, available, load_types
from memos.models import Event
from memos.operations import Args, Operation
from memos.validation import Limits

TYPES = load_types()
CORE_OPS = {op.name: op for op in catalog.core_operations()}
CORE_WRITES = {name for name, op in CORE_OPS.items() if op.writes}
ITEM_FIELDS = {"type", "text", "blob", "media_type", "tags", "metadata"}


def test_the_toy_type_is_registered_by_its_own_entry_point():
    ep = available()["tally"]
    assert ep.value == "toy_memtype:Tally"
    assert ep.dist is not None and ep.dist.name == "toy-memtype"
    assert "tally" in TYPES


# -- every registered type keeps the contract ------------------------------------

@pytest.fixture(params=sorted(TYPES))
def memtype(request) -> type[MemoryType]:
    return TYPES[request.param]


def test_is_a_memory_type_under_its_entry_point_name(memtype):
    assert isinstance(memtype, type) and issubclass(memtype, MemoryType)
    ep = available()[memtype.name]
    assert ep.name == memtype.name and ep.load() is memtype
    assert not inspect.isabstract(memtype)
    assert isinstance(memtype(), MemoryType)  # the daemon builds each type without arguments


def test_databases_are_named_and_described(memtype):
    assert isinstance(memtype.databases, Mapping)
    for db, what in memtype.databases.items():
        assert isinstance(db, str) and re.fullmatch(r"[a-z0-9][a-z0-9_.-]{0,62}", db), db
        assert isinstance(what, str) and what.strip(), f"{memtype.name}/{db} says nothing of what it holds"


def test_operations_are_well_formed(memtype):
    ops = memtype.operations
    assert isinstance(ops, tuple) and all(isinstance(op, Operation) for op in ops)
    names = [op.name for op in ops]
    assert len(names) == len(set(names)), names
    others = {op.name for name, cls in TYPES.items() if name != memtype.name for op in cls.operations}
    assert not set(names) & (set(CORE_OPS) | others), "an operation name is taken"
    for op in ops:
        assert re.fullmatch(r"[a-z][a-z0-9_]{0,63}", op.name), op.name
        assert op.where in ("inline", "worker", "writer", "job"), f"{op.name}: unknown place {op.where!r}"
        assert isinstance(op.args, type) and issubclass(op.args, Args), op.name
        assert op.doc.strip(), f"{op.name} has no doc"
        assert set(op.positional) <= set(op.args.model_fields), op.name
        assert op.result_type is not None  # the client validates replies with it: it must build
        handler = getattr(memtype, op.handler, None)
        assert callable(handler), f"{op.name}: no method {op.handler!r}"
        # Reads are served as handler(actor, **fields), writes with request_id too.
        extra = {"request_id": None} if op.writes else {}
        if op.streams:
            extra["emit"] = print
        inspect.signature(handler).bind(None, object(), **dict.fromkeys(op.fields), **extra)


def test_prepares_only_writes_of_the_core(memtype):
    assert isinstance(memtype.prepares, (set, frozenset))
    assert set(memtype.prepares) <= CORE_WRITES, set(memtype.prepares) - CORE_WRITES
    if memtype.prepares:
        assert memtype.prepare is not MemoryType.prepare, "names writes to prepare but does not prepare them"


def test_settings_have_a_section_of_their_own(memtype):
    model = memtype.settings_model
    if model is None:
        return
    assert issubclass(model, BaseModel)
    model()  # every setting has a default
    section = config.type_section(memtype)
    assert section not in config.Settings.model_fields, f"[{section}] is a section of the core"
    sections = [config.type_section(cls) for cls in TYPES.values() if cls.settings_model is not None]
    assert sections.count(section) == 1, f"[{section}] is claimed twice"
    assert isinstance(config.type_settings(config.load(), memtype), model)


def _item(**fields) -> Item:
    base = {"type": "x", "text": None, "blob": None, "media_type": "application/octet-stream", "tags": [],
            "metadata": {}, "has_blob": False}
    base.update(fields)
    return Item(**base)


def test_validate_refuses_with_typed_errors_and_before_start(memtype):
    """Pure: works on an instance never started, raises only InvalidRequest (or TooLarge) naming a field."""
    fresh = memtype()
    limits = Limits(max_text_bytes=8, max_tags=1, max_metadata_bytes=64)
    candidates = [
        _item(type=memtype.name),  # nothing at all
        _item(type=memtype.name, text="x" * 100),  # over a limit the type may check itself
        _item(type=memtype.name, blob=b"\0" * 16, has_blob=True),
        _item(type=memtype.name, metadata={"k": "v"}),
        _item(type=memtype.name, tags=["a", "b"]),
    ]
    refused = 0
    for item in candidates:
        try:
            fresh.validate(item, limits)
        except InvalidRequest as exc:
            refused += 1
            assert exc.details.get("field") in ITEM_FIELDS, f"{exc!r} names no field of the item"
    assert refused, f"{memtype.name} accepts every item, even an empty one"


def _modules_after(statement: str) -> set[str]:
    code = f"import sys, json; {statement}; print(json.dumps(sorted(sys.modules)))"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TOYTYPE), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return {m.split(".")[0] for m in json.loads(out.stdout)}


def test_type_module_imports_no_models_or_transport(memtype):
    loaded = _modules_after(f"from memos.memtypes import available; available()[{memtype.name!r}].load()")
    assert not loaded & {"torch", "transformers", "zmq"}, memtype.name


# -- the toy type, end to end in memosd --------------------------------------------

STEP_S = 0.05  # the recount's pause between steps ([tally] step_delay_s)


@pytest.fixture(scope="module")
def daemon():
    yield from _running({"MEMOS_TALLY__STEP_DELAY_S": str(STEP_S)})


@pytest.fixture
def admin(daemon):
    return daemon.client()


def tally(count, text=None, **fields):
    return {"type": "tally", "text": text, "metadata": {"count": count}, **fields}


def test_tally_memories_are_stored_versioned_and_rolled_back(admin):
    c = "tally-core"
    admin.cube_create(c)
    m1 = admin.add(c, "apples", type="tally", metadata={"count": 3})
    assert (m1.type, m1.metadata, m1.version) == ("tally", {"count": 3}, 1)
    m2, m3 = admin.add_many(c, [tally(2, "pears"), tally(5)])
    assert (m2.version, m3.version, m3.text) == (2, 2, None)
    got = admin.get(c, m1.id)
    assert (got.type, got.metadata, got.content_hash) == ("tally", {"count": 3}, m1.content_hash)
    assert [m.id for m in admin.list(c)] == [m1.id, m2.id, m3.id]

    u = admin.update(c, m1.id, metadata={"count": 4})
    assert (u.version, u.metadata) == (3, {"count": 4})
    d = admin.delete(c, m2.id)
    assert d.version == 4
    assert admin.get(c, m1.id, at=1).metadata == {"count": 3}
    assert [h.op for h in admin.history(c)] == ["delete", "update", "add_many", "add", "create_cube"]
    assert [h.version for h in admin.history(c, memory_id=m1.id)] == [3, 1]
    diff = {e.memory_id: e for e in admin.diff(c, 1, 4)}
    assert set(diff) == {m1.id, m2.id, m3.id}
    assert diff[m1.id].change == "modified" and diff[m1.id].before.metadata == {"count": 3}
    assert diff[m3.id].change == "added"
    assert admin.tally_total(c)["total"] == 4 + 5

    commit = admin.rollback(c, 2)
    assert commit.version == 5
    assert {m.id: m.metadata["count"] for m in admin.list(c)} == {m1.id: 3, m2.id: 2, m3.id: 5}
    assert admin.tally_total(c) == {"cube": c, "total": 10, "memories": 3, "version": 5}


def test_validate_refuses_what_a_tally_cannot_hold(admin):
    c = "tally-validate"
    admin.cube_create(c)
    for bad in ({"type": "tally", "text": "no count"}, tally("3"), tally(True), tally(1.5),
                tally(1, blob=b"data")):
        with pytest.raises(InvalidRequest) as info:
            admin.add(c, **{"text": None, **bad})
        assert info.value.details.get("field") in ("metadata", "blob"), info.value
    with pytest.raises(InvalidRequest) as info:
        admin.add(c, "x", type="no-such-type")
    assert info.value.details.get("field") == "type" and "tally" in info.value.message
    m = admin.add(c, **tally(1))
    with pytest.raises(InvalidRequest):
        admin.update(c, m.id, metadata={"note": "count gone"})
    assert admin.cube_get(c).version == 1
    assert admin.tally_weights(c) == [{"op": "add", "counts": [1]}]


def test_prepare_rows_commit_with_their_write_and_a_refusal_commits_nothing(admin):
    c = "tally-prepare"
    admin.cube_create(c)
    m = admin.add(c, **tally(3))
    admin.add_many(c, [tally(2), "plain text, not a tally", tally(0)])
    admin.update(c, m.id, metadata={"count": 7})
    admin.update(c, m.id, tags=["no", "metadata"])  # nothing for prepare: no row
    expected = [{"op": "add", "counts": [3]}, {"op": "add_many", "counts": [2, 0]},
                {"op": "update", "counts": [7]}]
    assert admin.tally_weights(c) == expected

    before = (admin.cube_get(c).version, [x.content_hash for x in admin.list(c, status="all")],
              admin.tally_total(c))
    seq = admin.audit_checkpoint().seq
    refused = [
        lambda: admin.add(c, **tally(-1)),
        lambda: admin.add_many(c, [tally(4), tally(-2)]),  # one bad item sinks the whole write
        lambda: admin.update(c, m.id, metadata={"count": -5}),
    ]
    for write in refused:
        with pytest.raises(InvalidRequest) as info:
            write()
        assert "below zero" in info.value.message and info.value.details.get("field") == "metadata"
    after = (admin.cube_get(c).version, [x.content_hash for x in admin.list(c, status="all")],
             admin.tally_total(c))
    assert after == before
    assert admin.tally_weights(c) == expected
    records = admin.audit_tail(10, after=seq)
    assert [(r.op, r.outcome, r.detail["code"]) for r in records] == [
        ("add", "error", "invalid_request"), ("add_many", "error", "invalid_request"),
        ("update", "error", "invalid_request")]

    # A negative count in another type's metadata is no business of tally's.
    p = admin.add(c, "a plain memory", metadata={"count": -1})
    assert p.type != "tally"
    assert admin.tally_weights(c) == expected


def test_total_reads_its_own_writes(admin):
    """Each acknowledged write is in the very next tally_total: after_commit runs before the reply."""
    c = "tally-ryw"
    admin.cube_create(c)
    total, ids = 0, []
    for i in range(25):
        m = admin.add(c, **tally(i))
        total += i
        ids.append(m.id)
        now = admin.tally_total(c)
        assert (now["total"], now["memories"]) == (total, i + 1) and now["version"] >= m.version
    many = admin.add_many(c, [tally(100), tally(200)])
    assert admin.tally_total(c)["total"] == total + 300
    admin.update(c, many[0].id, metadata={"count": 1})
    assert admin.tally_total(c)["total"] == total + 201
    admin.update(c, many[1].id, status="archived")
    assert admin.tally_total(c)["total"] == total + 1
    admin.delete(c, many[0].id)
    assert admin.tally_total(c) == {"cube": c, "total": total, "memories": 25, "version": 29}
    admin.rollback(c, 26)
    assert admin.tally_total(c)["total"] == total + 300


def test_total_of_a_cube_first_asked_for_after_writes(admin):
    c = "tally-late"
    admin.cube_create(c)
    admin.add_many(c, [tally(n) for n in range(10)])
    assert admin.tally_total(c)["total"] == 45
    with pytest.raises(NotFound):
        admin.tally_total("tally-no-such-cube")


def test_access_is_checked_and_audited(daemon, admin):
    c = "tally-acl"
    admin.cube_create(c)
    admin.add(c, **tally(5))
    token = admin.agent_add("tally-reader")["token"]
    reader = daemon.client(token=token)
    seq = admin.audit_checkpoint().seq

    with pytest.raises(Denied):
        reader.tally_total(c)
    with pytest.raises(Denied):
        reader.tally_weights(c)
    admin.cube_grant(c, "tally-reader", "read")
    assert reader.tally_total(c)["total"] == 5
    assert [m.metadata for m in reader.list(c)] == [{"count": 5}]
    with pytest.raises(Denied):
        reader.add(c, **tally(1))
    with pytest.raises(Denied):
        reader.tally_recount(c)
    assert admin.tally_total(c)["total"] == 5

    records = [(r.actor, r.op, r.outcome) for r in admin.audit_tail(50, after=seq)]
    assert records == [
        ("tally-reader", "tally_total", "denied"),
        ("tally-reader", "tally_weights", "denied"),
        ("admin", "grant", "ok"),
        ("tally-reader", "add", "denied"),
        ("tally-reader", "tally_recount", "denied"),
    ]
    ok = admin.audit_tail(50)
    assert any(r.op == "add" and r.outcome == "ok" and r.cube == c for r in ok)


def test_events_announce_tally_writes(daemon, admin):
    c = "tally-events"
    admin.cube_create(c)
    got: queue.Queue[Event] = queue.Queue()
    listening = daemon.client()
    stream = listening.events(c, timeout=2.0)  # acknowledged before it returns: every write below is seen

    def listen() -> None:
        for event in stream:
            got.put(event)

    thread = threading.Thread(target=listen, daemon=True)
    thread.start()

    m = admin.add(c, **tally(3))
    with pytest.raises(InvalidRequest):
        admin.add(c, **tally(-3))  # refused: announces nothing
    u = admin.update(c, m.id, metadata={"count": 4})
    d = admin.delete(c, m.id)
    events = [got.get(timeout=5) for _ in range(3)]
    assert all(isinstance(e, Event) for e in events)
    assert [(e.op, e.cube, e.actor, e.version, e.memories) for e in events] == [
        ("add", c, "admin", m.version, [m.id]),
        ("update", c, "admin", u.version, [m.id]),
        ("delete", c, "admin", d.version, [m.id]),
    ]
    thread.join(10)
    assert got.empty()


def _job(client, job_id):
    return next(j for j in client.jobs() if j["id"] == job_id)


def _wait_job(client, job_id, until, timeout=20.0):
    deadline = time.monotonic() + timeout
    while True:
        job = _job(client, job_id)
        if until(job):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.02)


def test_recount_runs_as_a_job_with_progress(admin):
    c = "tally-recount"
    admin.cube_create(c)
    admin.add_many(c, [tally(n) for n in (1, 2, 3, 4, 5)])
    started = admin.tally_recount(c)
    assert (started["kind"], started["cube"], started["total"]) == ("tally_recount", c, 5)
    assert started["state"] in ("running", "done")
    seen = set()
    done = _wait_job(admin, started["id"], lambda j: seen.add(j["done"]) or j["state"] != "running")
    assert done["state"] == "done" and done["done"] == 5 and done["error"] is None
    assert done["detail"]["total"] == admin.tally_total(c)["total"] == 15
    assert done["finished"] >= done["started"]
    assert len(seen) > 1, "progress was never seen between the start and the end"


def test_recount_is_cancelled_through_job_cancel(daemon, admin):
    c = "tally-cancel"
    admin.cube_create(c)
    admin.add_many(c, [tally(1) for _ in range(200)])
    token = admin.agent_add("tally-writer")["token"]
    admin.cube_grant(c, "tally-writer", "write")
    writer = daemon.client(token=token)
    outsider = daemon.client(token=admin.agent_add("tally-outsider")["token"])

    job = writer.tally_recount(c)  # a writer may start it...
    assert job["total"] == 200
    _wait_job(admin, job["id"], lambda j: j["done"] >= 2)
    assert job["id"] in [j["id"] for j in writer.jobs()]
    assert job["id"] not in [j["id"] for j in outsider.jobs()]  # jobs on cubes it cannot read are hidden
    with pytest.raises(Denied):
        writer.job_cancel(job["id"])  # ...but cancelling needs the cube's admin
    asked = admin.job_cancel(job["id"])
    assert asked["id"] == job["id"]
    ended = _wait_job(admin, job["id"], lambda j: j["state"] != "running", timeout=5)
    assert ended["state"] == "cancelled" and ended["done"] < 200 and ended["finished"] is not None
    assert admin.job_cancel(job["id"])["state"] == "cancelled"  # a finished job stays as it ended
    with pytest.raises(NotFound):
        admin.job_cancel("no-such-job")
    refused = [(r.op, r.outcome, r.detail["code"]) for r in admin.audit_tail(3) if r.op == "job_cancel"]
    assert refused[-1] == ("job_cancel", "error", "not_found")  # refusals are audited like any other
    # The model executor is free again: the next recount runs to its end.
    admin.cube_create("tally-cancel-after")
    admin.add_many("tally-cancel-after", [tally(4), tally(6)])
    again = admin.tally_recount("tally-cancel-after")
    ended = _wait_job(admin, again["id"], lambda j: j["state"] != "running", timeout=5)
    assert (ended["state"], ended["done"], ended["detail"]["total"]) == ("done", 2, 10)


def _messages(log: str) -> list[dict]:
    out = []
    for line in log.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def test_lifecycle_and_derived_state_across_a_restart(make_daemon):  # noqa: F811
    d = make_daemon(env={"MEMOS_TALLY__STEP_DELAY_S": "0.01"}).start()
    admin = d.client()
    admin.cube_create("tally-restart")
    admin.add_many("tally-restart", [tally(2), tally(3)])
    assert admin.tally_total("tally-restart")["total"] == 5
    d.stop()
    said = [m for m in _messages(d.log()) if m.get("logger") == "memos.tally"]
    assert [m["message"] for m in said] == ["tally started", "tally stopped", "tally closed"]
    assert said[0]["step_delay_s"] == 0.01  # [tally] reached the type through its settings_model

    d.start()
    admin = d.client()
    assert admin.tally_total("tally-restart") == {"cube": "tally-restart", "total": 5, "memories": 2,
                                                  "version": 1}
    assert admin.tally_weights("tally-restart") == [{"op": "add_many", "counts": [2, 3]}]
    d.stop()


def test_a_streaming_operation_sends_partials_before_its_result(daemon, admin):
    c = "tally-stream"
    admin.cube_create(c)
    admin.add_many(c, [tally(2), tally(3), tally(5)])
    parts: list[int] = []
    result = admin.tally_stream(c, on_partial=parts.append)
    assert parts == [2, 3, 5] and result["total"] == 10
    assert admin.tally_stream(c)["total"] == 10  # without a listener the pieces are dropped

    async def main() -> tuple[list[int], dict]:
        async with AsyncClient(daemon.socket, timeout=30) as client:
            got: list[int] = []
            return got, await client.tally_stream(c, on_partial=got.append)

    got, result = asyncio.run(main())
    assert got == [2, 3, 5] and result["total"] == 10


def test_a_type_writes_its_own_rows_through_the_writer(daemon, admin):
    c = "tally-notes"
    admin.cube_create(c)
    token = admin.agent_add("tally-note-reader")["token"]
    admin.cube_grant(c, "tally-note-reader", "read")
    reader = daemon.client(token=token)
    assert admin.tally_note(c, "checked by hand") == {"cube": c, "note": "checked by hand"}
    assert reader.tally_notes(c) == [{"cube": c, "note": "checked by hand"}]
    with pytest.raises(Denied):
        reader.tally_note(c, "not allowed")
    assert reader.tally_notes(c)[0]["note"] == "checked by hand"
    records = [(r.op, r.outcome, r.actor) for r in admin.audit_tail(20) if r.op == "tally_note"]
    assert records[-2:] == [("tally_note", "ok", "admin"), ("tally_note", "denied", "tally-note-reader")]


def test_a_job_writes_a_memory_as_its_caller(daemon, admin):
    c = "tally-record"
    admin.cube_create(c)
    admin.add_many(c, [tally(4), tally(6)])
    before = admin.cube_get(c).version
    job = admin.tally_recount(c, record=True)
    ended = _wait_job(admin, job["id"], lambda j: j["state"] != "running", timeout=10)
    assert ended["state"] == "done" and ended["detail"]["total"] == 10
    made = admin.get(c, ended["detail"]["memory"])
    assert (made.text, made.metadata, made.tags) == ("recounted 10", {"count": 0, "recounted": 10}, ["recount"])
    assert made.provenance.actor == "admin" and made.version == before + 1
    assert admin.history(c, limit=1)[0].op == "add"
    assert admin.audit_verify().ok


def test_a_type_calls_another_operation_through_its_services(daemon, admin):
    c = "tally-calls"
    admin.cube_create(c)
    admin.add_many(c, [tally(1), tally(2)])
    assert admin.tally_listed(c) == 2  # tally's own operation, counting through the core's `list`
    token = admin.agent_add("tally-calls-outsider")["token"]
    with pytest.raises(Denied):  # the call runs as the caller, with the caller's rights
        daemon.client(token=token).tally_listed(c)


def test_a_stream_is_never_resent_and_a_failing_listener_fails_only_its_call(daemon, admin):
    c = "tally-stream-once"
    admin.cube_create(c)
    admin.add_many(c, [tally(2), tally(3)])
    impatient = daemon.client(timeout=0.0005, retries=3)  # would resend a read that is slower than this
    parts: list[int] = []
    try:
        impatient.tally_stream(c, on_partial=parts.append)
    except Timeout:
        pass
    time.sleep(0.5)
    assert parts in ([], [2], [2, 3])  # one run's pieces at most, never a second run's

    async def main() -> None:
        async with AsyncClient(daemon.socket, timeout=30) as client:
            def broken(part: int) -> None:
                raise ValueError("listener bug")

            with pytest.raises(ValueError, match="listener bug"):
                await client.tally_stream(c, on_partial=broken)
            assert (await client.ping())["pong"]  # the connection still serves the next call

    asyncio.run(main())
